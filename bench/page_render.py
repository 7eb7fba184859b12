"""How long the chat page takes to render, in headless Chromium.

Two figures, each the median of several runs on a fresh page:

- history: a welcome and then 1,000 chat lines of history arrive at once
  (what a newcomer gets from a server run with `--history 1000`);
- joins: a room of 1,000 members, then 1,000 join notices arrive at once
  (a crowded room's reconnect storm, as a server with `--crowd` above
  2,000 would send it).

The time runs from the arrival of the first of those frames to the end of
the first animation frame after the last one has been handled: once the
page's own once-a-frame work (trimming, day separators, scrolling) is done,
the page is laid out, and the browser has finished that frame (what it does
after the animation-frame callbacks: style and layout again if anything
changed, the rows that content-visibility shows as they come into view,
paint). A task posted from the last animation-frame callback runs only once
that frame's work is done: its start is the end of the time. So it includes
up to one frame (16 ms) of waiting for the browser's frame clock. (Before
the rows away from the view were left out of layout, the time ended in
the callback, before paint: see README, "The page's rendering".) The frames come from a small real
`websockets` server in this process; the page is public/ (or --public DIR)
served over http, as `python -m http.server -d public` does.

    python bench/page_render.py [--runs 7] [--public DIR]

Needs Debian's chromium (or $CHROMIUM) and the playwright package. Prints
figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

from playwright.sync_api import sync_playwright
from websockets.asyncio.server import serve

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]
ROWS = 1000
RUNS = 7

# Installed before the page's own script: notes when the frames under test
# start to arrive, and when the page has dealt with the last of them.
TIMER = """
window.__bench = { start: 0, end: 0, seen: 0, from: FROM, expect: EXPECT, replay: REPLAY };
const RealSocket = window.WebSocket;
const finish = (bench) => setTimeout(() => requestAnimationFrame(() => {
  document.documentElement.getBoundingClientRect();  // laid out
  const done = new MessageChannel();  // runs once this frame is painted
  done.port1.onmessage = () => { bench.end = performance.now(); };
  done.port2.postMessage(null);
}));
window.WebSocket = function (...args) {
  const socket = new RealSocket(...args);
  const pageListeners = [];
  const held = [];
  socket.addEventListener('message', (event) => {
    const bench = window.__bench;
    bench.seen += 1;
    const timed = bench.seen >= bench.from;
    if (timed && bench.replay) {  // hold them back, then hand them over in one go
      event.stopImmediatePropagation();
      held.push(event.data);
      if (held.length === bench.expect) {
        bench.start = performance.now();
        for (const data of held) for (const listener of pageListeners) listener({ data });
        finish(bench);
      }
      return;
    }
    if (bench.seen === bench.from) bench.start = performance.now();
    if (bench.seen === bench.from + bench.expect - 1) finish(bench);
  });
  const add = socket.addEventListener.bind(socket);
  socket.addEventListener = (type, listener, ...rest) => {
    if (type === 'message') pageListeners.push(listener);
    return add(type, listener, ...rest);
  };
  return socket;
};
window.WebSocket.prototype = RealSocket.prototype;
Object.assign(window.WebSocket, { OPEN: 1, CLOSED: 3, CONNECTING: 0, CLOSING: 2 });
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def sys_frame(event: str, message: str, **fields) -> str:
    return json.dumps({"type": "sys", "event": event, "room": "lobby", "ts": now_ms(),
                       "message": message, **fields})


def history_frames() -> list[str]:
    ts = now_ms() - ROWS * 1000
    frames = [sys_frame("welcome", "Welcome to lobby, reader!", name="reader",
                        online=["reader", "writer"], seq=ROWS, epoch="e", key="k")]
    for seq in range(1, ROWS + 1):
        sender = ("ann", "bob", "cy")[seq % 7 % 3]  # some runs of one sender, some not
        frames.append(json.dumps({
            "type": "user", "room": "lobby", "id": sender, "seq": seq, "ts": ts + seq * 1000,
            "message": f"line {seq}: see https://example.org/{seq} and more words here"}))
    return frames


def join_frames() -> tuple[list[str], list[str]]:
    online = ["reader", *(f"member{n:04}" for n in range(ROWS))]
    welcome = [sys_frame("welcome", "Welcome to lobby, reader!", name="reader",
                         online=online, seq=0, epoch="e", key="k")]
    joins = [sys_frame("join", f"new{n:04} has joined", name=f"new{n:04}",
                       count=len(online) + n + 1) for n in range(ROWS)]
    return welcome, joins


def burst(ws, frames: list[str]) -> None:
    """Write every frame at once, as a server's batched write does, so that
    the page, not this server, sets the pace."""
    for frame in frames:
        ws.protocol.send_text(frame.encode())
    ws.send_data()


class Server:
    """Sends each connection `first`, waits for the page to settle, then `then`."""

    def __init__(self) -> None:
        self.first: list[str] = []
        self.then: list[str] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self.run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def run(self, ready: threading.Event) -> None:
        async def one(ws) -> None:
            burst(ws, self.first)
            if self.then:
                await asyncio.sleep(0.5)
                burst(ws, self.then)
            async for _ in ws:  # the page's quiet /who and the like
                pass

        async def main() -> None:
            async with serve(one, "127.0.0.1", 0, max_queue=None) as server:
                self.port = server.sockets[0].getsockname()[1]
                ready.set()
                await asyncio.Future()

        self.loop.run_until_complete(main())


def measure(browser, site: str, server: Server, first: list[str], then: list[str],
            replay: bool) -> float:
    server.first, server.then = first, then
    context = browser.new_context(viewport={"width": 1000, "height": 700})
    # The frames before the timed ones (the welcome), and how many are timed.
    before = len(first) if then else 1
    timed = len(then) if then else len(first) - 1
    context.add_init_script(TIMER.replace("FROM", str(before + 1)).replace("EXPECT", str(timed))
                            .replace("REPLAY", "true" if replay else "false"))
    page = context.new_page()
    query = urllib.parse.urlencode({"server": f"ws://127.0.0.1:{server.port}/", "name": "reader"})
    page.goto(f"{site}?{query}")
    try:
        page.wait_for_function("() => window.__bench.end > 0", timeout=120_000)
    except Exception:
        print("timed out:", page.evaluate("() => window.__bench"), file=sys.stderr)
        raise
    elapsed = page.evaluate("() => window.__bench.end - window.__bench.start")
    context.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--public", type=Path, default=ROOT / "public",
                        help="the page's files (default: public/)")
    args = parser.parse_args()

    static = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "-d", str(args.public), "--bind",
         "127.0.0.1", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    site = f"http://127.0.0.1:{static.stdout.readline().split('port ')[1].split()[0]}/"
    server = Server()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            history = history_frames()
            welcome, joins = join_frames()
            cases = {
                f"{ROWS:,} history rows": (history, []),
                f"{ROWS:,} joins, {ROWS:,} online": (welcome, joins),
            }
            for name, (first, then) in cases.items():
                for replay, how in ((True, "the page's work"), (False, "end to end")):
                    measure(browser, site, server, first, then, replay)  # warm up
                    times = [measure(browser, site, server, first, then, replay)
                             for _ in range(args.runs)]
                    print(f"{name}, {how}: median {statistics.median(times):.0f} ms "
                          f"(min {min(times):.0f}, max {max(times):.0f}, {args.runs} runs)",
                          flush=True)
            browser.close()
    finally:
        static.terminate()
        static.wait()


if __name__ == "__main__":
    main()
