#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/seeds/ (committed; run again after editing).

server_session seeds are whole client byte streams: client flags, options,
then transmission requests, so the fuzzer starts from sessions that reach the
transmission phase instead of having to guess magics and the export name.
wire_decoders seeds are one valid encoding of each message the decoders read.
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
EXPORT = b"fuzz"  # must match EXPORT_NAME in fuzz_targets/server_session.rs

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
OPTION_REPLY_MAGIC = 0x0003E889045565A9
NBDMAGIC = 0x4E42444D41474943

C_FIXED_NEWSTYLE, C_NO_ZEROES = 1, 2

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 1, 2, 3

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


def flags(f=C_FIXED_NEWSTYLE | C_NO_ZEROES):
    return struct.pack(">I", f)


def opt(option, data=b""):
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def string(s):
    return struct.pack(">I", len(s)) + s


def go(name=EXPORT, infos=(), option=OPT_GO):
    return opt(option, string(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos))


def meta(option, queries, name=EXPORT):
    return opt(option, string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries))


_cookie = 0


def req(command, offset=0, length=0, flags=0, payload=b""):
    global _cookie
    _cookie += 1
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, _cookie, offset, length) + payload


def write(offset, payload, flags=0):
    return req(WRITE, offset, len(payload), flags, payload)


def disc():
    return req(DISC)


MIB = 1 << 20

SERVER_SESSION = {
    "go_read": flags() + go() + req(READ, 0, 4096) + req(READ, MIB // 2, 512) + disc(),
    "go_write_read_flush": flags()
    + go()
    + write(8192, bytes(range(256)) * 2)
    + req(READ, 8192, 512)
    + req(FLUSH)
    + disc(),
    "go_write_fua": flags() + go() + write(4096, b"\x11" * 64, FUA) + req(READ, 4096, 64) + disc(),
    "structured_block_status": flags()
    + opt(OPT_STRUCTURED_REPLY)
    + meta(OPT_SET_META_CONTEXT, [b"base:allocation"])
    + go(infos=(INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE))
    + req(BLOCK_STATUS, 0, MIB)
    + req(BLOCK_STATUS, 60 << 10, 16 << 10, REQ_ONE)
    + req(READ, 0, 1024, DF)
    + req(READ, 200 << 10, 1024)
    + req(READ, MIB, 1)
    + disc(),
    "structured_trim_zeroes": flags()
    + opt(OPT_STRUCTURED_REPLY)
    + meta(OPT_SET_META_CONTEXT, [b"base:allocation"])
    + go()
    + req(TRIM, 256 << 10, 8192)
    + req(WRITE_ZEROES, 300 << 10, 4096)
    + req(WRITE_ZEROES, 310 << 10, 4096, NO_HOLE | FUA)
    + req(WRITE_ZEROES, 320 << 10, 4096, FAST_ZERO)
    + req(CACHE, 0, 65536)
    + req(BLOCK_STATUS, 256 << 10, 128 << 10)
    + disc(),
    "export_name_zeroes": flags(C_FIXED_NEWSTYLE)
    + opt(OPT_EXPORT_NAME, EXPORT)
    + req(READ, 0, 16)
    + write(16, b"abc")
    + req(TRIM, 0, 4096, FUA)
    + disc(),
    "options_then_go": flags()
    + opt(OPT_LIST)
    + opt(OPT_LIST, b"x")
    + go(option=OPT_INFO, infos=(INFO_NAME,))
    + go(name=b"nope")
    + meta(OPT_LIST_META_CONTEXT, [])
    + meta(OPT_LIST_META_CONTEXT, [b"base:"])
    + meta(OPT_SET_META_CONTEXT, [b"base:allocation"])
    + opt(OPT_STRUCTURED_REPLY, b"x")
    + opt(OPT_STRUCTURED_REPLY)
    + meta(OPT_SET_META_CONTEXT, [b"nonamespace"])
    + meta(OPT_SET_META_CONTEXT, [b"qemu:dirty-bitmap:x"])
    + opt(99, b"unknown")
    + go()
    + req(BLOCK_STATUS, 0, 4096)
    + disc(),
    "bad_requests": flags()
    + go()
    + req(READ, MIB - 1, 2)
    + req(READ, 0, 4096, FUA | NO_HOLE)
    + write(MIB - 1, b"xy")
    + req(TRIM, 2**64 - 1, 2)
    + req(WRITE_ZEROES, MIB, 1)
    + req(BLOCK_STATUS, 0, 4096)
    + req(12345, 0, 0)
    + disc(),
    "abort": flags() + opt(OPT_LIST) + opt(OPT_ABORT),
    "eof_mid_write": flags() + go() + req(WRITE, 0, 4096) + b"partial",
}


def wire_seeds():
    name = string(EXPORT)
    return {
        "info_request": name + struct.pack(">HHH", 2, INFO_NAME, INFO_BLOCK_SIZE),
        "meta_request": name + struct.pack(">I", 2) + string(b"base:allocation") + string(b"base:"),
        "info_export": struct.pack(">HQH", 0, MIB, 0x0D0D),
        "info_name": struct.pack(">H", INFO_NAME) + EXPORT,
        "info_block_size": struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, 32 * MIB),
        "meta_reply": struct.pack(">I", 1) + b"base:allocation",
        "server_reply": name + b"a description",
        "chunk_offset_data": struct.pack(">HQ", 1, 4096) + b"data",
        "chunk_offset_hole": struct.pack(">HQI", 2, 4096, 512),
        "chunk_block_status": struct.pack(">HIIIII", 5, 1, 4096, 0, 8192, 3),
        "chunk_error": struct.pack(">HIH", 0x8001, 5, 4) + b"oops",
        "chunk_error_offset": struct.pack(">HIH", 0x8002, 5, 0) + struct.pack(">Q", 42),
        "greeting": struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3),
        "option_header": struct.pack(">QII", IHAVEOPT, OPT_GO, 10),
        "option_reply_header": struct.pack(">QIII", OPTION_REPLY_MAGIC, OPT_GO, 1, 0),
        "request": struct.pack(">IHHQQI", REQUEST_MAGIC, FUA, WRITE, 7, 4096, 512),
        "simple_reply": struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 7),
        "chunk_header": struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 1, 7, 12),
    }


DICT = {
    "ihaveopt": struct.pack(">Q", IHAVEOPT),
    "request_magic": struct.pack(">I", REQUEST_MAGIC),
    "export_name": EXPORT,
    "export_name_len": struct.pack(">I", len(EXPORT)),
    "base_allocation": b"base:allocation",
    "base_allocation_len": struct.pack(">I", 15),
    "base_namespace": b"base:",
    "export_size": struct.pack(">I", MIB),
    "last_byte": struct.pack(">Q", MIB - 1),
    "max_payload": struct.pack(">I", 32 * MIB),
    "max_option_len": struct.pack(">I", 64 << 10),
    "cmd_write": struct.pack(">HH", 0, WRITE),
    "cmd_write_zeroes": struct.pack(">HH", 0, WRITE_ZEROES),
    "cmd_block_status": struct.pack(">HH", REQ_ONE, BLOCK_STATUS),
    "opt_go": struct.pack(">I", OPT_GO),
    "opt_structured_reply": struct.pack(">I", OPT_STRUCTURED_REPLY),
    "opt_set_meta_context": struct.pack(">I", OPT_SET_META_CONTEXT),
}


def write_dict(path, entries):
    with open(os.path.join(HERE, path), "w") as f:
        f.write("# libFuzzer dictionary, written by make_corpus.py\n")
        for name, value in entries.items():
            f.write('%s="%s"\n' % (name, "".join("\\x%02X" % b for b in value)))
    print(f"{path}: {len(entries)} entries")


def write_dir(target, seeds):
    out = os.path.join(HERE, "seeds", target)
    os.makedirs(out, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"{target}: {len(seeds)} seeds in {os.path.relpath(out, HERE)}")


if __name__ == "__main__":
    write_dir("server_session", SERVER_SESSION)
    write_dir("wire_decoders", wire_seeds())
    write_dict("server_session.dict", DICT)
