#!/usr/bin/env python3
"""Turn bench/run.sh's raw fio JSON into BENCHMARKS.md (stdlib only).

Layout read: RESULTS/<server>/<row>.<pass>.json   fio --output-format=json output
             RESULTS/<server>/<row>.<pass>.failed present if that fio run failed
             RESULTS/<server>/<row>.cmd   the exact fio command line
             RESULTS/<server>/server.cmd  the exact server command line
A cell is the median over passes; any failed pass makes the cell "failed".
"""

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys

OURS = "nbd-csi"
PEERS = ["qemu-nbd", "nbdkit", "nbd-server"]

# (row id, label, direction, metric, target ratio vs best peer)
ROWS = [
    ("randread-4k-qd64-j1", "4k randread, QD64, 1 job", "read", "iops", 1.3),
    ("randread-4k-qd64-j4", "4k randread, QD64, 4 jobs", "read", "iops", 1.3),
    ("randwrite-4k-qd64-j4", "4k randwrite, QD64, 4 jobs", "write", "iops", 1.3),
    ("seqread-1m-qd8-j1", "1 MiB seq read, QD8, 1 job", "read", "mbps", 1.1),
    ("seqwrite-1m-qd8-j1", "1 MiB seq write, QD8, 1 job", "write", "mbps", 1.1),
]
UNIT = {"iops": "IOPS", "mbps": "MB/s"}

# The same rows over TLS (bench/run.sh's *-tls servers): nbd-csi against the
# best TLS peer, target on the 4k row with 4 connections; and TLS's cost
# against nbd-csi's own plaintext rows, as the TLS figure's share of the
# plaintext one, with a floor on the 1 MiB rows (at most 25% below).
TLS_OURS = "nbd-csi-tls"
TLS_PEERS = ["qemu-nbd-tls", "nbdkit-tls"]
TLS_TARGETS = {"randread-4k-qd64-j4": 1.3}
TLS_COST_FLOORS = {"seqread-1m-qd8-j1": 0.75, "seqwrite-1m-qd8-j1": 0.75}


def run(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def dpkg_version(pkg):
    v = run(["dpkg-query", "-W", "-f=${Version}", pkg])
    return "" if v == "unknown" or "no packages" in v else v


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return "%.1f GiB" % (int(line.split()[1]) / 1024 / 1024)
    except OSError:
        pass
    return "unknown"


def loadavg(results):
    path = os.path.join(results, "loadavg.start")
    try:
        with open(path) as f:
            start = " ".join(f.read().split()[:3])
        with open("/proc/loadavg") as f:
            end = " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"
    return "%s before the runs, %s after (1/5/15 min)" % (start, end)


def ours_version(ours_bin):
    """"nbd-csi-controller 0.1.0 (git abc1234, uncommitted changes)": the
    binary's version and the tree it was measured from."""
    if not ours_bin:
        return "not benchmarked"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rev = run(["git", "-C", root, "rev-parse", "--short", "HEAD"])
    dirty = run(["git", "-C", root, "status", "--porcelain"])
    return "%s (git %s%s)" % (run([ours_bin, "--version"]), rev,
                              ", uncommitted changes" if dirty not in ("", "unknown") else "")


def load_fio(path):
    with open(path) as f:
        text = f.read()
    # fio can put a notice line before the JSON document.
    return json.loads(text[text.index("{"):])


def fio_jobs(base):
    """The jobs of one fio run (BASE.json), or None if it failed: the run
    marked failed (BASE.failed), no JSON, no job, or a job with an error."""
    if os.path.exists(base + ".failed"):
        return None
    try:
        data = load_fio(base + ".json")
    except (ValueError, OSError):
        return None
    jobs = data.get("jobs", [])
    if not jobs or any(j.get("error", 0) for j in jobs):
        return None
    return jobs


def one_pass(base, direction, metric):
    """The metric of one fio run, or None if it failed."""
    jobs = fio_jobs(base)
    if jobs is None:
        return None
    if metric == "iops":
        return sum(j[direction]["iops"] for j in jobs)
    return sum(j[direction]["bw_bytes"] for j in jobs) / 1e6


def measure(results, server, row, direction, metric, passes):
    """Returns (median, all values, None) or (None, [], reason)."""
    if not os.path.isdir(os.path.join(results, server)):
        return None, [], "skipped"
    values = [one_pass(os.path.join(results, server, "%s.%d" % (row, p)), direction, metric)
              for p in range(1, passes + 1)]
    if any(v is None for v in values):
        return None, [], "failed"
    return statistics.median(values), values, None


def cpu_per_io(results, server, row, direction, passes):
    """Median server CPU microseconds per I/O: the server's CPU time over the
    whole fio run (ramp included) divided by its I/Os over that time."""
    values = []
    for p in range(1, passes + 1):
        base = os.path.join(results, server, "%s.%d" % (row, p))
        try:
            with open(base + ".cpu") as f:
                ticks, hz, start, end = f.read().split()
            iops = one_pass(base, direction, "iops")
        except (OSError, ValueError):
            return None
        if not iops:
            return None
        ios = iops * (float(end) - float(start))
        values.append(int(ticks) / int(hz) * 1e6 / ios)
    return statistics.median(values) if values else None


def fmt(value, metric):
    if value is None:
        return "-"
    return "{:,.0f}".format(value) if metric == "iops" else "{:,.1f}".format(value)


def kernel_tls_use(results):
    """What our TLS server's log says of its connections: handed to the
    kernel (kTLS), or kept in userspace (rustls) and why."""
    try:
        with open(os.path.join(results, TLS_OURS, "server.log"), errors="replace") as f:
            log = f.read()
    except OSError:
        return None
    kernel = log.count("TLS connection handed to the kernel")
    reasons = re.findall(r"TLS connection stays in userspace \(rustls\): (\w+)", log)
    counts = {r: reasons.count(r) for r in sorted(set(reasons))}
    return kernel, counts


def tls_tables(results, passes):
    """The TLS comparison table and the TLS cost table, as markdown lines."""
    peers_table = ["| row | " + " | ".join([TLS_OURS] + TLS_PEERS) +
                   " | best TLS peer | ratio (nbd-csi-tls / best) | target | result |",
                   "|---|" + "---:|" * (len(TLS_PEERS) + 5)]
    cost_table = ["| row | nbd-csi (plaintext) | nbd-csi-tls | TLS / plaintext | floor | result |",
                  "|---|---:|---:|---:|---:|---:|"]
    for row, label, direction, metric, _ in ROWS:
        cells = {s: measure(results, s, row, direction, metric, passes) for s in [TLS_OURS] + TLS_PEERS}
        peer_vals = {p: cells[p][0] for p in TLS_PEERS if cells[p][0] is not None}
        best_name = max(peer_vals, key=peer_vals.get) if peer_vals else None
        ours = cells[TLS_OURS][0]
        target = TLS_TARGETS.get(row)
        ratio_s, result = "n/a", "n/a"
        if ours is not None and best_name:
            ratio = ours / peer_vals[best_name]
            ratio_s = "%.2f" % ratio
            if target:
                result = "pass" if ratio >= target else "miss"
        line = ["%s (%s)" % (label, UNIT[metric])]
        line += [fmt(cells[s][0], metric) if cells[s][0] is not None else cells[s][2] for s in [TLS_OURS] + TLS_PEERS]
        line.append("%s (%s)" % (fmt(peer_vals[best_name], metric), best_name) if best_name else "n/a")
        line += [ratio_s, "≥ %.1f" % target if target else "-", result]
        peers_table.append("| " + " | ".join(line) + " |")

        plain = measure(results, OURS, row, direction, metric, passes)[0]
        floor = TLS_COST_FLOORS.get(row)
        share_s, result = "n/a", "n/a"
        if plain and ours is not None:
            share = ours / plain
            share_s = "%.2f (%+.0f%%)" % (share, (share - 1) * 100)
            if floor:
                result = "pass" if share >= floor else "miss"
        cost_table.append("| %s (%s) | %s | %s | %s | %s | %s |" % (
            label, UNIT[metric], fmt(plain, metric), fmt(ours, metric), share_s,
            "≥ %.2f" % floor if floor else "-", result))
    return peers_table, cost_table


def readable(cmd, work, port_re, any_server=False):
    cmd = cmd.replace(work, "$WORK")
    if any_server:
        cmd = re.sub(r"\$WORK/results/[^/ ]+/", "$WORK/results/$SERVER/", cmd)
        cmd = re.sub(r"\.\d+\.json", ".$PASS.json", cmd)
    return re.sub(port_re, r"\g<1>$PORT", cmd)


def marked_sections(text):
    """The sections other scripts (bench/controller.sh,
    bench/control-plane.sh) or people write between `<!-- NAME:begin -->`
    and `<!-- NAME:end -->` markers, in their order, markers included:
    this report rewrites the rest of the file and keeps them."""
    sections = re.finditer(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", text, re.DOTALL)
    return "\n\n".join(m.group(0) for m in sections)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--runtime", required=True)
    ap.add_argument("--ramp", required=True)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--ours-bin", default="")
    args = ap.parse_args()
    results = os.path.abspath(args.results)
    work = os.path.dirname(results)
    port_re = r"(127\.0\.0\.1:|--port |-p |port = )\d+"

    # ---- table
    header = ["row", OURS] + PEERS + ["best peer", "ratio (nbd-csi / best peer)", "target", "result"]
    table = []
    spread = []
    cpu_table = []
    for row, label, direction, metric, target in ROWS:
        cells = {}
        for server in [OURS] + PEERS:
            cells[server] = measure(results, server, row, direction, metric, args.passes)
        peer_vals = {p: cells[p][0] for p in PEERS if cells[p][0] is not None}
        best_name = max(peer_vals, key=peer_vals.get) if peer_vals else None
        best = peer_vals.get(best_name)
        ours = cells[OURS][0]
        if ours is not None and best:
            ratio = ours / best
            ratio_s = "%.2f" % ratio
            result = "pass" if ratio >= target else "miss"
            if len(peer_vals) < len(PEERS):
                result = "incomplete (a peer failed)"
        else:
            ratio_s, result = "n/a", "n/a"
        line = ["%s (%s)" % (label, UNIT[metric])]
        for server in [OURS] + PEERS:
            value, _, reason = cells[server]
            line.append(fmt(value, metric) if value is not None else reason)
        line.append("%s (%s)" % (fmt(best, metric), best_name) if best_name else "n/a")
        line += [ratio_s, "≥ %.1f" % target, result]
        table.append(line)
        spread_line = ["%s (%s)" % (label, UNIT[metric])]
        for server in [OURS] + PEERS:
            value, values, reason = cells[server]
            spread_line.append(" / ".join(fmt(v, metric) for v in values) if values else reason)
        spread.append(spread_line)
        cpu_line = ["%s" % label]
        for server in [OURS] + PEERS:
            c = cpu_per_io(results, server, row, direction, args.passes)
            cpu_line.append("%.1f" % c if c is not None else "n/a")
        cpu_table.append(cpu_line)

    md_cpu = ["| row | " + " | ".join([OURS] + PEERS) + " |",
              "|---|" + "---:|" * (1 + len(PEERS))]
    md_cpu += ["| " + " | ".join(line) + " |" for line in cpu_table]

    md_table = ["| " + " | ".join(header) + " |",
                "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    md_table += ["| " + " | ".join(line) + " |" for line in table]

    # ---- machine and versions
    versions = [
        ("nbd-csi-controller", ours_version(args.ours_bin)),
        ("qemu-nbd", run(["qemu-nbd", "--version"])),
        ("nbdkit", run(["nbdkit", "--version"])),
        ("nbd-server", "%s (%s)" % (run(["nbd-server", "-V"]), dpkg_version("nbd-server") or "dpkg n/a")),
        ("fio", run(["fio", "--version"])),
        ("libnbd (fio's client)", dpkg_version("libnbd0") or "unknown"),
    ]
    machine = [
        ("CPUs (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU model", cpu_model()),
        ("memory", mem_total()),
        ("kernel", platform.release()),
        ("load average", loadavg(results)),
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]

    servers_md = []
    for server in [OURS] + PEERS + [TLS_OURS] + TLS_PEERS:
        path = os.path.join(results, server, "server.cmd")
        if os.path.exists(path):
            with open(path) as f:
                servers_md.append("- %s: `%s`" % (server, readable(f.read().strip(), work, port_re)))
        else:
            servers_md.append("- %s: not run" % server)
    conf = os.path.join(results, "nbd-server", "config")
    if os.path.exists(conf):
        with open(conf) as f:
            conf_text = readable(f.read().strip(), work, port_re)
        servers_md.append("\n  nbd-server's config file:\n\n  ```ini\n" +
                          "\n".join("  " + l if l else "" for l in conf_text.splitlines()) + "\n  ```")

    fio_md = []
    for group in ([OURS] + PEERS, [TLS_OURS] + TLS_PEERS):
        for server in group:
            if os.path.isdir(os.path.join(results, server)):
                tls = " (TLS)" if server in [TLS_OURS] + TLS_PEERS else ""
                for row, label, *_ in ROWS:
                    path = os.path.join(results, server, row + ".cmd")
                    if os.path.exists(path):
                        with open(path) as f:
                            fio_md.append("- %s%s:\n  `%s`" % (
                                label, tls, readable(f.read().strip(), work, port_re, True)))
                break

    out = []
    out.append("# Benchmarks\n")
    out.append("Generated by `bench/run.sh` (see `bench/README.md`). nbd-csi's NBD server "
               "(`nbd-csi-controller serve-file`) against qemu-nbd, nbdkit (file plugin) and "
               "nbd-server, each serving the same 1 GiB file of random data, one server at a "
               "time, on 127.0.0.1, driven by fio's nbd engine (libnbd, userspace; one NBD "
               "connection per fio job).\n")
    out.append("## Results\n")
    out.append("4k rows in IOPS, 1 MiB rows in MB/s (10^6 bytes/s); each job's ramp excluded. "
               "\"best peer\" is the fastest of qemu-nbd, nbdkit and nbd-server on that row; the "
               "target is a minimum for nbd-csi / best peer.\n")
    out.extend(md_table)
    out.append("")
    out.append("### Server CPU per I/O\n")
    out.append("Microseconds of server CPU (user + system, all threads and reaped children, "
               "read from /proc before and after each fio run, ramp included) per I/O the "
               "client completed over that time; lower is better. fio and the server share "
               "the same CPUs, so a server that needs less CPU per I/O leaves more to the "
               "client; where the client is the bottleneck, throughput converges whatever "
               "the server does.\n")
    out.extend(md_cpu)
    out.append("")
    if args.passes > 1:
        out.append("Each cell above is the median of %d passes (server order rotated between "
                   "passes); every pass's value, in pass order:\n" % args.passes)
        out.append("| row | " + " | ".join([OURS] + PEERS) + " |")
        out.append("|---|" + "---:|" * (1 + len(PEERS)))
        out.extend("| " + " | ".join(l) + " |" for l in spread)
        out.append("")
    if os.path.isdir(os.path.join(results, TLS_OURS)) or any(
            os.path.isdir(os.path.join(results, p)) for p in TLS_PEERS):
        peers_table, cost_table = tls_tables(results, args.passes)
        out.append("## Over TLS\n")
        out.append("The same rows with TLS required by every server (TLS 1.3, client certificates "
                   "verified against the CA): nbd-csi (`serve-file --tls required`) against qemu-nbd "
                   "(`--tls-creds`, tls-creds-x509) and nbdkit (`--tls=require`), the same fio client "
                   "(libnbd over `nbds://…?tls-certificates=DIR`, allowed by a preloaded shim), the same file, "
                   "in the same run and rotation as the rows above.\n")
        use = kernel_tls_use(results)
        if use is not None:
            kernel, fallbacks = use
            said = ", ".join("%d for %s" % (n, r) for r, n in fallbacks.items()) or "none"
            out.append("Where the kernel has kernel TLS (`tls.ko`), nbd-csi hands each TLS connection to "
                       "it after the handshake and keeps sending READ data with sendfile; elsewhere it "
                       "stays on rustls in userspace and READ data is copied and encrypted there. In "
                       "this run its log says: %d connection(s) on kernel TLS, userspace TLS: %s. %s\n" % (
                           kernel, said,
                           "This machine's kernel has no kTLS, so these rows measure the userspace-TLS "
                           "server." if kernel == 0 else ""))
        out.extend(peers_table)
        out.append("")
        out.append("TLS's cost to nbd-csi: its TLS figure against its own plaintext row above; the floor "
                   "on the 1 MiB rows is at most 25% below plaintext.\n")
        out.extend(cost_table)
        out.append("")
    out.append("## Machine\n")
    out.extend("- %s: %s" % kv for kv in machine)
    out.append("\nThe fio client runs on the same machine and competes with the server for the CPUs.\n")
    out.append("## Versions\n")
    out.extend("- %s: %s" % kv for kv in versions)
    out.append("")
    out.append("## Servers\n")
    out.append("`$WORK` is the temporary directory holding the image (`disk.img`); `$PORT` a "
               "free loopback port. Before each server starts, the image is synced and read "
               "once so every server starts with a clean, fully cached file. All servers use "
               "the page cache (no O_DIRECT), allow several connections and advertise "
               "multi-conn.\n")
    out.extend(servers_md)
    out.append("")
    out.append("## fio parameters\n")
    out.append("Identical for every server and pass (runtime %ss after a %ss ramp; %d pass(es)):\n"
               % (args.runtime, args.ramp, args.passes))
    out.extend(fio_md)
    out.append("")

    kept = ""
    try:
        with open(args.output) as f:
            kept = marked_sections(f.read())
    except FileNotFoundError:
        pass
    with open(args.output, "w") as f:
        f.write("\n".join(out))
        if kept:
            f.write("\n" + kept + "\n")
    print("\n".join(md_table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
