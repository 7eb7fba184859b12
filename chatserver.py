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
import contextlib
import dataclasses
import functools
import json
import logging
import re
import resource
import secrets
import signal
import ssl
import sys
import time
import unicodedata
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator
from typing import TypeVar

from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

__all__ = ["Config", "Chat", "Room", "Member", "Rooms", "MemoryRooms", "ChatServer", "Client",
           "listen", "shut_down", "main"]

log = logging.getLogger("chatserver")
protocol_log = logging.getLogger("chatserver.protocol")  # websockets' own messages
T = TypeVar("T")


# Configuration ------------------------------------------------------------

DEFAULT_PORT = 8765  # not 8000: `python -m http.server` takes that one.
HISTORY_MESSAGES = 100
HISTORY_BYTES = 64 * 1024  # per room: 100 lines of 600 bytes, or 8 of the longest
ROOM_TTL_S = 3600.0
MAX_CHARS = 2000
MAX_SIZE_BYTES = 64 * 1024
RATE_PER_S = 5.0
BURST_MESSAGES = 20
FLOOD_CLOSE_S = 10.0
MAX_ROOMS = 10_000
MAX_CLIENTS = 10_000
MAX_PER_IP = 100
ROOMS_PER_IP = 100  # rooms in memory one address has opened
NEW_ROOMS_PER_MIN = 30  # and how fast it may open more (a burst of as many)
MAX_BUFFER_BYTES = 256 * 1024
HANDSHAKE_TIMEOUT_S = 10.0
PING_INTERVAL_S = 20.0
PING_TIMEOUT_S = 20.0
SHUTDOWN_TIMEOUT_S = 5.0

NAME_MAX_CHARS = 32
LOBBY = "lobby"
ROOM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
KEY = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")  # what secrets.token_urlsafe gives
CID = KEY  # a client's id for one line it typed (acks=1): the same alphabet
CID_MEMORY_LINES = 1000  # a session remembers at least its last 1,000 acked lines...
CID_MEMORY_S = 600.0  # ...and all those of the last 10 minutes, and lives that long
FLOOD_ERROR_INTERVAL_S = 1.0  # at most one "slow down" error a second
FLOOD_QUIET_S = 1.0  # a flood ends after this long without a refused line
SWEEP_INTERVAL_S = 60.0  # how often idle rooms are looked for
INBOX_LINES = 64  # lines waiting for a back-end before we stop reading more
REQUEST_HEAD_BYTES = 64 * 1024  # held back while looking for a request's end
STORE_ROOMS = 100_000  # rooms a --store keeps on disk: the most recently active
CROWD_MEMBERS = 100
BATCH_WINDOW_MS = 15.0  # a busy room sends at most every 15 ms; see --batch-window
PRESENCE_INTERVAL_S = 1.0  # a crowded room's joins and leaves, gathered
PRESENCE_NAMES = 20  # names listed in one presence notice

# WebSocket close codes we use, besides the library's own (1007 bad UTF-8,
# 1009 frame too big, 1011 ping timeout).
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008  # flooding, too slow
CLOSE_TRY_AGAIN = 1013  # the back-end cannot let anyone in now
CLOSE_REPLACED = 4000  # the same client came back on a new connection (?key=)
CLOSE_KICKED = 4001  # a moderator removed it (/kick, /ban)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that can be set from the command line, with its default."""

    host: str | None = None  # None: all interfaces, like http.server
    port: int = DEFAULT_PORT
    history: int = HISTORY_MESSAGES
    history_bytes: int = HISTORY_BYTES
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
    rooms_per_ip: int = ROOMS_PER_IP
    new_rooms_per_min: float = NEW_ROOMS_PER_MIN
    trust_proxy: bool = False
    auth_secret: str | None = None  # a file with the secret of sign-in tokens
    require_auth: bool = False
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
    store: str | None = None  # a SQLite file that keeps rooms across restarts
    store_rooms: int = STORE_ROOMS
    workers: int = 1


# Frames -------------------------------------------------------------------
#
# Every frame the server sends is built here, as a dict.  `encode` turns one
# into the bytes of a JSON text message, once, whatever the number of readers.


def now_ms() -> int:
    return int(time.time() * 1000)


def encode(frame: dict) -> bytes:
    """`frame` as compact JSON, non-ASCII text as it is, in UTF-8."""
    if _json_chunks is None:  # no C accelerator (PyPy): the same, slower
        return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode()
    return "".join(_json_chunks(frame, 0)).encode()


# What json.dumps(frame, ensure_ascii=False, separators=(",", ":")) runs, made
# once: dumps builds an encoder for every call, which cost as much as the rest
# of a chat line's handling.  No circular check: frames are built here.
_json_chunks = json.encoder.c_make_encoder and json.encoder.c_make_encoder(
    None, json.JSONEncoder().default, json.encoder.encode_basestring, None, ":", ",",
    False, False, True)


def sys_frame(room: str, event: str, message: str, **fields: object) -> dict:
    return {"type": "sys", "event": event, "room": room, "message": message,
            "ts": now_ms(), **fields}


def welcome(room: str, name: str, online: list[str], seq: int, epoch: str, key: str,
            verified: list[str] = (), topic: str = "", mod: bool = False,
            limits: tuple[int, int] = (MAX_CHARS, MAX_SIZE_BYTES)) -> dict:
    """`verified`: the names in `online` that a sign-in token vouches for;
    `mod`: the newcomer moderates the room; `limits`: the longest line in
    characters and the largest frame in bytes, for the page to check first."""
    frame = sys_frame(room, "welcome", f"Welcome to {room}, {name}!",
                      name=name, online=online, seq=seq, epoch=epoch, key=key,
                      verified=list(verified), topic=topic, max_chars=limits[0],
                      max_size=limits[1])
    if mod:
        frame["mod"] = True
    return frame


def vouched(frame: dict, verified: bool) -> dict:
    """Mark a frame about a member whose name a sign-in token vouches for."""
    if verified:
        frame["verified"] = True
    return frame


def joined(room: str, name: str, count: int, verified: bool = False) -> dict:
    return vouched(sys_frame(room, "join", f"{name} has joined", name=name, count=count),
                   verified)


def left(room: str, name: str, count: int, verified: bool = False) -> dict:
    return vouched(sys_frame(room, "leave", f"{name} has left", name=name, count=count),
                   verified)


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


def kicked(room: str, name: str, by: str, reason: str, ban: Ban | None = None) -> dict:
    """A member was removed by a moderator (and banned, with `ban`)."""
    verb = "banned" if ban else "kicked"
    frame = sys_frame(room, "kick", f"{name} was {verb} by {by}" + (f": {reason}" if reason else ""),
                      name=name, by=by, reason=reason)
    if ban:
        frame["ban"] = True
        frame["until"] = None if ban.until is None else int(ban.until * 1000)
    return frame


def topic_set(room: str, topic: str, by: str) -> dict:
    message = f"{by} set the topic: {topic}" if topic else f"{by} cleared the topic"
    return sys_frame(room, "topic", message, topic=topic, by=by)


def deleted(room: str, seq: int, by: str) -> dict:
    return sys_frame(room, "delete", f"{by} deleted a message", seq=seq, by=by)


def ban_list(room: str, bans: list[Ban]) -> dict:
    entries = [{"name": ban.name, "kind": ban.subject.partition(":")[0], "by": ban.by,
                "reason": ban.reason, "until": None if ban.until is None else int(ban.until * 1000)}
               for ban in bans]
    names = ", ".join(ban.name for ban in bans) or "none"
    return sys_frame(room, "bans", f"{len(bans)} banned from {room}: {names}", bans=entries)


def who(room: str, online: list[str], verified: list[str] = ()) -> dict:
    names = ", ".join(online)
    return sys_frame(room, "who", f"{len(online)} online: {names}",
                     online=online, count=len(online), verified=list(verified))


HELP_TEXT = (
    "Commands: /nick NAME (change your name), /me ACTION (say what you do), "
    "/who (who is here), /help (this text). Start a line with // to send a "
    "literal /."
)
MOD_HELP_TEXT = (
    " Moderators: /kick NAME [REASON], /ban NAME [DURATION] [REASON] (like 10m, "
    "2h, 7d, 0 for ever; 1d if none), /unban NAME, /bans, /topic [TEXT], "
    "/delete SEQ."
)


def help_frame(room: str, mod: bool = False) -> dict:
    return sys_frame(room, "help", HELP_TEXT + (MOD_HELP_TEXT if mod else ""))


def error(room: str, message: str, cid: str | None = None) -> dict:
    frame = sys_frame(room, "error", message)
    if cid is not None:
        frame["cid"] = cid  # the line it refuses, on an acks=1 connection
    return frame


def ack(room: str, cid: str, seq: int | None) -> dict:
    """A line is accepted: `seq` of the message it became (None: a command)."""
    return sys_frame(room, "ack", "", cid=cid, seq=seq)


def gap(room: str, missed: int) -> dict:
    return sys_frame(room, "gap", f"{missed} earlier messages are no longer kept",
                     missed=missed)


def shutdown(room: str) -> dict:
    return sys_frame(room, "shutdown", "The server is shutting down; reconnect soon.")


def chat(room: str, name: str, text: str, seq: int, action: bool = False,
         verified: bool = False) -> dict:
    frame = {"type": "user", "room": room, "id": name, "message": text,
             "ts": now_ms(), "seq": seq}
    if action:
        frame["action"] = True
    return vouched(frame, verified)


# Chat logic (no I/O) ------------------------------------------------------
#
# `Chat` holds this process's rooms and the rules of the chat: who may take
# which name, what a line means (`decide`), flood control.  Frames for one
# member are returned to the caller; frames for a whole room are queued on the
# room (`Room.pending`) for the fan-out to send, so that several messages can
# go out in one write per client.


class Refused(Exception):
    """A handshake that must be refused: an HTTP status and a plain reason."""

    def __init__(self, status: int, reason: str) -> None:
        reason = printable(reason, 200)  # it may quote the client: goes to logs and answers
        super().__init__(reason)
        self.status = status
        self.reason = reason


def printable(text: str, limit: int = 100) -> str:
    """Client-supplied `text`, safe for a log line or an HTTP answer: at most
    `limit` characters, and any that could start a forged log line or drive a
    terminal (newlines, ESC, bidi overrides...) written as escapes."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1]
                   for char in text[:limit])


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who a sign-in token says a client is (--auth-secret): its name, and
    whether it moderates the room it joins."""

    name: str
    mod: bool = False


@dataclasses.dataclass
class Ban:
    """A room's ban: of a verified name ("name:FOLDED") or, for guests, of
    an address ("address:ADDR"), until a wall-clock time (None: for ever)."""

    subject: str
    name: str  # the name it was given under: /bans shows it, /unban takes it
    until: float | None
    reason: str = ""
    by: str = ""

    def over(self, now: float) -> bool:
        return self.until is not None and now >= self.until


@dataclasses.dataclass(eq=False)
class Bucket:
    """A client's flood control: a token bucket (--rate, --burst) and the
    flood it is in, if any.  It outlives the connection for a while (see
    Chat.bucket_for): closing and coming back is no way to a fresh burst."""

    tokens: float = 0.0
    refilled_at: float = 0.0
    flooding_since: float | None = None
    flood_error_at: float = float("-inf")
    rejected_at: float = float("-inf")


@dataclasses.dataclass(eq=False)
class Member:
    """One connected client in one room."""

    name: str
    room: Room
    address: str = ""
    verified: bool = False  # its name comes from a sign-in token
    mod: bool = False  # it moderates the room
    connection: Client | None = None  # set by the I/O layer
    bucket: Bucket = dataclasses.field(default_factory=Bucket)
    close_with: tuple[int, str] | None = None  # set when the member must go
    # The secret in this member's welcome: whoever shows it may take the
    # name back on a new connection (a page reconnecting after a drop the
    # server has not noticed yet), and its session goes on.  A new one with
    # every welcome: the key it connected with is spent once it speaks.
    key: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(16))
    previous_key: str | None = None  # the key it connected with, until spent
    # The session this connection belongs to: the one whose acked lines it
    # shares (never sent to a client).
    session: str = ""

    def has_key(self, key: str) -> bool:
        return secrets.compare_digest(self.key.encode(), key.encode())

    def is_here(self) -> bool:
        """Still in its room (not replaced by a new connection)?"""
        return self.room.members.get(fold(self.name)) is self


@dataclasses.dataclass(eq=False)
class Room:
    """A chat room: who is in it, its message numbering and recent history."""

    name: str
    history_limit: int
    history_bytes: int = HISTORY_BYTES
    crowd: int = CROWD_MEMBERS
    opened_by: str = ""  # the address that opened it
    limits: tuple[int, int] = (MAX_CHARS, MAX_SIZE_BYTES)  # --max-chars, --max-size
    epoch: str = dataclasses.field(default_factory=lambda: secrets.token_hex(6))
    seq: int = 0  # last seq given out
    delivered_seq: int = 0  # last seq handed to the fan-out
    members: dict[str, Member] = dataclasses.field(default_factory=dict)  # by folded name
    history: collections.deque[tuple[int, bytes]] = dataclasses.field(init=False)
    pending: list[bytes] = dataclasses.field(default_factory=list)  # room frames not yet sent
    pending_seq: list[int] = dataclasses.field(default_factory=list)
    empty_since: float | None = None
    topic: str = ""
    joining: int = 0  # newcomers being let in: the fan-out waits for them
    # Joins and leaves of a crowded room not yet announced: name -> here now
    # (the last change wins, so someone back on a new connection is here).
    unannounced: dict[str, bool] = dataclasses.field(default_factory=dict)
    sent_at: float = float("-inf")  # when the fan-out last sent its frames (loop time)

    def __post_init__(self) -> None:
        self.history = collections.deque()
        self.history_size = 0  # bytes in history
    def online(self) -> list[str]:
        return [member.name for member in self.members.values()]

    def verified(self) -> list[str]:
        return [member.name for member in self.members.values() if member.verified]

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

    def announce_presence(self, name: str, joining: bool, verified: bool = False) -> None:
        """A join or leave notice, or, in a crowded room, kept for later."""
        if not self.gather_presence(name, joining, len(self.members)):
            notice = joined if joining else left
            self.announce(notice(self.name, name, len(self.members), verified))

    def gather_presence(self, name: str, joining: bool, count: int) -> bool:
        """Keep a join or leave for the next presence notice if the room has
        more than --crowd members (`count`), or already keeps some: a change
        must not overtake one kept before it.  False if it should go out now.

        Each notice goes to every member, so a storm of N joins would cost
        N*N frames; past --crowd members they go out as one `presence`
        notice a second instead (see `take_presence`).  A join and a leave of
        one name cancel out: nobody saw the first, or nobody misses them."""
        if count <= self.crowd and not self.unannounced:
            return False
        if self.unannounced.get(name, joining) != joining:
            del self.unannounced[name]
        else:
            self.unannounced[name] = joining
        return True

    def announce_rename(self, old: str, new: str) -> None:
        """A nick notice, after the joins and leaves kept so far (it may name
        one of them)."""
        self.take_presence()
        self.announce(renamed(self.name, old, new))

    def take_presence(self) -> None:
        """Announce the gathered joins and leaves, if any, as one notice,
        each name once, where it ended up."""
        if self.unannounced:
            changes, self.unannounced = self.unannounced, {}
            arrived = [name for name, here in changes.items() if here]
            departed = [name for name, here in changes.items() if not here]
            frame = presence(self.name, arrived, departed, self.count())
            frame["verified"] = [name for name in frame["joined"]
                                 if getattr(self.members.get(fold(name)), "verified", False)]
            self.announce(frame)

    def count(self) -> int:
        """How many are in the room."""
        return len(self.members)

    def announce(self, frame: dict) -> None:
        """Queue a frame for everyone in the room."""
        self.pending.append(encode(frame))

    def post(self, name: str, text: str, action: bool = False, verified: bool = False) -> int:
        """Number a chat message, keep it in history, queue it for everyone."""
        seq = self.seq + 1
        self.keep(seq, encode(chat(self.name, name, text, seq, action, verified)))
        return seq

    def forget_message(self, seq: int) -> bool:
        """Take the message `seq` out of the history (a moderator deleted
        it); False if it is not there."""
        for index, (kept, data) in enumerate(self.history):
            if kept == seq:
                del self.history[index]
                self.history_size -= len(data)
                return True
        return False

    def keep(self, seq: int, data: bytes) -> None:
        """Keep the chat message `seq` in history and queue it for everyone."""
        self.seq = seq
        self.remember(seq, data)
        self.pending.append(data)
        self.pending_seq.append(seq)

    def remember(self, seq: int, data: bytes) -> None:
        """Add `seq` to the history: the last --history messages, and no more
        than --history-bytes of them (the newest is always kept)."""
        self.history.append((seq, data))
        self.history_size += len(data)
        while len(self.history) > 1 and (len(self.history) > self.history_limit
                                         or self.history_size > self.history_bytes):
            self.history_size -= len(self.history.popleft()[1])

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


# Unicode's category Cc (C0, DEL and C1 controls; fixed by the standard), but
# for newline and tab: one regular expression, not a lookup per character.
CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def text_problem(text: str, max_chars: int) -> str | None:
    """Why `text` cannot be sent as a chat message, or None if it can."""
    if len(text) > max_chars:
        return (f"message too long ({len(text)} characters; the limit is "
                f"{max_chars}); it was not sent")
    if CONTROL_CHARS.search(text):
        return "control characters are not allowed in messages; it was not sent"
    return None


ACKED_FRAME = 'on an acks=1 connection each frame is {"cid": ID, "line": TEXT}, ' \
              'ID being 1 to 64 characters of A-Z a-z 0-9 _ -'
# JSON can carry half of a UTF-16 pair ("\ud800"), which no UTF-8 text frame
# can: such a line could not be encoded to anyone, so it is refused here.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
NOT_TEXT = "the line holds a lone surrogate (\\ud800-\\udfff), which is not text; it was not sent"


def unwrap(text: str) -> tuple[str | None, str | None, str | None]:
    """(cid, line, problem) of a frame from an acks=1 connection.

    A frame that is not `{"cid": ID, "line": TEXT}` has a problem, and its
    cid if one can be read, so that the refusal can name it."""
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):  # "[[[[..." nested past Python's stack
        return None, None, ACKED_FRAME
    if not isinstance(frame, dict):
        return None, None, ACKED_FRAME
    cid, line = frame.get("cid"), frame.get("line")
    if not isinstance(cid, str) or not CID.match(cid):
        return None, None, ACKED_FRAME
    if not isinstance(line, str):
        return cid, None, ACKED_FRAME
    if not line.isascii() and LONE_SURROGATE.search(line):
        return cid, None, NOT_TEXT
    return cid, line, None


Outgoing = list[tuple[Member, bytes]]


def newcomer_frames(member: Member, online: list[str], notes: list[dict], missed: int,
                    history: list[bytes], seq: int | None = None,
                    verified: list[str] = ()) -> Outgoing:
    """What a newcomer gets, in order: the welcome, notes about its name, the
    gap notice if some of what it missed is no longer kept, the history.
    Its history ends at `seq` (by default the room's delivered seq)."""
    room = member.room
    seq = room.delivered_seq if seq is None else seq
    out = [(member, encode(welcome(room.name, member.name, online, seq, room.epoch,
                                   member.key, verified, room.topic, member.mod,
                                   room.limits)))]
    out += [(member, encode(note)) for note in notes]
    if missed:
        out.append((member, encode(gap(room.name, missed))))
    out += [(member, data) for data in history]
    return out


# What a line asks for, as `Chat.decide` reads it; the back-end carries it out.


@dataclasses.dataclass
class Post:
    """A chat message (or a /me action) for the whole room."""

    text: str
    action: bool = False


@dataclasses.dataclass
class Rename:
    new: str


@dataclasses.dataclass
class Who:
    pass


@dataclasses.dataclass
class Reply:
    """An answer for the sender alone, known at once (/help)."""

    frame: dict


@dataclasses.dataclass
class Refuse:
    """The line is not carried out.  `shown`: a plain client is told (a
    flood's refusals are shown at most once a second)."""

    message: str
    shown: bool = True


@dataclasses.dataclass
class Kick:
    """A moderator removes `name` (and bans it for `ban_s` seconds, None:
    no ban, inf: for ever)."""

    name: str
    reason: str = ""
    ban_s: float | None = None


@dataclasses.dataclass
class Unban:
    name: str


@dataclasses.dataclass
class ListBans:
    pass


@dataclasses.dataclass
class SetTopic:
    text: str


@dataclasses.dataclass
class Delete:
    seq: int


Moderation = Kick | Unban | ListBans | SetTopic | Delete
Decision = Post | Rename | Who | Reply | Refuse | Moderation | None  # None: nothing to do

BAN_DEFAULT_S = 86400.0  # /ban NAME with no duration: a day
DURATION = re.compile(r"(\d{1,6})([smhd]?)\Z")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
TOPIC_MAX_CHARS = 300


def moderation(verb: str, argument: str) -> Decision:
    """A moderator's command, read (its right to use it is checked before)."""
    words = argument.split(None, 1)
    name, rest = (words + ["", ""])[:2] if words else ("", "")
    if verb in ("/kick", "/ban", "/unban") and not name:
        return Refuse(f"usage: {verb} NAME" + (" [REASON]" if verb == "/kick" else
                                               " [DURATION] [REASON]" if verb == "/ban" else ""))
    if verb == "/kick":
        return Kick(unicodedata.normalize("NFC", name), rest.strip())
    if verb == "/ban":
        first, _, reason = rest.strip().partition(" ")
        found = DURATION.match(first)
        if found:
            seconds = int(found.group(1)) * DURATION_UNITS[found.group(2)]
            ban_s = float("inf") if seconds == 0 else float(seconds)
        else:
            ban_s, reason = BAN_DEFAULT_S, rest.strip()
        return Kick(unicodedata.normalize("NFC", name), reason.strip(), ban_s)
    if verb == "/unban":
        return Unban(unicodedata.normalize("NFC", name))
    if verb == "/bans":
        return ListBans()
    if verb == "/topic":
        problem = text_problem(argument, TOPIC_MAX_CHARS) if argument else None
        return Refuse(f"topic refused: {problem}") if problem else SetTopic(argument)
    if not (argument.isascii() and argument.isdigit() and len(argument) <= 18):  # "²" is a digit
        return Refuse("usage: /delete SEQ (the number of the message)")
    return Delete(int(argument))


MODERATOR_COMMANDS = ("/kick", "/ban", "/unban", "/bans", "/topic", "/delete")


@dataclasses.dataclass(frozen=True)
class Acked:
    """A remembered line: accepted as the message `seq` (None: a command)."""

    seq: int | None


@dataclasses.dataclass(eq=False)
class Session:
    """The acked lines of one session, as an in-memory back-end keeps them:
    at least the last CID_MEMORY_LINES, and all those of the last
    CID_MEMORY_S seconds, up to `cid_memory_lines` (see
    Chat.forget_idle_sessions for how long a session is kept)."""

    lines: collections.OrderedDict[str, tuple[int | None, float]] = dataclasses.field(
        default_factory=collections.OrderedDict)  # cid -> (seq, when)
    connections: int = 0
    left_at: float = 0.0
    # The keys that name it, oldest first (at most KEYS_PER_SESSION).
    keys: collections.OrderedDict[str, None] = dataclasses.field(
        default_factory=collections.OrderedDict)

    def recall(self, cid: str) -> Acked | None:
        line = self.lines.get(cid)
        return None if line is None else Acked(line[0])

    def remember(self, cid: str, seq: int | None, now: float, most: int) -> None:
        """Remember `cid`; forget the oldest lines past CID_MEMORY_LINES
        that are older than CID_MEMORY_S, and past `most`, however young."""
        self.lines[cid] = (seq, now)
        self.lines.move_to_end(cid)
        while len(self.lines) > CID_MEMORY_LINES:
            _, (_, when) = next(iter(self.lines.items()))
            if now - when < CID_MEMORY_S and len(self.lines) <= most:
                break
            self.lines.popitem(last=False)


def cid_memory_lines(config: Config) -> int:
    """The most acked lines a session remembers: all that one client can
    send in CID_MEMORY_S at --rate after its --burst (3,020 by default), at
    least CID_MEMORY_LINES.  A session with several connections at once (in
    several rooms, on several processes) may send more: its oldest go first,
    however young.  Every back-end keeps to it."""
    return max(CID_MEMORY_LINES, int(config.rate * CID_MEMORY_S) + config.burst)


def session_keep_s(config: Config) -> float:
    """How long a session outlives its last connection: --room-ttl, at least
    CID_MEMORY_S (while a room keeps a message, its sender's session keeps
    its cid).  Every back-end keeps sessions this long."""
    return max(CID_MEMORY_S, config.room_ttl)


KEYS_PER_SESSION = 8  # unspent keys a session keeps; the oldest go first


@dataclasses.dataclass(eq=False)
class Reservation:
    """A new room that a newcomer from `address` is on its way to open."""

    address: str
    done: bool = False


class Chat:
    """All rooms of one server and the rules of the chat.  No I/O here."""

    def __init__(self, config: Config = Config(), clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.rooms: dict[str, Room] = {}
        self.opened: collections.Counter[str] = collections.Counter()  # rooms by opener
        self.reserved: collections.Counter[str] = collections.Counter()  # rooms being opened
        self.openings: dict[str, tuple[float, float]] = {}  # address: (tokens, when)
        # The flood control of connections gone, by ("session", id) and by
        # ("address", address), until it has refilled to --burst (the
        # longest refilled first).
        self.buckets_left: collections.OrderedDict[tuple[str, str], Bucket] = \
            collections.OrderedDict()
        self.sessions: dict[str, Session] = {}  # by session id
        # Sessions with no connection left, the longest gone first.
        self.departed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.keys: dict[str, str] = {}  # a welcome's key -> its session id
        # Every room's bans, by room and subject: checked at the handshake,
        # so every back-end keeps them all here (they are few).
        self.bans: dict[str, dict[str, Ban]] = {}
        self.wall_clock: Callable[[], float] = time.time  # bans outlive restarts

    # Rooms

    def check_room(self, room_name: str, address: str = "") -> None:
        """Raise Refused if a client from `address` may not enter
        `room_name` now: a new room counts against the server's --max-rooms,
        and against the --rooms-per-ip and --new-rooms-per-min of the
        address that opens it."""
        if room_name in self.rooms:
            return
        config = self.config
        if self.opened[address] + self.reserved[address] >= config.rooms_per_ip:
            raise Refused(503, "too many rooms opened from your address; try again later")
        if self.opening_tokens(address) < 1:
            raise Refused(503, "rooms opened too fast from your address; try again later")
        if len(self.rooms) + self.reserved.total() >= config.max_rooms and \
                not self.forget_idle_rooms(force_one=True):
            raise Refused(503, "too many rooms on this server; try again later")

    def opening_tokens(self, address: str) -> float:
        """A token bucket per address: --new-rooms-per-min, as many at once."""
        now = self.clock()
        burst = self.config.new_rooms_per_min
        tokens, at = self.openings.get(address, (burst, now))
        tokens = min(burst, tokens + (now - at) * burst / 60)
        self.openings[address] = (tokens, now)
        return tokens

    def reserve(self, room_name: str, address: str) -> Reservation | None:
        """A newcomer that passed check_room is on its way into `room_name`:
        if the room is new, it counts for its address from now on, so that
        joins that wait (for Redis, for the store) cannot all pass the check
        at once.  `release` what this returns when the join is over, whatever
        its outcome; opening the room with it turns it into an opened room."""
        if room_name in self.rooms:
            return None
        self.reserved[address] += 1
        tokens, at = self.openings.get(address, (self.config.new_rooms_per_min, self.clock()))
        self.openings[address] = (tokens - 1, at)
        return Reservation(address)

    def release(self, reservation: Reservation | None) -> None:
        if reservation is None or reservation.done:
            return
        reservation.done = True
        self.reserved[reservation.address] -= 1
        if not self.reserved[reservation.address]:
            del self.reserved[reservation.address]

    def open_room(self, room_name: str, address: str = "", kind: type[Room] | None = None,
                  reservation: Reservation | None = None) -> Room:
        """The room `room_name`, opened (as a `kind`, a Room by default) by
        `address` if it is new."""
        self.forget_if_expired(room_name)
        room = self.rooms.get(room_name)
        if room is None:
            self.release(reservation)  # it is an opened room now
            room = self.rooms[room_name] = (kind or Room)(
                room_name, self.config.history, self.config.history_bytes, self.config.crowd,
                opened_by=address, limits=(self.config.max_chars, self.config.max_size))
            self.opened[address] += 1
        room.empty_since = None
        return room

    def forget_room(self, room_name: str) -> None:
        room = self.rooms.pop(room_name)
        self.opened[room.opened_by] -= 1
        if not self.opened[room.opened_by]:
            del self.opened[room.opened_by]

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
            self.forget_room(name)
        full = self.config.new_rooms_per_min  # buckets that are full again: as if new
        for address, (tokens, at) in list(self.openings.items()):
            if tokens + (now - at) * full / 60 >= full:
                del self.openings[address]
        return len(expired)

    def forget_if_expired(self, room_name: str) -> None:
        room = self.rooms.get(room_name)
        if room and room.empty_since is not None and \
                self.clock() - room.empty_since >= self.config.room_ttl:
            self.forget_room(room_name)

    def forget_idle_sessions(self) -> None:
        """Forget sessions with no connection for --room-ttl (at least
        CID_MEMORY_S): while a room keeps a message, its sender's session
        keeps its cid."""
        now = self.clock()
        keep = session_keep_s(self.config)
        for sid in list(self.departed):
            if now - self.sessions[sid].left_at < keep:
                break  # the others left later
            self.forget_session(sid)

    def forget_session(self, sid: str) -> None:
        session = self.sessions.pop(sid)
        self.departed.pop(sid, None)
        for key in session.keys:
            del self.keys[key]

    def depart(self, sid: str) -> None:
        """The session `sid` has no connection left.  At most --max-clients
        such sessions are kept (the longest gone is forgotten first), so
        that clients that come and go cannot grow memory without bound."""
        if not self.sessions[sid].lines:
            self.forget_session(sid)  # nothing to remember it by
            return
        self.departed[sid] = None
        self.departed.move_to_end(sid)
        while len(self.departed) > self.config.max_clients:
            self.forget_session(next(iter(self.departed)))

    def name_session(self, key: str, sid: str) -> Session:
        """Let `key` name the session `sid` (made if new)."""
        self.departed.pop(sid, None)  # back: not gone any more
        session = self.sessions.setdefault(sid, Session())
        session.keys[key] = None
        self.keys[key] = sid
        while len(session.keys) > KEYS_PER_SESSION:  # a client that never speaks
            del self.keys[session.keys.popitem(last=False)[0]]
        return session

    def spend(self, member: Member) -> None:
        """The member has spoken on its connection, so it has its welcome's
        key: the key it connected with names nothing any more (a key seen in
        a proxy's log is already spent)."""
        key, member.previous_key = member.previous_key, None
        sid = self.keys.pop(key, None) if key else None
        if sid is not None:
            self.sessions[sid].keys.pop(key, None)

    # What clients do, in this process's memory

    def join(self, room_name: str, wanted: str | None = None, since: int | None = None,
             epoch: str | None = None, address: str = "",
             key: str | None = None, identity: Identity | None = None) -> tuple[Member, Outgoing]:
        """Add a newcomer: its welcome, what it missed, and a join notice.

        `key`: a key from an earlier welcome: the newcomer goes on with that
        session.  Its welcome has a new key; the one it came with works until
        it speaks (so a reconnect whose welcome was lost can still use it).
        `identity`: a sign-in token's; the newcomer gets exactly its name (a
        guest who holds it is renamed; see `make_way`)."""
        room = self.open_room(room_name, address)
        if identity is not None:
            name, notes = identity.name, []
            self.make_way(room, name)
        else:
            wanted, notes = self.newcomer_name(room_name, wanted)
            name = room.unique_name(wanted or f"guest-{secrets.token_hex(2)}")
        sid = self.keys.get(key) if key else None
        session = sid or secrets.token_urlsafe(16)
        member = Member(name, room, address, bucket=self.bucket_for(sid, address),
                        verified=identity is not None,
                        mod=identity is not None and identity.mod, session=session)
        if sid is not None:
            member.previous_key = key
        self.name_session(member.key, member.session).connections += 1
        room.members[fold(name)] = member

        if epoch != room.epoch:
            since = None  # another epoch: its numbers mean nothing here
        missed, history = room.history_since(since)
        room.announce_presence(name, joining=True, verified=member.verified)
        return member, newcomer_frames(member, room.online(), notes, missed, history,
                                       verified=room.verified())

    def make_way(self, room: Room, name: str) -> None:
        """A verified member is coming as `name`: a guest who holds it here
        is renamed (`name-2`...), with a nick notice.  (Its own other
        connection is replaced before: see `holder`.)"""
        guest = room.members.get(fold(name))
        if guest is not None and not guest.verified:
            self.rename(guest, room.unique_name(guest.name))

    def holder(self, room_name: str, name: str | None, key: str | None,
               identity: Identity | None = None) -> Member | None:
        """The member whose place a newcomer takes: the one who holds `name`
        in the room if `key` names its session (a client back on a new
        connection, whose old one is not yet found dead), or the verified
        holder of the identity's name (one connection per signed-in name)."""
        room = self.rooms.get(room_name)
        if room is None:
            return None
        if identity is not None:
            member = room.members.get(fold(identity.name))
            return member if member is not None and member.verified else None
        if name is None or not key:
            return None
        member = room.members.get(fold(unicodedata.normalize("NFC", name)))
        if member is None or self.keys.get(key) != member.session:
            return None
        return member

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

    def leave(self, member: Member, replaced: bool = False, quiet: bool = False) -> None:
        """`member` is gone (`replaced`: by a new connection, which takes its
        place at once, so the room is not empty even if it was the last;
        `quiet`: with no leave notice, another notice says why)."""
        room = member.room
        if not member.is_here():
            return
        del room.members[fold(member.name)]
        session = self.sessions.get(member.session)
        if session is not None:
            session.connections -= 1
            session.left_at = self.clock()
            if not session.connections:
                self.depart(member.session)
        if (room.members or replaced) and not quiet:
            room.announce_presence(member.name, joining=False, verified=member.verified)
        elif not room.members and not replaced:
            room.empty_since = self.clock()

    def post(self, member: Member, text: str, action: bool, cid: str | None) -> int:
        seq = member.room.post(member.name, text, action, member.verified)
        if cid is not None:
            self.remember(member, cid, seq)
        return seq

    def rename(self, member: Member, new: str) -> str | None:
        """Rename `member` to `new`, or say why not."""
        room = member.room
        if room.has_name(new) and fold(new) != fold(member.name):
            return f"{new} is already taken in {room.name}"
        old = member.name
        del room.members[fold(old)]
        member.name = new
        room.members[fold(new)] = member
        room.announce_rename(old, new)
        return None

    def recall(self, member: Member, cid: str) -> Acked | None:
        session = self.sessions.get(member.session)
        return session.recall(cid) if session else None

    # Moderation: the rules; back-ends keep and share what it changes

    def banned(self, room_name: str, identity: Identity | None, address: str) -> Ban | None:
        """The ban that keeps a newcomer out of the room, if any: of its
        verified name, or, for a guest, of its address."""
        bans = self.bans.get(room_name)
        if not bans:
            return None
        subject = f"name:{fold(identity.name)}" if identity else f"address:{address}"
        ban = bans.get(subject)
        if ban is not None and ban.over(self.wall_clock()):
            self.lift(room_name, ban)
            return None
        return ban

    def bans_for(self, target: Member, by: Member, kick: Kick) -> list[Ban]:
        """The bans a /ban of `target` makes: of its verified name, and of
        its address (which keeps out guests only: dropping the token must
        not be a way back in)."""
        until = None if kick.ban_s == float("inf") else self.wall_clock() + kick.ban_s
        subjects = [f"name:{fold(target.name)}"] if target.verified else []
        return [Ban(subject, target.name, until, kick.reason, by.name)
                for subject in subjects + [f"address:{target.address}"]]

    def add_ban(self, room_name: str, ban: Ban) -> None:
        self.bans.setdefault(room_name, {})[ban.subject] = ban

    def lift(self, room_name: str, ban: Ban) -> None:
        bans = self.bans.get(room_name, {})
        if bans.get(ban.subject) is ban:
            del bans[ban.subject]
        if not bans:
            self.bans.pop(room_name, None)

    def room_bans(self, room_name: str) -> list[Ban]:
        """The room's bans still in force."""
        now = self.wall_clock()
        for ban in list(self.bans.get(room_name, {}).values()):
            if ban.over(now):
                self.lift(room_name, ban)
        return list(self.bans.get(room_name, {}).values())

    def bans_named(self, room_name: str, name: str) -> list[Ban]:
        return [ban for ban in self.room_bans(room_name) if fold(ban.name) == fold(name)]

    def kick(self, by: Member, kick: Kick) -> tuple[Member | None, list[Ban], dict | str]:
        """Remove a member from `by`'s room (in this process): (the member,
        the bans, the kick notice, for the caller to announce once the bans
        are kept), or (None, [], why not)."""
        room = by.room
        target = room.members.get(fold(kick.name))
        if target is None:
            return None, [], f"no one named {kick.name} is in {room.name}"
        if target is by:
            return None, [], "you cannot remove yourself; just leave"
        bans = self.bans_for(target, by, kick) if kick.ban_s is not None else []
        for ban in bans:
            self.add_ban(room.name, ban)
        self.leave(target, quiet=True)
        notice = kicked(room.name, target.name, by.name, kick.reason, bans[0] if bans else None)
        return target, bans, notice

    def set_topic(self, by: Member, text: str) -> None:
        by.room.topic = text
        by.room.announce(topic_set(by.room.name, text, by.name))

    def delete(self, by: Member, seq: int) -> str | None:
        room = by.room
        if not room.forget_message(seq):
            return f"there is no message {seq} in the history of {room.name}"
        room.announce(deleted(room.name, seq, by.name))
        return None

    def remember(self, member: Member, cid: str, seq: int | None) -> None:
        session = self.sessions.get(member.session)
        if session is not None:
            session.remember(cid, seq, self.clock(), cid_memory_lines(self.config))

    # What a line means: the same rules for every back-end

    def decide(self, member: Member, line: str) -> Decision:
        """What one text line from `member` asks for."""
        if not self.admit(member):
            return self.flood_answer(member)
        if not line.strip():
            return None  # blank lines are ignored
        problem = text_problem(line, self.config.max_chars)
        if problem:
            return Refuse(problem)
        if line.startswith("//"):
            return Post(line[1:])
        if line.startswith("/"):
            return self.command(member, line)
        return Post(line)

    def command(self, member: Member, line: str) -> Decision:
        verb, _, argument = line.partition(" ")
        verb, argument = verb.lower(), argument.strip()
        if verb == "/nick" and member.verified:
            return Refuse("your name comes from your sign-in; it cannot be changed here")
        if verb == "/nick":
            new = unicodedata.normalize("NFC", argument)
            problem = "usage: /nick NAME" if not new else name_problem(new)
            if problem is None and new == member.name:
                problem = f"you are already {new}"
            return Refuse(problem) if problem else Rename(new)
        if verb == "/me":
            return Post(argument, action=True) if argument else Refuse("usage: /me ACTION")
        if verb == "/who":
            return Who()
        if verb == "/help":
            return Reply(help_frame(member.room.name, member.mod))
        if verb in MODERATOR_COMMANDS:
            return moderation(verb, argument) if member.mod else \
                Refuse(f"only moderators may use {verb}")
        return Refuse(f"unknown command {verb[:40]}; try /help (start with // to send a "
                      "literal /)")

    # Flood control: a token bucket per member, which outlives its
    # connection until it is full again.

    def bucket_for(self, session: str | None, address: str) -> Bucket:
        """A newcomer's flood control.  A full --burst, unless a connection
        of the session its key named, or else (no session named) from its
        address, left with less than that less than --burst / --rate
        seconds ago: then that bucket's tokens.  So reconnecting after every
        few lines (with a key or without) gives no fresh burst, while a page
        back after a drop has what it had, refilled at --rate (its own: not
        that of another client behind the same address).  Its session's
        flood goes on too, to the door; an address's does not: the newcomer
        may be someone else in the same office, who has flooded nobody.
        A connection taken over by its key leaves its bucket first (see
        keep_bucket).  Per process."""
        if session is not None:
            left = self.buckets_left.get(("session", session))
            if left is not None:
                return dataclasses.replace(left)
        else:
            left = self.buckets_left.get(("address", address))
            if left is not None:
                return Bucket(tokens=left.tokens, refilled_at=left.refilled_at)
        return Bucket(tokens=self.config.burst, refilled_at=self.clock())

    def keep_bucket(self, member: Member) -> None:
        """`member`'s connection is gone, or taken over by its key: keep its
        bucket for its session and for its address, unless one kept there
        has fewer tokens (the emptiest is what a newcomer gets).  At most
        2 x --max-clients are kept (the longest kept go first), most for a
        few seconds."""
        now = self.clock()
        full_after = self.config.burst / self.config.rate
        while self.buckets_left:  # full again, as if new: forget them
            oldest = next(iter(self.buckets_left.values()))
            if now - oldest.refilled_at < full_after and \
                    len(self.buckets_left) < 2 * self.config.max_clients:
                break
            self.buckets_left.popitem(last=False)
        bucket = self.refill(member.bucket, now)
        if bucket.tokens >= self.config.burst:
            return  # as good as new
        for whose in (("session", member.session), ("address", member.address)):
            kept = self.buckets_left.get(whose)
            if kept is None or self.refill(kept, now).tokens >= bucket.tokens:
                self.buckets_left[whose] = bucket
            self.buckets_left.move_to_end(whose)

    def refill(self, bucket: Bucket, now: float) -> Bucket:
        config = self.config
        bucket.tokens = min(config.burst, bucket.tokens + (now - bucket.refilled_at) * config.rate)
        bucket.refilled_at = now
        return bucket

    def admit(self, member: Member) -> bool:
        now = self.clock()
        bucket = self.refill(member.bucket, now)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            # A flood ends after a quiet second, not at the first line that
            # slips through on a refilled token.
            if bucket.flooding_since is not None and now - bucket.rejected_at > FLOOD_QUIET_S:
                bucket.flooding_since = None
            return True
        if bucket.flooding_since is None:
            bucket.flooding_since = now
        bucket.rejected_at = now
        return False

    def flood_answer(self, member: Member) -> Refuse:
        """What a line over the rate limit gets: an error now and then, and
        after --flood-close seconds of flooding, the door."""
        now = self.clock()
        bucket = member.bucket
        message = (f"slow down: at most {self.config.rate:g} messages a second; "
                   "lines over the limit are not sent")
        if now - bucket.flooding_since >= self.config.flood_close:
            member.close_with = (CLOSE_POLICY, "flooding")
            return Refuse(message, shown=False)
        if now - bucket.flood_error_at < FLOOD_ERROR_INTERVAL_S:
            return Refuse(message, shown=False)
        bucket.flood_error_at = now
        return Refuse(message)


# Fan-out ------------------------------------------------------------------
#
# Each frame is encoded and framed once, and the same bytes are written
# straight to every member's transport.  Room frames queued during one turn
# of the event loop go out together, one write per member, which is what
# keeps the cost per delivery low under load.  Frames are never compressed
# (permessage-deflate is not negotiated), so every member can share them.
# Every back-end sends through this one fan-out.


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


class Fanout:
    """Sends each room's queued frames to its members: batched by
    --batch-window, with a crowded room's joins and leaves gathered into one
    presence notice a second, and held while a newcomer is let in."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.metrics = metrics
        self.batch_window = config.batch_window / 1000
        self.chunk_bytes = config.max_buffer // 4
        self.scheduled: dict[Room, asyncio.Handle] = {}  # rooms with a flush to come
        self.presence_scheduled: set[Room] = set()
        self.running_loop: asyncio.AbstractEventLoop | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running event loop.  Kept: on Python 3.11,
        asyncio.get_running_loop() costs a getpid() system call, and every
        line would pay two."""
        loop = self.running_loop
        if loop is None or not loop.is_running():
            loop = self.running_loop = asyncio.get_running_loop()
        return loop

    def publish(self, room: Room) -> None:
        """Send what `room` has queued, at the end of this event loop turn,
        or, with --batch-window, once the window since its last send is over."""
        loop = self.loop()
        if room.pending and room not in self.scheduled:
            wait = room.sent_at + self.batch_window - loop.time()
            if wait > 0:
                self.scheduled[room] = loop.call_later(wait, self.flush, room)
            else:
                self.scheduled[room] = loop.call_soon(self.flush, room)
        if room.unannounced and room not in self.presence_scheduled:
            self.presence_scheduled.add(room)
            loop.call_later(PRESENCE_INTERVAL_S, self.flush_presence, room)

    @contextlib.contextmanager
    def joining(self, room: Room) -> Iterator[None]:
        """Let a newcomer in.  What the room held back before it goes out
        first: it is not for the newcomer, who gets the history instead.
        What comes meanwhile waits (the newcomer's history is read up to the
        room's delivered seq) and goes out once it is a member, to it too."""
        self.flush(room)
        room.joining += 1
        try:
            yield
        finally:
            room.joining -= 1
            self.publish(room)

    def flush_presence(self, room: Room) -> None:
        self.presence_scheduled.discard(room)
        room.take_presence()
        self.flush(room)

    def unschedule(self, room: Room) -> None:
        handle = self.scheduled.pop(room, None)
        if handle is not None:
            handle.cancel()  # a flush called early: no second one when the window ends

    def flush(self, room: Room, for_joiners: bool = True) -> None:
        """Send what `room` has queued now; unless a newcomer is being let
        in and `for_joiners` (the last frames before a shutdown go at once)."""
        self.unschedule(room)
        if room.joining and for_joiners:
            return  # `joining` publishes when the newcomer is in
        frames = room.take_pending()
        if not frames:
            return
        room.sent_at = self.loop().time()
        wire = list(map(frame_text, frames))  # (join makes this list anyway)
        data = b"".join(wire)
        chunks = (data,) if len(data) <= self.chunk_bytes else self.chunks(data, wire)
        for chunk in chunks:
            # The hot loop: one write per member, the same bytes for all.
            # Writes never remove members (that waits for connection_lost),
            # so the dict can be walked as it is.
            for member in room.members.values():
                member.connection.write(chunk)
        self.metrics.messages_broadcast += len(frames)
        self.metrics.frames_delivered += len(frames) * len(room.members)

    def chunks(self, data: bytes, wire: list[bytes]) -> list[memoryview]:
        """`data`, the frames `wire` joined, cut between frames into writes
        of at most a quarter of --max-buffer (a longer frame alone): a
        member that does not read is then closed at its limit, not handed a
        whole burst on top of it.  Only a burst of long lines comes here."""
        view, chunks, start, end = memoryview(data), [], 0, 0
        for frame in wire:
            size = len(frame)
            if end > start and end + size - start > self.chunk_bytes:
                chunks.append(view[start:end])
                start = end
            end += size
        chunks.append(view[start:])
        return chunks


# Where rooms live: the back-end seam --------------------------------------
#
# The connection layer sees the rooms through `Rooms`: join, post a line,
# rename, who, leave, and the memory of acked lines.  `Rooms.receive` turns a
# line into those calls, once for every back-end: the chat rules (`Chat`),
# acks and idempotent resends live here, above the seam.  Back-ends:
# `MemoryRooms` below; `RedisRooms` in chatserver_redis.py (--broker),
# imported only when asked for.


class Unavailable(Exception):
    """The back-end cannot take this request now (Redis away, disk full):
    the client gets an error, or, while joining, a close with 1013."""


class Unconfirmed(Unavailable):
    """The back-end may have carried the request out, or not (Redis did not
    answer).  The client is closed with 1013 rather than told "not sent": it
    reconnects and resends its unacked lines, and their cids make that safe."""


# How a post started with Rooms.post_soon ends: (seq, None) or (None, why not).
Posted = Callable[[int | None, Unavailable | None], None]


class Rooms:
    """What the connection layer needs from where rooms live.

    `waits` is False for a back-end whose coroutines never wait (in memory):
    the connection layer then runs them to their end at once (`run_now`),
    with no task per client.  Otherwise each client gets a task that takes
    its lines in order, one at a time, or, if `pipelines`, all that wait at
    once.  Every frame to a room goes out through `fanout`.
    """

    waits = True
    pipelines = False  # True: carries out a client's lines in the order they start

    def __init__(self, chat: Chat, fanout: Fanout) -> None:
        self.chat = chat
        self.fanout = fanout

    async def start(self) -> None:
        """Connect to what holds the rooms; raise Unavailable if it cannot."""

    async def close(self) -> None:
        """Say goodbye for our members, and disconnect."""

    def check_room(self, room_name: str, address: str) -> None:
        """Raise Refused if a newcomer from `address` cannot enter
        `room_name` now."""
        self.chat.check_room(room_name, address)

    def health(self) -> str | None:
        """Why the chat cannot work now (for /healthz), or None."""
        return None

    async def sweep(self) -> None:
        """Housekeeping, every minute or so."""

    def spend(self, member: Member) -> None:
        """`member` has spoken: the key it connected with is spent."""
        self.chat.spend(member)

    async def before_answer(self, member: Member) -> None:
        """Wait, if need be, until `member`'s earlier lines are queued in its
        room: an answer must not overtake them (the connection layer sends
        what the room has queued first)."""

    async def join(self, ticket: Ticket) -> tuple[Member, Outgoing]:
        """Let a newcomer in: a name (taken over from its old connection if
        the ticket's key says so), its session, the welcome and the history
        since the ticket's seq; the room hears of it.  Raise Unavailable if
        it cannot enter now."""
        raise NotImplementedError

    def leave(self, member: Member) -> None:
        """`member` is gone; the room hears of it.  Never waits or fails."""
        raise NotImplementedError

    async def post(self, member: Member, text: str, action: bool, cid: str | None) -> int:
        """Number and keep a chat message as safely as this back-end can,
        then publish it; return its seq.  With a cid, at most once per
        session: a cid already remembered returns the seq it got then."""
        raise NotImplementedError

    def post_soon(self, member: Member, text: str, action: bool, cid: str | None,
                  done: Posted) -> None:
        """`post`, for a back-end that pipelines, without a coroutine: start
        it now, and call `done(seq, None)` once it is published, or
        `done(None, Unavailable)`, on the event loop (perhaps at once).  The
        connection layer posts plain chat lines this way: no task and no
        future per line."""
        raise NotImplementedError

    async def rename(self, member: Member, new: str) -> str | None:
        """Rename `member`, announcing it; or return why not."""
        raise NotImplementedError

    async def who(self, member: Member) -> tuple[list[str], list[str]]:
        """Everyone in `member`'s room, and the verified names among them."""
        raise NotImplementedError

    async def recall(self, member: Member, cid: str) -> Acked | None:
        """How `member`'s session's line `cid` was acked, if it was."""
        raise NotImplementedError

    async def remember(self, member: Member, cid: str, seq: int | None) -> None:
        """Remember that `member`'s session's line `cid` was acked."""
        raise NotImplementedError

    # Moderation (the rules are Chat's; `member` is a moderator)

    async def kick(self, member: Member, kick: Kick) -> str | None:
        """Remove (and ban) a member of `member`'s room, on whichever
        connection it is: its connection is closed with 4001, the room gets a
        kick notice.  Or say why not."""
        raise NotImplementedError

    async def unban(self, member: Member, name: str) -> str | None:
        raise NotImplementedError

    async def set_topic(self, member: Member, text: str) -> None:
        raise NotImplementedError

    async def delete(self, member: Member, seq: int) -> str | None:
        """Take a message out of the room's history, with a delete notice."""
        raise NotImplementedError

    def expel(self, member: Member, by: str, reason: str, notice: bytes = b"") -> None:
        """Close the connection of a member a moderator removed, after the
        room's kick `notice` (which says whether it is a ban, and until when)."""
        if member.connection is not None:
            if notice:
                member.connection.write(frame_text(notice))
            words = f"removed by {by}" + (f": {reason}" if reason else "")
            member.connection.close(CLOSE_KICKED, words.encode()[:120].decode(errors="ignore"))

    def replace(self, member: Member) -> None:
        """Close `member`'s connection: its name and session went to a new one."""
        log.info("replacing %s in %s from %s: it is back on a new connection",
                 member.name, member.room.name, member.address)
        member.connection.close(CLOSE_REPLACED, "replaced by a new connection")

    async def receive(self, member: Member, line: str, cid: str | None = None) -> Outgoing:
        """Carry out one line from `member`; return what it gets back.

        With a cid (acks=1), the answer is exactly one `ack` or one `error`
        carrying it, and a line whose cid the session remembers is not
        carried out again: it gets the ack it got the first time."""
        room = member.room.name
        decision = self.chat.decide(member, line)
        try:
            if cid is not None and not isinstance(decision, Post):
                acked = await self.recall(member, cid)  # a post checks its cid itself
                if acked is not None:
                    return [(member, encode(ack(room, cid, acked.seq)))]
            frames, seq, problem = await self.carry_out(member, decision, cid)
        except Unconfirmed as exc:
            member.connection.close(CLOSE_TRY_AGAIN, str(exc)[:100])
            return []
        except Unavailable as exc:
            frames, seq, problem = [], None, str(exc)
        if problem is not None:
            if cid is not None or not isinstance(decision, Refuse) or decision.shown:
                frames.append(error(room, problem, cid))
        elif cid is not None:
            if not isinstance(decision, Post):
                with contextlib.suppress(Unavailable):  # done all the same: ack it
                    await self.remember(member, cid, None)
            frames.append(ack(room, cid, seq))
        if any(frame["event"] != "ack" for frame in frames):
            await self.before_answer(member)
        return [(member, encode(frame)) for frame in frames]

    async def carry_out(self, member: Member, decision: Decision,
                        cid: str | None) -> tuple[list[dict], int | None, str | None]:
        """(frames for the sender, the seq posted, why it was refused)."""
        if isinstance(decision, Post):
            return [], await self.post(member, decision.text, decision.action, cid), None
        if isinstance(decision, Rename):
            return [], None, await self.rename(member, decision.new)
        if isinstance(decision, Who):
            return [who(member.room.name, *await self.who(member))], None, None
        if isinstance(decision, Reply):
            return [decision.frame], None, None
        if isinstance(decision, Refuse):
            return [], None, decision.message
        if decision is None:
            return [], None, None
        return await self.moderate(member, decision)

    async def moderate(self, member: Member, decision: Moderation
                       ) -> tuple[list[dict], int | None, str | None]:
        """Carry out a moderator's command, and log it: who, what, whom
        (never a message's text)."""
        room = member.room.name
        frames, subject = [], ""
        if isinstance(decision, Kick):
            problem, subject = await self.kick(member, decision), decision.name
        elif isinstance(decision, Unban):
            problem, subject = await self.unban(member, decision.name), decision.name
        elif isinstance(decision, SetTopic):
            problem = await self.set_topic(member, decision.text)
        elif isinstance(decision, Delete):
            problem, subject = await self.delete(member, decision.seq), str(decision.seq)
        else:
            problem, frames = None, [ban_list(room, self.chat.room_bans(room))]
        if problem is None and not isinstance(decision, ListBans):
            what = "ban" if isinstance(decision, Kick) and decision.ban_s else \
                type(decision).__name__.lower()
            log.info("moderation room=%s by=%s action=%s subject=%s", room, member.name,
                     what, printable(subject, 64))
        return frames, None, problem


class MemoryRooms(Rooms):
    """Rooms in this process's memory, the default.  Nothing here waits: a
    message is safe once it is in its room's history."""

    waits = False

    async def join(self, ticket: Ticket) -> tuple[Member, Outgoing]:
        chat = self.chat
        room = chat.open_room(ticket.room, ticket.address, reservation=ticket.reservation)
        holder = chat.holder(ticket.room, ticket.name, ticket.key, ticket.identity)
        if holder is not None:
            chat.leave(holder, replaced=True)
            chat.keep_bucket(holder)  # the newcomer goes on with it
            self.replace(holder)
        with self.fanout.joining(room):
            return chat.join(ticket.room, ticket.name, ticket.since, ticket.epoch,
                             ticket.address, ticket.key, ticket.identity)

    def leave(self, member: Member) -> None:
        self.chat.leave(member)
        self.fanout.publish(member.room)

    async def post(self, member: Member, text: str, action: bool, cid: str | None) -> int:
        acked = self.chat.recall(member, cid) if cid is not None else None
        if acked is not None:
            return acked.seq
        return self.chat.post(member, text, action, cid)

    async def rename(self, member: Member, new: str) -> str | None:
        return self.chat.rename(member, new)

    async def who(self, member: Member) -> tuple[list[str], list[str]]:
        return member.room.online(), member.room.verified()

    async def recall(self, member: Member, cid: str) -> Acked | None:
        return self.chat.recall(member, cid)

    async def remember(self, member: Member, cid: str, seq: int | None) -> None:
        self.chat.remember(member, cid, seq)

    async def kick(self, member: Member, kick: Kick) -> str | None:
        target, bans, outcome = self.chat.kick(member, kick)
        if target is None:
            return outcome
        try:
            for ban in bans:  # kept before anyone sees the notice that tells of it
                await self.keep_ban(member.room.name, ban)
        finally:  # not kept (the moderator is told): removed all the same
            member.room.announce(outcome)
            self.expel(target, member.name, kick.reason, encode(outcome))
            self.fanout.publish(member.room)
        return None

    async def unban(self, member: Member, name: str) -> str | None:
        bans = self.chat.bans_named(member.room.name, name)
        if not bans:
            return f"{name} is not banned from {member.room.name}"
        for ban in bans:
            self.chat.lift(member.room.name, ban)
            await self.lift_ban(member.room.name, ban)
        return None

    async def set_topic(self, member: Member, text: str) -> None:
        self.chat.set_topic(member, text)
        self.fanout.publish(member.room)

    async def delete(self, member: Member, seq: int) -> str | None:
        problem = self.chat.delete(member, seq)
        self.fanout.publish(member.room)
        return problem

    async def keep_ban(self, room_name: str, ban: Ban) -> None:
        """A ban was made (a back-end that keeps rooms keeps it too)."""

    async def lift_ban(self, room_name: str, ban: Ban) -> None:
        """A ban was lifted."""


def open_rooms(config: Config, chat: Chat, fanout: Fanout) -> Rooms:
    """The back-end the command line asks for, imported only then."""
    if config.broker:
        from chatserver_redis import RedisRooms  # needs the redis package
        return RedisRooms(chat, fanout, config)
    if config.store:
        from chatserver_store import StoreRooms
        return StoreRooms(chat, fanout, config)
    return MemoryRooms(chat, fanout)


def run_now(coroutine: Coroutine[object, None, T]) -> T:
    """The result of a coroutine that never waits (MemoryRooms'), at once:
    no task, no turn of the event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("a back-end that never waits has waited")


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
    acks: bool = False  # acks=1: each frame is {"cid", "line"} and gets an ack or an error
    reservation: Reservation | None = None  # the new room it opens, if any
    identity: Identity | None = None  # who its sign-in token says it is


def frame_head(data: bytes, pos: int) -> tuple[int, int] | None:
    """(header size, payload length) of the WebSocket frame that starts at
    `pos` in `data` (RFC 6455 5.2; the header with its mask key), or None if
    its header is not all there yet."""
    if len(data) - pos < 2:
        return None
    second = data[pos + 1]
    length = second & 0x7F
    head = 6 if second & 0x80 else 2
    if length == 126:
        head += 2
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
    elif length == 127:
        head += 8
        length = int.from_bytes(data[pos + 2:pos + 10], "big")
    return (head, length) if len(data) - pos >= head else None


class Client(asyncio.Protocol):
    """One client connection, from the handshake to the close."""

    def __init__(self, server: ChatServer, head: bytes = b"") -> None:
        self.server = server
        self.head = head  # what --workers' parent read before handing it over
        self.protocol = ServerProtocol(max_size=server.config.max_size,
                                       logger=protocol_log)
        self.transport: asyncio.Transport | None = None
        self.max_size = server.config.max_size
        self.max_buffer = server.config.max_buffer
        self.address = ""
        self.member: Member | None = None
        self.fragments: list[bytes] = []
        self.fragmented_text = True
        self.timer: asyncio.TimerHandle | None = None  # handshake or close deadline
        self.ping_sent_at: float | None = None  # None: no ping unanswered
        self.heard_at = time.monotonic()  # when it last sent a frame
        self.answered = False  # its request has had its answer
        self.early = bytearray()  # what came before that answer
        # Frames are read here or by websockets' parser (see receive_frames):
        # the start of a frame whose header is not all there yet, and how
        # many bytes the parser needs to finish a frame it has begun.
        self.held = b""
        self.owed = 0
        self.in_message = False  # the parser has begun a fragmented message
        self.entered = False  # past the handshake, in the chat
        self.acks = False
        self.paused: set[str] = set()  # why we read nothing from it now
        self.counted_as: str | None = None  # the address its connection counts for
        # With a back-end that waits: lines waiting for it, and the task that
        # takes them in order (see ChatServer.serve).
        self.inbox: collections.deque[str] | None = None
        self.inbox_chars = 0
        self.inbox_ready: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        # With a back-end that pipelines, chat lines that come while the
        # task is idle are started at once (ChatServer.start_line): the
        # answers of those on their way, in order, each a list that gets
        # its Outgoing when known; and a future the task waits on until
        # they are all sent, before it takes a line of its own.
        self.idle = False
        self.unanswered: collections.deque[list[Outgoing]] = collections.deque()
        self.drained: asyncio.Future | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else "unknown"
        # Past --max-buffer bytes waiting for the client, pause_writing():
        # we read no more from it until they drain, or it is dropped.
        transport.set_write_buffer_limits(high=self.server.config.max_buffer)
        self.timer = asyncio.get_running_loop().call_later(
            self.server.config.handshake_timeout, self.transport.abort)
        self.server.connected(self)
        if self.head:
            head, self.head = self.head, b""
            self.data_received(head)

    def pause_writing(self) -> None:
        self.pause("writes")

    def resume_writing(self) -> None:
        self.resume("writes")

    def pause(self, why: str) -> None:
        """Read no more from this client, for `why` (writes, or lines waiting)."""
        if not self.paused:
            self.transport.pause_reading()
        self.paused.add(why)

    def resume(self, why: str) -> None:
        if why in self.paused:
            self.paused.discard(why)
            if not self.paused and not self.transport.is_closing():
                self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.answered:
            self.receive_frames(data)
            return
        # Until the request is answered, what follows it waits: a frame sent
        # along with it would otherwise be taken first (its pong, or its
        # failure, would go out before the 101).
        start = max(0, len(self.early) - 3)  # the end may straddle two reads
        self.early += data
        end = self.early.find(b"\r\n\r\n", start)
        if end < 0 and len(self.early) <= REQUEST_HEAD_BYTES:
            return
        cut = len(self.early) if end < 0 else end + 4  # too long: the parser says so
        head, self.early = bytes(self.early[:cut]), self.early[cut:]
        self.feed(head)
        if self.answered and self.early:
            rest, self.early = bytes(self.early), bytearray()
            self.receive_frames(rest)

    def receive_frames(self, data: bytes) -> None:
        """Take frames from the client.  The chat's lines, whole final text
        frames, are read here: websockets' parser cost as much as all the
        rest of a line's handling.  Anything else (control frames,
        fragments, a frame split across reads, anything malformed, or
        anything once the connection is closing) goes to the parser, from
        that frame to the end of the read, and the parser is kept at a frame
        boundary whenever we read a frame ourselves."""
        protocol = self.protocol
        if self.owed:  # the parser is inside a frame: this is its
            if len(data) <= self.owed:
                self.owed -= len(data)
                self.feed(data)
                return
            self.feed(data[:self.owed])
            data, self.owed = data[self.owed:], 0
        if self.held:
            data, self.held = self.held + data, b""
        pos, end, taken = 0, len(data), False
        while pos < end:
            found = frame_head(data, pos)
            if found is None:
                self.held = data[pos:]
                break
            head, length = found
            if (data[pos] == 0x81 and data[pos + 1] & 0x80 and pos + head + length <= end
                    and length <= self.max_size and not self.in_message
                    and protocol.state is State.OPEN and not protocol.debug):
                # FIN, no RSV bits, text, masked, whole, not too big, not in
                # the middle of a fragmented message: what on_frame does.
                start, pos = pos + head, pos + head + length
                self.heard()
                self.on_message(True, apply_mask(data[start:pos], data[start - 4:start]))
                taken = True
                continue
            self.give_to_parser(data, pos)
            return
        if taken:
            self.send_protocol_data()

    def give_to_parser(self, data: bytes, pos: int) -> None:
        """Feed websockets' parser `data` from the frame at `pos` on; hold
        an unfinished header back, and count what an unfinished frame owes."""
        start, end = pos, len(data)
        while pos < end:
            found = frame_head(data, pos)
            if found is None:
                self.held = data[pos:]
                break
            pos += found[0] + found[1]
        if pos > end:
            self.owed, pos = pos - end, end
        self.feed(data[start:pos])

    def release_held(self) -> None:
        """The connection ends: the parser gets the unfinished header we
        held, as it would have had it."""
        if self.held and not self.protocol.reader.eof:
            held, self.held = self.held, b""
            self.protocol.receive_data(held)

    def feed(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Request):
                self.on_request(event)
            else:
                self.on_frame(event)
        self.send_protocol_data()

    def eof_received(self) -> None:
        self.release_held()
        self.protocol.receive_eof()
        self.send_protocol_data()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer:
            self.timer.cancel()
        if self.answered:
            self.release_held()
            self.protocol.receive_eof()  # the protocol learns the close code (1006 if none)
        else:
            self.let_go_of_handshake()
        self.server.disconnected(self)

    def let_go_of_handshake(self) -> None:
        """Free the unanswered request's headers (up to 1 MiB) now.  Its
        protocol and parser refer to each other, and so does an error met
        while parsing (its traceback holds the parser's frames): only a full
        garbage collection, which may not come for a long time, would free
        them."""
        self.protocol.parser.close()
        self.protocol.handshake_exc = None

    # The handshake

    def on_request(self, request: Request) -> None:
        response = self.server.answer(self, request)
        if response is None:
            response = self.protocol.accept(request)
        self.protocol.send_response(response)
        self.answered = True
        self.send_protocol_data()  # the response goes out before any frame
        # websockets' parser keeps the request for the connection's life (a
        # local of its generator): its headers, some 15 objects, would be
        # walked by every full garbage collection, for each client.
        request.headers.clear()
        if self.protocol.state is State.OPEN:
            self.timer.cancel()
            self.timer = None
            self.server.enter(self, request.ticket)

    # Messages

    def on_frame(self, frame: Frame) -> None:
        self.heard()
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            self.in_message = not frame.fin  # as the parser sees it, admitted or not
        elif opcode is Opcode.CONT and frame.fin:
            self.in_message = False
        # Every frame counts towards the client's rate: a whole text message
        # once (as a line), any other frame (ping, pong, binary, each
        # continuation) on its own.  Its pong or error counts towards
        # --max-buffer like any other byte written to it.
        counted = opcode is Opcode.TEXT and frame.fin or opcode is Opcode.CLOSE
        if not counted and self.entered and not self.server.admit_frame(self):
            return
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

    def heard(self) -> None:
        """A frame came: the peer is alive (any frame shows it), and it has
        spoken, which spends the key it connected with."""
        self.ping_sent_at = None
        self.heard_at = time.monotonic()
        if self.member is not None and self.member.previous_key is not None:
            self.server.rooms.spend(self.member)

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

    def write(self, data: bytes | memoryview) -> None:
        """The one path by which chat frames reach a client.  A client is
        closed as too slow rather than have more than --max-buffer bytes
        wait for it (unless nothing waits: one write always goes)."""
        if self.protocol.state is not State.OPEN:
            return
        transport = self.transport
        waiting = transport.get_write_buffer_size()
        if waiting + len(data) > self.max_buffer and waiting:
            self.server.drop(self, "too slow")
            return
        transport.write(data)

    def send_protocol_data(self) -> None:
        """Write what the protocol wants written: pongs, close frames, the
        handshake response; an empty chunk means "close the TCP connection"."""
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)
            else:
                self.transport.close()
        if self.transport.get_write_buffer_size() > self.server.config.max_buffer and \
                self.member is not None:
            self.server.drop(self, "too slow")  # pongs pile up like chat frames
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
    """The I/O around the rooms: handshake checks, lines in, frames out."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.chat = Chat(config)
        self.rooms = open_rooms(config, self.chat, Fanout(config, self.metrics))
        self.auth = open_auth(config)  # (verify, secret), or None: everyone is a guest
        self.clients: set[Client] = set()  # in the chat, past the handshake
        self.connections = 0  # every TCP connection, from its accept to its close
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.tasks: list[asyncio.Task] = []

    # Entering and leaving

    def connected(self, client: Client) -> None:
        """Count a connection from its accept: one still in its handshake
        holds as much as one in a room.  Over --max-clients it is answered
        503 at once.  By address, it is counted here, or, behind a proxy
        (--trust-proxy), once the handshake has named the client."""
        self.connections += 1
        if not self.config.trust_proxy:
            self.per_ip[client.address] += 1
            client.counted_as = client.address
        if self.connections > self.config.max_clients:
            self.refuse_at_once(client, "server full; try again later")
        elif self.per_ip[client.address] > self.config.max_per_ip:
            self.refuse_at_once(client, "too many connections from your address")

    def refuse_at_once(self, client: Client, reason: str) -> None:
        """503 before the request is read: it would cost what we refuse."""
        log.warning("refused a connection 503 from %s: %s", client.address, reason)
        body = f"{reason}\n".encode()
        client.transport.write(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                               b"Content-Type: text/plain; charset=utf-8\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        client.transport.close()
        self.metrics.refused[503] += 1

    def disconnected(self, client: Client) -> None:
        self.connections -= 1
        self.forget(client)
        if client.counted_as is not None:
            self.per_ip[client.counted_as] -= 1
            if not self.per_ip[client.counted_as]:
                del self.per_ip[client.counted_as]
            client.counted_as = None

    def enter(self, client: Client, ticket: Ticket) -> None:
        client.entered = True
        client.address = ticket.address
        client.acks = ticket.acks
        self.clients.add(client)
        if client.counted_as is None:
            self.per_ip[ticket.address] += 1
            client.counted_as = ticket.address
        ticket = dataclasses.replace(
            ticket, reservation=self.chat.reserve(ticket.room, ticket.address))
        if self.rooms.waits:
            client.inbox = collections.deque()
            client.inbox_ready = asyncio.Event()
            client.task = asyncio.create_task(self.serve(client, ticket))
            client.task.add_done_callback(lambda task: self.served(client, task))
        else:
            joined = run_now(self.rooms.join(ticket))
            self.chat.release(ticket.reservation)
            self.admit(client, *joined)

    def admit(self, client: Client, member: Member, out: Outgoing) -> None:
        member.connection = client
        client.member = member
        self.metrics.connections_total += 1
        log.info("connect room=%s name=%s address=%s", member.room.name, member.name,
                 client.address)
        self.send(client, out)

    async def serve(self, client: Client, ticket: Ticket) -> None:
        """With a back-end that waits, joining and each line wait for it;
        one task per client keeps its lines in order."""
        try:
            member, out = await self.rooms.join(ticket)
        except Unavailable as exc:
            client.close(CLOSE_TRY_AGAIN, str(exc)[:100])
            return
        finally:
            self.chat.release(ticket.reservation)
        if client not in self.clients:  # it left while it was being let in
            self.rooms.leave(member)
            return
        self.admit(client, member, out)
        while client in self.clients:
            if not client.inbox:
                client.resume("lines")
                client.inbox_ready.clear()
                client.idle = self.rooms.pipelines  # chat lines need no task now
                await client.inbox_ready.wait()
                client.idle = False
                continue
            if client.unanswered:  # lines started without the task go first
                client.drained = asyncio.get_running_loop().create_future()
                await client.drained
                continue
            if self.rooms.pipelines:
                # Start every waiting line now, in order (a back-end that
                # pipelines carries them out in the order they start), and
                # answer them in order: a paste of 20 lines waits for one
                # commit, not 20.
                lines, client.inbox, client.inbox_chars = client.inbox, collections.deque(), 0
                answers = [asyncio.ensure_future(self.take_line(client, line)) for line in lines]
            else:
                line = client.inbox.popleft()
                client.inbox_chars -= len(line)
                answers = [self.take_line(client, line)]
            for answer in answers:
                self.after_line(client, await answer)

    def served(self, client: Client, task: asyncio.Task) -> None:
        """A client's task ended: if by a bug, say so, and close it (1011)."""
        if not task.cancelled() and task.exception() is not None:
            log.error("serving %s failed", client.address, exc_info=task.exception())
            client.close(1011, "internal error")

    def forget(self, client: Client) -> None:
        if client not in self.clients:
            return
        self.clients.discard(client)
        if client.inbox_ready is not None:
            client.inbox_ready.set()  # its task sees the client gone
        member = client.member
        if member is None:
            return
        self.rooms.leave(member)
        self.chat.keep_bucket(member)
        log.info("disconnect room=%s name=%s address=%s code=%s", member.room.name,
                 member.name, client.address, client.protocol.close_code)

    # Lines in

    def on_line(self, client: Client, line: str) -> None:
        self.metrics.messages_received += 1
        if client.idle and not client.inbox and self.start_line(client, line):
            return
        if client.inbox is not None:
            client.inbox.append(line)
            client.inbox_chars += len(line)
            client.inbox_ready.set()
            if len(client.inbox) >= INBOX_LINES or client.inbox_chars >= self.config.max_size:
                # Push back rather than drop lines: read no more from this
                # client until its task has taken what it sent.
                client.pause("lines")
        else:
            self.after_line(client, run_now(self.take_line(client, line)))

    def start_line(self, client: Client, text: str) -> bool:
        """Start a chat line now, without the client's task (idle), with a
        back-end that pipelines: a task step, a task and a future less per
        line.  Its answer goes out after those of the lines started before
        it (`unanswered`).  False if it is not a plain chat line (a command,
        a blank, a malformed frame): the task takes it, as any other."""
        member = client.member
        if not member.is_here() or member.close_with is not None:
            return False
        cid, line = None, text
        if client.acks:
            cid, line, problem = unwrap(text)
            if problem is not None:
                return False
        if not line.strip() or line[0] == "/" and not line.startswith("//"):
            return False
        # Now Post, or Refuse (flooding, too long): what Rooms.receive does
        # with them, without awaiting anything.
        decision = self.chat.decide(member, line)
        answer: list[Outgoing] = []
        client.unanswered.append(answer)
        if len(client.unanswered) >= INBOX_LINES:
            client.pause("answers")  # as for lines waiting for the task
        room = member.room.name
        if isinstance(decision, Post):
            self.rooms.post_soon(member, decision.text, decision.action, cid,
                                 functools.partial(self.posted, client, answer, room, cid))
        else:
            # A line posted before, sent again (after a reconnect) and refused
            # now, gets its ack, as in Rooms.receive; the sessions of a back-end
            # that pipelines are the Chat's.
            acked = self.chat.recall(member, cid) if cid is not None else None
            if acked is not None:
                answer.append([(member, encode(ack(room, cid, acked.seq)))])
            else:
                shown = cid is not None or decision.shown
                answer.append([(member, encode(error(room, decision.message, cid)))]
                              if shown else [])
            self.send_answers(client)
        return True

    def posted(self, client: Client, answer: list[Outgoing], room: str, cid: str | None,
               seq: int | None, problem: Unavailable | None) -> None:
        """A line that start_line began is posted, or not: its answer."""
        out: Outgoing = []
        if problem is not None:
            out = [(client.member, encode(error(room, str(problem), cid)))]
        elif cid is not None:
            out = [(client.member, encode(ack(room, cid, seq)))]
        answer.append(out)
        self.send_answers(client)

    def send_answers(self, client: Client) -> None:
        """Send the answers of lines that start_line began, in order, as far
        as they are known."""
        unanswered = client.unanswered
        while unanswered and unanswered[0]:
            self.after_line(client, unanswered.popleft()[0])
        if len(unanswered) < INBOX_LINES:
            client.resume("answers")
        if not unanswered and client.drained is not None:
            if not client.drained.done():
                client.drained.set_result(None)
            client.drained = None

    async def take_line(self, client: Client, text: str) -> Outgoing:
        """Carry out one text frame from `client`: what it gets back."""
        member = client.member
        if not member.is_here() or member.close_with is not None:
            return []  # replaced by a new connection, or flooding: it is closing
        if not client.acks:
            return await self.rooms.receive(member, text)
        cid, line, problem = unwrap(text)
        if problem is not None:
            return [(member, encode(error(member.room.name, problem, cid)))]
        return await self.rooms.receive(member, line, cid)

    def after_line(self, client: Client, out: Outgoing) -> None:
        member = client.member
        if member.room.pending and any(b'"event":"ack"' not in data for _, data in out):
            # An answer must not overtake the sender's earlier lines, which
            # may wait in the room's batch: they go first.  (An ack may.)
            self.rooms.fanout.flush(member.room)
        self.send(client, out)
        if member.room.pending:
            self.rooms.fanout.publish(member.room)
        if member.close_with is not None and client.protocol.state is State.OPEN:
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

    def admit_frame(self, client: Client) -> bool:
        """Count a frame other than a whole text message towards the
        client's rate; over it, the frame is ignored, and the client hears
        of it as a flooding client does (then it is closed with 1008)."""
        member = client.member
        if member is None or self.chat.admit(member):
            return True
        refusal = self.chat.flood_answer(member)
        out = [(member, encode(error(member.room.name, refusal.message)))] if refusal.shown else []
        self.after_line(client, out)
        return False

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
        address = client.address
        try:
            if (header(request, "Upgrade") or "").lower() != "websocket":
                return self.http_answer(client, request)
            address = self.client_address(client, request)
            request.ticket = self.check_handshake(client, request, address)
        except Refused as refusal:
            self.metrics.refused[refusal.status] += 1
            log.warning("refused %s %s from %s: %s",  # no query: it may hold a key
                        printable(request.path.partition("?")[0]), refusal.status,
                        address, refusal.reason)
            return client.protocol.reject(refusal.status, refusal.reason + "\n")
        return None

    def check_handshake(self, client: Client, request: Request, address: str) -> Ticket:
        """Everything a client can be refused for; what is wrong with the
        request itself first, so that a bad request costs nothing (an idle
        room is not evicted for it)."""
        config = self.config
        origin = header(request, "Origin")
        if config.allow_origin and origin not in config.allow_origin:
            raise Refused(403, f"origin {origin} is not allowed")
        path, _, query = request.path.partition("?")
        room = room_from_path(path)
        params = parse_query(query)
        since = parse_since(params.get("since"))
        key = params.get("key")
        identity = self.identify(room, params.get("token"))
        ban = self.chat.banned(room, identity, address)
        if ban is not None:
            until = "for good" if ban.until is None else time.strftime(
                "until %Y-%m-%d %H:%M UTC", time.gmtime(ban.until))
            raise Refused(403, f"you are banned from {room} {until}"
                               + (f": {ban.reason}" if ban.reason else ""))
        if self.per_ip[address] > config.max_per_ip - (client.counted_as is None):
            raise Refused(503, "too many connections from your address")
        self.rooms.check_room(room, address)
        return Ticket(room, params.get("name"), since, params.get("epoch"), address,
                      key if key and KEY.match(key) else None, acks=params.get("acks") == "1",
                      identity=identity)

    def identify(self, room: str, token: str | None) -> Identity | None:
        """Who the sign-in token says the client is (--auth-secret); 401 or
        403 if it says nothing good.  Without --auth-secret, tokens are
        not read: everyone is a guest."""
        if self.auth is None:
            return None
        if not token:
            if self.config.require_auth:
                raise Refused(401, "this chat needs a sign-in token (?token=)")
            return None
        verify, secret = self.auth
        return verify(token, secret, room)

    def client_address(self, client: Client, request: Request) -> str:
        if self.config.trust_proxy:
            # Several lines are one list (a proxy may add a line of its own),
            # and the right-most entry is the one our trusted proxy added.
            forwarded = ",".join(request.headers.get_all("X-Forwarded-For"))
            if forwarded.strip():
                return printable(forwarded.rsplit(",", 1)[-1].strip(), 64)
        return client.address

    # HTTP answers on the same port

    def http_answer(self, client: Client, request: Request) -> Response:
        path = request.path.partition("?")[0]
        if path == "/healthz":
            problem = self.rooms.health()
            return client.protocol.reject(503 if problem else 200, f"{problem or 'ok'}\n")
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
        """Ping each client that has been quiet for --ping-interval; one
        that stays quiet, not even a pong, for --ping-timeout more is dead."""
        config = self.config
        step = max(0.05, min(1.0, config.ping_interval / 4, config.ping_timeout / 4))
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            for client in list(self.clients):
                due = keepalive_due(now - client.heard_at, client.ping_sent_at is not None,
                                    config.ping_interval, config.ping_timeout, step)
                if due == "dead":
                    self.metrics.dropped["no pong"] += 1
                    log.warning("no pong from %s", client.address)
                    client.protocol.fail(1011, "keepalive ping timeout")
                    client.send_protocol_data()
                    client.transport.abort()
                elif due == "ping" and client.protocol.state is State.OPEN:
                    client.ping()

    async def sweep_rooms(self) -> None:
        interval = max(0.05, min(SWEEP_INTERVAL_S, self.config.room_ttl))
        while True:
            await asyncio.sleep(interval)
            self.chat.forget_idle_rooms()
            self.chat.forget_idle_sessions()
            try:
                await self.rooms.sweep()
            except Unavailable as exc:
                log.warning("sweep: %s", exc)

    # Shutdown

    def say_goodbye(self) -> None:
        for room in {client.member.room for client in self.clients if client.member}:
            room.announce(shutdown(room.name))
            self.rooms.fanout.flush(room, for_joiners=False)
        for client in list(self.clients):
            client.close(CLOSE_GOING_AWAY, "server shutting down")


def keepalive_due(quiet: float, pinged: bool, interval: float, timeout: float,
                  step: float) -> str | None:
    """What a client that has sent nothing for `quiet` seconds needs, looked
    at every `step` seconds: "dead" so that it is found within interval +
    timeout of its last frame, "ping" once it is quiet for the interval (a
    step early, not late), or None."""
    if quiet >= interval + timeout - step:
        return "dead"
    if quiet >= interval - step and not pinged:
        return "ping"
    return None


def header(request: Request, name: str) -> str | None:
    """The value of the header `name`, or None; a repeated one is refused."""
    values = request.headers.get_all(name)
    if len(values) > 1:
        raise Refused(400, f"the {name} header is given more than once")
    return values[0] if values else None


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
    add("--history-bytes", type=int, default=HISTORY_BYTES,
        help="bytes of chat frames each room keeps at most: --history lines of the "
             "longest text would take 100 times more")
    add("--room-ttl", type=float, default=ROOM_TTL_S,
        help="seconds an empty room keeps its history before it is forgotten")
    add("--max-chars", type=int, default=MAX_CHARS,
        help="longest chat line, in characters; longer ones get an error")
    add("--max-size", type=int, default=MAX_SIZE_BYTES,
        help="largest incoming frame, in bytes; larger ones close with 1009")
    add("--rate", type=float, default=RATE_PER_S,
        help="chat lines per second per client (one that reconnects goes on with what it "
             "left: no fresh --burst); a session remembers at most --rate x 600 + --burst "
             "acked lines")
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
    add("--rooms-per-ip", type=int, default=ROOMS_PER_IP,
        help="rooms in memory that one address may have opened")
    add("--new-rooms-per-min", type=float, default=NEW_ROOMS_PER_MIN,
        help="rooms one address may open a minute, and at once")
    add("--trust-proxy", action="store_true",
        help="take the client address from X-Forwarded-For (behind a reverse proxy)")
    add("--auth-secret", metavar="FILE",
        help="accept sign-in tokens (?token=, JWT HS256) signed with the secret in FILE: "
             "verified names and moderators (pip install chatserver[auth]); make tokens "
             "with `chatserver token`")
    add("--require-auth", action="store_true",
        help="refuse connections without a valid sign-in token (401); needs --auth-secret")
    add("--allow-origin", action="append", default=[], metavar="ORIGIN",
        help="accept pages from this Origin only (repeatable; default: any origin)")
    add("--max-buffer", type=int, default=MAX_BUFFER_BYTES,
        help="bytes waiting for a client at most: a write that would pass it closes "
             "the client as too slow (1008) instead")
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
    add("--store", metavar="PATH",
        help="keep rooms (epoch, numbering, the last --history messages) and what each "
             "session sent in a SQLite file at PATH, created if missing, so that they "
             "survive a restart; default: rooms live in memory only")
    add("--store-rooms", type=int, default=STORE_ROOMS, metavar="N",
        help="rooms --store keeps on disk: the N most recently active; older ones are "
             "deleted")
    add("--workers", type=int, default=1,
        help="worker processes, one per core: the parent hands each connection to the "
             "worker that owns its room (no Redis needed; not with --certfile or --store)")
    args = parser.parse_args(argv)
    check_scale_out_args(parser, args)
    if not 0 <= args.batch_window <= 1000:
        parser.error("--batch-window takes 0 to 1000 milliseconds")
    if args.keyfile and not args.certfile:
        parser.error("--keyfile needs --certfile")
    if args.require_auth and not args.auth_secret:
        parser.error("--require-auth needs --auth-secret")
    for flag in ("history", "crowd", "max_chars", "max_size", "burst", "max_rooms", "max_clients",
                 "max_per_ip", "max_buffer", "store_rooms", "history_bytes", "rooms_per_ip"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("rate", "flood_close", "handshake_timeout", "ping_interval", "ping_timeout",
                 "new_rooms_per_min"):
        if not getattr(args, flag) > 0:  # "not >": NaN is refused too
            parser.error(f"--{flag.replace('_', '-')} must be more than 0")
    for flag in ("room_ttl", "shutdown_timeout"):
        if not getattr(args, flag) >= 0:
            parser.error(f"--{flag.replace('_', '-')} cannot be negative")
    if not 0 <= args.port <= 65535:
        parser.error("--port takes 0 to 65535")
    options = vars(args)
    options["allow_origin"] = tuple(options["allow_origin"])
    return Config(**options)


def check_scale_out_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.store and args.broker:
        parser.error("--store and --broker cannot go together: with --broker, Redis keeps "
                     "the rooms")
    if args.workers > 1 and args.store:
        parser.error("--store cannot go with --workers: each worker keeps its own rooms, "
                     "and one store file serves one process")
    if args.workers > 1 and args.certfile:
        parser.error("--workers cannot go with --certfile: each connection is handed to its "
                     "room's worker by its request line; terminate TLS in a proxy in front")
    if args.broker and urllib.parse.urlsplit(args.broker).scheme not in (
            "redis", "rediss", "unix"):
        parser.error("--broker must be a redis://HOST:PORT/DB URL "
                     "(or rediss:// for TLS, unix:// for a socket)")


def raise_open_files_limit() -> None:
    """Each client is a file descriptor; ask for as many as we may have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def listen(config: Config, handoff=None) -> tuple[ChatServer, asyncio.Server]:
    """Start serving `config` and return the chat and the listening server
    (for a worker of --workers, what takes the connections its parent hands
    over on the socket `handoff`)."""
    chat_server = ChatServer(config)
    await chat_server.rooms.start()
    if handoff is not None:
        from chatserver_workers import Handoff
        server = Handoff(handoff, lambda head: Client(chat_server, head))
        chat_server.tasks = [asyncio.create_task(chat_server.sweep_rooms()),
                             asyncio.create_task(chat_server.keep_alive())]
        return chat_server, server
    ssl_context = None
    if config.certfile:
        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_context.load_cert_chain(config.certfile, config.keyfile)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(chat_server), config.host, config.port,
                                      ssl=ssl_context, backlog=1024,
                                      ssl_handshake_timeout=config.handshake_timeout
                                      if ssl_context else None)
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
    await chat_server.rooms.close()


async def run(config: Config, ready: Callable[[str], None] = print, handoff=None) -> None:
    chat_server, server = await listen(config, handoff)
    port = server.sockets[0].getsockname()[1] if server.sockets else config.port
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


def safe_url(url: str | None) -> str:
    """`url` without its password, for messages and logs."""
    parts = urllib.parse.urlsplit(url or "")
    if parts.password is None:
        return url or ""
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{netloc}"))


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


def open_auth(config: Config) -> tuple[Callable, bytes] | None:
    """How sign-in tokens are checked (--auth-secret), imported only then;
    Unavailable with a one-line reason if they cannot be."""
    if not config.auth_secret:
        return None
    try:
        import chatserver_auth  # needs PyJWT
    except ImportError as exc:
        raise Unavailable(f"--auth-secret needs PyJWT (pip install chatserver[auth]): "
                          f"{exc}") from None
    try:
        return chatserver_auth.verify, chatserver_auth.load_secret(config.auth_secret)
    except ValueError as exc:
        raise Unavailable(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["token"]:  # chatserver token ...: print a sign-in token
        from chatserver_auth import token_main
        return token_main(argv[1:])
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # websockets logs every open connection at INFO: that much only at DEBUG.
    protocol_log.setLevel(logging.DEBUG if config.log_level == "DEBUG" else logging.WARNING)
    raise_open_files_limit()
    if config.workers > 1:
        from chatserver_workers import run_workers
        sys.exit(run_workers(config))
    try:
        run_loop(config, run(config, ready=lambda line: print(line, flush=True)))
    except Unavailable as exc:
        sys.exit(f"chatserver: {exc}")
    except OSError as exc:
        sys.exit(f"chatserver: cannot listen on port {config.port}: {exc}")


if __name__ == "__main__":
    # Be the module `chatserver` too, so that a back-end imported beside us
    # (chatserver_redis) shares our classes rather than loading a second copy.
    sys.modules["chatserver"] = sys.modules[__name__]
    main()
