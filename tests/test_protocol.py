"""The chat protocol over real sockets on loopback, with real websockets clients."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import join


async def test_lobby_is_the_default_room_and_the_welcome_comes_first(server):
    alice = await join(server.url, name="alice")
    assert alice.welcome["room"] == "lobby"
    assert alice.welcome["online"] == ["alice"]
    assert alice.welcome["seq"] == 0 and alice.welcome["epoch"]


async def test_two_clients_chat_and_see_each_others_join_and_leave(server):
    alice = await join(server.url, "soc", name="alice")
    bob = await join(server.url, "soc", name="bob")
    notice = await alice.expect(event="join", name="bob")
    assert notice["count"] == 2 and notice["message"] == "bob has joined"
    await alice.send("hello bob")
    for client in (alice, bob):  # the sender gets its own message too
        frame = await client.recv()
        assert frame["type"] == "user" and frame["id"] == "alice"
        assert frame["message"] == "hello bob" and frame["seq"] == 1 and frame["room"] == "soc"
    await bob.close()
    notice = await alice.expect(event="leave")
    assert notice["name"] == "bob" and notice["count"] == 1
    assert notice["message"] == "bob has left"


async def test_two_rooms_are_isolated(server):
    alice = await join(server.url, "one", name="alice")
    bob = await join(server.url, "two", name="bob")
    await alice.send("only for room one")
    await bob.send("only for room two")
    assert (await alice.recv())["message"] == "only for room one"
    assert (await bob.recv())["message"] == "only for room two"
    await alice.send("/who")
    who = await alice.expect(event="who")
    assert who["online"] == ["alice"]


async def test_nick_changes_are_announced_and_names_stay_unique(server):
    alice = await join(server.url, name="alice")
    alice2 = await join(server.url, name="alice")
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


async def test_invalid_name_gets_a_guest_name_and_an_error(server):
    guest = await join(server.url, name="has space")
    assert guest.name.startswith("guest-")
    assert [f["event"] for f in guest.backlog] == ["error"]


async def test_tutorial_client_sends_plain_strings_and_reads_type_message_id(server):
    # As the tutorial's page does: a plain string out, frame["type"] dispatch in.
    async with connect(f"{server.url}/soc") as ws:
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


async def test_newcomer_gets_history_then_live_traffic_without_gap_or_duplicate(server):
    alice = await join(server.url, name="alice")
    for n in range(5):
        await alice.send(f"m{n + 1}")
    await alice.expect(message="m5")
    bob = await join(server.url, name="bob")
    assert [f["seq"] for f in bob.backlog] == [1, 2, 3, 4, 5]
    assert bob.welcome["seq"] == 5
    await alice.send("m6")
    assert (await bob.recv())["seq"] == 6


async def test_history_while_messages_stream_has_no_gap_and_no_duplicate(server):
    alice = await join(server.url, name="alice")

    async def stream():
        for n in range(200):
            await alice.send(f"m{n + 1}")
            if n % 10 == 0:
                await asyncio.sleep(0)

    sender = asyncio.create_task(stream())
    joiners = []
    for _ in range(5):
        await asyncio.sleep(0.005)
        joiners.append(await join(server.url))
    await sender
    for client in joiners:
        seqs = [f["seq"] for f in client.backlog if f["type"] == "user"]
        if 200 not in seqs:
            frames = await client.recv_until(lambda f: f.get("seq") == 200)
            seqs += [f["seq"] for f in frames if f["type"] == "user"]
        start = seqs[0] if seqs else 200
        assert seqs == list(range(start, 201)), seqs


async def test_resume_gets_exactly_what_was_missed(server):
    alice = await join(server.url, name="alice")
    bob = await join(server.url, name="bob")
    epoch = bob.welcome["epoch"]
    await alice.send("seen")
    assert (await bob.expect(type="user"))["seq"] == 1
    await bob.close()
    for text in ("missed 1", "missed 2"):
        await alice.send(text)
    await alice.expect(message="missed 2")
    bob = await join(server.url, name="bob", since=1, epoch=epoch)
    assert [(f["seq"], f["message"]) for f in bob.backlog] == [(2, "missed 1"), (3, "missed 2")]


async def test_resume_beyond_history_gets_a_gap_notice(start_server):
    server = await start_server(history=2)
    alice = await join(server.url, name="alice")
    epoch = alice.welcome["epoch"]
    for n in range(6):
        await alice.send(f"m{n + 1}")
    await alice.expect(message="m6")
    bob = await join(server.url, name="bob", since=1, epoch=epoch)
    assert bob.backlog[0]["event"] == "gap" and bob.backlog[0]["missed"] == 3
    assert [f["seq"] for f in bob.backlog[1:]] == [5, 6]


async def test_resume_with_a_foreign_epoch_gets_the_full_history(server):
    alice = await join(server.url, name="alice")
    for n in range(3):
        await alice.send(f"m{n + 1}")
    await alice.expect(message="m3")
    bob = await join(server.url, name="bob", since=2, epoch="some-other-epoch")
    assert [f["seq"] for f in bob.backlog] == [1, 2, 3]


async def test_room_forgotten_after_ttl_starts_a_new_epoch(start_server):
    server = await start_server(room_ttl=0.0)
    alice = await join(server.url, "brief", name="alice")
    await alice.send("hello")
    await alice.expect(type="user")
    epoch = alice.welcome["epoch"]
    await alice.close()
    await asyncio.wait_for(_until(lambda: "brief" not in server.chat.rooms
                                  or not server.chat.rooms["brief"].members), 5)
    bob = await join(server.url, "brief", name="bob", since=1, epoch=epoch)
    assert bob.welcome["epoch"] != epoch and bob.welcome["seq"] == 0 and bob.backlog == []


async def test_bad_input_gets_errors_and_never_reaches_the_others(start_server):
    server = await start_server(max_chars=50)
    alice = await join(server.url, name="alice")
    bob = await join(server.url, name="bob")
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


async def test_frame_over_max_size_closes_with_1009_and_others_go_on(start_server):
    server = await start_server(max_size=1024)
    alice = await join(server.url, name="alice")
    bob = await join(server.url, name="bob")
    await alice.send("x" * 2000)
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await alice.recv()
    assert closed.value.rcvd.code == 1009
    await bob.expect(event="leave", name="alice")
    await bob.send("still here")
    assert (await bob.recv())["message"] == "still here"


async def test_client_vanishing_mid_broadcast_does_not_disturb_the_others(server):
    watchers = [await join(server.url) for _ in range(5)]
    sender = await join(server.url, name="sender")
    goners = [await join(server.url) for _ in range(5)]
    for n in range(50):
        await sender.send(f"m{n}")
        if n == 10:
            for goner in goners:
                goner.ws.transport.abort()  # vanish without a closing handshake
    for watcher in watchers:
        frames = await watcher.recv_until(lambda f: f.get("message") == "m49")
        assert [f["message"] for f in frames if f["type"] == "user"] == [f"m{n}" for n in range(50)]


@pytest.mark.parametrize("path", ["/a/b", "/..", "/a%2Fb", "/caf%C3%A9", "/" + "r" * 65])
async def test_bad_room_is_refused_with_400_and_a_plain_reason(server, path):
    with pytest.raises(InvalidStatus) as refusal:
        await connect(f"{server.url}{path}")
    response = refusal.value.response
    assert response.status_code == 400
    assert b"room name" in response.body and response.body.count(b"\n") == 1


async def test_plain_http_visit_gets_426_with_a_hint(server):
    status, body = await _http_get(server.port, "/lobby")
    assert status == 426 and "page" in body


async def test_healthz(server):
    assert await _http_get(server.port, "/healthz") == (200, "ok\n")


async def _http_get(port: int, path: str) -> tuple[int, str]:
    def get():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
    return await asyncio.to_thread(get)


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def test_crowded_room_announces_joins_together_once_a_second(start_server):
    server = await start_server(crowd=2)
    first = await join(server.url, "big", name="first")
    await join(server.url, "big", name="second")
    await first.expect(event="join", name="second")
    # Past the crowd size, newcomers get no join notice of their own...
    others = []
    for n in range(3):
        ws = await connect(f"{server.url}/big?name=n{n}")
        assert json.loads(await ws.recv())["event"] == "welcome"
        others.append(ws)
    # ...and everyone gets one presence notice for all of them.
    notice = await first.expect(event="presence")
    assert notice["joined"] == ["n0", "n1", "n2"] and notice["count"] == 5
    await others[0].close()
    notice = await first.expect(event="presence")
    assert notice["left"] == ["n0"] and notice["count"] == 4


async def test_batch_window_holds_a_burst_back_and_keeps_its_order(start_server):
    server = await start_server(batch_window=300)
    alice = await join(server.url, "batched", name="alice")
    bob = await join(server.url, "batched", name="bob")
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


async def test_a_newcomer_gets_a_held_back_batch_as_history_not_twice(start_server):
    server = await start_server(batch_window=300)
    alice = await join(server.url, "held", name="alice")
    await asyncio.sleep(0.35)  # let the window of alice's join notice pass
    await alice.send("first")  # goes at once...
    await alice.expect(message="first")
    await alice.send("second")  # ...and this one is held back
    await asyncio.sleep(0.05)
    bob = await join(server.url, "held", name="bob")
    assert [f["message"] for f in bob.backlog] == ["first", "second"]
    assert bob.welcome["seq"] == 2
    await alice.send("third")
    later = await bob.recv_until(lambda f: f.get("message") == "third")
    assert [f["seq"] for f in later if f["type"] == "user"] == [3]  # nothing twice
    assert (await alice.expect(type="user"))["message"] == "second"


async def test_a_client_back_with_its_key_takes_its_name_from_its_old_connection(start_server):
    server = await start_server()
    alice = await join(server.url, "back", name="alice")  # her network will "drop"
    bob = await join(server.url, "back", name="bob")
    key = alice.welcome["key"]
    stranger = await join(server.url, "back", name="alice", key="a guess")
    assert stranger.name == "alice-2"  # a wrong key takes nothing
    again = await join(server.url, "back", name="alice", key=key)
    assert again.name == "alice" and again.welcome["key"] == key  # one key per session
    assert sorted(again.welcome["online"]) == ["alice", "alice-2", "bob"]
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await alice.ws.recv()
    assert closed.value.rcvd.code == 4000
    seen = await bob.recv_until(lambda f: f.get("event") == "join" and f["name"] == "alice")
    assert [(f["event"], f["name"]) for f in seen] == [
        ("join", "alice-2"), ("leave", "alice"), ("join", "alice")]
    assert all(key not in json.dumps(f) for f in seen)
    other = await join(server.url, "back", name="alice", key=bob.welcome["key"])
    assert other.name == "alice-3"  # bob's key is bob's
    await again.send("still me")
    assert (await bob.expect(type="user"))["id"] == "alice"


async def test_a_replaced_only_member_keeps_its_room_even_with_room_ttl_0(start_server):
    server = await start_server(room_ttl=0)
    alice = await join(server.url, "solo", name="alice")
    await alice.send("kept")
    await alice.expect(message="kept")
    again = await join(server.url, "solo", name="alice", key=alice.welcome["key"])
    assert again.name == "alice" and again.welcome["epoch"] == alice.welcome["epoch"]
    assert [f["message"] for f in again.backlog] == ["kept"]


async def test_an_early_flush_does_not_shorten_the_next_batch_window(start_server):
    server = await start_server(batch_window=1000)
    alice = await join(server.url, "timed", name="alice")
    await asyncio.sleep(1.05)  # let the window of alice's join notice pass
    loop = asyncio.get_running_loop()
    await alice.send("m1")  # at once; the window runs to +1.0 s
    await alice.expect(message="m1")
    started = loop.time()
    await alice.send("m2")  # held
    await asyncio.sleep(0.5)
    bob = await connect(f"{server.url}/timed?name=bob")  # m2 goes out now...
    assert json.loads(await bob.recv())["event"] == "welcome"  # ...a new window to +1.5 s
    await alice.expect(message="m2")
    await alice.send("m3")
    await alice.expect(message="m3")
    assert loop.time() - started >= 1.3  # not at +1.0 s, when m2's old timer was due
