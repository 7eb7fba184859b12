"""Whole stories in real headless Chromium: public/ against a real chatserver.py.

The browser is Debian's chromium (/usr/bin/chromium, or $CHROMIUM) driven by
the playwright package; Playwright's own browser downloads are never used.
The page is served by `python -m http.server` and also opened from file://.
Without chromium or playwright these tests are skipped, except under CI=true,
where they fail: a CI run that skipped them would prove nothing.

Every wait is on an event in the page (Playwright's `expect`), never a sleep.
A screenshot of a conversation is saved to tests/artifacts/conversation.png
(with -dark and -phone variants); UPDATE_SCREENSHOT=1 also refreshes the
README's docs/screenshot.png.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from pathlib import Path

import pytest

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # judged in the `browser` fixture: skip, or fail under CI
    sync_playwright = None

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = ROOT / "public"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WAIT_MS = 10_000       # for anything that should happen at once
RECONNECT_MS = 30_000  # a few rounds of backoff (0.5 s, 1 s, 2 s, ... with jitter)
PROCESS_TIMEOUT_S = 15


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


# Servers: chatserver.py, a static file server, and a relay we can cut -----


class ChatServerProcess:
    """chatserver.py as a user runs it, on 127.0.0.1; restartable on its port."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.port = 0  # any free port the first time, the same one after
        self.log = tempfile.TemporaryFile("w+")
        self.popen: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def start(self) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, str(ROOT / "chatserver.py"), "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "WARNING", *self.args],
            stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)
        first_line = self.popen.stdout.readline()
        found = re.search(r"ws://[^\s/]+:(\d+)/", first_line)
        if not found:
            self.kill()
            self.log.seek(0)
            raise AssertionError(f"chatserver did not start: {first_line!r} {self.log.read()}")
        self.port = int(found.group(1))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it with `sig` (SIGTERM: says goodbye; SIGKILL: just vanishes)."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(PROCESS_TIMEOUT_S)
            finally:
                self.kill()

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


class StaticServer:
    """`python -m http.server -d DIRECTORY` on 127.0.0.1 and a free port."""

    def __init__(self, directory: Path) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "-d", str(directory),
             "--bind", "127.0.0.1", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        first_line = self.popen.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N ..."
        found = re.search(r"port (\d+)", first_line)
        if not found:
            self.stop()
            raise AssertionError(f"http.server did not start: {first_line!r}")
        self.url = f"http://127.0.0.1:{found.group(1)}/"

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(PROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class Relay:
    """A TCP relay to a server port that can be cut and restored: a network
    drop for the pages behind it, while the server and other pages go on.
    It can also freeze a connection: a link that died without a word, both
    TCP ends still open (see freeze_after_next_line)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)  # so the accept loop sees `closed`
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.closed = False
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.upstreams: set[socket.socket] = set()  # the server's side of each relay
        self.hung: set[socket.socket] = set()  # left open, silent: see vanish()
        self.frozen: set[socket.socket] = set()  # nothing goes through these any more
        self.freeze_armed: threading.Event | None = None
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def accept_loop(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if not self.up:
                client.close()  # down: connections fail, as with no network
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets |= {client, upstream}
                self.upstreams.add(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(source, sink), daemon=True).start()

    def pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                last_words = source not in self.upstreams and is_text_frame(data) \
                    and self.freeze_if_armed(source, sink)
                if source in self.frozen and not last_words:
                    continue  # swallowed: the link is dead
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self.shut(source)
            self.shut(sink)

    def shut(self, sock: socket.socket) -> None:
        with self.lock:
            if sock in self.hung:
                return
            self.sockets.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def cut(self) -> None:
        """Drop every relayed connection and refuse new ones."""
        self.up = False
        with self.lock:
            sockets = list(self.sockets)
        for sock in sockets:
            self.shut(sock)

    def vanish(self) -> None:
        """Drop the pages' side of every relayed connection but leave the
        server's side open and silent, as a network that vanishes without a
        word does (Wi-Fi gone, laptop asleep): the server only finds out by
        ping, much later. New connections go through."""
        with self.lock:
            self.hung |= self.upstreams
            sockets = list(self.sockets - self.upstreams)
        for sock in sockets:
            self.shut(sock)

    def freeze_after_next_line(self) -> threading.Event:
        """The next text frame a page sends still reaches the server; then
        nothing more goes through that connection, either way, and both its
        TCP ends stay open: the server gets the line, the page never hears
        back. Other and new connections go on. Returns an event set then."""
        self.freeze_armed = threading.Event()
        return self.freeze_armed

    def freeze_if_armed(self, client: socket.socket, upstream: socket.socket) -> bool:
        with self.lock:
            frozen, self.freeze_armed = self.freeze_armed, None
            if frozen is None:
                return False
            self.frozen |= {client, upstream}  # before the line goes: its answer is lost
            self.hung |= {client, upstream}
        frozen.set()
        return True

    def refuse(self) -> None:
        """Refuse new connections (as with no network), leaving open ones be."""
        self.up = False

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.closed = True
        with self.lock:
            hung, self.hung = self.hung, set()
        for sock in hung:
            self.shut(sock)
        self.cut()
        self.thread.join(PROCESS_TIMEOUT_S)
        self.listener.close()


def is_text_frame(data: bytes) -> bool:
    """Whether `data` starts with a WebSocket text frame (a chat line from a
    page), not a pong or a closing frame."""
    return bool(data) and data[0] & 0x0F == 0x1


# The browser and the page --------------------------------------------------


class ChatPage:
    """One browser tab with the chat page, and what a user does and sees in it."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.box = page.get_by_role("textbox", name="Message")  # found by its label
        self.status = page.locator("#status")
        self.rows = page.locator("#messages > li")
        self.chat_lines = page.locator("#messages > li.msg")
        self.chat_texts = page.locator("#messages > li.msg:not(.action) .text")
        self.notices = page.locator("#messages > li.notice")
        self.sending = page.locator("#messages > li.msg.sending")  # typed, not yet acked
        self.refused = page.locator("#messages > li.msg.refused")
        self.online = page.locator("#online .sender")
        self.online_count = page.locator("#online-count")
        self.me = page.locator("#me")
        self.sockets: list[str] = []
        page.on("websocket", lambda ws: self.sockets.append(ws.url))

    def wait_online(self, timeout: float = WAIT_MS) -> None:
        expect(self.status).to_have_attribute("data-state", "online", timeout=timeout)

    def say(self, text: str) -> None:
        """Type a line and press Enter; it must leave the box (it was sent)."""
        self.box.fill(text)
        self.box.press("Enter")
        expect(self.box).to_have_value("")

    def notice(self, text: str):
        return self.notices.filter(has_text=text)


@pytest.fixture(scope="module")
def browser():
    problem = None
    if sync_playwright is None:
        problem = "the playwright package is missing: pip install -e '.[test]'"
    elif not Path(CHROMIUM).exists():
        problem = f"{CHROMIUM} is missing: apt-get install chromium (or set $CHROMIUM)"
    if problem:
        if in_ci():
            pytest.fail(f"browser tests cannot run under CI: {problem}", pytrace=False)
        pytest.skip(problem)
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception as exc:
        playwright.stop()
        if in_ci():
            pytest.fail(f"cannot start {CHROMIUM}: {exc}", pytrace=False)
        pytest.skip(f"cannot start {CHROMIUM}: {exc}")
    expect.set_options(timeout=WAIT_MS)
    yield browser
    browser.close()
    playwright.stop()


@pytest.fixture(scope="module")
def site():
    """public/ served over http, as `python -m http.server -d public` does."""
    server = StaticServer(PUBLIC)
    yield server.url
    server.stop()


@pytest.fixture
def chat_server():
    server = ChatServerProcess()
    yield server
    server.kill()


@pytest.fixture
def relay(chat_server):
    relay = Relay(chat_server.port)
    yield relay
    relay.close()


def watch(page, troubles: list[str]) -> None:
    """Note in `troubles` any dialog the page shows (then dismissed), any
    error it throws, and any breach of its Content-Security-Policy."""
    page.on("dialog", lambda dialog: (troubles.append(f"dialog: {dialog.message}"),
                                      dialog.dismiss()))
    page.on("pageerror", lambda exc: troubles.append(f"page error: {exc}"))
    page.on("console", lambda msg: troubles.append(f"console: {msg.text}")
            if "Content Security Policy" in msg.text else None)


@pytest.fixture
def open_page(browser):
    """Open the chat page in a fresh browser profile (own localStorage).

    After the test: no page showed a dialog, threw, or broke its CSP."""
    contexts, troubles = [], []

    def open_(url: str, width: int = 1000, height: int = 680, context=None) -> ChatPage:
        if context is None:
            context = browser.new_context(viewport={"width": width, "height": height})
            contexts.append(context)
        page = context.new_page()
        watch(page, troubles)
        chat_page = ChatPage(page)  # before goto: it counts the sockets opened
        page.goto(url)
        return chat_page

    yield open_
    for context in contexts:
        context.close()
    assert troubles == []


def page_url(base: str, **params: str) -> str:
    return base + ("?" + urllib.parse.urlencode(params) if params else "")


# The stories ---------------------------------------------------------------


def test_two_pages_chat_and_follow_joins_leaves_nick_changes_and_who_is_online(
        open_page, site, chat_server):
    alice = open_page(page_url(site, server=chat_server.url, name="alice"))
    alice.wait_online()
    expect(alice.me).to_have_text("alice")
    expect(alice.online).to_have_text(["alice"])

    bob = open_page(page_url(site, server=chat_server.url, name="bob"))
    bob.wait_online()
    expect(alice.notice("bob has joined")).to_have_count(1)
    expect(alice.online).to_have_text(["alice", "bob"])
    expect(alice.online_count).to_have_text("2")

    alice.say("hi bob")
    line = bob.chat_lines.filter(has_text="hi bob")
    expect(line.locator(".sender")).to_have_text("alice")
    expect(line.locator("time")).to_have_attribute("datetime", re.compile(r"^\d{4}-"))
    expect(line).not_to_have_class(re.compile(r"\bown\b"))
    expect(alice.chat_lines.filter(has_text="hi bob")).to_have_class(re.compile(r"\bown\b"))

    # A chat line that reads like a notice is still a chat line from bob.
    bob.say("alice has left")
    expect(alice.chat_texts.last).to_have_text("alice has left")
    expect(alice.notice("alice has left")).to_have_count(0)

    bob.say("/me waves")
    expect(alice.page.locator("#messages > li.msg.action")).to_have_text(
        re.compile(r"bob\s+waves"))

    # The name is changed in the page, through its dialog.
    bob.me.click()
    name_box = bob.page.get_by_label("New name")
    expect(name_box).to_be_focused()
    name_box.fill("robert")
    name_box.press("Enter")
    expect(bob.me).to_have_text("robert")
    expect(alice.notice("bob is now known as robert")).to_have_count(1)
    expect(alice.online).to_have_text(["alice", "robert"])
    bob.say("same person, new name")
    expect(alice.chat_lines.last.locator(".sender")).to_have_text("robert")

    bob.page.close()
    expect(alice.notice("robert has left")).to_have_count(1)
    expect(alice.online).to_have_text(["alice"])
    expect(alice.online_count).to_have_text("1")


def test_markup_arrives_as_literal_text_and_runs_nothing(open_page, site, chat_server):
    sender = open_page(page_url(site, server=chat_server.url, name="<i>eve</i>"))
    reader = open_page(page_url(site, server=chat_server.url, name="reader"))
    sender.wait_online()
    reader.wait_online()
    lines = ["<img src=x onerror=alert(1)>", "<script>alert(2)</script>",
             "<b>bold?</b> javascript:alert(3)"]
    for line in lines:
        sender.say(line)
    expect(reader.chat_texts).to_have_text(lines)
    expect(reader.chat_lines.first.locator(".sender")).to_have_text("<i>eve</i>")
    expect(reader.online).to_have_text(["<i>eve</i>", "reader"])
    for tag in ("img", "script", "b", "i", "a"):
        expect(reader.page.locator(f"#messages {tag}, #online {tag}")).to_have_count(0)
    # The open_page fixture fails the test if any dialog opened.


def test_urls_become_links_that_open_safely(open_page, site, chat_server):
    page = open_page(page_url(site, server=chat_server.url, name="linker"))
    page.wait_online()
    page.say("docs: https://example.org/a_(b)?q=1. and http://example.com, "
             "not javascript:alert(1) nor data:text/html,x")
    links = page.page.locator("#messages a")
    expect(links).to_have_count(2)
    expect(links.first).to_have_attribute("href", "https://example.org/a_(b)?q=1")
    expect(links.last).to_have_attribute("href", "http://example.com/")
    for i in range(2):
        expect(links.nth(i)).to_have_attribute("rel", "noopener noreferrer")


def test_page_reconnects_by_itself_after_a_server_restart(open_page, site, chat_server):
    page = open_page(page_url(site, server=chat_server.url, name="alice"))
    page.wait_online()
    page.say("before the restart")
    expect(page.chat_texts).to_have_text(["before the restart"])
    expect(page.sending).to_have_count(0)  # acked by the server, not only typed

    chat_server.restart(signal.SIGKILL)  # gone without a goodbye, back on the same port
    expect(page.status).not_to_have_attribute("data-state", "online")
    expect(page.notice("Disconnected")).to_have_count(1)
    page.wait_online(timeout=RECONNECT_MS)
    expect(page.notice("Reconnected")).to_have_count(1)
    # A new server numbers the room from 1 again: the page must not take the
    # new messages for ones it has already shown.
    expect(page.notice("started over")).to_have_count(1)

    page.say("after the restart")
    expect(page.chat_texts).to_have_text(["before the restart", "after the restart"])
    other = open_page(page_url(site, server=chat_server.url, name="bob"))
    other.wait_online()
    expect(other.chat_texts).to_have_text(["after the restart"])
    expect(page.online).to_have_text(["alice", "bob"])


def test_with_a_store_a_restart_shows_nothing_but_the_brief_reconnect(open_page, site,
                                                                      tmp_path):
    server = ChatServerProcess("--store", str(tmp_path / "chat.db"))
    try:
        page = open_page(page_url(site, server=server.url, name="alice"))
        page.wait_online()
        page.say("before the restart")
        expect(page.chat_texts).to_have_text(["before the restart"])
        expect(page.sending).to_have_count(0)  # acked: committed, not only typed

        server.restart(signal.SIGKILL)  # a crash: the store still has the room
        expect(page.status).not_to_have_attribute("data-state", "online")
        page.wait_online(timeout=RECONNECT_MS)
        page.say("after the restart")
        expect(page.chat_texts).to_have_text(["before the restart", "after the restart"])
        expect(page.notice("started over")).to_have_count(0)
        expect(page.notice("no longer kept")).to_have_count(0)
        other = open_page(page_url(site, server=server.url, name="bob"))
        other.wait_online()
        expect(other.chat_texts).to_have_text(["before the restart", "after the restart"])
    finally:
        server.kill()


def test_a_line_sent_into_a_dead_link_shows_sending_and_arrives_once(
        open_page, site, chat_server, relay):
    """The link dies just after the page sent a line: the server got it, but
    the page never hears back, though its socket looks open. After the ack
    timeout the page drops that socket, reconnects by itself and resends the
    line with the same cid, which the server does not post again."""
    carol = open_page(page_url(site, server=relay.url, name="carol"))
    dave = open_page(page_url(site, server=chat_server.url, name="dave"))
    carol.wait_online()
    dave.wait_online()

    frozen = relay.freeze_after_next_line()
    carol.say("through a dead link")
    assert frozen.wait(WAIT_MS / 1000)
    expect(carol.sending.locator(".text")).to_have_text(["through a dead link"])
    expect(carol.sending.locator(".state")).to_have_text(["Sending…"])
    expect(carol.page.locator("#announcer")).to_contain_text("Sending…")
    expect(dave.chat_texts).to_have_text(["through a dead link"])  # the server has it

    # Within the ack timeout (5 s) and a reconnect, not the server's pings (20 s).
    expect(carol.sending).to_have_count(0, timeout=WAIT_MS)
    carol.wait_online()
    assert len(carol.sockets) == 2
    expect(carol.chat_texts).to_have_text(["through a dead link"])
    expect(carol.me).to_have_text("carol")
    carol.say("and after it")  # answered after the resend: acks come in order
    expect(dave.chat_texts).to_have_text(["through a dead link", "and after it"])
    expect(carol.chat_texts).to_have_text(["through a dead link", "and after it"])


def test_lines_typed_offline_survive_a_reload_and_arrive_once_in_order(
        open_page, site, chat_server, relay):
    """A line goes into a link that dies (the server got it, the ack is
    lost); the page finds the link dead and cannot reconnect; three more
    lines are typed offline; the tab is reloaded; the network comes back.
    The reloaded page is the same session (its key was kept in the tab), so
    the first line is not posted twice, and the others go out in order."""
    carol = open_page(page_url(site, server=relay.url, name="carol"))
    dave = open_page(page_url(site, server=chat_server.url, name="dave"))
    carol.wait_online()
    dave.wait_online()

    frozen = relay.freeze_after_next_line()
    relay.refuse()
    carol.say("sent as the link died")
    assert frozen.wait(WAIT_MS / 1000)
    expect(dave.chat_texts).to_have_text(["sent as the link died"])
    expect(carol.status).to_have_attribute("data-state", "offline")  # after the ack timeout
    offline = ["offline one", "offline two", "offline three"]
    for line in offline:
        carol.say(line)
    lines = ["sent as the link died", *offline]
    expect(carol.sending.locator(".text")).to_have_text(lines)

    carol.page.reload()
    expect(carol.sending.locator(".text")).to_have_text(lines)
    expect(carol.sending.locator(".state")).to_have_text(["Sending…"] * 4)
    relay.restore()
    carol.wait_online(timeout=RECONNECT_MS)
    expect(carol.sending).to_have_count(0)
    expect(carol.chat_texts).to_have_text(lines)
    expect(carol.me).to_have_text("carol")
    carol.say("back")
    expect(dave.chat_texts).to_have_text([*lines, "back"])


def test_a_refused_line_shows_why_and_can_be_edited_or_discarded(open_page, site, chat_server):
    alice = open_page(page_url(site, server=chat_server.url, name="alice"))
    bob = open_page(page_url(site, server=chat_server.url, name="bob"))
    alice.wait_online()
    bob.wait_online()

    alice.say("x" * 2001)
    expect(alice.refused.locator(".text")).to_have_text(["x" * 2001])
    expect(alice.refused.locator(".state")).to_have_text(
        ["Not sent: message too long (2001 characters; the limit is 2000); it was not sent"])
    expect(alice.sending).to_have_count(0)
    alice.refused.get_by_role("button", name="Edit and resend").click()
    expect(alice.refused).to_have_count(0)
    expect(alice.box).to_have_value("x" * 2001)
    expect(alice.box).to_be_focused()
    alice.box.press("Backspace")
    alice.box.press("Enter")
    expect(bob.chat_texts).to_have_text(["x" * 2000])

    alice.say("/nick bob")
    expect(alice.refused.locator(".state")).to_have_text(
        ["Not sent: bob is already taken in lobby"])
    alice.page.reload()  # a refused line is kept with its reason until dealt with
    alice.wait_online()
    expect(alice.refused.locator(".text")).to_have_text(["/nick bob"])
    alice.refused.get_by_role("button", name="Discard").click()
    expect(alice.refused).to_have_count(0)
    alice.page.reload()
    alice.wait_online()
    expect(alice.chat_texts).to_have_text(["x" * 2000])
    expect(alice.refused).to_have_count(0)
    expect(alice.me).to_have_text("alice")
    expect(alice.notice("already taken")).to_have_count(0)  # told in its row, not twice


def test_history_shows_in_order_without_duplicates_after_a_reload(
        open_page, site, chat_server):
    page = open_page(page_url(site, server=chat_server.url, name="alice"))
    page.wait_online()
    lines = [f"line {n}" for n in range(1, 8)]
    for line in lines:
        page.say(line)
    expect(page.chat_texts).to_have_text(lines)

    page.page.reload()
    page.wait_online()
    expect(page.chat_texts).to_have_text(lines)
    seqs = [int(s) for s in page.chat_lines.evaluate_all("rows => rows.map(r => r.dataset.seq)")]
    assert seqs == sorted(set(seqs)) and len(seqs) == len(lines)
    page.say("after the reload")
    expect(page.chat_texts).to_have_text([*lines, "after the reload"])


def test_a_dropped_page_resumes_where_it_left_off(open_page, site, chat_server, relay):
    dropped = open_page(page_url(site, server=relay.url, name="carol"))
    talker = open_page(page_url(site, server=chat_server.url, name="dave"))
    dropped.wait_online()
    talker.wait_online()
    talker.say("m1")
    expect(dropped.chat_texts).to_have_text(["m1"])

    relay.cut()
    expect(dropped.status).not_to_have_attribute("data-state", "online")
    for text in ("m2", "m3"):
        talker.say(text)
    expect(talker.chat_texts).to_have_text(["m1", "m2", "m3"])
    relay.restore()

    dropped.wait_online(timeout=RECONNECT_MS)
    expect(dropped.chat_texts).to_have_text(["m1", "m2", "m3"])
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(dropped.sockets[-1]).query)
    assert query["since"] == ["1"] and query["epoch"][0] and query["name"] == ["carol"]
    talker.say("m4")
    expect(dropped.chat_texts).to_have_text(["m1", "m2", "m3", "m4"])


def test_a_page_back_from_a_silent_drop_keeps_its_name(open_page, site, chat_server, relay):
    """The server still holds the page's old connection when the page comes
    back: the welcome's key takes the name back, so carol is not carol-2."""
    dropped = open_page(page_url(site, server=relay.url, name="carol"))
    talker = open_page(page_url(site, server=chat_server.url, name="dave"))
    dropped.wait_online()
    talker.wait_online()
    expect(talker.online).to_have_text(["carol", "dave"])

    relay.vanish()
    expect(dropped.status).not_to_have_attribute("data-state", "online")
    dropped.wait_online(timeout=RECONNECT_MS)
    assert len(dropped.sockets) == 2
    expect(dropped.me).to_have_text("carol")
    expect(talker.notice("carol has left")).to_have_count(1)  # the old connection...
    expect(talker.notice("carol has joined")).to_have_count(1)  # ...and the new one
    expect(talker.online).to_have_text(["carol", "dave"])
    talker.say("still there?")
    expect(dropped.chat_texts).to_have_text(["still there?"])
    assert "key=" not in dropped.status.get_attribute("title")  # not shown to the user


def test_a_resume_past_the_kept_history_shows_the_gap(open_page, site):
    server = ChatServerProcess("--history", "2")
    relay = Relay(server.port)
    try:
        dropped = open_page(page_url(site, server=relay.url, name="carol"))
        talker = open_page(page_url(site, server=server.url, name="dave"))
        dropped.wait_online()
        talker.wait_online()
        talker.say("m1")
        expect(dropped.chat_texts).to_have_text(["m1"])

        relay.cut()
        expect(dropped.status).not_to_have_attribute("data-state", "online")
        for text in ("m2", "m3", "m4", "m5"):
            talker.say(text)
        expect(talker.chat_texts.last).to_have_text("m5")
        relay.restore()

        dropped.wait_online(timeout=RECONNECT_MS)
        expect(dropped.chat_texts).to_have_text(["m1", "m4", "m5"])
        gap = dropped.page.locator("#messages > li.notice-gap")
        expect(gap).to_have_count(1)
        expect(gap).to_contain_text("2 earlier messages")
    finally:
        relay.close()
        server.kill()


def test_a_crowded_room_keeps_the_online_list_and_count_right(open_page, site):
    """Past --crowd, joins and leaves come as presence notices naming at most
    20 people; the page mends its list with a quiet /who."""
    from websockets.sync.client import connect

    server = ChatServerProcess("--crowd", "1")
    try:
        page = open_page(page_url(site, server=server.url, name="host"))
        page.wait_online()
        names = [f"c{n:02}" for n in range(22)]
        with contextlib.ExitStack() as clients:
            for name in names:
                clients.enter_context(connect(f"{server.url}lobby?name={name}",
                                              open_timeout=WAIT_MS / 1000))
            expect(page.online_count).to_have_text("23")
            expect(page.notices.filter(has_text="joined")).not_to_have_count(0)
            # Mended by a quiet /who, asked after a delay with jitter.
            expect(page.online).to_have_text(sorted(["host", *names]), timeout=RECONNECT_MS)
        expect(page.online_count).to_have_text("1")
        expect(page.online).to_have_text(["host"], timeout=RECONNECT_MS)
        expect(page.notice("online:")).to_have_count(0)
    finally:
        server.kill()


def test_page_opened_from_disk_chats_with_a_page_served_over_http(
        open_page, site, chat_server):
    disk = open_page(page_url((PUBLIC / "index.html").as_uri(), server=chat_server.url,
                              room="disk.room", name="dora"))
    disk.wait_online()
    expect(disk.page.locator("#room-name")).to_have_text("disk.room")
    web = open_page(page_url(site, server=chat_server.url, room="disk.room", name="web"))
    web.wait_online()
    disk.say("hello from file://")
    expect(web.chat_texts).to_have_text(["hello from file://"])
    web.say("hello from http://")
    expect(disk.chat_texts).to_have_text(["hello from file://", "hello from http://"])


def test_meta_tag_points_a_cdn_copy_at_its_server_and_the_query_wins(
        open_page, chat_server, tmp_path):
    copy = tmp_path / "cdn"
    shutil.copytree(PUBLIC, copy)
    index = copy / "index.html"
    html = index.read_text()
    assert '<meta name="chat-server" content="">' in html
    index.write_text(html.replace('<meta name="chat-server" content="">',
                                  f'<meta name="chat-server" content="{chat_server.url}">'))
    page = open_page(page_url(index.as_uri(), name="meta"))
    page.wait_online()
    assert page.sockets[0].startswith(f"{chat_server.url}lobby?")

    index.write_text(html.replace('<meta name="chat-server" content="">',
                                  '<meta name="chat-server" content="ws://127.0.0.1:9/">'))
    page = open_page(page_url(index.as_uri(), server=chat_server.url, room="q"))
    page.wait_online()
    assert page.sockets[0].startswith(f"{chat_server.url}q")


def test_default_server_is_the_page_host_on_port_8765(open_page, site):
    page = open_page(page_url(site, room="r1"))
    expect(page.status).to_have_attribute("title", "Server: ws://127.0.0.1:8765/r1")


def test_name_is_remembered_for_the_next_visit(open_page, site, chat_server):
    page = open_page(page_url(site, server=chat_server.url, name="zed"))
    page.wait_online()
    page.say("/nick zedd")
    expect(page.me).to_have_text("zedd")
    again = open_page(page_url(site, server=chat_server.url), context=page.page.context)
    again.wait_online()
    expect(again.me).to_have_text(re.compile(r"^zedd(-\d+)?$"))
    stranger = open_page(page_url(site, server=chat_server.url))
    stranger.wait_online()
    expect(stranger.me).to_have_text(re.compile(r"^guest-"))


def test_a_suffixed_name_is_taken_back_once_it_is_free(open_page, site, chat_server):
    """With --broker a reconnect cannot use its key, and a page back before
    its old connection is found dead is erin-2: it becomes erin again when
    that connection's leave comes. Shown here with two pages."""
    first = open_page(page_url(site, server=chat_server.url, name="erin"))
    first.wait_online()
    second = open_page(page_url(site, server=chat_server.url, name="erin"))
    second.wait_online()
    expect(second.me).to_have_text("erin-2")
    first.page.close()
    expect(second.notice("erin has left")).to_have_count(1)
    expect(second.me).to_have_text("erin")
    expect(second.notice("erin-2 is now known as erin")).to_have_count(1)
    expect(second.online).to_have_text(["erin"])


def test_a_bad_room_name_is_explained_not_dialled(open_page, site):
    page = open_page(page_url(site, server="ws://127.0.0.1:9/", room="no/such room"))
    expect(page.status).to_have_attribute("data-state", "offline")
    expect(page.page.locator("#messages > li.notice-error")).to_contain_text("not a room name")
    assert page.sockets == []


def test_long_and_multiline_text_wraps_on_a_phone_sized_screen(open_page, site, chat_server):
    page = open_page(page_url(site, server=chat_server.url, name="phone"), width=360, height=640)
    page.wait_online()
    page.say("x" * 1500)
    page.say("word " * 200)
    page.box.fill("first line")
    page.box.press("Shift+Enter")  # a new line, not a send
    page.box.press_sequentially("second line")
    page.box.press("Enter")
    expect(page.box).to_have_value("")
    expect(page.chat_texts).to_have_count(3)
    assert page.chat_texts.last.inner_text() == "first line\nsecond line"
    overflow = page.page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0
    for selector in ("#chat", "#send", "#me", "#online-count"):
        expect(page.page.locator(selector)).to_be_in_viewport()


def test_conversation_screenshot(open_page, site, chat_server):
    """A conversation worth looking at: saved for CI and for the README."""
    alice = open_page(page_url(site, server=chat_server.url, room="general", name="alice"),
                      width=1040, height=740)
    alice.wait_online()
    bob = open_page(page_url(site, server=chat_server.url, room="general", name="bob"))
    carol = open_page(page_url(site, server=chat_server.url, room="general", name="carol"))
    bob.wait_online()
    carol.wait_online()
    alice.say("Morning! The new chat page is up, has anyone tried it?")
    bob.say("Yes, from my phone. It came back by itself after last night's restart.")
    carol.say("/me waves")
    carol.say("The websockets docs are at https://websockets.readthedocs.io/ "
              "(see the asyncio API).")
    alice.say("And <b>markup</b> stays plain text, as it should.")
    alice.say("Try /help for the commands.")
    bob.say("/nick bobby")
    expect(alice.notice("bob is now known as bobby")).to_have_count(1)
    bob.say("Shipping it.")
    expect(alice.chat_texts.last).to_have_text("Shipping it.")
    expect(alice.online).to_have_text(["alice", "bobby", "carol"])

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "conversation.png"
    alice.page.screenshot(path=str(shot))
    # The README's copy changes (the clock in it) on every run: refresh it
    # only when asked, so that running the tests leaves the checkout clean.
    readme_shot = ROOT / "docs" / "screenshot.png"
    if os.environ.get("UPDATE_SCREENSHOT") or not readme_shot.exists():
        readme_shot.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, readme_shot)
    alice.page.emulate_media(color_scheme="dark")
    alice.page.screenshot(path=str(ARTIFACTS / "conversation-dark.png"))
    alice.page.set_viewport_size({"width": 390, "height": 760})
    alice.page.screenshot(path=str(ARTIFACTS / "conversation-phone.png"))
