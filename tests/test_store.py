"""--store PATH: rooms that survive a restart, in a real SQLite file, with
chatserver run as a process and stopped by SIGTERM or SIGKILL."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
import subprocess
import sys

import pytest

from conftest import ROOT, http_get, join

from chatserver_store import NameSession, Prune, Remember, SessionOfKey, Store

FAST = ("--rate", "1000", "--burst", "1000")


def acked(cid: str, text: str) -> str:
    return json.dumps({"cid": cid, "line": text})


async def healthz(port: int) -> tuple[int, str]:
    return await http_get(port, "/healthz")


def start_fails(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "chatserver.py", "--port", "0", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


async def test_after_a_restart_a_room_keeps_its_epoch_numbering_and_history(run_process,
                                                                               tmp_path):
    db = str(tmp_path / "chat.db")
    server = run_process("--store", db, *FAST)
    alice = await join(server.url, "r", name="alice")
    for n in range(1, 4):
        await alice.send(f"line {n}")
        await alice.expect(type="user", seq=n)
    epoch = alice.welcome["epoch"]
    assert server.terminate() == 0

    server = run_process("--store", db, *FAST, "--port", str(server.port))
    back = await join(server.url, "r", name="alice", since=1, epoch=epoch)
    assert back.welcome["epoch"] == epoch and back.welcome["seq"] == 3
    assert [(f["seq"], f["message"]) for f in back.backlog if f["type"] == "user"] == \
        [(2, "line 2"), (3, "line 3")]
    assert not [f for f in back.backlog if f.get("event") in ("gap", "error")]
    newcomer = await join(server.url, "r", name="bob")
    assert [f["seq"] for f in newcomer.backlog if f["type"] == "user"] == [1, 2, 3]
    await back.send("after the restart")
    assert (await back.expect(type="user"))["seq"] == 4


async def test_an_acked_line_sent_again_after_a_restart_is_not_doubled(run_process, tmp_path):
    db = str(tmp_path / "chat.db")
    server = run_process("--store", db, *FAST)
    alice = await join(server.url, "r", name="alice", acks=1)
    await alice.send(acked("c1", "only once"))
    first = await alice.expect(event="ack", cid="c1")
    key = alice.welcome["key"]
    assert server.terminate() == 0

    server = run_process("--store", db, *FAST)
    back = await join(server.url, "r", name="alice", acks=1, key=key)
    await back.send(acked("c1", "only once"))
    again = await back.expect(cid="c1")
    assert again["event"] == "ack" and again["seq"] == first["seq"]
    bob = await join(server.url, "r", name="bob")
    assert [f["message"] for f in bob.backlog if f["type"] == "user"] == ["only once"]


async def test_a_rooms_old_messages_leave_the_file_and_a_restart_brings_back_history(
        run_process, tmp_path):
    """--history bounds a room's rows on disk: old ones are deleted a batch
    at a time (at most TRIM_MESSAGES past --history), not one per message,
    and a restart brings back exactly the last --history."""
    from chatserver_store import TRIM_MESSAGES
    db = str(tmp_path / "chat.db")
    server = run_process("--store", db, *FAST, "--history", "10")
    alice = await join(server.url, "r", name="alice", acks=1)
    for n in range(1, 101):
        await alice.send(acked(f"c{n}", f"line {n}"))
    assert (await alice.expect(cid="c100"))["seq"] == 100
    rows = sqlite3.connect(db).execute("SELECT count(*), min(seq) FROM messages").fetchone()
    assert 10 <= rows[0] < 10 + TRIM_MESSAGES and rows[1] == 101 - rows[0], rows
    assert server.terminate() == 0

    server = run_process("--store", db, *FAST, "--history", "10")
    bob = await join(server.url, "r", name="bob")
    assert [f["seq"] for f in bob.backlog if f["type"] == "user"] == list(range(91, 101))


async def test_sigterm_commits_every_line_it_took_before_it_exits(run_process, tmp_path):
    db = str(tmp_path / "chat.db")
    server = run_process("--store", db, *FAST, "--history", "1000")
    alice = await join(server.url, "r", name="alice", acks=1)
    for n in range(200):
        await alice.send(acked(f"c{n}", f"line {n}"))
    acks = []
    while len(acks) < 5:  # some are done, most may still be on their way
        frame = await alice.recv()
        if frame.get("event") == "ack":
            acks.append(frame)
    server.popen.send_signal(signal.SIGTERM)
    while True:  # what reached us before the close
        try:
            frame = await alice.recv()
        except Exception:
            break
        if frame.get("event") == "ack":
            acks.append(frame)
    assert server.popen.wait(15) == 0

    server = run_process("--store", db, *FAST, "--history", "1000")
    bob = await join(server.url, "r", name="bob")
    kept = {f["seq"]: f["message"] for f in bob.backlog if f["type"] == "user"}
    for ack in acks:
        assert kept[ack["seq"]] == f"line {ack['cid'][1:]}"
    assert sorted(kept) == list(range(1, len(kept) + 1))  # no hole, nothing twice
    assert len(set(kept.values())) == len(kept)


async def test_sigkill_under_load_loses_nothing_anyone_saw(run_process, tmp_path):
    """A few hundred lines a second over four rooms, then SIGKILL: after a
    restart every message any client received, and every acked line, is in
    its room's history with its seq, and no seq names another message."""
    db = str(tmp_path / "chat.db")
    args = ("--store", db, *FAST, "--history", "10000")
    server = run_process(*args)
    rooms = [f"room{n}" for n in range(4)]
    senders = {room: [await join(server.url, room, name=f"s{n}", acks=1) for n in range(2)]
               for room in rooms}
    watchers = {room: await join(server.url, room, name="watcher") for room in rooms}
    seen: dict[str, dict[int, str]] = {room: {} for room in rooms}  # what anyone received
    acked_lines: dict[str, dict[int, str]] = {room: {} for room in rooms}
    sent: dict[str, str] = {}

    async def send(room: str, sender, n: int) -> None:
        cid = f"{room}-{sender.name}-{n}"
        sent[cid] = f"{room} {sender.name} line {n}"
        await sender.send(acked(cid, sent[cid]))

    async def read(room: str, client) -> None:
        while True:
            frame = await client.recv(timeout=30)
            if frame["type"] == "user":
                assert seen[room].setdefault(frame["seq"], frame["message"]) == frame["message"]
            elif frame.get("event") == "ack":
                acked_lines[room][frame["seq"]] = sent[frame["cid"]]

    readers = [asyncio.create_task(read(room, client)) for room in rooms
               for client in [*senders[room], watchers[room]]]
    rng = random.Random(7)
    for n in range(120):  # about 300 lines a second in all, for about 1.5 s
        for room in rooms:
            await send(room, rng.choice(senders[room]), n)
        await asyncio.sleep(0.013)
    for n in range(120, 160):  # then a burst, and the kill while it is being taken
        for room in rooms:
            await send(room, rng.choice(senders[room]), n)
    await asyncio.sleep(0.02)
    server.popen.send_signal(signal.SIGKILL)
    server.popen.wait(10)
    await asyncio.sleep(0.2)
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    assert sum(map(len, seen.values())) > 200  # the load was real

    server = run_process(*args)
    for room in rooms:
        reader = await join(server.url, room, name="after")
        kept = {f["seq"]: f["message"] for f in reader.backlog if f["type"] == "user"}
        for seq, message in {**seen[room], **acked_lines[room]}.items():
            assert kept.get(seq) == message, (room, seq, message, kept.get(seq))
        assert sorted(kept) == list(range(1, len(kept) + 1))


async def test_an_unwritable_store_refuses_lines_and_recovers_by_itself(run_process, tmp_path):
    db = str(tmp_path / "chat.db")
    server = run_process("--store", db, *FAST)
    alice = await join(server.url, "r", name="alice", acks=1)
    bob = await join(server.url, "r", name="bob")
    await alice.send(acked("ok", "before"))
    await alice.expect(event="ack", cid="ok")
    await bob.expect(type="user", message="before")

    holder = sqlite3.connect(db, isolation_level=None)  # another program holds the write lock
    holder.execute("BEGIN IMMEDIATE")
    for n in range(3):
        await alice.send(acked(f"no{n}", "while locked"))
        error = await alice.expect(cid=f"no{n}")
        assert error["event"] == "error" and error["message"].startswith("not saved"), error
    status, reason = await healthz(server.port)
    assert status == 503 and "not saved" in reason
    holder.execute("ROLLBACK")
    holder.close()

    await alice.send(acked("no0", "while locked"))  # the page sends it again: now it goes
    assert (await alice.expect(cid="no0"))["seq"] == 2
    assert (await bob.expect(type="user"))["message"] == "while locked"  # never "locked" ones
    assert await healthz(server.port) == (200, "ok\n")
    assert alice.ws.state.name == "OPEN" and bob.ws.state.name == "OPEN"
    log = server.stderr()
    assert log.count("lines are refused until it can be written again") == 1
    assert log.count("writable again") == 1


@pytest.mark.parametrize("make, says", [
    (lambda path: path.write_bytes(b"this is not a database" * 100), "cannot open the store"),
    (lambda path: sqlite3.connect(path).execute("PRAGMA user_version = 99"), "newer chatserver"),
    (lambda path: sqlite3.connect(path).execute("CREATE TABLE other (x)"),
     "not a chatserver store"),
])
def test_a_store_it_cannot_use_stops_the_start_with_one_line_and_is_left_as_it_was(
        tmp_path, make, says):
    db = tmp_path / "chat.db"
    make(db)
    before = db.read_bytes()
    result = start_fails("--store", str(db))
    assert result.returncode == 1
    assert says in result.stderr and len(result.stderr.strip().splitlines()) <= 2, result.stderr
    assert "Traceback" not in result.stderr
    assert db.read_bytes() == before


def test_a_store_path_that_cannot_be_opened_stops_the_start(tmp_path):
    result = start_fails("--store", str(tmp_path / "no such folder" / "chat.db"))
    assert result.returncode == 1 and "cannot open the store" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_join_kept_waiting_by_the_store_as_its_room_expires_gets_the_room_back(
        run_process, tmp_path):
    """A newcomer whose key the server reads from the file waits while the
    store is busy (another program holds its write lock, and a line in
    another room waits for it); meanwhile the room's --room-ttl runs out.
    It gets the room from the file, with its epoch and history: it was
    opened anew, empty (the expiry was checked before the wait only)."""
    db = tmp_path / "rooms.db"
    server = run_process("--store", str(db), "--room-ttl", "0.3")
    alice = await join(server.url, "kept", name="alice")
    await alice.send("one")
    await alice.expect(type="user")
    await alice.close()
    carol = await join(server.url, "elsewhere", name="carol")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        await carol.send("a line that waits for the lock")
        await asyncio.sleep(0.1)  # its commit has begun (a read in its group would not wait)
        joining = asyncio.ensure_future(join(server.url, "kept", name="bob", key="k" * 22))
        await asyncio.sleep(0.7)  # the ttl runs out; less than the store waits for a lock
        assert not joining.done()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    bob = await joining
    assert bob.welcome["epoch"] == alice.welcome["epoch"]
    assert [f["message"] for f in bob.backlog if f["type"] == "user"] == ["one"]


async def test_a_second_process_on_the_same_store_refuses_to_start(run_process, tmp_path):
    db = str(tmp_path / "chat.db")
    first = run_process("--store", db)
    result = start_fails("--store", db)
    assert result.returncode == 1 and "in use by another chatserver process" in result.stderr
    alice = await join(first.url, name="alice")  # the first goes on
    assert alice.welcome["name"] == "alice"


def test_store_with_broker_is_refused_with_a_reason():
    result = start_fails("--store", "x.db", "--broker", "redis://127.0.0.1:1/0")
    assert result.returncode == 2 and "--store and --broker cannot go together" in result.stderr


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def test_a_store_of_100000_rooms_is_read_lazily(run_process, tmp_path):
    from chatserver_store import SCHEMA, SCHEMA_VERSION
    big = tmp_path / "big.db"
    db = sqlite3.connect(big)
    db.executescript(f"{SCHEMA} PRAGMA user_version = {SCHEMA_VERSION};")
    frame = json.dumps({"type": "user", "room": "r", "id": "a", "message": "x" * 60, "ts": 1,
                        "seq": 1}).encode()
    db.executemany("INSERT INTO rooms (name, epoch, seq, active_at) VALUES (?, 'e', 1, 0)",
                   ((f"r{n}",) for n in range(100_000)))
    db.executemany("INSERT INTO messages VALUES (?, 1, ?)",
                   ((f"r{n}", frame) for n in range(100_000)))
    db.commit()
    db.close()
    empty = run_process("--store", str(tmp_path / "empty.db"))
    full = run_process("--store", str(big))
    # Read eagerly, 100,000 rooms would take well over 100 MB.
    assert rss_kib(full.popen.pid) - rss_kib(empty.popen.pid) < 20_000
    alice = await join(full.url, "r99999", name="alice")
    assert alice.welcome["epoch"] == "e" and alice.welcome["seq"] == 1
    assert [f["seq"] for f in alice.backlog if f["type"] == "user"] == [1]


V1_SCHEMA = """
CREATE TABLE rooms (name TEXT PRIMARY KEY, epoch TEXT NOT NULL, seq INTEGER NOT NULL,
                    active_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX rooms_by_activity ON rooms (active_at);
CREATE TABLE messages (room TEXT NOT NULL, seq INTEGER NOT NULL, frame BLOB NOT NULL,
                       PRIMARY KEY (room, seq)) WITHOUT ROWID;
CREATE TABLE lines (session TEXT NOT NULL, cid TEXT NOT NULL, seq INTEGER, at REAL NOT NULL,
                    PRIMARY KEY (session, cid)) WITHOUT ROWID;
CREATE INDEX lines_by_age ON lines (at);
CREATE TABLE keys (key TEXT PRIMARY KEY, session TEXT NOT NULL) WITHOUT ROWID;
PRAGMA user_version = 1;
"""


async def test_a_store_of_the_first_schema_is_brought_up_to_date_and_keeps_its_rooms(
        run_process, tmp_path):
    old = tmp_path / "v1.db"
    db = sqlite3.connect(old)
    db.executescript(V1_SCHEMA)
    frame = json.dumps({"type": "user", "room": "r", "id": "a", "message": "kept", "ts": 1,
                        "seq": 7}).encode()
    db.execute("INSERT INTO rooms VALUES ('r', 'e1', 7, 0)")
    db.execute("INSERT INTO messages VALUES ('r', 7, ?)", (frame,))
    db.commit()
    db.close()
    server = run_process("--store", str(old))
    alice = await join(server.url, "r", name="alice")
    assert (alice.welcome["epoch"], alice.welcome["seq"], alice.welcome["topic"]) == ("e1", 7, "")
    assert [f["message"] for f in alice.backlog if f["type"] == "user"] == ["kept"]
    await alice.send("more")
    await alice.expect(message="more")
    server.terminate()
    db = sqlite3.connect(old)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 2


def limit_file_size(pid: int, size: int | None) -> None:
    """What a full disk does to `pid`: no file of its may grow past `size`
    (its writes fail with EFBIG; Python ignores SIGXFSZ).  None: no limit."""
    import resource
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard if size is None else size, hard))


async def test_a_full_disk_refuses_lines_loses_nothing_acked_and_recovers(run_process,
                                                                          tmp_path):
    db = tmp_path / "chat.db"
    server = run_process("--store", str(db), *FAST, "--history", "1000")
    alice = await join(server.url, "r", name="alice", acks=1)
    bob = await join(server.url, "r", name="bob")
    await alice.send(acked("before", "before the disk filled up"))
    await alice.expect(event="ack", cid="before")
    sizes = [path.stat().st_size for path in tmp_path.iterdir()]
    limit_file_size(server.popen.pid, max(sizes) + 256 * 1024)  # room for some lines
    acked_lines, refused = {}, 0
    for n in range(200):  # 2 KB lines until the disk is "full"
        await alice.send(acked(f"c{n}", f"{n} " + "x" * 1990))
        answer = await alice.expect(cid=f"c{n}")
        if answer["event"] == "ack":
            acked_lines[answer["seq"]] = f"{n} " + "x" * 1990
        else:
            assert answer["message"].startswith("not saved"), answer
            refused += 1
            if refused == 3:
                break
    assert refused == 3 and acked_lines, ("the disk never filled up", len(acked_lines))
    status, reason = await healthz(server.port)
    assert status == 503 and "not saved" in reason
    assert alice.ws.state.name == "OPEN" and bob.ws.state.name == "OPEN"

    limit_file_size(server.popen.pid, None)  # room on the disk again
    await alice.send(acked("after", "after"))
    after = await alice.expect(cid="after")
    assert after["event"] == "ack"
    assert await healthz(server.port) == (200, "ok\n")
    for client in (alice, bob):
        await client.close()
    assert server.terminate() == 0

    server = run_process("--store", str(db), *FAST, "--history", "1000")
    reader = await join(server.url, "r", name="reader")
    kept = {f["seq"]: f["message"] for f in reader.backlog if f["type"] == "user"}
    for seq, message in acked_lines.items():
        assert kept[seq] == message  # every acked line is on disk
    assert kept[after["seq"]] == "after"
    assert sorted(kept) == list(range(1, len(kept) + 1))  # refused lines took no seq


async def test_the_file_keeps_at_most_the_newest_lines_a_session_may_remember(tmp_path):
    """The cap on a session's acked lines (chatserver.cid_memory_lines) holds
    on disk too: a reload takes the newest, and the minute's prune deletes
    the rest, young as they are."""
    path = str(tmp_path / "chat.db")
    store = Store(path)
    store.open()
    try:
        await store.call(NameSession("key", "session", ("key",)))
        await asyncio.gather(*(store.call(Remember("session", f"c{n}", n)) for n in range(1200)))
        _, lines = await store.call(SessionOfKey("key", 1000))
        assert [cid for cid, _, _ in lines] == [f"c{n}" for n in range(200, 1200)]
        await store.call(Prune(rooms=10, keep_s=600, most=1000, live=frozenset()))
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        kept = {cid for (cid,) in db.execute("SELECT cid FROM lines")}
    assert kept == {f"c{n}" for n in range(200, 1200)}
