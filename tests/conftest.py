"""Shared fixtures: real chat servers on loopback, real websockets clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.parse
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


@pytest.fixture
async def start_server():
    """Start in-process chat servers on 127.0.0.1 and a free port; stop them after."""
    running = []

    async def start(**options) -> chatserver.ChatServer:
        options.setdefault("rate", 1000.0)
        options.setdefault("burst", 1000)
        options.setdefault("shutdown_timeout", 2.0)
        config = chatserver.Config(host="127.0.0.1", port=0, **options)
        chat_server, ws_server = await chatserver.listen(config)
        running.append((chat_server, ws_server))
        port = ws_server.sockets[0].getsockname()[1]
        chat_server.port = port
        chat_server.url = f"ws://127.0.0.1:{port}"
        return chat_server

    yield start
    for chat_server, ws_server in running:
        await chatserver.shut_down(chat_server, ws_server)


@pytest.fixture
async def server(start_server) -> chatserver.ChatServer:
    return await start_server()


class Process:
    """chatserver.py run as a separate process, as a user would run it."""

    def __init__(self, *args: str, command: list[str] | None = None) -> None:
        command = command or [sys.executable, str(ROOT / "chatserver.py")]
        self.log = tempfile.TemporaryFile("w+")  # a pipe nobody reads could fill up
        self.popen = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)
        first_line = self.popen.stdout.readline()
        found = re.search(r"wss?://[^\s/]+:(\d+)/", first_line)
        if not found:
            self.popen.kill()
            raise AssertionError(f"no URL in {first_line!r}: {self.stderr()}")
        self.port = int(found.group(1))
        self.url = found.group(0).rstrip("/")

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

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


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
