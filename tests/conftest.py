"""Shared fixtures: real chat servers on loopback, real websockets clients.

The protocol, limits and hostile-input suites run against every back-end
through one fixture, `chat` (and its factory `start_chat`), parametrized over
BACKENDS: `memory` (one in-process server), `redis` (two chatserver processes
sharing a real redis-server, the clients of a test spread over both).  A new
back-end is one more entry in BACKENDS and one more branch in
`backend_processes`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect

import chatserver

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 5.0


class Client:
    """A websockets client that reads JSON frames, with a timeout on every wait."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: dict = {}
        self.backlog: list[dict] = []  # frames between the welcome and our own join

    @property
    def name(self) -> str:
        return self.welcome["name"]

    async def send(self, text: str | bytes) -> None:
        await self.ws.send(text)

    async def recv(self, timeout: float = TIMEOUT_S) -> dict:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def recv_until(self, predicate, timeout: float = TIMEOUT_S) -> list[dict]:
        """Frames up to and including the first one that satisfies `predicate`."""
        frames = []
        async with asyncio.timeout(timeout):
            while True:
                frames.append(await self.recv(timeout))
                if predicate(frames[-1]):
                    return frames

    async def expect(self, **fields) -> dict:
        """Skip frames until one has all of `fields`; return it."""
        frames = await self.recv_until(
            lambda f: all(f.get(k) == v for k, v in fields.items()))
        return frames[-1]

    async def close(self) -> None:
        await self.ws.close()


async def join(url: str, room: str = "", **params) -> Client:
    """Connect, read the welcome and whatever comes before our own join notice."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    ws = await connect(f"{url}/{room}" + (f"?{query}" if query else ""), open_timeout=TIMEOUT_S)
    client = Client(ws)
    client.welcome = await client.recv()
    assert client.welcome["event"] == "welcome", client.welcome
    frames = await client.recv_until(
        lambda f: f.get("event") == "join" and f.get("name") == client.name)
    client.backlog = frames[:-1]
    return client


async def chat_lines(client: Client, count: int) -> list[tuple[int, str, str]]:
    """The next `count` chat messages a client receives, skipping notices:
    (seq, id, message) each."""
    lines = []
    while len(lines) < count:
        frame = await client.recv()
        if frame["type"] == "user":
            lines.append((frame["seq"], frame["id"], frame["message"]))
    return lines


async def http_get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:PORT/PATH: (status, body), whatever the status."""
    def get():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
    return await asyncio.to_thread(get)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {sample name with labels: value}."""
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in text.splitlines()
             if line and not line.startswith("#"))}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# In-process servers -------------------------------------------------------


async def start_in_process(**options) -> chatserver.ChatServer:
    """An in-process chat server on 127.0.0.1 and a free port, fast limits
    unless told otherwise; stop it with `chatserver.shut_down`."""
    options.setdefault("rate", 1000.0)
    options.setdefault("burst", 1000)
    options.setdefault("shutdown_timeout", 2.0)
    options.setdefault("rooms_per_ip", 100_000)  # every test's rooms come from 127.0.0.1
    options.setdefault("new_rooms_per_min", 1e6)
    config = chatserver.Config(host="127.0.0.1", port=0, **options)
    chat_server, ws_server = await chatserver.listen(config)
    chat_server.ws_server = ws_server
    port = ws_server.sockets[0].getsockname()[1]
    chat_server.port = port
    chat_server.url = f"{'wss' if config.certfile else 'ws'}://127.0.0.1:{port}"
    return chat_server


@pytest.fixture
async def start_server():
    """Start in-process chat servers on 127.0.0.1 and a free port; stop them after."""
    running = []

    async def start(**options) -> chatserver.ChatServer:
        chat_server = await start_in_process(**options)
        running.append(chat_server)
        return chat_server

    yield start
    for chat_server in running:
        await chatserver.shut_down(chat_server, chat_server.ws_server)


@pytest.fixture
async def server(start_server) -> chatserver.ChatServer:
    return await start_server()


# Processes ----------------------------------------------------------------


class Process:
    """chatserver.py run as a separate process, as a user would run it.

    With `wait=False` it is only started: call `ready()` before using it, so
    that several processes can start at once."""

    def __init__(self, *args: str, command: list[str] | None = None, wait: bool = True) -> None:
        command = command or [sys.executable, str(ROOT / "chatserver.py")]
        self.log = tempfile.TemporaryFile("w+")  # a pipe nobody reads could fill up
        self.popen = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)
        self.port = 0
        self.url = ""
        if wait:
            self.ready()

    def ready(self) -> Process:
        """Wait for the line that gives the URL."""
        first_line = self.popen.stdout.readline()
        found = re.search(r"wss?://[^\s/]+:(\d+)/", first_line)
        if not found:
            self.popen.kill()
            raise AssertionError(f"no URL in {first_line!r}: {self.stderr()}")
        self.port = int(found.group(1))
        self.url = found.group(0).rstrip("/")
        return self

    def stderr(self, start: int = 0) -> str:
        self.log.seek(start)
        return self.log.read()

    def stderr_size(self) -> int:
        return os.fstat(self.log.fileno()).st_size

    def terminate(self, timeout: float = 15) -> int:
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def start_processes(count: int, *args: str) -> list[Process]:
    """`count` chatserver processes with the same flags, started side by side."""
    processes = [Process(*args, wait=False) for _ in range(count)]
    try:
        return [process.ready() for process in processes]
    except BaseException:
        for process in processes:
            process.kill()
        raise


@pytest.fixture
def run_process():
    started = []

    def start(*args: str, **kwargs) -> Process:
        process = Process(*args, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


# A real redis-server ------------------------------------------------------


class RedisServer:
    """redis-server on 127.0.0.1, persistence off; can be stopped and started
    again on the same port (it comes back empty, as after a crash)."""

    def __init__(self, path: str, port: int) -> None:
        self.path = path
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        self.popen = subprocess.Popen(
            [self.path, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.ping():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.popen and self.popen.poll() is None:
            self.popen.terminate()
            self.popen.wait(10)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def client(self):
        import redis
        return redis.Redis(port=self.port, host="127.0.0.1")


def redis_server_path() -> str:
    """Debian's redis-server; a skip without it (a failure under CI=true)."""
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server is not installed (apt-get install redis-server; see .ci/setup)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


def started_redis():
    server = RedisServer(redis_server_path(), free_port())
    server.start()
    return server


@pytest.fixture
def redis_server():
    """A redis-server of the test's own: it may stop it, restart it, or read it."""
    server = started_redis()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_redis():
    """One redis-server for the parametrized suites; each test uses rooms of
    its own (`Chat.room`), so they do not meet."""
    server = started_redis()
    yield server
    server.stop()


# Every back-end behind one fixture -----------------------------------------

BACKENDS = ("memory", "redis", "store")
FAST = {"rate": 1000, "burst": 1000, "shutdown_timeout": 2,  # unless a test sets them
        "rooms_per_ip": 100_000, "new_rooms_per_min": 1e6}  # all from 127.0.0.1


def backend_processes(request, backend: str) -> tuple[int, list[str]]:
    """How many chatserver processes make up one chat on `backend`, and the
    flags that make them share it."""
    if backend == "memory":
        return 1, []
    if backend == "redis":
        return 2, ["--broker", request.getfixturevalue("shared_redis").url]
    if backend == "store":  # --store FILE: see store_file
        return 1, []
    raise AssertionError(f"unknown back-end {backend!r}")


def store_file(request, shared_args: list[str] | None) -> str:
    """A SQLite file for a --store process: one per set of flags for shared
    processes (so they find it again), else a new one."""
    folder = request.getfixturevalue("tmp_path_factory").getbasetemp() / "stores"
    folder.mkdir(exist_ok=True)
    if shared_args is None:
        return str(folder / f"chat-{next(STORE_FILES)}.db")
    return str(folder / f"shared-{hashlib.sha1(repr(shared_args).encode()).hexdigest()}.db")


STORE_FILES = itertools.count(1)


def command_line(options: dict) -> list[str]:
    """Config fields as chatserver flags: `max_size=4096` is `--max-size 4096`."""
    args = []
    for field, value in options.items():
        flag = "--" + field.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (tuple, list)):
            for item in value:
                args += [flag, str(item)]
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


class Chat:
    """One chat server under test, as its clients see it: one in-process
    server, or several processes that share a back-end.

    `join` and `connect` spread clients round-robin over the processes (the
    first on the first, the second on the second...) unless `at` names one;
    `url_for(i)` and `port_for(i)` do the same by hand.  `room(name)` is a
    room of this test's own, so tests can share processes.  Every connection
    opened through it is cut when the test ends.
    """

    _tags = itertools.count(1)

    def __init__(self, backend: str, urls: list[str], processes: list[Process],
                 server: chatserver.ChatServer | None = None,
                 records: list[logging.LogRecord] | None = None) -> None:
        self.backend = backend
        self.urls = urls
        self.ports = [int(url.rsplit(":", 1)[1]) for url in urls]
        self.processes = processes  # empty for an in-process server...
        self.server = server
        self.records = records if records is not None else []  # ...which logs here
        self.tag = str(next(self._tags))
        self.turn = 0
        self.opened: list[asyncio.BaseTransport] = []
        self.log_start = [process.stderr_size() for process in processes]

    @property
    def url(self) -> str:
        return self.urls[0]

    def url_for(self, i: int) -> str:
        return self.urls[i % len(self.urls)]

    def port_for(self, i: int) -> int:
        return self.ports[i % len(self.ports)]

    def next(self, at: int | None = None) -> int:
        """The index of the process for the next client: `at`, or the next in turn."""
        if at is None:
            at, self.turn = self.turn, self.turn + 1
        return at

    def room(self, name: str = "room") -> str:
        return f"{name}-{self.tag}"

    async def join(self, room: str, *, at: int | None = None, **params) -> Client:
        """`conftest.join` on the next process (or process `at`)."""
        client = await join(self.url_for(self.next(at)), room, **params)
        self.opened.append(client.ws.transport)
        return client

    async def connect(self, path: str = "/", *, at: int | None = None,
                      **kwargs) -> ClientConnection:
        """A bare websockets connection to PATH (which starts with /)."""
        ws = await connect(self.url_for(self.next(at)) + path, open_timeout=TIMEOUT_S,
                           **kwargs)
        self.opened.append(ws.transport)
        return ws

    def track(self, transport: asyncio.BaseTransport) -> None:
        """Cut `transport` (a raw connection) when the test ends."""
        self.opened.append(transport)

    async def metrics(self) -> list[dict[str, float]]:
        """Each process's /metrics."""
        answers = await asyncio.gather(*(http_get(port, "/metrics") for port in self.ports))
        assert all(status == 200 for status, _ in answers), answers
        return [parse_metrics(text) for _, text in answers]

    async def metric(self, name: str) -> float:
        """A counter or gauge summed over every process."""
        return sum(metrics.get(name, 0) for metrics in await self.metrics())

    def logs(self) -> list[tuple[str, str]]:
        """(level, message) of what the server logged since this test began."""
        if self.server is not None:
            return [(r.levelname, r.getMessage()) for r in self.records
                    if r.name.startswith("chatserver")]
        lines = []
        for process, start in zip(self.processes, self.log_start):
            for line in process.stderr(start).splitlines():
                found = re.match(r"\S+ \S+ ([A-Z]+) chatserver[\w.]*: (.*)", line)
                if found:
                    lines.append((found.group(1), found.group(2)))
        return lines

    def cut(self) -> None:
        for transport in self.opened:
            transport.abort()
        self.opened = []

    def tracebacks(self) -> list[str]:
        return [process.stderr(start) for process, start in zip(self.processes, self.log_start)
                if "Traceback" in process.stderr(start)]


class LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="session")
def shared_processes():
    """Processes started once and shared by every test that asks for the
    same back-end and flags, by (back-end, flags)."""
    started: dict[tuple, list[Process]] = {}
    yield started
    for processes in started.values():
        for process in processes:
            process.kill()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def each_backend(**marks):
    """Parametrize a test over BACKENDS, with marks for some of them, e.g.
    `@each_backend(redis=pytest.mark.xfail(strict=True, reason="..."))`."""
    return pytest.mark.parametrize(
        "backend", [pytest.param(name, marks=marks.get(name, ())) for name in BACKENDS])


@pytest.fixture
async def start_chat(backend, request):
    """Start a chat on the test's back-end: `await start_chat(**flags)`.

    Flags are chatserver.Config fields (`history=2`, `trust_proxy=True`);
    rate and burst are high unless given.  `shared=True`: processes started
    for the same flags before are used again (tests keep to their own rooms);
    `processes=True`: the memory back-end too runs as a process, for tests
    that signal or measure it.  Rooms, clients and processes go at the end.
    """
    chats: list[Chat] = []
    dedicated: list[Process] = []
    logger = logging.getLogger("chatserver")
    level = logger.level
    handler = LogRecords()  # what in-process servers log, as a process's stderr shows it

    async def start(*, shared: bool = False, processes: bool = False, **flags) -> Chat:
        flags = {**FAST, **flags}
        count, shared_args = backend_processes(request, backend)
        if backend == "memory" and not processes:
            if handler not in logger.handlers:
                logger.addHandler(handler)
                logger.setLevel(logging.INFO)  # as a process logs by default
            server = await start_in_process(**flags)
            chat = Chat(backend, [server.url], [], server, handler.records)
        else:
            args = [*shared_args, *command_line(flags)]
            if backend == "store":
                args += ["--store", store_file(request, args if shared else None)]
            if shared:
                key = (backend, *args)
                started = request.getfixturevalue("shared_processes")
                running = started.get(key, [])
                if not running or any(p.popen.poll() is not None for p in running):
                    for process in running:  # one died (and its test failed): start over
                        process.kill()
                    running = started[key] = start_processes(count, *args)
            else:
                running = start_processes(count, *args)
                dedicated.extend(running)
            chat = Chat(backend, [process.url for process in running], running)
        chats.append(chat)
        return chat

    yield start
    for chat in chats:
        chat.cut()
        if chat.server is not None:
            await chatserver.shut_down(chat.server, chat.server.ws_server)
    logger.removeHandler(handler)
    logger.setLevel(level)
    for process in dedicated:
        process.kill()
    for chat in chats:  # whatever the test did, nothing crashed
        assert not chat.tracebacks(), chat.tracebacks()
        assert all(p.popen.poll() is None for p in chat.processes if p not in dedicated)


@pytest.fixture
async def chat(start_chat) -> Chat:
    """The chat with default flags (and fast limits) on each back-end."""
    return await start_chat(shared=True)
