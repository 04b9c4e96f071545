#!/usr/bin/env python3
"""Renders the control-plane benchmark's section of BENCHMARKS.md (run by
bench/control-plane.sh): the client's JSON for the embedded default and for
cluster mode, and the API server's request metrics read before and after the
cluster run. Python stdlib only. Prints the section, markers included."""

import argparse
import json
import os
import re
import subprocess
import sys
import time

PAIR_TARGET_MS = 100.0
IDLE_TARGET_BYTES = 64 * 1024
# Requests that stay open (watches) have no meaningful duration.
LONG_RUNNING_VERBS = {"WATCH", "WATCHLIST", "CONNECT"}


def machine():
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        kib = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
    return "%s, %d CPUs, %.1f GiB RAM, Linux %s" % (cpu, os.cpu_count(), kib / 1048576, os.uname().release)


def version(binary):
    try:
        return subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown version"


def per_volume(before, after, volumes):
    """Bytes per volume from two KiB figures."""
    return (after - before) * 1024 / volumes


def fmt_bytes(b):
    return "%s B" % format(round(b), ",") if abs(b) < 10240 else "%.1f KiB" % (b / 1024)


def verdict(ok, target):
    return "%s: %s" % (target, "met" if ok else "**missed**")


def metric_samples(path, name):
    """{labels-dict-as-tuple: value} of one Prometheus metric."""
    out = {}
    pattern = re.compile(r"^%s\{(.*)\} (\S+)$" % re.escape(name))
    with open(path) as f:
        for line in f:
            m = pattern.match(line.strip())
            if m:
                labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(1))))
                out[labels] = float(m.group(2))
    return out


def request_table(before, after, metric, key):
    """Rows (key..., count, mean ms, total s) of a duration histogram's
    increase between two scrapes, grouped by the labels in `key`."""
    rows = {}
    for suffix in ("_count", "_sum"):
        b = metric_samples(before, metric + suffix)
        for labels, value in metric_samples(after, metric + suffix).items():
            d = dict(labels)
            if d.get("verb") in LONG_RUNNING_VERBS:
                continue
            group = tuple(d.get(k, "") for k in key)
            row = rows.setdefault(group, [0.0, 0.0])
            row[0 if suffix == "_count" else 1] += value - b.get(labels, 0.0)
    return sorted(((g, c, s) for g, (c, s) in rows.items() if c > 0), key=lambda r: -r[2])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--embedded", required=True)
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--apiserver-before", required=True)
    ap.add_argument("--apiserver-after", required=True)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--load-before", required=True)
    ap.add_argument("--load-after", required=True)
    ap.add_argument("--etcd-fs", required=True)
    ap.add_argument("--agent", action="append", default=[], metavar="NAME=ADDRESS",
                    help="an agent's name and the address its nbdUris carry")
    ap.add_argument("--quick", default="0")
    ap.add_argument("--begin", required=True)
    ap.add_argument("--end", required=True)
    args = ap.parse_args()
    with open(args.embedded) as f:
        embedded = json.load(f)
    with open(args.cluster) as f:
        cluster = json.load(f)
    n = cluster["volumes"]
    size_mib = cluster["size_bytes"] >> 20
    concurrency = cluster["phases"][1]["concurrency"]
    agents = sorted(k for k in cluster["memory"]["baseline"] if k != "controller")
    # Volumes each agent held in the sequential phase (the memory figures'),
    # from the addresses in their nbdUris.
    address = dict(a.split("=", 1) for a in args.agent)
    held = {a: cluster["phases"][0]["spread"].get(address.get(a, ""), 0) for a in agents}

    def rss_sum(report, names, point, field="vm_rss_kib"):
        return sum(report["memory"][point][name][field] for name in names)

    # The target's figure: published idle volumes.
    idle = {
        "embedded": per_volume(rss_sum(embedded, ["controller"], "baseline"),
                               rss_sum(embedded, ["controller"], "published"), n),
        "cluster": per_volume(rss_sum(cluster, agents, "baseline"), rss_sum(cluster, agents, "published"), n),
    }

    out = [args.begin, "## Control plane: CreateVolume + ControllerPublishVolume through the API server, idle volumes", ""]
    if args.quick == "1":
        out += ["**Smoke run (`--quick`): too few volumes for the percentiles to mean anything.**", ""]
    out += [
        "Written by `bench/control-plane.sh` on %s. Machine: %s; load average %s before the run, %s after "
        "(1/5/15 min). `%s`, release build, log level %s. Everything on one machine, all traffic on 127.0.0.0/8."
        % (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine(), args.load_before, args.load_after,
           version(args.binary), os.environ.get("RUST_LOG", "info")),
        "",
        "%d volumes of %d MiB (sparse), each CreateVolume (mount, SINGLE_NODE_WRITER) followed by "
        "ControllerPublishVolume to one node, over one gRPC connection on the controller's unix socket; "
        "first one pair after another, then (new volumes, after the first %d were unpublished and deleted) "
        "%d pairs in flight. A pair's latency is CreateVolume's plus ControllerPublishVolume's. "
        "No volume ever sees I/O." % (n, size_mib, n, concurrency),
        "",
        "| mode | pairs | in flight | CreateVolume p50 / p99 ms | ControllerPublishVolume p50 / p99 ms "
        "| pair p50 ms | pair p90 ms | pair p99 ms | pair max ms | pairs/s | RSS per idle volume | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mode, report, label in (("embedded", embedded, "embedded default (in-process agent)"),
                                ("cluster", cluster, "cluster: API server + 3 agents")):
        for phase in report["phases"]:
            c, p, pair = phase["create"], phase["publish"], phase["pair"]
            target = ""
            if mode == "cluster":
                target = verdict(pair["p99_ms"] < PAIR_TARGET_MS, "p99 < %d ms" % PAIR_TARGET_MS)
            memory = ""
            if phase["name"] == "sequential":
                memory = fmt_bytes(idle[mode])
                if mode == "cluster":
                    target += "; " + verdict(idle[mode] < IDLE_TARGET_BYTES, "< 64 KiB per idle volume")
            out.append("| %s | %d | %d | %.2f / %.2f | %.2f / %.2f | %.2f | %.2f | %.2f | %.2f | %.0f | %s | %s |" % (
                label, phase["pairs"], phase["concurrency"], c["p50_ms"], c["p99_ms"], p["p50_ms"], p["p99_ms"],
                pair["p50_ms"], pair["p90_ms"], pair["p99_ms"], pair["max_ms"],
                phase["pairs"] / phase["wall_seconds"], memory, target))
    out.append("")
    spread = lambda phase: ", ".join("%s: %d" % kv for kv in sorted(phase["spread"].items()))
    out.append("Spread over the agents (storage node address in the nbdUri): %s one at a time; %s in flight."
               % (spread(cluster["phases"][0]), spread(cluster["phases"][1])))
    out.append("ControllerUnpublishVolume p50 / p99: embedded %.2f / %.2f ms, cluster %.2f / %.2f ms; "
               "DeleteVolume: embedded %.2f / %.2f ms, cluster %.2f / %.2f ms (one at a time). "
               "CreateVolume alone, never published (the created-only phase): embedded %.2f / %.2f ms, "
               "cluster %.2f / %.2f ms." % (
                   embedded["unpublish"]["p50_ms"], embedded["unpublish"]["p99_ms"],
                   cluster["unpublish"]["p50_ms"], cluster["unpublish"]["p99_ms"],
                   embedded["delete"]["p50_ms"], embedded["delete"]["p99_ms"],
                   cluster["delete"]["p50_ms"], cluster["delete"]["p99_ms"],
                   embedded["create_only"]["p50_ms"], embedded["create_only"]["p99_ms"],
                   cluster["create_only"]["p50_ms"], cluster["create_only"]["p99_ms"]))
    out.append("")

    out += [
        "### Resident memory per idle volume",
        "",
        "VmRSS from /proc/PID/status, KiB, %d s after each step. Published: with no volume (after %d warm-up "
        "volumes were created, published, unpublished and deleted), then with the %d volumes of the sequential "
        "phase created and published (idle: no connection, no I/O). Created only: at the end of the run, once "
        "every volume was deleted, with no volume again, then with %d new volumes created and never published. "
        "Per volume = the difference divided by the volumes the process holds (%d for a controller and for the "
        "agents together; for one agent its share of the published volumes, from the addresses in their "
        "nbdUris; the client cannot see where an unpublished volume lives). Whether a created-only volume has "
        "its NBD server and port depends on the build: the open descriptors (fd; a served volume holds its "
        "image and its listening socket) show what was measured."
        % (cluster["settle_seconds"], cluster["warmup"], n, n, n),
        "",
        "| process | volumes held | 0 volumes | published | per published volume | 0 volumes, at the end "
        "| created only | per created volume | fd: 0 / published / 0 at the end / created only | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    points = ("baseline", "published", "rebased", "created")

    def memory_row(label, report, names, volumes, created_volumes, target):
        b, p, r, c = (rss_sum(report, names, point) for point in points)
        fds = " / ".join(str(sum(report["memory"][point][name]["fds"] for name in names)) for point in points)
        per = per_volume(b, p, volumes) if volumes else None
        per_created = per_volume(r, c, created_volumes) if created_volumes else None
        t = verdict(per < IDLE_TARGET_BYTES, "< 64 KiB") if target and per is not None else ""
        out.append("| %s | %d | %d | %d | %s | %d | %d | %s | %s | %s |" % (
            label, volumes, b, p, fmt_bytes(per) if per is not None else "", r, c,
            fmt_bytes(per_created) if per_created is not None else "", fds, t))

    memory_row("embedded: controller (volumes served in-process)", embedded, ["controller"], n, n, False)
    memory_row("cluster: the 3 agents together", cluster, agents, n, n, True)
    for a in agents:
        memory_row("cluster: agent %s" % a, cluster, [a], held[a], 0, False)
    memory_row("cluster: controller (stateless)", cluster, ["controller"], n, n, False)
    out.append("")

    # Every volume of the cluster run: warm-up, both phases of pairs, created only.
    volumes_total = sum(p["pairs"] for p in cluster["phases"]) + cluster["warmup"] + cluster["create_only"]["count"]
    rows = request_table(args.apiserver_before, args.apiserver_after, "apiserver_request_duration_seconds",
                         ("verb", "resource", "subresource"))
    out += [
        "### Where the time goes in cluster mode: API server requests",
        "",
        "From the API server's `apiserver_request_duration_seconds` (its own handling time, etcd included), "
        "the increase over the whole cluster run: %d volumes (warm-up and created-only included), each created, "
        "then (but for the %d created only) published and unpublished, and deleted, so a row's per-volume count "
        "covers a volume's whole life. Watches are left out (they stay open). The client sees more than this: "
        "its requests also wait for the CPU, for TLS and for watch events to arrive."
        % (volumes_total, cluster["create_only"]["count"]),
        "",
        "| verb | resource | requests | per volume | mean ms | total s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (verb, resource, sub), count, total in rows[:15]:
        out.append("| %s | %s | %d | %.1f | %.2f | %.2f |" % (
            verb, resource + ("/" + sub if sub else ""), count, count / volumes_total, 1000 * total / count, total))
    etcd = request_table(args.apiserver_before, args.apiserver_after, "etcd_request_duration_seconds",
                         ("operation", "type"))
    if etcd:
        out += ["", "etcd as the API server sees it (`etcd_request_duration_seconds`, etcd's data on %s):" % args.etcd_fs,
                "", "| operation | type | requests | mean ms | total s |", "|---|---|---:|---:|---:|"]
        for (op, kind), count, total in etcd[:8]:
            out.append("| %s | %s | %d | %.2f | %.2f |" % (op, kind, count, 1000 * total / count, total))
    out.append("")

    out += ["### Commands", "",
            "`$WORK` is the run's temporary directory, `$DISK` its tmpfs mounts (one per process that stores "
            "volumes); ports are below the ephemeral range.", "",
            "- embedded: `nbd-csi-controller --data-dir $DISK/embedded/data --endpoint unix://$WORK/embedded.sock "
            "--nbd-listen-address 127.0.0.1 --nbd-port-range $PORTS`",
            "- cluster: etcd and kube-apiserver as tests/k8s/cluster.sh starts them; the chart's CRDs and "
            "(`helm template --set storage.mode=cluster`) CSIDriver, StorageClass, ServiceAccounts, RBAC and storage "
            "policy; Nodes storage-1..3 at "
            "127.0.1.1..3 and bench-worker at 127.0.0.1; `nbd-csi-controller --endpoint unix://$WORK/cluster.sock "
            "--storage-mode cluster --export-key-secret nbd-csi-export-key --namespace nbd-csi --storage-timeout 30 "
            "--kubeconfig $WORK/controller.kubeconfig` and, for N in 1..3, `nbd-csi-controller agent --node-name "
            "storage-N --data-dir $DISK/storage-N/data --listen-address 127.0.1.N --nbd-port-range $PORTS_N "
            "--export-key-file $WORK/export.key --namespace nbd-csi --kubeconfig $WORK/storage-storage-N.kubeconfig "
            "(a token bound to a pod object on its node) "
            "--metrics-address 127.0.1.N:$METRICS_N`",
            "- client, against each: `bench_control_plane --socket $SOCKET --node bench-worker --volumes %d "
            "--concurrency %d --size %d --warmup %d --settle %d --watch NAME=PID...` "
            "(controller/examples/bench_control_plane.rs)"
            % (n, concurrency, cluster["size_bytes"], cluster["warmup"], cluster["settle_seconds"]),
            args.end]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
