"""Start the whole platform for a developer: web (ASGI), Celery worker + beat, and the demo backend.

Called by `make run` after the virtualenv is ready. Refuses to start when a port it needs is taken (an earlier
`make run` still running would otherwise answer in place of the new one). Migrates, loads the demo registry (or
registers VLLM_BACKEND_URL), ensures an admin user, starts every process, prints how to use it, and on Ctrl-C,
SIGTERM or SIGHUP stops everything it started.

Nothing outlives it: every child is started with PR_SET_PDEATHSIG (the kernel sends it SIGTERM when this process
dies, even by SIGKILL), and the first signal starts one orderly stop that later signals do not interrupt (SIGTERM
sent to the whole process group of `make run` reaches make and this process, often more than once). The stop sends
SIGTERM to each child's main process only — Celery's main process then finishes its warm shutdown and stops its
own pool — and SIGKILLs each child's process group after the grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.procs import wait_http  # noqa: E402

PY = sys.executable
LOCAL = Path(os.environ.get("LOCAL_STATE_DIR", ROOT / ".local"))


def log(message: str) -> None:
    """Print a supervisor line."""
    print(f"[run] {message}", flush=True)


def master_key() -> str:
    """ROUTER_MASTER_KEY from the environment, else the one generated on first start (kept in .local/)."""
    key = os.environ.get("ROUTER_MASTER_KEY", "")
    if key:
        return key
    path = LOCAL / "master_key"
    if path.exists():
        return path.read_text().strip()
    LOCAL.mkdir(parents=True, exist_ok=True)
    key = "sk-router-" + secrets.token_urlsafe(24)
    path.write_text(key + "\n")
    path.chmod(0o600)
    log(f"generated a master key in {path} (untracked)")
    return key


PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE_S = 15.0  # after SIGTERM, how long children get before SIGKILL (the web server's own grace is shorter)
WEB_GRACE_S = 10


def _prctl() -> object | None:
    """libc's prctl (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


PRCTL = _prctl()


def die_with(parent: int) -> None:
    """In a new child, before exec: ask the kernel for SIGTERM when `parent` dies (kept across exec).

    If the parent died already (between fork and this call), the signal would never come: exit at once.
    """
    if PRCTL is not None:
        PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)  # type: ignore[operator]
    if os.getppid() != parent:
        os._exit(1)


def port_in_use(host: str, port: int) -> OSError | None:
    """None when nothing listens on host:port, else the bind error (TIME_WAIT leftovers are no conflict)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


class Supervisor:
    """Starts child processes in their own sessions, bound to this process's life, and stops them all together."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopping = False

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start one child process (new session, so a terminal Ctrl-C reaches only us; dies with us)."""
        parent = os.getpid()
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=self.env, start_new_session=True, preexec_fn=lambda: die_with(parent)
        )
        self.children.append((name, proc))
        log(f"started {name} (pid {proc.pid})")
        return proc

    def stop(self, grace_s: float = GRACE_S) -> None:
        """SIGTERM every child's main process, wait for the grace period, then SIGKILL each child's process group.

        Only the main process gets SIGTERM: Celery's pool children are stopped by Celery's warm shutdown, which a
        signal sent to them directly would cut short.
        """
        self.stopping = True
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name, proc in self.children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{name} did not stop in time; killing it")
            # Whatever is left in its session (a pool process that outlived its parent, or all of it): gone now.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log("all processes stopped")


def main() -> int:
    """Prepare, start, print, supervise."""
    port = int(os.environ.get("PORT", "8000"))
    mock_port = int(os.environ.get("MOCK_PORT", "8101"))
    host = os.environ.get("HOST", "127.0.0.1")
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "llm_platform.settings")
    env.setdefault("DJANGO_DEBUG", "1")  # the one place debug mode is switched on: a developer's own machine
    env["ROUTER_MASTER_KEY"] = key = master_key()
    env["PYTHONUNBUFFERED"] = "1"
    real_backend = bool(env.get("VLLM_BACKEND_URL", "").strip())

    # Every port first: an earlier `make run` still holding one would otherwise answer in place of this one.
    ports = [(host, port, "web")]
    if not real_backend:
        ports += [
            ("127.0.0.1", mock_port + index, f"mock vLLM #{index + 1}")
            for index in range(int(env.get("MOCK_BACKENDS", "1")))
        ]
    for where, number, name in ports:
        busy = port_in_use(where, number)
        if busy is not None:
            log(
                f"port {number} ({name}, {where}) is already in use ({busy.strerror}): is an earlier `make run` "
                f"still running? Stop it, or choose other ports (PORT, MOCK_PORT). Nothing was started."
            )
            return 1

    supervisor = Supervisor(env)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # The first signal starts the one orderly stop; later ones (a group SIGTERM often comes twice, or a
        # SIGHUP after it) must not interrupt it halfway and leave children behind.
        for ignored in STOP_SIGNALS:
            signal.signal(ignored, signal.SIG_IGN)
        log(f"{signal.Signals(signum).name}: stopping")
        raise KeyboardInterrupt

    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, on_signal)
    if PRCTL is not None:
        PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)  # type: ignore[operator]  # `make` killed: stop in order
    try:
        mock_urls: list[str] = []
        if not real_backend:
            # MOCK_BACKENDS=N starts N mocks on consecutive ports: a pool to try strategies, failover and drain.
            for index in range(int(env.get("MOCK_BACKENDS", "1"))):
                port_i = mock_port + index
                argv = [PY, "-m", "backends.mock_vllm", "--host", "127.0.0.1", "--port", str(port_i)]
                # Each mock has its own prefix cache; a prefill cost per uncached token makes hits visibly faster.
                argv += ["--prefix-cache-blocks", env.get("MOCK_PREFIX_CACHE_BLOCKS", "4096").strip() or "4096"]
                argv += ["--prefill-ms-per-token", env.get("MOCK_PREFILL_MS_PER_TOKEN", "0").strip() or "0"]
                mock = supervisor.start(
                    f"mock vLLM #{index + 1}", [*argv, "--model", "mock-chat", "--embed-model", "mock-embed"]
                )
                if not wait_http(f"http://127.0.0.1:{port_i}/health", 30, mock):
                    log("the mock backend did not start")
                    return 1
                mock_urls.append(f"http://127.0.0.1:{port_i}")
        migrate_env = {**env, "DB_STATEMENT_TIMEOUT_MS": "0"}  # a migration may run longer than a request's bound
        subprocess.run([PY, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=migrate_env, check=True)
        setup = [PY, "manage.py", "setup_platform"]
        for url in mock_urls:
            setup += ["--mock-url", url]
        subprocess.run(setup, cwd=ROOT, env=env, check=True)
        # The production server module with one worker: the same uvicorn settings as `make serve`, request-head
        # bounds included (llm_platform/serve.py).
        web_argv = [
            PY,
            "-m",
            "llm_platform.serve",
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            "1",
            "--graceful-timeout",
            str(WEB_GRACE_S),
        ]
        if env.get("ACCESS_LOG", "") in {"1", "true", "yes"}:
            web_argv.append("--access-log")
        web = supervisor.start("web (uvicorn, llm_platform.serve)", web_argv)
        supervisor.start(
            "celery worker + beat",
            [
                PY,
                "-m",
                "celery",
                "-A",
                "llm_platform",
                "worker",
                "--beat",
                "--loglevel",
                env.get("CELERY_LOG_LEVEL", "warning"),
                "--concurrency",
                "2",
                "--schedule",
                str(LOCAL / "celerybeat-schedule"),
            ],
        )
        if not wait_http(f"http://127.0.0.1:{port}/readyz", 60, web) or web.poll() is not None:
            log("the web process did not become ready")
            return 1
        banner(host, port, key, real_backend)
        parent = os.getppid()
        while True:
            for name, proc in supervisor.children:
                if proc.poll() is not None:
                    log(f"{name} exited with {proc.returncode}; stopping everything")
                    return 1
            if os.getppid() != parent:
                # `make` was killed (it does not forward SIGTERM) where PR_SET_PDEATHSIG is missing: stop too.
                log("parent process gone; stopping")
                return 0
            time.sleep(0.5)
    except KeyboardInterrupt:
        log("stopping")
        return 0
    except subprocess.CalledProcessError as exc:
        log(f"setup step failed: {exc}")
        return 1
    finally:
        for ignored in STOP_SIGNALS:  # nothing interrupts the stop (see on_signal)
            signal.signal(ignored, signal.SIG_IGN)
        supervisor.stop()


def banner(host: str, port: int, key: str, real_backend: bool) -> None:
    """Print where everything is and how to call it."""
    base = f"http://{host}:{port}"
    password_file = LOCAL / "admin_password"
    if os.environ.get("DJANGO_SUPERUSER_PASSWORD"):
        password = "(from DJANGO_SUPERUSER_PASSWORD)"
    elif password_file.exists():
        password = password_file.read_text().strip()
    else:
        password = "(unchanged; set DJANGO_SUPERUSER_PASSWORD to reset it)"
    model = os.environ.get("VLLM_MODEL_NAME", "<your model>") if real_backend else "mock-chat"
    print(
        f"""
==============================================================================================
 LLM routing platform is up.
   Admin:        {base}/admin/   user: {os.environ.get("DJANGO_SUPERUSER_USERNAME", "admin")}   password: {password}
   API base URL: {base}/v1
   API key:      {key}
   Backend:      {"VLLM_BACKEND_URL=" + os.environ["VLLM_BACKEND_URL"] if real_backend else "bundled mock vLLM"}

 curl:
   curl {base}/v1/chat/completions -H "Authorization: Bearer {key}" \\
     -H "Content-Type: application/json" \\
     -d '{{"model": "{model}", "messages": [{{"role": "user",
           "content": "In one word, can you provide me the capital of France?"}}]}}'

 openai SDK:
   from openai import OpenAI
   client = OpenAI(base_url="{base}/v1", api_key="{key}")
   print(client.chat.completions.create(model="{model}",
         messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)

 Ctrl-C stops everything.
==============================================================================================
""",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
