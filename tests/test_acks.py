"""Acknowledged, idempotent sends (acks=1), against every back-end: each
line gets exactly one ack or one error naming its cid, and a cid sent again
is answered as the first time and posted once."""

from __future__ import annotations

import json

import pytest

from conftest import Client, chat_lines
from test_hostile_input import Raw, raw_connect


def line(cid: str, text: str) -> str:
    return json.dumps({"cid": cid, "line": text})


async def answer(client: Client, cid: str) -> dict:
    """The ack or error that names `cid`, skipping everything else."""
    frames = await client.recv_until(lambda f: f.get("cid") == cid)
    assert frames[-1]["event"] in ("ack", "error"), frames[-1]
    return frames[-1]


async def test_a_line_is_acked_with_the_seq_it_became_and_reaches_everyone(chat):
    room = chat.room()
    alice = await chat.join(room, name="alice", acks=1)
    bob = await chat.join(room, name="bob")
    await alice.expect(event="join", name="bob")
    await alice.send(line("c1", "hello"))
    frames: list[dict] = []
    while not (any(f.get("event") == "ack" for f in frames)
               and any(f["type"] == "user" for f in frames)):
        frames.append(await alice.recv())  # the ack and the echo, in either order
    ack = next(f for f in frames if f.get("event") == "ack")
    echo = next(f for f in frames if f["type"] == "user")
    assert ack["cid"] == "c1" and ack["room"] == room and ack["message"] == "" and ack["ts"]
    assert ack["seq"] == echo["seq"] == 1 and echo["message"] == "hello"
    assert await chat_lines(bob, 1) == [(1, "alice", "hello")]


async def test_acks_come_in_the_order_the_lines_were_sent(chat):
    alice = await chat.join(chat.room(), name="alice", acks=1)
    for n in range(20):
        await alice.send(line(f"n{n}", f"line {n}"))
    frames = await alice.recv_until(lambda f: f.get("cid") == "n19")
    acks = [f for f in frames if f.get("event") == "ack"]
    assert [f["cid"] for f in acks] == [f"n{n}" for n in range(20)]
    assert [f["seq"] for f in acks] == list(range(1, 21))


@pytest.mark.parametrize("text, says", [
    ("x" * 2001, "too long"),
    ("beep\x07", "control characters"),
    ("/dance", "unknown command"),
    ("/me", "usage: /me"),
    ("/nick has space", "spaces"),
    ("/nick bob", "taken"),
    ("/nick alice", "already alice"),
])
async def test_each_refused_line_gets_an_error_with_its_cid_and_is_not_posted(chat, text, says):
    room = chat.room()
    alice = await chat.join(room, name="alice", acks=1)
    await chat.join(room, name="bob")
    await alice.send(line("bad", text))
    error = await answer(alice, "bad")
    assert error["event"] == "error" and says in error["message"], error
    await alice.send(line("good", "fine"))
    assert (await answer(alice, "good"))["seq"] == 1  # the refused line took no seq


async def test_lines_over_the_rate_each_get_an_error_with_their_cid(start_chat):
    chat = await start_chat(rate=1, burst=2, flood_close=60)
    alice = await chat.join(chat.room(), name="alice", acks=1)
    for n in range(5):
        await alice.send(line(f"f{n}", f"line {n}"))
    answers = [await answer(alice, f"f{n}") for n in range(5)]
    assert [a["event"] for a in answers] == ["ack", "ack", "error", "error", "error"]
    assert all("slow down" in a["message"] for a in answers[2:])


async def test_a_posted_line_sent_again_past_the_rate_gets_its_ack_not_an_error(start_chat):
    """A page back after a reconnect resends its unacked lines, maybe more
    than --burst: one that was posted is acked again, with its seq, even if
    the rate refuses the resend; "not sent" would be untrue."""
    chat = await start_chat(rate=0.01, burst=3, flood_close=60)
    alice = await chat.join(chat.room(), name="alice", acks=1)
    for cid in ("a", "b", "c"):  # the burst, spent
        await alice.send(line(cid, f"line {cid}"))
        assert (await answer(alice, cid))["event"] == "ack"
    await alice.send(line("a", "line a"))
    again = await answer(alice, "a")
    assert (again["event"], again.get("seq")) == ("ack", 1), again


async def test_commands_are_acked_with_no_seq_and_not_run_twice(chat):
    room = chat.room()
    alice = await chat.join(room, name="alice", acks=1)
    await alice.send(line("w", "/who"))
    frames = await alice.recv_until(lambda f: f.get("cid") == "w")
    assert frames[-1]["event"] == "ack" and frames[-1]["seq"] is None
    assert any(f.get("event") == "who" for f in frames)
    await alice.send(line("n", "/nick alicia"))
    first = await answer(alice, "n")
    assert first["event"] == "ack" and first["seq"] is None
    await alice.expect(event="nick", name="alicia")
    await alice.send(line("n", "/nick alicia"))  # sent again: "you are already alicia"?
    await alice.send(line("w2", "/who"))
    frames = await alice.recv_until(lambda f: f.get("cid") == "w2")
    again = next(f for f in frames if f.get("cid") == "n")
    assert again["event"] == "ack" and again["seq"] is None
    assert not [f for f in frames if f.get("event") in ("nick", "error")], frames


async def test_the_same_cid_on_the_same_connection_is_posted_once(chat):
    room = chat.room()
    alice = await chat.join(room, name="alice", acks=1)
    bob = await chat.join(room, name="bob")
    await alice.send(line("once", "only once"))
    first = await answer(alice, "once")
    await alice.send(line("once", "only once"))
    again = await answer(alice, "once")
    assert again["event"] == "ack" and again["seq"] == first["seq"] == 1
    await alice.send(line("next", "after"))
    assert (await answer(alice, "next"))["seq"] == 2
    assert await chat_lines(bob, 2) == [(1, "alice", "only once"), (2, "alice", "after")]


async def test_the_same_cid_after_a_reconnect_with_the_key_is_posted_once(chat):
    """The page's resend after a dead link: the session goes on with the key,
    on the same process or (with --broker) another."""
    room = chat.room()
    bob = await chat.join(room, name="bob", at=0)
    for at in (0, len(chat.urls) - 1):
        alice = await chat.join(room, name="alice", acks=1, at=0)
        await alice.send(line(f"k{at}", "sent before the link died"))
        first = await answer(alice, f"k{at}")
        # The link dies without a close; the page comes back with its key.
        back = await chat.join(room, name="alice", acks=1, key=alice.welcome["key"], at=at)
        assert back.name == "alice"
        await back.send(line(f"k{at}", "sent before the link died"))
        again = await answer(back, f"k{at}")
        assert again["event"] == "ack" and again["seq"] == first["seq"]
        alice.ws.transport.abort()
        await back.close()
    await bob.send("done")
    lines = [m for m in await chat_lines(bob, 3)]
    assert [m[2] for m in lines] == ["sent before the link died"] * 2 + ["done"]


async def test_a_session_goes_on_after_its_connection_was_found_gone(chat):
    room = chat.room()
    alice = await chat.join(room, name="alice", acks=1)
    await alice.send(line("gone", "hello"))
    first = await answer(alice, "gone")
    key = alice.welcome["key"]
    await alice.close()  # the server has seen it leave: the name is free
    back = await chat.join(room, name="alice", acks=1, key=key)
    await back.send(line("gone", "hello"))
    assert (await answer(back, "gone"))["seq"] == first["seq"]


async def test_a_cid_from_another_session_is_never_taken_for_yours(chat):
    room = chat.room()
    alice = await chat.join(room, name="alice", acks=1)
    bob = await chat.join(room, name="bob", acks=1)
    await alice.send(line("same", "from alice"))
    assert (await answer(alice, "same"))["seq"] == 1
    await bob.send(line("same", "from bob"))
    assert (await answer(bob, "same"))["seq"] == 2
    # A wrong key is another session too.
    mallory = await chat.join(room, name="mallory", acks=1, key="not-alices-key")
    await mallory.send(line("same", "from mallory"))
    assert (await answer(mallory, "same"))["seq"] == 3


@pytest.mark.parametrize("frame", [
    "plain text",
    "[1, 2]",
    '{"line": "no cid"}',
    '{"cid": "", "line": "empty cid"}',
    '{"cid": "has space", "line": "x"}',
    '{"cid": "' + "x" * 65 + '", "line": "x"}',
    '{"cid": 7, "line": "x"}',
    '{"cid": "ok", "line": 7}',
    '{"cid": "ok"}',
    '"a string"',
])
async def test_malformed_frames_on_an_acks_connection_get_an_error_and_post_nothing(chat, frame):
    room = chat.room()
    alice = await chat.join(room, name="alice", acks=1)
    await alice.send(frame)
    error = await alice.expect(event="error")
    assert '{"cid": ID, "line": TEXT}' in error["message"]
    if '"cid": "ok"' in frame:
        assert error["cid"] == "ok"
    else:
        assert "cid" not in error
    await alice.send(line("after", "still here"))
    assert (await answer(alice, "after"))["seq"] == 1


@pytest.mark.parametrize("text", ["hi \ud800", "/me \udfff", "/\ud800", "/topic \udc00"])
async def test_a_lone_surrogate_gets_an_error_and_the_lines_beside_it_are_posted(chat, text):
    """JSON can carry half of a UTF-16 pair, which no text frame can: the
    line is refused with its cid, and nobody else's line suffers (with the
    store it failed every line of its commit; in memory it gave a traceback)."""
    room = chat.room()
    mallory = await chat.join(room, name="mallory", acks=1)
    alice = await chat.join(room, name="alice", acks=1)
    await mallory.send(line("bad", text))
    await alice.send(line("good", "beside it"))
    assert "lone surrogate" in (await answer(mallory, "bad"))["message"]
    assert (await answer(alice, "good"))["event"] == "ack"
    await mallory.send(line("after", "still here"))
    assert (await answer(mallory, "after"))["event"] == "ack"


async def test_a_plain_connection_beside_an_acks_one_is_unchanged(chat):
    room = chat.room()
    alice = await chat.join(room, name="alice", acks=1)
    plain = await chat.join(room, name="plain")
    await plain.send('{"cid": "c", "line": "looks like an acked frame"}')
    frame = await plain.expect(type="user")
    assert frame["message"] == '{"cid": "c", "line": "looks like an acked frame"}'
    await plain.send("/who")
    frames = await plain.recv_until(lambda f: f.get("event") == "who")
    assert not [f for f in frames if "cid" in f], frames
    await alice.send(line("a", "hi"))
    assert (await answer(alice, "a"))["seq"] == 2


async def test_the_same_cid_twice_in_a_row_is_posted_once_and_acked_twice(chat):
    """The second copy may arrive while the first is still on its way (a
    store's commit, a Redis call): it waits for it and gets its ack."""
    room = chat.room()
    bob = await chat.join(room, name="bob")
    raw = await raw_connect(chat, f"/{room}?name=alice&acks=1")
    await bob.expect(event="join", name="alice")
    twice = Raw.frame(1, line("twice", "only once").encode())
    raw.writer.write(twice + twice)  # one write: the server reads both at once
    first = await raw.next_json(event="ack", cid="twice")
    again = await raw.next_json(cid="twice")
    assert again["event"] == "ack" and first["seq"] == again["seq"]
    raw.send_frame(1, line("next", "after").encode())
    await raw.next_json(event="ack", cid="next")
    assert await chat_lines(bob, 2) == [(first["seq"], "alice", "only once"),
                                        (first["seq"] + 1, "alice", "after")]


async def test_a_session_remembers_at_most_what_one_client_may_send_in_ten_minutes(start_chat):
    """--rate x 600 + --burst cids, at least 1,000: a session on two
    connections at once (two rooms, on two processes with --broker) sends
    more, and its oldest cids go, young as they are; the newest are kept."""
    chat = await start_chat(rate=0.001, burst=1000, flood_close=60)  # 1,000 at most
    alice = await chat.join(chat.room("a"), name="alice", acks=1, at=0)
    other = await chat.join(chat.room("b"), name="alice", acks=1,
                            key=alice.welcome["key"], at=len(chat.urls) - 1)
    for client, tag in ((alice, "a"), (other, "b")):
        for n in range(600):
            await client.send(line(f"{tag}{n}", "hello"))
        await answer(client, f"{tag}599")
    await alice.send(line("a200", "hello"))  # the oldest of the newest 1,000
    assert (await answer(alice, "a200"))["seq"] == 201
    await alice.send(line("a199", "hello"))  # forgotten: posted again
    assert (await answer(alice, "a199"))["seq"] == 601
    await other.send(line("b599", "hello"))
    assert (await answer(other, "b599"))["seq"] == 600
