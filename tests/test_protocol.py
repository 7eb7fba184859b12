"""The chat protocol over real sockets on loopback, with real websockets
clients, against every back-end (`chat` and `start_chat` in conftest.py:
with Redis, the clients of a test are spread over two processes)."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import http_get

async def test_lobby_is_the_default_room_and_the_welcome_comes_first(chat):
    alice = await chat.join("", name="alice")
    assert alice.welcome["room"] == "lobby"
    assert alice.welcome["online"] == ["alice"]
    assert alice.welcome["seq"] == 0 and alice.welcome["epoch"]


async def test_two_clients_chat_and_see_each_others_join_and_leave(chat):
    room = chat.room("soc")
    alice = await chat.join(room, name="alice")
    bob = await chat.join(room, name="bob")
    notice = await alice.expect(event="join", name="bob")
    assert notice["count"] == 2 and notice["message"] == "bob has joined"
    await alice.send("hello bob")
    for client in (alice, bob):  # the sender gets its own message too
        frame = await client.recv()
        assert frame["type"] == "user" and frame["id"] == "alice"
        assert frame["message"] == "hello bob" and frame["seq"] == 1 and frame["room"] == room
    await bob.close()
    notice = await alice.expect(event="leave")
    assert notice["name"] == "bob" and notice["count"] == 1
    assert notice["message"] == "bob has left"


async def test_two_rooms_are_isolated(chat):
    alice = await chat.join(chat.room("one"), name="alice")
    bob = await chat.join(chat.room("two"), name="bob")
    await alice.send("only for room one")
    await bob.send("only for room two")
    assert (await alice.recv())["message"] == "only for room one"
    assert (await bob.recv())["message"] == "only for room two"
    await alice.send("/who")
    who = await alice.expect(event="who")
    assert who["online"] == ["alice"]


async def test_rooms_stay_apart_with_members_of_both_on_every_process(chat):
    x, y = chat.room("x"), chat.room("y")
    members = {x: ["xa", "xb"], y: ["ya", "yb"]}
    clients = {name: await chat.join(room, name=name, at=n)  # each room on each process
               for room, names in members.items() for n, name in enumerate(names)}
    seen = {name: [client.welcome, *client.backlog] for name, client in clients.items()}

    async def until(name: str, predicate) -> None:
        """Read frames into seen[name] until predicate(frame) holds."""
        while True:
            frame = await clients[name].recv()
            seen[name].append(frame)
            assert frame["room"] == clients[name].welcome["room"], (name, frame)
            if predicate(frame):
                return

    def chat_lines(name: str) -> list[str]:
        return [f["message"] for f in seen[name] if f["type"] == "user"]

    for client in clients.values():
        await client.send(f"from {client.name}")
    for room, names in members.items():
        lines = {f"from {name}" for name in names}
        for name in names:
            await until(name, lambda f, name=name: lines <= set(chat_lines(name)))
    await clients["ya"].send("/who")
    await clients["xb"].send("/nick xb2")
    newcomer = await chat.join(x, name="xc", at=1)  # a join and a leave in x
    await newcomer.close()
    await until("xa", lambda f: f.get("event") == "leave" and f["name"] == "xc")
    await until("ya", lambda f: f.get("event") == "who")
    for name in ("xa", "ya"):
        await clients[name].send("end")
    for name in clients:
        await until(name, lambda f: f.get("message") == "end")

    names_in = {x: {"xa", "xb", "xb2", "xc"}, y: {"ya", "yb"}}  # every name each room had
    for room, names in members.items():
        others = names_in[y if room == x else x]
        for name in names:
            assert {f["room"] for f in seen[name]} == {room}, seen[name]
            assert [f["seq"] for f in seen[name] if f["type"] == "user"] == [1, 2, 3]
            for frame in seen[name]:
                named = {frame.get("id"), frame.get("name"), frame.get("old"),
                         *frame.get("online", [])}
                assert not named & others, frame
    assert [f["online"] for f in seen["ya"] if f.get("event") == "who"] == [["ya", "yb"]]
    assert [f["name"] for f in seen["xa"] if f.get("event") == "nick"] == ["xb2"]


async def test_newcomers_joining_together_get_no_notice_from_before_their_welcome(chat):
    room = chat.room("together")
    await chat.join(room, name="first")
    newcomers = await asyncio.gather(*(chat.join(room, name=f"n{n}") for n in range(10)))
    for client in newcomers:  # before its own join notice, the history alone
        online = client.welcome["online"]
        assert [f for f in client.backlog if f.get("event") == "join"
                and f["name"] in online] == [], (online, client.backlog)


async def test_nick_changes_are_announced_and_names_stay_unique(chat):
    room = chat.room()
    alice = await chat.join(room, name="alice")
    alice2 = await chat.join(room, name="alice")
    assert alice2.name == "alice-2"
    assert alice2.welcome["online"] == ["alice", "alice-2"]
    await alice2.send("/nick bob")
    for client in (alice, alice2):
        notice = await client.expect(event="nick")
        assert notice["old"] == "alice-2" and notice["name"] == "bob"
        assert notice["message"] == "alice-2 is now known as bob"
    await alice2.send("/nick alice")
    error = await alice2.expect(event="error")
    assert "taken" in error["message"]
    await alice2.send("/me waves")
    frame = await alice.expect(type="user")
    assert frame["id"] == "bob" and frame["action"] is True and frame["message"] == "waves"


async def test_invalid_name_gets_a_guest_name_and_an_error(chat):
    guest = await chat.join(chat.room(), name="has space")
    assert guest.name.startswith("guest-")
    assert [f["event"] for f in guest.backlog] == ["error"]


async def test_tutorial_client_sends_plain_strings_and_reads_type_message_id(chat):
    # As the tutorial's page does: a plain string out, frame["type"] dispatch in.
    ws = await chat.connect(f"/{chat.room('soc')}")
    seen = []
    await ws.send("hi from the tutorial")
    while True:
        data = json.loads(await asyncio.wait_for(ws.recv(), 5))
        seen.append(data["type"])
        if data["type"] == "user":
            assert data["message"] == "hi from the tutorial"
            assert data["id"].startswith("guest-")
            break
        assert isinstance(data["message"], str)
    assert seen[0] == "sys"


async def test_newcomer_gets_history_then_live_traffic_without_gap_or_duplicate(chat):
    room = chat.room()
    alice = await chat.join(room, name="alice")
    for n in range(5):
        await alice.send(f"m{n + 1}")
    await alice.expect(message="m5")
    bob = await chat.join(room, name="bob")
    assert [f["seq"] for f in bob.backlog] == [1, 2, 3, 4, 5]
    assert bob.welcome["seq"] == 5
    await alice.send("m6")
    assert (await bob.recv())["seq"] == 6


async def test_history_while_messages_stream_has_no_gap_and_no_duplicate(chat):
    room = chat.room()
    alice = await chat.join(room, name="alice")

    async def stream():
        for n in range(200):
            await alice.send(f"m{n + 1}")
            if n % 10 == 0:
                await asyncio.sleep(0)

    sender = asyncio.create_task(stream())
    joiners = []
    for _ in range(5):
        await asyncio.sleep(0.005)
        joiners.append(await chat.join(room))
    await sender
    for client in joiners:
        seqs = [f["seq"] for f in client.backlog if f["type"] == "user"]
        if 200 not in seqs:
            frames = await client.recv_until(lambda f: f.get("seq") == 200)
            seqs += [f["seq"] for f in frames if f["type"] == "user"]
        start = seqs[0] if seqs else 200
        assert seqs == list(range(start, 201)), seqs


async def test_newcomers_on_every_process_see_history_then_live_lines_while_lines_stream(chat):
    room = chat.room("stream")
    sender = await chat.join(room, name="sender")
    listener = await chat.join(room, name="listener")  # every process follows the room
    total = 90  # under --history: each newcomer's history starts at seq 1
    joins = []
    for n in range(1, total + 1):
        await sender.send(f"line {n}")
        if n % 8 == 0:  # a newcomer on each process in turn, joining as lines go by
            joins.append(asyncio.create_task(chat.join(room)))
        await asyncio.sleep(0.001)  # a stream, not one burst: joins land amid it
    newcomers = await asyncio.gather(*joins)
    assert any(0 < client.welcome["seq"] < total for client in newcomers)
    for client in [listener, *newcomers]:
        frames = client.backlog  # the history, and live lines before our own join notice
        if not any(f.get("seq") == total for f in frames):
            frames = frames + await client.recv_until(lambda f: f.get("seq") == total)
        seqs = [f["seq"] for f in frames if f["type"] == "user"]
        assert seqs == list(range(1, total + 1)), (client.name, client.welcome["seq"], seqs)


async def test_resume_gets_exactly_what_was_missed(chat):
    room = chat.room()
    alice = await chat.join(room, name="alice")
    bob = await chat.join(room, name="bob")
    epoch = bob.welcome["epoch"]
    await alice.send("seen")
    assert (await bob.expect(type="user"))["seq"] == 1
    await bob.close()
    for text in ("missed 1", "missed 2"):
        await alice.send(text)
    await alice.expect(message="missed 2")
    bob = await chat.join(room, name="bob", since=1, epoch=epoch)
    assert [(f["seq"], f["message"]) for f in bob.backlog] == [(2, "missed 1"), (3, "missed 2")]


async def test_resume_beyond_history_gets_a_gap_notice(start_chat):
    chat = await start_chat(history=2)
    room = chat.room()
    alice = await chat.join(room, name="alice")
    epoch = alice.welcome["epoch"]
    for n in range(6):
        await alice.send(f"m{n + 1}")
    await alice.expect(message="m6")
    bob = await chat.join(room, name="bob", since=1, epoch=epoch)
    assert bob.backlog[0]["event"] == "gap" and bob.backlog[0]["missed"] == 3
    assert [f["seq"] for f in bob.backlog[1:]] == [5, 6]


async def test_resume_with_a_foreign_epoch_gets_the_full_history(chat):
    room = chat.room()
    alice = await chat.join(room, name="alice")
    for n in range(3):
        await alice.send(f"m{n + 1}")
    await alice.expect(message="m3")
    bob = await chat.join(room, name="bob", since=2, epoch="some-other-epoch")
    assert [f["seq"] for f in bob.backlog] == [1, 2, 3]


async def test_room_forgotten_after_ttl_starts_a_new_epoch(start_chat, backend):
    """In memory and in Redis; the store forgets it only in memory, and it
    comes back from the file as it was (also before the sweep has run: a
    join found it expired and opened it anew, without its history)."""
    chat = await start_chat(room_ttl=0)
    room = chat.room("brief")
    alice = await chat.join(room, name="alice")
    await alice.send("hello")
    await alice.expect(type="user")
    epoch = alice.welcome["epoch"]
    await alice.close()
    if backend == "store":
        for _ in range(20):  # the sweep runs every 50 ms: most of these come before it
            bob = await chat.join(room, name="bob")
            assert (bob.welcome["epoch"], [f.get("message") for f in bob.backlog]) == \
                (epoch, ["hello"])
            await bob.close()
        return
    async with asyncio.timeout(5):  # until the server has carried out alice's leave
        while True:
            bob = await chat.join(room, name="bob", since=1, epoch=epoch)
            if bob.welcome["epoch"] != epoch:
                break
            await bob.close()  # the room is empty again: forgotten at once
    assert bob.welcome["seq"] == 0 and bob.backlog == []


async def test_bad_input_gets_errors_and_never_reaches_the_others(start_chat):
    chat = await start_chat(max_chars=50)
    room = chat.room()
    alice = await chat.join(room, name="alice")
    bob = await chat.join(room, name="bob")
    await alice.expect(event="join", name="bob")
    await alice.send("   ")
    await alice.send("x" * 51)
    assert "too long" in (await alice.expect(event="error"))["message"]
    await alice.send(b"\x00binary")
    assert "binary" in (await alice.expect(event="error"))["message"]
    await alice.send("/nope")
    assert (await alice.expect(event="error"))["message"].startswith("unknown command")
    await alice.send("marker")
    # bob's next frame is the marker: none of the bad lines reached him.
    frame = await bob.recv()
    assert frame["message"] == "marker" and frame["seq"] == 1


async def test_frame_over_max_size_closes_with_1009_and_others_go_on(start_chat):
    chat = await start_chat(max_size=1024)
    room = chat.room()
    alice = await chat.join(room, name="alice")
    bob = await chat.join(room, name="bob")
    await alice.send("x" * 2000)
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await alice.recv()
    assert closed.value.rcvd.code == 1009
    await bob.expect(event="leave", name="alice")
    await bob.send("still here")
    assert (await bob.recv())["message"] == "still here"


async def test_client_vanishing_mid_broadcast_does_not_disturb_the_others(chat):
    room = chat.room()
    watchers = [await chat.join(room) for _ in range(5)]
    sender = await chat.join(room, name="sender")
    goners = [await chat.join(room) for _ in range(5)]
    for n in range(50):
        await sender.send(f"m{n}")
        if n == 10:
            for goner in goners:
                goner.ws.transport.abort()  # vanish without a closing handshake
    for watcher in watchers:
        frames = await watcher.recv_until(lambda f: f.get("message") == "m49")
        assert [f["message"] for f in frames if f["type"] == "user"] == [f"m{n}" for n in range(50)]


@pytest.mark.parametrize("path", ["/a/b", "/..", "/a%2Fb", "/caf%C3%A9", "/" + "r" * 65])
async def test_bad_room_is_refused_with_400_and_a_plain_reason(chat, path):
    with pytest.raises(InvalidStatus) as refusal:
        await chat.connect(path)
    response = refusal.value.response
    assert response.status_code == 400
    assert b"room name" in response.body and response.body.count(b"\n") == 1


async def test_plain_http_visit_gets_426_with_a_hint(chat):
    for port in chat.ports:
        status, body = await http_get(port, "/lobby")
        assert status == 426 and "page" in body


async def test_healthz(chat):
    for port in chat.ports:
        assert await http_get(port, "/healthz") == (200, "ok\n")


async def test_crowded_room_announces_joins_together_once_a_second(start_chat):
    chat = await start_chat(crowd=2)
    room = chat.room("big")
    first = await chat.join(room, name="first")
    await chat.join(room, name="second")
    await first.expect(event="join", name="second")
    # Past the crowd size, newcomers get no join notice of their own...
    others = []
    for n in range(3):
        ws = await chat.connect(f"/{room}?name=n{n}")
        assert json.loads(await ws.recv())["event"] == "welcome"
        others.append(ws)
    # ...and everyone gets one presence notice for all of them.
    notice = await first.expect(event="presence")
    assert notice["joined"] == ["n0", "n1", "n2"] and notice["count"] == 5
    await others[0].close()
    notice = await first.expect(event="presence")
    assert notice["left"] == ["n0"] and notice["count"] == 4


# The batch window is each process's own fan-out: with several processes,
# a test of what a newcomer does to a held batch joins where it is held (at=0).


async def test_batch_window_holds_a_burst_back_and_keeps_its_order(start_chat):
    chat = await start_chat(batch_window=300)
    room = chat.room("batched")
    alice = await chat.join(room, name="alice")
    bob = await chat.join(room, name="bob")
    await alice.expect(event="join", name="bob")
    await asyncio.sleep(0.35)  # let the window of the join notices pass
    loop = asyncio.get_running_loop()
    started = loop.time()
    await alice.send("first")
    assert (await bob.recv())["message"] == "first"
    first_at = loop.time() - started
    for n in range(5):
        await alice.send(f"burst {n}")
    frames = [await bob.recv() for _ in range(5)]
    burst_at = loop.time() - started
    assert [f["message"] for f in frames] == [f"burst {n}" for n in range(5)]
    assert first_at < 0.25 <= burst_at  # the first at once, the burst after the window


async def test_a_newcomer_gets_a_held_back_batch_as_history_not_twice(start_chat):
    chat = await start_chat(batch_window=300)
    room = chat.room("held")
    alice = await chat.join(room, name="alice", at=0)
    await asyncio.sleep(0.35)  # let the window of alice's join notice pass
    await alice.send("first")  # goes at once...
    await alice.expect(message="first")
    await alice.send("second")  # ...and this one is held back
    await asyncio.sleep(0.05)
    bob = await chat.join(room, name="bob", at=0)  # where "second" is held
    assert [f["message"] for f in bob.backlog] == ["first", "second"]
    assert bob.welcome["seq"] == 2
    await alice.send("third")
    later = await bob.recv_until(lambda f: f.get("message") == "third")
    assert [f["seq"] for f in later if f["type"] == "user"] == [3]  # nothing twice
    assert (await alice.expect(type="user"))["message"] == "second"


async def test_an_early_flush_does_not_shorten_the_next_batch_window(start_chat):
    chat = await start_chat(batch_window=1000)
    room = chat.room("timed")
    alice = await chat.join(room, name="alice", at=0)
    await asyncio.sleep(1.05)  # let the window of alice's join notice pass
    loop = asyncio.get_running_loop()
    await alice.send("m1")  # at once; the window runs to +1.0 s
    await alice.expect(message="m1")
    started = loop.time()
    await alice.send("m2")  # held
    await asyncio.sleep(0.5)
    bob = await chat.connect(f"/{room}?name=bob", at=0)  # m2 goes out now...
    assert json.loads(await bob.recv())["event"] == "welcome"  # ...a new window to +1.5 s
    await alice.expect(message="m2")
    await alice.send("m3")
    await alice.expect(message="m3")
    assert loop.time() - started >= 1.3  # not at +1.0 s, when m2's old timer was due


# Reconnecting with a key


async def test_a_client_back_with_its_key_takes_its_name_from_its_old_connection(chat):
    room = chat.room("back")
    alice = await chat.join(room, name="alice")  # her network will "drop"
    bob = await chat.join(room, name="bob")
    key = alice.welcome["key"]
    stranger = await chat.join(room, name="alice", key="a guess")
    assert stranger.name == "alice-2"  # a wrong key takes nothing
    again = await chat.join(room, name="alice", key=key)
    assert again.name == "alice"
    assert again.welcome["key"] != key  # a new key with every welcome
    assert sorted(again.welcome["online"]) == ["alice", "alice-2", "bob"]
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await alice.ws.recv()
    assert closed.value.rcvd.code == 4000
    seen = await bob.recv_until(lambda f: f.get("event") == "join" and f["name"] == "alice")
    assert [(f["event"], f["name"]) for f in seen] == [
        ("join", "alice-2"), ("leave", "alice"), ("join", "alice")]
    assert all(key not in json.dumps(f) for f in seen)
    other = await chat.join(room, name="alice", key=bob.welcome["key"])
    assert other.name == "alice-3"  # bob's key is bob's
    await again.send("still me")
    assert (await bob.expect(type="user"))["id"] == "alice"


async def test_a_replaced_only_member_keeps_its_room_even_with_room_ttl_0(start_chat):
    chat = await start_chat(room_ttl=0)
    room = chat.room("solo")
    alice = await chat.join(room, name="alice")
    await alice.send("kept")
    await alice.expect(message="kept")
    again = await chat.join(room, name="alice", key=alice.welcome["key"])
    assert again.name == "alice" and again.welcome["epoch"] == alice.welcome["epoch"]
    assert [f["message"] for f in again.backlog] == ["kept"]


@pytest.mark.parametrize("command, event", [("/who", "who"), ("/dance", "error"),
                                            ("/help", "help")])
async def test_an_answer_never_overtakes_the_senders_earlier_lines(chat, command, event):
    alice = await chat.join(chat.room(), name="alice")
    await alice.send("first")
    await alice.send(command)
    frames = await alice.recv_until(lambda f: f.get("event") == event)
    assert [f["message"] for f in frames if f["type"] == "user"] == ["first"]


async def test_around_the_crowd_a_client_applying_every_notice_sees_the_room_as_it_is(
        start_chat):
    from test_logic_properties import apply_notice
    chat = await start_chat(crowd=2)
    room = chat.room("crowd")
    watcher = await chat.join(room, name="watcher")
    online = set(watcher.welcome["online"])
    for frame in watcher.backlog:
        apply_notice(online, frame)
    rng = random.Random(12)
    others: dict[int, object] = {}  # bare connections: in a crowd, no join notice comes
    for step in range(30):
        n = rng.randrange(5)
        if n not in others:
            others[n] = await chat.connect(f"/{room}?name=p{n}")
            assert json.loads(await others[n].recv())["event"] == "welcome"
        elif rng.random() < 0.5:
            await others.pop(n).close()
        else:
            await others[n].send(f"/nick q{step}")
            async with asyncio.timeout(5):
                while '"event":"nick"' not in await others[n].recv():
                    pass
    await watcher.send("/who")
    frames = await watcher.recv_until(lambda f: f.get("event") == "who")
    await asyncio.sleep(1.5)  # the last presence notice
    await watcher.send("/who")
    frames += await watcher.recv_until(lambda f: f.get("event") == "who")
    for frame in frames:
        apply_notice(online, frame)
    assert online == set(frames[-1]["online"])


async def test_a_key_is_spent_once_its_new_connection_speaks_but_the_session_goes_on(chat):
    """A key seen in a proxy's log (it travels in the URL) takes nothing once
    the client has spoken on the connection that came with it."""
    room = chat.room()
    alice = await chat.join(room, name="alice", acks=1)
    await alice.send(json.dumps({"cid": "c1", "line": "hello"}))
    first = await alice.expect(event="ack", cid="c1")
    logged = alice.welcome["key"]
    back = await chat.join(room, name="alice", acks=1, key=logged)  # takes alice back
    assert back.name == "alice"
    await back.send(json.dumps({"cid": "c1", "line": "hello"}))  # it speaks: the key is spent
    assert (await back.expect(cid="c1"))["seq"] == first["seq"]  # the same session
    await back.send(json.dumps({"cid": "w", "line": "/who"}))
    await back.expect(event="who")
    thief = await chat.join(room, name="alice", acks=1, key=logged)
    assert thief.name == "alice-2"  # the spent key takes neither the name...
    await thief.send(json.dumps({"cid": "c1", "line": "hello"}))
    assert (await thief.expect(cid="c1"))["seq"] != first["seq"]  # ...nor the session
    newest = await chat.join(room, name="alice", acks=1, key=back.welcome["key"])
    assert newest.name == "alice"  # while the newest key works


async def test_a_nick_notice_never_overtakes_the_senders_earlier_lines(chat):
    from test_hostile_input import Raw, raw_connect
    room = chat.room()
    bob = await chat.join(room, name="bob")
    alice = await raw_connect(chat, f"/{room}?name=alice")
    await bob.expect(event="join", name="alice")
    alice.writer.write(Raw.frame(1, b"first") + Raw.frame(1, b"/nick alicia"))  # read at once
    frames = await bob.recv_until(lambda f: f.get("event") == "nick")
    assert [(f["id"], f["message"]) for f in frames if f["type"] == "user"] == [("alice", "first")]


class StubTransport(asyncio.Transport):
    """A transport that takes every write and sends nothing."""

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_write_buffer_size(self):
        return 0

    def write(self, data):
        pass

    def is_closing(self):
        return False

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def close(self):
        pass

    def abort(self):
        pass


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    mask = bytes(random.randrange(256) for _ in range(4))
    n = len(payload)
    size = (bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big") if n < 65536
            else bytes([127]) + n.to_bytes(8, "big"))
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([fin << 7 | opcode, 0x80 | size[0]]) + size[1:] + mask + masked


async def test_lines_cut_anywhere_between_reads_arrive_once_and_in_order():
    # Whole text frames are read by chatserver itself, anything else by
    # websockets' parser: a stream cut at random places, with pings and
    # fragmented messages among the lines, must give every line once.
    import chatserver
    random.seed(15)
    server = chatserver.ChatServer(chatserver.parse_args(
        ["--rate", "1000000", "--burst", "1000000", "--log-level", "WARNING"]))
    got = []
    server.on_line = lambda client, line: got.append(line)
    for trial in range(60):
        client = chatserver.Client(server)
        client.connection_made(StubTransport())
        client.data_received(b"GET /cut HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        lines, stream = [], b""
        for i in range(random.randrange(1, 30)):
            kind = random.random()
            if kind < 0.1:
                stream += client_frame(9, b"ping")
            elif kind < 0.2:
                text = f"fragmented {i}".encode()
                stream += client_frame(1, text[:4], fin=False) + client_frame(0, text[4:])
                lines.append(text.decode())
            else:
                text = f"{i} " + "x" * random.choice([1, 120, 125, 126, 2000, 60000])
                stream += client_frame(1, text.encode())
                lines.append(text)
        got.clear()
        pos = 0
        while pos < len(stream):
            size = random.choice([1, 2, 3, 7, 64, 1000, 70000, len(stream)])
            client.data_received(stream[pos:pos + size])
            pos += size
        assert got == lines, trial
        client.connection_lost(None)
