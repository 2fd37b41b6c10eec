"""A/B of the platform's CPU per request between checkouts (or settings), with its split and its system calls.

    .venv/bin/python bench/ab.py before=/path/to/main after=.                         # 4 rounds of chat c64, 8 s
    .venv/bin/python bench/ab.py a=. "b=.,USAGE_FLUSH_MAX=100000" --peer --syscalls   # a setting; vllm-router too

Each variant is NAME=CHECKOUT[,ENV=VALUE...]: one uvicorn process of that checkout (its .venv, `make run`'s flags,
a fresh SQLite state and an unlimited API key), all in front of one mock vLLM; `--peer` adds vllm-router
(round_robin). Nothing is pinned (the shared placement of bench/run.py). Every round runs each variant once with
wrk + bench/chat.lua (exact counts, non-streaming chat, max_tokens 4), in an order that rotates and reverses from
round to round, so that a drift of the machine does not favour one side. Per run: the process tree's CPU per
answered request (/proc utime + stime), split into the event-loop thread (the main thread) and every other
thread (the database thread, validation threads), the CPU other processes used meanwhile, and with `--syscalls`
the system calls per request by kind (`perf stat` on syscall tracepoints: needs perf and root). Medians over the
rounds at the end; the CPU multiple against vllm-router is the median of the per-round ratios. Where
bench/run.py is the benchmark of record (both placements, every workload, the targets), this tool answers
"what did this change do to the CPU per request, and where" (docs/performance.md, "Reaching 1.5x").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import CHAT_MAX_TOKENS, MODEL, cpu_seconds, ensure_wrk, process_tree, rusage_s, system_busy_s  # noqa: E402
from core.procs import free_port, uvicorn_argv, wait_http  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
MASTER_KEY = "ab-master-key"
SYSCALLS = ("write", "writev", "read", "recvfrom", "epoll_wait", "epoll_pwait", "getpid", "getrandom", "futex")
PEER = "vllm-router"


@dataclass
class Target:
    """A proxy under test: its process, URL and the key its clients send."""

    name: str
    url: str
    key: str
    proc: subprocess.Popen[bytes]
    tmp: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        """SIGTERM its process group (SIGKILL after 15 s); remove its state."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def start_platform(name: str, spec: str, mock_url: str) -> Target:
    """NAME=CHECKOUT[,ENV=VALUE...] as a running uvicorn process with its own state and API key."""
    checkout, *settings = spec.split(",")
    root = Path(checkout).resolve()
    python = str(root / ".venv" / "bin" / "python")
    extra = dict(item.split("=", 1) for item in settings)
    tmp = Path(tempfile.mkdtemp(prefix=f"llm-ab-{name}-"))
    env = {
        **os.environ,
        "LOCAL_STATE_DIR": str(tmp),
        "DATABASE_URL": f"sqlite:///{tmp / 'db.sqlite3'}",
        "ROUTER_MASTER_KEY": MASTER_KEY,
        "DJANGO_SETTINGS_MODULE": "llm_platform.settings",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    for step in (["migrate", "--noinput", "-v", "0"], ["setup_platform", "--mock-url", mock_url]):
        subprocess.run([python, "manage.py", *step], cwd=root, env=env, check=True, capture_output=True)
    made = subprocess.run(
        [python, "manage.py", "create_api_key", "--name", "ab"], cwd=root, env=env, check=True, capture_output=True
    )
    key = made.stdout.decode().strip().splitlines()[-1].strip()
    port = free_port()
    log = (tmp / "web.log").open("wb")
    proc = subprocess.Popen(
        uvicorn_argv(port, python=python),
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    target = Target(name, f"http://127.0.0.1:{port}", key, proc, tmp, extra)
    if not wait_http(f"{target.url}/readyz", 60, proc):
        target.stop()
        raise RuntimeError(f"{name}: the platform of {root} did not become ready")
    return target


def start_peer(mock_url: str) -> Target:
    """vllm-router (round_robin) in front of the mock, installed on first use (bench/prefix.py)."""
    from bench.prefix import ensure_router

    port, metrics_port = free_port(), free_port()
    argv = [str(ensure_router()), "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin"]
    argv += ["--worker-urls", mock_url, "--log-level", "warning", "--prometheus-port", str(metrics_port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    target = Target(PEER, f"http://127.0.0.1:{port}", MASTER_KEY, proc)
    if not wait_http(f"{target.url}/health", 120, proc):
        target.stop()
        raise RuntimeError("vllm-router did not become ready")
    return target


def cpu_split(pid: int) -> tuple[float, float]:
    """CPU seconds of the process tree: (its main thread, every other thread)."""
    main = other = 0.0
    for process in process_tree(pid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{process}/task"):
                with contextlib.suppress(OSError):
                    fields = Path(f"/proc/{process}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                    seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
                    if process == pid and int(tid) == pid:
                        main += seconds
                    else:
                        other += seconds
    return main, other


def wrk(wrk_bin: str, target: Target, duration: float, concurrency: int) -> dict[str, Any]:
    """One wrk + bench/chat.lua run against the target; chat.lua's report."""
    argv = [wrk_bin, "-t1", f"-c{concurrency}", f"-d{int(duration) + 1}s", "--timeout=30s"]
    argv += ["-s", str(ROOT / "bench" / "chat.lua"), f"{target.url}/v1/chat/completions"]
    argv += ["--", f"{duration:.3f}", target.key, MODEL, str(CHAT_MAX_TOKENS)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 90)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            report: dict[str, Any] = json.loads(line[len("BENCH_JSON ") :])
            return report
    raise RuntimeError(f"wrk gave no report (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


def measure(
    wrk_bin: str, target: Target, duration: float, concurrency: int, syscalls: bool, ours: list[int]
) -> dict[str, Any]:
    """One run: CPU per request (main thread, others), the load of processes other than `ours` (the mock, the
    proxies, this script and its children), and system calls per request."""
    pid = target.proc.pid
    perf: subprocess.Popen[bytes] | None = None
    handle, name = tempfile.mkstemp(suffix=".perf")
    os.close(handle)
    perf_out = Path(name)
    if syscalls:
        events = ",".join(["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{name}" for name in SYSCALLS)])
        argv = ["perf", "stat", "-x", ",", "-e", events, "-p", str(pid), "-o", str(perf_out)]
        perf = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # attached before the load starts
    main0, other0 = cpu_split(pid)
    busy0, ours0, t0 = system_busy_s(), _our_cpu(ours), time.monotonic()
    report = wrk(wrk_bin, target, duration, concurrency)
    main1, other1 = cpu_split(pid)
    busy1, ours1, t1 = system_busy_s(), _our_cpu(ours), time.monotonic()
    ok = max(1, int(report["ok"]))
    counts: dict[str, float] = {}
    if perf is not None:
        perf.send_signal(signal.SIGINT)
        perf.wait(10)
        for line in perf_out.read_text().splitlines():
            parts = line.split(",")
            if len(parts) > 2 and parts[0].strip().isdigit():
                name = parts[2].split(":")[-1].removeprefix("sys_enter_").replace("sys_enter", "all")
                counts[name] = int(parts[0]) / ok
    perf_out.unlink(missing_ok=True)
    return {
        "target": target.name,
        "answered": report["ok"],
        "errors": report["sent"] - report["ok"],
        "rate": report["ok"] / report["window_s"] if report["window_s"] else 0.0,
        "cpu_ms": ((main1 - main0) + (other1 - other0)) * 1000 / ok,
        "main_ms": (main1 - main0) * 1000 / ok,
        "other_ms": (other1 - other0) * 1000 / ok,
        "foreign_cores": max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (t1 - t0),
        "syscalls_per_request": counts,
    }


def _our_cpu(roots: list[int]) -> float:
    """CPU seconds of the given process trees, this process and its waited-for children (wrk)."""
    trees = [pid for root in roots for pid in process_tree(root)]
    return cpu_seconds(trees) + rusage_s(resource.RUSAGE_SELF) + rusage_s(resource.RUSAGE_CHILDREN)


def summary(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Per target: medians over the rounds, and the median per-round CPU multiple against the peer."""
    rows = []
    peer = {r["round"]: r for r in runs if r["target"] == PEER}
    for name in names:
        mine = [r for r in runs if r["target"] == name]
        row: dict[str, Any] = {"target": name, "rounds": len(mine), "errors": sum(r["errors"] for r in mine)}
        for key in ("cpu_ms", "main_ms", "other_ms", "rate", "foreign_cores"):
            row[key] = statistics.median(r[key] for r in mine)
        kinds = sorted({k for r in mine for k in r["syscalls_per_request"]})
        row["syscalls_per_request"] = {
            k: statistics.median(r["syscalls_per_request"].get(k, 0.0) for r in mine) for k in kinds
        }
        ratios = [r["cpu_ms"] / peer[r["round"]]["cpu_ms"] for r in mine if r["round"] in peer and name != PEER]
        row["cpu_multiple"] = statistics.median(ratios) if ratios else None
        rows.append(row)
    return rows


def line(row: dict[str, Any], prefix: str = "") -> str:
    """One printed line of a run or a summary row."""
    text = (
        f"{prefix}{row['target']:14s} {row['rate']:8,.0f} req/s  CPU {row['cpu_ms']:.3f} ms/req "
        f"(event loop {row['main_ms']:.3f}, other threads {row['other_ms']:.3f})  others' load "
        f"{row['foreign_cores']:.2f} cores  errors {row['errors']}"
    )
    if row.get("cpu_multiple"):
        text += f"  {row['cpu_multiple']:.2f}x {PEER}"
    if row["syscalls_per_request"]:
        text += "\n" + " " * (len(prefix) + 15) + "syscalls/req: "
        text += " ".join(f"{k} {v:.2f}" for k, v in row["syscalls_per_request"].items() if v >= 0.005)
    return text


def main(argv: list[str] | None = None) -> int:
    """Start the mock and every target, measure them round by round, print and save the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", metavar="NAME=CHECKOUT[,ENV=VALUE...]")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--peer", action="store_true", help=f"also measure {PEER} (round_robin)")
    parser.add_argument("--syscalls", action="store_true", help="count system calls per request (perf, root)")
    parser.add_argument("--out", type=Path, help="write the runs and the summary as JSON")
    args = parser.parse_args(argv)
    if args.syscalls and not shutil.which("perf"):
        parser.error("--syscalls needs perf (Debian: linux-perf)")
    wrk_bin = ensure_wrk()
    mock_port = free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    mock_argv = [sys.executable, "-m", "backends.mock_vllm", "--host", "127.0.0.1", "--port", str(mock_port)]
    mock_argv += ["--model", MODEL, "--embed-model", "mock-embed"]
    mock = subprocess.Popen(mock_argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    targets: list[Target] = []
    try:
        if not wait_http(f"{mock_url}/health", 30, mock):
            raise RuntimeError("the mock vLLM did not start")
        for variant in args.variants:
            name, _, spec = variant.partition("=")
            targets.append(start_platform(name, spec or ".", mock_url))
        if args.peer:
            targets.append(start_peer(mock_url))
        for target in targets:  # warm-up: connections, caches, the first flushes
            wrk(wrk_bin, target, 2.0, args.concurrency)
        runs: list[dict[str, Any]] = []
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
            for target in reversed(order) if rnd % 2 else order:
                ours = [mock.pid, *(t.proc.pid for t in targets)]
                run = measure(wrk_bin, target, args.duration, args.concurrency, args.syscalls, ours)
                run["round"] = rnd
                runs.append(run)
                print(line(run, f"round {rnd + 1}  "), flush=True)
        rows = summary(runs, [t.name for t in targets])
        print("medians:")
        for row in rows:
            print(line(row, "  "))
        if args.out is not None:
            args.out.write_text(json.dumps({"argv": sys.argv, "runs": runs, "summary": rows}, indent=1) + "\n")
    finally:
        for target in targets:
            target.stop()
        mock.terminate()
        mock.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
