"""chatserver_store: rooms that survive a restart, for chatserver --store PATH.

Rooms live in this process's memory as without a store (names, presence and
the fan-out are chatserver's), and each room's epoch, numbering and last
--history messages, and each session's acked lines, are kept in a SQLite
database at PATH.  A room is read from it when first joined, so a large
database does not slow the start.

A chat message is numbered, written and committed first, then broadcast and
acked, so whatever a client saw or was acked is on disk.  The database is
used from one thread of its own (`Store`): the event loop never waits on
the disk; it hands over jobs and is called back when they are done.  Jobs
that arrive while a commit is under way are committed together, so under load
one commit (one fsync) carries many messages.

The journal is WAL with synchronous=FULL: a commit is on the disk before the
message goes out, so neither a crash nor a power cut loses an acked message
(as far as the disk keeps its word about fsync).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import functools
import logging
import queue
import sqlite3
import threading
import time
import weakref
from typing import Callable

from chatserver import (CID_MEMORY_LINES, Ban, Chat, Config, Fanout, Member, MemoryRooms,
                        Outgoing, Posted, Room, Ticket, Unavailable, chat, cid_memory_lines,
                        encode, session_keep_s)

log = logging.getLogger("chatserver")

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 1000  # a write that waits this long for a lock has failed
GROUP_JOBS = 1000  # at most this many jobs in one commit
SPENT_KEYS = 10_000  # keys spent lately, refused even if the disk still has them
# Under load, a commit waits until this long after the last one, so that one
# fsync carries more lines (a lone line after a quiet spell never waits).
COMMIT_INTERVAL_S = 0.004
CACHE_KIB = 16384
# The WAL is copied into the database (a checkpoint) once it holds this many
# pages, 40 MiB: each line rewrites a page of its room and one of its
# session, the same few thousand pages again and again, and a checkpoint
# copies each page once however often it changed (SQLite's default, 1,000
# pages, copied the busiest ones ten times as often: a quarter more CPU).
CHECKPOINT_PAGES = 10_000
# A room's old messages are deleted once this many are past --history, in
# one statement, rather than one by one with every message: a room keeps at
# most --history + TRIM_MESSAGES rows (a load reads only the last --history).
TRIM_MESSAGES = 32

BANS_TABLE = """
CREATE TABLE bans (            -- moderators' bans (chatserver.Ban)
  room TEXT NOT NULL,
  subject TEXT NOT NULL,       -- name:FOLDED or address:ADDR
  name TEXT NOT NULL,
  until REAL,                  -- unix time; NULL: for ever
  reason TEXT NOT NULL,
  by TEXT NOT NULL,
  PRIMARY KEY (room, subject)
) WITHOUT ROWID;
"""
SCHEMA = """
CREATE TABLE rooms (
  name TEXT PRIMARY KEY,
  epoch TEXT NOT NULL,
  seq INTEGER NOT NULL,        -- the last seq given out
  active_at REAL NOT NULL,     -- when the last message was posted (unix time)
  topic TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE INDEX rooms_by_activity ON rooms (active_at);
CREATE TABLE messages (
  room TEXT NOT NULL,
  seq INTEGER NOT NULL,
  frame BLOB NOT NULL,         -- the chat frame exactly as sent
  PRIMARY KEY (room, seq)
) WITHOUT ROWID;
CREATE TABLE lines (           -- each session's acked lines
  session TEXT NOT NULL,
  cid TEXT NOT NULL,
  seq INTEGER,                 -- NULL: a command
  at REAL NOT NULL,            -- when it was acked (unix time)
  PRIMARY KEY (session, cid)
) WITHOUT ROWID;
CREATE INDEX lines_by_age ON lines (at);
CREATE TABLE keys (            -- the welcome keys that name a session now
  key TEXT PRIMARY KEY,
  session TEXT NOT NULL
) WITHOUT ROWID;
""" + BANS_TABLE

# From each schema to the next, applied in order when an older store opens.
MIGRATIONS = {
    1: "ALTER TABLE rooms ADD COLUMN topic TEXT NOT NULL DEFAULT '';" + BANS_TABLE,
}


@dataclasses.dataclass
class StoredRoom:
    epoch: str
    seq: int
    frames: list[tuple[int, bytes]]  # the last --history messages, oldest first
    topic: str = ""


Done = Callable[[object, "Unavailable | None"], None]  # (result, None) or (None, why not)


class Store:
    """The SQLite database at `path`, used from a thread of its own.

    `call(job)` runs `job(store)` there and returns an asyncio future of its
    result; `submit(job, done)` calls `done(result, problem)` on the event
    loop instead (no future: a chat line's path).  Jobs that only read run
    at once; those that write run in the order they came, and those waiting
    together are committed together; if the commit fails, every job of the
    group fails with Unavailable ("not saved: ...") and what they wrote is
    undone.  Outcomes reach the event loop a whole group at once, in the
    order the jobs came.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.db: sqlite3.Connection | None = None
        self.lock_file = None
        self.seqs: dict[str, int] = {}  # each room's last seq, as the disk has it
        self.problem: str | None = None  # why the last commit failed, until one works
        self.loop: asyncio.AbstractEventLoop | None = None
        self.committed_at = 0.0
        self.undo: dict[str, int] = {}
        # What the group's chat messages write, in one statement each (see
        # keep_message): their rows, and each room's last seq and its trim.
        self.new_messages: list[tuple[str, int, bytes]] = []
        self.new_lines: list[tuple[str, str, int, float]] = []
        self.touched: dict[str, tuple[str, str, int, float]] = {}
        self.trims: dict[str, int] = {}
        self.trimmed: dict[str, int] = {}  # room: its messages up to this seq are deleted
        self.now = 0.0  # the group's time (unix), for what it writes

    # Starting and stopping (from the event loop's thread)

    def open(self) -> None:
        """Open the database and start the thread; raise Unavailable with a
        one-line reason if PATH cannot be used (never repair it silently)."""
        self.lock_file = self.lock()
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise Unavailable(f"the store {self.path} was made by a newer chatserver "
                                  f"(schema {version}; this one knows {SCHEMA_VERSION})")
            if version == 0:
                if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise Unavailable(f"{self.path} is a SQLite database, but not a "
                                      "chatserver store")
                db.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; "
                                 "COMMIT;")
                version = SCHEMA_VERSION
            for old in range(version, SCHEMA_VERSION):  # an older store: brought up
                db.executescript(f"BEGIN; {MIGRATIONS[old]} PRAGMA user_version = {old + 1}; "
                                 "COMMIT;")
            if db.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                raise Unavailable(f"the store {self.path} cannot use a WAL journal")
            db.execute("PRAGMA synchronous = FULL")
            db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            db.execute(f"PRAGMA wal_autocheckpoint = {CHECKPOINT_PAGES}")
        except sqlite3.Error as exc:
            self.lock_file.close()
            raise Unavailable(f"cannot open the store {self.path}: {exc}") from None
        self.db = db
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self.run, name="chatserver-store", daemon=True)
        self.thread.start()

    def lock(self):
        """Hold PATH.lock: two processes on one store would each number its
        rooms, so the second one refuses to start."""
        try:
            lock_file = open(self.path + ".lock", "a")
        except OSError as exc:
            raise Unavailable(f"cannot open the store {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            raise Unavailable(f"the store {self.path} is in use by another chatserver "
                              "process") from None
        return lock_file

    async def close(self) -> None:
        """Commit what is pending, then stop the thread and close the file."""
        if self.thread is None:
            return
        self.jobs.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self.thread.join)
        self.db.close()
        self.lock_file.close()
        self.thread = None

    def call(self, job) -> asyncio.Future:
        future = self.loop.create_future()
        self.submit(job, functools.partial(resolve, future))
        return future

    def submit(self, job, done: Done) -> None:
        self.jobs.put((job, done))

    # The thread

    def run(self) -> None:
        while True:
            first = self.jobs.get()
            wait = self.committed_at + COMMIT_INTERVAL_S - time.monotonic()
            if first is not None and wait > 0:
                time.sleep(wait)  # let the lines that arrive meanwhile share the commit
            group = [first]
            while first is not None and len(group) < GROUP_JOBS:
                try:
                    group.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            stop = None in group
            group = [job for job in group if job is not None]
            self.read([job for job in group if not job[0].writes])
            self.commit([job for job in group if job[0].writes])
            if stop:
                return

    def read(self, jobs: list) -> None:
        """Run jobs that only read: they need no lock (WAL), so they work
        even while writing fails."""
        outcomes = []
        for job, done in jobs:
            try:
                outcomes.append((done, job(self), None))
            except Exception as exc:  # the thread must live on
                problem = Unavailable(f"the chat's store cannot be read ({exc})")
                outcomes.append((done, None, problem))
        self.settle(outcomes)

    def settle(self, outcomes: list) -> None:
        """Hand results to the event loop, a whole group in one call."""
        if outcomes:
            self.loop.call_soon_threadsafe(settle, outcomes)

    def commit(self, group: list) -> None:
        if not group:
            return
        self.undo = {}  # room: its seq before this group, to undo a failure
        self.now = time.time()
        try:
            self.db.execute("BEGIN IMMEDIATE")
            results = []
            for job, _ in group:
                if type(job) is not Post:
                    self.write_messages()  # in the order the jobs came
                results.append(job(self))
            self.write_messages()
            self.db.execute("COMMIT")
        except Exception as exc:  # the thread must live on: every later line needs it
            if not isinstance(exc, sqlite3.Error):
                log.exception("store %s: a write failed", self.path)
            with contextlib.suppress(sqlite3.Error):
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
            self.seqs.update(self.undo)
            self.trimmed.clear()  # its deletes are undone too: trim again
            self.failed(f"not saved: {exc}")
            problem = Unavailable(f"not saved: the chat's store failed ({exc})")
            self.settle([(done, None, problem) for _, done in group])
            return
        finally:
            self.committed_at = time.monotonic()
            self.new_messages, self.new_lines, self.touched, self.trims = [], [], {}, {}
        self.recovered()
        self.settle([(done, result, None) for (_, done), result in zip(group, results)])

    def failed(self, problem: str) -> None:
        if self.problem is None:
            log.error("store %s: %s; lines are refused until it can be written again",
                      self.path, problem)
        self.problem = problem

    def recovered(self) -> None:
        if self.problem is not None:
            log.warning("store %s: writable again", self.path)
        self.problem = None

    # What jobs do, on the thread

    def last_seq(self, room: str) -> int:
        if room not in self.seqs:
            row = self.db.execute("SELECT seq FROM rooms WHERE name = ?", (room,)).fetchone()
            self.seqs[room] = row[0] if row else 0
        return self.seqs[room]

    def number(self, room: str, known: int) -> int:
        """The next seq of `room`: past what the disk and the chat (`known`)
        have seen, so that no seq is given twice even if the room's row went."""
        self.undo.setdefault(room, self.last_seq(room))
        seq = self.seqs[room] = max(self.last_seq(room), known) + 1
        return seq

    def keep_message(self, room: str, epoch: str, seq: int, frame: bytes, history: int,
                     session: str, cid: str | None) -> None:
        """Write a chat message, its room's new seq and its cid, with the rest
        of the group's (write_messages): a few statements a group rather
        than four a message."""
        self.new_messages.append((room, seq, frame))
        self.touched[room] = (room, epoch, seq, self.now)
        if cid is not None:
            self.new_lines.append((session, cid, seq, self.now))
        if seq - history - self.trimmed.get(room, -TRIM_MESSAGES) >= TRIM_MESSAGES:
            self.trims[room] = self.trimmed[room] = seq - history

    def write_messages(self) -> None:
        """Write what keep_message gathered."""
        if not self.touched:
            return
        db = self.db
        db.executemany("INSERT INTO rooms (name, epoch, seq, active_at) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (name) DO UPDATE "
                       "SET seq = excluded.seq, active_at = excluded.active_at",
                       self.touched.values())
        db.executemany("INSERT INTO messages VALUES (?, ?, ?)", self.new_messages)
        if self.new_lines:
            db.executemany("INSERT OR REPLACE INTO lines VALUES (?, ?, ?, ?)", self.new_lines)
        if self.trims:
            db.executemany("DELETE FROM messages WHERE room = ? AND seq <= ?",
                           self.trims.items())
        self.new_messages, self.new_lines, self.touched, self.trims = [], [], {}, {}


def settle(outcomes: list) -> None:
    """On the event loop: each (done, result, exception) of a group, in order."""
    for done, result, problem in outcomes:
        try:
            done(result, problem)
        except Exception:  # a bug: the rest of the group must still hear
            log.exception("store: handling the outcome of a job failed")


def resolve(future: asyncio.Future, result: object, problem: Unavailable | None) -> None:
    if future.cancelled():
        return
    if problem is None:
        future.set_result(result)
    else:
        future.set_exception(problem)


# The jobs: each runs on the store's thread, inside a group's transaction.


@dataclasses.dataclass
class Load:
    """A room as the store has it, or None if it has none."""

    room: str
    history: int
    writes = False

    def __call__(self, store: Store) -> StoredRoom | None:
        db = store.db
        row = db.execute("SELECT epoch, seq, topic FROM rooms WHERE name = ?",
                         (self.room,)).fetchone()
        if row is None:
            return None
        epoch, seq, topic = row
        frames = db.execute("SELECT seq, frame FROM messages WHERE room = ? AND seq > ? "
                            "ORDER BY seq", (self.room, seq - self.history)).fetchall()
        return StoredRoom(epoch, seq, frames, topic)


@dataclasses.dataclass
class Post:
    """Number, keep and remember one chat message; its (seq, frame)."""

    room: str
    epoch: str
    name: str
    text: str
    action: bool
    history: int
    session: str
    cid: str | None
    known: int  # the room's last seq as the chat knows it
    verified: bool = False
    writes = True

    def __call__(self, store: Store) -> tuple[int, bytes]:
        seq = store.number(self.room, self.known)
        frame = encode(chat(self.room, self.name, self.text, seq, self.action, self.verified))
        store.keep_message(self.room, self.epoch, seq, frame, self.history, self.session,
                           self.cid)
        return seq, frame


@dataclasses.dataclass
class SetTopic:
    room: str
    epoch: str
    seq: int
    topic: str
    writes = True

    def __call__(self, store: Store) -> None:
        store.db.execute("INSERT INTO rooms VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE "
                         "SET topic = excluded.topic",
                         (self.room, self.epoch, self.seq, time.time(), self.topic))


@dataclasses.dataclass
class Forget:
    """Delete the message `seq` of `room` (a moderator's /delete)."""

    room: str
    seq: int
    writes = True

    def __call__(self, store: Store) -> None:
        store.db.execute("DELETE FROM messages WHERE room = ? AND seq = ?", (self.room, self.seq))


@dataclasses.dataclass
class KeepBan:
    room: str
    ban: Ban
    writes = True

    def __call__(self, store: Store) -> None:
        ban = self.ban
        store.db.execute("INSERT OR REPLACE INTO bans VALUES (?, ?, ?, ?, ?, ?)",
                         (self.room, ban.subject, ban.name, ban.until, ban.reason, ban.by))


@dataclasses.dataclass
class LiftBan:
    room: str
    subject: str
    writes = True

    def __call__(self, store: Store) -> None:
        store.db.execute("DELETE FROM bans WHERE room = ? AND subject = ?",
                         (self.room, self.subject))


@dataclasses.dataclass
class LoadBans:
    """Every ban in force: they are checked at the handshake, so all are in memory."""

    writes = False

    def __call__(self, store: Store) -> list[tuple[str, Ban]]:
        rows = store.db.execute("SELECT room, subject, name, until, reason, by FROM bans "
                                "WHERE until IS NULL OR until > ?", (time.time(),)).fetchall()
        return [(room, Ban(*fields)) for room, *fields in rows]


@dataclasses.dataclass
class Remember:
    session: str
    cid: str
    seq: int | None
    writes = True

    def __call__(self, store: Store) -> None:
        store.db.execute("INSERT OR REPLACE INTO lines VALUES (?, ?, ?, ?)",
                         (self.session, self.cid, self.seq, time.time()))


@dataclasses.dataclass
class SessionOfKey:
    """The session a key names and its newest `most` acked lines, oldest
    first: (session, [(cid, seq, at)]), or None."""

    key: str
    most: int
    writes = False

    def __call__(self, store: Store) -> tuple[str, list[tuple[str, int | None, float]]] | None:
        row = store.db.execute("SELECT session FROM keys WHERE key = ?", (self.key,)).fetchone()
        if row is None:
            return None
        newest = store.db.execute("SELECT cid, seq, at FROM lines WHERE session = ? "
                                  "ORDER BY at DESC LIMIT ?", (row[0], self.most)).fetchall()
        return row[0], newest[::-1]


@dataclasses.dataclass
class NameSession:
    """`key` names `session` (None: it names nothing any more); of the
    session's other keys, only those in `kept` (the newest) still do."""

    key: str
    session: str | None
    kept: tuple[str, ...] = ()
    writes = True

    def __call__(self, store: Store) -> None:
        db = store.db
        if self.session is None:
            db.execute("DELETE FROM keys WHERE key = ?", (self.key,))
            return
        db.execute("INSERT OR REPLACE INTO keys VALUES (?, ?)", (self.key, self.session))
        marks = ", ".join("?" * len(self.kept))
        db.execute(f"DELETE FROM keys WHERE session = ? AND key NOT IN ({marks})",
                   (self.session, *self.kept))


@dataclasses.dataclass
class Prune:
    """Keep the disk bounded: at most `rooms` rooms (the most recently
    active), and each session's acked lines as chatserver.Session keeps
    them: its last CID_MEMORY_LINES and all younger than `keep_s`, its
    newest `most` at most."""

    rooms: int
    keep_s: float
    most: int
    live: frozenset[str]  # rooms open in memory: never pruned
    writes = True

    def __call__(self, store: Store) -> int:
        db = store.db
        old = [name for (name,) in db.execute(
            "SELECT name FROM rooms ORDER BY active_at DESC LIMIT -1 OFFSET ?", (self.rooms,))
            if name not in self.live]
        for name in old:
            db.execute("DELETE FROM messages WHERE room = ?", (name,))
            db.execute("DELETE FROM rooms WHERE name = ?", (name,))
            store.seqs.pop(name, None)
            store.trimmed.pop(name, None)
        now = time.time()
        # Sessions with more than CID_MEMORY_LINES lines lose those older than
        # keep_s; every line goes after twice that (one pass each: no query
        # per line).
        db.execute("DELETE FROM lines WHERE at < ? AND session IN (SELECT session FROM lines "
                   "GROUP BY session HAVING count(*) > ?)", (now - self.keep_s, CID_MEMORY_LINES))
        db.execute("DELETE FROM lines WHERE at < ?", (now - 2 * self.keep_s,))
        db.execute("DELETE FROM lines WHERE (session, cid) IN (SELECT session, cid FROM "
                   "(SELECT session, cid, row_number() OVER (PARTITION BY session ORDER BY at "
                   "DESC) AS newer FROM lines WHERE session IN (SELECT session FROM lines "
                   "GROUP BY session HAVING count(*) > ?)) WHERE newer > ?)",
                   (self.most, self.most))
        db.execute("DELETE FROM keys WHERE NOT EXISTS "
                   "(SELECT 1 FROM lines WHERE lines.session = keys.session)")
        db.execute("DELETE FROM bans WHERE until <= ?", (now,))  # over
        return len(old)


class StoreRooms(MemoryRooms):
    """Rooms in memory, kept in a SQLite store: a message is broadcast and
    acked once it is committed."""

    waits = True
    pipelines = True  # one thread takes the posts in the order they come

    def __init__(self, chat: Chat, fanout: Fanout, config: Config) -> None:
        super().__init__(chat, fanout)
        self.store = Store(config.store)
        self.history = config.history
        self.max_stored_rooms = config.store_rooms
        self.keep_s = session_keep_s(config)
        self.cids_kept = cid_memory_lines(config)
        self.posting: weakref.WeakKeyDictionary[Member, asyncio.Future] = \
            weakref.WeakKeyDictionary()  # each member's last post on its way
        self.loading: dict[str, asyncio.Future] = {}
        self.spent: collections.OrderedDict[str, None] = collections.OrderedDict()
        # (session, cid): who waits for that line's post, on its way (a line
        # sent again before the first was committed waits for it).
        self.in_flight: dict[tuple[str, str], list[Posted]] = {}

    async def start(self) -> None:
        self.store.open()
        for room_name, ban in await self.store.call(LoadBans()):
            self.chat.add_ban(room_name, ban)
        log.info("store %s", self.store.path)

    async def close(self) -> None:
        await self.store.close()

    def health(self) -> str | None:
        return self.store.problem

    async def sweep(self) -> None:
        gone = await self.store.call(Prune(self.max_stored_rooms, self.keep_s,
                                           self.cids_kept, frozenset(self.chat.rooms)))
        if gone:
            log.info("store %s: forgot %d least recently active rooms", self.store.path, gone)

    # What clients do

    async def join(self, ticket: Ticket) -> tuple[Member, Outgoing]:
        if ticket.key and ticket.key not in self.chat.keys:
            await self.load_session(ticket.key)
        # A room past --room-ttl that the sweep has not reached yet is read
        # from the file like any other it forgot, not opened anew; with no
        # wait between this and the join, which would find it expired.
        self.chat.forget_if_expired(ticket.room)
        if ticket.room not in self.chat.rooms:
            await self.load(ticket)  # it opens the room: not expired then
        member, out = await super().join(ticket)
        kept = tuple(self.chat.sessions[member.session].keys)
        self.spawn(NameSession(member.key, member.session, kept))
        return member, out

    def spend(self, member: Member) -> None:
        key = member.previous_key
        super().spend(member)
        if key is not None:
            self.spawn(NameSession(key, None))
            # Until that delete is on disk, a read must not bring it back.
            self.spent[key] = None
            while len(self.spent) > SPENT_KEYS:
                self.spent.popitem(last=False)

    def spawn(self, job) -> None:
        """A write whose result nobody waits for (a failure is logged once by
        the store, and the key stays usable or unknown: no line is lost)."""
        self.store.call(job).add_done_callback(lambda done: done.exception())

    async def load(self, ticket: Ticket) -> None:
        """Read the ticket's room from the store, once however many join at once."""
        room_name = ticket.room
        loading = self.loading.get(room_name)
        if loading is None:
            loading = self.loading[room_name] = self.store.call(Load(room_name, self.history))
            loading.add_done_callback(lambda _: self.loading.pop(room_name, None))
        stored = await asyncio.shield(loading)
        if stored is None or room_name in self.chat.rooms:
            return
        room = self.chat.open_room(room_name, ticket.address, reservation=ticket.reservation)
        room.epoch = stored.epoch
        room.topic = stored.topic
        room.seq = room.delivered_seq = stored.seq
        for seq, frame in stored.frames:
            room.remember(seq, frame)

    async def load_session(self, key: str) -> None:
        found = await self.store.call(SessionOfKey(key, self.cids_kept))
        if found is None or key in self.chat.keys or key in self.spent:
            return
        sid, lines = found
        session = self.chat.name_session(key, sid)
        for cid, seq, at in lines:
            session.lines.setdefault(cid, (seq, self.chat.clock() - (time.time() - at)))

    async def post(self, member: Member, text: str, action: bool, cid: str | None) -> int:
        posted = self.fanout.loop().create_future()
        self.posting[member] = posted
        self.post_soon(member, text, action, cid, functools.partial(resolve, posted))
        return await posted

    def post_soon(self, member: Member, text: str, action: bool, cid: str | None,
                  done: Posted) -> None:
        if cid is not None:
            acked = self.chat.recall(member, cid)
            if acked is not None:
                done(acked.seq, None)
                return
            waiting = self.in_flight.get((member.session, cid))
            if waiting is not None:  # sent again before the first was committed
                waiting.append(done)
                return
            self.in_flight[member.session, cid] = [done]
        room = member.room
        self.store.submit(Post(room.name, room.epoch, member.name, text, action, self.history,
                               member.session, cid, room.seq, member.verified),
                          functools.partial(self.posted, member, room, cid, done))

    def posted(self, member: Member, room: Room, cid: str | None, done: Posted,
               kept: tuple[int, bytes] | None, problem: Unavailable | None) -> None:
        """A post is committed (or not): the room gets it, then whoever waits."""
        waiting = [done] if cid is None else self.in_flight.pop((member.session, cid), [done])
        seq = None
        if problem is None:
            seq, frame = kept
            room.keep(seq, frame)
            if cid is not None:
                self.chat.remember(member, cid, seq)
            self.fanout.publish(room)
        for each in waiting:
            each(seq, problem)

    async def remember(self, member: Member, cid: str, seq: int | None) -> None:
        await self.store.call(Remember(member.session, cid, seq))
        self.chat.remember(member, cid, seq)

    # Moderation: on disk first, like a message

    async def set_topic(self, member: Member, text: str) -> None:
        room = member.room
        await self.store.call(SetTopic(room.name, room.epoch, room.seq, text))
        await super().set_topic(member, text)

    async def delete(self, member: Member, seq: int) -> str | None:
        await self.store.call(Forget(member.room.name, seq))
        return await super().delete(member, seq)

    async def keep_ban(self, room_name: str, ban: Ban) -> None:
        await self.store.call(KeepBan(room_name, ban))

    async def lift_ban(self, room_name: str, ban: Ban) -> None:
        await self.store.call(LiftBan(room_name, ban.subject))

    async def rename(self, member: Member, new: str) -> str | None:
        """After the member's lines on their way (pipelined): its nick notice
        must not overtake them."""
        posting = self.posting.get(member)
        if posting is not None:
            await asyncio.wait([posting])
        return await super().rename(member, new)
