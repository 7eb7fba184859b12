"""Starting chatserver as a user would: the script, the console command, -m."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys

import pytest
from websockets.exceptions import ConnectionClosed

from conftest import ROOT, in_ci, join

FLAGS = ["--host", "--port", "--history", "--room-ttl", "--max-chars", "--max-size",
         "--log-level", "--rate", "--burst", "--max-rooms", "--max-clients", "--max-per-ip",
         "--trust-proxy", "--allow-origin", "--max-buffer", "--handshake-timeout",
         "--ping-interval", "--ping-timeout", "--shutdown-timeout", "--certfile", "--keyfile",
         "--history-bytes", "--rooms-per-ip", "--new-rooms-per-min", "--store", "--store-rooms",
         "--broker", "--workers", "--batch-window", "--crowd", "--flood-close", "--uvloop"]


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, "chatserver.py", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for flag in FLAGS:
        assert flag in result.stdout, flag
    assert "8765" in result.stdout


def test_bad_flag_value_is_a_clear_error():
    result = subprocess.run([sys.executable, "chatserver.py", "--history", "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--history must be at least 1" in result.stderr


async def test_script_serves_a_chat(run_process):
    process = run_process()
    alice = await join(process.url, name="alice")
    await alice.send("hello")
    assert (await alice.recv())["message"] == "hello"
    await alice.close()


async def test_python_dash_m_serves_a_chat(run_process):
    process = run_process(command=[sys.executable, "-m", "chatserver"])
    alice = await join(process.url, name="alice")
    assert alice.welcome["room"] == "lobby"


async def test_console_script_serves_a_chat(run_process):
    command = shutil.which("chatserver")
    if command is None:
        if in_ci():
            pytest.fail("the chatserver console script is not installed: pip install -e .")
        pytest.skip("chatserver is not installed (pip install -e .)")
    process = run_process(command=[command])
    alice = await join(process.url, name="alice")
    assert alice.welcome["name"] == "alice"


async def test_default_port_is_8765_not_8000():
    import chatserver
    assert chatserver.Config().port == 8765


async def test_sigterm_says_goodbye_closes_with_1001_and_exits_0(run_process):
    process = run_process("--shutdown-timeout", "5")
    clients = [await join(process.url, name=f"user{n}") for n in range(3)]
    process.popen.send_signal(15)
    for client in clients:
        goodbye = await client.expect(event="shutdown")
        assert goodbye["type"] == "sys"
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await client.recv()
        assert closed.value.rcvd.code == 1001
    assert await asyncio.to_thread(process.popen.wait, 10) == 0


async def test_uvloop_serves_a_chat_when_asked(run_process):
    process = run_process("--uvloop")
    alice = await join(process.url, name="alice")
    await alice.send("on uvloop")
    assert (await alice.recv())["message"] == "on uvloop"
    await alice.close()
    assert process.terminate() == 0
    assert "event loop: uvloop" in process.stderr()


@pytest.mark.parametrize("flag, value, says", [
    ("--rate", "0", "--rate must be more than 0"),
    ("--rate", "-5", "--rate must be more than 0"),
    ("--rate", "nan", "--rate must be more than 0"),
    ("--flood-close", "0", "--flood-close must be more than 0"),
    ("--ping-interval", "0", "--ping-interval must be more than 0"),
    ("--ping-timeout", "-1", "--ping-timeout must be more than 0"),
    ("--handshake-timeout", "0", "--handshake-timeout must be more than 0"),
    ("--room-ttl", "-1", "--room-ttl cannot be negative"),
    ("--shutdown-timeout", "-1", "--shutdown-timeout cannot be negative"),
    ("--port", "70000", "--port takes 0 to 65535"),
    ("--store-rooms", "0", "--store-rooms must be at least 1"),
])
def test_numbers_that_make_no_sense_are_refused_with_one_line(flag, value, says):
    result = subprocess.run([sys.executable, "chatserver.py", flag, value], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and says in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(says)


async def test_log_level_debug_shows_the_websocket_librarys_own_messages(run_process):
    quiet, loud = run_process(), run_process("--log-level", "DEBUG")
    for process in (quiet, loud):
        await (await join(process.url, name="alice")).close()
    await asyncio.sleep(0.2)
    assert "chatserver.protocol" not in quiet.stderr()
    assert "chatserver.protocol" in loud.stderr()
