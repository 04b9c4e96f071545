#!/usr/bin/env python3
"""Diff the numbers of two BENCHMARKS.md files, cell by cell.

    bench/compare.py OLD.md NEW.md [--threshold PERCENT]

Every markdown table in both files is read; a cell is named by the heading
above its table, its row's first column and its column's header, and its
value is the first number in it (thousands separators allowed; a ratio cell
such as "1.42 k · 9.7/11.5" gives 1.42). Prints the cells whose value moved
by at least the threshold (default 5%), largest move first, then the cells
only one file has. Exit status 0 (a report, not a verdict). So a change to
the server shows its effect in its commit message:

    git show HEAD~1:BENCHMARKS.md > /tmp/before.md
    bench/matrix.sh --quick && bench/compare.py /tmp/before.md BENCHMARKS.md
"""

import argparse
import re
import sys

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def cells(text):
    """{(heading, row, column): value} for every numeric table cell."""
    found = {}
    heading = ""
    header = None
    for line in text.splitlines():
        stripped = line.strip()
        summary = re.match(r"<details><summary>(.*)</summary>", stripped)
        if stripped.startswith("#") or summary:
            heading = summary.group(1) if summary else stripped.lstrip("#").strip()
            header = None
            continue
        if not stripped.startswith("|"):
            header = None
            continue
        columns = [c.strip() for c in stripped.strip("|").split("|")]
        if header is None:
            header = columns
            continue
        if all(re.fullmatch(r":?-+:?", c) for c in columns if c):
            continue
        row = columns[0]
        for name, cell in zip(header[1:], columns[1:]):
            m = NUMBER.search(cell.replace("**", ""))
            if m:
                found[(heading, row, name)] = float(m.group(0).replace(",", ""))
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--threshold", type=float, default=5.0, help="percent (default 5)")
    args = ap.parse_args()
    with open(args.old) as f:
        old = cells(f.read())
    with open(args.new) as f:
        new = cells(f.read())

    moved = []
    for key in old.keys() & new.keys():
        a, b = old[key], new[key]
        if a == b:
            continue
        change = (b - a) / abs(a) * 100 if a else float("inf")
        if abs(change) >= args.threshold:
            moved.append((abs(change), change, key, a, b))
    moved.sort(reverse=True)
    print("%d of %d cells in both files moved by %.0f%% or more" % (
        len(moved), len(old.keys() & new.keys()), args.threshold))
    for _, change, (heading, row, column), a, b in moved:
        print("%+7.1f%%  %s | %s | %s: %g -> %g" % (change, heading, row, column, a, b))
    for label, only in (("only in %s" % args.old, old.keys() - new.keys()),
                        ("only in %s" % args.new, new.keys() - old.keys())):
        if only:
            print("%s: %d cells" % (label, len(only)))
            for heading, row, column in sorted(only):
                print("          %s | %s | %s" % (heading, row, column))
    return 0


if __name__ == "__main__":
    sys.exit(main())
