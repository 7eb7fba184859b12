"""The page, round two (issue 14): each bug and feature as a story in real
headless Chromium, over real sockets on loopback.

Most stories run against chatserver.py itself. Where a story needs server
behaviour that is hard to provoke (a frame with `ts: 1e16`, a welcome then a
close with a chosen code, a socket that opens and then says nothing), a small
real `websockets` server in the test (`FakeServer`) or a raw TCP socket
(`SilentServer`) speaks just enough of the protocol. Nothing of the network
or the page is mocked; the only things faked in the page are a hidden tab
(`document.visibilityState` overridden, then a real visibilitychange event:
see HIDE_SCRIPT) and, for the day separators and the welcome timeout,
Playwright's clock.

The browser is Debian's chromium, launched as tests/test_browser.py does
(skipped without it, a failure under CI=true).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import shutil
import socket
import threading
import time
import urllib.parse
from datetime import datetime, timezone

import pytest
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from test_browser import (  # the same servers, browser and page helpers as the first stories
    PUBLIC, RECONNECT_MS, WAIT_MS, ChatPage, ChatServerProcess, Relay, StaticServer, page_url,
    sync_playwright, watch)
from test_browser import browser, chat_server, site  # noqa: F401  (fixtures)

if sync_playwright is not None:
    from playwright.sync_api import expect

# Lets a test hide and show the tab: `window.__setHidden(true)`. The
# override is of what the page reads (document.hidden, visibilityState);
# the event it gets is the browser's own kind.
HIDE_SCRIPT = """
window.__setHidden = (hidden) => {
  Object.defineProperty(document, 'hidden', { configurable: true, get: () => hidden });
  Object.defineProperty(document, 'visibilityState', {
    configurable: true, get: () => (hidden ? 'hidden' : 'visible') });
  document.dispatchEvent(new Event('visibilitychange'));
};
"""

# Records the notifications the page makes (they still go to the real
# Notification API, with the permission the context grants) and the times
# it asks for permission.
NOTIFY_SPY = """
window.__notes = [];
window.__asked = 0;
if (window.Notification) {
  const Real = window.Notification;
  const Spy = function (title, options) { window.__notes.push(title); return new Real(title, options); };
  Object.defineProperty(Spy, 'permission', { get: () => Real.permission });
  // Counted, not passed on: a real request's prompt may be answered by
  // headless Chromium at a time of its own, which can change the permission
  // under a later step of a test (once in a full run: no ask on a gesture).
  Spy.requestPermission = () => { window.__asked += 1; return Promise.resolve(Real.permission); };
  window.Notification = Spy;
}
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).replace(tzinfo=timezone.utc).timestamp() * 1000)


# Servers that speak just enough of the protocol -----------------------------


def welcome(name: str = "me", online: list[str] | None = None, seq: int = 0,
            epoch: str = "e1", ts: int | None = None) -> dict:
    return {"type": "sys", "event": "welcome", "room": "lobby", "ts": ts or now_ms(),
            "message": f"Welcome to lobby, {name}!", "name": name,
            "online": online or [name], "seq": seq, "epoch": epoch, "key": "k"}


def user(seq, sender: str, message: str, ts=None) -> dict:
    return {"type": "user", "room": "lobby", "id": sender, "message": message,
            "ts": now_ms() if ts is None else ts, "seq": seq}


class FakeServer:
    """A real websockets server on 127.0.0.1 whose every connection is
    `handler(ws, path)`; `paths` lists each connection's request path, in order."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.paths: list[str] = []
        self.received: list[str] = []  # every text frame the pages sent
        self.open: set = set()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def one(ws) -> None:
            self.paths.append(ws.request.path)
            self.open.add(ws)
            try:
                await self.handler(ws, ws.request.path)
            except ConnectionClosed:
                pass
            finally:
                self.open.discard(ws)

        async def main() -> None:
            self.stopping = asyncio.Event()
            async with serve(one, "127.0.0.1", 0) as server:
                self.port = server.sockets[0].getsockname()[1]
                ready.set()
                await self.stopping.wait()

        self.loop.run_until_complete(main())

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def count(self, prefix: str = "/") -> int:
        return sum(path.startswith(prefix) for path in self.paths)

    def send(self, *frames: dict) -> None:
        """Send frames to every open connection, in order."""
        async def send_all():
            for ws in list(self.open):
                for frame in frames:
                    await ws.send(json.dumps(frame))
        asyncio.run_coroutine_threadsafe(send_all(), self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(10)


async def read_all(ws, server: FakeServer) -> None:
    async for text in ws:
        server.received.append(text)


class SilentServer:
    """Accepts the WebSocket handshake, then says nothing and reads nothing:
    an open socket whose link is dead. Counts the connections."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            key = re.search(rb"Sec-WebSocket-Key: *(\S+)", request, re.I).group(1)
            accept = base64.b64encode(hashlib.sha1(
                key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self.connections.append(conn)  # kept open, never read

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            conn.close()


# The browser -----------------------------------------------------------------


@pytest.fixture
def open_page(browser):
    """Open the chat page in a fresh context (own storage), with HIDE_SCRIPT
    and NOTIFY_SPY; `clock_at` installs Playwright's clock at that time
    before the page loads. After the test: no page threw, showed an alert
    or broke its CSP."""
    contexts, troubles = [], []

    def open_(url: str, context=None, clock_at=None, init: str = "", **options) -> ChatPage:
        if context is None:
            options.setdefault("viewport", {"width": 1000, "height": 680})
            options.setdefault("locale", "en-US")
            context = browser.new_context(**options)
            context.add_init_script(HIDE_SCRIPT + NOTIFY_SPY + init)
            contexts.append(context)
        page = context.new_page()
        if clock_at is not None:
            page.clock.install(time=clock_at / 1000)  # seconds in Python
        watch(page, troubles)
        chat_page = ChatPage(page)
        chat_page.sent = []  # text frames the page sent
        page.on("websocket", lambda ws: ws.on(
            "framesent", lambda payload: chat_page.sent.append(payload)))
        page.goto(url)
        return chat_page

    yield open_
    for context in contexts:
        context.close()
    assert troubles == []


def lines_sent(page: ChatPage) -> list[str]:
    return [json.loads(frame)["line"] for frame in page.sent if isinstance(frame, str)]


def announced(page: ChatPage) -> list[str]:
    return page.page.locator("#announcer p").all_inner_texts()


def ws_client(server_url: str, room: str = "lobby", **params):
    from websockets.sync.client import connect
    query = urllib.parse.urlencode(params)
    # max_queue=None: a client that reads nothing still takes in every frame,
    # so that its closing handshake is read at once.
    return connect(f"{server_url}{room}?{query}", open_timeout=WAIT_MS / 1000,
                   max_queue=None, close_timeout=1)


def recv_until(client, predicate) -> dict:
    while True:
        frame = json.loads(client.recv(timeout=WAIT_MS / 1000))
        if predicate(frame):
            return frame


# Bugs 1-3: reconnecting -------------------------------------------------------


def test_a_server_that_welcomes_then_closes_is_redialled_with_a_growing_backoff(
        open_page, site):
    """Bug 1 (and 3's 1013): the backoff is reset only by a link that stays
    up, so a welcome-then-close loop is not redialled every 0.25-0.5 s."""
    async def handler(ws, path):
        await ws.send(json.dumps(welcome()))
        await ws.close(1013, "redis unreachable")

    server = FakeServer(handler)
    try:
        page = open_page(page_url(site, server=server.url, name="me"))
        expect(page.page.locator("#status-detail")).to_contain_text(
            "The server cannot let anyone in right now (redis unreachable)")
        page.page.wait_for_timeout(3000)
        # Retries after 0.25-0.5, 0.5-1, 1-2 s: at most 4 connections in 3 s
        # (with the backoff reset on each welcome, at least 7).
        assert 2 <= server.count() <= 4, server.paths
    finally:
        server.stop()


def test_close_codes_are_told_in_words_and_a_kick_or_a_takeover_is_not_redialled(
        open_page, site):
    """Bug 3: each room of this server closes with the code in its name."""
    async def handler(ws, path):
        code = int(path.strip("/").split("?")[0][1:])
        await ws.send(json.dumps(welcome()))
        reasons = {1008: "flooding", 4001: "kicked by the moderator",
                   4000: "replaced by a new connection", 1001: "server shutting down"}
        await ws.close(code, reasons[code])

    server = FakeServer(handler)
    try:
        pages = {code: open_page(page_url(site, server=server.url, room=f"c{code}", name="me"))
                 for code in (1008, 1001, 4001, 4000)}
        words = {
            1008: "The server closed the connection: you sent too much too fast. Reconnecting…",
            1001: "The server is restarting or shutting down (server shutting down). Reconnecting…",
            4001: "You were removed from the room (kicked by the moderator). "
                  "Reload the page to come back.",
            4000: "This chat was opened again elsewhere with your name; "
                  "reload the page to chat here.",
        }
        for code, page in pages.items():
            expect(page.page.locator("#messages > li.notice-error").first).to_have_text(
                re.compile(re.escape(words[code])))
            expect(page.status).to_have_attribute("data-state", "offline")
        for code in (1008, 1001):  # these may pass: tried again
            deadline = time.monotonic() + RECONNECT_MS / 1000
            while server.count(f"/c{code}") < 2 and time.monotonic() < deadline:
                pages[code].page.wait_for_timeout(100)
            assert server.count(f"/c{code}") >= 2
        pages[4001].page.wait_for_timeout(1500)  # a first retry would be within 0.5 s
        assert server.count("/c4001") == 1
        assert server.count("/c4000") == 1
        expect(pages[4001].page.locator("#retry")).to_be_hidden()
    finally:
        server.stop()


def test_a_line_too_big_for_the_server_is_refused_not_resent_in_a_loop(open_page, site):
    """Bug 3's 1009: the line the server could not take is marked refused,
    and the reconnect does not send it again (which would close again)."""
    async def handler(ws, path):
        await ws.send(json.dumps(welcome(name="me")))
        async for text in ws:
            server.received.append(text)
            await ws.close(1009, "message too big")  # whatever it was: a smaller --max-size

    server = FakeServer(handler)
    try:
        page = open_page(page_url(site, server=server.url, name="me"))
        page.wait_online()
        page.say("a paragraph the server finds too big")
        expect(page.refused.locator(".state")).to_have_text(
            ["Not sent: too big for the server; it was not sent"])
        expect(page.notice("A message was too big for the server")).to_have_count(1)
        page.wait_online(timeout=RECONNECT_MS)
        page.page.wait_for_timeout(500)
        assert len(server.received) == 1 and server.count() == 2
    finally:
        server.stop()


def test_a_socket_that_opens_and_then_says_nothing_is_dropped_at_once(open_page, site):
    """Bug 2: the welcome timeout drops the socket itself and schedules a
    retry, without waiting for a closing handshake that never comes.
    Playwright's clock skips the 10 s wait."""
    server = SilentServer()
    try:
        page = open_page(page_url(site, server=server.url, name="me"), clock_at=now_ms())
        deadline = time.monotonic() + WAIT_MS / 1000
        while not server.connections and time.monotonic() < deadline:
            page.page.wait_for_timeout(50)
        assert len(server.connections) == 1
        page.page.clock.fast_forward(10_500)
        expect(page.status).to_have_attribute("data-state", "offline")
        page.page.clock.fast_forward(1_000)  # past the first retry's 0.25-0.5 s
        deadline = time.monotonic() + WAIT_MS / 1000
        while len(server.connections) < 2 and time.monotonic() < deadline:
            page.page.wait_for_timeout(50)
        assert len(server.connections) == 2
    finally:
        server.close()


# Bug 4: length -------------------------------------------------------------------


def test_a_line_over_the_limit_is_refused_in_the_page_and_never_sent(
        open_page, site, chat_server):
    page = open_page(page_url(site, server=chat_server.url, name="alice"))
    page.wait_online()
    counter = page.page.locator("#counter")
    page.box.fill("y" * 1500)
    expect(counter).to_be_hidden()
    page.box.fill("y" * 1850)
    expect(counter).to_have_text("1,850 / 2,000")
    page.box.fill("y" * 2001)
    expect(counter).to_have_text("2,001 / 2,000: 1 too many")
    expect(counter).to_have_class(re.compile(r"\bover\b"))
    page.box.press("Enter")
    expect(page.refused.locator(".state")).to_have_text(
        ["Not sent: message too long (2001 characters; the limit is 2000); it was not sent"])
    page.refused.get_by_role("button", name="Discard").click()

    # A paste far over the 64 KiB frame limit: never sent, no 1009 close.
    page.page.evaluate("""() => { const box = document.getElementById('chat');
        box.value = '\\u{1F600}'.repeat(20000); box.dispatchEvent(new Event('input')); }""")
    page.box.press("Enter")
    expect(page.refused.locator(".state")).to_have_text(
        ["Not sent: message too long (20000 characters; the limit is 2000); it was not sent"])
    page.refused.get_by_role("button", name="Discard").click()
    page.say("short and fine")
    expect(page.chat_texts).to_have_text(["short and fine"])
    assert lines_sent(page) == ["short and fine"]
    assert len(page.sockets) == 1  # the socket was never closed for it


def test_the_limits_a_welcome_names_are_the_ones_checked(open_page, site):
    """A server run with --max-chars 10 that says so in its welcome (see the
    server change in README, The page): the page checks 10, not 2,000."""
    async def handler(ws, path):
        await ws.send(json.dumps({**welcome(name="me"), "max_chars": 10, "max_size": 4096}))
        await read_all(ws, server)

    server = FakeServer(handler)
    try:
        page = open_page(page_url(site, server=server.url, name="me"))
        page.wait_online()
        page.box.fill("x" * 9)
        expect(page.page.locator("#counter")).to_have_text("9 / 10")
        page.box.press("Enter")
        page.box.fill("x" * 11)
        page.box.press("Enter")
        expect(page.refused.locator(".state")).to_have_text(
            ["Not sent: message too long (11 characters; the limit is 10); it was not sent"])
        assert lines_sent(page) == ["x" * 9]
    finally:
        server.stop()


# Bug 5: reclaiming a name ------------------------------------------------------------


def test_a_name_is_not_reclaimed_between_the_leave_and_join_of_a_key_takeover(
        open_page, site, chat_server):
    holder = ws_client(chat_server.url, name="alice")
    key = json.loads(holder.recv(timeout=5))["key"]
    page = open_page(page_url(site, server=chat_server.url, name="alice"))
    page.wait_online()
    expect(page.me).to_have_text("alice-2")

    # alice comes back with her key: "alice has left", then "alice has joined".
    back = ws_client(chat_server.url, name="alice", key=key)
    expect(page.notice("alice has left")).to_have_count(1)
    expect(page.notice("alice has joined")).to_have_count(1)
    page.page.wait_for_timeout(2500)  # past the page's reclaim delay
    expect(page.me).to_have_text("alice-2")
    expect(page.notice("already taken")).to_have_count(0)
    assert "/nick alice" not in lines_sent(page)
    holder.close()

    back.close()  # now she really leaves: the name is taken back
    expect(page.me).to_have_text("alice")
    expect(page.notice("alice-2 is now known as alice")).to_have_count(1)


# Bugs 6 and 7, mentions, notifications, the unread marker, the title -----------


def test_a_hidden_tab_counts_marks_and_notifies_also_what_came_while_it_slept(
        open_page, site, chat_server):
    relay = Relay(chat_server.port)
    try:
        carol = open_page(page_url(site, server=relay.url, name="carol"),
                          permissions=["notifications"])
        dave = open_page(page_url(site, server=chat_server.url, name="dave"))
        carol.wait_online()
        dave.wait_online()
        dave.say("before you left")
        expect(carol.chat_texts).to_have_text(["before you left"])

        carol.page.evaluate("__setHidden(true)")
        dave.say("hello all")
        dave.say("carol: lunch?")
        expect(carol.chat_texts).to_have_count(3)
        expect(carol.page).to_have_title("(2) @1 #lobby · Chat")
        mention = carol.chat_lines.filter(has_text="lunch?")
        expect(mention).to_have_class(re.compile(r"\bmention\b"))
        expect(carol.chat_lines.filter(has_text="hello all")).not_to_have_class(
            re.compile(r"\bmention\b"))
        assert carol.page.evaluate("__notes") == ["dave mentioned you in #lobby"]
        marker = carol.page.locator("#messages > li.unread-marker")
        expect(marker).to_have_text("New since you left")
        expect(carol.page.locator("#messages > li.unread-marker + li .text")).to_have_text(
            "hello all")

        # The laptop sleeps; what comes meanwhile is caught up on the resume
        # (bug 6): counted, announced, notified like the rest.
        relay.cut()
        expect(carol.status).not_to_have_attribute("data-state", "online")
        dave.say("while you slept")
        dave.say("@Carol are you there")
        expect(dave.chat_texts).to_have_count(5)
        relay.restore()
        carol.wait_online(timeout=RECONNECT_MS)
        expect(carol.chat_texts).to_have_count(5)
        expect(carol.page).to_have_title("(4) @2 #lobby · Chat")
        spoken = announced(carol)
        assert "dave: while you slept" in spoken and "dave: @Carol are you there" in spoken
        assert carol.page.evaluate("__notes") == ["dave mentioned you in #lobby"] * 2

        # Back to the tab: the count goes, the marker stays where it was.
        carol.page.evaluate("__setHidden(false)")
        expect(carol.page).to_have_title("#lobby · Chat")
        expect(carol.page.locator("#messages > li.unread-marker + li .text")).to_have_text(
            "hello all")

        # With the setting off, a mention while hidden is highlighted, not notified.
        carol.page.locator("#menu summary").click()
        carol.page.get_by_label("Notify me when I am mentioned").uncheck()
        carol.page.evaluate("__setHidden(true)")
        dave.say("carol again")
        expect(carol.page).to_have_title("(1) @1 #lobby · Chat")
        expect(carol.page.locator("#messages > li.unread-marker + li .text")).to_have_text(
            "carol again")
        assert len(carol.page.evaluate("__notes")) == 2
    finally:
        relay.close()


def test_you_are_decided_by_session_not_by_name(open_page, site, chat_server):
    """Bug 7: an earlier alice is not you; your lines from before a /nick
    still are, also after a reload."""
    earlier = ws_client(chat_server.url, name="alice")
    earlier.send("from the earlier alice")
    recv_until(earlier, lambda f: f.get("type") == "user")
    earlier.close()

    page = open_page(page_url(site, server=chat_server.url, name="alice"))
    page.wait_online()
    expect(page.me).to_have_text("alice")
    page.say("mine, as alice")
    page.say("/nick alicia")
    expect(page.me).to_have_text("alicia")
    page.say("mine, as alicia")
    expect(page.sending).to_have_count(0)
    own = page.page.locator("#messages > li.msg.own .text")
    expect(own).to_have_text(["mine, as alice", "mine, as alicia"])

    page.page.reload()
    page.wait_online()
    expect(page.chat_texts).to_have_text(
        ["from the earlier alice", "mine, as alice", "mine, as alicia"])
    expect(own).to_have_text(["mine, as alice", "mine, as alicia"])
    later = ws_client(chat_server.url, name="alicia-not")
    later.send("/nick alice")
    later.send("a new alice")
    expect(page.chat_texts.last).to_have_text("a new alice")
    expect(own).to_have_text(["mine, as alice", "mine, as alicia"])
    later.close()


# Bug 8: absurd frames -----------------------------------------------------------------


def test_a_frame_with_an_absurd_field_is_ignored_whole(open_page, site):
    async def handler(ws, path):
        await ws.send(json.dumps(welcome(name="me", online=["me"])))
        bad = [
            user(1, "eve", "ts past the year 275760", ts=1e16),
            user("1", "eve", "seq as text"),
            user(1.5, "eve", "seq not whole"),
            {**user(1, "eve", "id not text"), "id": 5},
            {**user(1, "eve", "action not a flag"), "action": "yes"},
            {**user(1, "eve", "message not text"), "message": ["x"]},
            {"type": "sys", "event": "join", "name": "eve", "count": -1, "message": "eve has joined",
             "ts": now_ms()},
            {"type": "sys", "event": "presence", "joined": "eve", "count": 2,
             "message": "eve joined", "ts": now_ms()},
            {"type": "sys", "event": "who", "online": ["me", 7], "count": 2,
             "message": "2 online", "ts": now_ms()},
            [1, 2, 3], "just text", None,
        ]
        for frame in bad:
            await ws.send(json.dumps(frame))
        await ws.send(json.dumps(user(1, "zed", "the good line")))
        await ws.send(json.dumps({"type": "sys", "event": "join", "name": "zed", "count": 2,
                                  "message": "zed has joined", "ts": now_ms()}))
        await read_all(ws, server)

    server = FakeServer(handler)
    try:
        page = open_page(page_url(site, server=server.url, name="me"))
        page.wait_online()
        expect(page.notice("zed has joined")).to_have_count(1)
        expect(page.chat_texts).to_have_text(["the good line"])
        expect(page.online).to_have_text(["me", "zed"])
        expect(page.online_count).to_have_text("2")
        expect(page.notices.filter(has_text="eve")).to_have_count(0)
        # The open_page fixture fails the test if the page threw.
    finally:
        server.stop()


# Bug 9: trimming while reading ------------------------------------------------------------


def test_trimming_old_rows_keeps_the_readers_place_and_every_sender_line(open_page, site):
    server = ChatServerProcess("--history", "1000", "--history-bytes", "100000000",
                               "--rate", "100000", "--burst", "100000")
    try:
        writer = ws_client(server.url, name="w")
        for n in range(1000):
            writer.send(f"line {n}")
        recv_until(writer, lambda f: f.get("message") == "line 999")
        page = open_page(page_url(site, server=server.url, name="reader"))
        page.wait_online()
        expect(page.chat_texts.last).to_have_text("line 999")
        expect(page.chat_lines.first).not_to_have_class(re.compile(r"\bcontinued\b"))

        # Scroll up to read line 500 and note where it is.
        where = """() => { const row = [...document.querySelectorAll('#messages > li.msg')]
                       .find((r) => r.querySelector('.text').textContent === 'line 500');
                     return row.getBoundingClientRect().top; }"""
        page.page.evaluate("""() => { const list = document.getElementById('messages');
            const row = [...list.children].find((r) => r.textContent.includes('line 500'));
            list.scrollTop = row.offsetTop - list.offsetTop - 40; }""")
        page.page.wait_for_timeout(200)
        before = page.page.evaluate(where)
        for n in range(1000, 1030):
            writer.send(f"line {n}")
        expect(page.chat_texts.last).to_have_text("line 1029")
        expect(page.chat_texts.first).not_to_have_text("line 0")  # trimmed
        page.page.wait_for_timeout(200)
        after = page.page.evaluate(where)
        # Within 3 px: a row is about 20 px, and 30 rows gone without the
        # page's correction move it by hundreds. A correction may be off by
        # a pixel or so, as rows sit at fractions of one (1.5 once, in CI).
        assert abs(after - before) <= 3, (before, after)
        first = page.chat_lines.first
        expect(first).not_to_have_class(re.compile(r"\bcontinued\b"))
        expect(first.locator(".sender")).to_be_visible()
        expect(page.page.locator("#jump")).to_be_visible()
        writer.close()
    finally:
        server.kill()


# Bug 14: rendering a thousand rows ----------------------------------------------------------

# Every message row in the list's view: its seq, and whether the browser has
# laid it out and painted its inside (a row away from the view is not, under
# content-visibility, until it comes near: a frame or two after a scroll).
ROWS_IN_VIEW = """() => {
  const list = document.getElementById('messages');
  const box = list.getBoundingClientRect();
  const rows = [];
  for (const row of list.querySelectorAll(':scope > li.msg')) {
    const r = row.getBoundingClientRect();
    if (r.bottom <= box.top || r.top >= box.bottom) continue;
    rows.push([row.dataset.seq,
               row.querySelector('.text').checkVisibility({ contentVisibilityAuto: true })]);
  }
  return { rows, top: list.scrollTop, height: list.clientHeight,
           gap: list.scrollHeight - list.scrollTop - list.clientHeight,
           below: list.lastElementChild.getBoundingClientRect().bottom - box.bottom };
}"""
ALL_SHOWN = f"() => ({ROWS_IN_VIEW})().rows.every(([seq, shown]) => shown)"


def test_a_long_history_opens_at_its_end_and_scrolls_up_to_every_row(open_page, site):
    # 1,000 rows at once, of different heights (every tenth line wraps over
    # several lines), in a room of 1,000. The page lays out only the rows
    # near the view (content-visibility): the view must still open exactly
    # at the end, scrolling up must show every row laid out, and a
    # moderator's button beside an old bubble must not be clipped.
    rows = 1000
    crowd = [f"member{n:04}" for n in range(rows)]

    def line(seq: int) -> str:
        if seq % 10 == 0:
            return f"line {seq}\n" + "a long line that wraps " * 15 + "\nits end"
        return f"line {seq}"

    async def handler(ws, path):
        start = now_ms() - rows * 1000
        await ws.send(json.dumps({**welcome(name="me", online=["me", *crowd], seq=rows),
                                  "mod": True}))
        for seq in range(1, rows + 1):
            await ws.send(json.dumps(user(seq, ("ann", "bob")[seq % 3 == 0], line(seq),
                                          start + seq * 1000)))
        await read_all(ws, server)

    server = FakeServer(handler)
    try:
        page = open_page(page_url(site, server=server.url, name="me"))
        page.wait_online()
        expect(page.chat_texts.last).to_contain_text("line 1000")
        expect(page.chat_lines).to_have_count(rows)

        # At the end, exactly: the last row shows whole, nothing below it.
        page.page.wait_for_function(ALL_SHOWN)
        view = page.page.evaluate(ROWS_IN_VIEW)
        assert view["gap"] <= 1 and view["below"] <= 0, view
        assert view["rows"][-1] == [str(rows), True], view["rows"][-3:]

        # Up to the top, a little less than a screenful at a time: every row
        # passes through the view, and is laid out and painted there. (Rows
        # above the view take their real height as they come: the view must
        # not jump past any.)
        seen: set[str] = set()
        for _ in range(2000):
            page.page.wait_for_function(ALL_SHOWN)
            view = page.page.evaluate(ROWS_IN_VIEW)
            seen.update(seq for seq, _ in view["rows"])
            if view["top"] == 0:
                break
            page.page.evaluate(
                "(by) => { document.getElementById('messages').scrollTop -= by; }",
                int(view["height"] * 0.8))
        assert seen == {str(seq) for seq in range(1, rows + 1)}

        # The oldest row's moderator button shows beside its bubble, where
        # a click reaches it.
        first = page.chat_lines.first
        first.hover()
        button = first.locator(".mod-button")
        expect(button).to_have_css("opacity", "1")
        assert button.evaluate("""(button) => { const r = button.getBoundingClientRect();
            return document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2) === button; }""")

        # The last of a crowd of names shows when the list is scrolled to it.
        page.page.evaluate("const people = document.querySelector('.people');"
                           "people.scrollTop = people.scrollHeight")
        page.page.wait_for_function("""() => {
            const item = [...document.querySelectorAll('#online .person')].at(-1);
            const r = item.getBoundingClientRect();
            const hit = document.elementFromPoint(r.x + 20, r.y + r.height / 2);
            return item.dataset.name === 'member0999' && r.bottom <= innerHeight
              && item.querySelector('.sender').checkVisibility({ contentVisibilityAuto: true })
              && item.contains(hit); }""")
    finally:
        server.stop()


# Bug 10: link text, bug 11: input methods -------------------------------------------------


def test_links_show_the_host_they_open_and_no_hidden_characters(open_page, site, chat_server):
    page = open_page(page_url(site, server=chat_server.url, name="linker"))
    page.wait_online()
    page.say("see https://\u0430pple.com/login and https://exa\u200bmple.org/a\u202eb "
             "and https://apple.com@evil.example/x")
    links = page.page.locator("#messages li.msg a")
    expect(links).to_have_text(["https://xn--pple-43d.com/login", "https://example.org/ab",
                                "https://evil.example/x"])
    expect(links.nth(0)).to_have_attribute("href", "https://xn--pple-43d.com/login")
    expect(links.nth(2)).to_have_attribute("href", "https://evil.example/x")


def test_the_enter_that_confirms_an_input_method_does_not_send(open_page, site, chat_server):
    page = open_page(page_url(site, server=chat_server.url, name="ime"))
    page.wait_online()
    page.box.fill("にほんご")
    # Safari: isComposing false on the confirming Enter, but keyCode 229.
    page.box.evaluate("""(box) => box.dispatchEvent(new KeyboardEvent('keydown',
        { key: 'Enter', keyCode: 229, bubbles: true, cancelable: true }))""")
    page.page.wait_for_timeout(300)
    expect(page.box).to_have_value("にほんご")
    expect(page.chat_lines).to_have_count(0)
    page.box.press("Enter")
    expect(page.chat_texts).to_have_text(["にほんご"])


# Bug 12: ?server= against the meta tag -----------------------------------------------------


def test_a_server_link_to_another_host_is_asked_for_when_the_page_has_a_meta_tag(
        open_page, chat_server, tmp_path):
    copy = tmp_path / "cdn"
    shutil.copytree(PUBLIC, copy)
    index = copy / "index.html"
    html = index.read_text()
    index.write_text(html.replace('<meta name="chat-server" content="">',
                                  f'<meta name="chat-server" content="{chat_server.url}">'))
    crafted = f"ws://localhost:{chat_server.port}/"

    stay = open_page(page_url(index.as_uri(), server=crafted, name="victim"))
    prompt = stay.page.locator("#server-prompt")
    expect(prompt).to_be_visible()
    expect(prompt).to_contain_text("connect to localhost instead of its own server, 127.0.0.1")
    stay.page.wait_for_timeout(300)
    assert stay.sockets == []  # nothing is dialled before the answer
    stay.page.get_by_role("button", name="Stay on 127.0.0.1").click()
    stay.wait_online()
    assert len(stay.sockets) == 1 and stay.sockets[0].startswith(f"{chat_server.url}lobby?")

    go = open_page(page_url(index.as_uri(), server=crafted, name="willing"))
    go.page.get_by_role("button", name="Connect to localhost").click()
    expect(go.page.locator("#server-prompt")).to_be_hidden()
    deadline = time.monotonic() + WAIT_MS / 1000
    while not go.sockets and time.monotonic() < deadline:
        go.page.wait_for_timeout(50)
    assert go.sockets[0].startswith(crafted)

    # The same host (another port) is not asked for; nor is a path on the
    # page's own host, served over http, with a ?server= on that host.
    index.write_text(html.replace('<meta name="chat-server" content="">',
                                  '<meta name="chat-server" content="/socket/">'))
    static = StaticServer(copy)
    try:
        proxied = open_page(page_url(static.url, server=chat_server.url, room="p"))
        proxied.wait_online()
        assert proxied.sockets[0].startswith(f"{chat_server.url}p?")
    finally:
        static.stop()


# Bug 13: accessibility ---------------------------------------------------------------------

CONTRAST = """(backgrounds) => {
  const rgb = (color) => { const probe = document.createElement('i'); probe.style.color = color;
    document.body.append(probe); const [r, g, b] = getComputedStyle(probe).color.match(/\\d+/g)
    .map(Number); probe.remove(); return [r, g, b]; };
  const lum = (c) => { const [r, g, b] = c.map((v) => { v /= 255;
    return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const ratio = (a, b) => { const [x, y] = [lum(rgb(a)), lum(rgb(b))].sort((p, q) => q - p);
    return (x + 0.05) / (y + 0.05); };
  const root = getComputedStyle(document.documentElement);
  const v = (name) => root.getPropertyValue(name).trim();
  const low = [];
  const fg = [...Array(8).keys()].map((i) => `--hue-${i}`).concat(['--link']);
  for (const f of fg) for (const b of backgrounds) {
    const r = ratio(v(f), v(b)); if (r < 4.5) low.push(`${f} on ${b}: ${r.toFixed(2)}`); }
  return low;
}"""


def test_colours_reach_4_5_to_1_and_the_box_grows_without_field_sizing(open_page, site):
    # Firefox has no field-sizing: the page must grow the box itself.
    no_field_sizing = """const supports = CSS.supports.bind(CSS);
      CSS.supports = (...args) => !String(args[0]).includes('field-sizing') && supports(...args);"""
    page = open_page(page_url(site, server="ws://127.0.0.1:9/", name="a11y"), init=no_field_sizing)
    page.page.evaluate("document.getElementById('chat').style.setProperty('field-sizing', 'fixed')")
    for scheme in ("light", "dark"):
        page.page.emulate_media(color_scheme=scheme)
        low = page.page.evaluate(CONTRAST, ["--other-bg", "--own-bg", "--bg", "--panel",
                                            "--mention-bg"])
        assert low == [], (scheme, low)
    height = page.box.evaluate("(box) => box.offsetHeight")
    page.box.fill("one\ntwo\nthree\nfour")
    page.box.press("End")  # an input event, as typing gives
    page.box.press_sequentially("!")
    assert page.box.evaluate("(box) => box.offsetHeight") > height + 30


def test_status_retries_presence_and_the_new_messages_button_stay_quiet(
        open_page, site, chat_server):
    # A status retry: only the state word is live, not the countdown.
    lost = open_page(page_url(site, server="ws://127.0.0.1:9/", name="x"))
    expect(lost.page.locator("#status-detail")).to_contain_text("trying again in")
    live = lost.page.locator("#status [role=status], #status[role=status], #status [aria-live]")
    expect(live).to_have_count(1)
    expect(live).to_have_text("Offline")
    expect(lost.page.locator("#status-detail")).not_to_have_attribute("aria-live", re.compile("."))

    page = open_page(page_url(site, server=chat_server.url, name="reader"),
                     viewport={"width": 1000, "height": 400})
    page.wait_online()
    talker = ws_client(chat_server.url, name="talker")
    for n in range(15):  # within the default burst (20)
        talker.send(f"filler {n}")
    expect(page.chat_texts.last).to_have_text("filler 14")
    page.page.evaluate("document.getElementById('messages').scrollTop = 0")
    page.page.wait_for_timeout(2200)  # talker's join has been read out by now

    # Presence notices alone: no "New messages" button, and read out together.
    guests = [ws_client(chat_server.url, name=f"guest{n}") for n in range(3)]
    expect(page.notice("guest2 has joined")).to_have_count(1)
    expect(page.page.locator("#jump")).to_be_hidden()
    page.page.wait_for_timeout(2500)
    spoken = [line for line in announced(page) if "guest" in line]
    assert spoken == ["guest0, guest1, guest2 joined"], spoken
    talker.send("a real message")
    expect(page.page.locator("#jump")).to_be_visible()
    for client in [*guests, talker]:
        client.close()


# Features ------------------------------------------------------------------------------------


def test_days_are_separated_and_today_stays_true_after_midnight(open_page, site):
    async def handler(ws, path):
        await ws.send(json.dumps(welcome(name="me", ts=ms("2026-11-27T23:59:00"))))
        await ws.send(json.dumps(user(1, "ann", "late on the 26th", ms("2026-11-26T23:50:00"))))
        await ws.send(json.dumps(user(2, "ann", "early on the 27th", ms("2026-11-27T00:10:00"))))
        await read_all(ws, server)

    server = FakeServer(handler)
    try:
        page = open_page(page_url(site, server=server.url, name="me"), timezone_id="UTC",
                         clock_at=ms("2026-11-27T23:59:00"))
        page.wait_online()
        days = page.page.locator("#messages > li.day")
        times = page.page.locator("#messages > li.msg time")
        expect(days).to_have_text(["Yesterday", "Today"])
        expect(times).to_have_text(["Nov 26 11:50 PM", "12:10 AM"])
        expect(page.page.locator("#messages > li.day + li.msg .text")).to_have_text(
            ["late on the 26th", "early on the 27th"])

        page.page.clock.fast_forward("02:00")  # 00:01 on the 28th
        expect(days).to_have_text(["Thursday, November 26, 2026", "Yesterday"])
        expect(times).to_have_text(["Nov 26 11:50 PM", "Nov 27 12:10 AM"])
        server.send(user(3, "ann", "just after midnight", ms("2026-11-28T00:01:00")))
        expect(days).to_have_text(["Thursday, November 26, 2026", "Yesterday", "Today"])
        expect(times.last).to_have_text("12:01 AM")
    finally:
        server.stop()


def test_a_days_separator_goes_with_its_last_message_when_deleted(open_page, site):
    async def handler(ws, path):
        await ws.send(json.dumps(welcome(name="me", ts=ms("2026-11-27T12:00:00"))))
        await ws.send(json.dumps(user(1, "ann", "on the 26th", ms("2026-11-26T10:00:00"))))
        await ws.send(json.dumps(user(2, "bob", "on the 27th", ms("2026-11-27T10:00:00"))))
        await read_all(ws, server)

    server = FakeServer(handler)
    try:
        page = open_page(page_url(site, server=server.url, name="me"), timezone_id="UTC",
                         clock_at=ms("2026-11-27T12:00:00"))
        page.wait_online()
        days = page.page.locator("#messages > li.day")
        expect(days).to_have_text(["Yesterday", "Today"])
        server.send({"type": "sys", "event": "delete", "room": "lobby", "seq": 1, "by": "mod",
                     "message": "mod deleted a message", "ts": ms("2026-11-27T12:00:01")})
        expect(page.notice("mod deleted a message")).to_have_count(1)
        expect(page.chat_texts).to_have_text(["on the 27th"])
        expect(days).to_have_text(["Today"])
    finally:
        server.stop()


def test_old_rows_leave_at_the_end_with_their_days_separator_and_the_first_shows_its_sender(
        open_page, site):
    # 1,000 lines of history, the first two a day before the rest: the page
    # keeps 1,000 rows, a day's separator at the top aside. The separator
    # stays above what is left of its day and goes with its last line; the
    # line then first shows its sender, though it continued a block. (At the
    # end, the oldest rows leave in the task that brought new ones, not in
    # the next frame: trimSoon in app.js.)
    rows = 1000
    today = ms("2026-11-27T10:00:00")

    async def handler(ws, path):
        await ws.send(json.dumps(welcome(name="me", seq=rows, ts=ms("2026-11-27T12:00:00"))))
        for seq in (1, 2):
            await ws.send(json.dumps(user(seq, "ann", f"line {seq}", ms("2026-11-26T10:00:00"))))
        for seq in range(3, rows + 1):  # 3 and 4 from one sender, a second apart: one block
            sender = "cy" if seq in (3, 4) else ("ann", "bob")[seq % 2]
            await ws.send(json.dumps(user(seq, sender, f"line {seq}", today + seq * 1000)))
        await read_all(ws, server)

    def more(*seqs: int) -> None:
        server.send(*(user(seq, "bob", f"line {seq}", today + seq * 1000) for seq in seqs))
        expect(page.chat_texts.last).to_have_text(f"line {seqs[-1]}")

    server = FakeServer(handler)
    try:
        page = open_page(page_url(site, server=server.url, name="me"), timezone_id="UTC",
                         clock_at=ms("2026-11-27T12:00:00"))
        page.wait_online()
        expect(page.chat_texts.last).to_have_text(f"line {rows}")
        days = page.page.locator("#messages > li.day")
        first_row = "document.getElementById('messages').firstElementChild.className"
        # The welcome and line 1 went; line 2 keeps its day's separator.
        expect(days).to_have_text(["Yesterday", "Today"])
        expect(page.chat_texts.first).to_have_text("line 2")
        expect(page.chat_lines).to_have_count(rows - 1)
        assert page.page.evaluate(first_row) == "day"

        more(rows + 1)  # line 2 goes, and "Yesterday" with it
        expect(days).to_have_text(["Today"])
        expect(page.chat_texts.first).to_have_text("line 3")
        expect(page.chat_lines).to_have_count(rows - 1)
        expect(page.chat_lines.nth(1)).to_have_class(re.compile(r"\bcontinued\b"))

        more(rows + 2, rows + 3)  # line 3 goes: line 4 now starts the list
        expect(page.chat_texts.first).to_have_text("line 4")
        expect(page.chat_lines).to_have_count(rows)
        expect(page.chat_lines.first).not_to_have_class(re.compile(r"\bcontinued\b"))
        expect(page.chat_lines.first.locator(".sender")).to_be_visible()
        expect(days).to_have_text(["Today"])
        assert page.page.evaluate(first_row) == "day"
    finally:
        server.stop()


def test_tab_completes_names_and_clicking_a_sender_mentions_them(open_page, site, chat_server):
    others = [ws_client(chat_server.url, name=name) for name in ("bob", "bobby", "carol")]
    page = open_page(page_url(site, server=chat_server.url, name="alice"))
    page.wait_online()
    expect(page.online).to_have_text(["alice", "bob", "bobby", "carol"])
    page.box.fill("ca")
    page.box.press("Tab")
    expect(page.box).to_have_value("carol: ")
    page.box.press_sequentially("ask @b")
    page.box.press("Tab")
    expect(page.box).to_have_value("carol: ask @bob ")
    page.box.press("Tab")  # again: the next name
    expect(page.box).to_have_value("carol: ask @bobby ")
    expect(page.box).to_be_focused()
    page.box.fill("")
    page.box.press("Tab")  # nothing to complete: Tab moves on
    expect(page.box).not_to_be_focused()

    others[2].send("hello alice")
    page.chat_lines.filter(has_text="hello alice").locator(".sender").click()
    expect(page.box).to_have_value("@carol ")
    expect(page.box).to_be_focused()
    for client in others:
        client.close()


def test_rooms_switch_without_a_reload_and_keep_their_drafts_and_settings(
        open_page, site, chat_server):
    page = open_page(page_url(site, server=chat_server.url, room="r1", name="alice"))
    page.wait_online()
    page.say("said in r1")
    guest = ws_client(chat_server.url, room="r1", name="guest")
    expect(page.notice("guest has joined")).to_be_visible()
    page.box.fill("half typed in r1")
    page.page.reload()
    page.wait_online()
    expect(page.box).to_have_value("half typed in r1")  # kept across a reload
    assert page.page.evaluate("__asked") == 0  # permission never asked on load
    assert page.page.evaluate("Notification.permission") == "default"

    # The join and leave toggle, kept across a reload.
    guest.close()
    expect(page.notice("guest has left")).to_be_visible()
    page.page.locator("#menu summary").click()
    page.page.get_by_label("Show joins and leaves").uncheck()
    expect(page.notice("guest has left")).to_have_count(1)
    expect(page.notice("guest has left")).to_be_hidden()
    page.page.reload()
    page.wait_online()
    expect(page.page.get_by_label("Show joins and leaves")).not_to_be_checked()
    guest = ws_client(chat_server.url, room="r1", name="guest")
    expect(page.notice("guest has joined")).to_have_count(1)
    expect(page.notice("guest has joined")).to_be_hidden()
    guest.close()

    page.page.evaluate("window.__sameDocument = true")
    page.page.locator("#menu summary").click()
    page.page.get_by_label("Open a room").fill("r2")
    page.page.get_by_label("Open a room").press("Enter")
    page.wait_online()
    expect(page.page.locator("#room-name")).to_have_text("r2")
    expect(page.box).to_have_value("")
    expect(page.chat_lines).to_have_count(0)
    assert page.sockets[-1].startswith(f"{chat_server.url}r2?")
    assert "room=r2" in page.page.url
    page.box.fill("draft for r2")

    page.page.locator("#menu summary").click()
    page.page.locator("#rooms").get_by_role("button", name="#r1").click()
    page.wait_online()
    expect(page.box).to_have_value("half typed in r1")
    expect(page.chat_texts).to_have_text(["said in r1"])
    expect(page.me).to_have_text("alice")
    page.page.locator("#menu summary").click()
    expect(page.page.locator("#rooms button")).to_have_text(["#r1", "#r2"])
    page.page.locator("#rooms").get_by_role("button", name="#r2").click()
    page.wait_online()
    expect(page.box).to_have_value("draft for r2")
    assert page.page.evaluate("window.__sameDocument") is True  # never reloaded

    page.say("first line in r2")  # the gesture that may ask for permission
    expect(page.chat_texts).to_have_text(["first line in r2"])
    assert page.page.evaluate("__asked") == 1
