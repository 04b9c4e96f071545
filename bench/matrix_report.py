#!/usr/bin/env python3
"""Turn bench/matrix.sh's raw results into BENCHMARKS.md's `matrix` section
(printed; stdlib only).

Layout read: RESULTS/<server>/<cell>.<pass>.json  fio JSON (cells as
             bench/matrix.sh names them: RW-BS-qdQ-cC[-flushN][@STATE])
             RESULTS/<server>/<cell>.<pass>.cpu   server CPU ticks, hz, start, end
             RESULTS/<server>/fua-4k-qd1.<pass>.json  bench/fua_latency.py
A cell's value is the median over passes; a failed pass fails the cell.
"""

import argparse
import json
import os
import re
import statistics
import sys

from report import cpu_model, fio_jobs, loadavg, mem_total, ours_version

OURS = "nbd-csi"
PEERS = ["qemu-nbd", "nbdkit", "nbd-server"]
SERVERS = [OURS] + PEERS
# nbdkit's null plugin: no I/O at all, so what fio reaches against it is
# the client's ceiling on this machine (bench/servers.sh start_null).
CEILING = "null"
# A cell where nbd-csi is within this factor of the ceiling is client-bound:
# no server could be much faster there with this client.
CLIENT_BOUND = 1.15
INITIAL = {"qemu-nbd": "q", "nbdkit": "k", "nbd-server": "s"}
TARGET = 1.3
RWS = ["randread", "randwrite", "randrw"]
RW_LABEL = {"randread": "random read", "randwrite": "random write", "randrw": "random 70/30"}
BLOCK_ORDER = ["4k", "16k", "64k", "256k", "1M"]
PERCENTILES = [("50.000000", "p50"), ("99.000000", "p99"), ("99.900000", "p99.9")]
CELL_RE = re.compile(r"^(randread|randwrite|randrw)-(\w+)-qd(\d+)-c(\d+)(?:-flush(\d+))?(?:@(\w+))?$")


def cell_ids(results):
    """Every cell some server has results for, in a stable order."""
    ids = set()
    for server in SERVERS:
        directory = os.path.join(results, server)
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                m = re.match(r"^(.+)\.\d+\.json$", name)
                if m and CELL_RE.match(m.group(1)):
                    ids.add(m.group(1))

    def key(cell):
        rw, bs, qd, conns, flush, state = CELL_RE.match(cell).groups()
        return (state or "", flush or "", RWS.index(rw),
                BLOCK_ORDER.index(bs) if bs in BLOCK_ORDER else 99, int(conns), int(qd))
    return sorted(ids, key=key)


def one_run(base):
    """(IOPS, fio job) of one fio run (one job: --group_reporting), or None
    if it failed."""
    jobs = fio_jobs(base)
    if jobs is None or len(jobs) != 1:
        return None
    job = jobs[0]
    return job["read"]["iops"] + job["write"]["iops"], job


def cpu_us(base, iops):
    try:
        with open(base + ".cpu") as f:
            ticks, hz, start, end = f.read().split()
    except (OSError, ValueError):
        return None
    ios = iops * (float(end) - float(start))
    return int(ticks) / int(hz) * 1e6 / ios if ios else None


class Cell:
    """One server's medians on one cell: IOPS, CPU per I/O, QD1 percentiles."""

    def __init__(self, results, server, cell, passes):
        self.iops = self.cpu = None
        self.latency = {}
        runs = []
        for p in range(1, passes + 1):
            base = os.path.join(results, server, "%s.%d" % (cell, p))
            got = one_run(base)
            if got is None:
                return
            runs.append((got[0], cpu_us(base, got[0]), got[1]))
        if not runs:
            return
        self.iops = statistics.median(r[0] for r in runs)
        cpus = [r[1] for r in runs if r[1] is not None]
        self.cpu = statistics.median(cpus) if cpus else None
        direction = "read" if cell.startswith("randread") else "write"
        for key, name in PERCENTILES:
            values = [r[2][direction]["clat_ns"].get("percentile", {}).get(key) for r in runs]
            if all(v is not None for v in values):
                self.latency[name] = statistics.median(values) / 1000


def best_peer(cells):
    peers = {p: cells[p] for p in PEERS if cells[p].iops}
    if not peers:
        return None
    return max(peers, key=lambda p: peers[p].iops)


def client_bound(cells):
    """True when nbd-csi is within CLIENT_BOUND of the no-I/O server."""
    ceiling = cells.get(CEILING)
    return bool(ceiling and ceiling.iops and cells[OURS].iops
                and ceiling.iops / cells[OURS].iops < CLIENT_BOUND)


def ratio_text(cells):
    """"1.42 k · 9.7/11.5": nbd-csi over the best peer, that peer's initial,
    CPU µs per I/O of nbd-csi and of that peer; bold below the target, †
    where the client is the limit."""
    ours, best = cells[OURS], best_peer(cells)
    if not ours.iops or best is None:
        return "failed" if best else "n/a"
    ratio = ours.iops / cells[best].iops
    text = "%.2f" % ratio
    if ratio < TARGET:
        text = "**%s**" % text
    if client_bound(cells):
        text += "†"
    cpu = "%s/%s" % tuple("%.1f" % c.cpu if c.cpu is not None else "?" for c in (ours, cells[best]))
    return "%s %s · %s" % (text, INITIAL[best], cpu)


def fmt_iops(value):
    return "{:,.0f}".format(value) if value else "failed"


def fua(results, server, passes):
    """Median FUA percentiles (µs) of bench/fua_latency.py's passes."""
    runs = []
    for p in range(1, passes + 1):
        base = os.path.join(results, server, "fua-4k-qd1.%d" % p)
        if os.path.exists(base + ".failed"):
            return {}
        try:
            with open(base + ".json") as f:
                runs.append(json.load(f))
        except (OSError, ValueError):
            return {}
    if not runs:
        return {}
    return {name: statistics.median(r[key] for r in runs)
            for key, name in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9"))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--runtime", required=True)
    ap.add_argument("--ramp", required=True)
    ap.add_argument("--scope", choices=["quick", "full"], required=True)
    ap.add_argument("--ours-bin", default="")
    ap.add_argument("--fua-writes", type=int, required=True)
    args = ap.parse_args()
    results = os.path.abspath(args.results)

    ids = cell_ids(results)
    data = {cell: {s: Cell(results, s, cell, args.passes) for s in SERVERS + [CEILING]} for cell in ids}
    grid = [c for c in ids if not CELL_RE.match(c).group(5) and not CELL_RE.match(c).group(6)]
    shapes = []
    for cell in grid:
        _, _, qd, conns, _, _ = CELL_RE.match(cell).groups()
        if (int(conns), int(qd)) not in shapes:
            shapes.append((int(conns), int(qd)))
    shapes.sort()

    out = ["<!-- matrix:begin -->", "## Workload matrix", ""]
    out.append(
        "Generated by `bench/matrix.sh%s` (see `bench/README.md`) with %s: "
        "nbd-csi's server against qemu-nbd (q), nbdkit (k) and nbd-server (s), the same command "
        "lines as the table above, the same fio nbd-engine client, one server at a time, each on "
        "its own copy of the same 1 GiB of random data prepared the same way (copied, synced and "
        "read once), server order rotated between passes. %ss per run after a %ss ramp; %d "
        "pass(es), medians. Machine: %s CPUs (%s), %s, kernel %s; load %s." % (
            " --quick" if args.scope == "quick" else "", ours_version(args.ours_bin),
            args.runtime, args.ramp, args.passes, len(os.sched_getaffinity(0)), cpu_model(),
            mem_total(), os.uname().release, loadavg(results)))
    out.append("")
    out.append(
        "Each cell: nbd-csi's IOPS over the best peer's, that peer's initial, then server CPU "
        "microseconds per I/O of nbd-csi / of that peer (bench/run.sh's accounting). **Bold**: "
        "below the %.1f target. †: client-bound, nbd-csi within %d%% of what the same client "
        "reaches against a server that does no I/O at all (nbdkit's null plugin; every cell's "
        "ceiling is in the last table), so no server can lead by much there. QD is per "
        "connection; each connection is one fio job (`--numjobs`)." % (
            TARGET, round((CLIENT_BOUND - 1) * 100)))
    out.append("")
    header = ["workload"] + ["QD%d × %d conn" % (qd, conns) for conns, qd in shapes]
    out.append("| " + " | ".join(header) + " |")
    out.append("|---|" + "---:|" * len(shapes))
    below, total = [], 0
    rows = []
    for cell in grid:
        rw, bs, _, _, _, _ = CELL_RE.match(cell).groups()
        if (rw, bs) not in rows:
            rows.append((rw, bs))
    for rw, bs in rows:
        line = ["%s %s" % (RW_LABEL[rw], bs)]
        for conns, qd in shapes:
            cell = "%s-%s-qd%d-c%d" % (rw, bs, qd, conns)
            if cell not in data:
                line.append("-")
                continue
            line.append(ratio_text(data[cell]))
            best = best_peer(data[cell])
            if data[cell][OURS].iops and best:
                total += 1
                if data[cell][OURS].iops / data[cell][best].iops < TARGET:
                    below.append(cell + ("†" if client_bound(data[cell]) else ""))
        out.append("| " + " | ".join(line) + " |")
    out.append("")
    out.append("%d of %d cells at or above %.1f×%s" % (
        total - len(below), total, TARGET,
        (": below, " + ", ".join("`%s`" % c for c in below) + ".") if below else "."))
    out.append("")

    extra = [c for c in ids if c not in grid]
    if extra:
        out.append("### FLUSH-heavy writes and file state\n")
        out.append(
            "`-flushN`: a FLUSH after every N writes per connection (fio `--fsync=N`; fio's nbd "
            "engine sends no FUA, see the latency table for FUA). `@clean`: the file's copy synced "
            "and dropped from the page cache before the server starts (allocated, written back, "
            "not cached). `@sparse`: a new sparse file (no blocks allocated). IOPS; the ratio and "
            "CPU as above.\n")
        out.append("| cell | " + " | ".join(SERVERS) + " | ratio · CPU µs/IO |")
        out.append("|---|" + "---:|" * (len(SERVERS) + 1))
        for cell in extra:
            line = ["`%s`" % cell] + [fmt_iops(data[cell][s].iops) for s in SERVERS]
            line.append(ratio_text(data[cell]))
            out.append("| " + " | ".join(line) + " |")
        out.append("")

    out.append("### Latency at queue depth 1\n")
    out.append(
        "Completion latency in microseconds, one connection, one request in flight: fio's clat "
        "percentiles for the 4k random read and write cells above; 4k writes with FUA from "
        "`bench/fua_latency.py` (libnbd's Python binding, %d writes after 100 of warm-up; the "
        "Python call is in every server's figure alike). Target: nbd-csi's p99 at most the best "
        "(lowest) peer's.\n" % args.fua_writes)
    kinds = [("4k read", "randread-4k-qd1-c1"), ("4k write", "randwrite-4k-qd1-c1"), ("4k FUA write", None)]
    header = ["server"] + ["%s %s" % (k, p) for k, _ in kinds for _, p in PERCENTILES]
    out.append("| " + " | ".join(header) + " |")
    out.append("|---|" + "---:|" * (len(header) - 1))
    lat = {}
    for server in SERVERS:
        line = [server]
        for kind, cell in kinds:
            values = fua(results, server, args.passes) if cell is None else (
                data[cell][server].latency if cell in data else {})
            lat[(server, kind)] = values.get("p99")
            line += ["%.1f" % values[p] if p in values else "-" for _, p in PERCENTILES]
        out.append("| " + " | ".join(line) + " |")
    out.append("")
    verdicts = []
    for kind, _ in kinds:
        peers = {p: lat[(p, kind)] for p in PEERS if lat[(p, kind)] is not None}
        ours = lat[(OURS, kind)]
        if ours is None or not peers:
            verdicts.append("%s: n/a" % kind)
            continue
        best = min(peers, key=peers.get)
        verdicts.append("%s p99 %.1f µs against %s's %.1f: %s" % (
            kind, ours, best, peers[best], "pass" if ours <= peers[best] else "miss"))
    out.append("; ".join(verdicts) + ".")
    out.append("")

    out.append("<details><summary>Every cell's IOPS and server CPU µs per I/O</summary>\n")
    out.append("| cell | " + " | ".join(SERVERS) + " | ceiling (null) | " +
               " | ".join("%s CPU" % s for s in SERVERS) + " |")
    out.append("|---|" + "---:|" * (2 * len(SERVERS) + 1))
    for cell in ids:
        line = ["`%s`" % cell] + [fmt_iops(data[cell][s].iops) for s in SERVERS]
        line.append(fmt_iops(data[cell][CEILING].iops) if data[cell][CEILING].iops else "-")
        line += ["%.1f" % data[cell][s].cpu if data[cell][s].cpu is not None else "-" for s in SERVERS]
        out.append("| " + " | ".join(line) + " |")
    out.append("\n</details>")
    out.append("<!-- matrix:end -->")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
