"""The fan-out benchmark: chatserver against the tutorial's Tornado server,
the same naive logic on `websockets`, and a Node `ws` server, in one run.

    python bench/run.py            # the full run (about 15 minutes)
    python bench/run.py --quick    # a smoke run (about 2 minutes)

Each server runs pinned to core 0 (`taskset -c 0`), the C load generator
(bench/loadgen.c, built here with gcc) on core 1.  Scenarios:

- fanout: C clients in one room, S of them sending 64-byte messages at an
  open-loop rate ladder; per step deliveries/s, lost frames, p50/p99/max
  latency, server CPU per delivery (/proc/PID/stat) and the load
  generator's own CPU.  The result is the highest step with nothing lost and
  p99 under 100 ms.
- idle: N idle connections; server RSS before and after, KiB per connection.
- storm: N clients join one room at once; time until every one is welcomed
  and until the room is quiet again (every notice delivered).

It prints a table with ratios against each baseline and writes
bench/results/latest.json.  Needs gcc, zlib headers, node and npm (for the
`ws` baseline), and the `bench` extra (tornado).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LOADGEN = BENCH / "build" / "loadgen"
PY = sys.executable

SERVERS = {
    "chatserver": ([PY, str(ROOT / "chatserver.py"), "--host", "127.0.0.1", "--port", "{port}",
                    "--rate", "1000000", "--burst", "1000000", "--max-clients", "50000",
                    "--max-per-ip", "50000", "--log-level", "WARNING"], "/bench"),
    "tutorial": ([PY, str(BENCH / "baselines" / "tutorial_tornado.py"), "{port}"], "/soc"),
    "naive": ([PY, str(BENCH / "baselines" / "naive_websockets.py"), "{port}"], "/"),
    "node": (["node", str(BENCH / "baselines" / "node_ws_server.js"), "{port}"], "/"),
}
# Scale-out: chatserver over a Redis server that run.py starts (on core 0
# too: the load generator keeps core 1 to itself).
SERVERS["redis"] = (SERVERS["chatserver"][0] + ["--broker", "redis://127.0.0.1:{redis}/0"],
                    "/bench")
SERVERS["redis-workers2"] = (SERVERS["redis"][0] + ["--workers", "2"], "/bench")
LABELS = {
    "redis": "chatserver `--broker` (Redis)",
    "redis-workers2": "chatserver `--broker --workers 2`",
    "chatserver": "chatserver",
    "tutorial": "tutorial Tornado",
    "naive": "naive `websockets`",
    "node": "Node `ws`",
}
BASELINES = ["tutorial", "naive", "node"]


def build() -> None:
    LOADGEN.parent.mkdir(exist_ok=True)
    source = BENCH / "loadgen.c"
    if not LOADGEN.exists() or LOADGEN.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(LOADGEN), str(source), "-lz"],
                       check=True)
    if not (BENCH / "node_modules" / "ws").exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=BENCH,
                       check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server under test, pinned to core 0."""

    def __init__(self, name: str) -> None:
        command, self.path = SERVERS[name]
        self.port = free_port()
        command = [part.replace("{port}", str(self.port))
                   .replace("{redis}", str(redis_port())) for part in command]
        self.errors = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(["taskset", "-c", "0", *command],
                                        stdout=subprocess.DEVNULL, stderr=self.errors,
                                        preexec_fn=raise_fd_limit)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    self.errors.seek(0)
                    said = self.errors.read()[-2000:]
                    raise RuntimeError(f"{name} did not start (missing `pip install -e "
                                       f"'.[bench]'`, node or redis-server?):\n{said}")
                time.sleep(0.05)
        time.sleep(0.3)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_redis: list = []


def redis_port() -> int:
    """Start one redis-server for the run (persistence off), once."""
    if not _redis:
        port = free_port()
        process = subprocess.Popen(["taskset", "-c", "0", "redis-server", "--port", str(port),
                                    "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                   stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
        _redis.extend([port, process])
    return _redis[0]


def raise_fd_limit() -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def loadgen(*args: object, timeout: float = 600) -> list[dict]:
    result = subprocess.run(["taskset", "-c", "1", str(LOADGEN), *map(str, args)],
                            capture_output=True, text=True, timeout=timeout,
                            preexec_fn=raise_fd_limit)
    if result.returncode != 0:
        raise RuntimeError(f"loadgen {args[0]} failed: {result.stderr.strip()}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


# Scenarios


def fanout(name: str, options: argparse.Namespace) -> list[dict]:
    server = Server(name)
    try:
        return loadgen("fanout", "127.0.0.1", server.port, server.path, options.clients,
                       options.senders, 64, options.step, int(options.deflate), server.pid,
                       *options.ladder)
    finally:
        server.stop()


def idle(name: str, clients: int, options: argparse.Namespace) -> dict:
    server = Server(name)
    try:
        before = server.rss_kib()
        generator = subprocess.Popen(
            ["taskset", "-c", "1", str(LOADGEN), "idle", "127.0.0.1", str(server.port),
             server.path, str(clients), str(int(options.deflate))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=raise_fd_limit)
        line = generator.stdout.readline()
        after = server.rss_kib()
        generator.stdin.close()
        generator.wait(30)
        if not line.startswith("{"):
            raise RuntimeError(f"idle {name}: {generator.stderr.read().strip()}")
        return {"clients": clients, "rss_before_kib": before, "rss_after_kib": after,
                "kib_per_connection": round((after - before) / clients, 2)}
    finally:
        server.stop()


def storm(name: str, clients: int, options: argparse.Namespace) -> dict:
    server = Server(name)
    try:
        before = server.rss_kib()
        [result] = loadgen("storm", "127.0.0.1", server.port, server.path, clients,
                           int(options.deflate))
        result["rss_before_kib"], result["rss_after_kib"] = before, server.rss_kib()
        return result
    finally:
        server.stop()


def best_step(steps: list[dict]) -> dict | None:
    good = [s for s in steps if s["lost"] == 0 and 0 <= s["p99_ms"] < 100]
    return max(good, key=lambda s: s["deliveries_per_s"]) if good else None


def step_at(steps: list[dict], deliveries: float) -> dict | None:
    """The step whose offered load is nearest `deliveries` per second."""
    if not steps:
        return None
    return min(steps, key=lambda s: abs(s["expected"] / s["step_s"] - deliveries))


def summarize(runs: list[list[dict]], clients: int) -> dict:
    best = [best_step(steps) for steps in runs]
    at_100k = [step_at(steps, 100_000) for steps in runs]
    cpu = [s["server_cpu_s"] / s["received"] * 1e6 for s in at_100k if s and s["received"]]
    return {
        "max_deliveries_per_s": statistics.median([b["deliveries_per_s"] if b else 0
                                                   for b in best]),
        "cpu_us_per_delivery_at_100k": statistics.median(cpu) if cpu else None,
        "p99_ms_at_100k": statistics.median([s["p99_ms"] for s in at_100k if s]),
        "p50_ms_at_100k": statistics.median([s["p50_ms"] for s in at_100k if s]),
        "loadgen_cpu_share_at_best": statistics.median(
            [b["loadgen_cpu_s"] / b["step_s"] for b in best if b] or [0]),
        "runs": runs,
    }


# Report


def ratio(ours: float | None, theirs: float | None) -> str:
    if not ours or not theirs:
        return "n/a"
    return f"{ours / theirs:.2f}x"


def table(results: dict, options: argparse.Namespace) -> str:
    rows = ["| server | max sustained deliveries/s | CPU per delivery at 100k/s | "
            "p99 at 100k/s | RSS per idle connection (1k / 10k) | join storm |",
            "|---|---|---|---|---|---|"]
    for name in results["servers"]:
        r = results["servers"][name]
        f, idle1, idle10, st = (r.get("fanout", {}), r.get("idle_1000"), r.get("idle_10000"),
                                r.get("storm"))
        cpu = f.get("cpu_us_per_delivery_at_100k")
        rows.append(
            f"| {LABELS[name]} | {f.get('max_deliveries_per_s', 0):,.0f} | "
            f"{f'{cpu:.2f} us' if cpu else 'n/a'} | "
            f"{f.get('p99_ms_at_100k', float('nan')):.1f} ms | "
            f"{idle1['kib_per_connection'] if idle1 else 'n/a'} / "
            f"{idle10['kib_per_connection'] if idle10 else 'n/a'} KiB | "
            f"{f'''{st['welcomed_s']:.2f} s / {st['settled_s']:.2f} s''' if st else 'n/a'} |")
    ours = results["servers"].get("chatserver", {})
    lines = ["", "Ratios, chatserver against each baseline (throughput: higher is better; "
             "CPU and memory: lower is better):", "",
             "| baseline | throughput | CPU per delivery | RSS per idle connection (1k) |",
             "|---|---|---|---|"]
    for name in BASELINES:
        if name not in results["servers"]:
            continue
        theirs = results["servers"][name]
        lines.append(
            f"| {LABELS[name]} | "
            f"{ratio(ours.get('fanout', {}).get('max_deliveries_per_s'), theirs.get('fanout', {}).get('max_deliveries_per_s'))} | "
            f"{ratio(ours.get('fanout', {}).get('cpu_us_per_delivery_at_100k'), theirs.get('fanout', {}).get('cpu_us_per_delivery_at_100k'))} | "
            f"{ratio((ours.get('idle_1000') or {}).get('kib_per_connection'), (theirs.get('idle_1000') or {}).get('kib_per_connection'))} |")
    head = (f"{options.clients} clients in one room, {options.senders} senders, 64-byte "
            f"messages, permessage-deflate {'offered' if options.deflate else 'not offered'}; "
            f"medians of {options.repeat} runs; join storm: {options.storm} clients, "
            "time until all are welcomed / until every notice is delivered.")
    return "\n".join([head, "", *rows, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--servers", default="chatserver,tutorial,naive,node",
                        help="any of chatserver, tutorial, naive, node, redis, redis-workers2")
    parser.add_argument("--scenarios", default="fanout,idle,storm")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--step", type=float, default=2.0, help="seconds per ladder step")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--storm", type=int, default=5000, help="clients in the join storm")
    parser.add_argument("--no-deflate", dest="deflate", action="store_false",
                        help="clients do not offer permessage-deflate")
    parser.add_argument("--ladder", help="messages/s per step, comma-separated "
                        "(default 20,50,...,12800)")
    parser.add_argument("--chatserver-flags", default="",
                        help='more flags for chatserver, e.g. "--batch-window 10"')
    parser.add_argument("--output", default=str(BENCH / "results" / "latest.json"))
    options = parser.parse_args()
    ladder = [20, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800]
    idle_sizes = [1000, 10000]
    if options.quick:
        options.clients, options.step, options.repeat = 200, 1.0, 1
        ladder, options.storm, idle_sizes = [50, 400, 1600], 1000, [1000]
    options.ladder = [int(r) for r in options.ladder.split(",")] if options.ladder else ladder
    build()
    for name in ("chatserver", "redis", "redis-workers2"):
        SERVERS[name][0].extend(options.chatserver_flags.split())
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "node": shutil.which("node") and subprocess.run(
                               ["node", "--version"], capture_output=True, text=True).stdout.strip()},
               "options": {k: v for k, v in vars(options).items()},
               "servers": {}}
    for name in options.servers.split(","):
        entry = results["servers"][name] = {}
        scenarios = options.scenarios.split(",")
        if "fanout" in scenarios:
            runs = [fanout(name, options) for _ in range(options.repeat)]
            entry["fanout"] = summarize(runs, options.clients)
            print(f"{name}: fanout {entry['fanout']['max_deliveries_per_s']:,.0f} deliveries/s",
                  flush=True)
        if "idle" in scenarios:
            # The baselines send every join to everyone: 10,000 joins would be
            # 50 million frames, so they are measured at 1,000 only.
            for size in idle_sizes if name == "chatserver" else idle_sizes[:1]:
                entry[f"idle_{size}"] = idle(name, size, options)
                print(f"{name}: idle {size}: {entry[f'idle_{size}']['kib_per_connection']} KiB",
                      flush=True)
        if "storm" in scenarios and name == "chatserver":
            entry["storm"] = storm(name, options.storm, options)
            print(f"{name}: storm {entry['storm']}", flush=True)
    if _redis:
        _redis[1].terminate()
    report = table(results, options)
    results["table"] = report
    Path(options.output).parent.mkdir(exist_ok=True)
    Path(options.output).write_text(json.dumps(results, indent=1))
    print()
    print(report)


if __name__ == "__main__":
    main()
