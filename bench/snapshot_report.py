#!/usr/bin/env python3
"""Snapshot benchmark figures (bench/snapshot-latency.sh), stdlib only.

row FS LATLOG T0 T1 BEFORE SHARED: one JSON line for one filesystem, from
fio's per-write latency log (--write_lat_log --log_avg_msec=0
--log_unix_epoch=1: "time_ms, latency_ns, ddir, bs, ..." per completion):
p99 and max of the writes completed in the BEFORE seconds before T0 (the
call) and of those completed from T0 to T1 (its return), the snapshot's
duration, and whether its extents are shared.

table ROWS: the markdown table of those lines.
"""

import json
import sys


def percentile(values, q):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


def row(fs, log, t0, t1, before, shared):
    t0, t1, before = int(t0), int(t1), float(before)
    start = t0 - before * 1000
    early, during = [], []
    with open(log) as f:
        for line in f:
            fields = [x.strip() for x in line.split(",")]
            if len(fields) < 3 or fields[2] != "1":
                continue
            t, ns = int(fields[0]), int(fields[1])
            if start <= t < t0:
                early.append(ns)
            elif t0 <= t <= t1:
                during.append(ns)
    ms = lambda ns: ns / 1e6
    print(json.dumps({
        "fs": fs,
        "snapshot_ms": t1 - t0,
        "reflink": shared == "yes",
        "before": {"writes": len(early), "p99_ms": ms(percentile(early, 99)), "max_ms": ms(max(early, default=0))},
        "during": {"writes": len(during), "p99_ms": ms(percentile(during, 99)), "max_ms": ms(max(during, default=0))},
    }))


def table(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    print("| data directory | snapshot | how | writes before / during | p99 before | p99 during | max before | max during |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        how = "FICLONE (shared extents)" if r["reflink"] else "copy-before-write"
        b, d = r["before"], r["during"]
        print(
            f"| {r['fs']} | {r['snapshot_ms'] / 1000:.2f} s | {how} | {b['writes']} / {d['writes']} "
            f"| {b['p99_ms']:.2f} ms | {d['p99_ms']:.2f} ms | {b['max_ms']:.1f} ms | {d['max_ms']:.1f} ms |"
        )


if __name__ == "__main__":
    if sys.argv[1] == "row":
        row(*sys.argv[2:8])
    elif sys.argv[1] == "table":
        table(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} row FS LATLOG T0 T1 BEFORE SHARED | table ROWS")
