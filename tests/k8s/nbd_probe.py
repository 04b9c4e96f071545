#!/usr/bin/env python3
"""A minimal NBD client (stdlib only) that connects from a chosen source address.

    nbd_probe.py SOURCE_IP nbd://HOST:PORT/EXPORT [--io] [--read BYTE] [--write BYTE] [--hold SECONDS]

Binds SOURCE_IP, connects, reads the fixed-newstyle greeting and asks for
EXPORT with NBD_OPT_GO. Then, in this order and each only when asked:
  --io          writes a random 4 KiB at offset 0, flushes, reads it back
                and compares;
  --read BYTE   reads 64 KiB at offset 64 KiB and compares with BYTE;
  --write BYTE  writes 64 KiB of BYTE (e.g. 0x5e) at offset 64 KiB and
                flushes;
  --hold SECS   keeps the session, reading 4 KiB every 0.1 s, for SECS
                (a line "holding ..." says when it begins);
and disconnects.

Exit status and last line:
  0 "accepted ..."  the server answered GO with NBD_REP_ACK (and the I/O passed)
  2 "refused ..."   the connection was closed before the greeting was complete
                    (what the export does to peers it does not admit)
  3 "no server ..." nothing listens there (connection refused)
  4 "closed ..."    the server closed a held session (with the Unix time it did)
  1 anything else (an NBD error reply, a protocol violation, a timeout, an I/O
    mismatch)
"""

import argparse
import os
import socket
import struct
import sys
import time
from urllib.parse import urlparse

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3


class Refused(Exception):
    pass


class NoServer(Exception):
    pass


class Closed(Exception):
    pass


PATTERN_OFFSET = 64 * 1024
PATTERN_LENGTH = 64 * 1024


def read_exact(sock, n, stage):
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            if stage == "greeting":
                raise Refused(f"connection closed after {len(buf)} of {n} greeting bytes")
            raise RuntimeError(f"connection closed during {stage}")
        buf += chunk
    return buf


def request(sock, cmd, handle, offset, length, payload=b""):
    sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, handle, offset, length) + payload)


def simple_reply(sock, handle, data_len=0):
    magic, error, got = struct.unpack(">IIQ", read_exact(sock, 16, "reply"))
    if magic != SIMPLE_REPLY_MAGIC or got != handle:
        raise RuntimeError(f"bad reply magic {magic:#x} or handle {got}")
    if error:
        raise RuntimeError(f"command {handle} failed with error {error}")
    return read_exact(sock, data_len, "read data") if data_len else b""


def hold(sock, seconds):
    """Reads 4 KiB every 0.1 s for SECONDS; Closed when the server ends the session."""
    print(f"holding the session from {sock.getsockname()[0]}", flush=True)
    started = time.monotonic()
    handle = 100
    while time.monotonic() - started < seconds:
        handle += 1
        try:
            request(sock, CMD_READ, handle, 0, 4096)
            simple_reply(sock, handle, 4096)
        except (RuntimeError, OSError) as e:
            raise Closed(
                f"session closed by the server at {time.time():.3f} after {time.monotonic() - started:.1f} s held: {e}"
            ) from e
        time.sleep(0.1)
    return f"held {seconds:g} s"


def probe(source, uri, args):
    u = urlparse(uri)
    if u.scheme != "nbd" or not u.hostname or not u.port:
        raise RuntimeError(f"not an nbd://HOST:PORT/EXPORT URI: {uri}")
    export = u.path[1:].encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    try:
        sock.connect((u.hostname, u.port))
    except ConnectionRefusedError as e:
        raise NoServer(f"connect: {e}") from e
    magic, opt_magic, flags = struct.unpack(">QQH", read_exact(sock, 18, "greeting"))
    if magic != NBDMAGIC or opt_magic != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
        raise RuntimeError(f"not a fixed-newstyle server: {magic:#x} {opt_magic:#x} {flags:#x}")
    sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
    data = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
    size = None
    while True:
        magic, option, rtype, length = struct.unpack(">QIII", read_exact(sock, 20, "option reply"))
        body = read_exact(sock, length, "option reply") if length else b""
        if magic != REPLY_MAGIC or option != OPT_GO:
            raise RuntimeError(f"bad option reply magic {magic:#x} option {option}")
        if rtype & REP_FLAG_ERROR:
            raise RuntimeError(f"NBD_OPT_GO refused with reply type {rtype:#x}: {body!r}")
        if rtype == REP_INFO and len(body) >= 12 and struct.unpack(">H", body[:2])[0] == 0:
            size, _tflags = struct.unpack(">QH", body[2:12])
        elif rtype == REP_ACK:
            break
    detail = f"export size {size}"
    if args.io:
        pattern = os.urandom(4096)
        request(sock, CMD_WRITE, 1, 0, len(pattern), pattern)
        simple_reply(sock, 1)
        request(sock, CMD_FLUSH, 2, 0, 0)
        simple_reply(sock, 2)
        request(sock, CMD_READ, 3, 0, len(pattern))
        if simple_reply(sock, 3, len(pattern)) != pattern:
            raise RuntimeError("read back different data than was written")
        detail += ", wrote, flushed and read back 4096 bytes"
    if args.read is not None:
        request(sock, CMD_READ, 7, PATTERN_OFFSET, PATTERN_LENGTH)
        data = simple_reply(sock, 7, PATTERN_LENGTH)
        if data != bytes([args.read]) * PATTERN_LENGTH:
            raise RuntimeError(f"read {PATTERN_LENGTH} bytes that are not all {args.read:#04x}")
        detail += f", read back {PATTERN_LENGTH} bytes of {args.read:#04x}"
    if args.write is not None:
        request(sock, CMD_WRITE, 5, PATTERN_OFFSET, PATTERN_LENGTH, bytes([args.write]) * PATTERN_LENGTH)
        simple_reply(sock, 5)
        request(sock, CMD_FLUSH, 6, 0, 0)
        simple_reply(sock, 6)
        detail += f", wrote and flushed {PATTERN_LENGTH} bytes of {args.write:#04x}"
    if args.hold is not None:
        detail += ", " + hold(sock, args.hold)
    request(sock, CMD_DISC, 4, 0, 0)
    sock.close()
    return detail


def byte(text):
    value = int(text, 0)
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"{text} is not a byte")
    return value


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # Not argparse's status 2, which means "refused" here.
        print(f"{message}\n{__doc__}", file=sys.stderr)
        sys.exit(1)


def main():
    parser = Parser(add_help=False)
    parser.add_argument("source")
    parser.add_argument("uri")
    parser.add_argument("--io", action="store_true")
    parser.add_argument("--write", type=byte)
    parser.add_argument("--read", type=byte)
    parser.add_argument("--hold", type=float)
    args = parser.parse_args()
    try:
        detail = probe(args.source, args.uri, args)
        print(f"accepted from {args.source}: {detail}")
        return 0
    except Refused as e:
        print(f"refused from {args.source}: {e}")
        return 2
    except NoServer as e:
        print(f"no server for {args.source}: {e}")
        return 3
    except Closed as e:
        print(f"closed from {args.source}: {e}")
        return 4
    except Exception as e:  # noqa: BLE001 - reported as the probe's result
        print(f"error from {args.source}: {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
