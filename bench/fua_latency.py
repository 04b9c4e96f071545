#!/usr/bin/env python3
"""4k writes with NBD_CMD_FLAG_FUA at queue depth 1, timed one by one.

fio's nbd engine never sets FUA, so bench/matrix.sh measures FUA write
latency with libnbd's own Python binding (the library fio's engine uses):
one connection, one write in flight, each at a random 4 KiB-aligned offset,
the time from the call to its acknowledgement. Prints JSON: the number of
writes and the latency percentiles in microseconds. The client's own cost
(a Python call per write) is the same for every server.
"""

import argparse
import json
import math
import os
import random
import sys
import time

import nbd


def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, min(len(sorted_values), math.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--uri", required=True)
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--block", type=int, default=4096)
    args = ap.parse_args()

    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(args.uri)
    if not h.can_fua():
        print("the server does not advertise NBD_FLAG_SEND_FUA", file=sys.stderr)
        return 1
    blocks = h.get_size() // args.block
    buf = os.urandom(args.block)
    rng = random.Random(1)
    # A short warm-up, as fio's ramp: connection set-up and first-touch
    # costs are not what this measures.
    for _ in range(min(100, args.writes)):
        h.pwrite(buf, rng.randrange(blocks) * args.block, nbd.CMD_FLAG_FUA)
    times = []
    for _ in range(args.writes):
        offset = rng.randrange(blocks) * args.block
        start = time.perf_counter_ns()
        h.pwrite(buf, offset, nbd.CMD_FLAG_FUA)
        times.append(time.perf_counter_ns() - start)
    h.shutdown()
    times.sort()
    json.dump({
        "writes": len(times),
        "block": args.block,
        "p50_us": percentile(times, 0.50) / 1000,
        "p99_us": percentile(times, 0.99) / 1000,
        "p999_us": percentile(times, 0.999) / 1000,
        "mean_us": sum(times) / len(times) / 1000,
    }, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
