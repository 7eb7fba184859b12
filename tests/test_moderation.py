"""Signed identities and moderation (--auth-secret): tokens made by PyJWT,
real servers in memory and with --store, real websockets clients."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time

import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import ROOT, chat_lines, join

SECRET = b"s" * 40

# Every back-end: in memory, with --store, and over Redis (two processes,
# the clients spread over both).
both = pytest.mark.parametrize("backend", ["memory", "store", "redis"])


def token(name: str = "alice", ttl: float = 60, secret: bytes = SECRET, **claims) -> str:
    return jwt.encode({"sub": name, "exp": int(time.time() + ttl), **claims}, secret,
                      algorithm="HS256")


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    return str(path)


@pytest.fixture
async def chat(start_chat, secret_file):
    return await start_chat(auth_secret=secret_file)


async def joined_soon(chat, room: str, **params):
    """Join once a lifted ban has reached the process joined (with Redis it
    goes to the others over a channel: within a round trip or so)."""
    async with asyncio.timeout(3):
        while True:
            try:
                return await chat.join(room, **params)
            except InvalidStatus as refusal:
                assert refusal.response.status_code == 403
                await asyncio.sleep(0.05)


async def refused(chat, room: str, **params) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as caught:
        await chat.join(room, **params)
    response = caught.value.response
    return response.status_code, response.body.decode()


@both
async def test_a_token_vouches_for_a_name_and_a_bad_one_is_refused(chat):
    room = chat.room()
    alice = await chat.join(room, token=token("alice", mod=[room]))
    assert alice.name == "alice" and alice.welcome["verified"] == ["alice"]
    assert alice.welcome["mod"] is True and alice.welcome["topic"] == ""
    guest = await chat.join(room, name="bob")
    assert guest.welcome["verified"] == ["alice"] and "mod" not in guest.welcome
    assert (await alice.expect(event="join", name="bob")).get("verified") is None
    await alice.send("signed")
    frame = await guest.expect(type="user")
    assert frame["id"] == "alice" and frame["verified"] is True
    await guest.send("plain")
    assert "verified" not in await alice.expect(type="user", message="plain")

    unsigned = jwt.encode({"sub": "eve", "exp": int(time.time()) + 60}, None, algorithm="none")
    head, body, signature = token("eve").split(".")
    tampered = ".".join((head, jwt.utils.base64url_encode(
        json.dumps({"sub": "alice", "exp": int(time.time()) + 60}).encode()).decode(), signature))
    cases = [(token("eve", ttl=-10), 401, "expired"),
             (token("eve", secret=b"x" * 40), 401, "not signed"),
             (unsigned, 401, "invalid"),
             (tampered, 401, "not signed"),
             ("not.a.token", 401, "invalid"),
             (token("eve", rooms=["other", "dev-*"]), 403, "does not open"),
             (token("bad name\n"), 401, "not a valid name")]
    for bad, status, words in cases:
        code, body = await refused(chat, room, token=bad)
        assert (code, words in body) == (status, True), (bad, code, body)
    assert await chat.join(room, token=token("eve", rooms=[f"{room[:4]}*"]))  # a pattern
    assert all(bad not in text for _, text in chat.logs() for bad, _, _ in cases)


@both
async def test_require_auth_refuses_guests(start_chat, secret_file):
    chat = await start_chat(auth_secret=secret_file, require_auth=True)
    room = chat.room()
    assert (await refused(chat, room, name="guest"))[0] == 401
    assert (await chat.join(room, token=token("carol"))).name == "carol"


@both
async def test_a_verified_name_is_taken_from_a_guest_who_holds_it(chat):
    room = chat.room()
    guest = await chat.join(room, name="alice", at=0)
    alice = await chat.join(room, token=token("alice"), at=0)  # the same process
    assert alice.name == "alice"
    notice = await guest.expect(event="nick")
    assert (notice["old"], notice["name"]) == ("alice", "alice-2")
    await guest.send("/nick alice")
    assert "taken" in (await guest.expect(event="error"))["message"]
    await alice.send("/nick other")
    assert "sign-in" in (await alice.expect(event="error"))["message"]
    again = await chat.join(room, token=token("alice"))  # a second tab: it takes over
    assert again.name == "alice"
    with pytest.raises(ConnectionClosed) as closed:
        await alice.expect(event="never")
    assert closed.value.rcvd.code == 4000


@both
async def test_moderators_kick_ban_unban_and_others_may_not(chat):
    room = chat.room()
    mod = await chat.join(room, token=token("mod", mod=True))
    troll = await chat.join(room, name="troll")
    verified = await chat.join(room, token=token("vic"))
    outsider_mod = await chat.join(room, token=token("other", mod=["elsewhere"]))
    for command in ("/kick mod", "/ban mod", "/topic x", "/delete 1", "/bans", "/unban x"):
        await troll.send(command)
        assert "only moderators" in (await troll.expect(event="error"))["message"]
    await outsider_mod.send("/kick troll")
    assert "only moderators" in (await outsider_mod.expect(event="error"))["message"]
    await troll.send("/help")
    assert "/kick" not in (await troll.expect(event="help"))["message"]
    await mod.send("/help")
    assert "/kick" in (await mod.expect(event="help"))["message"]

    await mod.send("/kick troll spamming links")
    notice = await verified.expect(event="kick")
    assert (notice["name"], notice["by"], notice["reason"]) == ("troll", "mod", "spamming links")
    assert (await troll.expect(event="kick")) == notice  # told why, then closed
    with pytest.raises(ConnectionClosed) as closed:
        await troll.expect(event="never")
    assert closed.value.rcvd.code == 4001 and "spamming links" in closed.value.rcvd.reason
    newcomer = await chat.join(room, name="newcomer")
    assert "troll" not in newcomer.welcome["online"]
    troll = await chat.join(room, name="troll")  # a kick is not a ban

    # Every client here is on 127.0.0.1: one address ban keeps out every guest.
    await mod.send("/ban vic 0")
    assert (await mod.expect(event="kick", name="vic"))["until"] is None
    assert (await refused(chat, room, token=token("vic")))[0] == 403
    assert (await refused(chat, room, name="vic-as-a-guest"))[0] == 403  # nor as a guest
    assert (await chat.join(room, token=token("zed"))).name == "zed"  # others' tokens: in
    await mod.send("/unban vic")
    assert (await joined_soon(chat, room, token=token("vic"))).name == "vic"

    await mod.send("/ban troll 2h flooding")
    notice = await outsider_mod.expect(event="kick", name="troll", ban=True)
    assert notice["ban"] is True and notice["until"] > time.time() * 1000 + 7100_000
    assert (await troll.expect(event="kick", name="troll"))["until"] == notice["until"]
    code, body = await refused(chat, room, name="someone-else")  # a guest: by address
    assert code == 403 and "flooding" in body
    await mod.send("/bans")
    bans = (await mod.expect(event="bans"))["bans"]
    assert [(b["name"], b["kind"]) for b in bans] == [("troll", "address")]
    await mod.send("/unban troll")
    await mod.send("/unban nobody")
    assert "not banned" in (await mod.expect(event="error"))["message"]
    assert (await joined_soon(chat, room, name="troll")).name == "troll"
    await mod.send("/kick nobody")
    assert "no one named" in (await mod.expect(event="error"))["message"]
    logged = [text for _, text in chat.logs() if text.startswith("moderation")]
    assert len(logged) == 5 and all("flooding" not in text for text in logged)
    assert "action=ban subject=vic" in " ".join(logged)


@both
async def test_topic_and_delete_reach_everyone_and_every_newcomer(chat):
    room = chat.room()
    mod = await chat.join(room, token=token("mod", mod=[room]))
    reader = await chat.join(room, name="reader")
    for text in ("one", "two", "three"):
        await mod.send(text)
    seqs = [seq for seq, _, _ in await chat_lines(reader, 3)]
    await mod.send("/topic Rules: be kind")
    notice = await reader.expect(event="topic")
    assert (notice["topic"], notice["by"]) == ("Rules: be kind", "mod")
    await mod.send(f"/delete {seqs[1]}")
    assert (await reader.expect(event="delete"))["seq"] == seqs[1]
    await mod.send("/delete 999")
    assert "no message 999" in (await mod.expect(event="error"))["message"]
    for odd in ("²", "9" * 20):  # a digit to isdigit() but not to int(); past SQLite's
        await mod.send(f"/delete {odd}")
        assert "usage: /delete" in (await mod.expect(event="error"))["message"]
    newcomer = await chat.join(room, name="new")
    assert newcomer.welcome["topic"] == "Rules: be kind"
    assert [f["message"] for f in newcomer.backlog if f["type"] == "user"] == ["one", "three"]
    resumed = await chat.join(room, name="back", since=seqs[0], epoch=mod.welcome["epoch"])
    assert [f["message"] for f in resumed.backlog if f["type"] == "user"] == ["three"]


async def test_bans_the_topic_and_deletions_survive_a_restart_of_the_store(
        run_process, tmp_path, secret_file):
    args = ("--store", str(tmp_path / "rooms.db"), "--auth-secret", secret_file)
    server = run_process(*args)
    mod = await join(server.url, "kept", token=token("mod", mod=True))
    victim = await join(server.url, "kept", token=token("vic"))
    for text in ("one", "two"):
        await mod.send(text)
    seqs = [seq for seq, _, _ in await chat_lines(victim, 2)]
    await mod.send("/topic kept")
    await mod.send(f"/delete {seqs[0]}")
    await mod.send("/ban vic 0 rude")
    await mod.expect(event="kick", name="vic")  # each carried out in order, so all are saved
    server.popen.kill()
    server.popen.wait()
    server = run_process(*args)
    with pytest.raises(InvalidStatus) as caught:
        await join(server.url, "kept", token=token("vic"))
    assert caught.value.response.status_code == 403
    assert "rude" in caught.value.response.body.decode()
    with pytest.raises(InvalidStatus):  # nor as a guest from its address
        await join(server.url, "kept", name="reader")
    back = await join(server.url, "kept", token=token("reader"))
    assert back.welcome["topic"] == "kept"
    assert [f["message"] for f in back.backlog if f["type"] == "user"] == ["two"]


async def test_a_ban_is_on_disk_before_anyone_sees_its_notice(run_process, tmp_path, secret_file):
    """With --store, the kick notice of a ban waits for the ban's commit (it
    went out first: a SIGKILL between the two forgot a ban the room saw).
    Another program holds the database's write lock for a moment, less than
    the store waits for it."""
    db = tmp_path / "rooms.db"
    server = run_process("--store", str(db), "--auth-secret", secret_file)
    mod = await join(server.url, "kept", token=token("mod", mod=True))
    await join(server.url, "kept", token=token("vic"))
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    await mod.send("/ban vic 0 rude")
    with pytest.raises(TimeoutError):  # not while the ban cannot be written
        await mod.recv_until(lambda f: f.get("event") == "kick", timeout=0.4)
    holder.execute("ROLLBACK")
    holder.close()
    await mod.expect(event="kick", name="vic")
    server.popen.kill()
    server.popen.wait()
    server = run_process("--store", str(db), "--auth-secret", secret_file)
    with pytest.raises(InvalidStatus) as caught:
        await join(server.url, "kept", token=token("vic"))
    assert caught.value.response.status_code == 403


async def test_a_ban_that_cannot_be_saved_still_removes_and_says_so(run_process, tmp_path,
                                                                    secret_file):
    db = tmp_path / "rooms.db"
    server = run_process("--store", str(db), "--auth-secret", secret_file)
    mod = await join(server.url, "kept", token=token("mod", mod=True))
    vic = await join(server.url, "kept", token=token("vic"))
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # held past the store's wait: the ban is not saved
    await mod.send("/ban vic 0 rude")
    frames = await mod.recv_until(lambda f: f.get("event") == "error")
    holder.execute("ROLLBACK")
    holder.close()
    assert "not saved" in frames[-1]["message"], frames
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await vic.recv()
    assert closed.value.rcvd.code == 4001


def start_fails(*args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "chatserver.py"), "--port", "0", *args],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_the_flags_are_checked_at_start(tmp_path, secret_file):
    short = tmp_path / "short"
    short.write_bytes(b"tooshort")
    assert "shorter than 32 bytes" in start_fails("--auth-secret", str(short))
    assert "cannot read the auth secret" in start_fails("--auth-secret", str(tmp_path / "none"))
    assert "needs --auth-secret" in start_fails("--require-auth")


async def test_chatserver_token_prints_a_token_the_server_accepts(run_process, secret_file):
    made = subprocess.run(
        [sys.executable, str(ROOT / "chatserver.py"), "token", "--secret-file", secret_file,
         "--name", "dana", "--mod", "--rooms", "dev-*", "--ttl", "600"],
        capture_output=True, text=True, timeout=30, check=True)
    claims = jwt.decode(made.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "dana" and claims["mod"] is True and claims["rooms"] == ["dev-*"]
    assert 590 < claims["exp"] - time.time() <= 600
    server = run_process("--auth-secret", secret_file)
    dana = await join(server.url, "dev-1", token=made.stdout.strip())
    assert (dana.name, dana.welcome["mod"], dana.welcome["verified"]) == ("dana", True, ["dana"])
    with pytest.raises(InvalidStatus):
        await join(server.url, "lobby", token=made.stdout.strip())
