"""The benchmark of the platform: direct-to-mock versus through-platform, alternately, medians and ratios.

    make bench          # python bench/run.py           3 rounds, ~5 minutes, updates docs/performance.md
    make bench-quick    # python bench/run.py --quick   1 short round, ~20 s, the regression guard

It starts the bundled mock vLLM and the platform the way a user does (fresh temporary LOCAL_STATE_DIR and
SQLite database, `manage.py migrate`, `manage.py setup_platform --mock-url ...`, one uvicorn process with the
exact flags of `make run`), pins them to cores, then for each round and each workload runs the same client
against the mock directly and through the platform, alternating which goes first. Non-streaming load comes
from wrk (bench/chat.lua); streams from bench/stream_client.py. Around every run it reads the platform's
process-tree CPU time, samples its RSS, and checks that the mock's request counter moved by exactly the
number of requests the client sent and got answered. Results: a JSON file in bench/results/ and a Markdown
table (printed, and written into docs/performance.md by a full run). See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gzip
import json
import math
import os
import platform as pyplatform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.procs import free_port, uvicorn_argv, wait_http  # noqa: E402

BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
DOCS = ROOT / "docs" / "performance.md"
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
MASTER_KEY = "bench-key"
MODEL = "mock-chat"
CHAT_MAX_TOKENS = 4
STREAM_TOKENS = 32
STREAM_TOKEN_DELAY_S = 0.005
DOC_START = "<!-- bench:results:start -->"
DOC_END = "<!-- bench:results:end -->"

# Targets of the "Performance" issue (one platform process).
TARGET_RATE_C64 = 3000.0
TARGET_CPU_MS = 0.3
TARGET_STREAM_TOTAL_RATIO = 1.02
TARGET_TTFT_DELTA_MS = 1.0
TARGET_RSS_MIB = 150.0
GATE_FRACTION = 0.25
PROFILE_HZ = 200
QUIET_CORES = 0.25  # load from other processes above which figures are flagged as noisy
PEER = "vllm-router"  # the peer measured in the same run (PyPI vllm-router, --policy round_robin)
TARGET_PEER_CPU_MULTIPLE = 1.5  # platform CPU per request / vllm-router's, shared placement, c64
PLACEMENTS = ("pinned", "shared")
ALL_CPUS = sorted(os.sched_getaffinity(0))  # before this script pins itself


def log(message: str) -> None:
    """Print a progress line on stderr (stdout carries the table)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- workloads ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One workload: a client kind, a concurrency, and the mock's knobs while it runs."""

    name: str
    kind: str  # "chat" (wrk, non-streaming) or "stream" (bench/stream_client.py)
    concurrency: int
    mock_config: dict[str, Any] = field(default_factory=dict)
    allowed_statuses: frozenset[int] = frozenset({200})  # overload runs will also allow 429/503/504
    client_timeout_s: float = 30.0


SCENARIOS: list[Scenario] = [
    Scenario("chat c1", "chat", 1, {"token_delay_s": 0.0}),
    Scenario("chat c16", "chat", 16, {"token_delay_s": 0.0}),
    Scenario("chat c64", "chat", 64, {"token_delay_s": 0.0}),
    Scenario("stream c1", "stream", 1, {"token_delay_s": STREAM_TOKEN_DELAY_S}),
    Scenario("stream c16", "stream", 16, {"token_delay_s": STREAM_TOKEN_DELAY_S}),
]
# The warm-up's and the mock ceiling's workloads.
CHAT64 = next(s for s in SCENARIOS if s.name == "chat c64")
STREAM16 = next(s for s in SCENARIOS if s.name == "stream c16")


# --- /proc readings -------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the command name), or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """The pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads), seconds."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def status_kib(pids: list[int], key: str) -> int:
    """Sum of a /proc/<pid>/status memory field (VmRSS, VmHWM) over the processes, KiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
                    break
    return total


def system_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (from /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def rusage_s(who: int) -> float:
    """User + system CPU seconds of this process or of its waited-for children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class RssSampler:
    """Samples the RSS of a process tree in a background thread; keeps the peak."""

    def __init__(self, pids: list[int], interval_s: float = 0.05) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, status_kib(self.pids, "VmRSS"))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, status_kib(self.pids, "VmRSS"))


# --- HTTP helpers ---------------------------------------------------------------------------------------------


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    """GET (or POST a JSON body) and decode the JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


# --- processes ------------------------------------------------------------------------------------------------


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    """Prefix argv with `taskset -c cpu` (no pinning when cpu is None)."""
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def set_affinity(pid: int, cpus: list[int]) -> None:
    """Set the CPU affinity of every thread of a process (threads started later inherit it)."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


def web_server_argv(args: argparse.Namespace, port: int) -> list[str]:
    """The command line of the platform's web server: uvicorn as `make run` starts it; the production server
    (llm_platform/serve.py, as `make serve` runs it) with several workers; or granian or daphne (`--server`)."""
    argv = uvicorn_argv(port, python=PY)
    workers = getattr(args, "workers", 1)
    if workers > 1 or getattr(args, "production_server", False):
        argv = [
            PY,
            "-m",
            "llm_platform.serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            *(["--shared-socket"] if getattr(args, "shared_socket", False) else []),
        ]
    server = getattr(args, "server", "uvicorn")
    if server == "granian":
        argv = [
            PY,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--loop",
            "uvloop",
            "--no-ws",
            "--log-level",
            "warning",
            "llm_platform.asgi:application",
        ]
    elif server == "daphne":
        argv = [PY, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "-v", "0", "llm_platform.asgi:application"]
    return argv


class Stack:
    """The mock and the platform, started like `make run` starts them, in a temporary state directory."""

    def __init__(self, args: argparse.Namespace, placement: dict[str, int | None]) -> None:
        self.args = args
        self.placement = placement
        self.tmp = Path(tempfile.mkdtemp(prefix="llm-bench-"))
        self.mock_port = free_port()
        self.port = free_port()
        self.mock_url = f"http://127.0.0.1:{self.mock_port}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.env = dict(os.environ)
        self.env.update(
            {
                "LOCAL_STATE_DIR": str(self.tmp),
                "DATABASE_URL": f"sqlite:///{self.tmp / 'db.sqlite3'}",
                "ROUTER_MASTER_KEY": MASTER_KEY,
                "DJANGO_SETTINGS_MODULE": "llm_platform.settings",
                "DJANGO_SUPERUSER_PASSWORD": "bench-admin-password",
                "PYTHONUNBUFFERED": "1",
            }
        )
        for item in args.env:
            name, _, value = item.partition("=")
            self.env[name] = value
        self.web_argv = web_server_argv(args, self.port)
        self.web: subprocess.Popen[bytes] | None = None
        self.mock: subprocess.Popen[bytes] | None = None
        self.router: subprocess.Popen[bytes] | None = None
        self.router_url = ""
        self.key = MASTER_KEY
        self.key_kind = "master"

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        logfile = (self.tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=self.env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append((name, proc))
        return proc

    def _fail(self, message: str) -> RuntimeError:
        for name, _ in self.procs:
            path = self.tmp / f"{name}.log"
            if path.exists():
                log(f"--- last lines of {name}.log ---\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return RuntimeError(message)

    def start(self) -> None:
        """Mock, migrate, setup_platform, uvicorn; wait until /readyz answers."""
        self.mock = self._start(
            "mock",
            pinned(
                self.placement["mock"],
                [
                    PY,
                    "-m",
                    "backends.mock_vllm",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.mock_port),
                    "--model",
                    MODEL,
                    "--embed-model",
                    "mock-embed",
                ],
            ),
        )
        if not wait_http(f"{self.mock_url}/health", 30, self.mock):
            raise self._fail("the mock vLLM did not start")
        for step in (
            ["manage.py", "migrate", "--noinput", "-v", "0"],
            ["manage.py", "setup_platform", "--mock-url", self.mock_url],
        ):
            done = subprocess.run([PY, *step], cwd=ROOT, env=self.env, capture_output=True, text=True)
            if done.returncode != 0:
                raise self._fail(f"{' '.join(step)} failed:\n{done.stdout}\n{done.stderr}")
        if self.args.strategy != "round_robin":
            step = [
                "manage.py",
                "shell",
                "-c",
                f"from backends.models import GpuPool; GpuPool.objects.update(routing_strategy={self.args.strategy!r})",
            ]
            done = subprocess.run([PY, *step], cwd=ROOT, env=self.env, capture_output=True, text=True)
            if done.returncode != 0:
                raise self._fail(f"setting the strategy failed:\n{done.stderr}")
        if self.args.key == "api":
            # Clients use an API key (no limits: a rate limit would cap the rate being measured).
            step = ["manage.py", "create_api_key", "--name", "bench"]
            done = subprocess.run([PY, *step], cwd=ROOT, env=self.env, capture_output=True, text=True)
            secret = done.stdout.strip().splitlines()[-1].strip() if done.stdout.strip() else ""
            if done.returncode == 0 and secret and " " not in secret:
                self.key, self.key_kind = secret, "api"
            else:
                log(f"create_api_key unavailable ({done.stderr.strip()[-200:]}): using the master key")
        self.web = self._start("platform", pinned(self.placement["platform"], self.web_argv))
        if not wait_http(f"{self.url}/readyz", 60, self.web):
            raise self._fail("the platform did not become ready")
        if getattr(self.args, "peer", False):
            self.start_router()

    def start_router(self) -> None:
        """The peer: vllm-router (--policy round_robin) in front of the same mock, placed like the platform."""
        from bench.prefix import ensure_router  # its installer: vllm-router pinned, in a venv of its own

        port, metrics_port = free_port(), free_port()
        argv = [str(ensure_router()), "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin"]
        argv += ["--worker-urls", self.mock_url, "--log-level", "warning", "--prometheus-port", str(metrics_port)]
        self.router = self._start("vllm-router", pinned(self.placement["platform"], argv))
        self.router_url = f"http://127.0.0.1:{port}"
        if not wait_http(f"{self.router_url}/health", 120, self.router):
            raise self._fail("vllm-router did not become ready")

    def proxy(self, target: str) -> subprocess.Popen[bytes] | None:
        """The process measured for a target: the platform's, vllm-router's, or none (direct)."""
        return {"platform": self.web, PEER: self.router}.get(target)

    def place(self, placement: dict[str, int | None]) -> None:
        """Move the running processes (every thread) to a placement's CPUs: None is every CPU (shared)."""
        every = ALL_CPUS
        cpus = {"mock": placement["mock"], "platform": placement["platform"], PEER: placement["platform"]}
        for name, proc in self.procs:
            cpu = cpus.get(name)
            for pid in process_tree(proc.pid):
                set_affinity(pid, every if cpu is None else [cpu])
        self.placement = placement

    def stop(self) -> None:
        """SIGTERM the process groups we started, then SIGKILL what is left; remove the state directory."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            log(f"state and logs kept in {self.tmp}")

    def alive(self) -> None:
        """Raise when the mock or the platform died."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise self._fail(f"{name} exited with {proc.returncode}")

    def mock_stats(self) -> dict[str, Any]:
        """The mock's counters."""
        return http_json(f"{self.mock_url}/mock/stats")

    def mock_configure(self, changes: dict[str, Any]) -> None:
        """Change the mock's knobs at runtime."""
        http_json(f"{self.mock_url}/mock/config", changes)

    def mock_drained(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Wait until the mock has no open request; return its counters."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.mock_stats()
            if stats["open_requests"] == 0 or time.monotonic() > deadline:
                return stats
            time.sleep(0.02)


# --- clients --------------------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """The wrk binary; installed with apt-get when missing and we are root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log("wrk not found: installing it with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "wrk"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
        found = shutil.which("wrk")
        if found:
            return found
    raise SystemExit("wrk is required: install it (Debian/Ubuntu: sudo apt-get install -y wrk) and rerun")


def run_wrk(wrk: str, cpu: int | None, url: str, key: str, scenario: Scenario, duration: float) -> dict[str, Any]:
    """One wrk run of non-streaming chat requests; returns chat.lua's report."""
    # wrk's -d takes whole seconds: the measuring window is `duration`, the rest drains the last requests.
    drain = scenario.client_timeout_s if len(scenario.allowed_statuses) > 1 else 1.0
    wrk_duration = max(1, math.ceil(duration + drain))
    argv = pinned(
        cpu,
        [
            wrk,
            "-t1",
            f"-c{scenario.concurrency}",
            f"-d{wrk_duration}s",
            f"--timeout={int(scenario.client_timeout_s)}s",
            "-s",
            str(BENCH / "chat.lua"),
            f"{url}/v1/chat/completions",
            "--",
            f"{duration:.3f}",
            key,
            MODEL,
            str(CHAT_MAX_TOKENS),
        ],
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=wrk_duration + 60)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            report = json.loads(line[len("BENCH_JSON ") :])
            report["rate"] = report["ok"] / report["window_s"] if report["window_s"] > 0 else 0.0
            return report
    raise RuntimeError(f"wrk gave no report (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


def run_streams(
    cpu: int | None, url: str, key: str, scenario: Scenario, duration: float, client: str
) -> dict[str, Any]:
    """One run of bench/stream_client.py; returns its report."""
    argv = pinned(
        cpu,
        [
            PY,
            str(BENCH / "stream_client.py"),
            "--url",
            url,
            "--key",
            key,
            "--model",
            MODEL,
            "--concurrency",
            str(scenario.concurrency),
            "--duration",
            f"{duration:.3f}",
            "--max-tokens",
            str(STREAM_TOKENS),
            "--timeout",
            str(scenario.client_timeout_s),
            "--client",
            client,
        ],
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + scenario.client_timeout_s + 60)
    if done.returncode != 0:
        raise RuntimeError(f"stream client failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- one measured run -----------------------------------------------------------------------------------------


class Bench:
    """Runs the measured runs against a started Stack and collects their figures."""

    def __init__(self, args: argparse.Namespace, stack: Stack, placement: dict[str, int | None], wrk: str) -> None:
        self.args = args
        self.stack = stack
        self.placement = placement
        self.wrk = wrk
        self.mock_config: dict[str, Any] = {}
        self.peak_rss_kib = 0
        self.placement_name = "shared" if all(v is None for v in placement.values()) else "pinned"

    def place(self, name: str, placement: dict[str, int | None]) -> None:
        """Switch the running processes, the clients and this script to a placement."""
        self.stack.place(placement)
        self.placement = placement
        self.placement_name = name
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), ALL_CPUS if placement["client"] is None else [placement["client"]])

    def configure(self, changes: dict[str, Any]) -> None:
        """Apply mock knobs when they differ from the current ones."""
        delta = {k: v for k, v in changes.items() if self.mock_config.get(k) != v}
        if delta:
            self.stack.mock_configure(delta)
            self.mock_config.update(delta)

    def measure(
        self, scenario: Scenario, target: str, duration: float, *, client_cpu: int | None = None
    ) -> dict[str, Any]:
        """Run one client run against `target` ("direct" or "platform") and account for everything around it."""
        stack = self.stack
        stack.alive()
        self.configure(scenario.mock_config)
        cpu = self.placement["client"] if client_cpu is None else client_cpu
        url, key = {"direct": (stack.mock_url, ""), PEER: (stack.router_url, "")}.get(target, (stack.url, stack.key))
        assert stack.web is not None and stack.mock is not None
        proxy = stack.proxy(target)
        before = stack.mock_drained()
        meter = CpuMeter.start(stack.web, stack.mock, proxy)
        with RssSampler(meter.web_tree) as sampler:
            if scenario.kind == "chat":
                client = run_wrk(self.wrk, cpu, url, key, scenario, duration)
            else:
                client = run_streams(cpu, url, key, scenario, duration, self.args.stream_client)
            after = stack.mock_drained()
        used = meter.stop(peer=target == PEER)
        self.peak_rss_kib = max(self.peak_rss_kib, sampler.peak_kib)
        backend = after["total_requests"] - before["total_requests"]
        answered = client["answered"]
        wall, other = used["wall"], used["other"]
        window = client.get("window_s") or client.get("wall_s") or wall
        rejected, errors = client_failures(scenario, client)
        run = {
            "scenario": scenario.name,
            "kind": scenario.kind,
            "concurrency": scenario.concurrency,
            "target": target,
            "placement": self.placement_name,
            "duration_s": duration,
            "wall_s": wall,
            "client": client,
            "client_sent": client["sent"],
            "client_answered": answered,
            "backend_requests": backend,
            "counts_equal": backend == client["sent"] == answered,
            "errors": errors,
            "rejected": rejected,
            "platform_cpu_s": used["web"],
            "platform_cpu_ms_per_request": used["web"] * 1000 / answered if answered and target == "platform" else None,
            # CPU of the measured proxy's process tree (the platform's or vllm-router's) per answered request.
            "proxy_cpu_s": used["proxy"],
            "proxy_cpu_ms_per_request": used["proxy"] * 1000 / answered if answered and proxy is not None else None,
            "proxy_core_util": used["proxy"] / window,
            # Utilisations over the measuring window (the drain margin after it is mostly idle).
            "platform_core_util": used["web"] / window,
            "mock_core_util": used["mock"] / window,
            "client_core_util": used["client"] / window,
            "other_load_cores": max(0.0, other) / wall,
            "noisy": max(0.0, other) / wall > QUIET_CORES,
            "platform_rss_peak_mib": sampler.peak_kib / 1024,
        }
        if scenario.kind == "chat":
            run["rate"] = client["rate"]
            run["latency_ms"] = client["latency_ms"]
        else:
            run["rate"] = client["streams_per_s"]
            run["ttft_ms"] = client["ttft_ms"].get("median")
            run["total_ms"] = client["total_ms"].get("median")
        self._log_run(run)
        return run

    def _log_run(self, run: dict[str, Any]) -> None:
        """One line on stderr: the run's rate or latencies, CPU per request, counts and the machine's other load."""
        client, errors = run["client"], run["errors"]
        flag = "" if run["counts_equal"] and not errors else "  << ERRORS/COUNT MISMATCH"
        if run["kind"] == "chat":
            detail = f"{run['rate']:9.0f} req/s  p50 {client['latency_ms']['p50']:7.2f} ms"
        else:
            detail = f"ttft {run['ttft_ms'] or 0:6.2f} ms  total {run['total_ms'] or 0:7.2f} ms"
        cpu_ms = run["proxy_cpu_ms_per_request"]
        cpu_text = f"  cpu {cpu_ms:.3f} ms/req" if cpu_ms is not None else ""
        log(
            f"[{self.placement_name}] {run['scenario']:<11} {run['target']:<11} {detail}{cpu_text}  "
            f"sent {client['sent']} answered {run['client_answered']} backend {run['backend_requests']}  "
            f"other load {run['other_load_cores']:.2f} cores{flag}"
        )


def client_failures(scenario: Scenario, client: dict[str, Any]) -> tuple[int, int]:
    """(rejected, errors) of a client run: rejected answers are the scenario's allowed non-200 statuses (e.g. 429
    under overload); errors are any other status, bad bodies, unanswered requests and socket errors."""
    answered = client["answered"]
    if scenario.kind != "chat":
        return 0, sum(client["errors"].values()) + (client["sent"] - answered)
    statuses = {int(k): v for k, v in client["statuses"].items()}
    rejected = sum(n for s, n in statuses.items() if s != 200 and s in scenario.allowed_statuses)
    errors = (
        sum(n for s, n in statuses.items() if s not in scenario.allowed_statuses)
        + client["bad_body"]
        + (client["sent"] - answered)
        + sum(client["socket_errors"].values())
    )
    return rejected, errors


@dataclass
class CpuMeter:
    """The CPU seconds spent around one client run: by the platform, the mock, the measured proxy, the client
    processes (this script's children), this script, and whatever else ran on the machine meanwhile."""

    web_tree: list[int]
    mock_tree: list[int]
    proxy_tree: list[int]
    marks: dict[str, float]

    @classmethod
    def start(
        cls, web: subprocess.Popen[bytes], mock: subprocess.Popen[bytes], proxy: subprocess.Popen[bytes] | None
    ) -> CpuMeter:
        web_tree, mock_tree = process_tree(web.pid), process_tree(mock.pid)
        proxy_tree = process_tree(proxy.pid) if proxy is not None else []
        meter = cls(web_tree, mock_tree, proxy_tree, {})
        meter.marks = meter._read()
        return meter

    def _read(self) -> dict[str, float]:
        return {
            "web": cpu_seconds(self.web_tree),
            "mock": cpu_seconds(self.mock_tree),
            "proxy": cpu_seconds(self.proxy_tree),
            "busy": system_busy_s(),
            "client": rusage_s(resource.RUSAGE_CHILDREN),
            "self": rusage_s(resource.RUSAGE_SELF),
            "wall": time.monotonic(),
        }

    def stop(self, *, peer: bool) -> dict[str, float]:
        """The seconds used since `start` by each ("web", "mock", "proxy", "client", "other") and the wall time.

        "other" is the machine's busy time minus every process accounted for (the proxy's only when it is the
        peer, vllm-router: the platform's is "web" already)."""
        wall = time.monotonic() - self.marks["wall"]
        now = self._read()
        used = {name: now[name] - self.marks[name] for name in ("web", "mock", "proxy", "client", "self")}
        router = used["proxy"] if peer else 0.0
        busy = now["busy"] - self.marks["busy"]
        other = busy - used["web"] - used["mock"] - router - used["client"] - used["self"]
        return {**used, "other": other, "wall": wall}


# --- aggregation ----------------------------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    """Median of the non-None values (None when there are none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Per scenario: medians over rounds of each side, and the median of the per-round paired ratios."""
    summary: dict[str, Any] = {}
    for scenario in SCENARIOS:
        mine = [r for r in runs if r["scenario"] == scenario.name and "round" in r]
        if not mine:
            continue
        entry: dict[str, Any] = {"kind": scenario.kind, "concurrency": scenario.concurrency}
        for target in ("direct", "platform", PEER):
            side = [r for r in mine if r["target"] == target]
            if not side:
                continue
            figures: dict[str, Any] = {
                "rounds": len(side),
                "rate": median([r["rate"] for r in side]),
                "errors": sum(r["errors"] for r in side),
                "counts_equal": all(r["counts_equal"] for r in side),
                "sent": sum(r["client_sent"] for r in side),
                "backend_requests": sum(r["backend_requests"] for r in side),
                "other_load_cores": median([r["other_load_cores"] for r in side]),
            }
            if scenario.kind == "chat":
                figures["latency_p50_ms"] = median([r["latency_ms"]["p50"] for r in side])
                figures["latency_p99_ms"] = median([r["latency_ms"]["p99"] for r in side])
            else:
                figures["ttft_ms"] = median([r["ttft_ms"] for r in side])
                figures["total_ms"] = median([r["total_ms"] for r in side])
            if target != "direct":
                figures["cpu_ms_per_request"] = median([r.get("proxy_cpu_ms_per_request") or 0.0 for r in side])
                figures["proxy_core_util"] = median([r.get("proxy_core_util") or 0.0 for r in side])
                figures["platform_core_util"] = median([r["platform_core_util"] for r in side])
                figures["mock_core_util"] = median([r["mock_core_util"] for r in side])
                figures["client_core_util"] = median([r["client_core_util"] for r in side])
            entry[target] = figures
        pairs = _pairs(mine, rounds, "direct", "platform")
        entry["rate_ratio"] = median([p["rate"] / d["rate"] for d, p in pairs if d["rate"]])
        if scenario.kind == "stream":
            entry["total_ratio"] = median([p["total_ms"] / d["total_ms"] for d, p in pairs if d["total_ms"]])
            entry["ttft_delta_ms"] = median(
                [p["ttft_ms"] - d["ttft_ms"] for d, p in pairs if d["ttft_ms"] is not None and p["ttft_ms"] is not None]
            )
        if PEER in entry:
            # The peer, paired with the direct run and with the platform's run of the same round.
            peer_pairs = _pairs(mine, rounds, "direct", PEER)
            entry["peer_rate_ratio"] = median([p["rate"] / d["rate"] for d, p in peer_pairs if d["rate"]])
            entry["cpu_multiple"] = median(
                [
                    p["proxy_cpu_ms_per_request"] / v["proxy_cpu_ms_per_request"]
                    for p, v in _pairs(mine, rounds, "platform", PEER)
                    if p["proxy_cpu_ms_per_request"] and v["proxy_cpu_ms_per_request"]
                ]
            )
            if scenario.kind == "stream":
                entry["peer_total_ratio"] = median(
                    [p["total_ms"] / d["total_ms"] for d, p in peer_pairs if d["total_ms"]]
                )
                entry["peer_ttft_delta_ms"] = median(
                    [
                        p["ttft_ms"] - d["ttft_ms"]
                        for d, p in peer_pairs
                        if d["ttft_ms"] is not None and p["ttft_ms"] is not None
                    ]
                )
        summary[scenario.name] = entry
    return summary


def _pairs(
    runs: list[dict[str, Any]], rounds: int, first: str, second: str
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The (first, second) target runs of the same round."""
    return [
        (a, b)
        for rnd in range(rounds)
        for a in runs
        for b in runs
        if a["round"] == b["round"] == rnd and a["target"] == first and b["target"] == second
    ]


def evaluate(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figure and whether it is met."""
    summary = report["summary"]
    chat64 = summary.get("chat c64", {})
    stream16 = summary.get("stream c16", {})
    rate = chat64.get("platform", {}).get("rate")
    cpu = chat64.get("platform", {}).get("cpu_ms_per_request")
    ratio = stream16.get("total_ratio")
    delta = stream16.get("ttft_delta_ms")
    memory = report["memory"]
    peak = max(memory["rss_peak_sampled_mib"], memory["vm_hwm_mib"])
    errors = sum(r["errors"] for r in report["runs"])
    mismatches = sum(1 for r in report["runs"] if not r["counts_equal"])

    def item(name: str, target: str, measured: str, ok: bool | None) -> dict[str, Any]:
        return {"target": name, "goal": target, "measured": measured, "met": ok}

    counts = "equal" if not mismatches else f"{mismatches} run(s) differ"
    peer = []
    for name, summary_of in report.get("summaries", {}).items():
        multiple = summary_of.get("chat c64", {}).get("cpu_multiple")
        if multiple is not None:
            peer.append(
                item(
                    f"Platform CPU per request / vllm-router's (c64, {name})",
                    f"<= {TARGET_PEER_CPU_MULTIPLE}x",
                    f"{multiple:.2f}x",
                    multiple <= TARGET_PEER_CPU_MULTIPLE,
                )
            )
    return [
        *peer,
        item(
            "Throughput, non-streaming c64",
            f">= {TARGET_RATE_C64:,.0f} req/s",
            _num(rate, "{:,.0f} req/s"),
            None if rate is None else rate >= TARGET_RATE_C64,
        ),
        item(
            "Platform CPU per non-streaming request (c64)",
            f"<= {TARGET_CPU_MS} ms",
            _num(cpu, "{:.3f} ms"),
            None if cpu is None else cpu <= TARGET_CPU_MS,
        ),
        item(
            "Streaming total time vs direct (c16, median)",
            f"<= {TARGET_STREAM_TOTAL_RATIO}x",
            _num(ratio, "{:.3f}x"),
            None if ratio is None else ratio <= TARGET_STREAM_TOTAL_RATIO,
        ),
        item(
            "Streaming TTFT vs direct (c16, median)",
            f"<= +{TARGET_TTFT_DELTA_MS} ms",
            _num(delta, "{:+.2f} ms"),
            None if delta is None else delta <= TARGET_TTFT_DELTA_MS,
        ),
        item(
            "RSS of the web process (idle / peak)",
            f"<= {TARGET_RSS_MIB:.0f} MiB",
            f"{memory['rss_idle_mib']:.0f} / {peak:.0f} MiB",
            peak <= TARGET_RSS_MIB,
        ),
        item(
            "Errors; backend count = client count",
            "0; equal in every run",
            f"{errors}; {counts}",
            not errors and not mismatches,
        ),
    ]


def reference_ratio(path: Path) -> float | None:
    """The through-platform/direct c64 rate ratio of a reference results file (None when there is none)."""
    try:
        data = json.loads(path.read_text())
        return data["summary"]["chat c64"]["rate_ratio"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def gate(report: dict[str, Any], reference: float | None) -> tuple[bool, str]:
    """The regression guard: fail only on errors, count mismatches, or a gross throughput regression.

    "Gross" is relative to the reference run (the committed bench/results/latest.json): the through-platform
    c64 rate, as a fraction of the direct rate measured in the same run (which cancels the machine's speed),
    must stay above GATE_FRACTION of the reference's fraction, i.e. the platform did not get 4x slower.
    """
    reasons = []
    errors = sum(r["errors"] for r in report["runs"])
    if errors:
        reasons.append(f"{errors} error(s)")
    mismatches = [f"{r['scenario']}/{r['target']}" for r in report["runs"] if not r["counts_equal"]]
    if mismatches:
        reasons.append("backend/client counts differ in " + ", ".join(mismatches))
    ratio = report["summary"].get("chat c64", {}).get("rate_ratio")
    if reference is None:
        note = "no reference run: the rate is not gated"
    else:
        floor = GATE_FRACTION * reference
        note = (
            f"c64 platform/direct {_num(ratio, '{:.1%}')}, floor {floor:.1%} "
            f"({GATE_FRACTION:.0%} of the reference's {reference:.1%})"
        )
        if ratio is None or ratio < floor:
            reasons.append(f"gross throughput regression: {note}")
    return (not reasons, "; ".join(reasons) or f"no errors, counts equal; {note}")


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


# --- report ---------------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    """The results table (printed, and put into docs/performance.md)."""
    cfg = report["config"]
    lines = [
        f"Run `{report['label']}` ({report['mode']}), {report['started_at']}, commit `{report['git']['commit'][:10]}`"
        f"{' (dirty tree)' if report['git']['dirty'] else ''}; {cfg['rounds']} round(s), non-streaming runs of "
        f"{cfg['chat_duration_s']:g} s, streaming runs of {cfg['stream_duration_s']:g} s; medians over rounds, "
        f"ratios are medians of the per-round (adjacent) pairs.",
    ]
    lines += chat_table(report["summary"])
    lines += stream_table(report["summary"])
    lines += peer_tables(report)
    lines += ["", "| Target | Goal | Measured | Met |", "|---|---|---|---|"]
    for t in report["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {met} |")
    lines += notes(report)
    lines += profile_table(report.get("profile", {}).get("profiles", {}))
    return "\n".join(lines)


def chat_table(summary: dict[str, Any]) -> list[str]:
    """Non-streaming chat, direct against through the platform: rates, latencies, CPU, errors, counts."""
    lines = [
        "",
        "| Non-streaming chat (max_tokens 4) | Direct req/s | Platform req/s | Ratio | Direct p50 ms "
        "| Platform p50 ms | Platform p99 ms | Platform CPU ms/req | Errors | Counts |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for entry in summary.values():
        if entry["kind"] != "chat":
            continue
        d, p = entry["direct"], entry["platform"]
        lines.append(
            f"| c{entry['concurrency']} | {_num(d['rate'], '{:,.0f}')} | {_num(p['rate'], '{:,.0f}')} "
            f"| {_num(entry['rate_ratio'], '{:.2f}')} | {_num(d['latency_p50_ms'], '{:.2f}')} "
            f"| {_num(p['latency_p50_ms'], '{:.2f}')} | {_num(p['latency_p99_ms'], '{:.2f}')} "
            f"| {_num(p['cpu_ms_per_request'], '{:.3f}')} | {d['errors'] + p['errors']} "
            f"| {_counts(d, p)} |"
        )
    return lines


def stream_table(summary: dict[str, Any]) -> list[str]:
    """Streaming chat, direct against through the platform: TTFT, total time, CPU, errors, counts."""
    lines = [
        "",
        f"| Streaming chat ({STREAM_TOKENS} tokens, {STREAM_TOKEN_DELAY_S * 1000:g} ms/token) | Direct TTFT ms "
        "| Platform TTFT ms | TTFT delta ms | Direct total ms | Platform total ms | Total ratio "
        "| Platform CPU ms/stream | Errors | Counts |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for entry in summary.values():
        if entry["kind"] != "stream":
            continue
        d, p = entry["direct"], entry["platform"]
        lines.append(
            f"| c{entry['concurrency']} | {_num(d['ttft_ms'], '{:.2f}')} | {_num(p['ttft_ms'], '{:.2f}')} "
            f"| {_num(entry['ttft_delta_ms'], '{:+.2f}')} | {_num(d['total_ms'], '{:.1f}')} "
            f"| {_num(p['total_ms'], '{:.1f}')} | {_num(entry['total_ratio'], '{:.3f}')} "
            f"| {_num(p['cpu_ms_per_request'], '{:.3f}')} | {d['errors'] + p['errors']} | {_counts(d, p)} |"
        )
    return lines


def notes(report: dict[str, Any]) -> list[str]:
    """Memory, the mock's ceiling and the cores' use at c64, the placement and the machine's other load, the gate."""
    mem, place, ceiling = report["memory"], report["placement"], report.get("mock_ceiling")
    c64 = report["summary"].get("chat c64", {}).get("platform", {})
    return [
        "",
        f"- Memory of the web process: {mem['rss_after_start_mib']:.0f} MiB after start, "
        f"{mem['rss_idle_mib']:.0f} MiB idle after warm-up, peak {mem['rss_peak_sampled_mib']:.0f} MiB sampled "
        f"(VmHWM {mem['vm_hwm_mib']:.0f} MiB), {mem['rss_after_runs_mib']:.0f} MiB after the runs; idle CPU "
        f"{report['idle_cpu_ms_per_s']:.1f} ms/s.",
        f"- Mock ceiling (wrk on its own core, c64): {_num(ceiling and ceiling['rate'], '{:,.0f}')} req/s. "
        f"During the through-platform c64 runs the platform core was {_num(c64.get('platform_core_util'), '{:.0%}')}"
        f" busy, the mock {_num(c64.get('mock_core_util'), '{:.0%}')} and the client "
        f"{_num(c64.get('client_core_util'), '{:.0%}')} of a core.",
        f"- Placement{' of the tables above' if len(report.get('placements', {})) > 1 else ''}: "
        + (
            "nothing pinned (shared). "
            if place["platform"] is None
            else f"mock on CPU {place['mock']}, platform on CPU {place['platform']}, clients (wrk, stream "
            f"client) and this script on CPU {place['client']}. "
        )
        + f"Load from other processes on the machine: "
        f"{report['other_load_before_cores']:.2f} cores before the start, {report['other_load_cores']:.2f} during "
        f"the runs (median); {sum(r['noisy'] for r in report['runs'])} of {len(report['runs'])} runs above "
        f"{QUIET_CORES} cores (noisy), {len(report.get('discarded_noisy_runs', []))} noisy run(s) measured again.",
        f"- Gate (bench-quick): {'PASS' if report['gate']['passed'] else 'FAIL'} — {report['gate']['reason']}.",
    ]


def profile_table(profiles: dict[str, Any]) -> list[str]:
    """Where the platform's CPU goes per profiled run (py-spy's subsystems), with links to the flame graphs."""
    if not profiles:
        return []
    names = list(profiles)
    lines = ["", "| Where the platform's CPU goes (py-spy, share of samples) | " + " | ".join(names) + " |"]
    lines.append("|---|" + "---:|" * len(names))
    shares: dict[str, dict[str, float]] = {}
    for name, entry in profiles.items():
        for row in entry.get("by_subsystem", []):
            shares.setdefault(row["frame"], {})[name] = row["share"]
    for subsystem, per in sorted(shares.items(), key=lambda kv: -max(kv[1].values())):
        lines.append(f"| {subsystem} | " + " | ".join(f"{per.get(n, 0.0):.0%}" for n in names) + " |")
    links = ", ".join(f"[{n}](perf/{Path(e['svg']).name})" for n, e in profiles.items())
    lines += ["", f"Flame graphs: {links}."]
    return lines


def peer_tables(report: dict[str, Any]) -> list[str]:
    """The platform and vllm-router side by side, per placement: rates against direct, CPU per request."""
    summaries = {n: s for n, s in report.get("summaries", {}).items() if any(PEER in e for e in s.values())}
    if not summaries:
        return []
    lines = [
        "",
        f"| Peer: {PEER} (round_robin), same mock, same run | Placement | Direct req/s | Platform / direct "
        f"| {PEER} / direct | Platform CPU ms/req | {PEER} CPU ms/req | CPU multiple | Platform TTFT delta ms "
        f"| {PEER} TTFT delta ms | Errors | Counts |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, summary in summaries.items():
        for scenario, entry in summary.items():
            if PEER not in entry:
                continue
            d, p, v = entry["direct"], entry["platform"], entry[PEER]
            stream = entry["kind"] == "stream"
            counts = "equal" if d["counts_equal"] and p["counts_equal"] and v["counts_equal"] else "**differ**"
            lines.append(
                f"| {scenario} | {name} | {_num(d['rate'], '{:,.0f}')} | {_num(entry['rate_ratio'], '{:.2f}')} "
                f"| {_num(entry['peer_rate_ratio'], '{:.2f}')} | {_num(p['cpu_ms_per_request'], '{:.3f}')} "
                f"| {_num(v['cpu_ms_per_request'], '{:.3f}')} | {_num(entry['cpu_multiple'], '{:.2f}x')} "
                f"| {_num(entry.get('ttft_delta_ms') if stream else None, '{:+.2f}')} "
                f"| {_num(entry.get('peer_ttft_delta_ms') if stream else None, '{:+.2f}')} "
                f"| {d['errors'] + p['errors'] + v['errors']} | {counts} |"
            )
    lines += [
        "",
        "Pinned: the mock and the clients on one core, the platform (or vllm-router) alone on the other. Shared: "
        "nothing pinned, all of them on both cores. CPU per request is the proxy's process tree (/proc utime + "
        "stime, every thread) over the run, divided by the answered requests; the multiple is the median of the "
        "per-round platform / vllm-router ratios; ratios against direct are paired with the direct run of the "
        "same round and placement.",
    ]
    return lines


def _counts(d: dict[str, Any], p: dict[str, Any]) -> str:
    if d["counts_equal"] and p["counts_equal"]:
        return f"equal ({d['sent'] + p['sent']:,})"
    return f"**differ** (sent {d['sent'] + p['sent']}, backend {d['backend_requests'] + p['backend_requests']})"


def update_docs(table: str, start_marker: str = DOC_START, end_marker: str = DOC_END) -> bool:
    """Replace a section of docs/performance.md between two markers (the results by default); False without them."""
    if not DOCS.exists():
        return False
    text = DOCS.read_text()
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        return False
    DOCS.write_text(text[: start + len(start_marker)] + "\n\n" + table + "\n\n" + text[end:])
    return True


def git_info() -> dict[str, Any]:
    """Commit and whether the work tree has changes."""

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(git("status", "--porcelain"))}


# --- profiling ------------------------------------------------------------------------------------------------


def profile(bench: Bench, seconds: int, label: str) -> dict[str, Any]:
    """py-spy the platform under chat c64 and stream c16 load: flame graph SVGs and where the samples fall."""
    pyspy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(pyspy).exists():
        log("py-spy not found (pip install py-spy): skipping the profile")
        return {}
    out_dir = ROOT / "docs" / "perf"
    out_dir.mkdir(parents=True, exist_ok=True)
    assert bench.stack.web is not None
    result: dict[str, Any] = {"seconds": seconds, "rate_hz": PROFILE_HZ, "profiles": {}}
    for name in ("chat c64", "stream c16"):
        scenario = next(s for s in SCENARIOS if s.name == name)
        slug = name.replace(" ", "-")
        svg = out_dir / f"profile-{label}-{slug}.svg"
        raw = bench.stack.tmp / f"profile-{slug}.txt"
        entry: dict[str, Any] = {"svg": str(svg.relative_to(ROOT))}
        for fmt, path in (("raw", raw), ("flamegraph", svg)):
            log(f"profiling {name} ({fmt}, {seconds} s)")
            argv = [pyspy, "record", "--pid", str(bench.stack.web.pid), "--rate", str(PROFILE_HZ)]
            argv += ["--duration", str(seconds), "--format", fmt, "--output", str(path), "--nonblocking"]
            spy = subprocess.Popen(
                pinned(bench.placement["client"], argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            time.sleep(0.5)  # attach before the load starts
            run = bench.measure(scenario, "platform", seconds + 0.5)
            _, err = spy.communicate(timeout=60)
            if spy.returncode != 0:
                log(f"py-spy failed ({spy.returncode}): {err.strip()[-500:]}")
            entry[f"{fmt}_run"] = {"rate": run["rate"], "cpu_ms_per_request": run["platform_cpu_ms_per_request"]}
        if raw.exists():
            entry.update(top_frames(raw))
            kept = RESULTS / f"{label}-profile-{slug}.collapsed.gz"
            RESULTS.mkdir(parents=True, exist_ok=True)
            kept.write_bytes(gzip.compress(raw.read_bytes()))
            entry["collapsed_stacks"] = str(kept.relative_to(ROOT))
        result["profiles"][name] = entry
    return result


# Subsystems of the profile summary, by the file of a frame (platform code last: see _category).
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("upstream HTTP client (httpx, httpcore, anyio, h11)", ("httpx/", "httpcore/", "anyio/", "h11/", "sniffio/")),
    ("request validation (DRF serializers)", ("rest_framework/", "routing/serializers.py")),
    ("Django (validators, ORM, utils)", ("django/",)),
    ("ASGI server (uvicorn + httptools)", ("uvicorn/",)),
    ("channels router", ("channels/",)),
    ("platform code (gateway, dispatch, auth, usage)", ("routing/", "backends/", "llm_platform/")),
]
EVENT_LOOP = "event loop (uvloop: epoll, socket I/O, callbacks) and other"
BOOTSTRAP = ("uvicorn/main.py", "uvicorn/server.py", "uvicorn/_compat.py", "uvicorn/__main__.py", "click/")


def top_frames(path: Path, limit: int = 25) -> dict[str, Any]:
    """Self time per function and per module, and time per subsystem, from py-spy's collapsed stacks."""
    by_function: dict[str, int] = {}
    by_module: dict[str, int] = {}
    by_category: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        function, where = _frame(frames[-1])
        key = f"{function} ({where})"
        by_function[key] = by_function.get(key, 0) + count
        module = where if where.startswith(("routing/", "backends/", "llm_platform/")) else where.split("/")[0]
        module = module.removesuffix(".py")
        by_module[module] = by_module.get(module, 0) + count
        category = _category([_frame(f)[1] for f in frames])
        by_category[category] = by_category.get(category, 0) + count

    def ranked(table: dict[str, int], size: int = limit) -> list[dict[str, Any]]:
        items = sorted(table.items(), key=lambda kv: -kv[1])[:size]
        return [{"frame": k, "samples": v, "share": v / total if total else 0.0} for k, v in items]

    return {
        "samples": total,
        "by_subsystem": ranked(by_category),
        "top_self": ranked(by_function),
        "by_module": ranked(by_module),
    }


def _category(files: list[str]) -> str:
    """The subsystem a sample belongs to: the first library entered below the deepest platform frame.

    Samples with no platform frame (e.g. uvicorn parsing a request) go to the innermost library they are in;
    uvicorn's start-up frames at the root of every stack do not count, so time spent inside the event loop
    itself (uvloop's C code: epoll, socket reads and writes, callbacks) is the event loop's.
    """
    names = [
        None
        if f.startswith(BOOTSTRAP)
        else next((name for name, prefixes in CATEGORIES if f.startswith(prefixes)), None)
        for f in files
    ]
    platform = CATEGORIES[-1][0]
    deepest = max((i for i, name in enumerate(names) if name == platform), default=-1)
    if deepest >= 0:
        return next((name for name in names[deepest + 1 :] if name is not None), platform)
    return next((name for name in reversed(names) if name is not None), EVENT_LOOP)


def _frame(frame: str) -> tuple[str, str]:
    """("function", "file") of a py-spy frame "function (file:line)"."""
    function, _, rest = frame.partition(" (")
    return function, rest.rsplit(":", 1)[0]


# --- main -----------------------------------------------------------------------------------------------------


def placement_from(args: argparse.Namespace) -> dict[str, int | None]:
    """Which CPU each side runs on: mock and clients share the first, the platform gets the second."""
    cpus = sorted(os.sched_getaffinity(0))
    if getattr(args, "workers", 1) > 1:
        log("several platform workers: nothing is pinned (the workers spread over every core)")
        return {"mock": None, "platform": None, "client": None}
    if len(cpus) < 2:
        log("fewer than 2 CPUs available: nothing is pinned, figures are not comparable with the docs")
        return {"mock": None, "platform": None, "client": None}
    return {
        "mock": cpus[0] if args.mock_cpu is None else args.mock_cpu,
        "platform": cpus[1] if args.platform_cpu is None else args.platform_cpu,
        "client": cpus[0] if args.client_cpu is None else args.client_cpu,
    }


@contextlib.contextmanager
def started(args: argparse.Namespace, placement: dict[str, int | None]) -> Iterator[Stack]:
    """A started Stack, always stopped at the end."""
    stack = Stack(args, placement)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _add_run_options(parser)
    _add_platform_options(parser)
    _add_check_options(parser)
    return _with_defaults(parser.parse_args(argv))


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """How long and how often to measure, and where the results go."""
    parser.add_argument("--quick", action="store_true", help="one short round (~20 s): the regression guard")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per non-streaming run (default 8; quick 1)")
    parser.add_argument("--stream-duration", type=float, help="seconds per streaming run (default 8; quick 1)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for other processes to use < 0.25 cores (shared machines)",
    )
    parser.add_argument("--label", help="names the run and its files (default: latest; quick for --quick)")
    parser.add_argument(
        "--out",
        type=Path,
        help="results JSON (default bench/results/<label>.json; --quick: bench/results/quick.json.tmp, untracked)",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/performance.md")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="SECONDS",
        help="also py-spy the platform for SECONDS under c64 load (needs py-spy)",
    )
    parser.add_argument("--stream-client", choices=("raw", "httpx"), default="raw")


def _add_platform_options(parser: argparse.ArgumentParser) -> None:
    """What is measured: placement, the peer, the platform's server, workers, key, CPUs, environment, strategy."""
    parser.add_argument(
        "--placement",
        choices=("pinned", "shared", "both"),
        help="pinned: mock and clients on one core, the proxy alone on the other; shared: nothing pinned; both: "
        "the two alternately in every round (default both; quick: pinned)",
    )
    parser.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        help=f"also measure {PEER} (round_robin) on the same mock in the same runs (default on; quick: off)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes of the platform (several: the production server llm_platform/serve.py, nothing "
        "is pinned, CPU counts the whole tree)",
    )
    parser.add_argument(
        "--shared-socket",
        action="store_true",
        help="with --workers: uvicorn's own supervisor (one shared socket) instead of one SO_REUSEPORT socket each",
    )
    parser.add_argument(
        "--server",
        choices=("uvicorn", "granian", "daphne"),
        default="uvicorn",
        help="ASGI server of the platform (the comparison in docs/deploy.md); default: uvicorn, as make run",
    )
    parser.add_argument(
        "--key",
        choices=("api", "master"),
        default="api",
        help="through-platform requests use a fresh unlimited API key (default) or the master key",
    )
    parser.add_argument("--mock-cpu", type=int)
    parser.add_argument("--platform-cpu", type=int)
    parser.add_argument("--client-cpu", type=int)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the platform (e.g. DJANGO_DEBUG=0)",
    )
    parser.add_argument(
        "--strategy",
        default="round_robin",
        help="the demo pool's routing strategy (e.g. prefix_aware, to compare its cost with round_robin's)",
    )


def _add_check_options(parser: argparse.ArgumentParser) -> None:
    """Noisy runs, the regression gate's reference, strictness, the temporary directory."""
    parser.add_argument(
        "--retry-noisy",
        type=int,
        default=0,
        metavar="N",
        help="measure a run again (up to N times) when other processes used > 0.25 cores during it",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=RESULTS / "latest.json",
        help="results file the regression gate compares with (default bench/results/latest.json)",
    )
    parser.add_argument("--strict", action="store_true", help="also exit non-zero when a target is missed")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary state directory and logs")


def _with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the defaults that depend on --quick, --placement and --peer."""
    args.placement = args.placement or ("pinned" if args.quick else "both")
    args.peer = (not args.quick) if args.peer is None else args.peer
    args.rounds = args.rounds or (1 if args.quick else 3)
    # Both placements and the peer triple the runs: shorter runs keep a full bench near 10 minutes.
    runs_s = 1.0 if args.quick else (5.0 if args.placement == "both" and args.peer else 8.0)
    args.duration = args.duration or runs_s
    args.stream_duration = args.stream_duration or runs_s
    args.label = args.label or ("quick" if args.quick else "latest")
    if args.out is None and args.quick and args.label == "quick":
        args.out = RESULTS / "quick.json.tmp"  # the guard's result is not kept in git
    return args


def other_load(window_s: float) -> float:
    """Cores used by other processes (all busy time minus ours) over a window."""
    busy0, self0, t0 = system_busy_s(), rusage_s(resource.RUSAGE_SELF), time.monotonic()
    time.sleep(window_s)
    ours = rusage_s(resource.RUSAGE_SELF) - self0
    return max(0.0, system_busy_s() - busy0 - ours) / (time.monotonic() - t0)


def wait_quiet(max_wait_s: float, window_s: float) -> float:
    """Measure the machine's load from other processes, waiting up to max_wait_s for it to drop; return it."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = other_load(window_s)
        if load <= QUIET_CORES or time.monotonic() >= deadline:
            return load
        log(f"other processes use {load:.2f} cores: waiting for a quieter machine")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def round_runs(
    args: argparse.Namespace,
    bench: Bench,
    rnd: int,
    order: list[str],
    runs: list[dict[str, Any]],
    discarded: list[dict[str, Any]],
) -> None:
    """One round in the current placement: every scenario, every target in this round's order."""
    for scenario in SCENARIOS:
        duration = args.duration if scenario.kind == "chat" else args.stream_duration
        for target in order:
            run = bench.measure(scenario, target, duration)
            for _ in range(args.retry_noisy):
                if not run["noisy"]:
                    break
                discarded.append(run)
                log("noisy run (other processes were busy): measuring it again")
                wait_quiet(args.wait_quiet or 30.0, 1.0)
                run = bench.measure(scenario, target, duration)
            run["round"] = rnd
            runs.append(run)


@dataclass
class Measured:
    """What one start of the stack measured: everything the report needs from the running processes."""

    ceiling: dict[str, Any]
    memory: dict[str, float]
    idle_cpu_ms_per_s: float
    runs: list[dict[str, Any]]
    discarded: list[dict[str, Any]]
    profiled: dict[str, Any]
    web_argv: list[str]
    key_kind: str
    router_argv: Any


def placements_wanted(args: argparse.Namespace) -> dict[str, dict[str, int | None]]:
    """The placements to measure by name (pinned, shared or both), the first one the stack starts in."""
    pinned_placement = placement_from(args)
    shared: dict[str, int | None] = {"mock": None, "platform": None, "client": None}
    wanted = PLACEMENTS if args.placement == "both" else (args.placement,)
    return {name: pinned_placement if name == "pinned" else shared for name in wanted}


def warm_up(args: argparse.Namespace, bench: Bench) -> None:
    """Short runs that load the code paths and connections before anything is measured."""
    log("warm-up")
    if not args.quick:
        bench.measure(CHAT64, "direct", 1.5)
    bench.measure(CHAT64, "platform", 0.6 if args.quick else 2.5)
    bench.measure(STREAM16, "platform", 0.3 if args.quick else 1.0)
    time.sleep(0.5)


def idle_figures(web_tree: list[int], window_s: float) -> tuple[int, float]:
    """The web process's RSS (KiB) when idle, and its CPU (ms per second) over an idle window."""
    idle_cpu0, idle_t0 = cpu_seconds(web_tree), time.monotonic()
    rss_idle = status_kib(web_tree, "VmRSS")
    time.sleep(window_s)
    return rss_idle, (cpu_seconds(web_tree) - idle_cpu0) * 1000 / (time.monotonic() - idle_t0)


def all_rounds(
    args: argparse.Namespace, bench: Bench, placements: dict[str, dict[str, int | None]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every round in every placement (the runs, and the noisy runs measured again); back to the first placement."""
    runs: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    targets = ["direct", "platform", *([PEER] if args.peer else [])]
    for rnd in range(args.rounds):
        # Alternate who goes first: rotate the targets each round (two targets: swap them).
        order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
        for name in placements if rnd % 2 == 0 else list(reversed(placements)):
            if len(placements) > 1 or name != bench.placement_name:
                bench.place(name, placements[name])
            log(f"round {rnd + 1}/{args.rounds}, {name} ({' then '.join(order)})")
            round_runs(args, bench, rnd, order, runs, discarded)
    first = next(iter(placements))
    if len(placements) > 1:
        bench.place(first, placements[first])
    return runs, discarded


def measure_all(
    args: argparse.Namespace, stack: Stack, placements: dict[str, dict[str, int | None]], wrk: str, t0: float
) -> Measured:
    """Warm up, measure the idle process and the mock's ceiling, run every round, read the memory, profile."""
    placement = placements[next(iter(placements))]
    assert stack.web is not None
    web_tree = process_tree(stack.web.pid)
    log(
        f"mock {stack.mock_url} (pid {stack.mock.pid if stack.mock else '?'}), platform {stack.url} "
        f"(pid {stack.web.pid}) up in {time.monotonic() - t0:.1f} s; placement {placement}"
    )
    rss_after_start = status_kib(web_tree, "VmRSS")
    bench = Bench(args, stack, placement, wrk)
    warm_up(args, bench)
    rss_idle, idle_cpu_ms_per_s = idle_figures(web_tree, 1.0 if args.quick else 3.0)
    log("mock ceiling: wrk on the platform's idle core against the mock alone")
    ceiling = bench.measure(CHAT64, "direct", 0.6 if args.quick else 3.0, client_cpu=placement["platform"])
    ceiling["note"] = "wrk on the platform's (idle) core, the mock alone on its own core"
    runs, discarded = all_rounds(args, bench, placements)
    time.sleep(0.5 if args.quick else 2.0)
    memory = {
        "rss_after_start_mib": rss_after_start / 1024,
        "rss_idle_mib": rss_idle / 1024,
        "rss_peak_sampled_mib": bench.peak_rss_kib / 1024,
        "vm_hwm_mib": status_kib(web_tree, "VmHWM") / 1024,
        "rss_after_runs_mib": status_kib(web_tree, "VmRSS") / 1024,
    }
    return Measured(
        ceiling=ceiling,
        memory=memory,
        idle_cpu_ms_per_s=idle_cpu_ms_per_s,
        runs=runs,
        discarded=discarded,
        profiled=profile(bench, args.profile, args.label) if args.profile else {},
        web_argv=stack.web_argv,
        key_kind=stack.key_kind,
        router_argv=next((p.args for n, p in stack.procs if n == PEER), None),
    )


def build_report(
    args: argparse.Namespace,
    measured: Measured,
    placements: dict[str, dict[str, int | None]],
    *,
    wrk: str,
    started_at: str,
    t0: float,
    load_before: float,
    reference: float | None,
) -> dict[str, Any]:
    """The results: set-up, runs, summaries per placement, targets and the regression gate."""
    first = next(iter(placements))
    placement = placements[first]
    runs = measured.runs
    report: dict[str, Any] = {
        "label": args.label,
        "mode": "quick" if args.quick else "full",
        "started_at": started_at,
        "elapsed_s": time.monotonic() - t0,
        "git": git_info(),
        "host": {
            "cpus": os.cpu_count(),
            "python": pyplatform.python_version(),
            "kernel": pyplatform.release(),
            "wrk": (subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.splitlines() or [""])[0],
        },
        "placement": placement,
        "config": {
            "rounds": args.rounds,
            "chat_duration_s": args.duration,
            "stream_duration_s": args.stream_duration,
            "chat_max_tokens": CHAT_MAX_TOKENS,
            "stream_tokens": STREAM_TOKENS,
            "stream_token_delay_s": STREAM_TOKEN_DELAY_S,
            "stream_client": args.stream_client,
            "client_key": measured.key_kind,
            "platform_argv": [*pinned(placement["platform"], ["python"]), *measured.web_argv[1:]],
            "extra_env": args.env,
        },
        "mock_ceiling": measured.ceiling,
        "memory": measured.memory,
        "idle_cpu_ms_per_s": measured.idle_cpu_ms_per_s,
        "runs": runs,
        "discarded_noisy_runs": measured.discarded,
        "summary": summarize([r for r in runs if r["placement"] == first], args.rounds),
        "summaries": {name: summarize([r for r in runs if r["placement"] == name], args.rounds) for name in placements},
        "placements": placements,
        "peer": {"name": PEER, "argv": measured.router_argv} if args.peer else None,
        "other_load_cores": median([r["other_load_cores"] for r in runs]) or 0.0,
        "other_load_before_cores": load_before,
        "gate_reference": {"file": str(args.reference), "c64_rate_ratio": reference},
        "profile": measured.profiled,
    }
    report["targets"] = evaluate(report)
    passed, reason = gate(report, reference)
    report["gate"] = {"passed": passed, "reason": reason}
    return report


def publish(args: argparse.Namespace, report: dict[str, Any]) -> int:
    """Write the results JSON, print the table (and put it into the docs after a full run); the exit status."""
    table = markdown(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"{args.label}.json"
    out.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    print(table, flush=True)
    log(f"results written to {out} in {report['elapsed_s']:.0f} s")
    if not args.quick and not args.no_docs and update_docs(table):
        log(f"table written into {DOCS.relative_to(ROOT)}")
    if report["other_load_cores"] > QUIET_CORES:
        log(f"WARNING: other processes used {report['other_load_cores']:.2f} cores during the runs: noisy figures")
    if not report["gate"]["passed"]:
        log(f"GATE FAILED: {report['gate']['reason']}")
        return 1
    if args.strict and not all(t["met"] for t in report["targets"]):
        log("some targets are not met (--strict)")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Start, warm up, measure, report."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # stop the mock and the platform on SIGTERM too
    wrk = ensure_wrk()
    placements = placements_wanted(args)
    placement = placements[next(iter(placements))]
    if placement["client"] is not None:
        os.sched_setaffinity(0, {placement["client"]})  # keep this script off the platform's core
    started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    reference = reference_ratio(args.reference)
    load_before = wait_quiet(args.wait_quiet, 0.5 if args.quick else 2.0)
    if load_before > QUIET_CORES:
        log(f"WARNING: the machine is busy before the start ({load_before:.2f} cores used by other processes)")
    t0 = time.monotonic()
    with started(args, placement) as stack:
        measured = measure_all(args, stack, placements, wrk, t0)
    report = build_report(
        args,
        measured,
        placements,
        wrk=wrk,
        started_at=started_at,
        t0=t0,
        load_before=load_before,
        reference=reference,
    )
    return publish(args, report)


if __name__ == "__main__":
    sys.exit(main())
