"""One line per check for the Python test scripts under tests/: `ok` and
`bad` print it (a failure on stderr) and `failed()` says whether any check
failed, which the script turns into its exit status."""

import sys

_failures = 0


def ok(msg):
    print(f"ok: {msg}")


def bad(msg):
    global _failures
    _failures += 1
    print(f"FAILED: {msg}", file=sys.stderr)


def failed():
    return _failures > 0
