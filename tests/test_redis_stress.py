"""Scale-out under stress (issue 17): chatserver processes sharing a real
redis-server while Redis is far away or frozen, while a process is frozen
(SIGSTOP stands in for a saturated event loop), and while joins storm in."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

from websockets.asyncio.client import connect

from conftest import chat_lines, free_port, join
from test_redis import FAST


class DelayRelay:
    """A TCP relay on loopback that delays every chunk, each way, by `delay`
    seconds: a Redis server that far away."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = free_port()
        self.tasks: set[asyncio.Task] = set()
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> DelayRelay:
        self.server = await asyncio.start_server(self.accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def accept(self, reader, writer) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self.pump(source, sink))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def pump(self, source, sink) -> None:
        chunks: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await chunks.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    sink.close()
                    return
                sink.write(data)

        delivering = asyncio.create_task(deliver())
        try:
            while data := await source.read(65536):
                chunks.put_nowait((time.monotonic() + self.delay, data))
            chunks.put_nowait((time.monotonic() + self.delay, b""))
            await delivering
        finally:
            delivering.cancel()


@contextlib.contextmanager
def frozen(process):
    """SIGSTOP `process` (a conftest Process or Popen) for the block."""
    popen = getattr(process, "popen", process)
    popen.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        popen.send_signal(signal.SIGCONT)


async def started(run_process, *args: str):
    """run_process in a thread: the test's loop must go on serving relays."""
    return await asyncio.to_thread(run_process, *args)


async def test_a_join_storm_does_not_hold_back_the_rooms_messages(redis_server, run_process):
    """Item 8: with Redis 25 ms away, lines reach a member while joins into
    its room keep coming (before, every join held the room's frames until it
    was done, and overlapping joins held them for as long as they came)."""
    async with DelayRelay(redis_server.port, 0.025) as relay:
        a = await started(run_process, "--broker", relay.url, *FAST)
        b = await started(run_process, "--broker", relay.url, *FAST)
        watcher = await join(a.url, "storm", name="watcher")
        sender = await join(b.url, "storm", name="sender")
        stop = asyncio.Event()

        async def keep_joining():  # one join after another, a few at once
            for _ in range(400):
                if stop.is_set():
                    return
                async with connect(f"{a.url}/storm") as ws:
                    await ws.recv()

        storm = [asyncio.create_task(keep_joining()) for _ in range(6)]
        try:
            await asyncio.sleep(0.3)  # joins in flight all the time now
            for n in range(10):
                await sender.send(f"line {n}")
                frame = await watcher.expect(type="user", message=f"line {n}")
                assert frame["id"] == "sender"
            assert not any(task.done() for task in storm)  # it was still storming
        finally:
            stop.set()
            await asyncio.gather(*storm)


async def test_resuming_at_a_process_that_lags_gives_no_duplicates(redis_server, run_process):
    """Item 5: a page that saw seq N on one process resumes with since=N on
    another that has not read up to N yet (its Redis is 100 ms away): it
    gets what follows N, once."""
    async with DelayRelay(redis_server.port, 0.1) as relay:
        a = await started(run_process, "--broker", redis_server.url, *FAST)
        b = await started(run_process, "--broker", relay.url, *FAST)
        writer = await join(a.url, "lag", name="writer")
        await join(b.url, "lag", name="stayer")  # b follows the room's channel
        epoch = writer.welcome["epoch"]
        for n in range(1, 21):
            await writer.send(f"m{n}")
        last = (await chat_lines(writer, 20))[-1][0]
        reader = await join(b.url, "lag", name="reader", since=last, epoch=epoch)
        assert [f for f in reader.backlog if f["type"] == "user"] == []
        await writer.send("after")
        frames = await reader.recv_until(lambda f: f.get("message") == "after")
        assert [(f["seq"], f["message"]) for f in frames if f["type"] == "user"] == [
            (last + 1, "after")]
