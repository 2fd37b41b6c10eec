"""Worker scaling: the platform's throughput with 1..N uvicorn workers, each held to its own share of a core.

    make bench-scaling      # python bench/scaling.py      ~2 minutes, updates docs/performance.md

"With the production server's several workers, throughput scales with cores" cannot be shown by simply
adding workers on a 2-core machine: the load generator and the mock need those cores too, so the machine,
not the platform, is the limit (measured: 1 worker 8,816 req/s, 2 workers 8,151 req/s). This benchmark
emulates a many-core host instead. Every uvicorn worker is moved into its own CPU cgroup with a quota of
`--core-share` of a core (default 0.25): N workers are N small cores. With the workers' quotas adding up to
less than the machine minus what the mock and wrk need, the platform's quota is the only limit, so the
throughput at N workers divided by the throughput at 1 worker says how the platform scales with cores. The
report shows the evidence for that: each worker's throttled share of the CFS periods (near 100 %: it used
its whole quota) and the machine's idle cores (left over: the machine was not the limit).

Everything else is as in bench/run.py: the platform is started as a user would (migrate, setup_platform, an
unlimited API key, the production server of `make serve`: llm_platform/serve.py), the load is non-streaming
chat at concurrency 64 from wrk, and the mock's request counter must equal what wrk sent and got answered.
Redis is used as in production (`REDIS_URL`: runtime state, channel layer) when it answers; `--no-redis` runs
without it.

Needs root and a writable CPU cgroup (cgroup v1 `cpu` controller or cgroup v2 with `cpu` enabled); without
them it says so and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` importable when run as a script

from bench.run import (
    DOCS,
    RESULTS,
    Scenario,
    Stack,
    client_failures,
    cpu_seconds,
    ensure_wrk,
    git_info,
    log,
    process_tree,
    run_wrk,
    system_busy_s,
    update_docs,
)

DOC_START = "<!-- bench:scaling:start -->"
DOC_END = "<!-- bench:scaling:end -->"
CFS_PERIOD_US = 100_000
CPUS = len(os.sched_getaffinity(0))
C64 = Scenario("chat c64", "chat", 64, {"token_delay_s": 0.0})


# --- CPU cgroups ------------------------------------------------------------------------------------------------


class CpuGroups:
    """One CPU cgroup per worker with a CFS quota, under a parent removed at the end (cgroup v1 or v2)."""

    def __init__(self, share: float) -> None:
        self.share = share
        v1 = Path("/sys/fs/cgroup/cpu")
        if (v1 / "cpu.cfs_quota_us").exists():
            self.version, root = 1, v1
        elif "cpu" in _read(Path("/sys/fs/cgroup/cgroup.controllers")).split():
            self.version, root = 2, Path("/sys/fs/cgroup")
        else:
            raise SystemExit("no CPU cgroup controller is available here: this benchmark cannot run")
        self.parent = root / f"llm-bench-scaling-{os.getpid()}"
        try:
            self.parent.mkdir()
            if self.version == 2:
                (self.parent / "cgroup.subtree_control").write_text("+cpu")
        except OSError as exc:
            raise SystemExit(f"cannot create a CPU cgroup under {root} ({exc}): run as root") from exc
        self.groups: list[Path] = []

    def limit(self, pids: list[int]) -> None:
        """Move each process into its own group with `share` of a core."""
        quota = int(self.share * CFS_PERIOD_US)
        for pid in pids:
            group = self.parent / f"worker-{len(self.groups)}"
            group.mkdir()
            self.groups.append(group)
            if self.version == 1:
                (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (group / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
            (group / "cgroup.procs").write_text(str(pid))

    def stats(self) -> list[dict[str, int]]:
        """Per group: CFS periods and throttled periods so far."""
        out = []
        for group in self.groups:
            fields = dict(line.split() for line in _read(group / "cpu.stat").splitlines() if line.strip())
            out.append({"periods": int(fields.get("nr_periods", 0)), "throttled": int(fields.get("nr_throttled", 0))})
        return out

    def release(self) -> None:
        """Move what is left back to the root group and remove every group under the parent, then the parent."""
        root_procs = self.parent.parent / "cgroup.procs"
        children = [path for path in self.parent.iterdir() if path.is_dir()]  # not only those we recorded
        for group in [*children, self.parent]:
            for pid in _read(group / "cgroup.procs").split():
                with contextlib.suppress(OSError):
                    root_procs.write_text(pid)
        for group in [*children, self.parent]:
            with contextlib.suppress(OSError):
                group.rmdir()
        self.groups = []


def _read(path: Path) -> str:
    """A file's text, or "" when it cannot be read."""
    try:
        return path.read_text()
    except OSError:
        return ""


# --- one configuration --------------------------------------------------------------------------------------------


@dataclass
class Config:
    """A row of the table: a number of workers, each limited to a share of a core or not."""

    workers: int
    share: float | None  # None: no quota (the workers spread over the machine)
    shared_socket: bool = False  # uvicorn's own supervisor instead of one SO_REUSEPORT socket per worker

    @property
    def label(self) -> str:
        """How the row is named in the table."""
        cores = "no quota" if self.share is None else f"{self.workers} × {self.share:g} core"
        server = ", shared socket" if self.shared_socket and self.workers > 1 else ""
        return f"{self.workers} worker{'s' if self.workers > 1 else ''}, {cores}{server}"


def worker_pids(stack: Stack, workers: int, timeout_s: float = 30.0) -> list[int]:
    """The uvicorn worker processes (the supervisor's children that serve), once all of them exist."""
    assert stack.web is not None
    deadline = time.monotonic() + timeout_s
    while True:
        if workers == 1:
            return [stack.web.pid]
        kids = [
            pid
            for pid in process_tree(stack.web.pid)
            if pid != stack.web.pid and "resource_tracker" not in _read(Path(f"/proc/{pid}/cmdline"))
        ]
        if len(kids) >= workers or time.monotonic() > deadline:
            return kids
        time.sleep(0.1)


def measure_round(stack: Stack, pids: list[int], groups: CpuGroups | None, wrk: str, duration: float) -> dict[str, Any]:
    """One wrk run at c64: rate, latency, counts and errors, the CPU of the platform, each worker and the mock, how
    often each worker's CPU group was throttled, and how idle the machine stayed."""
    assert stack.web is not None and stack.mock is not None
    stack.alive()
    tree = process_tree(stack.web.pid)
    mock_tree = process_tree(stack.mock.pid)
    before = stack.mock_drained()
    cpu0, mock0, busy0 = cpu_seconds(tree), cpu_seconds(mock_tree), system_busy_s()
    per_worker0 = [cpu_seconds([pid]) for pid in pids]
    throttle0 = groups.stats() if groups else []
    wall0 = time.monotonic()
    client = run_wrk(wrk, None, stack.url, stack.key, C64, duration)
    after = stack.mock_drained()
    wall = time.monotonic() - wall0
    cpu, mock_cpu = cpu_seconds(tree) - cpu0, cpu_seconds(mock_tree) - mock0
    busy = system_busy_s() - busy0
    per_worker = [cpu_seconds([pid]) - c0 for pid, c0 in zip(pids, per_worker0, strict=True)]
    throttled = [
        (b["throttled"] - a["throttled"]) / max(1, b["periods"] - a["periods"])
        for a, b in zip(throttle0, groups.stats() if groups else [], strict=True)
    ]
    sent, answered = client["sent"], client["answered"]
    backend = after["total_requests"] - before["total_requests"]
    _, errors = client_failures(C64, client)  # C64 allows 200 only: every other status is an error
    window = client["window_s"]
    return {
        "rate": client["rate"],
        "latency_p50_ms": client["latency_ms"]["p50"],
        "sent": sent,
        "answered": answered,
        "backend_requests": backend,
        "counts_equal": sent == answered == backend,
        "errors": errors,
        "platform_cpu_ms_per_request": cpu * 1000 / answered if answered else None,
        "platform_cores": cpu / window,
        "worker_cores": [c / window for c in per_worker],
        "worker_throttled_share": throttled,
        "mock_cores": mock_cpu / window,
        "machine_idle_cores": max(0.0, CPUS - busy / wall),
    }


def log_round(config: Config, round_no: int, run: dict[str, Any]) -> None:
    log(
        f"{config.label:<28} round {round_no}: {run['rate']:8.0f} req/s  "
        f"cpu {run['platform_cpu_ms_per_request'] or 0:.3f} ms/req  "
        f"workers {' '.join(f'{c:.2f}' for c in run['worker_cores'])} cores  "
        f"throttled {' '.join(f'{t:.0%}' for t in run['worker_throttled_share']) or '-'}  "
        f"idle {run['machine_idle_cores']:.2f} cores  sent {run['sent']} answered {run['answered']} "
        f"backend {run['backend_requests']}"
        + ("" if run["counts_equal"] and not run["errors"] else "  << ERRORS/COUNT MISMATCH")
    )


def config_summary(config: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A configuration's row: its rounds and their medians."""
    return {
        "workers": config.workers,
        "core_share": config.share,
        "label": config.label,
        "runs": runs,
        "rate": statistics.median(r["rate"] for r in runs),
        "cpu_ms_per_request": statistics.median(r["platform_cpu_ms_per_request"] or 0.0 for r in runs),
        "throttled_min": min((t for r in runs for t in r["worker_throttled_share"]), default=None),
        "idle_cores": statistics.median(r["machine_idle_cores"] for r in runs),
        "platform_cores": statistics.median(r["platform_cores"] for r in runs),
        "mock_cores": statistics.median(r["mock_cores"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "counts_equal": all(r["counts_equal"] for r in runs),
    }


def measure_config(args: argparse.Namespace, config: Config, wrk: str) -> dict[str, Any]:
    """Start the platform with this many workers, limit them, warm up, run wrk `rounds` times."""
    stack_args = argparse.Namespace(
        env=args.env,
        workers=config.workers,
        shared_socket=config.shared_socket,
        production_server=True,  # every row, 1 worker included, runs llm_platform/serve.py
        server="uvicorn",
        key="api",
        keep_tmp=False,
    )
    stack = Stack(stack_args, {"mock": None, "platform": None, "client": None})
    groups = CpuGroups(config.share) if config.share is not None else None
    runs: list[dict[str, Any]] = []
    try:
        stack.start()
        assert stack.web is not None and stack.mock is not None
        pids = worker_pids(stack, config.workers)
        if len(pids) != config.workers:
            raise RuntimeError(f"expected {config.workers} workers, found {len(pids)}")
        if groups is not None:
            groups.limit(pids)
        run_wrk(wrk, None, stack.url, stack.key, C64, args.warmup)  # every worker warms up its connections
        for round_no in range(1, args.rounds + 1):
            run = measure_round(stack, pids, groups, wrk, args.duration)
            runs.append({"round": round_no, **run})
            log_round(config, round_no, run)
    finally:
        stack.stop()
        if groups is not None:
            groups.release()
    return config_summary(config, runs)


# --- report -------------------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    """The table of docs/performance.md's scaling section."""
    rows = report["configs"]
    base = next((r for r in rows if r["core_share"] is not None and r["workers"] == 1), None)
    lines = [
        f"`bench/scaling.py` on {report['host']['cpus']} cores, {report['when']} "
        f"(commit {report['git'].get('commit', '?')[:9]}); non-streaming chat at concurrency 64, "
        f"median of {report['rounds']} runs of {report['duration_s']:g} s per row.",
        "",
        "| Platform | req/s | × 1 worker | platform cores used | req/s per platform core | CPU per request "
        "| workers throttled | machine idle | errors | counts equal |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in rows:
        limited = row["core_share"] is not None and base is not None
        speedup = row["rate"] / base["rate"] if limited and base and base["rate"] else None
        per_core = row["rate"] / row["platform_cores"] if row["platform_cores"] else 0.0
        throttled = row["throttled_min"]
        lines.append(
            f"| {row['label']} | {row['rate']:,.0f} | {f'{speedup:.2f}×' if speedup else '–'} "
            f"| {row['platform_cores']:.2f} | {per_core:,.0f} | {row['cpu_ms_per_request']:.3f} ms "
            f"| {f'≥ {throttled:.0%} of periods' if throttled is not None else '–'} "
            f"| {row['idle_cores']:.2f} cores | {row['errors']} | {'yes' if row['counts_equal'] else 'NO'} |"
        )
    return "\n".join(lines)


def redis_answers(url: str) -> bool:
    """Whether a Redis server answers PING at redis://host:port."""
    hostport = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = hostport.partition(":")
    try:
        with socket.create_connection((host, int(port or 6379)), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,2,3,4", help="worker counts to measure (default 1,2,3,4)")
    parser.add_argument("--core-share", type=float, default=0.25, help="CPU quota of each worker, in cores")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    parser.add_argument(
        "--shared-socket",
        default="4",
        help="also measure these worker counts under uvicorn's own supervisor, one shared socket ('' for none)",
    )
    parser.add_argument(
        "--unlimited", default="1,2", help="also measure these worker counts with no quota ('' for none)"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="REDIS_URL of the platform")
    parser.add_argument("--no-redis", action="store_true", help="run the platform without Redis")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    parser.add_argument("--no-docs", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure every configuration, print the table, write the JSON and the docs."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("CPU cgroups need root: this benchmark cannot run here")
        return 2
    redis = ""
    if not args.no_redis:
        if redis_answers(args.redis_url):
            redis = args.redis_url
        else:
            log(f"no Redis at {args.redis_url}: the platform runs without it (per-process state)")
    args.env = [*([f"REDIS_URL={redis}"] if redis else []), *args.env]
    wrk = ensure_wrk()
    configs = [Config(int(n), args.core_share) for n in args.workers.split(",") if n]
    configs += [Config(int(n), args.core_share, shared_socket=True) for n in args.shared_socket.split(",") if n]
    configs += [Config(int(n), None) for n in args.unlimited.split(",") if n]
    rows = [measure_config(args, config, wrk) for config in configs]
    report = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git": git_info(),
        "host": {"cpus": CPUS},
        "redis": bool(redis),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "configs": rows,
    }
    table = markdown(report)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"results written to {args.out}")
    if not args.no_docs and update_docs(table, DOC_START, DOC_END):
        log(f"table updated in {DOCS}")
    bad = [row["label"] for row in rows if row["errors"] or not row["counts_equal"]]
    if bad:
        log(f"errors or count mismatches in: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
