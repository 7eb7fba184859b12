"""Limits, slow clients, origins, shutdown, health and metrics, TLS, logs."""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
import time
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import join
from test_protocol import _http_get


async def refused_status(url: str, **kwargs) -> tuple[int, bytes]:
    with pytest.raises(InvalidStatus) as refusal:
        await connect(url, open_timeout=5, **kwargs)
    return refusal.value.response.status_code, refusal.value.response.body


async def closed_code(client) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(15):
            while True:
                await client.ws.recv()
    return closed.value.rcvd.code if closed.value.rcvd else closed.value.sent.code


# Flooding


async def test_flooding_client_gets_few_errors_then_is_closed_with_1008(start_server):
    server = await start_server(rate=5, burst=5, flood_close=1.0)
    bystander = await join(server.url, name="bystander")
    flooder = await join(server.url, name="flooder")
    await bystander.expect(event="join", name="flooder")
    errors = 0
    started = time.monotonic()
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(10):
            while True:
                for _ in range(20):
                    await flooder.send("spam")
                await asyncio.sleep(0.01)
                while True:  # read what has arrived without waiting
                    try:
                        frame = await flooder.recv(timeout=0.001)
                    except TimeoutError:
                        break
                    errors += frame.get("event") == "error"
    assert closed.value.rcvd.code == 1008 and closed.value.rcvd.reason == "flooding"
    elapsed = time.monotonic() - started
    assert 1 <= errors <= elapsed + 2  # about one error a second, not one per line
    frames = await bystander.recv_until(lambda f: f.get("event") == "leave")
    assert sum(f["type"] == "user" for f in frames) <= 5 + 5 * elapsed + 1
    await bystander.send("still served")
    assert (await bystander.recv())["message"] == "still served"
    assert server.metrics.dropped["flooding"] == 1


# Connection limits


async def test_max_rooms_refuses_a_new_room_with_503(start_server):
    server = await start_server(max_rooms=2)
    await join(server.url, "one")
    await join(server.url, "two")
    status, body = await refused_status(f"{server.url}/three")
    assert status == 503 and b"rooms" in body
    await join(server.url, "one")  # an existing room is still open


async def test_max_clients_refuses_with_503(start_server):
    server = await start_server(max_clients=2)
    await join(server.url)
    await join(server.url)
    status, body = await refused_status(server.url)
    assert status == 503 and b"full" in body


async def test_max_per_ip_refuses_with_503_and_frees_on_leave(start_server):
    server = await start_server(max_per_ip=2)
    first = await join(server.url)
    await join(server.url)
    status, body = await refused_status(server.url)
    assert status == 503 and b"address" in body
    await first.close()
    async with asyncio.timeout(5):
        while server.per_ip.get("127.0.0.1", 0) > 1:
            await asyncio.sleep(0.01)
    await join(server.url)


async def test_forwarded_for_is_ignored_without_trust_proxy(start_server):
    server = await start_server(max_per_ip=1)
    await join(server.url)
    status, _ = await refused_status(server.url,
                                     additional_headers={"X-Forwarded-For": "203.0.113.9"})
    assert status == 503


async def test_trust_proxy_counts_clients_by_forwarded_for(start_server):
    server = await start_server(max_per_ip=1, trust_proxy=True)
    await connect(server.url, additional_headers={"X-Forwarded-For": "203.0.113.9"})
    await connect(server.url,
                  additional_headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.10"})
    status, _ = await refused_status(server.url,
                                     additional_headers={"X-Forwarded-For": "203.0.113.9"})
    assert status == 503


async def test_any_origin_is_accepted_by_default(server):
    for origin in ("null", "https://cdn.example.com"):
        await join(server.url)  # no Origin
        ws = await connect(server.url, origin=origin)
        await ws.close()


async def test_allow_origin_refuses_other_origins_with_403(start_server):
    server = await start_server(allow_origin=("https://chat.example.com", "null"))
    await (await connect(server.url, origin="https://chat.example.com")).close()
    await (await connect(server.url, origin="null")).close()
    status, body = await refused_status(server.url, origin="https://evil.example.com")
    assert status == 403 and b"origin" in body
    status, _ = await refused_status(server.url)  # no Origin at all
    assert status == 403


# Slow consumers


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_slow_client_is_dropped_while_a_fast_one_gets_everything(run_process):
    process = run_process("--rate", "100000", "--burst", "100000", "--max-buffer", "262144",
                          "--log-level", "WARNING")
    fast = await join(process.url, "busy", name="fast")
    # The slow client completes the handshake and then never reads again.
    slow = await connect(f"{process.url}/busy?name=slow", max_queue=1)
    slow.transport.pause_reading()
    sender = await join(process.url, "busy", name="sender")
    await fast.expect(event="join", name="sender")
    rss_before = rss_kib(process.popen.pid)
    text = "x" * 1900
    count = 15000  # about 28 MB to a reader that takes none of it

    async def read_all():
        seqs = []
        async with asyncio.timeout(60):
            while len(seqs) < count:
                frame = await fast.recv(timeout=30)
                if frame["type"] == "user":
                    seqs.append(frame["seq"])
        return seqs

    async def drain(client):  # the sender hears its own echo: it must read too
        while True:
            await client.ws.recv()

    reader = asyncio.create_task(read_all())
    echo = asyncio.create_task(drain(sender))
    peak = rss_before
    for n in range(count):
        await sender.send(text)
        if n % 500 == 0:
            peak = max(peak, rss_kib(process.popen.pid))
            await asyncio.sleep(0)
    assert await reader == list(range(1, count + 1))
    echo.cancel()
    peak = max(peak, rss_kib(process.popen.pid))
    _, metrics = await _http_get(process.port, "/metrics")
    assert 'chat_clients_dropped_total{reason="too slow"} 1' in metrics
    # 28 MB went out; the server held at most --max-buffer for the slow one.
    assert peak - rss_before < 8 * 1024, (rss_before, peak)
    slow.transport.abort()


# Dead peers


async def test_peer_that_never_answers_pings_is_removed_with_a_leave(start_server):
    server = await start_server(ping_interval=0.2, ping_timeout=0.3)
    alice = await join(server.url, name="alice")
    ghost = await connect(f"{server.url}/?name=ghost")
    ghost.transport.pause_reading()  # alive for TCP, deaf to pings
    await alice.expect(event="join", name="ghost")
    notice = await alice.expect(event="leave", name="ghost")
    assert notice["count"] == 1
    ghost.transport.abort()


# Shutdown


async def test_sigterm_with_200_clients_ends_cleanly_within_the_timeout(run_process):
    process = run_process("--shutdown-timeout", "5", "--max-per-ip", "1000",
                          "--log-level", "WARNING")
    clients = await asyncio.gather(*(connect(f"{process.url}/big") for _ in range(200)))
    deaf = await connect(f"{process.url}/big")  # never answers the close
    deaf.transport.pause_reading()
    started = time.monotonic()
    process.popen.terminate()
    code = await asyncio.to_thread(process.popen.wait, 20)
    elapsed = time.monotonic() - started
    assert code == 0 and elapsed < 5 + 2, elapsed
    for ws in clients:
        got_shutdown = False
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                while True:
                    got_shutdown |= '"event":"shutdown"' in await ws.recv()
        assert got_shutdown and closed.value.rcvd.code == 1001
    deaf.transport.abort()


# HTTP on the same port


async def test_metrics_count_connections_messages_and_deliveries(server):
    alice = await join(server.url, name="alice")
    await join(server.url, name="bob")
    await alice.send("one")
    await alice.expect(type="user")
    status, text = await _http_get(server.port, "/metrics")
    assert status == 200
    metrics = dict(line.rsplit(" ", 1) for line in text.splitlines()
                   if line and not line.startswith("#"))
    assert metrics["chat_connections"] == "2" and metrics["chat_rooms"] == "1"
    assert metrics["chat_messages_received_total"] == "1"
    assert metrics["chat_messages_broadcast_total"] >= "1"
    assert int(metrics["chat_frames_delivered_total"]) >= 2
    assert 'chat_clients_dropped_total{reason="flooding"}' in metrics


async def test_metrics_content_type_is_prometheus_text(server):
    def get():
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            return r.headers["Content-Type"]
    assert (await asyncio.to_thread(get)).startswith("text/plain; version=0.0.4")


# TLS


@pytest.fixture
def certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


async def test_tls_serves_wss(run_process, certificate):
    cert, key = certificate
    process = run_process("--certfile", str(cert), "--keyfile", str(key))
    assert process.url.startswith("wss://")
    context = ssl.create_default_context(cafile=str(cert))
    async with connect(f"wss://127.0.0.1:{process.port}/secure?name=alice", ssl=context) as ws:
        assert '"event":"welcome"' in await asyncio.wait_for(ws.recv(), 5)
        await ws.send("over tls")
        async with asyncio.timeout(5):
            while '"over tls"' not in await ws.recv():
                pass


# Logs


async def test_logs_say_who_came_and_went_but_never_what_they_said(server, caplog):
    caplog.set_level(logging.INFO, logger="chatserver")
    alice = await join(server.url, "logged", name="alice")
    await alice.send("a secret message")
    await alice.expect(type="user")
    await alice.close()
    async with asyncio.timeout(5):
        while not any("disconnect" in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "chatserver"]
    connect_line = next(line for line in lines if line.startswith("connect"))
    disconnect_line = next(line for line in lines if line.startswith("disconnect"))
    for part in ("room=logged", "name=alice", "address=127.0.0.1"):
        assert part in connect_line and part in disconnect_line
    assert "code=1000" in disconnect_line
    assert not any("secret" in r.getMessage() for r in caplog.records)


async def test_refused_handshake_is_logged_as_a_warning(start_server, caplog):
    server = await start_server(max_clients=1)
    await join(server.url)
    await refused_status(server.url)
    assert any(r.levelno == logging.WARNING and "503" in r.getMessage()
               for r in caplog.records)
