"""chatserver_redis: rooms shared through Redis, for chatserver --broker.

With --broker redis://HOST:PORT/DB, processes that share a Redis server act
as one chat server.  This module is imported only then, and needs the redis
and hiredis packages (pip install chatserver[redis]).  It implements chatserver's `Rooms`
seam: the chat rules, acks and the fan-out stay in chatserver.py.

Redis holds what every process must agree on, per room:

  chat:ROOM:seq      the last seq given out (INCR)
  chat:ROOM:epoch    the room's epoch
  chat:ROOM:history  the last --history chat frames, as sent (a list)
  chat:ROOM:names    who is in the room: folded name -> {"name","proc","key","session","n"}
  chat:ROOM:order    a counter that orders `names` as a process would
  channel chat:DB:ROOM   every frame for the room, to every process in it

per session (what a reconnect key names): chat:key:KEY (the session of a
welcome's key), chat:session:ID:cids (cid -> seq of its acked lines, "-" for
a command) and chat:session:ID:order (when each was acked, oldest first);
and per process: chat:proc:ID (a heartbeat key with a short TTL),
chat:proc:ID:rooms (where it has members) and the set chat:procs.  Channel
names carry the DB number because Redis channels are server-wide.

Each change is one Lua script, atomic in Redis: posting a line checks its
cid, numbers it, keeps it and publishes it, so the order of the channel is
the order of seq.  A process subscribes to a room's channel while it has
members there, and fans out what the channel brings through chatserver's
`Fanout`.  A newcomer comes in where its own join notice passes on the
channel (`Admission`), so the room never waits for a join.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import secrets
import weakref

from chatserver import (CID_MEMORY_LINES, CID_MEMORY_S, CLOSE_TRY_AGAIN, NAME_MAX_CHARS,
                        Acked, Ban, Chat, Config, Fanout, Kick, Member, Outgoing, Refused, Room,
                        Rooms,
                        Ticket, Unavailable, Unconfirmed, chat, cid_memory_lines, deleted, encode,
                        fold, gap, joined, kicked, left, newcomer_frames, renamed, safe_url,
                        session_keep_s, topic_set)

log = logging.getLogger("chatserver")

# Redis being slow is not Redis being gone.  Only the heartbeat, on a
# connection of its own, decides that Redis is gone: two beats in a row
# fail or go unanswered.  Other commands wait as long as their connection
# lives; one that gets no answer (gone, or given up on) was maybe carried
# out, and its client is closed so that it resends with its cid.
REDIS_TIMEOUT_S = 2.0  # to connect, and to wait for a subscription or a sync
REDIS_GIVE_UP_S = 15.0  # a command unanswered this long is given up on
REDIS_CONNECTIONS = 32  # per process, for commands
HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_TIMEOUT_S = 2.0  # a beat unanswered this long failed
HEARTBEAT_MISSES = 2  # beats failed in a row: Redis is gone
HEARTBEAT_TTL_S = 6.0  # a process silent this long is dead: its names go
# After Redis lost its data, every live process puts its rooms back within a
# heartbeat; for this long no seq is given out and no unknown room created.
RECOVERY_S = 2 * HEARTBEAT_INTERVAL_S
RECOVERY_STEP_S = 0.2  # how often a line or a sync waiting for it tries again
RECOVERY_TRIES = int(RECOVERY_S / RECOVERY_STEP_S) + 5
RECONNECT_MIN_S = 0.1  # backoff between attempts to reach Redis again...
RECONNECT_MAX_S = 3.0  # ...doubling up to this
ADMISSION_TIMEOUT_S = 10.0  # a newcomer's join notice must come back on the channel by then
NAME_CANDIDATES = 20  # names tried per round trip when a nickname is taken
BROKER_DOWN = "chat is unavailable: the message broker is down; your message was not sent"
RECOVERING = ("chat is unavailable: the message broker is recovering lost data; "
              "your message was not sent")
UNCONFIRMED = "the message broker did not answer; reconnect: unacked lines may not have been sent"


@dataclasses.dataclass(eq=False)
class Admission:
    """A newcomer of this process on its way in.  Its join notice on the
    room's channel is where it comes in: what the channel brought before is
    in its history, what comes after is kept here until it is a member."""

    passed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    online: list[str] = dataclasses.field(default_factory=list)  # as of its join notice
    verified: list[str] = dataclasses.field(default_factory=list)  # of those
    key: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(16))  # its own
    lost: bool = False  # the channel went before its join notice came: it may never come
    frames: list[bytes] = dataclasses.field(default_factory=list)  # queued since


@dataclasses.dataclass(eq=False)
class SharedRoom(Room):
    """A room whose numbering, history and names live in Redis.

    Locally it holds this process's members and the frames the room's channel
    brought: `seq` is the last seq received, and frames at or below it are
    duplicates.  `names` follows the whole room's names as the channel tells
    them.  Until the room is synced with Redis (after each subscription),
    what the channel brings waits in `early`.
    """

    synced: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    ever_synced: bool = False
    early: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    names: dict[str, str] = dataclasses.field(default_factory=dict)  # folded -> name, in order
    vouched: set[str] = dataclasses.field(default_factory=set)  # the verified ones, folded
    admissions: dict[bytes, Admission] = dataclasses.field(default_factory=dict)  # by join id
    advanced: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # seq grew

    def published(self, head: bytes, frame: bytes) -> None:
        """Queue a frame from the room's channel for the fan-out.

        `head` is the frame's seq for a chat message, b"-" for a notice, b"j"
        for a join notice (then `frame` starts with the join's id).
        """
        if not self.synced.is_set():
            self.early.append((head, frame))
            return
        if head.isdigit():
            seq = int(head)
            if seq <= self.seq:
                return  # known from the sync point: in Redis's history
            self.seq = seq
            self.pending_seq.append(seq)
            self.advanced.set()
            self.queue(frame)
            return
        admission = None
        if head == b"j":
            join_id, _, frame = frame.partition(b" ")
            admission = self.admissions.get(join_id)
        notice = self.follow_names(frame)
        if admission is not None:
            admission.online = list(self.names.values())
            admission.verified = [name for folded, name in self.names.items()
                                  if folded in self.vouched]
            admission.passed.set()
        if b'"event":"topic"' in frame:
            self.topic = json.loads(frame).get("topic", self.topic)
        if notice is not None and notice["event"] in ("join", "leave") and self.gather_presence(
                notice["name"], notice["event"] == "join", len(self.names)):
            return
        if notice is not None and notice["event"] == "nick":
            self.take_presence()  # the joins and leaves kept so far go first
        self.queue(frame)

    def follow_names(self, frame: bytes) -> dict | None:
        """Keep `names` as a join, leave or nick notice tells; return the
        notice, or None for any other frame."""
        if b'"event":"join"' not in frame and b'"event":"leave"' not in frame \
                and b'"event":"nick"' not in frame and b'"event":"kick"' not in frame:
            return None  # not worth parsing (in a string, a quote is escaped)
        notice = json.loads(frame)
        event = notice.get("event")
        if event == "join":
            self.names[fold(notice["name"])] = notice["name"]
            if notice.get("verified"):
                self.vouched.add(fold(notice["name"]))
        elif event in ("leave", "kick"):  # a kick is a leave, told otherwise
            self.names.pop(fold(notice["name"]), None)
            self.vouched.discard(fold(notice["name"]))
        elif event == "nick":  # only guests change names
            self.names.pop(fold(notice["old"]), None)
            self.names[fold(notice["name"])] = notice["name"]
        else:
            return None
        return notice

    def queue(self, frame: bytes) -> None:
        """Queue `frame` for the members, and for newcomers already past
        their join notice."""
        self.pending.append(frame)
        for admission in self.admissions.values():
            if admission.passed.is_set():
                admission.frames.append(frame)

    def announce(self, frame: dict) -> None:
        self.queue(encode(frame))

    def lose_admissions(self) -> None:
        """The channel went: newcomers still waiting for their join notice
        may wait for ever (it went with it); they fail now, and try again."""
        for admission in self.admissions.values():
            if not admission.passed.is_set():
                admission.lost = True
                admission.passed.set()

    def count(self) -> int:
        return len(self.names)

    def resync(self, epoch: str, last_seq: int, frames: list[bytes], entries: list[dict],
               topic: str) -> int:
        """Take up Redis's state after a (re)subscription; return how many
        messages were missed for good.

        The first time, the room starts at Redis's last seq.  After a
        reconnection (Redis went, or dropped a subscriber that lagged), the
        joins and leaves missed meanwhile are announced, and messages of the
        same epoch missed are queued from the history, after a `gap` notice
        for those no longer kept; another epoch is taken as it is.
        Notices that came before the sync point are applied to `names` again,
        which changes nothing: the last notice about a name is already there.
        """
        self.follow_all_names(entries)
        self.topic = topic
        missed = 0
        if self.ever_synced and epoch == self.epoch:
            history = numbered(frames)
            first = history[0][0] if history else last_seq + 1
            missed = max(0, first - self.seq - 1)
            if missed:
                self.announce(gap(self.name, missed))
            for seq, data in history:
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
            if head.isdigit() or self.members or self.admissions:
                self.published(head, frame)
            else:
                self.follow_names(frame.partition(b" ")[2] if head == b"j" else frame)
        return missed

    def follow_all_names(self, entries: list[dict]) -> None:
        """Take the room's names from Redis (its `names` entries, in order);
        after a reconnection, announce the joins and leaves the channel did
        not bring meanwhile."""
        before, self.names = self.names, {fold(entry["name"]): entry["name"] for entry in entries}
        self.vouched = {fold(entry["name"]) for entry in entries if entry.get("verified")}
        if not self.ever_synced:
            return
        changes = [(name, False) for folded, name in before.items() if folded not in self.names]
        changes += [(name, True) for folded, name in self.names.items() if folded not in before]
        for name, here in changes:
            if not self.gather_presence(name, here, self.count()):
                self.announce((joined if here else left)(self.name, name, self.count()))

    def adopt(self, epoch: str, last_seq: int) -> None:
        """Start over at `last_seq` of `epoch`."""
        self.epoch = epoch
        self.seq = self.delivered_seq = last_seq
        self.pending_seq = []
        if not self.members:
            self.pending = []


def numbered(frames: list[bytes]) -> list[tuple[int, bytes]]:
    """A history read from Redis, each frame with its seq: the last field of
    a chat frame, so that Redis can fill it in (see frame_prefix).  Seqs
    may skip: a moderator deletes messages."""
    return [(int(data[data.rindex(b":") + 1:-1]), data) for data in frames]


def history_window(frames: list[bytes], delivered: int,
                   since: int | None) -> tuple[int, list[bytes]]:
    """Room.history_since for a history read from Redis: only frames up to
    `delivered` are returned (later ones reach the newcomer by the fan-out)."""
    history = numbered(frames)
    start = 0 if since is None else since
    kept = [data for seq, data in history if start < seq <= delivered]
    oldest = history[0][0] if history else delivered + 1
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


def name_entries(values: list[bytes]) -> list[dict]:
    """The entries of a room's `names` hash, in the order they came."""
    return sorted((json.loads(value) for value in values), key=lambda entry: entry["n"])


# The Lua scripts.  Keys are passed in KEYS where the script knows them in
# advance; the sweep finds rooms as it goes (fine on a single Redis server).

LUA_COMMON = """
local function recovering()
  -- True while Redis is recovering from the loss of its data (a restart
  -- without persistence, a failover to an empty replica), which the loss
  -- of the generation key, set by every chatserver at start, gives away.
  -- Meanwhile processes that knew rooms bring them back, and no seq is
  -- given out: the highest seq any live process knows must win.
  if redis.call('EXISTS', 'chat:generation') == 0 then
    redis.call('SET', 'chat:generation', '1')
    redis.call('SET', 'chat:recovering', '1', 'PX', RECOVERY_MS)
    return true
  end
  return redis.call('EXISTS', 'chat:recovering') == 1
end

local function ensure_room(seq_key, epoch_key, history_key, epoch, floor, ttl, known)
  -- The room's epoch, created as `epoch` if Redis has none (a new room, or
  -- Redis lost its data): then its numbering resumes after `floor`, the
  -- last seq the caller knows, so that its clients see no step back.  A
  -- caller that knows more of the same epoch than Redis raises its seq.
  -- False if the caller does not `known` the room and Redis is recovering.
  local current = redis.call('GET', epoch_key)
  if current then
    if current == epoch and tonumber(redis.call('GET', seq_key) or '0') < floor then
      redis.call('SET', seq_key, floor, 'KEEPTTL')
    end
  elseif recovering() and not known then
    return false
  else
    current = epoch
    if ttl then  -- at least 1 ms: Redis refuses PX 0 (--room-ttl 0)
      redis.call('SET', epoch_key, epoch, 'PX', math.max(1, tonumber(ttl)))
    else
      redis.call('SET', epoch_key, epoch)
    end
    if tonumber(redis.call('GET', seq_key) or '0') < floor then
      if ttl then  -- the floor goes with the epoch, if nobody comes
        redis.call('SET', seq_key, floor, 'PX', math.max(1, tonumber(ttl)))
      else
        redis.call('SET', seq_key, floor)
      end
      redis.call('DEL', history_key)
    end
  end
  return current
end

local function remember_line(cids_key, order_key, cid, seq, lines, keep_ms, most)
  -- A session's acked line: cid -> seq ("-" for a command), kept with at
  -- least the last `lines` others and all those younger than `keep_ms`, up
  -- to `most` (as chatserver.Session.remember keeps them).
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('HSET', cids_key, cid, seq)
  redis.call('RPUSH', order_key, ms .. ' ' .. cid)
  local count = redis.call('LLEN', order_key)
  while count > lines do
    local oldest = redis.call('LINDEX', order_key, 0)
    local space = string.find(oldest, ' ', 1, true)
    if count <= most and ms - tonumber(string.sub(oldest, 1, space - 1)) < keep_ms then
      break
    end
    count = count - 1
    redis.call('LPOP', order_key)
    redis.call('HDEL', cids_key, string.sub(oldest, space + 1))
  end
end

local function keep_history(history_key, lines, bytes)
  -- The last `lines` frames, and no more than `bytes` of them (the newest
  -- is always kept), as chatserver.Room.remember keeps them.
  redis.call('LTRIM', history_key, -lines, -1)
  local frames = redis.call('LRANGE', history_key, 0, -1)
  local size, first = 0, #frames
  while first > 0 and (first == #frames or size + #frames[first] <= bytes) do
    size = size + #frames[first]
    first = first - 1
  end
  if first > 0 then redis.call('LTRIM', history_key, first, -1) end
end

local function keep_session(ttl, ...)
  for _, key in ipairs({...}) do redis.call('PEXPIRE', key, ttl) end
end

local function room_key(room, what)
  return 'chat:' .. room .. ':' .. what
end

-- A room's seq, epoch, history and order keys: they expire together
-- `ttl` ms after its last member left, and are kept while it has one.
local function forget_later(ttl, ...)
  for _, key in ipairs({...}) do redis.call('PEXPIRE', key, ttl) end
end

local function keep(...)
  for _, key in ipairs({...}) do redis.call('PERSIST', key) end
end

local function now_ms()
  local now = redis.call('TIME')
  return now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
end

local function leave_notice(room, entry, count)
  -- The `leave` frame of chatserver.left(), for names whose process died.
  return '- {"type":"sys","event":"leave","room":' .. cjson.encode(room) ..
    ',"message":' .. cjson.encode(entry.name .. ' has left') .. ',"ts":' .. now_ms() ..
    ',"name":' .. cjson.encode(entry.name) .. ',"count":' .. count ..
    (entry.verified and ',"verified":true}' or '}')
end

local function nick_notice(room, old, new)
  -- The `nick` frame of chatserver.renamed().
  return '- {"type":"sys","event":"nick","room":' .. cjson.encode(room) ..
    ',"message":' .. cjson.encode(old .. ' is now known as ' .. new) .. ',"ts":' .. now_ms() ..
    ',"old":' .. cjson.encode(old) .. ',"name":' .. cjson.encode(new) .. '}'
end

local function remove_names(room, channel, proc, except, joining)
  -- Remove the names `proc` holds in `room` (but those in `except`, and
  -- those of the keys in `joining`: newcomers on their way in), each with
  -- its leave notice; forget the room later if it is empty now.
  local names_key = room_key(room, 'names')
  local marker = '"proc":"' .. proc .. '"'
  local values = redis.call('HGETALL', names_key)
  for i = 1, #values, 2 do
    if not except[values[i]] and string.find(values[i + 1], marker, 1, true) and
        not joining[cjson.decode(values[i + 1]).key] then
      redis.call('HDEL', names_key, values[i])
      local count = redis.call('HLEN', names_key)
      if count > 0 then
        redis.call('PUBLISH', channel, leave_notice(room, cjson.decode(values[i + 1]), count))
      end
    end
  end
end
""".replace("RECOVERY_MS", str(int(RECOVERY_S * 1000)))

# KEYS: seq, epoch, history, the session's cids, its order, the member's
# key's session.  ARGV: channel,
# frame prefix, history limit, epoch, last seq known, cid ("" if none), cids
# kept, ms they are kept, ms the session is kept, history bytes, cids kept at
# most.  Returns {seq, epoch}: the
# seq the cid got before, if it was acked before (then nothing is posted).
LUA_POST = LUA_COMMON + """
if ARGV[6] ~= '' then
  local known = redis.call('HGET', KEYS[4], ARGV[6])
  if known then return {known, redis.call('GET', KEYS[2]) or ARGV[4]} end
end
if recovering() then return {'wait', ''} end
local epoch = ensure_room(KEYS[1], KEYS[2], KEYS[3], ARGV[4], tonumber(ARGV[5]), nil, true)
local seq = redis.call('INCR', KEYS[1])
local frame = ARGV[2] .. seq .. '}'
redis.call('RPUSH', KEYS[3], frame)
keep_history(KEYS[3], tonumber(ARGV[3]), tonumber(ARGV[10]))
redis.call('PUBLISH', ARGV[1], seq .. ' ' .. frame)
if ARGV[6] ~= '' then
  remember_line(KEYS[4], KEYS[5], ARGV[6], seq, tonumber(ARGV[7]), tonumber(ARGV[8]),
                tonumber(ARGV[11]))
  keep_session(ARGV[9], KEYS[4], KEYS[5], KEYS[6])
end
return {seq, epoch}
"""

# KEYS: the session's cids, its order, the member's key's session.
# ARGV: cid, seq ("-": a command), cids kept, ms they are kept, ms the
# session is kept, cids kept at most.
LUA_REMEMBER = LUA_COMMON + """
remember_line(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]),
              tonumber(ARGV[6]))
keep_session(ARGV[5], KEYS[1], KEYS[2], KEYS[3])
return 1
"""

# KEYS: seq, epoch, history, names, topic.  ARGV: epoch, last seq known,
# room ttl (ms), "1" if the process synced the room before.  Returns {epoch,
# last seq, history, names, topic}, or {"wait"} while Redis recovers a room
# it forgot.
LUA_SYNC = LUA_COMMON + """
local epoch = ensure_room(KEYS[1], KEYS[2], KEYS[3], ARGV[1], tonumber(ARGV[2]), ARGV[3],
                          ARGV[4] == '1')
if not epoch then return {'wait'} end
return {epoch, tonumber(redis.call('GET', KEYS[1]) or '0'), redis.call('LRANGE', KEYS[3], 0, -1),
        redis.call('HVALS', KEYS[4]), redis.call('GET', KEYS[5]) or ''}
"""

# KEYS: seq, epoch, history, names, order, this process's rooms, the
# session of the welcome's key, the session of the newcomer's key, topic.
# ARGV: channel, room, epoch, last seq known, the key of a welcome (or ""),
# a new session id, ms a session is kept, the join's id, then for each
# candidate name: folded name, member value prefix (up to its session), join
# notice prefix.  The newcomer goes on with the session of the welcome's key
# if it is known, else starts the new one.  The first candidate may be held
# by the member with that key: it is taken over (`r PROC KEY NAME` tells its
# process to close it).  The join notice goes out as `j ID NOTICE`: the
# newcomer's process lets it in there.  Returns {0} if every candidate is
# taken, else {index of the name taken, epoch, last seq, history, 1 if taken
# over else 0, session}.
LUA_JOIN = LUA_COMMON + """
local epoch = ensure_room(KEYS[1], KEYS[2], KEYS[3], ARGV[3], tonumber(ARGV[4]), nil, true)
local key = ARGV[5]
local session = redis.call('GET', KEYS[7]) or ARGV[6]  -- the welcome's, every round
for i = 9, #ARGV, 3 do
  local held = redis.call('HGET', KEYS[4], ARGV[i])
  local old = nil
  if held and i == 9 and key ~= '' and
      string.find(held, '"key":"' .. key .. '"', 1, true) then
    old = cjson.decode(held)
  end
  if not held or old then
    redis.call('SET', KEYS[8], session, 'PX', ARGV[7])
    redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1] .. cjson.encode(session) ..
               ',"n":' .. redis.call('INCR', KEYS[5]) .. '}')
    keep(KEYS[1], KEYS[2], KEYS[3], KEYS[5], KEYS[9])
    redis.call('SADD', KEYS[6], ARGV[2])
    local count = redis.call('HLEN', KEYS[4])
    if old then
      redis.call('PUBLISH', ARGV[1], 'r ' .. old.proc .. ' ' .. key .. ' ' .. ARGV[i])
      redis.call('PUBLISH', ARGV[1], leave_notice(ARGV[2], old, count - 1))
    end
    redis.call('PUBLISH', ARGV[1], 'j ' .. ARGV[8] .. ' ' .. ARGV[i + 2] .. count .. '}')
    return {(i - 6) / 3, epoch, tonumber(redis.call('GET', KEYS[1]) or '0'),
            redis.call('LRANGE', KEYS[3], 0, -1), old and 1 or 0, session}
  end
end
return {0}
"""

# KEYS: names, this process's rooms, the member's session's cids, its order,
# its key's session, the room's seq, epoch, history, order and topic.  ARGV: channel, room, folded name, process, leave notice
# prefix, room ttl (ms), "1" if the process has no one left in the room, the
# member's key (the name may have been taken over), ms a session is kept.
LUA_LEAVE = LUA_COMMON + """
keep_session(ARGV[9], KEYS[3], KEYS[4], KEYS[5])
local value = redis.call('HGET', KEYS[1], ARGV[3])
if value and string.find(value, '"proc":"' .. ARGV[4] .. '"', 1, true) and
    string.find(value, '"key":"' .. ARGV[8] .. '"', 1, true) then
  redis.call('HDEL', KEYS[1], ARGV[3])
  local count = redis.call('HLEN', KEYS[1])
  if count > 0 then
    redis.call('PUBLISH', ARGV[1], '- ' .. ARGV[5] .. count .. '}')
  else
    forget_later(ARGV[6], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10])
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
# A name put back is announced with a join notice: the room saw it leave
# (the process was swept), or, after Redis lost its data, may have (a
# process that synced meanwhile announced what it found gone).
# KEYS: seq, epoch, history, names, order, this process's rooms, topic.
# ARGV: channel, room, process, room ttl (ms), epoch ("" if none), last seq
# known, the keys of newcomers on their way in (space-separated: their names
# stay), then for each member: folded name, member value prefix, join notice
# prefix.  Returns the folded names someone else took meanwhile.
LUA_RECONCILE = LUA_COMMON + """
local mine, joining = {}, {}
for key in string.gmatch(ARGV[7], '%S+') do joining[key] = true end
for i = 8, #ARGV, 3 do mine[ARGV[i]] = {ARGV[i + 1], ARGV[i + 2]} end
remove_names(ARGV[2], ARGV[1], ARGV[3], mine, joining)
local taken = {}
for folded, parts in pairs(mine) do
  local value = redis.call('HGET', KEYS[4], folded)
  if not value then
    redis.call('HSET', KEYS[4], folded, parts[1] .. redis.call('INCR', KEYS[5]) .. '}')
    redis.call('PUBLISH', ARGV[1], '- ' .. parts[2] .. redis.call('HLEN', KEYS[4]) .. '}')
  elseif not string.find(value, '"proc":"' .. ARGV[3] .. '"', 1, true) then
    table.insert(taken, folded)
  end
end
if redis.call('HLEN', KEYS[4]) > 0 then
  if ARGV[5] ~= '' then
    ensure_room(KEYS[1], KEYS[2], KEYS[3], ARGV[5], tonumber(ARGV[6]), nil, true)
  end
  keep(KEYS[1], KEYS[2], KEYS[3], KEYS[5], KEYS[7])
else
  forget_later(ARGV[4], KEYS[1], KEYS[2], KEYS[3], KEYS[5], KEYS[7])
end
if next(mine) then
  redis.call('SADD', KEYS[6], ARGV[2])
else
  redis.call('SREM', KEYS[6], ARGV[2])
end
return taken
"""

# Remove the names of dead processes (no heartbeat key), each with its leave
# notice, and forget them.  KEYS: the set of processes.  ARGV: DB number
# (for channel names), room ttl (ms), a process to remove now even if alive
# ("" if none: on a clean shutdown), the sweeping process (never swept by
# itself).  Returns how many names went.
LUA_SWEEP = LUA_COMMON + """
local swept = 0
for _, proc in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if proc == ARGV[3] or
      (proc ~= ARGV[4] and redis.call('EXISTS', 'chat:proc:' .. proc) == 0) then
    local rooms_key = 'chat:proc:' .. proc .. ':rooms'
    for _, room in ipairs(redis.call('SMEMBERS', rooms_key)) do
      local before = redis.call('HLEN', room_key(room, 'names'))
      remove_names(room, 'chat:' .. ARGV[1] .. ':' .. room, proc, {}, {})
      local after = redis.call('HLEN', room_key(room, 'names'))
      swept = swept + before - after
      if after == 0 and before > 0 then
        forget_later(ARGV[2], room_key(room, 'seq'), room_key(room, 'epoch'),
                     room_key(room, 'history'), room_key(room, 'order'),
                     room_key(room, 'topic'))
      end
    end
    redis.call('DEL', rooms_key, 'chat:proc:' .. proc)
    redis.call('SREM', KEYS[1], proc)
  end
end
return swept
"""


# Make way for a verified newcomer: if a guest holds its name, the guest is
# renamed to the first free candidate (a nick notice; `n PROC KEY NAME`
# tells its process), and if a verified member holds it, the newcomer takes
# it over.  KEYS: names, order.  ARGV: channel, room, folded name, then the
# candidates for the guest: folded, name.  Returns {"v", key of the verified
# holder to take over}, {"n", the renamed guest's process, key, new name},
# or {""}.
LUA_MAKE_WAY = LUA_COMMON + """
local held = redis.call('HGET', KEYS[1], ARGV[3])
if not held then return {''} end
local entry = cjson.decode(held)
if entry.verified then return {'v', entry.key} end
for i = 4, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    local old = entry.name
    entry.name = ARGV[i + 1]
    entry.n = redis.call('INCR', KEYS[2])
    redis.call('HDEL', KEYS[1], ARGV[3])
    redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(entry))
    redis.call('PUBLISH', ARGV[1], 'n ' .. entry.proc .. ' ' .. entry.key .. ' ' .. ARGV[i + 1])
    redis.call('PUBLISH', ARGV[1], nick_notice(ARGV[2], old, ARGV[i + 1]))
    return {'n', entry.proc, entry.key, ARGV[i + 1]}
  end
end
return {''}
"""

# A moderator removes a member: its name goes (no leave notice), its process
# closes it (`k PROC KEY {"by", "reason"}`), the room gets the kick notice;
# with a ban, the ban goes out first, so that no process lets it back in
# after its notice.  KEYS: names, then the room's seq, epoch, history, order
# and topic, and the bans.  ARGV: channel, folded name, kick notice, what
# its process is told, room ttl (ms), the ban without its subject and name
# ("" for none), the bans channel, the room.  Returns the member's entry, or
# "" if no one has that name.
LUA_KICK = LUA_COMMON + """
local held = redis.call('HGET', KEYS[1], ARGV[2])
if not held then return '' end
local entry = cjson.decode(held)
redis.call('HDEL', KEYS[1], ARGV[2])
if ARGV[6] ~= '' then  -- as chatserver.Chat.bans_for: the verified name, and the address
  local subjects = {'address:' .. entry.address}
  if entry.verified then table.insert(subjects, 1, 'name:' .. ARGV[2]) end
  for _, subject in ipairs(subjects) do
    local ban = cjson.decode(ARGV[6])
    ban.subject = subject
    ban.name = entry.name
    local field = ARGV[8] .. '\t' .. subject
    redis.call('HSET', KEYS[7], field, cjson.encode(ban))
    redis.call('PUBLISH', ARGV[7], '+ ' .. field .. '\t' .. cjson.encode(ban))
  end
end
redis.call('PUBLISH', ARGV[1], 'k ' .. entry.proc .. ' ' .. entry.key .. ' ' .. ARGV[4])
redis.call('PUBLISH', ARGV[1], '- ' .. ARGV[3])
if redis.call('HLEN', KEYS[1]) == 0 then
  forget_later(ARGV[5], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
end
return held
"""

# Every room's bans are in one hash (room TAB subject -> ban) and on one
# channel (`+ ROOM TAB SUBJECT TAB BAN`, `- ROOM TAB SUBJECT`) that every
# process follows into Chat.bans; a ban is made by LUA_KICK.  Lift one:
# KEYS: the bans.  ARGV: the bans channel, its field.
LUA_UNBAN = """
if redis.call('HDEL', KEYS[1], ARGV[2]) == 0 then return 0 end
redis.call('PUBLISH', ARGV[1], '- ' .. ARGV[2])
return 1
"""

# KEYS: topic.  ARGV: channel, topic, topic notice.
LUA_TOPIC = """
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2]) end
redis.call('PUBLISH', ARGV[1], '- ' .. ARGV[3])
return 1
"""

# Take message SEQ out of the history.  KEYS: history.  ARGV: channel, the
# end of its frame ('"seq":N}'), delete notice.  Returns 1, or 0 if the
# history does not have it.
LUA_DELETE = """
for _, frame in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if string.sub(frame, -#ARGV[2]) == ARGV[2] then
    redis.call('LREM', KEYS[1], 1, frame)
    redis.call('PUBLISH', ARGV[1], '- ' .. ARGV[3])
    return 1
  end
end
return 0
"""


# The hot path's wire: chat lines and the channels, RESP written here and
# read by hiredis, on two connections of their own.  redis-py costs tens of
# microseconds per command (its pool, its parser, a task switch per reply);
# a line is one command and one channel message, so that was most of what
# --broker added to a line.


def command_bytes(*args: bytes | str | int) -> bytes:
    """A command in RESP, as Redis reads it: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if not isinstance(arg, bytes):
            arg = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class ReplyError(Exception):
    """An error reply from Redis (`-ERR ...`, `-NOSCRIPT ...`), as a value."""


def replies():
    """A reply parser for the pipe and the channels: hiredis's C parser (the
    `redis` extra installs it), which gives errors as ReplyError values."""
    import hiredis
    return hiredis.Reader(replyError=ReplyError)


async def raw_connection(client):
    """A new connection to `client`'s Redis, out of its pool: connected,
    authenticated and on its DB by redis-py (any URL it takes: TLS, a Unix
    socket, a password), then read and written here directly.  In RESP2:
    a RESP3 connection may get push messages (redis-py 8 asks for
    maintenance notices), which the pipe would take for answers."""
    pool = client.connection_pool
    connection = pool.connection_class(**{**pool.connection_kwargs, "protocol": 2})
    await connection.connect()
    return connection


class Pipe:
    """One connection on which commands are pipelined: every command of an
    event loop turn goes out in one write at its end, and one task reads the
    answers, as many as each read brings, in order.  A line costs no
    round trip of its own, no pooled connection and no task switch.

    An answer waits as long as the connection lives, at most
    REDIS_GIVE_UP_S: then the connection is dropped, and every command
    waiting on it fails with ConnectionError (it may have run)."""

    def __init__(self, connection) -> None:
        self.connection = connection
        self.reader, self.writer = connection._reader, connection._writer
        self.loop = asyncio.get_running_loop()
        self.out: list[bytes] = []
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.sent_at: collections.deque[float] = collections.deque()
        self.broken: BaseException | None = None
        self.replies = replies()
        self.watch: asyncio.TimerHandle | None = None
        self.task = asyncio.ensure_future(self.read())

    def send(self, command: bytes) -> asyncio.Future:
        """Queue one command (command_bytes); its answer comes in the future
        (a ReplyError value for an error reply)."""
        if self.broken is not None:
            raise ConnectionError(f"the connection to Redis was lost: {self.broken}")
        if not self.out:
            self.loop.call_soon(self.flush)
        self.out.append(command)
        future = self.loop.create_future()
        self.waiting.append(future)
        self.sent_at.append(self.loop.time())
        if self.watch is None:
            self.watch = self.loop.call_later(REDIS_GIVE_UP_S / 4, self.check)
        return future

    def flush(self) -> None:
        out, self.out = self.out, []
        if out and self.broken is None:
            self.writer.write(b"".join(out))

    def check(self) -> None:
        """Give up on a connection whose oldest command waits too long."""
        self.watch = None
        if self.sent_at and self.loop.time() - self.sent_at[0] > REDIS_GIVE_UP_S:
            self.fail(TimeoutError(f"no answer in {REDIS_GIVE_UP_S:.0f} s"))
        elif self.sent_at:
            self.watch = self.loop.call_later(REDIS_GIVE_UP_S / 4, self.check)

    async def read(self) -> None:
        waiting, sent_at, parser = self.waiting, self.sent_at, self.replies
        try:
            while data := await self.reader.read(65536):
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    sent_at.popleft()
                    future = waiting.popleft()
                    if not future.done():
                        future.set_result(reply)
            self.fail(ConnectionError("Redis closed the connection"))
        except Exception as exc:  # a lost connection, or a stream we cannot read any more
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """The connection is lost: every command waiting fails."""
        if self.broken is None:
            self.broken = exc
            if self.watch is not None:
                self.watch.cancel()
            self.writer.transport.abort()
            self.task.cancel()
        while self.waiting:
            self.sent_at.popleft()
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError(f"no answer from Redis: {exc}"))

    def close(self) -> None:
        self.fail(ConnectionError("closed"))


class RedisRooms(Rooms):
    """Rooms shared through a Redis server with other chatserver processes.

    What goes to a room goes through Redis and comes back on the room's
    channel, to every process with members there.  A message is acked once
    it is in Redis.  Three connections of its own: a pool for commands, the
    subscriber (no read timeout: a quiet room is not a lost Redis) and the
    heartbeat, which alone decides that Redis is gone.  Then clients stay
    connected and their lines get an error; the broker reconnects with
    backoff and, once back, resubscribes, catches up with the rooms' seq and
    re-registers its members' names.
    """

    def __init__(self, chat: Chat, fanout: Fanout, config: Config) -> None:
        super().__init__(chat, fanout)
        self.url = config.broker
        self.history_limit = config.history
        self.history_bytes = config.history_bytes
        self.room_ttl_ms = max(0, int(config.room_ttl * 1000))
        self.session_ttl_ms = int(session_keep_s(config) * 1000)
        self.cids_kept = cid_memory_lines(config)
        self.proc = secrets.token_hex(8)
        self.proc_key = f"chat:proc:{self.proc}"
        self.proc_rooms_key = f"chat:proc:{self.proc}:rooms"
        self.db = 0
        self.channels: dict[bytes, SharedRoom] = {}
        self.control = b""  # a channel of our own: confirms each (re)connection
        self.client = None  # redis.asyncio.Redis: commands
        self.listener = None  # the subscriber's
        self.pulse = None  # the heartbeat's
        self.subscriber = None  # the connection the channels come on
        self.pipe: Pipe | None = None  # posts
        self.pipe_opening: asyncio.Future | None = None
        self.errors: tuple[type[BaseException], ...] = (OSError,)
        self.up = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.follower: asyncio.Task | None = None
        self.beater: asyncio.Task | None = None
        self.sweeper: asyncio.Task | None = None
        self.beat_now = asyncio.Event()  # a command failed: is Redis gone?
        # A join storm must not take every pooled connection: posts and
        # leaves need some too.
        self.join_slots = asyncio.Semaphore(REDIS_CONNECTIONS // 4)
        self.posted: weakref.WeakKeyDictionary[Member, int] = weakref.WeakKeyDictionary()

    # Starting and stopping

    async def start(self) -> None:
        """Connect to Redis; raise Unavailable if it cannot be reached."""
        try:
            import hiredis  # noqa: F401  (the pipe's and the channels' parser)
            import redis
            import redis.exceptions
        except ImportError as exc:
            raise Unavailable(f"--broker needs the redis and hiredis packages "
                              f"(pip install chatserver[redis]): {exc}") from None
        self.errors = (redis.exceptions.RedisError, OSError)
        self.no_answer = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                          OSError, asyncio.TimeoutError)
        self.client = await connect_redis(self.url)
        self.listener = await connect_redis(self.url, connections=1, read_timeout=None)
        self.pulse = await connect_redis(self.url, connections=1,
                                         read_timeout=HEARTBEAT_TIMEOUT_S)
        self.db = int(self.client.connection_pool.connection_kwargs.get("db", 0))
        self.control = f"chat:{self.db}:proc:{self.proc}".encode()
        self.bans_channel = f"chat:{self.db}:~bans".encode()  # "~": no room has it
        script = self.client.register_script
        self.post_script, self.sync_script = script(LUA_POST), script(LUA_SYNC)
        self.join_script, self.leave_script = script(LUA_JOIN), script(LUA_LEAVE)
        self.rename_script, self.reconcile_script = script(LUA_RENAME), script(LUA_RECONCILE)
        self.sweep_script, self.remember_script = script(LUA_SWEEP), script(LUA_REMEMBER)
        self.make_way_script, self.kick_script = script(LUA_MAKE_WAY), script(LUA_KICK)
        self.unban_script, self.topic_script = script(LUA_UNBAN), script(LUA_TOPIC)
        self.delete_script = script(LUA_DELETE)
        try:  # Redis's generation: its loss tells of Redis losing its data
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                await self.client.set("chat:generation", "1", nx=True)
                await self.connect_pipe()
        except (*self.errors, asyncio.TimeoutError) as exc:
            await self.close()
            raise Unavailable(f"the message broker at {safe_url(self.url)} "
                              f"does not answer: {exc}") from None
        self.follower = asyncio.create_task(self.follow())
        self.beater = asyncio.create_task(self.beat())
        self.sweeper = asyncio.create_task(self.sweep_dead())
        try:
            await asyncio.wait_for(self.up.wait(), REDIS_TIMEOUT_S * 2)
        except asyncio.TimeoutError:
            await self.close()
            raise Unavailable(f"the message broker at {safe_url(self.url)} "
                              "does not answer") from None
        log.info("broker %s: process %s (redis-py %s)", safe_url(self.url), self.proc,
                 redis.__version__)

    async def close(self) -> None:
        """Say goodbye for our members (leave notices), then disconnect."""
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=REDIS_TIMEOUT_S)
        if self.up.is_set():
            try:  # whoever is left: their names go, with leave notices
                async with asyncio.timeout(REDIS_TIMEOUT_S):
                    await self.sweep_script(keys=["chat:procs"],
                                            args=[self.db, self.room_ttl_ms, self.proc, ""])
            except (*self.errors, asyncio.TimeoutError) as exc:
                log.warning("broker: could not remove our names: %s", exc)
        tasks = [task for task in (self.follower, self.beater, self.sweeper) if task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.set_up(False)
        if self.pipe is not None:
            self.pipe.close()
        for client in (self.client, self.listener, self.pulse):
            if client is not None:
                await client.aclose()

    async def sweep(self) -> None:
        """Bans that are over leave Redis (every process tries; one wins)."""
        now = self.chat.wall_clock()
        for field, ban in (await self.call(self.client.hgetall, "chat:bans")).items():
            if Ban(**json.loads(ban)).over(now):
                await self.call(self.unban_script, ["chat:bans"], [self.bans_channel, field])

    def health(self) -> str | None:
        return None if self.up.is_set() else "the message broker is down"

    def check_room(self, room_name: str, address: str) -> None:
        if not self.up.is_set():
            raise Refused(503, "chat is unavailable: the message broker is down; "
                               "try again soon")
        super().check_room(room_name, address)

    # What clients do

    async def join(self, ticket: Ticket) -> tuple[Member, Outgoing]:
        async with self.join_slots:
            return await self.join_now(ticket)

    async def join_now(self, ticket: Ticket) -> tuple[Member, Outgoing]:
        """Let a newcomer in: its name claimed in Redis, which announces it
        on the room's channel.  Where that join notice passes here, the
        newcomer comes in: its welcome names the room as of then, its history
        (from Redis) ends there, and the fan-out brings it everything after.
        The room's other members never wait for it."""
        if not self.up.is_set():
            raise Unavailable(BROKER_DOWN)
        identity = ticket.identity
        wanted, notes = self.chat.newcomer_name(ticket.room, ticket.name)
        if identity is not None:
            wanted, notes = identity.name, []
        room = self.chat.open_room(ticket.room, ticket.address, SharedRoom, ticket.reservation)
        join_id = secrets.token_hex(8).encode()
        admission = room.admissions[join_id] = Admission()
        try:
            await self.enter(room)
            key = admission.key  # a new one: the old one names the old member
            taking_over = ticket.key
            if identity is not None:
                taking_over = await self.make_way(room, identity.name) or taking_over
            try:
                name, claim = await self.claim(room, wanted, key, taking_over, join_id,
                                               ticket.address, identity is not None)
            except Unconfirmed:  # it may have taken a name: ours in Redis are put right
                self.spawn(self.reconcile(room.name))
                raise
            epoch, last_seq, frames, taken_over, session, fresh = claim
            holder = room.members.get(fold(name)) if taken_over else None
            if holder is not None and holder.has_key(taking_over):
                self.chat.keep_bucket(holder)  # the newcomer goes on with it
            member = Member(name, room, ticket.address, key=key,
                            bucket=self.chat.bucket_for(None if fresh else session.decode(),
                                                        ticket.address),
                            previous_key=ticket.key, session=session.decode(),
                            verified=identity is not None,
                            mod=identity is not None and identity.mod)
            await self.admitted(room, admission, member)
            if epoch.decode() != room.epoch:
                room.adopt(epoch.decode(), int(last_seq))
            if taken_over:
                self.evict(room, fold(name), taking_over)
            self.fanout.flush(room)  # up to now: to the others; the newcomer has it
            room.members[fold(name)] = member
        finally:
            del room.admissions[join_id]
            self.forget_if_empty(room)
        since = ticket.since if ticket.epoch == room.epoch else None
        missed, history = history_window(frames, int(last_seq), since)
        out = newcomer_frames(member, admission.online, notes, missed, history, int(last_seq),
                              admission.verified)
        return member, out + [(member, frame) for frame in admission.frames]

    async def admitted(self, room: SharedRoom, admission: Admission, member: Member) -> None:
        """Wait until the newcomer's join notice has come back on the
        channel; if it does not, give its name back and let it try again."""
        try:
            await asyncio.wait_for(admission.passed.wait(), ADMISSION_TIMEOUT_S)
        except asyncio.TimeoutError:
            admission.lost = True
        if admission.lost:
            self.spawn(self.leave_redis(room, member, False))
            raise Unavailable(BROKER_DOWN)

    def leave(self, member: Member) -> None:
        room = member.room
        if not member.is_here():
            return
        del room.members[fold(member.name)]
        last_here = not room.members and not room.admissions
        self.spawn(self.leave_redis(room, member, last_here))
        self.forget_if_empty(room)

    def spend(self, member: Member) -> None:
        key, member.previous_key = member.previous_key, None
        if key is not None:
            self.spawn(self.call(self.client.delete, f"chat:key:{key}"))

    async def post(self, member: Member, text: str, action: bool, cid: str | None) -> int:
        room = member.room
        frame = chat(room.name, member.name, text, 0, action, member.verified)
        for _ in range(RECOVERY_TRIES):
            seq, epoch = await self.run(
                self.post_script,
                self.room_keys(room.name, "seq", "epoch", "history") + self.session_keys(member),
                [self.channel(room.name), frame_prefix(frame, "seq"), self.history_limit,
                 room.epoch, room.seq, cid or "", CID_MEMORY_LINES, int(CID_MEMORY_S * 1000),
                 self.session_ttl_ms, self.history_bytes, self.cids_kept])
            if seq != b"wait":
                break
            await asyncio.sleep(RECOVERY_STEP_S)  # Redis recovers lost rooms: not posted yet
        else:
            raise Unavailable(RECOVERING)
        if epoch.decode() != room.epoch:
            log.warning("room %s: epoch changed in Redis; syncing", room.name)
            self.spawn(self.sync(room))
        if seq == b"-":
            return None
        self.posted[member] = int(seq)
        return int(seq)

    async def before_answer(self, member: Member) -> None:
        room = member.room
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(REDIS_TIMEOUT_S):  # if Redis is slow, answer anyway
                while room.seq < self.posted.get(member, 0):
                    room.advanced.clear()
                    await room.advanced.wait()

    async def who(self, member: Member) -> tuple[list[str], list[str]]:
        entries = name_entries(await self.call(self.client.hvals,
                                               f"chat:{member.room.name}:names"))
        return ([entry["name"] for entry in entries],
                [entry["name"] for entry in entries if entry.get("verified")])

    async def rename(self, member: Member, new: str) -> str | None:
        room = member.room
        old = member.name
        granted = await self.call(
            self.rename_script, self.room_keys(room.name, "names", "order"),
            [self.channel(room.name), fold(old), fold(new),
             self.member_value(new, member.key, member.session, member.verified,
                               member.address),
             encode(renamed(room.name, old, new)), member.key])
        if not granted:
            return f"{new} is already taken in {room.name}"
        if member.is_here():
            del room.members[fold(old)]
            member.name = new
            room.members[fold(new)] = member
        else:
            # It left while the rename was in Redis (a take-over would have
            # made the rename fail): its leave took the old name away, so the
            # new one must go too, or it is held for ever.
            member.name = new
            self.spawn(self.leave_redis(room, member,
                                        not room.members and not room.admissions))
        return None

    async def recall(self, member: Member, cid: str) -> Acked | None:
        seq = await self.call(self.client.hget, self.session_keys(member)[0], cid)
        if seq is None:
            return None
        return Acked(None if seq == b"-" else int(seq))

    async def remember(self, member: Member, cid: str, seq: int | None) -> None:
        await self.call(self.remember_script, self.session_keys(member),
                        [cid, "-" if seq is None else seq, CID_MEMORY_LINES,
                         int(CID_MEMORY_S * 1000), self.session_ttl_ms, self.cids_kept])

    async def claim(self, room: SharedRoom, wanted: str | None, key: str,
                    taking_over: str | None, join_id: bytes, address: str,
                    verified: bool) -> tuple[str, list]:
        """Claim `wanted` or the first free of its suffixed variants (or a
        guest name) in Redis, announcing the join; `wanted` held by the
        member whose key is `taking_over` is taken from it.  Returns the name
        and the room's epoch, last seq, history, whether it was taken over,
        the newcomer's session, and whether that is new (no key named it)."""
        start = 1
        while True:
            if wanted is None:
                names = [f"guest-{secrets.token_hex(2)}" for _ in range(NAME_CANDIDATES)]
            else:
                names = name_candidates(wanted, start, NAME_CANDIDATES)
            # A name held here is never granted, even if Redis forgot it (it
            # lost its data): our holder would be overwritten, and go deaf.
            names = [name for name in names if fold(name) not in room.members
                     or (name == wanted and taking_over
                         and room.members[fold(name)].has_key(taking_over))]
            if not names:
                start += NAME_CANDIDATES
                continue
            args = [self.channel(room.name), room.name, room.epoch, room.seq,
                    taking_over if start == 1 and taking_over else "",
                    secrets.token_urlsafe(16), self.session_ttl_ms, join_id]
            if verified:  # exactly its name (make_way freed it), or try again
                names = [wanted] if names[:1] == [wanted] else []
                if not names:
                    raise Unavailable("your name was taken as you came in; try again")
            for name in names:
                args += [fold(name), self.member_value(name, key, None, verified, address),
                         frame_prefix(joined(room.name, name, 0, verified), "count")]
            result = await self.call(
                self.join_script,
                self.room_keys(room.name, "seq", "epoch", "history", "names", "order")
                + [self.proc_rooms_key, f"chat:key:{taking_over or '-'}", f"chat:key:{key}",
                   f"chat:{room.name}:topic"],
                args)
            if result[0]:  # and whether the session is a new one
                return names[result[0] - 1], [*result[1:], result[-1].decode() == args[5]]
            if verified:  # taken meanwhile by another newcomer
                raise Unavailable("your name was taken as you came in; try again")
            start += NAME_CANDIDATES

    async def make_way(self, room: SharedRoom, name: str) -> str | None:
        """Free `name` for a verified newcomer: a guest holding it is renamed
        (on whichever process it is).  The key of a verified holder, whose
        place the newcomer takes, or None."""
        args = [self.channel(room.name), room.name, fold(name)]
        for candidate in name_candidates(name, 2, NAME_CANDIDATES):
            args += [fold(candidate), candidate]
        answer = await self.call(self.make_way_script,
                                 self.room_keys(room.name, "names", "order"), args)
        if answer[0] == b"v":
            return answer[1].decode()
        if answer[0] == b"n" and answer[1].decode() == self.proc:
            # Our guest: renamed here at once, or the claim would find the
            # name still held here (its `n` message comes later).
            self.for_member(b"n", room, answer[2].decode(), answer[3].decode())
        return None

    # Moderation, for every process: bans in one hash and on one channel

    async def kick(self, member: Member, kick: Kick) -> str | None:
        room = member.room
        folded = fold(kick.name)
        if folded == fold(member.name):
            return "you cannot remove yourself; just leave"
        name = room.names.get(folded, kick.name)
        ban_hint = None  # for the notice: what the ban will say
        if kick.ban_s is not None:
            ban_hint = Ban("", name, None if kick.ban_s == float("inf")
                           else self.chat.wall_clock() + kick.ban_s)
        notice = kicked(room.name, name, member.name, kick.reason, ban_hint)
        ban = ""
        if ban_hint is not None:
            ban = json.dumps({"until": ban_hint.until, "reason": kick.reason, "by": member.name})
        held = await self.call(
            self.kick_script,
            self.room_keys(room.name, "names", "seq", "epoch", "history", "order", "topic")
            + ["chat:bans"],
            [self.channel(room.name), folded, encode(notice),
             json.dumps({"by": member.name, "reason": kick.reason,
                         "notice": encode(notice).decode()}), self.room_ttl_ms,
             ban, self.bans_channel, room.name])
        return None if held else f"no one named {kick.name} is in {room.name}"

    async def unban(self, member: Member, name: str) -> str | None:
        room_name = member.room.name
        bans = self.chat.bans_named(room_name, name)
        if not bans:
            return f"{name} is not banned from {room_name}"
        for ban in bans:
            self.chat.lift(room_name, ban)
            await self.call(self.unban_script, ["chat:bans"],
                            [self.bans_channel, f"{room_name}\t{ban.subject}"])
        return None

    async def set_topic(self, member: Member, text: str) -> None:
        room = member.room
        await self.call(self.topic_script, [f"chat:{room.name}:topic"],
                        [self.channel(room.name), text,
                         encode(topic_set(room.name, text, member.name))])

    async def delete(self, member: Member, seq: int) -> str | None:
        room = member.room
        found = await self.call(self.delete_script, [f"chat:{room.name}:history"],
                                [self.channel(room.name), f'"seq":{seq}}}',
                                 encode(deleted(room.name, seq, member.name))])
        return None if found else f"there is no message {seq} in the history of {room.name}"

    async def leave_redis(self, room: SharedRoom, member: Member, last_here: bool) -> None:
        try:
            await self.call(
                self.leave_script,
                [f"chat:{room.name}:names", self.proc_rooms_key, *self.session_keys(member),
                 *self.room_keys(room.name, "seq", "epoch", "history", "order", "topic")],
                [self.channel(room.name), room.name, fold(member.name), self.proc,
                 frame_prefix(left(room.name, member.name, 0, member.verified), "count"),
                 self.room_ttl_ms,
                 int(last_here), member.key, self.session_ttl_ms])
        except Unavailable:
            pass  # the reconciliation after reconnecting removes the name

    # Rooms and their channels

    async def enter(self, room: SharedRoom) -> None:
        """Subscribe to the room's channel if needed; wait until it is synced."""
        channel = self.channel(room.name).encode()
        if channel not in self.channels:
            if self.subscriber is None:
                raise Unavailable(BROKER_DOWN)
            self.channels[channel] = room
            self.tell_subscriber(b"SUBSCRIBE", channel)
        try:
            await asyncio.wait_for(room.synced.wait(), REDIS_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise Unavailable(BROKER_DOWN) from None

    async def sync(self, room: SharedRoom) -> None:
        """The sync point, once the subscription is confirmed: Redis's last
        seq, and what was missed since the last time."""
        channel = self.channel(room.name).encode()
        try:
            for _ in range(RECOVERY_TRIES):
                answer = await self.call(
                    self.sync_script,
                    self.room_keys(room.name, "seq", "epoch", "history", "names", "topic"),
                    [room.epoch, room.seq, self.room_ttl_ms, int(room.ever_synced)])
                if answer[0] != b"wait" or self.channels.get(channel) is not room:
                    break
                await asyncio.sleep(RECOVERY_STEP_S)  # a process that knows the room brings it back
        except Unavailable:
            return  # the next connection syncs again
        if answer[0] == b"wait":
            return  # its newcomers time out with 1013 and try again
        epoch, last_seq, frames, values, topic = answer
        if self.channels.get(self.channel(room.name).encode()) is room:
            missed = room.resync(epoch.decode(), int(last_seq), frames, name_entries(values),
                                 topic.decode())
            if missed:
                log.warning("room %s: %d messages missed while the channel was away are "
                            "no longer kept in Redis; its clients got a gap notice",
                            room.name, missed)
            self.fanout.publish(room)
            self.forget_if_empty(room)

    def forget_if_empty(self, room: SharedRoom) -> None:
        """Drop a room nobody here is in (or entering) and unsubscribe."""
        if room.members or room.admissions or not room.synced.is_set():
            return  # wait for the subscription's confirmation before undoing it
        if self.chat.rooms.get(room.name) is room:
            self.chat.forget_room(room.name)
        channel = self.channel(room.name).encode()
        if self.channels.get(channel) is room:
            del self.channels[channel]
            self.spawn(self.unsubscribe(channel))

    async def unsubscribe(self, channel: bytes) -> None:
        # Not if a newcomer subscribed again meanwhile: its subscribe may
        # have gone first, and this would undo it.
        if channel not in self.channels and self.subscriber is not None:
            self.tell_subscriber(b"UNSUBSCRIBE", channel)

    def tell_subscriber(self, *command: bytes) -> None:
        """(Un)subscribe; Redis confirms on the channels' connection (on_channel)."""
        if not self.up.is_set():
            raise Unavailable(BROKER_DOWN)
        self.subscriber._writer.write(command_bytes(*command))

    # The connection to Redis

    async def follow(self) -> None:
        """Read the channels; reconnect with backoff whenever Redis goes."""
        delay = RECONNECT_MIN_S
        while True:
            connection = None
            try:
                for room in self.channels.values():
                    room.synced.clear()
                connection = await raw_connection(self.listener)
                connection._writer.write(command_bytes(b"SUBSCRIBE", self.control,
                                                       self.bans_channel, *self.channels))
                self.subscriber = connection
                delay = RECONNECT_MIN_S
                await self.read(connection)
            except Exception as exc:
                if not isinstance(exc, self.errors):
                    log.exception("broker: reading the channels failed")
                self.lost(exc)
            finally:
                self.subscriber = None
                self.set_up(False)
                for room in self.channels.values():
                    room.lose_admissions()
                try:
                    if connection is not None:
                        await connection.disconnect()
                    # Pooled connections to a Redis that went away would each
                    # fail once more: drop them all, they reconnect on use.
                    await self.client.connection_pool.disconnect()
                except self.errors:
                    pass
            await asyncio.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def read(self, connection) -> None:
        """Take what the channels bring: every message a read of the
        connection holds, each handled at once (no task switch per message)."""
        parser, reader = replies(), connection._reader
        while data := await reader.read(65536):
            parser.feed(data)
            while (message := parser.gets()) is not False:
                self.on_channel(message)
        raise ConnectionError("Redis closed the channels' connection")

    def on_channel(self, message) -> None:
        """One message from the channels' connection: [kind, channel, data]."""
        if isinstance(message, ReplyError):
            log.warning("broker: the channels' connection got an error: %s", message)
            return
        if not isinstance(message, list) or len(message) != 3:
            return
        kind, channel, data = message
        if kind == b"message" and channel == self.bans_channel:
            self.follow_bans(data.decode(errors="replace"))
        elif kind == b"message":
            room = self.channels.get(channel)
            if room is None:
                return
            head, _, frame = data.partition(b" ")
            if head in (b"r", b"n", b"k"):  # for one process: about one member
                parts = frame.decode(errors="replace").split(" ", 2)
                if len(parts) == 3 and parts[0] == self.proc:
                    self.for_member(head, room, parts[1], parts[2])
                return
            if head not in (b"-", b"j") and not head.isdigit():
                log.warning("broker: ignoring a foreign message on %r", channel)
                return
            room.published(head, frame)
            self.fanout.publish(room)
        elif kind == b"subscribe":
            if channel == self.control:
                self.set_up(True)
                self.spawn(self.reconcile_all())
            elif channel in self.channels:
                self.spawn(self.sync(self.channels[channel]))

    def for_member(self, head: bytes, room: SharedRoom, key: str, what: str) -> None:
        """What the channel tells this process about its member with `key`:
        taken over (r NAME), renamed for a verified newcomer (n NAME), or
        removed by a moderator (k {"by", "reason"})."""
        if head == b"r":
            self.evict(room, what, key)
            return
        member = next((m for m in room.members.values() if m.has_key(key)), None)
        if member is None:
            return
        del room.members[fold(member.name)]
        if head == b"n":
            member.name = what
            room.members[fold(what)] = member
            return
        removal = json.loads(what)
        self.expel(member, removal["by"], removal["reason"], removal["notice"].encode())
        self.forget_if_empty(room)

    def follow_bans(self, data: str) -> None:
        """Keep Chat.bans as the bans channel tells (`+ ROOM TAB SUBJECT TAB
        BAN`, `- ROOM TAB SUBJECT`)."""
        sign, _, rest = data.partition(" ")
        parts = rest.split("\t", 2)
        if sign == "+" and len(parts) == 3:
            self.chat.add_ban(parts[0], Ban(**json.loads(parts[2])))
        elif sign == "-" and len(parts) == 2:
            ban = self.chat.bans.get(parts[0], {}).get(parts[1])
            if ban is not None:
                self.chat.lift(parts[0], ban)

    def evict(self, room: SharedRoom, folded: str, key: str) -> None:
        """Close our member `folded` of `room` if `key` is its key: its name
        went to a new connection (its leave was announced with the take-over)."""
        member = room.members.get(folded)
        if member is None or not member.has_key(key):
            return
        del room.members[folded]
        self.replace(member)
        self.forget_if_empty(room)

    def lost(self, exc: BaseException) -> None:
        """Redis is gone: every command waiting for it fails now, and the
        subscriber reconnects (one path for every way back)."""
        if self.up.is_set():
            log.warning("message broker %s lost: %s; reconnecting", safe_url(self.url), exc)
        self.set_up(False)
        if self.subscriber is not None:
            self.spawn(self.subscriber.disconnect())
        if self.pipe is not None:
            self.pipe.close()
        self.spawn(self.client.connection_pool.disconnect())

    def set_up(self, up: bool) -> None:
        if up and not self.up.is_set():
            log.info("message broker %s connected", safe_url(self.url))
        self.up.set() if up else self.up.clear()

    async def call(self, command, *args):
        """Run one Redis command, however slow, and return its answer.
        Unavailable if Redis is known to be gone (nothing was sent) or
        refused it; Unconfirmed if it got no answer (it may have run)."""
        if not self.up.is_set():
            raise Unavailable(BROKER_DOWN)
        try:
            async with asyncio.timeout(REDIS_GIVE_UP_S):
                return await command(*args)
        except self.no_answer as exc:
            self.beat_now.set()  # is Redis gone?
            raise Unconfirmed(UNCONFIRMED) from exc
        except self.errors as exc:
            raise Unavailable(f"the message broker refused it ({exc}); "
                              "your message was not sent") from exc

    async def run(self, script, keys: list[str], args: list) -> object:
        """Run a Lua script on the pipe, pipelined with the others of this
        event loop turn (posts: the hot path); otherwise as `call`."""
        if not self.up.is_set():
            raise Unavailable(BROKER_DOWN)
        pipe = self.pipe
        if pipe is None or pipe.broken is not None:
            pipe = await self.open_pipe()
        try:
            reply = await pipe.send(command_bytes(b"EVALSHA", script.sha, len(keys), *keys,
                                                  *args))
            if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
                # Redis restarted and forgot it: the script itself, once.
                reply = await pipe.send(command_bytes(b"EVAL", script.script, len(keys),
                                                      *keys, *args))
        except OSError as exc:  # ConnectionError: no answer, it may have run
            self.beat_now.set()  # is Redis gone?
            raise Unconfirmed(UNCONFIRMED) from exc
        if isinstance(reply, ReplyError):
            raise Unavailable(f"the message broker refused it ({reply}); "
                              "your message was not sent")
        return reply

    async def open_pipe(self) -> Pipe:
        """The pipe, connected again; Unavailable if Redis cannot be reached
        (then nothing was sent)."""
        if self.pipe_opening is None:
            self.pipe_opening = asyncio.ensure_future(self.connect_pipe())
        opening = self.pipe_opening
        try:
            return await asyncio.shield(opening)
        except (*self.errors, asyncio.TimeoutError) as exc:
            self.beat_now.set()
            raise Unavailable(BROKER_DOWN) from exc
        finally:
            if self.pipe_opening is opening and opening.done():
                self.pipe_opening = None

    async def connect_pipe(self) -> Pipe:
        # A Redis that accepts but is slow to answer is waited for, as a
        # command would be; one that refuses fails at once.
        async with asyncio.timeout(REDIS_GIVE_UP_S):
            connection = await raw_connection(self.client)
        self.pipe = Pipe(connection)
        return self.pipe

    async def reconcile_all(self) -> None:
        """Our names in Redis, as they are here: after (re)connecting, and
        after our heartbeat key was found gone (this process stalled)."""
        try:
            await self.call(self.heartbeat)  # first: or we could be swept again
            # Bans made while we were away (lifts come by the channel only:
            # one missed keeps its subject out until it is over, or a restart).
            for field, ban in (await self.call(self.client.hgetall, "chat:bans")).items():
                room_name, _, _ = field.decode().partition("\t")
                self.chat.add_ban(room_name, Ban(**json.loads(ban)))
            rooms = {name.decode() for name in
                     await self.call(self.client.smembers, self.proc_rooms_key)}
            for name in rooms | set(self.chat.rooms):
                await self.reconcile(name)
        except Unavailable:
            pass

    async def reconcile(self, room_name: str) -> None:
        room = self.chat.rooms.get(room_name)
        joining = " ".join(admission.key for admission in room.admissions.values()) if room else ""
        args = [self.channel(room_name), room_name, self.proc, self.room_ttl_ms,
                room.epoch if room else "", room.seq if room else 0, joining]
        for member in (room.members.values() if room else ()):
            args += [fold(member.name),
                     self.member_value(member.name, member.key, member.session,
                                       member.verified, member.address),
                     frame_prefix(joined(room_name, member.name, 0, member.verified), "count")]
        taken = await self.call(
            self.reconcile_script,
            self.room_keys(room_name, "seq", "epoch", "history", "names", "order")
            + [self.proc_rooms_key, f"chat:{room_name}:topic"], args)
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
        """The heartbeat, on its own connection and task, so that no load
        starves it: say we are alive every HEARTBEAT_INTERVAL_S, and decide
        that Redis is gone after HEARTBEAT_MISSES failed beats in a row."""
        misses, beats = 0, 0
        while True:
            try:
                async with asyncio.timeout(HEARTBEAT_TIMEOUT_S):
                    alive = await self.heartbeat()
            except (*self.errors, asyncio.TimeoutError) as exc:
                misses += 1
                if misses >= HEARTBEAT_MISSES:
                    self.lost(exc)
                    with contextlib.suppress(*self.errors):
                        await self.pulse.connection_pool.disconnect()
            except Exception:
                log.exception("broker: heartbeat failed")
            else:
                misses, beats = 0, beats + 1
                if not alive and beats > 1 and self.up.is_set():
                    # Our key expired: this process stalled, and the others
                    # may have swept our names.  Put them back (announced).
                    log.warning("broker: our heartbeat key was gone; "
                                "registering our names again")
                    self.spawn(self.reconcile_all())
            self.beat_now.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.beat_now.wait(),
                                       HEARTBEAT_INTERVAL_S if not misses else 0.2)

    async def heartbeat(self) -> bool:
        """Say we are alive; False if our key was gone."""
        pipe = self.pulse.pipeline(transaction=False)
        pipe.set(self.proc_key, 1, px=int(HEARTBEAT_TTL_S * 1000), get=True)
        pipe.sadd("chat:procs", self.proc)
        previous, _ = await pipe.execute()
        return previous is not None

    async def sweep_dead(self) -> None:
        """Remove the names of dead processes, every HEARTBEAT_INTERVAL_S."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            try:
                await self.call(self.sweep_script, ["chat:procs"],
                                [self.db, self.room_ttl_ms, "", self.proc])
            except Unavailable:
                pass
            except Exception:
                log.exception("broker: sweeping dead processes failed")

    # Helpers

    def spawn(self, coroutine) -> None:
        """Run `coroutine` on its own; log it if it fails unexpectedly."""
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.done)

    def done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and \
                not isinstance(task.exception(), Unavailable):
            log.error("broker task failed", exc_info=task.exception())

    def channel(self, room_name: str) -> str:
        return f"chat:{self.db}:{room_name}"

    @staticmethod
    def room_keys(room_name: str, *parts: str) -> list[str]:
        return [f"chat:{room_name}:{part}" for part in parts]

    def member_value(self, name: str, key: str, session: str | None, verified: bool = False,
                     address: str = "") -> bytes:
        """A member's entry in a room's names, up to what the script fills
        in: its order, and before that its session if it is None (a join).
        Its address is what a ban of a guest holds on to."""
        entry = {"name": name, "proc": self.proc, "key": key, "address": address,
                 **({"verified": True} if verified else {}), "session": session}
        if session is None:
            return frame_prefix(entry, "session")
        return frame_prefix({**entry, "n": 0}, "n")

    @staticmethod
    def session_keys(member: Member) -> list[str]:
        """The member's session's cids and their order, and its key's session."""
        return [f"chat:session:{member.session}:cids", f"chat:session:{member.session}:order",
                f"chat:key:{member.key}"]


async def connect_redis(url: str, connections: int = REDIS_CONNECTIONS,
                        read_timeout: float | None = None):
    """A redis.asyncio client for `url` with a pool of `connections`, that
    has answered a PING; raise Unavailable with a one-line reason if there is
    none.  Commands wait for a free connection, and for their answer up to
    `read_timeout` (None: as long as the connection lives)."""
    import redis.asyncio
    import redis.exceptions
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    client = None
    try:
        # At most REDIS_CONNECTIONS: a burst of lines waits for one rather
        # than opening a connection per sender.
        client = redis.asyncio.Redis.from_pool(redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=connections, timeout=None,
            socket_timeout=read_timeout, socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0)))  # the broker retries itself, with backoff
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            await client.ping()
    except (redis.exceptions.RedisError, OSError, ValueError, asyncio.TimeoutError) as exc:
        if client is not None:
            await client.aclose()
        raise Unavailable(f"cannot reach the message broker at {safe_url(url)}: "
                          f"{exc}") from None
    return client


async def check_broker(url: str) -> None:
    """Raise Unavailable unless Redis at `url` answers (before --workers start)."""
    client = await connect_redis(url)
    await client.aclose()
