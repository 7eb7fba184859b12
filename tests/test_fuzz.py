"""Fuzzing over real sockets (issue 12, item 9).

A few hundred connections, a few at a time, throw random bytes, random
handshakes (repeated, missing, oversized and malformed headers, garbage
request lines, bare LFs, query strings with percent-encoded control
characters) and random sequences of valid and invalid frames (every opcode,
reserved ones included; fragments with pings between; masked or not; RSV
bits; bad UTF-8; lying and oversized lengths; JSON with and without
`acks=1`, bad cids, deep nesting) at a chatserver process, while a calm
client in a room of its own chats every 100 ms; on every back-end.  Then:
the server is up, the calm client was answered every time, memory stayed
bounded, every valid handshake got its answer, and the log has no traceback
and no line that client text began.  What the fuzz found (frames sent along
with the request, JSON nested past Python's stack) is pinned at the end by
the smallest case that showed it.

Each connection's bytes are a function of the seed and its index alone (the
timing is not): `CHAT_FUZZ_SEED=N python -m pytest tests/test_fuzz.py` runs
the fuzz with seed N (`CHAT_FUZZ_SEED=random`: a new one, printed in every
assertion message), and `python tests/test_fuzz.py SEED INDEX...` prints
what those connections send.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import os
import random
import re
import struct
import sys
import time
import unicodedata
import urllib.parse
import zlib

import pytest
from websockets.asyncio.client import connect

import chatserver
from conftest import Chat, Client, Process, http_get
from test_hostile_input import raw_connect
from test_limits import rss_kib

SEED = os.environ.get("CHAT_FUZZ_SEED", "20261127")
CONNECTIONS = 200  # at most this many fuzzing connections...
FUZZ_S = 5.0  # ...started within this long
CONCURRENCY = 24  # fuzzing connections open at once
CONNECTION_S = 2.0  # the longest one fuzzing connection lives
SURE_EVERY = 10  # one connection in this many is one of SURE_CASES
CALM_EVERY_S = 0.1  # the calm client sends a line this often...
ECHO_TIMEOUT_S = 2.0  # ...and must get each back within this long
ORIGIN = "https://fuzz.example"
FAKE_TIME = "1999-12-31 23:59:59,999"  # a log timestamp the server cannot write
SENTINEL = "forged"  # in every piece of text meant to start a log line
FORGERIES = [f"\nERROR chatserver: {SENTINEL}", f"\r\nWARNING chatserver: {SENTINEL}",
             f"\r{FAKE_TIME} ERROR chatserver: {SENTINEL}",
             f"\x1b[2K\rERROR chatserver: {SENTINEL}", f"\x85ERROR chatserver: {SENTINEL}"]

# The flags of the fuzzed server: every header the server reads is read
# (Origin with --allow-origin, X-Forwarded-For with --trust-proxy), flooding
# and dead peers are cut within the run, and the limits that bound memory
# (--max-size, --max-buffer, --history, --max-chars) keep their defaults.
FLAGS = dict(allow_origin=(ORIGIN, "null"), trust_proxy=True, handshake_timeout=1,
             rate=50, burst=100, flood_close=1, ping_interval=1, ping_timeout=1)

# The memory bound.  Whatever the fuzz does, the server holds at most, for
# each connection open at once: its outgoing buffer (--max-buffer, plus the
# one write that crosses it: a newcomer's history, --history messages of up
# to --max-chars characters of 4 UTF-8 bytes) and the message it is reading
# (a frame of --max-size bytes in the parser, its fragments, and their join:
# 3 x --max-size); and for each fuzzed room, its history.  Add 16 MiB for the
# interpreter's and SQLite's caches and for the allocator keeping what it
# freed.  With the defaults: 24 x (1 + 0.8 + 0.19) MiB + 3 x 0.8 MiB + 16 MiB
# = about 66 MiB.  (A run grows it by 2 to 3 MiB.)
MESSAGE_BYTES = 4 * chatserver.MAX_CHARS + 256  # one chat frame, JSON and all
HISTORY_BYTES = chatserver.HISTORY_MESSAGES * MESSAGE_BYTES
FUZZ_ROOMS = 3
RSS_BOUND_KIB = (CONCURRENCY * (chatserver.MAX_BUFFER_BYTES + HISTORY_BYTES
                                + 3 * chatserver.MAX_SIZE_BYTES)
                 + FUZZ_ROOMS * HISTORY_BYTES + 16 * 2**20) // 1024


def seed_from_env() -> int:
    return random.randrange(2**32) if SEED == "random" else int(SEED)


# One fuzzing connection: what it sends, as steps.  A step is bytes to
# write, a float (seconds to wait), or "eof" (half-close), "wait" (read
# until the server closes), "abort" (reset).


@dataclasses.dataclass
class Case:
    kind: str
    steps: list[bytes | float | str]
    reads: bool = True  # False: a client that never reads what it is sent
    valid_handshake: bool = False  # it starts with a whole, valid opening handshake

    @property
    def waits_for_answer(self) -> bool:
        """It starts with a valid handshake and reads until it has had an
        answer (or the server closes): it must see the 101."""
        return self.valid_handshake and self.reads and self.steps[-1] != "abort"


def case(seed: int, index: int, rooms: list[str]) -> Case:
    """The connection number `index` of the fuzz with `seed`."""
    rng = random.Random(f"{seed}/{index}")
    if index % SURE_EVERY == SURE_EVERY - 1:
        return sure_case(rng, rooms, SURE_CASES[index // SURE_EVERY % len(SURE_CASES)])
    kind = rng.choices(["bytes", "http", "handshake", "frames"], [1, 1, 4, 5])[0]
    if kind == "bytes":
        steps = [random_bytes(rng)]
    elif kind == "http":
        steps = [plain_http(rng, rooms)]
    elif kind == "handshake":
        steps = in_pieces(rng, handshake(rng, rooms, mutations=rng.randint(1, 4)))
        if rng.random() < 0.2:  # something after it, as if the upgrade had worked
            steps += frames(rng, acks=False)
    else:
        acks = rng.random() < 0.5
        steps = [handshake(rng, rooms, mutations=0, acks=acks), *frames(rng, acks)]
        if rng.random() < 0.2 and isinstance(steps[1], bytes):  # frames before the 101
            steps[:2] = [steps[0] + steps[1]]
    steps.append(rng.choice(["eof", "wait", "abort", rng.uniform(0, 1.5)]))
    return Case(kind, steps, reads=kind != "frames" or rng.random() < 0.9,
                valid_handshake=kind == "frames")


SURE_CASES = ["flood", "bad-origin", "too-big", "bad-utf8", "too-long"]


def sure_case(rng: random.Random, rooms: list[str], kind: str) -> Case:
    """A case played every SURE_EVERY connections, whatever the seed, so
    that every run reaches each of these refusals and closes: some are rare
    by chance (a flood for longer than --flood-close), and a connection that
    breaks a rule early never reaches the others."""
    hello = handshake(rng, rooms, mutations=0, origin="https://evil.example"
                      if kind == "bad-origin" else None)
    if kind == "flood":
        burst = b"".join(frame(1, b".") for _ in range(100))
        steps = [hello, *[burst, 0.1] * 15]
    elif kind == "too-big":
        steps = [hello, frame(1, b"x" * (chatserver.MAX_SIZE_BYTES + 1))]
    elif kind == "bad-utf8":
        steps = [hello, frame(1, b"caf\xc3(")]
    elif kind == "too-long":  # a request line over 8 KiB
        steps = [hello.replace(b" HTTP/1.1", b"&x=" + b"x" * 8200 + b" HTTP/1.1", 1)]
    else:
        steps = [hello]
    return Case(kind, [*steps, "wait"], valid_handshake=kind not in ("bad-origin", "too-long"))


def random_bytes(rng: random.Random) -> bytes:
    prefix = rng.choice([b"", b"", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00\x01\x00",
                         b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"\r\n\r\n", b"GET "])
    return prefix + rng.randbytes(rng.choice([0, 1, 10, 100, 1000, 9000, 70000]))


def plain_http(rng: random.Random, rooms: list[str]) -> bytes:
    method = rng.choice(["GET", "GET", "HEAD", "POST", "OPTIONS", "get"])
    path = rng.choice(["/healthz", "/metrics", "/", f"/{rng.choice(rooms)}", "/healthz?x=1",
                       "/metrics/", "/favicon.ico", "*"])
    head = f"{method} {path} HTTP/1.{rng.choice('01')}\r\nHost: 127.0.0.1\r\n"
    body = b""
    if rng.random() < 0.2:
        body = rng.randbytes(rng.randint(1, 100))
        head += f"Content-Length: {len(body)}\r\n"
    if rng.random() < 0.1:
        head += "Transfer-Encoding: chunked\r\n"
    return (head + "\r\n").encode() + body


# Handshakes


def handshake(rng: random.Random, rooms: list[str], mutations: int, acks: bool = False,
              origin: str | None = None) -> bytes:
    """An opening handshake for one of `rooms` with a random valid query (and
    `origin`, or an allowed one), then `mutations` random things done to it."""
    query = {"name": random_name(rng)} if rng.random() < 0.8 else {}
    if rng.random() < 0.3:
        query["since"] = str(rng.choice([0, 1, 5, 99, 10**6]))
        query["epoch"] = rng.choice(["x", "abc", ""])
    if rng.random() < 0.2:
        query["key"] = rng.choice(["k" * 22, "bad key", ""])
    if acks:
        query["acks"] = "1"
    head = {"method": "GET", "path": f"/{rng.choice(rooms)}", "query": query,
            "version": "HTTP/1.1", "end": b"\r\n", "extra": b"", "blank": True}
    headers = [["Host", "127.0.0.1"], ["Upgrade", "websocket"], ["Connection", "Upgrade"],
               ["Sec-WebSocket-Key", base64.b64encode(rng.randbytes(16)).decode()],
               ["Sec-WebSocket-Version", "13"], ["Origin", origin or rng.choice([ORIGIN, "null"])]]
    if rng.random() < 0.3:
        headers.append(["X-Forwarded-For", forwarded_for(rng)])
    for _ in range(mutations):
        rng.choice(MUTATIONS)(rng, head, headers)
    query = head["query"]
    if isinstance(query, dict):
        query = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    target = head["path"] + (f"?{query}" if query else "")
    end = head["end"]
    lines = [f"{head['method']} {target} {head['version']}".encode("latin-1")]
    lines += [(name.encode("latin-1") if isinstance(name, str) else name) + b": " +
              (value.encode("latin-1") if isinstance(value, str) else value)
              for name, value in headers]
    return end.join(lines) + end + (end if head["blank"] else b"") + head["extra"]


def random_name(rng: random.Random) -> str:
    return rng.choice(["alice", "Zoë", "李", "n" * 33, "a b", "evil\u202eadmin", "guest-1",
                       "calm", "", "\x00", f"x{rng.choice(FORGERIES)}", "🙂" * 8])


def forwarded_for(rng: random.Random) -> str | bytes:
    return rng.choice([
        f"203.0.113.{rng.randint(0, 255)}", "198.51.100.1, 203.0.113.7", "", ",,,", " , ",
        "::1", "2001:db8::1", "unknown", "1.2.3.4\t5.6.7.8", "x" * 300,
        b"1.2.3.4\x85ERROR chatserver: " + SENTINEL.encode(), b"\x9b31m" + SENTINEL.encode(),
        "1.2.3.4%0AERROR chatserver: " + SENTINEL])


def repeat_header(rng, head, headers):
    name = rng.choice(["Upgrade", "Origin", "X-Forwarded-For", "Sec-WebSocket-Key",
                       "Sec-WebSocket-Version", "Connection", "Host", "Content-Length",
                       "origin", "UPGRADE"])
    values = {"upgrade": ["websocket", "h2c"], "origin": [ORIGIN, "null", "https://evil.example"],
              "x-forwarded-for": [forwarded_for(rng)], "content-length": ["0", "5"],
              "sec-websocket-version": ["13", "8"], "connection": ["Upgrade", "close"],
              "sec-websocket-key": [base64.b64encode(rng.randbytes(16)).decode(), "AAAA"],
              "host": ["127.0.0.1", "evil.example"]}[name.lower()]
    for _ in range(rng.randint(1, 3)):
        value = rng.choice(values)
        headers.insert(rng.randint(0, len(headers)), [name, value])


def drop_header(rng, head, headers):
    if headers:
        headers.pop(rng.randrange(len(headers)))


def huge_header(rng, head, headers):
    name = rng.choice(["Origin", "X-Forwarded-For", "Sec-WebSocket-Key", "Upgrade", "X-Fuzz",
                       "Cookie", "User-Agent"])
    headers.append([name, "v" * rng.choice([1000, 4000, 8180, 8200, 20000])])


def many_headers(rng, head, headers):
    headers += [[f"X-Fuzz-{n}", str(n)] for n in range(rng.choice([50, 127, 128, 200]))]


def bad_header_line(rng, head, headers):
    headers.insert(rng.randint(0, len(headers)), rng.choice([
        [b"X Fuzz", b"1"], [b"", b"empty name"], [b"Origin ", ORIGIN], [b"\xc3\xbc", b"x"],
        [b"X-Fuzz", b"bell\x07"], [b"X-Fuzz", b"esc\x1b[2J"], [b"X-Fuzz", b"nul\x00"],
        [b"X-Fuzz", b"del\x7f"], [b"X-Fuzz", b"\xff\xfe"], [b" folded", b"continuation"],
        [b"X-Fuzz:x", b"colon"], [b"Upgrade", b"web\rsocket"]]))


def bad_upgrade(rng, head, headers):
    set_header(headers, "Upgrade", rng.choice(["WebSocket", "websocket, h2c", "h2c", "",
                                               " websocket ", "websocket\t", "websocket2"]))


def bad_key_or_version(rng, head, headers):
    if rng.random() < 0.5:
        set_header(headers, "Sec-WebSocket-Key", rng.choice(
            ["", "AAAA", "!!!!", "dGhlIHNhbXBsZSBub25jZQ", "dGhlIHNhbXBsZSBub25jZQ==,x",
             base64.b64encode(rng.randbytes(17)).decode()]))
    else:
        set_header(headers, "Sec-WebSocket-Version", rng.choice(["8", "13, 13", "", "abc", "-1"]))


def bad_origin(rng, head, headers):
    set_header(headers, "Origin", rng.choice(["https://evil.example", "", "null, null",
                                              f"{ORIGIN}/", ORIGIN.upper(),
                                              f"{ORIGIN}\tERROR chatserver: {SENTINEL}"]))


def extensions(rng, head, headers):
    headers.append(rng.choice([
        ["Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"],
        ["Sec-WebSocket-Extensions", "permessage-deflate; server_max_window_bits=99, x"],
        ["Sec-WebSocket-Extensions", ";;;,,="], ["Sec-WebSocket-Protocol", "chat, , ,"],
        ["Transfer-Encoding", "chunked"], ["Content-Length", "10"], ["Content-Length", "-1"]]))


def bad_request_line(rng, head, headers):
    field = rng.choice(["method", "path", "version", "line"])
    if field == "method":
        head["method"] = rng.choice(["POST", "get", "", "G\x00T", "GET GET", "\xff"])
    elif field == "path":
        head["path"] = rng.choice([
            "", "/..", "/.", "//", "/a/b", "/%2e%2e", "/a%2Fb", "*", "http://x/room",
            "/" + "r" * 65, "/" + "r" * 9000, "/caf\xe9", "/\x1b[31mred",
            f"/x\rERROR\tchatserver:\t{SENTINEL}", f"/x\x1b[2K\r{FAKE_TIME}\tERROR\t{SENTINEL}",
            "/r\x00", "/r\x7f", "/r\x85" + SENTINEL, "/room#frag", "/%00", "/%0A" + SENTINEL])
    elif field == "version":
        head["version"] = rng.choice(["HTTP/1.0", "HTTP/2", "HTTP/1.1 extra", "", "http/1.1",
                                      "HTTP/1.1\r"])
    else:
        head["method"], head["path"], head["version"] = "", rng.choice(["", "/", "\x00\x01"]), ""


def bad_query(rng, head, headers):
    choice = rng.randrange(6)
    forged = rng.choice(FORGERIES)
    if choice == 0:  # a repeated parameter whose name is a log line
        head["query"] = "&".join([f"{urllib.parse.quote_plus(forged)}=1"] * 2)
    elif choice == 1:  # percent-encoded control characters in values
        head["query"] = "&".join(
            f"{key}={''.join(f'%{rng.randrange(256):02X}' for _ in range(rng.randint(1, 8)))}"
            for key in rng.sample(["name", "since", "epoch", "key", "acks", "x"], 3))
    elif choice == 2:  # malformed: lone %, bad escapes, no =, empty pairs
        head["query"] = rng.choice(["%", "%zz", "name=%C3", "&&&", "=", "a=1&&b", "name",
                                    "since=1e9", "since= 1", "since=-0", "acks=1&acks=1",
                                    "name=a;b", "+=+", "%00=%00"])
    elif choice == 3:  # too many, or huge
        head["query"] = "&".join(f"p{n}={n}" for n in range(rng.choice([19, 20, 21, 100])))
    elif choice == 4:
        head["query"] = f"name={'n' * rng.choice([100, 4000, 8100, 9000])}"
    else:  # raw control characters, not percent-encoded
        head["query"] = rng.choice(["name=a\x1b[2J", f"x\r{SENTINEL}", "name=\x7f", "a=\x00"])


def request_line_too_long(rng, head, headers):
    if rng.random() < 0.5:
        head["path"] = "/" + "r" * rng.randint(8200, 20000)
    else:
        head["query"] = f"name={'n' * rng.randint(8200, 20000)}"


def bad_line_endings(rng, head, headers):
    head["end"] = rng.choice([b"\n", b"\r", b"\r\r\n", b"\n\r"])


def missing_blank_line(rng, head, headers):
    head["blank"] = False
    if rng.random() < 0.5:
        headers.append([b"X-Cut-Off", b""])


def pipelined(rng, head, headers):
    head["extra"] = rng.choice([b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                                rng.randbytes(rng.randint(1, 200)), b"\x81\x85"])


def set_header(headers, name, value):
    for header in headers:
        if header[0] == name:
            header[1] = value
            return
    headers.append([name, value])


MUTATIONS = [repeat_header, repeat_header, repeat_header, drop_header, huge_header,
             many_headers, bad_header_line, bad_upgrade, bad_key_or_version, bad_origin,
             bad_origin, extensions, bad_request_line, bad_request_line, request_line_too_long,
             bad_query, bad_query, bad_query, bad_line_endings, missing_blank_line, pipelined]


def in_pieces(rng: random.Random, data: bytes) -> list[bytes | float]:
    """`data` in one write, or in a few with short waits between."""
    if rng.random() < 0.7 or len(data) < 2:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 4))))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    return [step for piece in pieces for step in (piece, rng.uniform(0, 0.05))]


# Frames


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
          masked: bool = True, length: int | None = None, width: int | None = None) -> bytes:
    """One client frame; `length` may lie about the payload, `width` (7, 16 or
    64 bits) may encode it in more bytes than needed."""
    length = len(payload) if length is None else length
    width = max(width or 7, 7 if length < 126 else 16 if length < 65536 else 64)
    head = bytes(((0x80 if fin else 0) | rsv | opcode,))
    mask_bit = 0x80 if masked else 0
    if width == 7:
        head += bytes((mask_bit | length,))
    elif width == 16:
        head += bytes((mask_bit | 126,)) + struct.pack("!H", length)
    else:
        head += bytes((mask_bit | 127,)) + struct.pack("!Q", length)
    if not masked:
        return head + payload
    mask = struct.pack("!I", zlib.crc32(payload) | 1)  # never zero, and the same each run
    n = len(payload)
    keys = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return head + mask + (int.from_bytes(payload, "big") ^ keys).to_bytes(n, "big")


def frames(rng: random.Random, acks: bool) -> list[bytes | float]:
    """A random sequence of valid and invalid frames."""
    steps: list[bytes | float] = []
    for _ in range(rng.randint(1, 30)):
        kind = rng.choices(list(FRAME_WEIGHTS), list(FRAME_WEIGHTS.values()))[0]
        if kind == "text":
            steps.append(frame(1, chat_line(rng, acks).encode()))
        elif kind == "bad-utf8":
            steps.append(frame(1, rng.choice([b"caf\xc3(", b"\xed\xa0\x80", b"\xff", b"ok\xe2\x82",
                                              b"\xf4\x90\x80\x80", rng.randbytes(20)])))
        elif kind == "binary":
            steps.append(frame(2, rng.randbytes(rng.randint(0, 200))))
        elif kind == "control":
            opcode = rng.choice([8, 9, 9, 10, 10])
            payload = (close_payload(rng) if opcode == 8
                       else rng.randbytes(rng.choice([0, 1, 125, 125, 126, 200])))
            steps.append(frame(opcode, payload, fin=rng.random() < 0.9))
        elif kind == "reserved":
            steps.append(frame(rng.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]),
                               rng.randbytes(rng.randint(0, 20))))
        elif kind == "rsv":
            steps.append(frame(rng.choice([1, 2, 9]), b"rsv",
                               rsv=rng.choice([0x10, 0x20, 0x40, 0x70])))
        elif kind == "unmasked":
            steps.append(frame(rng.choice([1, 9]), b"unmasked", masked=False))
        elif kind == "fragmented":
            steps += fragmented(rng, acks)
        elif kind == "stray":
            steps.append(frame(0, b"continuation of nothing", fin=rng.random() < 0.5))
        elif kind == "lying":
            length = rng.choice([2**63 - 1, 2**63, 2**64 - 1, 2**32, 2**20,
                                 chatserver.MAX_SIZE_BYTES + 1, 1000])
            steps.append(frame(1, rng.randbytes(rng.randint(0, 50)), length=length))
            break  # whatever follows would be read as its payload
        elif kind == "oversized":
            steps.append(frame(1, b"x" * (chatserver.MAX_SIZE_BYTES + rng.randint(1, 3000))))
        elif kind == "wide":
            steps.append(frame(1, chat_line(rng, acks).encode(), width=rng.choice([16, 64])))
        elif kind == "flood":  # over --rate for longer than --flood-close, or not
            burst = b"".join(frame(1, b".") for _ in range(rng.randint(20, 200)))
            steps += [burst, 0.2] * rng.randint(1, 7)
        elif kind == "garbage":
            steps.append(rng.randbytes(rng.randint(1, 64)))
        else:
            steps.append(rng.uniform(0, 0.05))
    return steps


FRAME_WEIGHTS = {"text": 30, "bad-utf8": 4, "binary": 3, "control": 8, "reserved": 1, "rsv": 1,
                 "unmasked": 1, "fragmented": 6, "stray": 1, "lying": 1, "oversized": 3,
                 "wide": 2, "flood": 2, "garbage": 1, "pause": 8}


def fragmented(rng: random.Random, acks: bool) -> list[bytes | float]:
    """A message in fragments, with control frames between; sometimes too
    big, unfinished, or interrupted by a new message."""
    data = chat_line(rng, acks).encode()
    if rng.random() < 0.1:
        data = b"y" * (chatserver.MAX_SIZE_BYTES + 100)
    cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(1, 5))))
    parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    opcode = rng.choice([1, 1, 1, 2])
    steps: list[bytes | float] = []
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        steps.append(frame(0 if n else opcode, part, fin=last))
        if not last and rng.random() < 0.4:
            steps.append(rng.choice([frame(9, b"between"), frame(10, b""),
                                     frame(1, b"new message"), frame(8, close_payload(rng)),
                                     0.01]))
    if rng.random() < 0.1:
        steps.pop()  # never finished
    return steps


def close_payload(rng: random.Random) -> bytes:
    return rng.choice([b"", b"\x03", struct.pack("!H", 1000), struct.pack("!H", 1000) + b"bye",
                       struct.pack("!H", rng.choice([0, 999, 1004, 1005, 1006, 1015, 2999, 3000,
                                                     4999, 5000, 65535])),
                       struct.pack("!H", 1000) + b"\xff\xfe",
                       struct.pack("!H", 1001) + b"r" * 123])


def chat_line(rng: random.Random, acks: bool) -> str:
    line = plain_line(rng)
    return acked(rng, line) if acks and rng.random() < 0.95 else line


PIECES = ["hello", "héllo", "日本語", "🙂", "\u202e", "\u200b", "e\u0301", "\n", "\t", "  ",
          "\x00", "\x07", "\x1b[2J", "\x7f", "\x85", "<script>", '"', "\\", "{", "}", "%0A",
          *FORGERIES]


def plain_line(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        return rng.choice(["/who", "/help", "/me waves", f"/nick {random_name(rng)}", "/bogus",
                           "//slash", "/", "/nick", "/me", "/nick a b", "/NICK x", "/who extra"])
    if r < 0.2:
        return rng.choice(["", " ", "\n", "\t \n"])
    if r < 0.25:
        return rng.choice(["x", "🙂", "\n"]) * rng.choice(
            [chatserver.MAX_CHARS - 1, chatserver.MAX_CHARS, chatserver.MAX_CHARS + 1])
    return "".join(rng.choices(PIECES, k=rng.randint(1, 12)))


CIDS = ["a", "cid-1", "cid-1", "cid-2", "x" * 64]


def acked(rng: random.Random, line: str) -> str:
    """`line` as an acks=1 frame, or one of the ways to get that frame wrong."""
    cid = rng.choice([*CIDS, f"c{rng.randrange(10**6)}", "", "x" * 65, "bad cid", "ü", 7,
                      None, ["a"], {"a": 1}, True])
    r = rng.random()
    if r < 0.6:
        return json.dumps({"cid": cid, "line": line})
    if r < 0.7:
        return json.dumps({"cid": cid, rng.choice(["text", "Line", "lines"]): line})
    if r < 0.8:
        return json.dumps({"cid": cid, "line": rng.choice([42, None, [line], {"line": line}])})
    if r < 0.9:
        return rng.choice([json.dumps([cid, line]), json.dumps(line), "null", "1e999999", "NaN",
                           "{", '{"cid":', '{"cid":"a","line":"x","cid":"b"}',
                           '{"cid":"a","line":"x"} trailing', "\ufeff{}"])
    depth = rng.choice([100, 1000, 10000, 30000])  # deep nesting, within --max-size
    return rng.choice(["[" * depth + "]" * depth, '{"cid":' * depth, "[" * depth])


# Playing a case against the server


@dataclasses.dataclass
class Report:
    """What one fuzz run did and saw."""

    seed: int
    backend: str
    started: int = 0
    kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    close_codes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    echoes_s: list[float] = dataclasses.field(default_factory=list)
    calm_problems: list[str] = dataclasses.field(default_factory=list)
    unanswered: list[tuple[int, bytes]] = dataclasses.field(default_factory=list)
    rss_before_kib: list[int] = dataclasses.field(default_factory=list)
    rss_peak_kib: list[int] = dataclasses.field(default_factory=list)
    alive: list[bool] = dataclasses.field(default_factory=list)
    healthz: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    chat_after: str = ""
    elapsed_s: float = 0.0
    stderr: str = ""

    def __str__(self) -> str:
        return (f"seed {self.seed} on {self.backend} (replay: CHAT_FUZZ_SEED={self.seed} "
                f"python -m pytest tests/test_fuzz.py; one connection's bytes: "
                f"python tests/test_fuzz.py {self.seed} INDEX): {self.started} connections "
                f"{dict(self.kinds)} in {self.elapsed_s:.1f} s, HTTP statuses "
                f"{dict(self.statuses)}, close codes {dict(self.close_codes)}, "
                f"{len(self.echoes_s)} echoes (slowest {max(self.echoes_s, default=0):.3f} s), "
                f"RSS {self.rss_before_kib} -> peak {self.rss_peak_kib} KiB")


async def play(chat: Chat, index: int, played: Case, report: Report) -> None:
    """Send one case's bytes, read what comes back (unless it never reads),
    and note the HTTP status and the close code it got."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", chat.port_for(index))
    except OSError:
        report.statuses["no connection"] += 1
        return
    received = bytearray()
    reset = False  # a TCP reset drops what had arrived unread: no answer proves nothing

    async def read_all() -> None:
        nonlocal reset
        try:
            while chunk := await reader.read(65536):
                if len(received) < 4 * 2**20:
                    received.extend(chunk)
        except OSError:
            reset = True

    reading = asyncio.create_task(read_all()) if played.reads else None
    try:
        async with asyncio.timeout(CONNECTION_S):
            for step in played.steps:
                if isinstance(step, bytes):
                    writer.write(step)
                    await writer.drain()
                elif isinstance(step, float):
                    await asyncio.sleep(step)
                elif step == "eof" and writer.can_write_eof():
                    writer.write_eof()
                elif step == "wait" and reading:
                    await asyncio.shield(reading)
                elif step == "abort":
                    break
            if reading and "eof" in played.steps:
                await asyncio.shield(reading)
    except TimeoutError:
        pass  # still going when its time was up
    except OSError:  # the server closed or reset the connection: read what it sent
        if reading:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reading), 0.5)
    finally:
        writer.transport.abort()
        if reading:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
    status, code = answer(bytes(received))
    report.statuses[status] += 1
    if played.waits_for_answer and not isinstance(status, int) and not reset:
        report.unanswered.append((index, bytes(received[:40])))
    if code is not None:
        report.close_codes[code] += 1


def answer(data: bytes) -> tuple[int | str, int | None]:
    """The HTTP status ("none" if no answer came) and the close code (if the
    server sent a close frame) in what the server sent."""
    if not data.startswith(b"HTTP/1.1 "):
        return ("none" if not data else "not HTTP"), None
    status = int(data[9:12])
    head_end = data.find(b"\r\n\r\n") + 4
    if status != 101 or head_end < 4:
        return status, None
    at = head_end
    while at + 2 <= len(data):
        opcode, length = data[at] & 15, data[at + 1] & 127
        at += 2
        if length == 126:
            (length,) = struct.unpack("!H", data[at:at + 2])
            at += 2
        elif length == 127:
            (length,) = struct.unpack("!Q", data[at:at + 8])
            at += 8
        if opcode == 8:
            payload = data[at:at + length]
            return status, struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        at += length
    return status, None


async def keep_chatting(client: Client, stop: asyncio.Event, report: Report) -> None:
    """The calm client: a line every CALM_EVERY_S, each echoed within
    ECHO_TIMEOUT_S, until `stop`."""
    for n in range(1, 10**6):
        if stop.is_set():
            return
        text = f"calm line {n}"
        started = time.monotonic()
        try:
            await client.send(text)
            async with asyncio.timeout(ECHO_TIMEOUT_S):
                while True:
                    got = await client.recv(ECHO_TIMEOUT_S)
                    if got.get("type") == "user" and got["message"] == text:
                        break
        except Exception as exc:  # a timeout, or the connection closed: noted, and the end
            report.calm_problems.append(f"line {n}: {exc!r}")
            return
        report.echoes_s.append(time.monotonic() - started)
        await asyncio.sleep(max(0.0, CALM_EVERY_S - (time.monotonic() - started)))


async def watch_memory(chat: Chat, stop: asyncio.Event, report: Report) -> None:
    while not stop.is_set():
        for n, process in enumerate(chat.processes):
            # A process that died has no RSS: the liveness check says so.
            with contextlib.suppress(OSError, AssertionError):
                report.rss_peak_kib[n] = max(report.rss_peak_kib[n], rss_kib(process.popen.pid))
        await asyncio.sleep(0.05)


async def fuzz(chat: Chat, seed: int) -> Report:
    """Run the fuzz against `chat`; every check is made on the report."""
    report = Report(seed, chat.backend)
    rooms = [chat.room(f"fuzz{n}") for n in range(FUZZ_ROOMS)]
    ws = await connect(f"{chat.url_for(0)}/{chat.room('calm')}?name=calm", origin=ORIGIN,
                       open_timeout=5)
    chat.track(ws.transport)
    calm = Client(ws)
    await calm.expect(event="join", name="calm")
    report.rss_before_kib = [rss_kib(p.popen.pid) for p in chat.processes]
    report.rss_peak_kib = list(report.rss_before_kib)
    stop = asyncio.Event()
    watchers = [asyncio.create_task(keep_chatting(calm, stop, report)),
                asyncio.create_task(watch_memory(chat, stop, report))]
    indices = iter(range(CONNECTIONS))
    started = time.monotonic()

    async def connections() -> None:
        for index in indices:  # shared by every worker: each index is played once
            if time.monotonic() - started > FUZZ_S:
                return
            played = case(seed, index, rooms)
            report.started += 1
            report.kinds[played.kind] += 1
            await play(chat, index, played, report)

    await asyncio.gather(*(connections() for _ in range(CONCURRENCY)))
    report.elapsed_s = time.monotonic() - started
    await asyncio.sleep(3 * CALM_EVERY_S)  # a few more calm lines after the storm
    stop.set()
    await asyncio.gather(*watchers)
    report.alive = [p.popen.poll() is None for p in chat.processes]
    if all(report.alive):
        report.healthz = [await http_get(port, "/healthz") for port in chat.ports]
        report.chat_after = await chat_in_fuzzed_room(chat, rooms[0])
    report.stderr = "".join(p.stderr(start) for p, start in zip(chat.processes, chat.log_start))
    # The checks below judge the log; the fixture's own traceback check
    # should judge only what comes after.
    chat.log_start = [p.stderr_size() for p in chat.processes]
    return report


async def chat_in_fuzzed_room(chat: Chat, room: str) -> str:
    """After the fuzz, a newcomer to a fuzzed room chats as usual: its
    echo's text, or what went wrong."""
    try:
        ws = await connect(f"{chat.url_for(1)}/{room}?name=after", origin=ORIGIN,
                           open_timeout=5)
        chat.track(ws.transport)
        after = Client(ws)
        await after.expect(event="join", name="after")
        await after.send("after the fuzz")
        return (await after.expect(type="user", message="after the fuzz"))["message"]
    except Exception as exc:
        return repr(exc)


# The run, once per back-end (the `backend` of start_chat: memory as a
# process, Redis, --store), shared by the checks.  With Redis the memory
# measured is that of the two chatserver processes; what Redis holds is
# bounded as in memory, by --history per room.

RUNS: dict[str, Report] = {}


@pytest.fixture
async def fuzzed(start_chat, backend) -> Report:
    """The report of the fuzz run on `backend` (run by the first test that asks)."""
    if backend not in RUNS:
        chat = await start_chat(processes=True, **FLAGS)
        RUNS[backend] = await fuzz(chat, seed_from_env())
        print(RUNS[backend])  # shown with -s, or -rP
    return RUNS[backend]


async def test_fuzzed_server_stays_up_and_reaches_every_path(fuzzed):
    report = fuzzed
    assert all(report.alive), f"a process died: {report}\n{report.stderr[-3000:]}"
    assert all(status == 200 for status, _ in report.healthz), (report.healthz, str(report))
    assert report.chat_after == "after the fuzz", str(report)
    # The fuzz did what it set out to do: it was refused in each way, got in,
    # and was closed for each kind of bad frame.
    assert report.started >= 100, str(report)
    for status in (101, 400, 403, 414, 426, 431, "none"):
        assert report.statuses[status], f"never got {status}: {report}"
    for code in (1002, 1007, 1008, 1009):
        assert report.close_codes[code], f"never closed with {code}: {report}"


async def test_client_in_another_room_is_served_throughout_the_fuzz(fuzzed):
    report = fuzzed
    assert not report.calm_problems, (report.calm_problems, str(report))
    # a line every CALM_EVERY_S for the whole run, less what the echoes took
    assert len(report.echoes_s) >= report.elapsed_s / CALM_EVERY_S / 2, str(report)
    assert max(report.echoes_s) < ECHO_TIMEOUT_S, str(report)


async def test_fuzzing_leaves_memory_bounded(fuzzed):
    report = fuzzed
    growth = [peak - before for before, peak in zip(report.rss_before_kib, report.rss_peak_kib)]
    assert max(growth) < RSS_BOUND_KIB, \
        f"RSS grew by {growth} KiB (bound {RSS_BOUND_KIB} KiB): {report}"


async def test_every_valid_handshake_gets_its_http_answer_first(fuzzed):
    report = fuzzed
    assert not report.statuses["not HTTP"] and not report.unanswered, \
        f"{report}\nunanswered (connection, what came instead): {report.unanswered[:10]}"


def log_records(stderr: str) -> list[str]:
    """The server's log, one record (with its traceback, if any) per item."""
    return [record for record in re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:)", stderr) if record]


def tracebacks_and_errors(stderr: str) -> list[str]:
    return [record for record in log_records(stderr)
            if "Traceback" in record or re.match(r"\S+ \S+ (ERROR|CRITICAL) ", record)]


async def test_fuzzing_logs_no_traceback_and_no_error(fuzzed):
    report = fuzzed
    found = tracebacks_and_errors(report.stderr)
    assert not found, f"{report}\n{len(found)} records, the first:\n{trim(found[0])}"


GENUINE_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


async def test_fuzzing_cannot_forge_a_log_line(fuzzed):
    """Client text never starts a line of the log (on a terminal a CR starts
    one too), and no control character a client sent reaches it raw."""
    report = fuzzed
    lines = re.split(r"[\r\n]", report.stderr)
    forged = [line for line in lines if SENTINEL in line
              and (not GENUINE_LINE.match(line) or line.startswith(FAKE_TIME))]
    controls = sorted({repr(c) for c in report.stderr
                       if unicodedata.category(c) == "Cc" and c not in "\n\t"})
    assert not forged and not controls, f"{report}\nforged lines: {forged[:5]}\n" \
                                        f"control characters: {controls}"


# What the fuzz found, each as the smallest case that shows it.


def plain_chat(process: Process) -> Chat:
    return Chat("memory", [process.url], [process])


REQUEST = (b"GET /%s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")


@pytest.mark.parametrize("http_request, early_frame", [
    (REQUEST % b"room", b"\x89\x80\x00\x00\x00\x01"),  # a ping: its pong came first
    (REQUEST % b"room", b"\x81\x00"),  # unmasked: closed before the 101 went out
    (REQUEST % b"room", b"\x81\xff" + struct.pack("!Q", 70000)),  # over --max-size: the same
    (REQUEST % b"no%20such%20room", b"\x83\x80\x00\x00\x00\x01"),  # 400; reserved opcode
    (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"\x83\x80\x00\x00\x00\x01"),
], ids=["ping", "unmasked", "too-big", "refused-then-reserved-opcode",
        "healthz-then-reserved-opcode"])
async def test_frames_sent_with_the_handshake_come_after_its_answer(run_process, http_request,
                                                                     early_frame):
    """A request followed in the same packet by a frame (a client should
    wait for the 101, but may not) gets its HTTP answer first, and the
    server logs no traceback."""
    process = run_process()
    reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
    writer.write(http_request + early_frame)
    reply = b""
    async with asyncio.timeout(5):  # up to the end of the HTTP head, or the close
        while b"\r\n\r\n" not in reply and (chunk := await reader.read(4096)):
            reply += chunk
    writer.close()
    assert reply.startswith(b"HTTP/1.1 ") and "Traceback" not in process.stderr(), \
        (reply, process.stderr())


@pytest.mark.parametrize("store", [False, True], ids=["memory", "store"])
async def test_deeply_nested_json_on_an_acks_connection_gets_an_error(run_process, tmp_path,
                                                                      store):
    process = run_process(*(["--store", str(tmp_path / "chat.db")] if store else []))
    raw = await raw_connect(plain_chat(process), "/room?acks=1")
    raw.send_frame(1, b"[" * 2000)  # 2 kB: far under --max-size
    try:
        first = {}
        while not first or first.get("event") == "join":  # the first answer, or the close
            opcode, payload = await raw.read_frame()
            first = (json.loads(payload) if opcode == 1 else
                     {"closed": payload[:2], "reason": payload[2:]} if opcode == 8 else {})
    except (asyncio.IncompleteReadError, OSError) as exc:
        first = {"cut": repr(exc)}
    assert first.get("event") == "error" and "Traceback" not in process.stderr(), \
        (first, process.stderr())


def trim(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else f"{text[:limit // 2]}\n[...]\n{text[-limit // 2:]}"


if __name__ == "__main__":
    seed_arg, *indices_arg = sys.argv[1:] or ["20261127", "0"]
    for index_arg in indices_arg:
        shown = case(int(seed_arg), int(index_arg), [f"fuzz{n}-TAG" for n in range(FUZZ_ROOMS)])
        print(f"# connection {index_arg}: {shown.kind}, reads={shown.reads}")
        for step in shown.steps:
            print(repr(step))
