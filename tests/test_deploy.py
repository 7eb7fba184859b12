"""The deployment recipes in deploy/, run for real as far as they can run here.

nginx (deploy/nginx/chatserver.conf): Debian's nginx runs that very file,
changed only in its listen addresses and ports, its paths and a certificate
made here (and, for the idle tests, with its proxy timeouts and chatserver's
ping interval both 40 times shorter), in front of a real `chatserver.py
--trust-proxy`.  Debian's Chromium chats through it over wss://, and
websockets clients dial it from other loopback addresses (127.0.0.2,
127.0.0.3: Linux takes any 127.x.y.z as a source address) to show which
address the server counts.

systemd (deploy/chatserver.service): what the unit promises, read from the
file; `systemd-analyze verify` where it is installed; and its ExecStart run
as a process (paths and port changed): it serves, stops on SIGTERM in time,
and the history is there after the restart.

Container (deploy/Containerfile): no container engine runs here, so the
image is never built; its ENTRYPOINT's command line and its HEALTHCHECK
command run as plain commands.

Without nginx or chromium these tests are skipped, except under CI=true,
where they fail (as the browser and Redis tests do).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as sync_connect

import chatserver
from conftest import ROOT, Process, free_port, in_ci
from test_browser import ChatPage, browser, watch  # noqa: F401 (browser: a fixture)

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips, or fails under CI
    expect = None

DEPLOY = ROOT / "deploy"
NGINX_SITE = DEPLOY / "nginx" / "chatserver.conf"
UNIT = DEPLOY / "chatserver.service"
CONTAINERFILE = DEPLOY / "Containerfile"
PUBLIC = ROOT / "public"
WAIT_S = 10.0
# The idle tests run the recipe's clock TIME_SCALE times faster: nginx's proxy
# timeouts as the recipe sets them, and chatserver's --ping-interval as the
# unit sets it (or its default), each divided by TIME_SCALE.
TIME_SCALE = 40

# The harness around the site file: what Debian's /etc/nginx/nginx.conf
# gives a site (mime types, sendfile, gzip), in a folder of the test's own.
NGINX_MAIN = """\
daemon off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{ worker_connections 256; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    sendfile on;
    gzip on;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include {folder}/site.conf;
}}
"""


def nginx_path() -> str:
    """Debian's nginx (in /usr/sbin); a skip without it, a failure under CI."""
    path = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None)
    if path is None:
        message = "nginx is not installed (apt-get install nginx; see .ci/setup)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (certificate, key)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def adapted_site(site: str, *, http_port: int, https_port: int, chat_port: int,
                 cert: Path, key: Path, folder: Path, time_scale: float = 1) -> str:
    """The site file with loopback ports, this checkout's paths and the test
    certificate (and its proxy timeouts divided by `time_scale`); every line
    changed must be found exactly once, so that the test notices when the
    recipe changes shape."""
    changes = [
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen [::]:80;", ""),
        ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        ("listen [::]:443 ssl;", ""),
        ("http://127.0.0.1:8765", f"http://127.0.0.1:{chat_port}"),
        ("/etc/letsencrypt/live/chat.example.com/fullchain.pem", str(cert)),
        ("/etc/letsencrypt/live/chat.example.com/privkey.pem", str(key)),
        ("/opt/chatserver/public", str(PUBLIC)),
        ("/var/log/nginx/chatserver.access.log", str(folder / "access.log")),
    ]
    for old, new in changes:
        assert site.count(old) == 1, f"{old!r} is not in {NGINX_SITE.name} once"
        site = site.replace(old, new)
    if time_scale != 1:
        site, count = re.subn(
            r"(proxy_(?:read|send)_timeout) (\w+);",
            lambda m: f"{m[1]} {round(nginx_seconds(m[2]) * 1000 / time_scale)}ms;", site)
        assert count == 2, "proxy_read_timeout and proxy_send_timeout, once each"
    return site


def nginx_seconds(value: str) -> float:
    """An nginx time (60s, 1m, 500ms, 60) in seconds."""
    found = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert found, f"cannot read the nginx time {value!r}"
    return int(found[1]) * {"ms": 0.001, "m": 60, "h": 3600}.get(found[2], 1)


def proxy_timeout_s() -> float:
    """The shorter of the recipe's two proxy timeouts, in seconds."""
    values = re.findall(r"proxy_(?:read|send)_timeout (\w+);", NGINX_SITE.read_text())
    return min(nginx_seconds(value) for value in values)


class Nginx:
    """Debian's nginx in the foreground with the recipe, in a folder of its own."""

    def __init__(self, folder: Path, site: str, https_port: int) -> None:
        folder.mkdir()
        (folder / "site.conf").write_text(site)
        (folder / "nginx.conf").write_text(NGINX_MAIN.format(folder=folder))
        self.error_log = folder / "error.log"
        self.popen = subprocess.Popen(
            [nginx_path(), "-p", str(folder), "-c", str(folder / "nginx.conf"),
             "-e", str(self.error_log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)  # its own process group: the workers go with it
        deadline = time.monotonic() + 10
        while not port_open(https_port):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"nginx did not start: {self.popen.stderr.read()}"
                                     f"{self.errors()}")
            time.sleep(0.02)

    def errors(self) -> str:
        return self.error_log.read_text() if self.error_log.exists() else ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class LoopThread:
    """An asyncio event loop in a thread of its own, for websockets' asyncio
    client.  Its sync client reads the socket in a thread of its own while
    the caller writes it, and Python's ssl module does not survive that on
    a TLS socket: now and then a handshake never leaves (seen here about
    once in twenty connections; python-engineio#461 is the same race)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout_s: float = 3 * WAIT_S):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def stop(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)
        self.loop.close()


class Socket:
    """A websockets asyncio client, used from synchronous code as its sync
    client would be: recv(timeout) raises TimeoutError or ConnectionClosed."""

    def __init__(self, clients: LoopThread, ws: ClientConnection) -> None:
        self.clients = clients
        self.ws = ws

    def recv(self, timeout: float) -> str:
        return self.clients.run(asyncio.wait_for(self.ws.recv(), timeout), timeout + WAIT_S)

    def send(self, text: str) -> None:
        self.clients.run(self.ws.send(text))

    def abort(self) -> None:
        self.clients.loop.call_soon_threadsafe(self.ws.transport.abort)


class Site:
    """chatserver.py --trust-proxy behind nginx with the recipe: the page at
    https://127.0.0.1:PORT/, its socket at wss://127.0.0.1:PORT/socket/."""

    def __init__(self, folder: Path, certificate: tuple[Path, Path], chat_args: tuple[str, ...],
                 time_scale: float) -> None:
        folder.mkdir()
        self.http_port, self.https_port = free_port(), free_port()
        self.origin = f"https://127.0.0.1:{self.https_port}"
        self.cert = certificate[0]
        self.tls = ssl.create_default_context(cafile=str(self.cert))
        self.chat = Process("--trust-proxy", "--allow-origin", self.origin, *chat_args)
        self.nginx: Nginx | None = None
        self.clients = LoopThread()
        self.sockets: list[Socket] = []
        try:
            site = adapted_site(NGINX_SITE.read_text(), http_port=self.http_port,
                                https_port=self.https_port, chat_port=self.chat.port,
                                cert=certificate[0], key=certificate[1], folder=folder,
                                time_scale=time_scale)
            self.nginx = Nginx(folder / "nginx", site, self.https_port)
        except BaseException:
            self.clients.stop()
            self.chat.kill()
            raise

    def dial(self, path: str, *, source: str = "127.0.0.1",
             headers: list[tuple[str, str]] | None = None) -> Socket:
        """A websockets client on wss://127.0.0.1:PORT/socket/PATH, from the
        loopback address `source`, with the page's Origin; it never pings, so
        that only the server's pings keep it alive."""
        async def opened() -> ClientConnection:
            return await connect(
                f"wss://127.0.0.1:{self.https_port}/socket/{path}", ssl=self.tls,
                origin=self.origin, additional_headers=headers, open_timeout=WAIT_S,
                close_timeout=1, ping_interval=None, local_addr=(source, 0))

        ws = self.clients.run(opened())
        self.sockets.append(Socket(self.clients, ws))
        return self.sockets[-1]

    def get(self, path: str, port: int | None = None) -> tuple[int, dict[str, str], str]:
        """GET over https (or plain http on `port`): status, headers, body."""
        if port is None:
            connection = http.client.HTTPSConnection("127.0.0.1", self.https_port,
                                                     timeout=WAIT_S, context=self.tls)
        else:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
        try:
            connection.request("GET", path)
            reply = connection.getresponse()
            return (reply.status, {k.lower(): v for k, v in reply.getheaders()},
                    reply.read().decode())
        finally:
            connection.close()

    def addresses(self, count: int) -> dict[str, str]:
        """{name: address} from the server's first `count` connect log lines."""
        deadline = time.monotonic() + WAIT_S
        while True:
            found = dict(re.findall(r"connect room=\S+ name=(\S+) address=(\S+)",
                                    self.chat.stderr()))
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def close(self) -> None:
        for ws in self.sockets:
            ws.abort()
        self.clients.stop()
        if self.nginx is not None:
            self.nginx.stop()
        self.chat.kill()


@pytest.fixture
def deployment(tmp_path, certificate):
    """Start the recipe: `deployment(*chatserver_flags, time_scale=1)`."""
    nginx_path()  # skip or fail before starting anything
    sites: list[Site] = []

    def start(*chat_args: str, time_scale: float = 1) -> Site:
        site = Site(tmp_path / f"site{len(sites)}", certificate, chat_args, time_scale)
        sites.append(site)
        return site

    yield start
    for site in sites:
        site.close()
    for site in sites:  # whatever the test did, nothing crashed
        assert "Traceback" not in site.chat.stderr(), site.chat.stderr()
        assert "[emerg]" not in site.nginx.errors() and "[alert]" not in site.nginx.errors()


def welcome(ws) -> dict:
    frame = json.loads(ws.recv(timeout=WAIT_S))
    assert frame["event"] == "welcome", frame
    return frame


def next_chat_line(ws) -> dict:
    deadline = time.monotonic() + WAIT_S
    while True:
        frame = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        if frame["type"] == "user":
            return frame


def refusal_status(attempt) -> int:
    with pytest.raises(InvalidStatus) as refusal:
        attempt()
    return refusal.value.response.status_code


# nginx ----------------------------------------------------------------------


def test_a_chromium_page_chats_over_wss_through_nginx_and_is_counted_by_its_own_address(
        browser, deployment):  # noqa: F811 (browser: the fixture imported above)
    site = deployment("--max-per-ip", "1")
    context = browser.new_context(ignore_https_errors=True)
    troubles: list[str] = []
    try:
        page = context.new_page()
        watch(page, troubles)
        alice = ChatPage(page)
        page.goto(f"{site.origin}/?room=deploy&name=alice")
        alice.wait_online()
        # The page found its socket through the meta tag nginx rewrote.
        assert alice.sockets[0].startswith(f"wss://127.0.0.1:{site.https_port}/socket/deploy?")

        # nginx reaches chatserver from 127.0.0.1 for everyone, and the page
        # came from 127.0.0.1 too: with --max-per-ip 1, bob (127.0.0.2) gets
        # in only if the server counts each client by its own address.
        bob = site.dial("deploy?name=bob", source="127.0.0.2")
        assert welcome(bob)["online"] == ["alice", "bob"]
        alice.say("hello bob, over wss")
        assert next_chat_line(bob)["message"] == "hello bob, over wss"
        bob.send("hello alice")
        expect(alice.chat_texts).to_have_text(["hello bob, over wss", "hello alice"])

        # A second connection from the browser's address is one too many.
        assert refusal_status(lambda: site.dial("deploy?name=again")) == 503
        assert site.addresses(2) == {"alice": "127.0.0.1", "bob": "127.0.0.2"}
    finally:
        context.close()
    assert troubles == []


def test_a_client_cannot_claim_another_address_with_its_own_x_forwarded_for(deployment):
    site = deployment("--max-per-ip", "1")
    welcome(site.dial("spoof?name=first", source="127.0.0.2"))
    # From 127.0.0.2 again, claiming to be 127.0.0.9: still 127.0.0.2, at its limit.
    assert refusal_status(lambda: site.dial(
        "spoof?name=liar", source="127.0.0.2",
        headers=[("X-Forwarded-For", "127.0.0.9")])) == 503
    # From 127.0.0.3, claiming to be 127.0.0.2 (twice, in two header lines):
    # counted as 127.0.0.3, so neither let in as someone else nor refused for them.
    welcome(site.dial("spoof?name=other", source="127.0.0.3",
                      headers=[("X-Forwarded-For", "127.0.0.2"),
                               ("X-Forwarded-For", "127.0.0.2")]))
    assert site.addresses(2) == {"first": "127.0.0.2", "other": "127.0.0.3"}


def test_an_idle_socket_outlives_nginx_timeouts_because_the_server_pings(deployment):
    """nginx closes a socket quiet for its proxy timeouts; chatserver pings a
    quiet client every --ping-interval, and the pong keeps it open."""
    ping_interval_s = float(flag_value(unit_command(), "--ping-interval")
                            or chatserver.PING_INTERVAL_S) / TIME_SCALE
    idle_s = 2 * proxy_timeout_s() / TIME_SCALE + 1
    site = deployment("--ping-interval", str(ping_interval_s), time_scale=TIME_SCALE)
    ws = site.dial("idle?name=quiet", source="127.0.0.2")
    welcome(ws)
    with pytest.raises(TimeoutError):  # nothing to read, and not closed, for idle_s
        while True:
            ws.recv(timeout=idle_s)  # (its own join notice first)
    ws.send("still here")
    assert next_chat_line(ws)["message"] == "still here"


def test_without_pings_nginx_closes_an_idle_socket_at_its_timeout(deployment):
    """The control for the test above: the scaled timeouts are in force."""
    timeout_s = proxy_timeout_s() / TIME_SCALE
    site = deployment("--ping-interval", "3600", time_scale=TIME_SCALE)
    ws = site.dial("idle?name=quiet", source="127.0.0.2")
    welcome(ws)
    start = time.monotonic()
    with pytest.raises(ConnectionClosed):
        while True:
            ws.recv(timeout=2 * timeout_s + 1)
    assert timeout_s - 0.2 < time.monotonic() - start < 2 * timeout_s + 1


def test_nginx_serves_the_page_with_its_socket_path_and_security_headers(deployment):
    site = deployment()
    status, headers, body = site.get("/")
    assert status == 200
    assert '<meta name="chat-server" content="/socket/">' in body
    assert headers["strict-transport-security"].startswith("max-age=")
    assert headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "connect-src 'self'" in headers["content-security-policy"]
    assert headers["cache-control"] == "no-cache"
    status, headers, body = site.get("/app.js")
    assert status == 200 and headers["content-type"] == "application/javascript"
    assert "function resolveSettings" in body
    status, headers, _ = site.get("/style.css")
    assert status == 200 and headers["content-type"] == "text/css"
    # Plain http is sent to https.
    status, headers, _ = site.get("/?room=r", port=site.http_port)
    assert status == 301 and headers["location"] == "https://127.0.0.1/?room=r"


def test_the_servers_own_http_pages_stay_off_the_public_socket_path(deployment):
    site = deployment()
    for path in ("/socket/metrics", "/socket/healthz", "/socket/lobby"):
        status, _, body = site.get(path)
        assert status == 426 and "chat_" not in body, (path, status, body)
    # ...while whoever runs the machine still reads them on chatserver's port.
    connection = http.client.HTTPConnection("127.0.0.1", site.chat.port, timeout=WAIT_S)
    connection.request("GET", "/metrics")
    assert "chat_connections" in connection.getresponse().read().decode()
    connection.close()
    # A room of that name still works through nginx.
    welcome(site.dial("metrics?name=m"))


# systemd --------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    """The unit's [Service] settings: {key: [values, in order]}."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_command() -> list[str]:
    (command,) = unit_settings()["ExecStart"]
    return shlex.split(command)


def flag_value(args: list[str], flag: str) -> str | None:
    """The last value given to `flag`, as argparse takes it."""
    values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag]
    return values[-1] if values else None


def seconds(value: str) -> float:
    """A systemd time span, in the forms the unit uses: 20, 20s, 1min, 500ms."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m)?", value)
    assert found, f"cannot read the time span {value!r}"
    return float(found.group(1)) * {"ms": 0.001, "min": 60, "m": 60}.get(found.group(2), 1)


def test_the_unit_runs_chatserver_as_its_own_user_sandboxed_with_its_store_under_var_lib():
    settings = unit_settings()
    args = unit_command()
    assert settings.get("DynamicUser") == ["yes"] or settings.get("User", ["root"])[-1] not in (
        "root", "0")
    state = settings["StateDirectory"][-1]
    assert (flag_value(args, "--store") or "").startswith(f"/var/lib/{state}/")
    assert settings["Restart"] == ["on-failure"]
    assert settings["KillSignal"] == ["SIGTERM"]
    shutdown_s = float(flag_value(args, "--shutdown-timeout") or chatserver.SHUTDOWN_TIMEOUT_S)
    assert seconds(settings["TimeoutStopSec"][-1]) >= 2 * shutdown_s  # and the store's commit
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("PrivateTmp", "yes")]:
        assert settings[key] == [value], key
    # X-Forwarded-For is believed only from nginx on this machine.
    assert "--trust-proxy" in args and flag_value(args, "--host") == "127.0.0.1"
    # ...where the nginx recipe looks for it.
    assert f"proxy_pass http://127.0.0.1:{flag_value(args, '--port')}/;" in NGINX_SITE.read_text()
    chatserver.parse_args(args[1:])  # every flag is chatserver's


def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path):
    """verify exits 0 even on an unknown key (it warns), so any output fails."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # optional: not installed by .ci/setup, skipped even in CI
        pytest.skip("systemd-analyze is not installed (Debian's systemd package)")
    args = unit_command()
    unit = UNIT.read_text()
    assert unit.count(args[0]) == 1
    # verify checks that the program exists: this machine's Python stands in.
    (tmp_path / UNIT.name).write_text(unit.replace(args[0], sys.executable))
    result = subprocess.run([analyze, "verify", str(tmp_path / UNIT.name)],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 0 and (result.stdout + result.stderr).strip() == "", result


def run_unit_command(store: Path) -> Process:
    """The unit's ExecStart as a process: this checkout's chatserver.py, a
    free port and `store` instead of /var/lib/...; everything else as written."""
    args = unit_command()[1:]
    args[args.index("--port") + 1] = "0"
    args[args.index("--store") + 1] = str(store)
    return Process(*args)


def test_the_units_command_serves_and_a_sigterm_restart_keeps_the_history(tmp_path):
    args = unit_command()
    origin = flag_value(args, "--allow-origin")
    timeout_s = seconds(unit_settings()["TimeoutStopSec"][-1])
    server = run_unit_command(tmp_path / "rooms.db")
    try:
        assert http_status(server.port, "/healthz") == 200
        with sync_connect(f"{server.url}/upgrade?name=ann", origin=origin,
                          open_timeout=WAIT_S) as ann:
            before = welcome(ann)
            ann.send("said before the upgrade")
            assert next_chat_line(ann)["seq"] == 1
            start = time.monotonic()
            assert server.terminate(timeout=timeout_s) == 0  # as `systemctl stop` does
            assert time.monotonic() - start < timeout_s
    finally:
        server.kill()
    server = run_unit_command(tmp_path / "rooms.db")
    try:
        with sync_connect(f"{server.url}/upgrade?name=ann", origin=origin,
                          open_timeout=WAIT_S) as ann:
            assert welcome(ann)["epoch"] == before["epoch"]
            line = next_chat_line(ann)
            assert (line["seq"], line["message"]) == (1, "said before the upgrade")
    finally:
        server.kill()


def http_status(port: int, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


# The container file ----------------------------------------------------------


def containerfile() -> dict[str, list[str]]:
    """{instruction: [arguments, in order]}, continuation lines joined."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    instructions: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.setdefault(word.upper(), []).append(rest.strip())
    return instructions


def exec_form(value: str) -> list[str]:
    command = json.loads(value)
    assert isinstance(command, list) and all(isinstance(part, str) for part in command)
    return command


def test_the_container_is_python_slim_runs_as_a_user_and_keeps_its_store_on_a_volume():
    image = containerfile()
    assert re.fullmatch(r"python:3\.\d+-slim", image["FROM"][0])
    assert image["USER"][-1] not in ("root", "0")
    (volume,) = image["VOLUME"]
    entrypoint = exec_form(image["ENTRYPOINT"][-1])
    assert entrypoint[0] == "chatserver"
    assert (flag_value(entrypoint, "--store") or "").startswith(volume.rstrip("/") + "/")
    chatserver.parse_args(entrypoint[1:])  # every flag is chatserver's
    # `pip install .` needs every module setup.cfg names and its README.
    copied = " ".join(image["COPY"]).split()
    setup = (ROOT / "setup.cfg").read_text()
    modules = re.search(r"py_modules = (.*)", setup).group(1).replace(",", " ").split()
    for needed in ["setup.cfg", "pyproject.toml", "README.md", *(m + ".py" for m in modules)]:
        assert needed in copied, needed


def test_the_containers_healthcheck_passes_on_a_serving_chatserver_and_fails_without(tmp_path):
    image = containerfile()
    healthcheck = image["HEALTHCHECK"][-1]
    command = exec_form(healthcheck[healthcheck.index("CMD ") + 4:])
    assert command[0] == "python" and command[-1].count("127.0.0.1:8765/healthz") == 1
    args = exec_form(image["ENTRYPOINT"][-1])[1:]
    args[args.index("--port") + 1] = "0"
    args[args.index("--store") + 1] = str(tmp_path / "rooms.db")
    server = Process(*args)

    def check() -> int:
        script = command[-1].replace("127.0.0.1:8765", f"127.0.0.1:{server.port}")
        return subprocess.run([sys.executable, *command[1:-1], script], capture_output=True,
                              timeout=30).returncode

    try:
        assert check() == 0
        assert server.terminate(timeout=10) == 0
        assert check() != 0
    finally:
        server.kill()
