"""Scale-out over Redis: several chatserver processes sharing a real
redis-server (started here on a free loopback port, persistence off) behave
as one chat server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chatserver_redis import (BROKER_DOWN, SharedRoom, frame_prefix, history_window,
                              name_candidates)
from conftest import ROOT, chat_lines, free_port, join

FAST = ("--rate", "1000", "--burst", "1000")


@pytest.fixture
def cluster(redis_server, run_process):
    """Start chatserver processes sharing `redis_server`."""
    def start(count: int = 1, *args: str):
        processes = [run_process("--broker", redis_server.url, *FAST, *args)
                     for _ in range(count)]
        started.extend(processes)
        return processes[0] if count == 1 else processes

    started = []
    yield start
    for process in started:  # whatever happened, nothing crashed
        process.kill()
        assert "Traceback" not in process.stderr(), process.stderr()


def user_frames(frames: list[dict]) -> list[tuple[int, str, str]]:
    return [(f["seq"], f["id"], f["message"]) for f in frames if f["type"] == "user"]


# The broker's pure parts, without Redis -----------------------------------


def frames(*seqs: int) -> list[bytes]:
    return [b'{"type":"user","seq":%d}' % seq for seq in seqs]


def test_history_window_is_history_since_for_a_redis_list():
    kept = frames(4, 5, 6, 7, 8)  # seqs 4..8 kept of 8
    assert history_window(kept, 8, None) == (0, kept)
    assert history_window(kept, 8, 6) == (0, frames(7, 8))
    assert history_window(kept, 8, 1) == (2, kept)  # 2 and 3 are gone
    assert history_window(kept, 6, None) == (0, frames(4, 5, 6))  # 7, 8 in flight
    assert history_window([], 0, None) == (0, [])
    assert history_window(kept, 8, 8) == (0, [])
    assert history_window(frames(4, 6), 6, 4) == (0, frames(6))  # 5 was deleted


def test_frame_prefix_leaves_the_last_field_for_redis_to_fill():
    frame = {"type": "user", "id": "bob", "seq": 0, "action": True}
    prefix = frame_prefix(frame, "seq")
    assert json.loads(prefix + b"12}") == {**frame, "seq": 12}


def test_name_candidates_are_those_a_single_process_tries():
    assert name_candidates("alice", 1, 3) == ["alice", "alice-2", "alice-3"]
    long = "x" * 32
    assert name_candidates(long, 9, 2) == ["x" * 30 + "-9", "x" * 29 + "-10"]


def test_shared_room_skips_what_it_had_before_the_sync_point():
    room = SharedRoom("lobby", 100)
    room.published(b"3", b"three")  # before the sync: waits
    room.published(b"4", b"four")
    room.resync("e1", 3, frames(1, 2, 3), [], "")
    assert room.epoch == "e1" and room.pending == [b"four"]
    room.published(b"4", b"four")  # a duplicate
    room.published(b"-", b"notice")
    assert room.pending == [b"four", b"notice"] and room.take_pending()
    assert room.delivered_seq == 4
    # Reconnected: what was missed meanwhile comes from the history.
    room.synced.clear()
    room.resync("e1", 6, frames(4, 5, 6), [], "")
    assert room.pending == frames(5, 6) and room.seq == 6


def test_no_redis_import_without_broker():
    code = ("import sys, chatserver; chatserver.parse_args([]); "
            "assert not any(m.split('.')[0] in ('redis', 'chatserver_redis') "
            "for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=30)


# Command line ---------------------------------------------------------------


def test_help_documents_broker_and_workers():
    result = subprocess.run([sys.executable, "chatserver.py", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert "--broker redis://HOST:PORT/DB" in result.stdout and "--workers" in result.stdout


def test_broker_must_be_a_redis_url():
    result = subprocess.run([sys.executable, "chatserver.py", "--broker", "localhost:6379"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--broker must be a redis://" in result.stderr


def test_unreachable_redis_at_start_is_a_clear_exit():
    url = f"redis://127.0.0.1:{free_port()}/0"
    for extra in ([], ["--workers", "2"]):
        result = subprocess.run(
            [sys.executable, "chatserver.py", "--port", "0", "--broker", url, *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"chatserver: cannot reach the message broker at {url}")


def test_broker_without_hiredis_is_a_clear_exit(tmp_path):
    """The redis extra installs hiredis; a machine that has redis-py alone
    gets one line that says what to install, not a traceback."""
    (tmp_path / "hiredis.py").write_text("raise ImportError('No module named hiredis')\n")
    result = subprocess.run(
        [sys.executable, "chatserver.py", "--port", "0", "--broker", "redis://127.0.0.1:1/0"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "chatserver: --broker needs the redis and hiredis packages "
        "(pip install chatserver[redis]): No module named hiredis"]


# Several processes, one chat ------------------------------------------------


async def test_three_processes_deliver_every_message_once_in_one_order(cluster):
    processes = cluster(3)
    clients = [await join(process.url, "room", name=f"u{n}{m}")
               for n, process in enumerate(processes) for m in range(2)]
    per_client = 10

    async def talk(client):
        for n in range(per_client):
            await client.send(f"{client.name} {n}")

    await asyncio.gather(*(talk(client) for client in clients))
    total = per_client * len(clients)
    seen = await asyncio.gather(*(chat_lines(client, total) for client in clients))
    assert all(lines == seen[0] for lines in seen)  # one order for all
    assert [seq for seq, _, _ in seen[0]] == list(range(1, total + 1))  # one seq sequence
    for client in clients:  # each sender's lines in the order it sent them
        own = [text for _, name, text in seen[0] if name == client.name]
        assert own == [f"{client.name} {n}" for n in range(per_client)]


async def test_presence_online_and_who_show_the_whole_room(cluster):
    a, b = cluster(2)
    alice = await join(a.url, "soc", name="alice")
    bob = await join(b.url, "soc", name="bob")
    assert bob.welcome["online"] == ["alice", "bob"]
    notice = await alice.expect(event="join", name="bob")
    assert notice["count"] == 2 and notice["message"] == "bob has joined"
    carol = await join(a.url, "soc", name="carol")
    assert carol.welcome["online"] == ["alice", "bob", "carol"]
    await bob.send("/who")
    who = await bob.expect(event="who")
    assert who["online"] == ["alice", "bob", "carol"] and who["count"] == 3
    await bob.close()
    for client in (alice, carol):
        notice = await client.expect(event="leave")
        assert notice["name"] == "bob" and notice["count"] == 2
    other = await join(b.url, "other", name="dave")  # rooms stay apart
    assert other.welcome["online"] == ["dave"]


async def test_crowded_rooms_gather_joins_and_leaves_across_processes(cluster):
    a, b = cluster(2, "--crowd", "2")
    alice = await join(a.url, "big", name="alice")
    bob = await join(b.url, "big", name="bob")
    late = []
    for url, name in ((a.url, "carol"), (b.url, "dave")):  # past the crowd mark
        late.append(await connect(f"{url}/big?name={name}"))
        assert json.loads(await late[-1].recv())["name"] == name  # the welcome
    for client in (alice, bob):  # each process tells its own: the whole room's count
        frames = await client.recv_until(
            lambda f: f.get("event") == "presence" and f["count"] == 4)
        joined = [name for f in frames if f.get("event") == "presence" for name in f["joined"]]
        assert sorted(joined) == ["carol", "dave"]
        assert not [f for f in frames if f.get("event") == "join" and f["count"] > 2]
    await late[0].close()
    for client in (alice, bob):
        notice = await client.expect(event="presence")
        assert notice["left"] == ["carol"] and notice["joined"] == [] and notice["count"] == 3
    await bob.send("/who")
    assert (await bob.expect(event="who"))["online"] == ["alice", "bob", "dave"]


async def closed_with(client) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(5):
            while True:
                await client.ws.recv()
    return closed.value.rcvd.code


@pytest.mark.parametrize("same_process", [False, True])
async def test_a_client_back_with_its_key_takes_its_name_on_any_process(cluster, same_process):
    a, b = cluster(2)
    alice = await join(a.url, "back", name="alice")  # her network will "drop"
    bob = await join(b.url, "back", name="bob")
    key = alice.welcome["key"]
    stranger = await join(b.url, "back", name="alice", key=bob.welcome["key"])
    assert stranger.name == "alice-2"  # bob's key is not alice's
    again = await join((a if same_process else b).url, "back", name="alice", key=key)
    assert again.name == "alice" and again.welcome["key"] not in (key, bob.welcome["key"])
    assert sorted(again.welcome["online"]) == ["alice", "alice-2", "bob"]
    assert await closed_with(alice) == 4000
    seen = await bob.recv_until(lambda f: f.get("event") == "join" and f["name"] == "alice")
    assert [(f["event"], f["name"], f["count"]) for f in seen] == [
        ("join", "alice-2", 3), ("leave", "alice", 2), ("join", "alice", 3)]
    await bob.send("/who")
    assert sorted((await bob.expect(event="who"))["online"]) == ["alice", "alice-2", "bob"]
    late = await join(b.url, "back", name="alice", key=key)  # the old key names no one now
    assert late.name == "alice-3"
    await again.close()  # the new connection's leave frees the name
    assert (await bob.expect(event="leave", name="alice"))["count"] == 3
    assert (await join(a.url, "back", name="alice")).name == "alice"


async def test_nicknames_are_unique_across_processes(cluster):
    a, b = cluster(2)
    alice = await join(a.url, name="alice")
    second = await join(b.url, name="Alice")
    assert second.name == "Alice-2"  # as in one process: regardless of case
    await second.send("/nick ALICE")
    assert "already taken" in (await second.expect(event="error"))["message"]
    await alice.send("/nick bob")
    for client in (alice, second):
        notice = await client.expect(event="nick")
        assert notice["old"] == "alice" and notice["name"] == "bob"
    await second.send("/nick alice")  # free again
    notice = await alice.expect(event="nick")
    assert notice["old"] == "Alice-2" and notice["name"] == "alice"
    await alice.send("/me waves")
    frame = await second.expect(type="user")
    assert frame["id"] == "bob" and frame["action"] is True and frame["seq"] == 1


async def test_history_resume_and_gap_across_processes(cluster):
    a, b, c = cluster(3, "--history", "5")
    alice = await join(a.url, "r", name="alice")
    for n in range(1, 9):
        await alice.send(f"m{n}")
    await chat_lines(alice, 8)
    epoch = alice.welcome["epoch"]

    bob = await join(b.url, "r", name="bob")  # a newcomer: the kept history
    assert bob.welcome["seq"] == 8 and bob.welcome["epoch"] == epoch
    assert [seq for seq, _, _ in user_frames(bob.backlog)] == [4, 5, 6, 7, 8]

    carol = await join(c.url, "r", name="carol", since=6, epoch=epoch)
    assert [f["seq"] for f in carol.backlog] == [7, 8]  # exactly what it missed

    dave = await join(b.url, "r", name="dave", since=1, epoch=epoch)
    assert dave.backlog[0]["event"] == "gap" and dave.backlog[0]["missed"] == 2
    assert [f["seq"] for f in dave.backlog[1:]] == [4, 5, 6, 7, 8]

    eve = await join(c.url, "r", name="eve", since=6, epoch="another")
    assert [f["seq"] for f in eve.backlog] == [4, 5, 6, 7, 8]

    await carol.send("live")
    for client in (alice, bob, carol, dave, eve):
        assert await chat_lines(client, 1) == [(9, "carol", "live")]


async def test_history_survives_the_restart_of_every_process(cluster, run_process,
                                                             redis_server):
    a, b = cluster(2)
    alice = await join(a.url, "r", name="alice")
    for n in range(1, 4):
        await alice.send(f"m{n}")
    await chat_lines(alice, 3)
    epoch = alice.welcome["epoch"]
    for process in (a, b):
        assert await asyncio.to_thread(process.terminate) == 0
    c = run_process("--broker", redis_server.url, *FAST)
    bob = await join(c.url, "r", name="alice", since=1, epoch=epoch)
    assert bob.name == "alice"  # the old alice left cleanly
    assert bob.welcome["epoch"] == epoch and bob.welcome["seq"] == 3
    assert [(f["seq"], f["message"]) for f in bob.backlog] == [(2, "m2"), (3, "m3")]


async def test_killed_process_users_leave_and_their_names_free_up(cluster):
    a, b = cluster(2)
    alice = await join(a.url, "r", name="alice")
    await join(a.url, "r", name="ann")
    bob = await join(b.url, "r", name="bob")
    await alice.expect(event="join", name="bob")
    a.popen.send_signal(signal.SIGKILL)
    a.popen.wait()
    gone = {}
    async with asyncio.timeout(15):  # heartbeat TTL 6 s + a sweep every 2 s
        while len(gone) < 2:
            frame = await bob.recv(timeout=15)
            if frame.get("event") == "leave":
                gone[frame["name"]] = frame["count"]
    assert sorted(gone) == ["alice", "ann"] and sorted(gone.values()) == [1, 2]
    again = await join(b.url, "r", name="alice")
    assert again.name == "alice"
    assert again.welcome["online"] == ["bob", "alice"]


async def test_redis_stopped_and_restarted_mid_chat(cluster, redis_server):
    a, b = cluster(2)
    alice = await join(a.url, "r", name="alice")
    bob = await join(b.url, "r", name="bob")
    await alice.send("before")
    assert await chat_lines(bob, 1) == [(1, "alice", "before")]
    epoch = alice.welcome["epoch"]

    redis_server.stop()
    await asyncio.sleep(0.2)
    await alice.send("while down")
    error = await alice.expect(event="error")
    assert error["message"] == BROKER_DOWN
    assert alice.ws.state.name == "OPEN" and bob.ws.state.name == "OPEN"
    with pytest.raises(InvalidStatus) as refused:  # newcomers: try again later
        await join(b.url, "r", name="carol")
    assert refused.value.response.status_code == 503

    redis_server.start()  # empty: as after a crash without persistence
    async with asyncio.timeout(20):
        while True:
            await alice.send("after")
            frame = await alice.recv()
            while frame.get("event") in ("join", "leave"):  # names coming back to Redis
                frame = await alice.recv()
            if frame["type"] == "user":
                break
            assert frame["event"] == "error"
            await asyncio.sleep(0.5)
    assert frame["message"] == "after" and frame["seq"] == 2  # numbering goes on
    assert await chat_lines(bob, 1) == [(2, "alice", "after")]
    async with asyncio.timeout(10):  # each process registers its names again on its return
        while True:
            await bob.send("/who")
            if sorted((await bob.expect(event="who"))["online"]) == ["alice", "bob"]:
                break
            await asyncio.sleep(0.1)
    carol = await join(b.url, "r", name="carol")
    assert carol.welcome["epoch"] == epoch
    assert user_frames(carol.backlog) == [(2, "alice", "after")]


async def test_an_acked_line_refused_while_redis_is_away_is_posted_once_when_resent(
        cluster, redis_server):
    a = cluster(1)
    alice = await join(a.url, "r", name="alice", acks=1)
    redis_server.stop()
    await asyncio.sleep(0.2)
    await alice.send(json.dumps({"cid": "down", "line": "while down"}))
    error = await alice.expect(event="error")
    assert error["cid"] == "down" and error["message"] == BROKER_DOWN
    redis_server.start()
    async with asyncio.timeout(20):  # the page resends with the same cid until it is acked
        while True:
            await alice.send(json.dumps({"cid": "down", "line": "while down"}))
            answer = await alice.expect(cid="down")
            if answer["event"] == "ack":
                break
            await asyncio.sleep(0.3)
    await alice.send(json.dumps({"cid": "down", "line": "while down"}))
    assert (await alice.expect(cid="down"))["seq"] == answer["seq"]
    carol = await join(a.url, "r", name="carol")  # the history shows it once
    assert user_frames(carol.backlog) == [(answer["seq"], "alice", "while down")]


async def test_a_name_taken_while_redis_was_away_is_not_held_twice(cluster, redis_server):
    a = cluster(1)
    alice = await join(a.url, "r", name="alice")
    redis = redis_server.client()
    # While chatserver cannot hear (as if Redis were away), "alice" goes to
    # someone else; then its subscription drops, and it reconciles.
    redis.hset("chat:r:names", "alice", '{"name":"alice","proc":"elsewhere","key":"k","n":1}')
    assert redis.client_kill_filter(_type="pubsub") >= 1
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(10):
            while True:
                await alice.ws.recv()
    assert closed.value.rcvd.code == 1013  # connect again: there is a suffix for you
    again = await join(a.url, "r", name="alice")
    assert again.name == "alice-2"


async def test_members_get_the_shutdown_notice_while_a_join_waits_for_redis(
        cluster, redis_server):
    a = cluster(1)
    alice = await join(a.url, "r", name="alice")
    redis_server.popen.send_signal(signal.SIGSTOP)  # the next join waits for Redis
    late = None
    try:
        late = await connect(f"{a.url}/r?name=late")
        await asyncio.sleep(0.2)  # its join is under way: nothing to see until Redis answers
        a.popen.send_signal(signal.SIGTERM)
        frames = []
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                while True:
                    frames.append(json.loads(await alice.ws.recv()))
        assert closed.value.rcvd.code == 1001
        assert [f.get("event") for f in frames] == ["shutdown"]
    finally:
        redis_server.popen.send_signal(signal.SIGCONT)
        if late is not None:
            await late.close()


async def test_empty_room_is_forgotten_after_room_ttl(cluster, redis_server):
    a = cluster(1, "--room-ttl", "1")
    alice = await join(a.url, "r", name="alice")
    await alice.send("hi")
    await chat_lines(alice, 1)
    epoch = alice.welcome["epoch"]
    await alice.close()
    redis = redis_server.client()
    async with asyncio.timeout(5):
        while redis.pttl("chat:r:seq") < 0:
            await asyncio.sleep(0.05)  # the leave is carried out after the close
    bob = await join(a.url, "r", name="bob")  # within the TTL: kept...
    assert bob.welcome["epoch"] == epoch and redis.pttl("chat:r:seq") == -1
    await bob.close()
    async with asyncio.timeout(5):
        while redis.pttl("chat:r:seq") < 0:
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)
    carol = await join(a.url, "r", name="carol")  # ...after it: a new room
    assert carol.welcome["epoch"] != epoch and carol.welcome["seq"] == 0


# --workers ------------------------------------------------------------------


async def test_a_name_taken_by_nick_just_before_a_disconnect_is_not_held_for_ever(cluster):
    """Issue 17, item 1: /nick, then the connection goes before the answer."""
    a, b = cluster(2)
    watcher = await join(b.url, "r", name="watcher")
    for n in range(10):
        ws = await connect(f"{a.url}/r?name=old{n}")
        await ws.send(f"/nick new{n}")
        ws.transport.abort()  # gone while the rename is on its way to Redis
    async with asyncio.timeout(10):
        while True:  # each one's leave notices have been carried out
            await watcher.send("/who")
            online = (await watcher.expect(event="who"))["online"]
            if online == ["watcher"]:
                break
            await asyncio.sleep(0.1)
    for n in range(10):
        again = await join(a.url, "r", name=f"new{n}")
        assert again.name == f"new{n}"  # free again, not new{n}-2
