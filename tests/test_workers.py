"""--workers N: a parent hands each connection to the worker that owns its
room, so workers need no Redis (and with --broker still share rooms with
other machines).  Real processes, real sockets."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import termios

import pytest
from conftest import ROOT, chat_lines, join
from test_redis import FAST
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from chatserver_workers import owner


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(child) for child in file.read().split()]


def zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def unread_in_ready_pipe(pid: int) -> int:
    """Bytes waiting in the parent's ready pipe: the one pipe of which the
    parent holds both ends (the workers write "ready" into it)."""
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("pipe:"):
            fds.setdefault(target, []).append(fd)
    (both,) = [ends for ends in fds.values() if len(ends) == 2]
    pipe = os.open(f"/proc/{pid}/fd/{both[0]}", os.O_RDONLY | os.O_NONBLOCK)
    try:
        count = bytearray(4)
        fcntl.ioctl(pipe, termios.FIONREAD, count)
        return int.from_bytes(count, sys.byteorder)
    finally:
        os.close(pipe)


def rooms_of(worker: int, count: int, workers: int = 2) -> list[str]:
    """`count` room names that `worker` owns."""
    names = (f"room{n}" for n in range(10_000))
    return [name for name in names
            if owner(f"GET /{name} HTTP/1.1\r\n".encode(), workers) == worker][:count]


async def test_each_room_lives_on_one_worker_and_rooms_spread_over_all(run_process):
    parent = run_process("--workers", "2", *FAST)
    assert len(children(parent.popen.pid)) == 2
    rooms = rooms_of(0, 3) + rooms_of(1, 3)
    pairs = []
    for room in rooms:  # without Redis, two members see each other only on one worker
        first = await join(parent.url, room, name="a")
        second = await join(parent.url, room, name="b")
        await first.send(f"hello {room}")
        assert await chat_lines(second, 1) == [(1, "a", f"hello {room}")]
        pairs.append((first, second))
    # Kill the worker that owns the first three rooms: only their clients go.
    victim = next(pid for pid in children(parent.popen.pid))
    os.kill(victim, signal.SIGKILL)
    gone = []
    for room, (first, _) in zip(rooms, pairs):
        try:
            await first.send("still?")
            await first.expect(message="still?")
        except ConnectionClosed:
            gone.append(room)
    assert gone in (rooms[:3], rooms[3:]), gone
    async with asyncio.timeout(15):  # restarted: its rooms are served again
        while True:
            try:
                again = await join(parent.url, gone[0], name="back")
                break
            except (OSError, ConnectionClosed, InvalidHandshake, asyncio.TimeoutError):
                await asyncio.sleep(0.2)
    assert again.name == "back" and victim not in children(parent.popen.pid)
    async with asyncio.timeout(5):  # its "ready" was read: the pipe cannot fill up
        while unread_in_ready_pipe(parent.popen.pid):
            await asyncio.sleep(0.1)
    parent.popen.send_signal(signal.SIGTERM)
    survivors = [pair for room, pair in zip(rooms, pairs) if room not in gone]
    for first, _ in survivors:
        await first.expect(event="shutdown")
    assert await asyncio.to_thread(parent.popen.wait, 20) == 0
    assert "Traceback" not in parent.stderr() and "Exception" not in parent.stderr()


async def test_workers_with_a_broker_share_rooms_with_other_processes(run_process,
                                                                      redis_server):
    parent = run_process("--workers", "2", "--broker", redis_server.url, *FAST)
    alone = run_process("--broker", redis_server.url, *FAST)
    clients = [await join(url, room, name=f"u{n}") for n, (url, room) in enumerate(
        (url, room) for room in rooms_of(0, 1) + rooms_of(1, 1)
        for url in (parent.url, alone.url))]
    for client in clients[::2]:
        await client.send("across")
    for client in clients:
        assert [m for _, _, m in await chat_lines(client, 1)] == ["across"]


async def test_workers_stop_when_their_parent_is_killed(run_process):
    parent = run_process("--workers", "2")
    workers = children(parent.popen.pid)
    assert len(workers) == 2
    parent.popen.kill()
    parent.popen.wait()
    async with asyncio.timeout(15):
        while any(os.path.exists(f"/proc/{pid}") and not zombie(pid) for pid in workers):
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("flags, says", [(["--certfile", "x.pem"], "cannot go with --certfile"),
                                         (["--store", "x.db"], "cannot go with --workers")])
def test_what_workers_cannot_do_is_a_clear_error(flags, says):
    result = subprocess.run([sys.executable, "chatserver.py", "--workers", "2", *flags],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and says in result.stderr


@pytest.mark.parametrize("line, room", [("GET /dev?name=a HTTP/1.1", "dev"),
                                        ("GET / HTTP/1.1", "lobby"),
                                        ("GET /../x HTTP/1.1", ""), ("junk", "")])
def test_a_request_line_goes_to_the_owner_of_its_room(line, room):
    from zlib import crc32
    assert owner(line.encode() + b"\r\nHost: x\r\n", 3) == crc32(room.encode()) % 3


async def test_a_burst_of_connections_is_handed_over_whole(run_process):
    """Many connections at once (a reconnect storm): every one is handed to
    its worker and welcomed, none left waiting in the parent."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    parent = run_process("--workers", "2", "--max-per-ip", "5000", *FAST)
    request = ("GET /burst{n} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n")
    streams = [await asyncio.open_connection("127.0.0.1", parent.port) for _ in range(1500)]
    for n, (_, writer) in enumerate(streams):
        writer.write(request.format(n=n % 50).encode())
    async with asyncio.timeout(30):
        answers = [await reader.readline() for reader, _ in streams]
    assert set(answers) == {b"HTTP/1.1 101 Switching Protocols\r\n"}
    for _, writer in streams:
        writer.close()


async def test_the_parent_refuses_past_max_per_ip_and_lets_other_addresses_in(run_process):
    """Connections that say nothing wait in the parent: one address may hold
    --max-per-ip of them, as with a single process, not every place."""
    parent = run_process("--workers", "2", "--max-clients", "50", "--max-per-ip", "5", *FAST)
    silent = [await asyncio.open_connection("127.0.0.1", parent.port) for _ in range(60)]
    refused = 0
    for reader, _ in silent[5:]:
        async with asyncio.timeout(5):
            refused += (await reader.readline()).startswith(b"HTTP/1.1 503")
    assert refused == 55
    async with connect(parent.url + "/lobby?name=other", local_addr=("127.0.0.2", 0),
                       open_timeout=5) as other:
        assert json.loads(await other.recv())["event"] == "welcome"
    for _, writer in silent:
        writer.close()
    async with asyncio.timeout(5):  # let go once they are closed
        while True:
            try:
                again = await join(parent.url, "lobby", name="again")
                break
            except InvalidHandshake:
                await asyncio.sleep(0.05)
    assert again.name == "again"
