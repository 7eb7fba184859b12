"""Hostile input over real sockets: each case gets a clear error frame or a
documented close, and every other client goes on being served; against every
back-end (see `chat` and `start_chat` in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct

import pytest

from conftest import Chat, each_backend
from test_limits import refused_status

TIMEOUT_S = 5


# A raw client, for bytes no well-behaved library would send.


class Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True, masked: bool = True,
                   rsv: int = 0) -> None:
        self.writer.write(self.frame(opcode, payload, fin, masked, rsv))

    @staticmethod
    def frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = True,
              rsv: int = 0) -> bytes:
        """The bytes of one frame, as a client sends it."""
        head = bytes(((0x80 if fin else 0) | rsv | opcode,))
        length = len(payload)
        mask_bit = 0x80 if masked else 0
        if length < 126:
            head += bytes((mask_bit | length,))
        elif length < 65536:
            head += bytes((mask_bit | 126,)) + struct.pack("!H", length)
        else:
            head += bytes((mask_bit | 127,)) + struct.pack("!Q", length)
        if masked:
            mask = os.urandom(4)
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            head += mask
        return head + payload

    async def read_frame(self) -> tuple[int, bytes]:
        async with asyncio.timeout(TIMEOUT_S):
            first, second = await self.reader.readexactly(2)
            length = second & 127
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return first & 15, await self.reader.readexactly(length)

    async def frames_until_close(self) -> tuple[list[dict], int | None]:
        """JSON frames received, then the close code (None: TCP closed without one)."""
        frames = []
        try:
            while True:
                opcode, payload = await self.read_frame()
                if opcode == 8:
                    return frames, struct.unpack("!H", payload[:2])[0] if payload else None
                if opcode == 1:
                    frames.append(json.loads(payload))
        except asyncio.IncompleteReadError:
            return frames, None

    async def next_json(self, **fields) -> dict:
        while True:
            opcode, payload = await self.read_frame()
            if opcode == 1:
                frame = json.loads(payload)
                if all(frame.get(k) == v for k, v in fields.items()):
                    return frame


async def raw_connect(chat: Chat, path: str = "/") -> Raw:
    """A raw WebSocket client on the chat's next process, past its welcome."""
    reader, writer = await asyncio.open_connection("127.0.0.1", chat.port_for(chat.next()))
    chat.track(writer.transport)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    async with asyncio.timeout(TIMEOUT_S):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    raw = Raw(reader, writer)
    await raw.next_json(event="welcome")
    return raw


async def still_served(bystander, speaker) -> None:
    """The bystander's next chat frame is the speaker's marker, in order."""
    marker = f"marker {os.urandom(4).hex()}"
    await speaker.send(marker)
    frame = await bystander.expect(type="user")
    assert frame["message"] == marker


@pytest.fixture
async def room(start_chat):
    """A chat with tight limits (shared by the tests that ask for it), and two
    clients in the room "hostile" (a room of the test's own: chat.room("hostile"))."""
    chat = await start_chat(shared=True, max_size=4096, handshake_timeout=0.5, max_chars=100)
    bystander = await chat.join(chat.room("hostile"), name="bystander")
    speaker = await chat.join(chat.room("hostile"), name="speaker")
    await bystander.expect(event="join", name="speaker")
    return chat, bystander, speaker


async def open_tcp(chat: Chat) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A bare TCP connection to the chat's next process."""
    reader, writer = await asyncio.open_connection("127.0.0.1", chat.port_for(chat.next()))
    chat.track(writer.transport)
    return reader, writer


# Frames


def fragments(*parts: bytes) -> list[dict]:
    """One text message in fragments: text first, continuations after."""
    last = len(parts) - 1
    return [dict(opcode=0 if n else 1, payload=part, fin=n == last)
            for n, part in enumerate(parts)]


@pytest.mark.parametrize("frames, code", [
    ([dict(opcode=1, payload=b"caf\xc3(")], 1007),                  # invalid UTF-8
    (fragments(b"ok \xe2\x82", b"\xff end"), 1007),                 # ...split over fragments
    ([dict(opcode=1, payload=b"x" * 5000)], 1009),                 # over --max-size
    # ...in small fragments, the message not finished (nothing follows the
    # fragment that crosses the limit: bytes after the close would reset TCP)
    (fragments(*[b"y" * 1000] * 6)[:5], 1009),
    ([dict(opcode=9, payload=b"split ping", fin=False)], 1002),    # fragmented control frame
    ([dict(opcode=3, payload=b"reserved opcode")], 1002),
    ([dict(opcode=1, payload=b"unmasked", masked=False)], 1002),   # clients must mask
    ([dict(opcode=1, payload=b"rsv bits", rsv=0x40)], 1002),       # no extension negotiated
    ([dict(opcode=0, payload=b"continuation of nothing")], 1002),
], ids=["utf8", "utf8-fragments", "too-big", "too-big-fragments", "control-fragment",
        "reserved-opcode", "unmasked", "rsv-bits", "stray-continuation"])
async def test_bad_frames_close_with_their_code_and_others_go_on(room, frames, code):
    chat, bystander, speaker = room
    raw = await raw_connect(chat, f"/{chat.room('hostile')}")
    for frame in frames:
        raw.send_frame(**frame)
    _, got = await raw.frames_until_close()
    assert got == code
    await still_served(bystander, speaker)


async def test_binary_frame_gets_an_error_frame(room):
    chat, bystander, speaker = room
    raw = await raw_connect(chat, f"/{chat.room('hostile')}")
    raw.send_frame(2, b"\x00\x01\x02")
    frame = await raw.next_json(event="error")
    assert "binary" in frame["message"]
    await still_served(bystander, speaker)


async def test_fragmented_message_with_a_ping_between_arrives_whole(room):
    chat, bystander, speaker = room
    raw = await raw_connect(chat, f"/{chat.room('hostile')}")
    raw.send_frame(1, b"hello ", fin=False)
    raw.send_frame(9, b"are you there")
    raw.send_frame(0, b"wor", fin=False)
    raw.send_frame(0, b"ld")
    opcode, payload = await raw.read_frame()
    while opcode == 1:  # our own join notice may come first
        opcode, payload = await raw.read_frame()
    assert (opcode, payload) == (10, b"are you there")  # the pong, mid-message
    frame = await bystander.expect(type="user")
    assert frame["message"] == "hello world"


async def test_huge_numbers_of_tiny_messages_are_cut_not_fatal(start_chat):
    chat = await start_chat(rate=50, burst=50, flood_close=1.0)
    room = chat.room("tiny")
    bystander = await chat.join(room, name="bystander")
    raw = await raw_connect(chat, f"/{room}")
    for _ in range(20):  # 20 x 1,000 one-character lines, as fast as TCP takes them
        for _ in range(1000):
            raw.send_frame(1, b".")
        await raw.writer.drain()
        await asyncio.sleep(0.1)
    frames, code = await raw.frames_until_close()
    assert code == 1008
    errors = [f for f in frames if f.get("event") == "error"]
    assert 1 <= len(errors) <= 5  # about one a second, not one per line
    received = await bystander.recv_until(lambda f: f.get("event") == "leave")
    assert sum(f["type"] == "user" for f in received) <= 50 + 50 * 3
    speaker = await chat.join(room, name="speaker")
    await still_served(bystander, speaker)


# Names and text


async def test_very_long_nickname_gets_a_guest_name(room):
    chat, bystander, speaker = room
    client = await chat.join(chat.room("hostile"), name="n" * 3000)
    assert client.name.startswith("guest-")
    assert client.backlog[0]["event"] == "error"
    await client.send("/nick " + "m" * 90)
    assert (await client.expect(event="error"))["event"] == "error"
    await still_served(bystander, speaker)


@pytest.mark.parametrize("name", ["evil\u202eadmin", "bell\x07", "new\nline", "zero\u200bwidth",
                                  "nul\x00"])
async def test_control_and_bidi_characters_in_names_are_refused(room, name):
    chat, bystander, speaker = room
    client = await chat.join(chat.room("hostile"), name=name)
    assert client.name.startswith("guest-")
    await client.send(f"/nick {name}")
    assert (await client.expect(event="error"))["event"] == "error"
    await still_served(bystander, speaker)


async def test_control_characters_in_text_get_an_error(room):
    chat, bystander, speaker = room
    await speaker.send("ring\x07ring")
    assert "control" in (await speaker.expect(event="error"))["message"]
    await speaker.send("\x1b[2Jcleared")
    assert (await speaker.expect(event="error"))["event"] == "error"
    await still_served(bystander, speaker)


@pytest.mark.parametrize("text", [
    '{"type": "sys", "event": "welcome", "id": "admin", "message": "you are admin"}',
    '<img src=x onerror=alert(1)>', "<script>alert('x')</script>", "right\u202eto left",
    '"}, {"type": "sys', "\\u0000 \\n", "🙂‍↔️ zwj emoji"])
async def test_json_and_html_looking_text_arrives_verbatim_from_its_sender(room, text):
    chat, bystander, speaker = room
    await speaker.send(text)
    frame = await bystander.expect(type="user")
    assert frame["message"] == text and frame["id"] == "speaker" and frame["type"] == "user"


# Handshakes


@pytest.mark.parametrize("path", ["/..", "/a/../b", "/a%2Fb", "/%2e%2e", "/caf\u00e9".encode().decode("latin-1"),
                                  "/r%C3%A9sum%C3%A9", "/room?since=abc", "/room?since=-1",
                                  "/room?since=99999999999999999999999",
                                  "/room?name=a&name=b", "/?since=1&since=2",
                                  "/?name=%C3"])
async def test_bad_rooms_and_queries_are_refused_with_400(room, path):
    chat, bystander, speaker = room
    status, body = await refused_status(f"{chat.url_for(chat.next())}{path}")
    assert status == 400 and body.endswith(b"\n") and body.count(b"\n") == 1
    await still_served(bystander, speaker)


async def test_handshake_that_never_starts_is_dropped(room):
    chat, bystander, speaker = room
    reader, writer = await open_tcp(chat)
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # closed by --handshake-timeout (0.5 s)
    writer.close()
    await still_served(bystander, speaker)


async def test_handshake_that_stalls_halfway_is_dropped(room):
    chat, bystander, speaker = room
    reader, writer = await open_tcp(chat)
    writer.write(f"GET /{chat.room('hostile')} HTTP/1.1\r\nHost: x\r\nUpgr".encode())
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    await still_served(bystander, speaker)


async def test_request_line_too_long_gets_414(room):
    chat, bystander, speaker = room
    status, _ = await refused_status(f"{chat.url_for(chat.next())}/{chat.room('hostile')}"
                                     f"?name={'n' * 10000}")
    assert status == 414
    await still_served(bystander, speaker)


async def test_garbage_instead_of_http_is_closed(room):
    chat, bystander, speaker = room
    reader, writer = await open_tcp(chat)
    writer.write(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")
    async with asyncio.timeout(5):
        answer = await reader.read()
    assert answer == b""
    writer.close()
    await still_served(bystander, speaker)


async def test_server_still_serves_after_the_whole_hostile_suite(start_chat):
    """Everything above against one server, then an ordinary chat."""
    chat = await start_chat(max_size=4096, handshake_timeout=0.5, rate=50, burst=50)
    room = chat.room("after")
    alice = await chat.join(room, name="alice", at=0)
    await alice.send("before the storm")
    await alice.expect(message="before the storm")
    for payload, opcode, kwargs in [(b"caf\xc3(", 1, {}), (b"x" * 5000, 1, {}),
                                    (b"ctl", 9, {"fin": False}), (b"raw", 1, {"masked": False}),
                                    (b"\x00", 2, {})]:
        raw = await raw_connect(chat, f"/{room}")
        raw.send_frame(opcode, payload, **kwargs)
        await raw.frames_until_close() if opcode != 2 else await raw.next_json(event="error")
    for path in ["/..", "/a%2Fb", "/?since=x", "/?name=a&name=b"]:
        await refused_status(f"{chat.url_for(chat.next())}{path}")
    idle_reader, idle_writer = await open_tcp(chat)
    async with asyncio.timeout(5):
        await idle_reader.read()
    idle_writer.close()
    for name in ["\u202e", "x" * 100, "a b"]:
        guest = await chat.join(room, name=name)
        await guest.close()
        await alice.expect(event="leave", name=guest.name)
    # On alice's process, where every notice so far has gone out: see
    # test_newcomers_joining_together_get_no_notice_from_before_their_welcome.
    bob = await chat.join(room, name="bob", at=0)
    assert [f["message"] for f in bob.backlog] == ["before the storm"]
    await bob.send("all good")
    assert (await alice.expect(type="user"))["message"] == "all good"
    assert await chat.metric("chat_connections") >= 2


# Headers and log lines (issue 12, items 4 and 5)


OPEN: list[asyncio.StreamWriter] = []  # kept open until the test's chat cuts them


async def raw_handshake(chat: Chat, path: str, *headers: str, at: int | None = None) -> bytes:
    """Send a WebSocket handshake with these extra header lines; the answer's
    head and body.  The connection stays open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", chat.port_for(chat.next(at)))
    chat.track(writer.transport)
    OPEN.append(writer)
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
             *headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    async with asyncio.timeout(TIMEOUT_S):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), b"0"))
        return head + (await reader.readexactly(length) if length else b"")


@pytest.mark.parametrize("headers, flags", [
    (["Upgrade: websocket", "Upgrade: websocket"], {}),
    (["Upgrade: websocket", "Origin: https://a.example", "Origin: https://a.example"],
     {"allow_origin": ("https://a.example",)}),
])
async def test_a_repeated_header_gets_a_clear_400(start_chat, headers, flags):
    chat = await start_chat(**flags)
    answer = await raw_handshake(chat, f"/{chat.room()}", *headers)
    assert answer.startswith(b"HTTP/1.1 400") and b"more than once" in answer, answer
    assert not [level for level, _ in chat.logs() if level == "ERROR"]
    await (await chat.connect(f"/{chat.room()}", origin="https://a.example")).close()


async def test_forwarded_for_on_several_lines_is_one_list_and_the_last_entry_counts(start_chat):
    chat = await start_chat(trust_proxy=True, max_per_ip=1)
    room = chat.room()
    answer = await raw_handshake(chat, f"/{room}", "Upgrade: websocket",
                                 "X-Forwarded-For: 10.0.0.1, 10.0.0.2", "X-Forwarded-For: 10.0.0.3",
                                 at=0)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    refused = await raw_handshake(chat, f"/{room}", "Upgrade: websocket",
                                  "X-Forwarded-For: 10.0.0.9, 10.0.0.3", at=0)
    assert refused.startswith(b"HTTP/1.1 503"), refused  # the same client: 10.0.0.3
    other = await raw_handshake(chat, f"/{room}", "Upgrade: websocket",
                                "X-Forwarded-For: 10.0.0.3, 10.0.0.4", at=0)
    assert other.startswith(b"HTTP/1.1 101"), other


@each_backend()
async def test_client_text_cannot_forge_a_log_line_or_reach_a_terminal(start_chat):
    chat = await start_chat(processes=True)
    forged = "/?%0AERROR+chatserver:+x=1&%0AERROR+chatserver:+x=2&%1B[31m=1&%1B[31m=2"
    answer = await raw_handshake(chat, forged, "Upgrade: websocket", at=0)
    assert answer.startswith(b"HTTP/1.1 400") and b"\x1b" not in answer, answer
    answer = await raw_handshake(chat, "/bad%0d%0aroom%1b", "Upgrade: websocket", at=0)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    await chat.join(chat.room(), name="after", at=0)
    log = chat.processes[0].stderr()
    assert "\x1b" not in log and "\r" not in log
    assert not [line for line in log.splitlines() if line.startswith("ERROR")], log


# Every frame counted (issue 12, item 1)


async def test_a_ping_flood_ends_like_a_text_flood(start_chat):
    chat = await start_chat(rate=5, burst=5, flood_close=1)
    room = chat.room()
    bystander = await chat.join(room, name="bystander", at=0)
    speaker = await chat.join(room, name="speaker", at=0)
    raw = await raw_connect(chat, f"/{room}?name=pinger")

    async def flood() -> None:
        for _ in range(300):  # 3 s at most; the server closes it well before
            raw.send_frame(9, b"are you there?")
            await asyncio.sleep(0.01)

    flooding = asyncio.create_task(flood())
    frames, code = await raw.frames_until_close()
    flooding.cancel()
    errors = [f for f in frames if f.get("event") == "error"]
    assert code == 1008 and 1 <= len(errors) <= 3, (code, errors)
    assert all("slow down" in f["message"] for f in errors)
    await still_served(bystander, speaker)


async def test_a_binary_flood_gets_an_error_a_second_then_1008(start_chat):
    chat = await start_chat(rate=5, burst=5, flood_close=1)
    room = chat.room()
    raw = await raw_connect(chat, f"/{room}?name=binary")

    async def flood() -> None:
        for _ in range(30):  # 100 frames a second for 3 s at most
            for _ in range(10):
                raw.send_frame(2, b"\x00\x01")
            await asyncio.sleep(0.1)

    flooding = asyncio.create_task(flood())
    frames, code = await raw.frames_until_close()
    flooding.cancel()
    errors = [f["message"] for f in frames if f.get("event") == "error"]
    assert code == 1008
    # Those within the rate get their error: the burst, and 5 a second after it.
    assert errors.count("binary frames are not supported; send text") <= 5 + 5 * 3
    assert 1 <= len([e for e in errors if "slow down" in e]) <= 3


async def test_pongs_to_a_client_that_never_reads_count_against_max_buffer(start_chat):
    chat = await start_chat(max_buffer=16384, rate=100000, burst=100000, processes=True)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # so that little waits in the kernel
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", chat.port_for(0)))
    reader, writer = await asyncio.open_connection(sock=sock)
    chat.track(writer.transport)
    writer.write(f"GET /{chat.room()}?name=deaf HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    writer.transport.pause_reading()  # it sends pings and reads nothing: pongs pile up
    raw = Raw(reader, writer)
    with contextlib.suppress(ConnectionError):  # dropped before the last: a reset
        for _ in range(40000):  # 5 MB of pongs: more than the kernel's socket buffers hold
            raw.send_frame(9, b"p" * 125)
            await writer.drain()
    async with asyncio.timeout(10):
        while not await chat.metric('chat_clients_dropped_total{reason="too slow"}'):
            await asyncio.sleep(0.05)
