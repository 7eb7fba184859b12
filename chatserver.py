"""chatserver: a small, fast WebSocket chat-room server.

Run it with ``python chatserver.py`` (or ``chatserver`` once installed) and
open ``public/index.html`` in a browser, from disk or from any web server:
``python -m http.server -d public`` serves it on http://localhost:8000/.

The server speaks the chat protocol described in README.md: clients connect to
``ws://HOST:8765/ROOM?name=NICK&since=SEQ&epoch=EPOCH``, send chat lines as
text frames and receive JSON frames (``{"type": "sys"|"user", ...}``).  It
keeps rooms, nicknames and each room's recent history in memory.  It does not
serve the page; it answers a few plain HTTP requests on the same port
(``/healthz``, ``/metrics``).

It is meant to face the internet: every limit (message size, rate, rooms,
clients, slow readers) is a command-line flag with a sane default.

The module reads top-down: configuration, frames, the chat logic (no I/O),
the fan-out, the connection handler, the HTTP answers, then ``main()``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import logging
import os
import re
import resource
import secrets
import signal
import ssl
import sys
import threading
import time
import unicodedata
import urllib.parse
import weakref
from collections.abc import Callable, Iterable

from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

__all__ = ["Config", "Chat", "Room", "Member", "ChatServer", "Client", "listen", "shut_down",
           "main"]

log = logging.getLogger("chatserver")
protocol_log = logging.getLogger("chatserver.protocol")  # websockets' own messages


# Configuration ------------------------------------------------------------

DEFAULT_PORT = 8765  # not 8000: `python -m http.server` takes that one.
HISTORY_MESSAGES = 100
ROOM_TTL_S = 3600.0
MAX_CHARS = 2000
MAX_SIZE_BYTES = 64 * 1024
RATE_PER_S = 5.0
BURST_MESSAGES = 20
FLOOD_CLOSE_S = 10.0
MAX_ROOMS = 10_000
MAX_CLIENTS = 10_000
MAX_PER_IP = 100
MAX_BUFFER_BYTES = 1024 * 1024
HANDSHAKE_TIMEOUT_S = 10.0
PING_INTERVAL_S = 20.0
PING_TIMEOUT_S = 20.0
SHUTDOWN_TIMEOUT_S = 5.0

NAME_MAX_CHARS = 32
LOBBY = "lobby"
ROOM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
KEY = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")  # what secrets.token_urlsafe gives
FLOOD_ERROR_INTERVAL_S = 1.0  # at most one "slow down" error a second
FLOOD_QUIET_S = 1.0  # a flood ends after this long without a refused line
SWEEP_INTERVAL_S = 60.0  # how often idle rooms are looked for
CROWD_MEMBERS = 100
BATCH_WINDOW_MS = 15.0  # a busy room sends at most every 15 ms; see --batch-window
PRESENCE_INTERVAL_S = 1.0  # a crowded room's joins and leaves, gathered
PRESENCE_NAMES = 20  # names listed in one presence notice

# WebSocket close codes we use, besides the library's own (1007 bad UTF-8,
# 1009 frame too big, 1011 ping timeout).
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008  # flooding, too slow
CLOSE_REPLACED = 4000  # the same client came back on a new connection (?key=)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that can be set from the command line, with its default."""

    host: str | None = None  # None: all interfaces, like http.server
    port: int = DEFAULT_PORT
    history: int = HISTORY_MESSAGES
    room_ttl: float = ROOM_TTL_S
    max_chars: int = MAX_CHARS
    max_size: int = MAX_SIZE_BYTES
    rate: float = RATE_PER_S
    burst: int = BURST_MESSAGES
    flood_close: float = FLOOD_CLOSE_S
    crowd: int = CROWD_MEMBERS
    batch_window: float = BATCH_WINDOW_MS
    max_rooms: int = MAX_ROOMS
    max_clients: int = MAX_CLIENTS
    max_per_ip: int = MAX_PER_IP
    trust_proxy: bool = False
    allow_origin: tuple[str, ...] = ()
    max_buffer: int = MAX_BUFFER_BYTES
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S
    ping_interval: float = PING_INTERVAL_S
    ping_timeout: float = PING_TIMEOUT_S
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_S
    certfile: str | None = None
    keyfile: str | None = None
    log_level: str = "INFO"
    uvloop: bool = False
    broker: str | None = None  # redis://HOST:PORT/DB to share rooms with other processes
    workers: int = 1


# Frames -------------------------------------------------------------------
#
# Every frame the server sends is built here, as a dict.  `encode` turns one
# into the bytes of a JSON text message, once, whatever the number of readers.


def now_ms() -> int:
    return int(time.time() * 1000)


def encode(frame: dict) -> bytes:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode()


def sys_frame(room: str, event: str, message: str, **fields: object) -> dict:
    return {"type": "sys", "event": event, "room": room, "message": message,
            "ts": now_ms(), **fields}


def welcome(room: str, name: str, online: list[str], seq: int, epoch: str, key: str) -> dict:
    return sys_frame(room, "welcome", f"Welcome to {room}, {name}!",
                     name=name, online=online, seq=seq, epoch=epoch, key=key)


def joined(room: str, name: str, count: int) -> dict:
    return sys_frame(room, "join", f"{name} has joined", name=name, count=count)


def left(room: str, name: str, count: int) -> dict:
    return sys_frame(room, "leave", f"{name} has left", name=name, count=count)


def presence(room: str, arrived: list[str], departed: list[str], count: int) -> dict:
    """Joins and leaves of a crowded room, gathered into one notice."""
    def some(names: list[str]) -> tuple[list[str], int]:
        return names[:PRESENCE_NAMES], max(0, len(names) - PRESENCE_NAMES)

    joined_names, more_joined = some(arrived)
    left_names, more_left = some(departed)
    parts = []
    for names, more, verb in ((joined_names, more_joined, "joined"),
                              (left_names, more_left, "left")):
        if names:
            others = f" and {more} others" if more else ""
            parts.append(f"{', '.join(names)}{others} {verb}")
    return sys_frame(room, "presence", "; ".join(parts), joined=joined_names,
                     left=left_names, more_joined=more_joined, more_left=more_left,
                     count=count)


def renamed(room: str, old: str, new: str) -> dict:
    return sys_frame(room, "nick", f"{old} is now known as {new}", old=old, name=new)


def who(room: str, online: list[str]) -> dict:
    names = ", ".join(online)
    return sys_frame(room, "who", f"{len(online)} online: {names}",
                     online=online, count=len(online))


HELP_TEXT = (
    "Commands: /nick NAME (change your name), /me ACTION (say what you do), "
    "/who (who is here), /help (this text). Start a line with // to send a "
    "literal /."
)


def help_frame(room: str) -> dict:
    return sys_frame(room, "help", HELP_TEXT)


def error(room: str, message: str) -> dict:
    return sys_frame(room, "error", message)


def gap(room: str, missed: int) -> dict:
    return sys_frame(room, "gap", f"{missed} earlier messages are no longer kept",
                     missed=missed)


def shutdown(room: str) -> dict:
    return sys_frame(room, "shutdown", "The server is shutting down; reconnect soon.")


def chat(room: str, name: str, text: str, seq: int, action: bool = False) -> dict:
    frame = {"type": "user", "room": room, "id": name, "message": text,
             "ts": now_ms(), "seq": seq}
    if action:
        frame["action"] = True
    return frame


# Chat logic (no I/O) ------------------------------------------------------
#
# `Chat` holds the rooms and turns what clients do (join, send a line, leave)
# into frames.  Frames for one member are returned to the caller; frames for a
# whole room are queued on the room (`Room.pending`) for the fan-out to send,
# so that several messages can go out in one write per client.


class Refused(Exception):
    """A handshake that must be refused: an HTTP status and a plain reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclasses.dataclass(eq=False)
class Member:
    """One connected client in one room."""

    name: str
    room: Room
    address: str = ""
    connection: Client | None = None  # set by the I/O layer
    tokens: float = 0.0  # rate limit bucket
    refilled_at: float = 0.0
    flooding_since: float | None = None
    flood_error_at: float = float("-inf")
    rejected_at: float = float("-inf")
    close_with: tuple[int, str] | None = None  # set when the member must go
    # The secret in this member's welcome: whoever shows it may take the
    # name back on a new connection (a page reconnecting after a drop the
    # server has not noticed yet).
    key: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(16))

    def has_key(self, key: str) -> bool:
        return secrets.compare_digest(self.key.encode(), key.encode())


@dataclasses.dataclass(eq=False)
class Room:
    """A chat room: who is in it, its message numbering and recent history."""

    name: str
    history_limit: int
    crowd: int = CROWD_MEMBERS
    epoch: str = dataclasses.field(default_factory=lambda: secrets.token_hex(6))
    seq: int = 0  # last seq given out
    delivered_seq: int = 0  # last seq handed to the fan-out
    members: dict[str, Member] = dataclasses.field(default_factory=dict)  # by folded name
    history: collections.deque[tuple[int, bytes]] = dataclasses.field(init=False)
    pending: list[bytes] = dataclasses.field(default_factory=list)  # room frames not yet sent
    pending_seq: list[int] = dataclasses.field(default_factory=list)
    empty_since: float | None = None
    # Joins and leaves of a crowded room not yet announced: name -> here now
    # (the last change wins, so someone back on a new connection is here).
    unannounced: dict[str, bool] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.history = collections.deque(maxlen=self.history_limit)

    def online(self) -> list[str]:
        return [member.name for member in self.members.values()]

    def has_name(self, name: str) -> bool:
        return fold(name) in self.members

    def unique_name(self, wanted: str) -> str:
        """`wanted`, or `wanted-2`, `wanted-3`... whichever is free here."""
        name, n = wanted, 1
        while self.has_name(name):
            n += 1
            suffix = f"-{n}"
            name = wanted[: NAME_MAX_CHARS - len(suffix)] + suffix
        return name

    def announce_presence(self, name: str, joining: bool) -> None:
        """A join or leave notice; in a crowded room, gathered for later.

        Each notice goes to every member, so a storm of N joins would cost
        N*N frames; past --crowd members they go out as one `presence`
        notice a second instead (see `take_presence`).
        """
        if len(self.members) > self.crowd:
            self.unannounced[name] = joining
        else:
            notice = joined if joining else left
            self.announce(notice(self.name, name, len(self.members)))

    def take_presence(self) -> None:
        """Announce the gathered joins and leaves, if any, as one notice,
        each name once, where it ended up."""
        if self.unannounced:
            changes, self.unannounced = self.unannounced, {}
            arrived = [name for name, here in changes.items() if here]
            departed = [name for name, here in changes.items() if not here]
            self.announce(presence(self.name, arrived, departed, self.count()))

    def count(self) -> int:
        """How many are in the room."""
        return len(self.members)

    def announce(self, frame: dict) -> None:
        """Queue a frame for everyone in the room."""
        self.pending.append(encode(frame))

    def post(self, name: str, text: str, action: bool = False) -> None:
        """Number a chat message, keep it in history, queue it for everyone."""
        self.seq += 1
        data = encode(chat(self.name, name, text, self.seq, action))
        self.history.append((self.seq, data))
        self.pending.append(data)
        self.pending_seq.append(self.seq)

    def take_pending(self) -> list[bytes]:
        """Hand the queued frames to the fan-out."""
        frames, self.pending = self.pending, []
        if self.pending_seq:
            self.delivered_seq = self.pending_seq[-1]
            self.pending_seq = []
        return frames

    def history_since(self, since: int | None) -> tuple[int, list[bytes]]:
        """(missed, frames): the delivered history after `since`, oldest first.

        `missed` counts messages after `since` that are no longer kept.  Frames
        still pending are left out: the fan-out will bring them.
        """
        start = 0 if since is None else since
        kept = [data for seq, data in self.history if start < seq <= self.delivered_seq]
        oldest = self.history[0][0] if self.history else self.delivered_seq + 1
        missed = max(0, min(oldest, self.delivered_seq + 1) - start - 1)
        return (missed if since is not None else 0), kept


def fold(name: str) -> str:
    """Names are unique regardless of case: `Alice` and `alice` clash."""
    return name.casefold()


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a nickname, or None if it can."""
    if not 1 <= len(name) <= NAME_MAX_CHARS:
        return f"a name has 1 to {NAME_MAX_CHARS} characters"
    # Categories C* (control, format such as bidi overrides, unassigned) and
    # Z* (spaces, separators) would let a name hide, spoof or break a line.
    if any(unicodedata.category(char)[0] in "CZ" for char in name):
        return "a name cannot contain spaces or control characters"
    return None


def text_problem(text: str, max_chars: int) -> str | None:
    """Why `text` cannot be sent as a chat message, or None if it can."""
    if len(text) > max_chars:
        return (f"message too long ({len(text)} characters; the limit is "
                f"{max_chars}); it was not sent")
    if any(unicodedata.category(char) == "Cc" and char not in "\n\t" for char in text):
        return "control characters are not allowed in messages; it was not sent"
    return None


Outgoing = list[tuple[Member, bytes]]


def newcomer_frames(member: Member, online: list[str], notes: list[dict], missed: int,
                    history: list[bytes]) -> Outgoing:
    """What a newcomer gets, in order: the welcome, notes about its name, the
    gap notice if some of what it missed is no longer kept, the history."""
    room = member.room
    out = [(member, encode(welcome(room.name, member.name, online, room.delivered_seq,
                                   room.epoch, member.key)))]
    out += [(member, encode(note)) for note in notes]
    if missed:
        out.append((member, encode(gap(room.name, missed))))
    out += [(member, data) for data in history]
    return out


class Chat:
    """All rooms of one server and the rules of the chat.  No I/O here."""

    def __init__(self, config: Config = Config(), clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.rooms: dict[str, Room] = {}

    # Rooms

    def check_room(self, room_name: str) -> None:
        """Raise Refused if a client may not enter `room_name` now."""
        if room_name in self.rooms:
            return
        if len(self.rooms) >= self.config.max_rooms and not self.forget_idle_rooms(force_one=True):
            raise Refused(503, "too many rooms on this server; try again later")

    def open_room(self, room_name: str) -> Room:
        room = self.rooms.get(room_name)
        if room is None:
            room = self.rooms[room_name] = Room(room_name, self.config.history,
                                                self.config.crowd)
        room.empty_since = None
        return room

    def forget_idle_rooms(self, force_one: bool = False) -> int:
        """Forget rooms empty for longer than --room-ttl; with `force_one`,
        forget at least the longest-idle empty room.  Returns how many."""
        now = self.clock()
        idle = sorted((room.empty_since, name) for name, room in self.rooms.items()
                      if room.empty_since is not None)
        expired = [name for since, name in idle if now - since >= self.config.room_ttl]
        if force_one and not expired and idle:
            expired = [idle[0][1]]
        for name in expired:
            del self.rooms[name]
        return len(expired)

    def forget_if_expired(self, room_name: str) -> None:
        room = self.rooms.get(room_name)
        if room and room.empty_since is not None and \
                self.clock() - room.empty_since >= self.config.room_ttl:
            del self.rooms[room_name]

    # What clients do

    def join(self, room_name: str, wanted: str | None = None, since: int | None = None,
             epoch: str | None = None, address: str = "",
             key: str | None = None) -> tuple[Member, Outgoing]:
        """Add a newcomer: its welcome, what it missed, and a join notice.

        `key`: the key of the member it replaces (see `holder`); it keeps it,
        so a reconnect whose welcome is lost can still use it."""
        self.forget_if_expired(room_name)
        room = self.open_room(room_name)
        wanted, notes = self.newcomer_name(room_name, wanted)
        name = room.unique_name(wanted or f"guest-{secrets.token_hex(2)}")
        member = Member(name, room, address, tokens=self.config.burst,
                        refilled_at=self.clock())
        if key:
            member.key = key
        room.members[fold(name)] = member

        if epoch != room.epoch:
            since = None  # another epoch: its numbers mean nothing here
        missed, history = room.history_since(since)
        room.announce_presence(name, joining=True)
        return member, newcomer_frames(member, room.online(), notes, missed, history)

    def holder(self, room_name: str, name: str | None, key: str | None) -> Member | None:
        """The member who holds `name` in the room, if `key` is its key: a
        client back on a new connection, whose old one is not yet found dead."""
        room = self.rooms.get(room_name)
        if room is None or name is None or not key:
            return None
        member = room.members.get(fold(unicodedata.normalize("NFC", name)))
        return member if member is not None and member.has_key(key) else None

    def newcomer_name(self, room_name: str, wanted: str | None) -> tuple[str | None, list[dict]]:
        """The name a newcomer asked for, if it is valid, and notes for it."""
        if wanted is None:
            return None, []
        wanted = unicodedata.normalize("NFC", wanted)
        problem = name_problem(wanted)
        if problem:
            return None, [error(room_name, f"name {wanted!r} refused: {problem}; "
                                           "you are a guest")]
        return wanted, []

    def leave(self, member: Member) -> None:
        room = member.room
        if room.members.get(fold(member.name)) is not member:
            return
        del room.members[fold(member.name)]
        if room.members:
            room.announce_presence(member.name, joining=False)
        else:
            room.empty_since = self.clock()

    def receive(self, member: Member, line: str) -> Outgoing:
        """Handle one text line from `member`."""
        room = member.room
        if not self.admit(member):
            return self.flood_answer(member)
        if not line.strip():
            return []  # blank lines are ignored
        problem = text_problem(line, self.config.max_chars)
        if problem:
            return [(member, encode(error(room.name, problem)))]
        if line.startswith("//"):
            line = line[1:]
        elif line.startswith("/"):
            return self.command(member, line)
        room.post(member.name, line)
        return []

    def command(self, member: Member, line: str) -> Outgoing:
        room = member.room
        verb, _, argument = line.partition(" ")
        verb, argument = verb.lower(), argument.strip()
        if verb == "/nick":
            return self.rename(member, argument)
        if verb == "/me":
            if not argument:
                return [(member, encode(error(room.name, "usage: /me ACTION")))]
            room.post(member.name, argument, action=True)
            return []
        if verb == "/who":
            return [(member, encode(who(room.name, room.online())))]
        if verb == "/help":
            return [(member, encode(help_frame(room.name)))]
        return [(member, encode(error(room.name, f"unknown command {verb[:40]}; "
                                      "try /help (start with // to send a literal /)")))]

    def rename(self, member: Member, new: str) -> Outgoing:
        room = member.room
        new = unicodedata.normalize("NFC", new)
        problem = "usage: /nick NAME" if not new else name_problem(new)
        if problem is None and new == member.name:
            problem = f"you are already {new}"
        elif problem is None and room.has_name(new) and fold(new) != fold(member.name):
            problem = f"{new} is already taken in {room.name}"
        if problem:
            return [(member, encode(error(room.name, problem)))]
        old = member.name
        del room.members[fold(old)]
        member.name = new
        room.members[fold(new)] = member
        room.announce(renamed(room.name, old, new))
        return []

    # Flood control: a token bucket per member.

    def admit(self, member: Member) -> bool:
        now = self.clock()
        config = self.config
        member.tokens = min(config.burst, member.tokens + (now - member.refilled_at) * config.rate)
        member.refilled_at = now
        if member.tokens >= 1:
            member.tokens -= 1
            # A flood ends after a quiet second, not at the first line that
            # slips through on a refilled token.
            if member.flooding_since is not None and now - member.rejected_at > FLOOD_QUIET_S:
                member.flooding_since = None
            return True
        if member.flooding_since is None:
            member.flooding_since = now
        member.rejected_at = now
        return False

    def flood_answer(self, member: Member) -> Outgoing:
        """What a line over the rate limit gets: an error now and then, and
        after --flood-close seconds of flooding, the door."""
        now = self.clock()
        if now - member.flooding_since >= self.config.flood_close:
            member.close_with = (CLOSE_POLICY, "flooding")
            return []
        if now - member.flood_error_at < FLOOD_ERROR_INTERVAL_S:
            return []
        member.flood_error_at = now
        return [(member, encode(error(
            member.room.name,
            f"slow down: at most {self.config.rate:g} messages a second; "
            "lines over the limit are not sent")))]


# Fan-out ------------------------------------------------------------------
#
# Each frame is encoded and framed once, and the same bytes are written
# straight to every member's transport.  Room frames queued during one turn
# of the event loop go out together, one write per member, which is what
# keeps the cost per delivery low under load.  Frames are never compressed
# (permessage-deflate is not negotiated), so every member can share them.


def frame_text(data: bytes) -> bytes:
    """Wrap `data` in a final, unmasked WebSocket text frame (RFC 6455 5.2)."""
    length = len(data)
    if length < 126:
        return bytes((0x81, length)) + data
    if length < 65536:
        return bytes((0x81, 126)) + length.to_bytes(2, "big") + data
    return bytes((0x81, 127)) + length.to_bytes(8, "big") + data


class Metrics:
    """Counters for /metrics."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.messages_received = 0
        self.messages_broadcast = 0
        self.frames_delivered = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.refused: collections.Counter[int] = collections.Counter()


class LocalBroker:
    """Fan-out within this process: each room's queued frames to its members.

    The seam the connection handler uses: `start`, `publish`, `leave`,
    `close`; the Redis broker adds `join` and `receive`, which wait for Redis
    (`shared` says so), where this one lets `Chat` answer at once.
    """

    shared = False  # True: joins and lines wait for another server (Redis)

    def __init__(self, chat: Chat, config: Config, metrics: Metrics) -> None:
        self.chat = chat
        self.metrics = metrics
        self.batch_window = config.batch_window / 1000
        self.sent_at: weakref.WeakKeyDictionary[Room, float] = weakref.WeakKeyDictionary()
        self.scheduled: dict[Room, asyncio.Handle] = {}  # rooms with a flush to come
        self.presence_scheduled: set[Room] = set()

    async def start(self) -> None:
        """Nothing to connect to: rooms live in this process."""

    async def close(self) -> None:
        """Nothing to disconnect."""

    def leave(self, member: Member) -> None:
        self.chat.leave(member)
        self.publish(member.room)

    def publish(self, room: Room) -> None:
        """Send what `room` has queued, at the end of this event loop turn,
        or, with --batch-window, once the window since its last send is over."""
        loop = asyncio.get_running_loop()
        if room.pending and room not in self.scheduled:
            wait = self.sent_at.get(room, float("-inf")) + self.batch_window - loop.time()
            if wait > 0:
                self.scheduled[room] = loop.call_later(wait, self.flush, room)
            else:
                self.scheduled[room] = loop.call_soon(self.flush, room)
        if room.unannounced and room not in self.presence_scheduled:
            self.presence_scheduled.add(room)
            loop.call_later(PRESENCE_INTERVAL_S, self.flush_presence, room)

    def flush_presence(self, room: Room) -> None:
        self.presence_scheduled.discard(room)
        room.take_presence()
        self.flush(room)

    def unschedule(self, room: Room) -> None:
        handle = self.scheduled.pop(room, None)
        if handle is not None:
            handle.cancel()  # a flush called early: no second one when the window ends

    def flush(self, room: Room) -> None:
        self.unschedule(room)
        frames = room.take_pending()
        if not frames:
            return
        data = b"".join(map(frame_text, frames))
        self.sent_at[room] = asyncio.get_running_loop().time()
        # The hot loop: one write per member, the same bytes for all.  Writes
        # never remove members (that waits for connection_lost), so the dict
        # can be walked as it is.
        for member in room.members.values():
            member.connection.write(data)
        self.metrics.messages_broadcast += len(frames)
        self.metrics.frames_delivered += len(frames) * len(room.members)


# Scale-out over Redis -----------------------------------------------------
#
# With --broker redis://HOST:PORT/DB, processes that share a Redis server act
# as one chat server.  Redis holds what every process must agree on, per room:
#
#   chat:ROOM:seq      the last seq given out (INCR)
#   chat:ROOM:epoch    the room's epoch
#   chat:ROOM:history  the last --history chat frames, as sent (a list)
#   chat:ROOM:names    who is in the room: folded name -> {"name","proc","n"}
#   chat:ROOM:order    a counter that orders `names` as a process would
#   channel chat:DB:ROOM   every frame for the room, to every process in it
#
# and per process: chat:proc:ID (a heartbeat key with a short TTL),
# chat:proc:ID:rooms (where it has members) and the set chat:procs.  Channel
# names carry the DB number because Redis channels are server-wide.
#
# Each change is one Lua script, atomic in Redis: posting a line numbers it,
# keeps it and publishes it, so the order of the channel is the order of seq.
# A process subscribes to a room's channel while it has members there, and
# every process fans out what the channel brings with the LocalBroker's code.
# The sans-I/O rules still decide what a line means (`SharedChat`); what
# needs the shared state is left as a request for the broker to carry out.

REDIS_TIMEOUT_S = 2.0  # a Redis command that takes longer has failed
REDIS_CONNECTIONS = 32  # per process, the subscriber's included
HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_TTL_S = 6.0  # a process silent this long is dead: its names go
RECONNECT_MIN_S = 0.1  # backoff between attempts to reach Redis again...
RECONNECT_MAX_S = 3.0  # ...doubling up to this
NAME_CANDIDATES = 20  # names tried per round trip when a nickname is taken
BROKER_DOWN = "chat is unavailable: the message broker is down; your message was not sent"
CLOSE_TRY_AGAIN = 1013


class BrokerUnavailable(Exception):
    """Redis cannot be reached: at start, or for one operation while running."""


@dataclasses.dataclass
class Post:
    """A chat line to number, keep and publish."""

    name: str
    text: str
    action: bool = False


@dataclasses.dataclass
class Rename:
    member: Member
    new: str


@dataclasses.dataclass
class Who:
    member: Member


Errand = Post | Rename | Who  # what SharedChat leaves for the broker to do


@dataclasses.dataclass(eq=False)
class SharedRoom(Room):
    """A room whose numbering, history and names live in Redis.

    Locally it holds this process's members and the frames the room's channel
    brought: `seq` is the last seq received, and frames at or below it are
    duplicates.  Until the room is synced with Redis (after each subscription),
    what the channel brings waits in `early`.
    """

    requests: list[Errand] = dataclasses.field(default_factory=list)
    joining: int = 0  # newcomers being let in: the fan-out waits for them
    synced: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    ever_synced: bool = False
    early: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    total: int = 0  # members on every process, as the last join or leave said

    def post(self, name: str, text: str, action: bool = False) -> None:
        self.requests.append(Post(name, text, action))

    def published(self, head: bytes, frame: bytes) -> None:
        """Queue a frame from the room's channel for the fan-out.

        `head` is the frame's seq for a chat message, b"-" for a notice.
        """
        if not self.synced.is_set():
            self.early.append((head, frame))
            return
        if head == b"-" and self.gather(frame):
            return
        if head != b"-":
            seq = int(head)
            if seq <= self.seq:
                return  # known from the sync point: in Redis's history
            self.seq = seq
            self.pending_seq.append(seq)
        self.pending.append(frame)

    def gather(self, frame: bytes) -> bool:
        """Keep a join or leave notice of a crowded room for the next
        presence notice, as Room.announce_presence does; each process gathers
        what the channel brings.  False for any other frame."""
        if b'"event":"join"' not in frame and b'"event":"leave"' not in frame:
            return False  # not worth parsing (in a string, a quote is escaped)
        notice = json.loads(frame)
        if notice.get("event") not in ("join", "leave"):
            return False
        self.total = notice["count"]
        if self.total <= self.crowd:
            return False
        self.unannounced[notice["name"]] = notice["event"] == "join"
        return True

    def count(self) -> int:
        return self.total

    def resync(self, epoch: str, last_seq: int, frames: list[bytes]) -> None:
        """Take up Redis's state after a (re)subscription.

        The first time, the room starts at Redis's last seq.  After a
        reconnection, messages of the same epoch missed meanwhile are queued
        from the history; another epoch is taken as it is.
        """
        if self.ever_synced and epoch == self.epoch:
            first = last_seq - len(frames) + 1
            for seq, data in enumerate(frames, first):
                if seq > self.seq:
                    self.pending.append(data)
                    self.pending_seq.append(seq)
            self.seq = max(self.seq, last_seq)
        else:
            self.adopt(epoch, last_seq)
        self.ever_synced = True
        self.synced.set()
        early, self.early = self.early, []
        for head, frame in early:
            if head != b"-" or self.members:
                self.published(head, frame)

    def adopt(self, epoch: str, last_seq: int) -> None:
        """Start over at `last_seq` of `epoch`."""
        self.epoch = epoch
        self.seq = self.delivered_seq = last_seq
        self.pending_seq = []
        if not self.members:
            self.pending = []


def history_window(last_seq: int, frames: list[bytes], delivered: int,
                   since: int | None) -> tuple[int, list[bytes]]:
    """Room.history_since for a history read from Redis.

    `frames` hold consecutive seqs ending at `last_seq`; only those up to
    `delivered` are returned (later ones reach the newcomer by the fan-out).
    """
    first = last_seq - len(frames) + 1
    start = 0 if since is None else since
    kept = [data for seq, data in enumerate(frames, first) if start < seq <= delivered]
    oldest = first if frames else delivered + 1
    missed = max(0, min(oldest, delivered + 1) - start - 1)
    return (missed if since is not None else 0), kept


def frame_prefix(frame: dict, last: str) -> bytes:
    """`frame` encoded up to the value of its field `last`, which Redis fills
    in: prefix + value + b"}" is the whole frame."""
    head = {key: value for key, value in frame.items() if key != last}
    return encode(head)[:-1] + b',"' + last.encode() + b'":'


def name_candidates(wanted: str, start: int, count: int) -> list[str]:
    """`wanted`, `wanted-2`, `wanted-3`... as Room.unique_name tries them,
    from the `start`th (1 is `wanted` itself)."""
    names = []
    for n in range(start, start + count):
        suffix = "" if n == 1 else f"-{n}"
        names.append(wanted[: NAME_MAX_CHARS - len(suffix)] + suffix)
    return names


def online_names(values: list[bytes]) -> list[str]:
    """The names of a room's `names` hash, in the order they came."""
    entries = [json.loads(value) for value in values]
    return [entry["name"] for entry in sorted(entries, key=lambda entry: entry["n"])]


class SharedChat(Chat):
    """The chat rules for rooms shared through Redis.  Still no I/O.

    Posting, renaming and /who need the shared state: they are left in
    `room.requests` for the broker to carry out, in order, after each line.
    """

    def __init__(self, config: Config = Config(), clock: Callable[[], float] = time.monotonic):
        super().__init__(config, clock)
        self.broker_up = False

    def check_room(self, room_name: str) -> None:
        if not self.broker_up:
            raise Refused(503, "chat is unavailable: the message broker is down; "
                               "try again soon")
        super().check_room(room_name)

    def shared_room(self, room_name: str) -> SharedRoom:
        room = self.rooms.get(room_name)
        if room is None:
            room = self.rooms[room_name] = SharedRoom(room_name, self.config.history,
                                                      self.config.crowd)
        return room

    def newcomer(self, room: SharedRoom, name: str, address: str) -> Member:
        member = Member(name, room, address, tokens=self.config.burst, refilled_at=self.clock())
        room.members[fold(name)] = member
        return member

    def command(self, member: Member, line: str) -> Outgoing:
        if line.partition(" ")[0].lower() == "/who":
            member.room.requests.append(Who(member))
            return []
        return super().command(member, line)

    def rename(self, member: Member, new: str) -> Outgoing:
        new = unicodedata.normalize("NFC", new)
        problem = "usage: /nick NAME" if not new else name_problem(new)
        if problem is None and new == member.name:
            problem = f"you are already {new}"
        if problem:
            return [(member, encode(error(member.room.name, problem)))]
        member.room.requests.append(Rename(member, new))
        return []

    def renamed(self, member: Member, new: str) -> None:
        """Redis granted `member` the name `new`."""
        members = member.room.members
        if members.get(fold(member.name)) is not member:
            return  # taken over by a new connection meanwhile: it is closing
        del members[fold(member.name)]
        member.name = new
        members[fold(new)] = member


# The Lua scripts.  Keys are passed in KEYS where the script knows them in
# advance; the sweep finds rooms as it goes (fine on a single Redis server).

LUA_COMMON = """
local function ensure_room(seq_key, epoch_key, history_key, epoch, floor, ttl)
  -- The room's epoch, created as `epoch` if Redis has none (a new room, or
  -- Redis lost its data): then its numbering resumes after `floor`, the
  -- last seq the caller knows, so that its clients see no step back.
  local current = redis.call('GET', epoch_key)
  if not current then
    current = epoch
    if ttl then
      redis.call('SET', epoch_key, epoch, 'PX', ttl)
    else
      redis.call('SET', epoch_key, epoch)
    end
    if tonumber(redis.call('GET', seq_key) or '0') < floor then
      redis.call('SET', seq_key, floor)
      redis.call('DEL', history_key)
    end
  end
  return current
end

local function room_key(room, what)
  return 'chat:' .. room .. ':' .. what
end

local function forget_later(room, ttl)
  for _, what in ipairs({'seq', 'epoch', 'history', 'order'}) do
    redis.call('PEXPIRE', room_key(room, what), ttl)
  end
end

local function keep(room)
  for _, what in ipairs({'seq', 'epoch', 'history', 'order'}) do
    redis.call('PERSIST', room_key(room, what))
  end
end

local function leave_notice(room, name, count)
  -- The `leave` frame of chatserver.left(), for names whose process died.
  local now = redis.call('TIME')
  local ts = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
  return '- {"type":"sys","event":"leave","room":' .. cjson.encode(room) ..
    ',"message":' .. cjson.encode(name .. ' has left') .. ',"ts":' .. ts ..
    ',"name":' .. cjson.encode(name) .. ',"count":' .. count .. '}'
end

local function remove_names(room, channel, proc, except)
  -- Remove the names `proc` holds in `room` (but those in `except`), each
  -- with its leave notice; forget the room later if it is empty now.
  local names_key = room_key(room, 'names')
  local marker = '"proc":"' .. proc .. '"'
  local values = redis.call('HGETALL', names_key)
  for i = 1, #values, 2 do
    if not except[values[i]] and string.find(values[i + 1], marker, 1, true) then
      redis.call('HDEL', names_key, values[i])
      local count = redis.call('HLEN', names_key)
      if count > 0 then
        redis.call('PUBLISH', channel, leave_notice(room, cjson.decode(values[i + 1]).name, count))
      end
    end
  end
end
"""

# KEYS: seq, epoch, history.  ARGV: channel, frame prefix, history limit,
# epoch, last seq known.  Returns {seq, epoch}.
LUA_POST = LUA_COMMON + """
local epoch = ensure_room(KEYS[1], KEYS[2], KEYS[3], ARGV[4], tonumber(ARGV[5]), nil)
local seq = redis.call('INCR', KEYS[1])
local frame = ARGV[2] .. seq .. '}'
redis.call('RPUSH', KEYS[3], frame)
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[3]), -1)
redis.call('PUBLISH', ARGV[1], seq .. ' ' .. frame)
return {seq, epoch}
"""

# KEYS: seq, epoch, history.  ARGV: epoch, last seq known, room ttl (ms).
# Returns {epoch, last seq, history}.
LUA_SYNC = LUA_COMMON + """
local epoch = ensure_room(KEYS[1], KEYS[2], KEYS[3], ARGV[1], tonumber(ARGV[2]), ARGV[3])
return {epoch, tonumber(redis.call('GET', KEYS[1]) or '0'), redis.call('LRANGE', KEYS[3], 0, -1)}
"""

# KEYS: seq, epoch, history, names, order, this process's rooms.
# ARGV: channel, room, epoch, last seq known, the key of a welcome (or ""),
# then for each candidate name: folded name, member value prefix, join notice
# prefix.  The first candidate may be held by the member with that key: it is
# taken over (`r PROC KEY NAME` tells its process to close it).
# Returns {0} if every candidate is taken, else {index of the name taken,
# epoch, last seq, history, names, 1 if taken over else 0}.
LUA_JOIN = LUA_COMMON + """
local epoch = ensure_room(KEYS[1], KEYS[2], KEYS[3], ARGV[3], tonumber(ARGV[4]), nil)
local key = ARGV[5]
for i = 6, #ARGV, 3 do
  local held = redis.call('HGET', KEYS[4], ARGV[i])
  local old = nil
  if held and i == 6 and key ~= '' and
      string.find(held, '"key":"' .. key .. '"', 1, true) then
    old = cjson.decode(held)
  end
  if not held or old then
    redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1] .. redis.call('INCR', KEYS[5]) .. '}')
    keep(ARGV[2])
    redis.call('SADD', KEYS[6], ARGV[2])
    local count = redis.call('HLEN', KEYS[4])
    if old then
      redis.call('PUBLISH', ARGV[1], 'r ' .. old.proc .. ' ' .. key .. ' ' .. ARGV[i])
      redis.call('PUBLISH', ARGV[1], leave_notice(ARGV[2], old.name, count - 1))
    end
    redis.call('PUBLISH', ARGV[1], '- ' .. ARGV[i + 2] .. count .. '}')
    return {(i - 3) / 3, epoch, tonumber(redis.call('GET', KEYS[1]) or '0'),
            redis.call('LRANGE', KEYS[3], 0, -1), redis.call('HVALS', KEYS[4]),
            old and 1 or 0}
  end
end
return {0}
"""

# KEYS: names, this process's rooms.  ARGV: channel, room, folded name,
# process, leave notice prefix, room ttl (ms), "1" if the process has no one
# left in the room, the member's key (the name may have been taken over).
LUA_LEAVE = LUA_COMMON + """
local value = redis.call('HGET', KEYS[1], ARGV[3])
if value and string.find(value, '"proc":"' .. ARGV[4] .. '"', 1, true) and
    string.find(value, '"key":"' .. ARGV[8] .. '"', 1, true) then
  redis.call('HDEL', KEYS[1], ARGV[3])
  local count = redis.call('HLEN', KEYS[1])
  if count > 0 then
    redis.call('PUBLISH', ARGV[1], '- ' .. ARGV[5] .. count .. '}')
  else
    forget_later(ARGV[2], ARGV[6])
  end
end
if ARGV[7] == '1' then
  redis.call('SREM', KEYS[2], ARGV[2])
end
return 1
"""

# KEYS: names, order.  ARGV: channel, old folded name, new folded name, new
# member value prefix, nick notice, the member's key.  Returns 1, or 0 if the
# name is taken.
LUA_RENAME = """
if ARGV[3] ~= ARGV[2] and redis.call('HEXISTS', KEYS[1], ARGV[3]) == 1 then
  return 0
end
local held = redis.call('HGET', KEYS[1], ARGV[2])
if held and not string.find(held, '"key":"' .. ARGV[6] .. '"', 1, true) then
  return 0  -- the old name was taken over by a new connection meanwhile
end
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4] .. redis.call('INCR', KEYS[2]) .. '}')
redis.call('PUBLISH', ARGV[1], '- ' .. ARGV[5])
return 1
"""

# Make the names a process holds in a room exactly its members there: after
# Redis came back (maybe empty), or after the process was taken for dead.
# Re-registered names are not announced: the others never saw them go.
# KEYS: seq, epoch, history, names, order, this process's rooms.
# ARGV: channel, room, process, room ttl (ms), epoch ("" if none), last seq
# known, then for each member: folded name, member value prefix.
# Returns the folded names someone else took meanwhile.
LUA_RECONCILE = LUA_COMMON + """
local mine = {}
for i = 7, #ARGV, 2 do mine[ARGV[i]] = ARGV[i + 1] end
remove_names(ARGV[2], ARGV[1], ARGV[3], mine)
local taken = {}
for folded, prefix in pairs(mine) do
  local value = redis.call('HGET', KEYS[4], folded)
  if not value then
    redis.call('HSET', KEYS[4], folded, prefix .. redis.call('INCR', KEYS[5]) .. '}')
  elseif not string.find(value, '"proc":"' .. ARGV[3] .. '"', 1, true) then
    table.insert(taken, folded)
  end
end
if redis.call('HLEN', KEYS[4]) > 0 then
  if ARGV[5] ~= '' then
    ensure_room(KEYS[1], KEYS[2], KEYS[3], ARGV[5], tonumber(ARGV[6]), nil)
  end
  keep(ARGV[2])
else
  forget_later(ARGV[2], ARGV[4])
end
if next(mine) then
  redis.call('SADD', KEYS[6], ARGV[2])
else
  redis.call('SREM', KEYS[6], ARGV[2])
end
return taken
"""

# Remove the names of dead processes (no heartbeat key), each with its leave
# notice, and forget the processes.  KEYS: the set of processes.  ARGV: DB
# number (for channel names), room ttl (ms), a process to remove now even if
# alive ("" if none: on a clean shutdown).  Returns how many names went.
LUA_SWEEP = LUA_COMMON + """
local swept = 0
for _, proc in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if proc == ARGV[3] or redis.call('EXISTS', 'chat:proc:' .. proc) == 0 then
    local rooms_key = 'chat:proc:' .. proc .. ':rooms'
    for _, room in ipairs(redis.call('SMEMBERS', rooms_key)) do
      local before = redis.call('HLEN', room_key(room, 'names'))
      remove_names(room, 'chat:' .. ARGV[1] .. ':' .. room, proc, {})
      local after = redis.call('HLEN', room_key(room, 'names'))
      swept = swept + before - after
      if after == 0 and before > 0 then
        forget_later(room, ARGV[2])
      end
    end
    redis.call('DEL', rooms_key, 'chat:proc:' .. proc)
    redis.call('SREM', KEYS[1], proc)
  end
end
return swept
"""


class RedisBroker(LocalBroker):
    """The fan-out for processes that share a Redis server.

    Same methods as LocalBroker; `publish`, `flush`, `send` and `write` are
    its own, so every frame still reaches clients by one path.  What goes to
    a room goes through Redis and comes back on the room's channel.

    If Redis goes away, clients stay connected and their lines get an error;
    the broker reconnects with backoff and, once back, resubscribes, catches
    up with the rooms' seq and re-registers its members' names.
    """

    shared = True

    def __init__(self, chat: SharedChat, config: Config, metrics: Metrics) -> None:
        super().__init__(chat, config, metrics)
        self.chat: SharedChat = chat
        self.url = config.broker
        self.history_limit = config.history
        self.room_ttl_ms = max(0, int(config.room_ttl * 1000))
        self.proc = secrets.token_hex(8)
        self.proc_key = f"chat:proc:{self.proc}"
        self.proc_rooms_key = f"chat:proc:{self.proc}:rooms"
        self.db = 0
        self.channels: dict[bytes, SharedRoom] = {}
        self.control = b""  # a channel of our own: confirms each (re)connection
        self.client = None  # redis.asyncio.Redis
        self.pubsub = None
        self.errors: tuple[type[BaseException], ...] = (OSError,)
        self.up = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.follower: asyncio.Task | None = None
        self.beater: asyncio.Task | None = None
        self.beats = 0
        # A join storm must not take every pooled connection: posts,
        # heartbeats and leaves need some too, or they time out and the
        # broker is taken for lost.
        self.join_slots = asyncio.Semaphore(REDIS_CONNECTIONS // 4)

    # Starting and stopping

    async def start(self) -> None:
        """Connect to Redis; raise BrokerUnavailable if it cannot be reached."""
        import redis.exceptions

        self.errors = (redis.exceptions.RedisError, OSError)
        self.client = await connect_redis(self.url)
        self.db = int(self.client.connection_pool.connection_kwargs.get("db", 0))
        self.control = f"chat:{self.db}:proc:{self.proc}".encode()
        script = self.client.register_script
        self.post_script, self.sync_script = script(LUA_POST), script(LUA_SYNC)
        self.join_script, self.leave_script = script(LUA_JOIN), script(LUA_LEAVE)
        self.rename_script, self.reconcile_script = script(LUA_RENAME), script(LUA_RECONCILE)
        self.sweep_script = script(LUA_SWEEP)
        self.follower = asyncio.create_task(self.follow())
        self.beater = asyncio.create_task(self.beat())
        try:
            await asyncio.wait_for(self.up.wait(), REDIS_TIMEOUT_S * 2)
        except asyncio.TimeoutError:
            await self.close()
            raise BrokerUnavailable(f"the message broker at {safe_url(self.url)} "
                                    "does not answer") from None
        log.info("broker %s: process %s", safe_url(self.url), self.proc)

    async def close(self) -> None:
        """Say goodbye for our members (leave notices), then disconnect."""
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=REDIS_TIMEOUT_S)
        if self.up.is_set():
            try:  # whoever is left: their names go, with leave notices
                await self.sweep_script(keys=["chat:procs"],
                                        args=[self.db, self.room_ttl_ms, self.proc])
            except self.errors as exc:
                log.warning("broker: could not remove our names: %s", exc)
        tasks = [task for task in (self.follower, self.beater) if task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.set_up(False)
        if self.client is not None:
            await self.client.aclose()

    # What clients do

    async def join(self, ticket: Ticket) -> tuple[Member, Outgoing]:
        async with self.join_slots:
            return await self.join_now(ticket)

    async def join_now(self, ticket: Ticket) -> tuple[Member, Outgoing]:
        """Let a newcomer in: its name claimed in Redis, its welcome with
        the whole room's names, and the history, from Redis, up to what this
        process has delivered: later frames reach it by the fan-out, which
        waits meanwhile."""
        chat = self.chat
        if not self.up.is_set():
            raise BrokerUnavailable(BROKER_DOWN)
        wanted, notes = chat.newcomer_name(ticket.room, ticket.name)
        room = chat.shared_room(ticket.room)
        self.flush(room)  # a batch held back before the newcomer is not for it
        room.joining += 1
        try:
            await self.enter(room)
            key = secrets.token_urlsafe(16)  # a new one: the old one names the old member
            name, claim = await self.claim(room, wanted, key, ticket.key)
            epoch, last_seq, frames, values, taken_over = claim
            if epoch.decode() != room.epoch:
                room.adopt(epoch.decode(), int(last_seq))
            if taken_over:
                self.evict(room, fold(name), ticket.key)
            member = chat.newcomer(room, name, ticket.address)
            member.key = key
        finally:
            room.joining -= 1
            self.publish(room)  # what the fan-out held back
            self.forget_if_empty(room)
        since = ticket.since if ticket.epoch == room.epoch else None
        missed, history = history_window(int(last_seq), frames, room.delivered_seq, since)
        return member, newcomer_frames(member, online_names(values), notes, missed, history)

    def leave(self, member: Member) -> None:
        room = member.room
        if room.members.get(fold(member.name)) is not member:
            return
        del room.members[fold(member.name)]
        last_here = not room.members and not room.joining
        self.spawn(self.leave_redis(room, member.name, member.key, last_here))
        self.forget_if_empty(room)

    async def receive(self, member: Member, line: str) -> Outgoing:
        out = self.chat.receive(member, line)
        room = member.room
        requests, room.requests = room.requests, []
        for request in requests:
            try:
                out += await self.carry_out(member, request)
            except BrokerUnavailable:
                out.append((member, encode(error(room.name, BROKER_DOWN))))
        return out

    def flush(self, room: SharedRoom) -> None:
        if room.joining:
            # A newcomer's history is being read up to delivered_seq: hold
            # the live frames until it is a member, then it gets them too.
            self.unschedule(room)
            return
        super().flush(room)

    # Carrying out requests

    async def carry_out(self, member: Member, request: Errand) -> Outgoing:
        room = member.room
        if isinstance(request, Post):
            frame = chat(room.name, request.name, request.text, 0, request.action)
            _, epoch = await self.call(
                self.post_script, self.room_keys(room.name, "seq", "epoch", "history"),
                [self.channel(room.name), frame_prefix(frame, "seq"), self.history_limit,
                 room.epoch, room.seq])
            if epoch.decode() != room.epoch:
                log.warning("room %s: epoch changed in Redis; syncing", room.name)
                self.spawn(self.sync(room))
            return []
        if isinstance(request, Who):
            values = await self.call(self.client.hvals, f"chat:{room.name}:names")
            return [(member, encode(who(room.name, online_names(values))))]
        old, new = member.name, request.new
        granted = await self.call(
            self.rename_script, self.room_keys(room.name, "names", "order"),
            [self.channel(room.name), fold(old), fold(new), self.member_value(new, member.key),
             encode(renamed(room.name, old, new)), member.key])
        if not granted:
            return [(member, encode(error(room.name, f"{new} is already taken in {room.name}")))]
        self.chat.renamed(member, new)
        return []

    async def claim(self, room: SharedRoom, wanted: str | None, key: str,
                    taking_over: str | None) -> tuple[str, list]:
        """Claim `wanted` or the first free of its suffixed variants (or a
        guest name) in Redis, announcing the join; `wanted` held by the
        member whose key is `taking_over` is taken from it.  Returns the name
        and the room's epoch, last seq, history, names and whether it was
        taken over."""
        start = 1
        while True:
            if wanted is None:
                names = [f"guest-{secrets.token_hex(2)}" for _ in range(NAME_CANDIDATES)]
            else:
                names = name_candidates(wanted, start, NAME_CANDIDATES)
            args = [self.channel(room.name), room.name, room.epoch, room.seq,
                    taking_over if start == 1 and taking_over else ""]
            for name in names:
                args += [fold(name), self.member_value(name, key),
                         frame_prefix(joined(room.name, name, 0), "count")]
            result = await self.call(
                self.join_script,
                self.room_keys(room.name, "seq", "epoch", "history", "names", "order")
                + [self.proc_rooms_key], args)
            if result[0]:
                return names[result[0] - 1], result[1:]
            start += NAME_CANDIDATES

    async def leave_redis(self, room: SharedRoom, name: str, key: str, last_here: bool) -> None:
        try:
            await self.call(
                self.leave_script, [f"chat:{room.name}:names", self.proc_rooms_key],
                [self.channel(room.name), room.name, fold(name), self.proc,
                 frame_prefix(left(room.name, name, 0), "count"), self.room_ttl_ms,
                 int(last_here), key])
        except BrokerUnavailable:
            pass  # the reconciliation after reconnecting removes the name

    # Rooms and their channels

    async def enter(self, room: SharedRoom) -> None:
        """Subscribe to the room's channel if needed; wait until it is synced."""
        channel = self.channel(room.name).encode()
        if channel not in self.channels:
            if self.pubsub is None:
                raise BrokerUnavailable(BROKER_DOWN)
            self.channels[channel] = room
            await self.call(self.pubsub.subscribe, channel)
        try:
            await asyncio.wait_for(room.synced.wait(), REDIS_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise BrokerUnavailable(BROKER_DOWN) from None

    async def sync(self, room: SharedRoom) -> None:
        """The sync point, once the subscription is confirmed: Redis's last
        seq, and what was missed since the last time."""
        try:
            epoch, last_seq, frames = await self.call(
                self.sync_script, self.room_keys(room.name, "seq", "epoch", "history"),
                [room.epoch, room.seq, self.room_ttl_ms])
        except BrokerUnavailable:
            return  # the next connection syncs again
        if self.channels.get(self.channel(room.name).encode()) is room:
            room.resync(epoch.decode(), int(last_seq), frames)
            self.publish(room)
            self.forget_if_empty(room)

    def forget_if_empty(self, room: SharedRoom) -> None:
        """Drop a room nobody here is in (or entering) and unsubscribe."""
        if room.members or room.joining or not room.synced.is_set():
            return  # wait for the subscription's confirmation before undoing it
        if self.chat.rooms.get(room.name) is room:
            del self.chat.rooms[room.name]
        channel = self.channel(room.name).encode()
        if self.channels.get(channel) is room:
            del self.channels[channel]
            if self.pubsub is not None and self.up.is_set():
                self.spawn(self.call(self.pubsub.unsubscribe, channel))

    # The connection to Redis

    async def follow(self) -> None:
        """Read the channels; reconnect with backoff whenever Redis goes."""
        delay = RECONNECT_MIN_S
        while True:
            pubsub = self.client.pubsub()
            try:
                for room in self.channels.values():
                    room.synced.clear()
                await pubsub.subscribe(self.control, *self.channels)
                self.pubsub = pubsub
                delay = RECONNECT_MIN_S
                await self.read(pubsub)
            except Exception as exc:
                if not isinstance(exc, self.errors):
                    log.exception("broker: reading the channels failed")
                self.lost(exc)
            finally:
                self.pubsub = None
                self.set_up(False)
                try:
                    await pubsub.aclose()
                    # Pooled connections to a Redis that went away would each
                    # fail once more: drop them all, they reconnect on use.
                    await self.client.connection_pool.disconnect()
                except self.errors:
                    pass
            await asyncio.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def read(self, pubsub) -> None:
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            channel = message["channel"]
            if message["type"] == "message":
                room = self.channels.get(channel)
                if room is not None:
                    head, _, frame = message["data"].partition(b" ")
                    if head == b"r":
                        parts = frame.decode(errors="replace").split(" ", 2)
                        if len(parts) == 3 and parts[0] == self.proc:
                            self.evict(room, parts[2], parts[1])
                        continue
                    if head != b"-" and not head.isdigit():
                        log.warning("broker: ignoring a foreign message on %r", channel)
                        continue
                    room.published(head, frame)
                    self.publish(room)
            elif message["type"] == "subscribe":
                if channel == self.control:
                    self.set_up(True)
                    self.spawn(self.recover())
                elif channel in self.channels:
                    self.spawn(self.sync(self.channels[channel]))

    def evict(self, room: SharedRoom, folded: str, key: str) -> None:
        """Close our member `folded` of `room` if `key` is its key: its name
        went to a new connection (its leave was announced with the take-over)."""
        member = room.members.get(folded)
        if member is None or not member.has_key(key):
            return
        del room.members[folded]
        log.info("replacing %s in %s: it is back on a new connection", member.name, room.name)
        member.connection.close(CLOSE_REPLACED, "replaced by a new connection")
        self.forget_if_empty(room)

    def lost(self, exc: BaseException) -> None:
        if self.up.is_set():
            log.warning("message broker %s lost: %s; reconnecting", safe_url(self.url), exc)
        self.set_up(False)

    def set_up(self, up: bool) -> None:
        if up and not self.up.is_set():
            log.info("message broker %s connected", safe_url(self.url))
        self.up.set() if up else self.up.clear()
        self.chat.broker_up = up

    async def call(self, command, *args):
        """Run one Redis command; BrokerUnavailable if it fails, and then
        reconnect (the subscriber connection goes too, so that recovery takes
        one path)."""
        if not self.up.is_set():
            raise BrokerUnavailable(BROKER_DOWN)
        try:
            return await command(*args)
        except self.errors as exc:
            self.lost(exc)
            if self.pubsub is not None and self.pubsub.connection is not None:
                self.spawn(self.pubsub.connection.disconnect())
            raise BrokerUnavailable(BROKER_DOWN) from exc

    async def recover(self) -> None:
        """After (re)connecting: our heartbeat, and our names as they are here."""
        try:
            await self.heartbeat(reconcile=False)
            rooms = {name.decode() for name in
                     await self.call(self.client.smembers, self.proc_rooms_key)}
            for name in rooms | set(self.chat.rooms):
                await self.reconcile(name)
        except BrokerUnavailable:
            pass

    async def reconcile(self, room_name: str) -> None:
        room = self.chat.rooms.get(room_name)
        args = [self.channel(room_name), room_name, self.proc, self.room_ttl_ms,
                room.epoch if room else "", room.seq if room else 0]
        for member in (room.members.values() if room else ()):
            args += [fold(member.name), self.member_value(member.name, member.key)]
        taken = await self.call(
            self.reconcile_script,
            self.room_keys(room_name, "seq", "epoch", "history", "names", "order")
            + [self.proc_rooms_key], args)
        for folded in taken:
            # Someone else holds the name now (maybe this client, back on a
            # new connection): two members of one name must not be.
            log.warning("room %s: %s was taken while the broker was away", room_name,
                        folded.decode())
            member = room.members.pop(folded.decode(), None) if room else None
            if member is not None:
                member.connection.close(CLOSE_TRY_AGAIN, "your name was taken meanwhile; "
                                                         "connect again")
        if room is not None:
            self.forget_if_empty(room)

    async def beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            try:
                await self.heartbeat()
                await self.call(self.sweep_script, ["chat:procs"],
                                [self.db, self.room_ttl_ms, ""])
            except BrokerUnavailable:
                pass
            except Exception:
                log.exception("broker: heartbeat failed")

    async def heartbeat(self, reconcile: bool = True) -> None:
        """Say we are alive.  If our key had expired (this process stalled,
        or Redis lost it), others may have removed our names: put them back."""
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.proc_key, 1, px=int(HEARTBEAT_TTL_S * 1000), get=True)
        pipe.sadd("chat:procs", self.proc)
        previous, _ = await self.call(pipe.execute)
        self.beats += 1
        if previous is None and self.beats > 1 and reconcile:
            log.warning("broker: our heartbeat key was gone; registering our names again")
            for name in list(self.chat.rooms):
                await self.reconcile(name)

    # Helpers

    def spawn(self, coroutine) -> None:
        """Run `coroutine` on its own; log it if it fails unexpectedly."""
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.done)

    def done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and \
                not isinstance(task.exception(), BrokerUnavailable):
            log.error("broker task failed", exc_info=task.exception())

    def channel(self, room_name: str) -> str:
        return f"chat:{self.db}:{room_name}"

    @staticmethod
    def room_keys(room_name: str, *parts: str) -> list[str]:
        return [f"chat:{room_name}:{part}" for part in parts]

    def member_value(self, name: str, key: str) -> bytes:
        return frame_prefix({"name": name, "proc": self.proc, "key": key, "n": 0}, "n")


async def connect_redis(url: str):
    """A redis.asyncio client for `url` that has answered a PING; raise
    BrokerUnavailable with a one-line reason if there is none."""
    import redis.asyncio
    import redis.exceptions
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    client = None
    try:
        # At most REDIS_CONNECTIONS: a burst of lines waits for one rather
        # than opening a connection per sender.
        client = redis.asyncio.Redis.from_pool(redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=REDIS_CONNECTIONS, timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0)))  # the broker retries itself, with backoff
        await client.ping()
    except (redis.exceptions.RedisError, OSError, ValueError) as exc:
        if client is not None:
            await client.aclose()
        raise BrokerUnavailable(f"cannot reach the message broker at {safe_url(url)}: "
                                f"{exc}") from None
    return client


def safe_url(url: str | None) -> str:
    """`url` without its password, for messages and logs."""
    parts = urllib.parse.urlsplit(url or "")
    if parts.password is None:
        return url or ""
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{netloc}"))


# Connections --------------------------------------------------------------
#
# Each TCP connection is an asyncio Protocol that feeds bytes to the
# `websockets` sans-I/O state machine and acts on the events it returns:
# no task per connection, no task switch per message.


@dataclasses.dataclass(frozen=True)
class Ticket:
    """What the handshake learned about a client: where it goes and who it is."""

    room: str
    name: str | None
    since: int | None
    epoch: str | None
    address: str
    key: str | None = None  # a welcome's key: take this name back from an old connection


class Client(asyncio.Protocol):
    """One client connection, from the handshake to the close."""

    def __init__(self, server: ChatServer) -> None:
        self.server = server
        self.protocol = ServerProtocol(max_size=server.config.max_size,
                                       logger=protocol_log)
        self.transport: asyncio.Transport | None = None
        self.address = ""
        self.member: Member | None = None
        self.fragments: list[bytes] = []
        self.fragmented_text = True
        self.timer: asyncio.TimerHandle | None = None  # handshake or close deadline
        self.ping_sent_at: float | None = None  # None: no ping unanswered
        self.entered = False  # past the handshake, in the chat
        # With a shared broker: lines waiting for Redis, and the task that
        # takes them in order (see ChatServer.serve_shared).
        self.inbox: collections.deque[str] | None = None
        self.inbox_ready: asyncio.Event | None = None
        self.task: asyncio.Task | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else "unknown"
        self.timer = asyncio.get_running_loop().call_later(
            self.server.config.handshake_timeout, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Request):
                self.on_request(event)
            else:
                self.on_frame(event)
        self.send_protocol_data()

    def eof_received(self) -> None:
        self.protocol.receive_eof()
        self.send_protocol_data()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer:
            self.timer.cancel()
        self.protocol.receive_eof()  # the protocol learns the close code (1006 if none)
        self.server.forget(self)

    # The handshake

    def on_request(self, request: Request) -> None:
        response = self.server.answer(self, request)
        if response is None:
            response = self.protocol.accept(request)
        self.protocol.send_response(response)
        self.send_protocol_data()  # the response goes out before any frame
        if self.protocol.state is State.OPEN:
            self.timer.cancel()
            self.timer = None
            self.server.enter(self, request.ticket)

    # Messages

    def on_frame(self, frame: Frame) -> None:
        self.ping_sent_at = None  # any frame shows the peer is alive
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self.on_message(opcode is Opcode.TEXT, frame.data)
            else:
                self.fragmented_text = opcode is Opcode.TEXT
                self.fragments = [frame.data]
        elif opcode is Opcode.CONT:
            self.fragments.append(frame.data)
            if frame.fin:
                data, self.fragments = b"".join(self.fragments), []
                self.on_message(self.fragmented_text, data)
        # PING, PONG and CLOSE are answered by the protocol itself.

    def on_message(self, is_text: bool, data: bytes) -> None:
        if not self.entered or self.protocol.state is not State.OPEN:
            return
        if not is_text:
            self.server.on_binary(self)
            return
        try:
            line = data.decode()
        except UnicodeDecodeError:
            self.protocol.fail(1007, "invalid UTF-8")
            self.send_protocol_data()
            return
        self.server.on_line(self, line)

    # Sending

    def write(self, data: bytes) -> None:
        """The one path by which chat frames reach a client."""
        if self.protocol.state is not State.OPEN:
            return
        if self.transport.get_write_buffer_size() > self.server.config.max_buffer:
            self.server.drop(self, "too slow")
            return
        self.transport.write(data)

    def send_protocol_data(self) -> None:
        """Write what the protocol wants written: pongs, close frames, the
        handshake response; an empty chunk means "close the TCP connection"."""
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)
            else:
                self.transport.close()
        if self.protocol.close_expected() and self.timer is None:
            self.arm_close_timer()

    def ping(self) -> None:
        self.ping_sent_at = time.monotonic()
        self.protocol.send_ping(b"")
        self.send_protocol_data()

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; give up on the peer after a while."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self.send_protocol_data()
        if self.timer is None:
            self.arm_close_timer()

    def arm_close_timer(self) -> None:
        self.timer = asyncio.get_running_loop().call_later(
            self.server.config.shutdown_timeout, self.transport.abort)


class ChatServer:
    """The I/O around `Chat`: handshake checks, lines in, frames out."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        if config.broker:
            self.chat: Chat = SharedChat(config)
            self.broker: LocalBroker = RedisBroker(self.chat, config, self.metrics)
        else:
            self.chat = Chat(config)
            self.broker = LocalBroker(self.chat, config, self.metrics)
        self.clients: set[Client] = set()  # in the chat, past the handshake
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.tasks: list[asyncio.Task] = []

    # Entering and leaving

    def enter(self, client: Client, ticket: Ticket) -> None:
        client.entered = True
        client.address = ticket.address
        self.clients.add(client)
        self.per_ip[ticket.address] += 1
        if self.broker.shared:
            client.inbox = collections.deque()
            client.inbox_ready = asyncio.Event()
            client.task = asyncio.create_task(self.serve_shared(client, ticket))
        else:
            holder = self.chat.holder(ticket.room, ticket.name, ticket.key)
            if holder is not None:
                self.replace(holder.connection)
            key = holder.key if holder is not None else None
            room = self.chat.rooms.get(ticket.room)
            if room is not None:
                # What the room queued before this newcomer (a batch held back
                # by --batch-window) is not for it: it gets the history.
                self.broker.flush(room)
            self.admit(client, *self.chat.join(ticket.room, ticket.name, ticket.since,
                                               ticket.epoch, ticket.address, key))

    def admit(self, client: Client, member: Member, out: Outgoing) -> None:
        member.connection = client
        client.member = member
        self.metrics.connections_total += 1
        log.info("connect room=%s name=%s address=%s", member.room.name, member.name,
                 client.address)
        self.send(client, out)
        self.broker.publish(member.room)

    def replace(self, client: Client) -> None:
        """Let a client's name go to its new connection: it leaves now."""
        log.info("replacing %s in %s from %s: it is back on a new connection",
                 client.member.name, client.member.room.name, client.address)
        self.forget(client)
        client.member.room.empty_since = None  # not empty: its member is back at once
        client.close(CLOSE_REPLACED, "replaced by a new connection")

    async def serve_shared(self, client: Client, ticket: Ticket) -> None:
        """With a shared broker, joining and each line wait for Redis; one
        task per client keeps its lines in order."""
        try:
            member, out = await self.broker.join(ticket)
        except BrokerUnavailable as exc:
            client.close(CLOSE_TRY_AGAIN, str(exc)[:100])
            return
        if client not in self.clients:  # it left while Redis let it in
            self.broker.leave(member)
            return
        self.admit(client, member, out)
        while client in self.clients:
            if not client.inbox:
                client.inbox_ready.clear()
                await client.inbox_ready.wait()
                continue
            line = client.inbox.popleft()
            if member.room.members.get(fold(member.name)) is not member:
                continue  # its name went to a new connection: this one is closing
            self.after_line(client, await self.broker.receive(member, line))

    def forget(self, client: Client) -> None:
        if client not in self.clients:
            return
        self.clients.discard(client)
        self.per_ip[client.address] -= 1
        if not self.per_ip[client.address]:
            del self.per_ip[client.address]
        if client.inbox_ready is not None:
            client.inbox_ready.set()  # its task sees the client gone
        member = client.member
        if member is None:
            return
        self.broker.leave(member)
        log.info("disconnect room=%s name=%s address=%s code=%s", member.room.name,
                 member.name, client.address, client.protocol.close_code)

    # Lines in

    def on_line(self, client: Client, line: str) -> None:
        if client not in self.clients:
            return  # replaced by a new connection, and closing
        self.metrics.messages_received += 1
        if client.inbox is None:
            self.after_line(client, self.chat.receive(client.member, line))
        elif len(client.inbox) < self.config.burst:
            client.inbox.append(line)
            client.inbox_ready.set()
        elif client.member is not None:  # lines pile up faster than Redis takes them
            room = client.member.room
            self.send(client, [(client.member, encode(error(
                room.name, "slow down: too many lines waiting; this one was not sent")))])

    def after_line(self, client: Client, out: Outgoing) -> None:
        member = client.member
        self.send(client, out)
        if member.room.pending:
            self.broker.publish(member.room)
        if member.close_with is not None:
            self.metrics.dropped[member.close_with[1]] += 1
            log.warning("closing %s in %s from %s: %s", member.name, member.room.name,
                        client.address, member.close_with[1])
            client.close(*member.close_with)

    def on_binary(self, client: Client) -> None:
        self.metrics.messages_received += 1
        if client.member is None:
            return
        room = client.member.room
        self.send(client, [(client.member, encode(error(
            room.name, "binary frames are not supported; send text")))])

    def send(self, client: Client, out: Outgoing) -> None:
        if out:
            client.write(b"".join(frame_text(data) for _, data in out))

    def drop(self, client: Client, reason: str) -> None:
        """Close a client that cannot keep up; the others go on."""
        member = client.member
        if member.close_with is not None:
            return
        member.close_with = (CLOSE_POLICY, reason)
        self.metrics.dropped[reason] += 1
        log.warning("dropping %s in %s from %s: %s", member.name, member.room.name,
                    client.address, reason)
        client.close(*member.close_with)

    # The handshake: everything a client can be refused for, before the
    # upgrade, as an HTTP status and one plain line.

    def answer(self, client: Client, request: Request) -> Response | None:
        """An HTTP response for `request`, or None to go on with the upgrade."""
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return self.http_answer(client, request)
        address = self.client_address(client, request)
        try:
            request.ticket = self.check_handshake(request, address)
        except Refused as refusal:
            self.metrics.refused[refusal.status] += 1
            log.warning("refused %s %s from %s: %s",  # no query: it may hold a key
                        request.path.partition("?")[0][:100], refusal.status,
                        address, refusal.reason)
            return client.protocol.reject(refusal.status, refusal.reason + "\n")
        return None

    def check_handshake(self, request: Request, address: str) -> Ticket:
        config = self.config
        origin = request.headers.get("Origin")
        if config.allow_origin and origin not in config.allow_origin:
            raise Refused(403, f"origin {origin} is not allowed")
        if len(self.clients) >= config.max_clients:
            raise Refused(503, "server full; try again later")
        if self.per_ip[address] >= config.max_per_ip:
            raise Refused(503, "too many connections from your address")
        path, _, query = request.path.partition("?")
        room = room_from_path(path)
        self.chat.check_room(room)
        params = parse_query(query)
        key = params.get("key")
        return Ticket(room, params.get("name"), parse_since(params.get("since")),
                      params.get("epoch"), address, key if key and KEY.match(key) else None)

    def client_address(self, client: Client, request: Request) -> str:
        if self.config.trust_proxy:
            forwarded = request.headers.get("X-Forwarded-For")
            if forwarded:
                # The right-most entry is the one our trusted proxy added.
                return forwarded.rsplit(",", 1)[-1].strip()[:64]
        return client.address

    # HTTP answers on the same port

    def http_answer(self, client: Client, request: Request) -> Response:
        path = request.path.partition("?")[0]
        if path == "/healthz":
            return client.protocol.reject(200, "ok\n")
        if path == "/metrics":
            response = client.protocol.reject(200, self.metrics_text())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
            return response
        return client.protocol.reject(426, "This is a WebSocket chat server: open the chat "
                                           "page (public/index.html) instead.\n")

    def metrics_text(self) -> str:
        m = self.metrics
        lines = [
            "# HELP chat_connections Clients connected now.",
            "# TYPE chat_connections gauge",
            f"chat_connections {len(self.clients)}",
            "# HELP chat_rooms Rooms in memory now.",
            "# TYPE chat_rooms gauge",
            f"chat_rooms {len(self.chat.rooms)}",
            "# TYPE chat_connections_total counter",
            f"chat_connections_total {m.connections_total}",
            "# TYPE chat_messages_received_total counter",
            f"chat_messages_received_total {m.messages_received}",
            "# TYPE chat_messages_broadcast_total counter",
            f"chat_messages_broadcast_total {m.messages_broadcast}",
            "# TYPE chat_frames_delivered_total counter",
            f"chat_frames_delivered_total {m.frames_delivered}",
            "# TYPE chat_clients_dropped_total counter",
        ]
        for reason in ("flooding", "too slow", "no pong",
                       *sorted(set(m.dropped) - {"flooding", "too slow", "no pong"})):
            lines.append(f'chat_clients_dropped_total{{reason="{reason}"}} {m.dropped[reason]}')
        lines.append("# TYPE chat_handshakes_refused_total counter")
        for status, count in sorted(m.refused.items()):
            lines.append(f'chat_handshakes_refused_total{{status="{status}"}} {count}')
        return "\n".join(lines) + "\n"

    # Background work: dead peers and idle rooms

    async def keep_alive(self) -> None:
        """Ping every client each --ping-interval; a client that has sent
        nothing, not even the pong, for --ping-timeout after it is dead."""
        config = self.config
        step = max(0.05, min(config.ping_interval, config.ping_timeout) / 2)
        last_round = time.monotonic()
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            for client in list(self.clients):
                if client.ping_sent_at is not None and now - client.ping_sent_at > config.ping_timeout:
                    self.metrics.dropped["no pong"] += 1
                    log.warning("no pong from %s", client.address)
                    client.protocol.fail(1011, "keepalive ping timeout")
                    client.send_protocol_data()
                    client.transport.abort()
            if now - last_round >= config.ping_interval:
                last_round = now
                for client in self.clients:
                    if client.ping_sent_at is None and client.protocol.state is State.OPEN:
                        client.ping()

    async def sweep_rooms(self) -> None:
        interval = max(0.05, min(SWEEP_INTERVAL_S, self.config.room_ttl))
        while True:
            await asyncio.sleep(interval)
            self.chat.forget_idle_rooms()

    # Shutdown

    def say_goodbye(self) -> None:
        for room in {client.member.room for client in self.clients if client.member}:
            room.announce(shutdown(room.name))
            self.broker.flush(room)
        for client in list(self.clients):
            client.close(CLOSE_GOING_AWAY, "server shutting down")


def room_from_path(path: str) -> str:
    if path == "/":
        return LOBBY
    name = path[1:]
    if not ROOM_NAME.match(name) or not name.strip("."):  # "." and ".." look like paths
        raise Refused(400, "a room name has 1 to 64 characters: letters A-Z a-z, "
                           "digits, _ . -")
    return name


def parse_query(query: str) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False,
                                       errors="strict", max_num_fields=20)
    except (ValueError, UnicodeDecodeError):
        raise Refused(400, "malformed query string") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise Refused(400, f"parameter {key[:20]} given more than once")
        params[key] = value
    return params


def parse_since(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise Refused(400, "since must be a whole number, the last seq you saw")
    return int(value)


# main ---------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, []) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="chatserver",
        description="A WebSocket chat-room server. Clients connect to "
                    "ws://HOST:PORT/ROOM?name=NICK; open public/index.html to chat.",
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    add("--host", default=None, help="address to listen on (default: all interfaces)")
    add("--port", type=int, default=DEFAULT_PORT, help="port to listen on (0: any free one)")
    add("--history", type=int, default=HISTORY_MESSAGES,
        help="chat messages each room keeps for newcomers and resumes")
    add("--room-ttl", type=float, default=ROOM_TTL_S,
        help="seconds an empty room keeps its history before it is forgotten")
    add("--max-chars", type=int, default=MAX_CHARS,
        help="longest chat line, in characters; longer ones get an error")
    add("--max-size", type=int, default=MAX_SIZE_BYTES,
        help="largest incoming frame, in bytes; larger ones close with 1009")
    add("--rate", type=float, default=RATE_PER_S, help="chat lines per second per client")
    add("--burst", type=int, default=BURST_MESSAGES,
        help="chat lines a client may send at once before --rate applies")
    add("--flood-close", type=float, default=FLOOD_CLOSE_S,
        help="seconds of flooding after which a client is closed with 1008")
    add("--crowd", type=int, default=CROWD_MEMBERS,
        help="members past which a room's joins and leaves are announced together, "
             "once a second, as one presence notice")
    add("--batch-window", type=float, default=BATCH_WINDOW_MS, metavar="MS",
        help="milliseconds a room waits after a send before the next one, so that "
             "messages arriving meanwhile go out in one write per member: less CPU "
             "under load for at most this much more latency (0: send at once)")
    add("--max-rooms", type=int, default=MAX_ROOMS, help="rooms in memory at once")
    add("--max-clients", type=int, default=MAX_CLIENTS, help="connected clients at once")
    add("--max-per-ip", type=int, default=MAX_PER_IP, help="connected clients per address")
    add("--trust-proxy", action="store_true",
        help="take the client address from X-Forwarded-For (behind a reverse proxy)")
    add("--allow-origin", action="append", default=[], metavar="ORIGIN",
        help="accept pages from this Origin only (repeatable; default: any origin)")
    add("--max-buffer", type=int, default=MAX_BUFFER_BYTES,
        help="bytes waiting for a slow client before it is closed as too slow")
    add("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT_S,
        help="seconds a client has to finish the opening handshake")
    add("--ping-interval", type=float, default=PING_INTERVAL_S,
        help="seconds between pings to find dead peers")
    add("--ping-timeout", type=float, default=PING_TIMEOUT_S,
        help="seconds to wait for a pong before the peer is dead")
    add("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT_S,
        help="seconds to say goodbye on SIGTERM/SIGINT before exiting anyway")
    add("--certfile", help="TLS certificate (PEM) to serve wss:// directly")
    add("--keyfile", help="TLS private key (PEM) for --certfile")
    add("--uvloop", action="store_true",
        help="run on uvloop instead of asyncio's event loop (pip install chatserver[uvloop])")
    add("--log-level", default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="how much to log")
    add("--broker", metavar="redis://HOST:PORT/DB",
        help="share rooms with every chatserver process that uses this Redis server "
             "(pip install chatserver[redis]); default: rooms live in this process only")
    add("--workers", type=int, default=1,
        help="processes serving the same port (SO_REUSEPORT), one per core; needs --broker")
    args = parser.parse_args(argv)
    check_scale_out_args(parser, args)
    if not 0 <= args.batch_window <= 1000:
        parser.error("--batch-window takes 0 to 1000 milliseconds")
    if args.keyfile and not args.certfile:
        parser.error("--keyfile needs --certfile")
    for flag in ("history", "crowd", "max_chars", "max_size", "burst", "max_rooms", "max_clients",
                 "max_per_ip", "max_buffer"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    options = vars(args)
    options["allow_origin"] = tuple(options["allow_origin"])
    return Config(**options)


def check_scale_out_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers > 1 and not args.broker:
        parser.error("--workers needs --broker redis://HOST:PORT/DB: worker processes "
                     "share their rooms only through Redis")
    if args.broker and urllib.parse.urlsplit(args.broker).scheme not in (
            "redis", "rediss", "unix"):
        parser.error("--broker must be a redis://HOST:PORT/DB URL "
                     "(or rediss:// for TLS, unix:// for a socket)")


def raise_open_files_limit() -> None:
    """Each client is a file descriptor; ask for as many as we may have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def listen(config: Config) -> tuple[ChatServer, asyncio.Server]:
    """Start serving `config` and return the chat and the listening server."""
    chat_server = ChatServer(config)
    await chat_server.broker.start()
    ssl_context = None
    if config.certfile:
        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_context.load_cert_chain(config.certfile, config.keyfile)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(chat_server), config.host, config.port,
                                      ssl=ssl_context, backlog=1024,
                                      reuse_port=config.workers > 1 or None)
    chat_server.tasks = [asyncio.create_task(chat_server.sweep_rooms()),
                         asyncio.create_task(chat_server.keep_alive())]
    return chat_server, server


async def shut_down(chat_server: ChatServer, server: asyncio.Server) -> None:
    """Stop listening, tell everyone, close every connection with 1001, and
    wait at most --shutdown-timeout for them to go."""
    log.info("shutting down: %d clients", len(chat_server.clients))
    server.close()
    for task in chat_server.tasks:
        task.cancel()
    chat_server.say_goodbye()
    deadline = time.monotonic() + chat_server.config.shutdown_timeout
    while chat_server.clients and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if chat_server.clients:
        log.warning("shutdown timeout: %d clients did not answer", len(chat_server.clients))
        for client in list(chat_server.clients):
            client.transport.abort()
        await asyncio.sleep(0)
    await chat_server.broker.close()


async def run(config: Config, ready: Callable[[str], None] = print) -> None:
    chat_server, server = await listen(config)
    port = server.sockets[0].getsockname()[1]
    scheme = "wss" if config.certfile else "ws"
    host = config.host or "localhost"
    ready(f"chatserver listening on {scheme}://{host}:{port}/ "
          f"(rooms are paths: {scheme}://{host}:{port}/lobby)")
    ready("Open public/index.html, or run `python -m http.server -d public` "
          "and visit http://localhost:8000/")
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    await stop
    await shut_down(chat_server, server)


# --workers: N processes on one port ----------------------------------------

WORKER_START_TIMEOUT_S = 30.0
WORKER_RESTART_S = 1.0  # pause before restarting a worker that died
WORKER_ORPHAN_CHECK_S = 1.0  # how often a worker checks that its parent lives


def run_workers(config: Config) -> int | str:
    """Start --workers processes serving one port (SO_REUSEPORT: the kernel
    spreads connections over them), restart any that dies, and stop them all
    on SIGTERM/SIGINT.  Returns the exit status (a message on failure)."""
    import multiprocessing
    import multiprocessing.connection
    import socket

    try:
        asyncio.run(check_broker(config.broker))
    except BrokerUnavailable as exc:
        return f"chatserver: {exc}"
    # Hold the port (bound, never listening, so it gets no connections) so
    # that --port 0 means one port for all, and a restarted worker finds it.
    reserved = socket.socket()
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reserved.bind((config.host or "", config.port))
    except OSError as exc:
        return f"chatserver: cannot listen on port {config.port}: {exc}"
    config = dataclasses.replace(config, port=reserved.getsockname()[1])
    context = multiprocessing.get_context("fork")
    ready, ready_writer = context.Pipe(duplex=False)
    stopping = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.append(True))

    def start_worker() -> multiprocessing.Process:
        worker = context.Process(target=serve_as_worker, args=(config, ready_writer))
        worker.start()
        return worker

    workers = [start_worker() for _ in range(config.workers)]
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    started = 0
    while started < len(workers):
        failed = [worker for worker in workers if not worker.is_alive()]
        if failed or stopping or time.monotonic() > deadline:
            stop_workers(workers, config.shutdown_timeout)
            if stopping:
                return 0
            return (f"chatserver: a worker did not start (exit code "
                    f"{failed[0].exitcode if failed else 'none: timeout'})")
        if ready.poll(0.1):
            ready.recv()
            started += 1
    scheme = "wss" if config.certfile else "ws"
    host = config.host or "localhost"
    print(f"chatserver listening on {scheme}://{host}:{config.port}/ with {len(workers)} "
          f"worker processes sharing {safe_url(config.broker)}", flush=True)
    while not stopping:
        multiprocessing.connection.wait([worker.sentinel for worker in workers], 0.5)
        for n, worker in enumerate(workers):
            if not worker.is_alive() and not stopping:
                log.warning("worker %d exited with %s; restarting it", worker.pid,
                            worker.exitcode)
                time.sleep(WORKER_RESTART_S)
                workers[n] = start_worker()
    stop_workers(workers, config.shutdown_timeout)
    return 0


def serve_as_worker(config: Config, ready_writer) -> None:
    """One worker process: serve, and tell the parent once listening."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)  # until run() installs its own

    def ready(line: str) -> None:
        if line.startswith("chatserver listening"):
            ready_writer.send(os.getpid())

    # A worker whose parent died (even by SIGKILL) must not serve on alone.
    threading.Thread(target=stop_when_orphaned, args=(os.getppid(),), daemon=True).start()
    try:
        run_loop(config, run(config, ready=ready))
    except BrokerUnavailable as exc:
        sys.exit(f"chatserver: {exc}")


def stop_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WORKER_ORPHAN_CHECK_S)
    os.kill(os.getpid(), signal.SIGTERM)  # a graceful shutdown, as from the parent


def stop_workers(workers: list, timeout: float) -> None:
    for worker in workers:
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGTERM)
    for worker in workers:
        worker.join(timeout + 5)
        if worker.is_alive():
            worker.kill()
            worker.join()


async def check_broker(url: str) -> None:
    client = await connect_redis(url)
    await client.aclose()


def run_loop(config: Config, coroutine) -> None:
    """Run `coroutine` on asyncio's own event loop, or on uvloop if asked."""
    if not config.uvloop:
        asyncio.run(coroutine)
        return
    try:
        import uvloop  # optional: pip install chatserver[uvloop]
    except ImportError:
        coroutine.close()
        sys.exit("chatserver: --uvloop needs the uvloop package: "
                 "pip install chatserver[uvloop]")
    log.info("event loop: uvloop %s", uvloop.__version__)
    uvloop.run(coroutine)


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # websockets logs every open connection at INFO; keep that for DEBUG.
    protocol_log.setLevel(max(logging.WARNING, logging.getLevelName(config.log_level)))
    raise_open_files_limit()
    if config.workers > 1:
        sys.exit(run_workers(config))
    try:
        run_loop(config, run(config, ready=lambda line: print(line, flush=True)))
    except BrokerUnavailable as exc:
        sys.exit(f"chatserver: {exc}")
    except OSError as exc:
        sys.exit(f"chatserver: cannot listen on port {config.port}: {exc}")


if __name__ == "__main__":
    main()
