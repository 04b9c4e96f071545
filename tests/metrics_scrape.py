#!/usr/bin/env python3
"""Scrapes the storage role's and the node plugin's metrics endpoints and
parses them with Prometheus' own text parser (prometheus_client):

    metrics_scrape.py STORAGE_ADDR NODE_ADDR DATA_DIR WRITTEN_ID NBD_URI EMPTY_ID

  - storage (the controller's embedded agent, the code an `agent` process
    serves): WRITTEN_ID, whose export NBD_URI this script writes 4 MiB to
    first, has allocated bytes of at least 4 MiB; EMPTY_ID, never written,
    has almost none; both report their capacity; the store's free bytes are
    within 64 MiB of what statvfs says of DATA_DIR (other writers share the
    filesystem), its size is statvfs's exactly, and the provisioned bytes
    are the two capacities summed;
  - node (no staged volume: this host has no nbd.ko): the process figures,
    zero volumes and no per-volume sample;
  - both: the text format's content type, every counter ends in _total and
    every metric is nbd_csi_* or process_*.
Prints "ok: ..." / "FAILED: ..." lines; exits 1 on any failure.
"""

import os
import re
import sys
import urllib.request

import nbd
from prometheus_client.parser import text_string_to_metric_families

from checks import bad, failed, ok

MIB = 1 << 20
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"


def scrape(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as reply:
        content_type = reply.headers["Content-Type"]
        text = reply.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return content_type, families


def samples(families, name, **labels):
    """The samples named `name` whose labels include `labels` (the parser
    files a counter's x_total samples under the family x)."""
    f = families.get(name) or families.get(name.removesuffix("_total"))
    if f is None:
        return []
    return [s for s in f.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def value(families, family, **labels):
    found = samples(families, family, **labels)
    if len(found) != 1:
        bad(f"{family}{labels}: {len(found)} samples, one expected")
        return None
    return found[0].value


def conventions(what, content_type, families):
    if content_type == TEXT_FORMAT:
        ok(f"{what}: content type {content_type}")
    else:
        bad(f"{what}: content type {content_type!r}, not {TEXT_FORMAT!r}")
    odd = [n for n in families if not re.fullmatch(r"(nbd_csi|process)_[a-z0-9_]+", n)]
    if odd:
        bad(f"{what}: metrics outside nbd_csi_* and process_*: {odd}")
    counters = [f for f in families.values() if f.type == "counter"]
    untotalled = [s.name for f in counters for s in f.samples if not s.name.endswith("_total")]
    untyped = [f.name for f in families.values() if f.type == "untyped"]
    if untotalled or untyped:
        bad(f"{what}: counter samples without _total {untotalled}, untyped families {untyped}")
    else:
        ok(f"{what}: {len(families)} families parsed, {len(counters)} counters, all *_total, none untyped")


def check_storage(addr, data_dir, written, uri, empty):
    h = nbd.NBD()
    h.connect_uri(uri)
    for offset in range(0, 4 * MIB, MIB):
        h.pwrite(bytes([0xA5]) * MIB, offset)
    h.flush()
    h.shutdown()
    content_type, families = scrape(addr)
    conventions("storage", content_type, families)
    allocated = value(families, "nbd_csi_volume_allocated_bytes", volume_id=written)
    if allocated is not None and 4 * MIB <= allocated < 8 * MIB:
        ok(f"storage: written volume allocated {int(allocated)} bytes (4 MiB written)")
    else:
        bad(f"storage: written volume allocated {allocated} bytes, 4 MiB written")
    allocated = value(families, "nbd_csi_volume_allocated_bytes", volume_id=empty)
    if allocated is not None and allocated < MIB:
        ok(f"storage: empty volume allocated {int(allocated)} bytes")
    else:
        bad(f"storage: empty volume allocated {allocated} bytes, nothing written")
    capacities = [value(families, "nbd_csi_volume_capacity_bytes", volume_id=v) for v in (written, empty)]
    if capacities == [64 * MIB, 64 * MIB]:
        ok("storage: both volumes' capacity is 64 MiB")
    else:
        bad(f"storage: capacities {capacities}, 64 MiB each expected")
    st = os.statvfs(data_dir)
    store = {"data_dir": data_dir}
    free = value(families, "nbd_csi_store_free_bytes", **store)
    want = st.f_bavail * st.f_frsize
    if free is not None and abs(free - want) < 64 * MIB:
        ok(f"storage: store free {int(free)} bytes, statvfs {want}")
    else:
        bad(f"storage: store free {free} bytes, statvfs says {want}")
    size = value(families, "nbd_csi_store_size_bytes", **store)
    if size == st.f_blocks * st.f_frsize:
        ok(f"storage: store size {int(size)} bytes as statvfs")
    else:
        bad(f"storage: store size {size}, statvfs {st.f_blocks * st.f_frsize}")
    provisioned = value(families, "nbd_csi_store_provisioned_bytes", **store)
    if provisioned == 128 * MIB:
        ok("storage: 128 MiB provisioned")
    else:
        bad(f"storage: {provisioned} bytes provisioned, 128 MiB expected")
    written_bytes = value(families, "nbd_csi_volume_written_bytes_total", volume_id=written)
    if written_bytes == 4 * MIB:
        ok("storage: the server counted the 4 MiB written")
    else:
        bad(f"storage: nbd_csi_volume_written_bytes_total {written_bytes}, 4 MiB written")
    check_tls(families, written)


def check_tls(families, volume):
    """The TLS families of a volume served in plaintext: every kind and
    reason declared, typed, and zero but for plaintext connections (its
    client may not have been reaped yet)."""
    expected = {
        ("nbd_csi_volume_tls_connections", "gauge", "tls"): ["kernel", "userspace", "none"],
        ("nbd_csi_volume_tls_handshake_failures_total", "counter", "reason"):
            ["certificate", "protocol", "io", "timeout"],
        ("nbd_csi_volume_tls_kernel_fallbacks_total", "counter", "reason"):
            ["no_kernel_tls", "kernel_refused", "cipher", "not_at_rest", "not_tcp"],
    }
    for (name, kind, label), values in expected.items():
        family = families.get(name.removesuffix("_total"))
        found = {s.labels.get(label): s.value for s in samples(families, name, volume_id=volume)}
        if family is None or family.type != kind:
            bad(f"storage: {name} is not a declared {kind}")
        elif sorted(found) != sorted(values) or any(v != 0 for k, v in found.items() if k != "none"):
            bad(f"storage: {name} by {label}: {found}, {values} all 0 expected")
        else:
            ok(f"storage: {name} by {label}: {found} for a plaintext volume")
    closes = value(families, "nbd_csi_volume_tls_record_limit_closes_total", volume_id=volume)
    if closes == 0:
        ok("storage: no TLS connection closed at its record limit")
    else:
        bad(f"storage: nbd_csi_volume_tls_record_limit_closes_total {closes}")


def check_node(addr):
    content_type, families = scrape(addr)
    conventions("node", content_type, families)
    for family in ("process_start_time_seconds", "process_open_fds", "process_resident_memory_bytes"):
        v = value(families, family)
        if v is not None and v > 0:
            ok(f"node: {family} {v}")
        else:
            bad(f"node: {family} {v}")
    if value(families, "nbd_csi_node_volumes") == 0:
        ok("node: no volume staged")
    else:
        bad(f"node: nbd_csi_node_volumes {value(families, 'nbd_csi_node_volumes')}, none staged")
    per_volume = [s for f in families.values() for s in f.samples if "volume_id" in s.labels]
    if per_volume:
        bad(f"node: per-volume samples without a staged volume: {per_volume[:3]}")
    else:
        ok("node: no per-volume sample")
    if "nbd_csi_node_volume_health" in families and families["nbd_csi_node_volume_health"].type == "gauge":
        ok("node: the per-volume families are declared even when empty")
    else:
        bad("node: nbd_csi_node_volume_health is not declared")


def main():
    storage, node, data_dir, written, uri, empty = sys.argv[1:]
    check_storage(storage, data_dir, written, uri, empty)
    check_node(node)
    return 1 if failed() else 0


if __name__ == "__main__":
    sys.exit(main())
