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
- ingest: 2,000 clients in 1,000 rooms (2 each), all sending with acks=1
  ({"cid", "line"} frames) at an open-loop rate ladder; per step acked
  lines/s, unacked lines, errors, chat deliveries, p50/p99/max latency from
  send to ack, server CPU per acked line.  The result is the highest step
  with every line acked and delivered, no error, and p99 under 100 ms.
- rooms: many small rooms: 10,000 clients in 1,000 rooms of 10 (`--rooms`,
  `--room-size`), 2 senders in each (`--room-senders`), 64-byte lines at an
  open-loop rate ladder; per step what the fan-out gives, each line being
  due to every member of its room.  CPU per delivery is read at 20,000
  deliveries/s (`--rooms-reference`), a load every server sustains.  The
  servers take turns run by run.

The `store` server is chatserver with `--store` on a fresh SQLite file for
each run, in a directory on a real disk (not tmpfs): /tmp unless /tmp is a
tmpfs, then bench/build/; `--store-dir` chooses another.

It prints a table with ratios against each baseline, writes
bench/results/latest.json, and draws each ladder scenario that it ran as
docs/bench-SCENARIO.png (`--pictures DIR` elsewhere; with the `bench` extra's
matplotlib).  Needs gcc, zlib headers, node and npm (for the `ws` baseline),
and the `bench` extra (tornado, matplotlib).
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
FLOOR = BENCH / "build" / "floor"
PY = sys.executable

SERVERS = {
    "chatserver": ([PY, str(ROOT / "chatserver.py"), "--host", "127.0.0.1", "--port", "{port}",
                    "--rate", "1000000", "--burst", "1000000", "--max-clients", "50000",
                    "--max-per-ip", "50000", "--rooms-per-ip", "100000",
                    "--new-rooms-per-min", "1000000", "--log-level", "WARNING"], "/bench"),
    "tutorial": ([PY, str(BENCH / "baselines" / "tutorial_tornado.py"), "{port}"], "/soc"),
    "naive": ([PY, str(BENCH / "baselines" / "naive_websockets.py"), "{port}"], "/"),
    "node": (["node", str(BENCH / "baselines" / "node_ws_server.js"), "{port}"], "/"),
    # The kernel's own cost: a C epoll server, one read per line and one
    # write per member (baselines/floor.c).
    "floor": ([str(FLOOR), "{port}"], "/"),
}
# Scale-out: chatserver over a Redis server that run.py starts, a fresh one
# for each run (on core 0 too: the load generator keeps core 1 to itself).
# Its CPU is counted apart from the server's (broker_cpu_s in each step).
SERVERS["redis"] = (SERVERS["chatserver"][0] + ["--broker", "redis://127.0.0.1:{redis}/0"],
                    "/bench")
SERVERS["redis-workers2"] = (SERVERS["redis"][0] + ["--workers", "2"], "/bench")
# Two workers, each owning its rooms (no Redis), on the one core the others get.
SERVERS["workers2"] = (SERVERS["chatserver"][0] + ["--workers", "2"], "/bench")
# Durable: chatserver over a SQLite store, a fresh file for each run ({store}
# is replaced by a new directory; see store_parent()).
SERVERS["store"] = (SERVERS["chatserver"][0] + ["--store", "{store}/bench.db"], "/bench")
# The same on uvloop's event loop (the `uvloop` extra): what asyncio's costs.
SERVERS["uvloop"] = (SERVERS["chatserver"][0] + ["--uvloop"], "/bench")
CHATSERVERS = ("chatserver", "redis", "redis-workers2", "workers2", "store", "uvloop")
LABELS = {
    "redis": "chatserver `--broker` (Redis)",
    "redis-workers2": "chatserver `--broker --workers 2`",
    "workers2": "chatserver `--workers 2`",
    "store": "chatserver `--store` (SQLite)",
    "uvloop": "chatserver `--uvloop`",
    "chatserver": "chatserver",
    "tutorial": "tutorial Tornado",
    "naive": "naive `websockets`",
    "node": "Node `ws`",
    "floor": "C epoll floor",
}
BASELINES = ["tutorial", "naive", "node", "floor"]


def label(name: str) -> str:
    """How a server is named in tables (a result file may hold others, such
    as an older chatserver measured in the same run)."""
    return LABELS.get(name, name)
# The servers with a room per path (the tutorial's and the naive one have one
# room for all): those the rooms scenario measures.
ROOM_SERVERS = (*CHATSERVERS, "node", "floor")


def build() -> None:
    LOADGEN.parent.mkdir(exist_ok=True)
    for binary, source, libraries in ((LOADGEN, BENCH / "loadgen.c", ["-lz"]),
                                      (FLOOR, BENCH / "baselines" / "floor.c", [])):
        if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
            subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source),
                            *libraries], check=True)
    if not (BENCH / "node_modules" / "ws").exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=BENCH,
                       check=True)


def fs_type(path: str) -> str:
    """The type of the file system that holds `path` (ext4, tmpfs, ...)."""
    path, best, kind = os.path.realpath(path), "", "?"
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, point, fstype, *_ = line.split()
            point = point.replace("\\040", " ")
            if (path == point or path.startswith(point.rstrip("/") + "/")) \
                    and len(point) >= len(best):
                best, kind = point, fstype
    return kind


STORE_PARENT: list[str] = []


def store_parent() -> str:
    """Where the `store` variant's databases go: /tmp if it is on a disk,
    else bench/build/ (a tmpfs would make every fsync free)."""
    if not STORE_PARENT:
        parent = tempfile.gettempdir()
        if fs_type(parent) in ("tmpfs", "ramfs"):
            parent = str(LOADGEN.parent)
        STORE_PARENT.append(parent)
    return STORE_PARENT[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server under test, pinned to core 0."""

    def __init__(self, name: str) -> None:
        command, self.path = SERVERS[name]
        self.port = free_port()
        self.store_dir = None
        if any("{store}" in part for part in command):
            self.store_dir = tempfile.mkdtemp(prefix="chatbench-", dir=store_parent())
        self.redis = start_redis() if any("{redis}" in part for part in command) else None
        redis = str(self.redis[0]) if self.redis else ""
        command = [part.replace("{port}", str(self.port)).replace("{redis}", redis)
                   .replace("{store}", self.store_dir or "") for part in command]
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

    @property
    def cpu_pids(self) -> str:
        """What the load generator counts CPU for: the server's process tree,
        and apart from it the broker's (redis-server), if any."""
        return f"{self.pid},{self.redis[1].pid}" if self.redis else str(self.pid)

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
        if self.redis:
            self.redis[1].terminate()
            self.redis[1].wait(10)
            self.redis = None
        if self.store_dir:
            self.store_bytes = sum(f.stat().st_size for f in Path(self.store_dir).iterdir())
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self.store_dir = None


def start_redis() -> tuple[int, subprocess.Popen]:
    """Start a redis-server (persistence off): its port and its process."""
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
    return port, process


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
                       options.senders, 64, options.step, int(options.deflate), server.cpu_pids,
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


def ingest(name: str, options: argparse.Namespace) -> list[dict]:
    server = Server(name)
    try:
        return loadgen("ingest", "127.0.0.1", server.port, "/r", options.ingest_clients,
                       options.rooms, 64, options.step, int(options.deflate), server.pid,
                       *options.ingest_ladder)
    finally:
        server.stop()


def rooms(name: str, options: argparse.Namespace) -> list[dict]:
    server = Server(name)
    try:
        return loadgen("rooms", "127.0.0.1", server.port, "/r", options.rooms * options.room_size,
                       options.rooms, options.room_senders, 64, options.step,
                       int(options.deflate), server.cpu_pids, *options.rooms_ladder)
    finally:
        server.stop()


def ingest_ok(step: dict) -> bool:
    return (step["lost"] == 0 and step["errors"] == 0 and step["lost_deliveries"] == 0
            and 0 <= step["p99_ms"] < 100)


def summarize_ingest(runs: list[list[dict]], at: float) -> dict:
    best = [max((s for s in steps if ingest_ok(s)), key=lambda s: s["acks_per_s"],
                default=None) for steps in runs]
    near = [min(steps, key=lambda s: abs(s["rate"] - at)) if steps else None
            for steps in runs]
    cpu = [s["server_cpu_s"] / s["acked"] * 1e6 for s in near if s and s["acked"]]
    return {
        "max_acked_lines_per_s": statistics.median([b["acks_per_s"] if b else 0
                                                    for b in best]),
        "reference_rate": at,
        "cpu_us_per_line_at_reference": statistics.median(cpu) if cpu else None,
        "p50_ms_at_reference": statistics.median([s["p50_ms"] for s in near if s] or [-1]),
        "p99_ms_at_reference": statistics.median([s["p99_ms"] for s in near if s] or [-1]),
        "p99_ms_at_best": statistics.median([b["p99_ms"] for b in best if b] or [-1]),
        "loadgen_cpu_share_at_best": statistics.median(
            [b["loadgen_cpu_s"] / b["step_s"] for b in best if b] or [0]),
        "runs": runs,
    }


def best_step(steps: list[dict]) -> dict | None:
    good = [s for s in steps if s["lost"] == 0 and 0 <= s["p99_ms"] < 100]
    return max(good, key=lambda s: s["deliveries_per_s"]) if good else None


def step_at(steps: list[dict], deliveries: float) -> dict | None:
    """The step whose offered load is nearest `deliveries` per second."""
    if not steps:
        return None
    return min(steps, key=lambda s: abs(s["expected"] / s["step_s"] - deliveries))


def summarize(runs: list[list[dict]], clients: int, at: float = 100_000,
              suffix: str = "100k") -> dict:
    """A ladder scenario (fanout, rooms): the max sustained deliveries/s, and
    the CPU per delivery and latency at the step nearest `at` deliveries/s
    offered (keys ending in `suffix`); medians over the runs."""
    best = [best_step(steps) for steps in runs]
    near = [step_at(steps, at) for steps in runs]
    # CPU: every step offered within 10% of `at` (a ladder may repeat a rate,
    # to measure it several times); a run whose ladder ended below gives none.
    cpu = [s["server_cpu_s"] / s["received"] * 1e6 for steps in runs for s in steps
           if abs(s["expected"] / s["step_s"] - at) <= 0.1 * at and s["received"]]
    cpu_best = [b["server_cpu_s"] / b["received"] * 1e6 for b in best if b and b["received"]]
    # redis-server's own, for the redis variants (older result files lack it)
    broker = [s.get("broker_cpu_s", 0) / s["received"] * 1e6 for steps in runs for s in steps
              if abs(s["expected"] / s["step_s"] - at) <= 0.1 * at and s["received"]]
    return {
        "max_deliveries_per_s": statistics.median([b["deliveries_per_s"] if b else 0
                                                   for b in best]),
        "reference_deliveries_per_s": at,
        f"cpu_us_per_delivery_at_{suffix}": statistics.median(cpu) if cpu else None,
        f"broker_cpu_us_per_delivery_at_{suffix}": statistics.median(broker) if any(broker)
        else None,
        f"p99_ms_at_{suffix}": statistics.median([s["p99_ms"] for s in near if s] or [-1]),
        f"p50_ms_at_{suffix}": statistics.median([s["p50_ms"] for s in near if s] or [-1]),
        "cpu_us_per_delivery_at_best": statistics.median(cpu_best) if cpu_best else None,
        "loadgen_cpu_share_at_best": statistics.median(
            [b["loadgen_cpu_s"] / b["step_s"] for b in best if b] or [0]),
        "runs": runs,
    }


def summarize_rooms(runs: list[list[dict]], at: float) -> dict:
    return summarize(runs, 0, at, "reference")


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
            f"| {label(name)} | {f.get('max_deliveries_per_s', 0):,.0f} | "
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
    if not any(name in results["servers"] for name in BASELINES):
        lines = []
    for name in BASELINES:
        if name not in results["servers"]:
            continue
        theirs = results["servers"][name]
        lines.append(
            f"| {label(name)} | "
            f"{ratio(ours.get('fanout', {}).get('max_deliveries_per_s'), theirs.get('fanout', {}).get('max_deliveries_per_s'))} | "
            f"{ratio(ours.get('fanout', {}).get('cpu_us_per_delivery_at_100k'), theirs.get('fanout', {}).get('cpu_us_per_delivery_at_100k'))} | "
            f"{ratio((ours.get('idle_1000') or {}).get('kib_per_connection'), (theirs.get('idle_1000') or {}).get('kib_per_connection'))} |")
    if "store" in results["servers"] and "chatserver" in results["servers"]:
        lines += store_table(results)
    head = (f"{options.clients} clients in one room, {options.senders} senders, 64-byte "
            f"messages, permessage-deflate {'offered' if options.deflate else 'not offered'}; "
            f"medians of {options.repeat} runs; join storm: {options.storm} clients, "
            "time until all are welcomed / until every notice is delivered.")
    if not any("fanout" in r for r in results["servers"].values()):
        head, rows, lines = "", [], []  # no fan-out in this run
    return "\n".join([head, "", *rows, *lines, *rooms_table(results, options),
                      *ingest_table(results, options)]).strip()


def rooms_table(results: dict, options: argparse.Namespace) -> list[str]:
    """Many small rooms: each server, then chatserver against the others."""
    have = [n for n in results["servers"] if "rooms" in results["servers"][n]]
    if not have:
        return []
    at = options.rooms_reference
    rows = ["",
            (f"Small rooms: {options.rooms * options.room_size:,} clients in {options.rooms:,} "
             f"rooms of {options.room_size}, {options.room_senders} senders per room, 64-byte "
             f"lines; medians of {options.repeat} runs. Max sustained: nothing lost, p99 under "
             f"100 ms. CPU per delivery and latency read at {at:,} deliveries/s."),
            "",
            (f"| server | max sustained deliveries/s | CPU per delivery at {at:,}/s | "
             f"p50 / p99 at {at:,}/s | CPU per delivery at max | redis-server's CPU per "
             f"delivery at {at:,}/s |"),
            "|---|---|---|---|---|---|"]
    for name in have:
        r = results["servers"][name]["rooms"]
        cpu, top = r["cpu_us_per_delivery_at_reference"], r["cpu_us_per_delivery_at_best"]
        rows.append(f"| {label(name)} | {r['max_deliveries_per_s']:,.0f} | "
                    f"{f'{cpu:.2f} us' if cpu else 'n/a'} | {r['p50_ms_at_reference']:.1f} / "
                    f"{r['p99_ms_at_reference']:.1f} ms | {f'{top:.2f} us' if top else 'n/a'} | "
                    f"{broker_cell(r.get('broker_cpu_us_per_delivery_at_reference'))} |")
    mine = [n for n in have if n not in BASELINES]
    others = [n for n in have if n in BASELINES]
    if mine and others:
        rows += ["", "Against each baseline, same run (throughput: higher is better; CPU: "
                 "lower is better):", "",
                 "| server | against | max sustained | CPU per delivery at reference |",
                 "|---|---|---|---|"]
        for name in mine:
            ours = results["servers"][name]["rooms"]
            for other in others:
                theirs = results["servers"][other]["rooms"]
                rows.append(
                    f"| {label(name)} | {label(other)} | "
                    f"{ratio(ours['max_deliveries_per_s'], theirs['max_deliveries_per_s'])} | "
                    f"{ratio(ours['cpu_us_per_delivery_at_reference'], theirs['cpu_us_per_delivery_at_reference'])} |")
    return rows


def broker_cell(us: float | None) -> str:
    return f"{us:.2f} us" if us else ""


def store_table(results: dict) -> list[str]:
    """`--store` against in memory, measured in the same run."""
    mem = results["servers"]["chatserver"].get("fanout")
    disk = results["servers"]["store"].get("fanout")
    if not mem or not disk:
        return []
    p99 = (disk["p99_ms_at_100k"] - mem["p99_ms_at_100k"]
           if disk["p99_ms_at_100k"] is not None and mem["p99_ms_at_100k"] is not None
           else float("nan"))
    return ["", "Fan-out, `--store` against in memory (same run):", "",
            "| | max sustained | CPU per delivery at 100k/s | p99 at 100k/s |",
            "|---|---|---|---|",
            (f"| store / in memory | "
             f"{ratio(disk['max_deliveries_per_s'], mem['max_deliveries_per_s'])} | "
             f"{ratio(disk['cpu_us_per_delivery_at_100k'], mem['cpu_us_per_delivery_at_100k'])}"
             f" | {p99:+.1f} ms |")]


def ingest_table(results: dict, options: argparse.Namespace) -> list[str]:
    have = [n for n in results["servers"] if "ingest" in results["servers"][n]]
    if not have:
        return []
    at = options.ingest_reference
    rows = ["",
            (f"Ingest: {options.ingest_clients} clients in {options.rooms} rooms, all "
             "sending acknowledged lines (acks=1, 64-byte lines); medians of "
             f"{options.repeat} runs. Max sustained: every line acked and delivered, no "
             f"error, p99 send-to-ack under 100 ms. CPU and latency read at {at:,} lines/s."),
            "",
            (f"| server | max sustained acked lines/s | CPU per line at {at:,}/s | "
             f"p50 / p99 at {at:,}/s | p99 at max |"),
            "|---|---|---|---|---|"]
    for name in have:
        r = results["servers"][name]["ingest"]
        cpu = r["cpu_us_per_line_at_reference"]
        rows.append(f"| {label(name)} | {r['max_acked_lines_per_s']:,.0f} | "
                    f"{f'{cpu:.1f} us' if cpu else 'n/a'} | {r['p50_ms_at_reference']:.1f} / "
                    f"{r['p99_ms_at_reference']:.1f} ms | {r['p99_ms_at_best']:.1f} ms |")
    if "store" in have and "chatserver" in have:
        mem, disk = (results["servers"][n]["ingest"] for n in ("chatserver", "store"))
        rows.append(f"| store / in memory | "
                    f"{ratio(disk['max_acked_lines_per_s'], mem['max_acked_lines_per_s'])} | "
                    f"{ratio(disk['cpu_us_per_line_at_reference'], mem['cpu_us_per_line_at_reference'])}"
                    " | | |")
    return rows


def draw(results: dict, directory: Path) -> list[Path]:
    """One picture per ladder scenario in `results`: load offered against
    load carried, p99 latency and CPU per delivery, one line per server
    (medians over the runs at each step).  Needs matplotlib (the `bench`
    extra); without it, draws nothing and says so."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no pictures: pip install -e '.[bench]' for matplotlib", file=sys.stderr)
        return []
    options = results["options"]
    scenarios = {
        "fanout": ("deliveries/s", lambda s: s["expected"] / s["step_s"],
                   lambda s: s["received"] / s["step_s"], "received",
                   f"Fan-out: {options['clients']:,} clients in one room, "
                   f"{options['senders']} senders"),
        "rooms": ("deliveries/s", lambda s: s["expected"] / s["step_s"],
                  lambda s: s["received"] / s["step_s"], "received",
                  f"Small rooms: {options['rooms'] * options.get('room_size', 10):,} clients in "
                  f"{options['rooms']:,} rooms of {options.get('room_size', 10)}, "
                  f"{options.get('room_senders', 2)} senders each"),
        "ingest": ("acked lines/s", lambda s: s["sent"] / s["step_s"],
                   lambda s: s["acked"] / s["step_s"], "acked",
                   f"Ingest: {options['ingest_clients']:,} clients in {options['rooms']:,} "
                   "rooms, acks=1"),
    }
    drawn = []
    for scenario, (unit, offered, carried, count, title) in scenarios.items():
        servers = {name: entry[scenario]["runs"] for name, entry in results["servers"].items()
                   if scenario in entry}
        if not servers:
            continue
        figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.6))
        for name, runs in servers.items():
            by_rate: dict[float, list[dict]] = {}
            for steps in runs:
                for step in steps:
                    by_rate.setdefault(step["rate"], []).append(step)
            rates = sorted(by_rate)
            med = {key: [statistics.median(get(s) for s in by_rate[r]) for r in rates]
                   for key, get in (("offered", offered), ("carried", carried),
                                    ("p99", lambda s: max(s["p99_ms"], 0.01)),
                                    ("cpu", lambda s: s["server_cpu_s"] / s[count] * 1e6
                                     if s[count] else float("nan")))}
            legend = label(name).replace("`", "")
            left.plot(med["offered"], med["carried"], marker="o", label=legend)
            middle.plot(med["offered"], med["p99"], marker="o", label=legend)
            right.plot(med["offered"], med["cpu"], marker="o", label=legend)
        top = max(max(offered(s) for steps in runs for s in steps)
                  for runs in servers.values() if any(runs))
        left.plot([0, top], [0, top], color="grey", linestyle=":", label="all carried")
        middle.axhline(100, color="grey", linestyle=":", label="100 ms")
        for axes, ylabel in ((left, f"{unit} carried"), (middle, "p99 latency (ms)"),
                             (right, "server CPU per " + ("line" if scenario == "ingest"
                                                          else "delivery") + " (us)")):
            axes.set_xscale("log")
            axes.set_xlabel(f"{unit} offered")
            axes.set_ylabel(ylabel)
            axes.grid(True, which="both", alpha=0.3)
        left.set_yscale("log")
        middle.set_yscale("log")
        right.set_ylim(bottom=0)
        left.legend(fontsize="small")
        figure.suptitle(f"{title}; medians of {options['repeat']} runs; server on one core")
        figure.tight_layout()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"bench-{scenario}.png"
        figure.savefig(path, dpi=80)
        plt.close(figure)
        drawn.append(path)
    return drawn


def report_again(path: Path, reference: int, pictures: str | None) -> None:
    """Summarize a result file's runs again, print its table, and draw its
    pictures if `pictures` names a directory."""
    results = json.loads(path.read_text())
    options = argparse.Namespace(**results["options"])
    options.ingest_reference = reference
    for entry in results["servers"].values():
        if "fanout" in entry:
            entry["fanout"] = summarize(entry["fanout"]["runs"], options.clients)
        if "ingest" in entry:
            entry["ingest"] = summarize_ingest(entry["ingest"]["runs"], reference)
        if "rooms" in entry:
            entry["rooms"] = summarize_rooms(entry["rooms"]["runs"], options.rooms_reference)
    results["options"]["ingest_reference"] = reference
    results["table"] = table(results, options)
    path.write_text(json.dumps(results, indent=1))
    print(results["table"])
    for drawn in draw(results, Path(pictures)) if pictures else []:
        print(f"drew {drawn}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--servers", default="chatserver,tutorial,naive,node",
                        help="any of chatserver, tutorial, naive, node, floor, uvloop, redis, "
                        "redis-workers2, workers2, store")
    parser.add_argument("--scenarios", default="fanout,idle,storm",
                        help="any of fanout, idle, storm, ingest, rooms")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--step", type=float, default=2.0, help="seconds per ladder step")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--storm", type=int, default=5000, help="clients in the join storm")
    parser.add_argument("--no-deflate", dest="deflate", action="store_false",
                        help="clients do not offer permessage-deflate")
    parser.add_argument("--ladder", help="messages/s per step, comma-separated "
                        "(default 20,50,...,12800)")
    parser.add_argument("--rooms", type=int, default=1000,
                        help="rooms in the ingest and the rooms scenario")
    parser.add_argument("--room-size", type=int, default=10,
                        help="clients per room in the rooms scenario")
    parser.add_argument("--room-senders", type=int, default=2,
                        help="senders per room in the rooms scenario")
    parser.add_argument("--rooms-ladder", help="lines/s per step of the rooms scenario, "
                        "comma-separated (default 500,1000,2000,3000,...,30000)")
    parser.add_argument("--rooms-reference", type=int, default=20000,
                        help="deliveries/s at which the rooms scenario's CPU and latency "
                        "are read")
    parser.add_argument("--pictures", help="where the pictures go (default docs/, none "
                        "with --quick; '' for none)")
    parser.add_argument("--ingest-clients", type=int, default=2000,
                        help="senders in the ingest, spread over --rooms")
    parser.add_argument("--ingest-ladder", help="acknowledged lines/s per ingest step, "
                        "comma-separated (default 1000,2000,3000,4000,5000,7500,10000,...,50000)")
    parser.add_argument("--ingest-reference", type=int, default=2000,
                        help="lines/s at which the ingest's CPU and latency are read")
    parser.add_argument("--store-dir", help="where the store variant's databases go "
                        "(default: /tmp, or bench/build/ if /tmp is a tmpfs)")
    parser.add_argument("--chatserver-flags", default="",
                        help='more flags for chatserver, e.g. "--batch-window 10"')
    parser.add_argument("--output", default=str(BENCH / "results" / "latest.json"))
    parser.add_argument("--report", metavar="JSON",
                        help="measure nothing: summarize the runs in JSON again (with this "
                        "--ingest-reference) and print its table")
    options = parser.parse_args()
    if options.report:
        report_again(Path(options.report), options.ingest_reference, options.pictures)
        return
    ladder = [20, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800]
    idle_sizes = [1000, 10000]
    if options.quick:
        options.clients, options.step, options.repeat = 200, 1.0, 1
        ladder, options.storm, idle_sizes = [50, 400, 1600], 1000, [1000]
    options.ladder = [int(r) for r in options.ladder.split(",")] if options.ladder else ladder
    ingest_ladder = [1000, 2000, 3000, 4000, 5000, 7500, 10000, 12500, 15000, 17500, 20000,
                     22500, 25000, 30000, 40000, 50000]
    if options.quick:
        options.rooms, options.ingest_clients = 100, 200
        ingest_ladder, options.ingest_reference = [500, 2000, 8000], 2000
    options.ingest_ladder = ([int(r) for r in options.ingest_ladder.split(",")]
                             if options.ingest_ladder else ingest_ladder)
    rooms_ladder = [500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 10000, 12500, 15000,
                    20000, 25000, 30000]
    if options.quick:
        rooms_ladder = [100, 500, 2000]
    options.rooms_ladder = ([int(r) for r in options.rooms_ladder.split(",")]
                            if options.rooms_ladder else rooms_ladder)
    if options.store_dir:
        STORE_PARENT.append(options.store_dir)
    build()
    for name in CHATSERVERS:
        SERVERS[name][0].extend(options.chatserver_flags.split())
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "node": shutil.which("node") and subprocess.run(
                               ["node", "--version"], capture_output=True, text=True).stdout.strip()},
               "options": {k: v for k, v in vars(options).items()},
               "store_dir": store_parent() if "store" in options.servers.split(",") else None,
               "store_dir_fs": (fs_type(store_parent())
                                if "store" in options.servers.split(",") else None),
               "servers": {}}
    scenarios = options.scenarios.split(",")
    room_runs: dict[str, list[list[dict]]] = {}
    if "rooms" in scenarios:
        # The servers take turns, run by run: a neighbour's burst of work on
        # this shared machine then spoils one run of several servers, not
        # every run of one.
        room_runs = {n: [] for n in options.servers.split(",") if n in ROOM_SERVERS}
        for _ in range(options.repeat):
            for name, runs in room_runs.items():
                runs.append(rooms(name, options))
                print(f"{name}: rooms run {len(runs)} done", flush=True)
    for name in options.servers.split(","):
        entry = results["servers"][name] = {}
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
        if name in room_runs:
            entry["rooms"] = summarize_rooms(room_runs[name], options.rooms_reference)
            print(f"{name}: rooms {entry['rooms']['max_deliveries_per_s']:,.0f} deliveries/s",
                  flush=True)
        if "ingest" in scenarios and name in CHATSERVERS:
            runs = [ingest(name, options) for _ in range(options.repeat)]
            entry["ingest"] = summarize_ingest(runs, options.ingest_reference)
            print(f"{name}: ingest {entry['ingest']['max_acked_lines_per_s']:,.0f} acked "
                  "lines/s", flush=True)
    report = table(results, options)
    results["table"] = report
    Path(options.output).parent.mkdir(exist_ok=True)
    Path(options.output).write_text(json.dumps(results, indent=1))
    print()
    print(report)
    if options.pictures is None and not options.quick:
        options.pictures = str(ROOT / "docs")
    if options.pictures:
        for path in draw(results, Path(options.pictures)):
            print(f"drew {path}")


if __name__ == "__main__":
    main()
