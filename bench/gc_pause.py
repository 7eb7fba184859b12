"""What chatserver's clients cost the garbage collector.

    python bench/gc_pause.py [--clients 10000] [--rooms 1000] [--runs 7]

Clients on stand-in transports (bench/hotpath.py's) join --rooms rooms
with the headers a desktop Chromium sends (about 600 bytes, 13 lines);
then it prints the objects the collector tracks per client and the median
time of a full collection (`gc.collect()`), which stops the event loop for
that long.  With 10,000 clients such a pause is what fails a load step's
p99 (see the README's "Many small rooms").  Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chatserver  # noqa: E402
from hotpath import connect  # noqa: E402

ORIGIN = "http://localhost:8000"
BROWSER = ("GET /%s HTTP/1.1\r\nHost: chat.example.org:8765\r\nConnection: Upgrade\r\n"
           "Pragma: no-cache\r\nCache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux "
           "x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36\r\n"
           f"Upgrade: websocket\r\nOrigin: {ORIGIN}\r\nSec-WebSocket-Version: 13\r\n"
           "Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n").encode()


async def main(options: argparse.Namespace) -> None:
    config = chatserver.parse_args(["--log-level", "WARNING", "--allow-origin", ORIGIN,
                                    "--max-clients", "1000000", "--max-per-ip", "1000000",
                                    "--rooms-per-ip", "1000000", "--new-rooms-per-min", "1e9"])
    server = chatserver.ChatServer(config)
    gc.collect()
    before = len(gc.get_objects())
    clients = connect(server, options.clients, options.rooms, BROWSER)
    await asyncio.sleep(0.01)
    gc.collect()
    per_client = (len(gc.get_objects()) - before) / options.clients
    pauses = []
    for _ in range(options.runs):
        start = time.perf_counter()
        gc.collect()
        pauses.append((time.perf_counter() - start) * 1000)
    print(f"{options.clients:,} clients: {per_client:.1f} tracked objects per client; "
          f"a full collection takes {statistics.median(pauses):.0f} ms "
          f"(median of {options.runs}; Python {sys.version.split()[0]})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--rooms", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=7)
    asyncio.run(main(parser.parse_args()))
