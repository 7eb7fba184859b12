"""chatserver_workers: --workers N, one process per core, each owning rooms.

The parent process listens on the port.  For each connection it reads the
request line, finds the room in its path, and hands the socket (with the
bytes it read) to the worker that owns that room: the room's name hashed
over the workers.  So every member of a room is on one worker, a line is
handled by one process, and workers need no Redis for the rooms they own.
With --broker, rooms are still shared with processes on other machines.

A worker that dies is restarted (its rooms' clients reconnect to the new
one); SIGTERM or SIGINT to the parent stops them all; a worker whose parent
died stops by itself.  Imported only with --workers above 1.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import zlib

from chatserver import Config, Refused, Unavailable, room_from_path, run, run_loop, safe_url

log = logging.getLogger("chatserver")

WORKER_START_TIMEOUT_S = 30.0
WORKER_RESTART_S = 1.0  # pause before restarting a worker that died
WORKER_ORPHAN_CHECK_S = 1.0  # how often a worker checks that its parent lives
REQUEST_LINE_BYTES = 8192  # a request line longer than this goes to any worker (it refuses it)
HANDOFF_BYTES = 65536  # what the parent reads of a request at most before handing it over


def unavailable(reason: bytes) -> bytes:
    """A whole HTTP 503 answer that says `reason`."""
    body = reason + b"\n"
    return (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


TRY_LATER = unavailable(b"this room's worker is restarting; try again")
TOO_MANY_FROM_ADDRESS = unavailable(b"too many connections from your address")


@dataclasses.dataclass
class Worker:
    process: multiprocessing.Process
    handoff: socket.socket  # the parent's end: sockets go down it
    # One sender at a time: a full handoff has room for one writer to wait on.
    sending: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)


def owner(head: bytes, workers: int) -> int:
    """Which worker owns the room a request's first line asks for."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    try:
        room = room_from_path(parts[1].partition("?")[0]) if len(parts) == 3 else ""
    except Refused:
        room = ""  # any worker: it refuses the request itself
    return zlib.crc32(room.encode()) % workers


def run_workers(config: Config) -> int | str:
    """Listen, start --workers processes, hand each connection to its room's
    worker, restart a worker that dies, and stop them all on SIGTERM/SIGINT.
    Returns the exit status (a message on failure)."""
    if config.broker:
        from chatserver_redis import check_broker
        try:
            asyncio.run(check_broker(config.broker))
        except Unavailable as exc:
            return f"chatserver: {exc}"
    listener = socket.socket(socket.AF_INET6 if config.host and ":" in config.host
                             else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((config.host or "", config.port))
    except OSError as exc:
        return f"chatserver: cannot listen on port {config.port}: {exc}"
    listener.listen(1024)
    listener.setblocking(False)
    config = dataclasses.replace(config, port=listener.getsockname()[1])
    return asyncio.run(Parent(config, listener).serve())


class Parent:
    """The parent process: its workers, and the connections on their way."""

    def __init__(self, config: Config, listener: socket.socket) -> None:
        self.config = config
        self.listener = listener
        self.context = multiprocessing.get_context("fork")
        self.ready, self.ready_writer = self.context.Pipe(duplex=False)
        self.workers: list[Worker] = []
        self.waiting = 0  # connections whose request line has not come yet
        self.per_ip: collections.Counter[str] = collections.Counter()  # of those, by address
        self.handing: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()

    async def serve(self) -> int | str:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        self.workers = [self.start_worker() for _ in range(self.config.workers)]
        problem = await self.started()
        if problem is not None or self.stopping.is_set():
            self.stop_workers()
            return problem or 0
        scheme = "ws"
        host = self.config.host or "localhost"
        shared = f", sharing rooms over {safe_url(self.config.broker)}" if self.config.broker else ""
        print(f"chatserver listening on {scheme}://{host}:{self.config.port}/ with "
              f"{len(self.workers)} worker processes, each owning its rooms{shared}", flush=True)
        loop.add_reader(self.ready.fileno(), self.take_ready)
        accepting = asyncio.create_task(self.accept())
        watching = asyncio.create_task(self.watch())
        await self.stopping.wait()
        loop.remove_reader(self.ready.fileno())
        accepting.cancel()
        watching.cancel()
        self.listener.close()
        await asyncio.to_thread(self.stop_workers)
        return 0

    def start_worker(self) -> Worker:
        parent_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = self.context.Process(target=serve_as_worker,
                                       args=(self.config, self.ready_writer, worker_end))
        process.start()
        worker_end.close()
        parent_end.setblocking(False)
        return Worker(process, parent_end)

    def take_ready(self) -> None:
        """A restarted worker's "listening": read, or the pipe fills up."""
        try:
            self.ready.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self.ready.fileno())

    async def started(self) -> str | None:
        """Wait until every worker listens; why not, if one does not."""
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        started = 0
        while started < len(self.workers) and not self.stopping.is_set():
            failed = [w.process for w in self.workers if not w.process.is_alive()]
            if failed or time.monotonic() > deadline:
                return (f"chatserver: a worker did not start (exit code "
                        f"{failed[0].exitcode if failed else 'none: timeout'})")
            if self.ready.poll():
                self.ready.recv()
                started += 1
            else:
                await asyncio.sleep(0.05)
        return None

    async def watch(self) -> None:
        """Restart a worker that died (its rooms wait meanwhile)."""
        while True:
            await asyncio.sleep(0.5)
            for n, worker in enumerate(self.workers):
                if not worker.process.is_alive():
                    log.warning("worker %d exited with %s; restarting it", worker.process.pid,
                                worker.process.exitcode)
                    worker.handoff.close()
                    await asyncio.sleep(WORKER_RESTART_S)
                    self.workers[n] = self.start_worker()

    async def accept(self) -> None:
        """Take connections, at most --max-clients waiting for their request
        line, and at most --max-per-ip of them from one address, as a single
        process counts them (behind a proxy, --trust-proxy, the workers count
        by the address the handshake names): one address must not hold every
        place in the parent."""
        loop = asyncio.get_running_loop()
        while True:
            connection, peer = await loop.sock_accept(self.listener)
            address = peer[0]
            if self.waiting >= self.config.max_clients:
                connection.close()  # a flood of connections that say nothing
                continue
            if not self.config.trust_proxy and self.per_ip[address] >= self.config.max_per_ip:
                log.warning("refused a connection 503 from %s: too many connections "
                            "from your address", address)
                refuse(connection, TOO_MANY_FROM_ADDRESS)
                continue
            self.waiting += 1
            self.per_ip[address] += 1
            task = asyncio.ensure_future(self.hand_over(connection, address))
            self.handing.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self.handing.discard)

    async def hand_over(self, connection: socket.socket, address: str) -> None:
        """Read the request line (within --handshake-timeout), then pass the
        socket and what was read to the worker that owns its room."""
        loop = asyncio.get_running_loop()
        head = b""
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                while b"\r\n" not in head and len(head) < REQUEST_LINE_BYTES:
                    chunk = await loop.sock_recv(connection, HANDOFF_BYTES - len(head))
                    if not chunk:
                        return
                    head += chunk
            worker = self.workers[owner(head, len(self.workers))]
            try:
                async with asyncio.timeout(self.config.handshake_timeout), worker.sending:
                    await self.send_socket(worker.handoff, head, connection)
            except (OSError, TimeoutError):  # it died (it is restarted soon), or hangs
                await loop.sock_sendall(connection, TRY_LATER)
        except (TimeoutError, OSError) as exc:
            log.debug("a connection was not handed over: %s", exc)
        finally:
            self.waiting -= 1
            self.per_ip[address] -= 1
            if not self.per_ip[address]:
                del self.per_ip[address]
            connection.close()  # the worker has its own copy

    async def send_socket(self, handoff: socket.socket, head: bytes,
                          connection: socket.socket) -> None:
        """Send `connection` and what was read of it down `handoff`; while
        the worker is slow to take them (a burst of connections), wait."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                socket.send_fds(handoff, [head], [connection.fileno()])
                return
            except BlockingIOError:
                writable = loop.create_future()
                loop.add_writer(handoff.fileno(), writable.set_result, None)
                try:
                    await writable
                finally:
                    loop.remove_writer(handoff.fileno())

    def stop_workers(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGTERM)
        for worker in self.workers:
            worker.process.join(self.config.shutdown_timeout + 5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()


def refuse(connection: socket.socket, answer: bytes) -> None:
    """Answer a connection we will not read (a 503 fits in a new socket's
    buffer: no waiting), and close it."""
    connection.setblocking(False)
    try:
        connection.send(answer)
    except OSError:
        pass  # it is gone already
    connection.close()


def serve_as_worker(config: Config, ready_writer, handoff: socket.socket) -> None:
    """One worker process: serve the connections the parent hands over, and
    tell the parent once ready."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)  # until run() installs its own

    def ready(line: str) -> None:
        if line.startswith("chatserver listening"):
            ready_writer.send(os.getpid())

    # A worker whose parent died (even by SIGKILL) must not serve on alone.
    threading.Thread(target=stop_when_orphaned, args=(os.getppid(),), daemon=True).start()
    try:
        run_loop(config, run(config, ready=ready, handoff=handoff))
    except Unavailable as exc:
        sys.exit(f"chatserver: {exc}")


def stop_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WORKER_ORPHAN_CHECK_S)
    os.kill(os.getpid(), signal.SIGTERM)  # a graceful shutdown, as from the parent


class Handoff:
    """A worker's side of the handoff: takes the sockets the parent sends,
    each with the bytes the parent read from it, as new connections (in
    place of a listening server: `close` stops taking them)."""

    sockets: list = []

    def __init__(self, handoff: socket.socket, protocol_factory) -> None:
        self.handoff = handoff
        self.protocol_factory = protocol_factory  # Client(chat_server, initial)
        self.loop = asyncio.get_running_loop()
        self.adopting: set[asyncio.Task] = set()
        handoff.setblocking(False)
        self.loop.add_reader(handoff.fileno(), self.take)

    def take(self) -> None:
        try:
            head, fds, _, _ = socket.recv_fds(self.handoff, HANDOFF_BYTES, 1)
        except BlockingIOError:
            return
        except OSError:
            fds, head = [], b""
        if not fds:
            if not head:  # the parent is gone: stop_when_orphaned stops us
                self.close()
            return
        connection = socket.socket(fileno=fds[0])
        connection.setblocking(False)
        task = asyncio.ensure_future(self.loop.connect_accepted_socket(
            lambda: self.protocol_factory(head), connection))
        self.adopting.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self.adopting.discard)

    def close(self) -> None:
        self.loop.remove_reader(self.handoff.fileno())
