"""The Python cost of one chat line in chatserver, without the kernel's.

    python bench/hotpath.py [--rooms 1000] [--size 10] [--lines 200000]
    python bench/hotpath.py --ingest [--store PATH] [--rate 10000]

Clients on stand-in transports (a write is appended to a list, nothing is
sent) join --rooms rooms of --size; then --lines 64-byte lines, round-robin
over two senders per room, go through the real path: data_received, the
frame parser, the line's checks, the JSON frame, the fan-out's writes, one
event loop turn per batch of 50 lines.  It prints microseconds of CPU per
line and per delivery: what chatserver adds to the kernel's share, which
bench/run.py's floor server measures.

With --ingest it measures the ingest scenario's path instead: --rooms rooms
of two (--size 2), every client on acks=1 sending {"cid", "line"} frames,
round-robin, --rate lines a second for --lines lines, and it waits for every
ack.  With --store PATH (a new file) the rooms are kept there, as with
chatserver --store: the CPU then includes the store's thread, SQLite and its
writes and fsyncs (process time counts every thread), but still no socket.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chatserver  # noqa: E402

REQUEST = (b"GET /%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


class Transport(asyncio.Transport):
    """Takes every write and keeps nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.acks = 0

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data) -> None:
        self.writes += 1
        self.acks += data.count(b'"event":"ack"')

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def masked_text(text: bytes) -> bytes:
    mask = b"\x12\x34\x56\x78"
    return bytes((0x81, 0x80 | len(text))) + mask + bytes(
        b ^ mask[i % 4] for i, b in enumerate(text))


FLAGS = ["--rate", "1000000", "--burst", "1000000", "--max-clients", "1000000",
         "--max-per-ip", "1000000", "--rooms-per-ip", "1000000", "--new-rooms-per-min",
         "100000000", "--log-level", "WARNING"]


def connect(server, count: int, rooms: int, request: bytes = REQUEST,
            query: str = "") -> list:
    """`count` clients on stand-in transports, spread over `rooms` rooms."""
    clients = []
    for i in range(count):
        client = chatserver.Client(server)
        client.connection_made(Transport())
        client.data_received(request % f"r{i % rooms}{query}".encode())
        clients.append(client)
    return clients


async def main(options: argparse.Namespace) -> None:
    if options.ingest:
        await ingest(options)
        return
    config = chatserver.parse_args(FLAGS)
    server = chatserver.ChatServer(config)
    clients = connect(server, options.rooms * options.size, options.rooms)
    await asyncio.sleep(0.01)
    senders = clients[:2 * options.rooms]
    frame = masked_text(b"@@" + b"0" * 19 + b" " + b"x" * 42)
    loop = asyncio.get_running_loop()
    cpu, writes = time.process_time(), sum(c.transport.writes for c in clients)
    for n in range(options.lines):
        senders[n % len(senders)].data_received(frame)
        if n % 50 == 49:
            await asyncio.sleep(0)  # the fan-out flushes on the next turn
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    cpu = time.process_time() - cpu
    writes = sum(c.transport.writes for c in clients) - writes
    print(f"{options.lines:,} lines, {writes:,} writes in {cpu:.2f} s of CPU: "
          f"{cpu / options.lines * 1e6:.1f} us per line, {cpu / writes * 1e6:.2f} us per delivery "
          f"(Python {sys.version.split()[0]}, pid {os.getpid()})")
    del loop


async def ingest(options: argparse.Namespace) -> None:
    config = chatserver.parse_args(FLAGS + (["--store", options.store] if options.store else []))
    server = chatserver.ChatServer(config)
    await server.rooms.start()
    clients = connect(server, options.rooms * options.size, options.rooms, query="?acks=1")
    while not all(client.member for client in clients):
        await asyncio.sleep(0.01)
    line = b"x" * 64
    frames = [masked_text(b'{"cid":"%019d_%d","line":"%s"}' % (0, n, line))
              for n in range(options.lines)]
    cpu, start = time.process_time(), time.monotonic()
    batch = max(1, options.rate // 1000)  # lines a millisecond
    for n in range(0, options.lines, batch):
        for k in range(n, min(n + batch, options.lines)):
            clients[k % len(clients)].data_received(frames[k])
        delay = start + (n + batch) / options.rate - time.monotonic()
        await asyncio.sleep(max(0, delay))
    while sum(c.transport.acks for c in clients) < options.lines:
        await asyncio.sleep(0.001)
    wall = time.monotonic() - start
    cpu = time.process_time() - cpu
    await server.rooms.close()
    print(f"{options.lines:,} acked lines at {options.lines / wall:,.0f}/s in {cpu:.2f} s of CPU: "
          f"{cpu / options.lines * 1e6:.1f} us per line ({'store' if options.store else 'memory'}"
          f", Python {sys.version.split()[0]}, pid {os.getpid()})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=1000)
    parser.add_argument("--size", type=int)
    parser.add_argument("--lines", type=int)
    parser.add_argument("--ingest", action="store_true", help="acked lines, as in run.py's "
                        "ingest scenario")
    parser.add_argument("--store", help="with --ingest: keep the rooms in this new SQLite file")
    parser.add_argument("--rate", type=int, default=10_000, help="with --ingest: lines a second")
    options = parser.parse_args()
    options.size = options.size or (2 if options.ingest else 10)
    options.lines = options.lines or (100_000 if options.ingest else 200_000)
    asyncio.run(main(options))
