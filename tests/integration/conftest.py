"""E2E fixtures: a real vLLM pool registered in the test database, the platform in front of it, request timings.

The suite runs only with `-m e2e` (pyproject's addopts deselect it) and is skipped unless `VLLM_BACKEND_URL` is
set. Environment:

- `VLLM_BACKEND_URL`       comma-separated vLLM base URLs: one pool of several backends serving the chat model
- `VLLM_MODEL_NAME`        the served chat model (default: the first id the first backend lists at /v1/models)
- `VLLM_EMBED_URL`         optional vLLM serving an embedding model (enables the embeddings test)
- `VLLM_EMBED_MODEL_NAME`  its served model (default: discovered)
- `VLLM_API_KEY`           optional bearer key the backends expect (vLLM `--api-key`)
- `E2E_CAN_KILL_BACKEND=1` `scripts/real_backend.sh` manages the pool, so the failover test may stop one server
- `E2E_REQUIRE=1`          a skipped E2E test counts as a failure (set by `scripts/e2e.sh` for the local pool)
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MASTER_KEY
from tests.live import PlatformProcess

E2E_DIR = Path(__file__).resolve().parent
MAX_REQUEST_S = 30.0  # the seed's alarm threshold: any single request slower than this fails the suite
CHAT_POOL = "e2e-chat"
SLOW_POOL = "e2e-slow"
EMBED_POOL = "e2e-embed"
SLOW_READ_TIMEOUT_S = 0.05
SKIP_NO_BACKEND = (
    "E2E skipped: VLLM_BACKEND_URL is not set (run `make e2e` for a local CPU vLLM, or export VLLM_BACKEND_URL "
    "for a running vLLM; see docs/testing.md)"
)
# The seed document's expectations, printed next to what this run measured.
EXPECTED_LATENCIES = (
    ("Mock (make test)", "~20 ms", "CI/CD, development"),
    ("vLLM 7B (GPU)", "1-3 s", "production"),
    ("vLLM 13B (GPU)", "3-7 s", "production"),
    ("vLLM 70B (GPU)", "10-30 s", "production"),
)


# --- configuration --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class E2EConfig:
    """What the environment points the suite at, completed by asking the backends themselves."""

    backend_urls: tuple[str, ...]
    model: str
    max_model_len: int | None
    embed_url: str | None
    embed_model: str | None
    api_key: str
    can_kill_backend: bool

    @property
    def backend_headers(self) -> dict[str, str]:
        """Headers for calling a backend directly (bypassing the platform)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class E2ERegistry:
    """Names of the registry rows the suite created."""

    model: str
    slow_model: str
    embed_model: str | None
    backends: dict[str, str]  # backend name -> base URL, in pool order


def _env_urls(name: str) -> list[str]:
    return [u.strip().rstrip("/").removesuffix("/v1") for u in os.environ.get(name, "").split(",") if u.strip()]


def _listed_models(url: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    """The /v1/models entries of a backend; fails the session with a clear message when it cannot be reached."""
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
        response.raise_for_status()
        return list(response.json()["data"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    pytest.fail(  # outside the except block: no chained traceback, just the message
        f"E2E: the vLLM backend {url} is not usable ({problem}). Is it running and reachable? "
        f"Try: curl {url}/health && curl {url}/v1/models",
        pytrace=False,
    )


def _pick_model(url: str, entries: list[dict[str, Any]], wanted: str | None, env_name: str) -> dict[str, Any]:
    ids = [str(e.get("id")) for e in entries]
    if not entries:
        pytest.fail(f"E2E: {url}/v1/models lists no model", pytrace=False)
    if not wanted:
        return entries[0]
    for entry in entries:
        if entry.get("id") == wanted:
            return entry
    pytest.fail(
        f"E2E: {env_name}={wanted!r} is not served by {url} (it serves {ids}); fix {env_name} or the vLLM "
        "--served-model-name",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def e2e_config() -> E2EConfig:
    """Read the environment and check every backend answers /v1/models with the expected model."""
    urls = _env_urls("VLLM_BACKEND_URL")
    if not urls:
        pytest.skip(SKIP_NO_BACKEND)
    api_key = os.environ.get("VLLM_API_KEY", "")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    wanted = os.environ.get("VLLM_MODEL_NAME", "").strip() or None
    entry = _pick_model(urls[0], _listed_models(urls[0], headers), wanted, "VLLM_MODEL_NAME")
    model = str(entry["id"])
    for url in urls[1:]:
        _pick_model(url, _listed_models(url, headers), model, "VLLM_MODEL_NAME")
    max_len = entry.get("max_model_len")
    embed_url = next(iter(_env_urls("VLLM_EMBED_URL")), None)
    embed_model = None
    if embed_url:
        wanted_embed = os.environ.get("VLLM_EMBED_MODEL_NAME", "").strip() or None
        embed_entries = _listed_models(embed_url, headers)
        embed_model = str(_pick_model(embed_url, embed_entries, wanted_embed, "VLLM_EMBED_MODEL_NAME")["id"])
    return E2EConfig(
        backend_urls=tuple(urls),
        model=model,
        max_model_len=int(max_len) if isinstance(max_len, int) else None,
        embed_url=embed_url,
        embed_model=embed_model,
        api_key=api_key,
        can_kill_backend=os.environ.get("E2E_CAN_KILL_BACKEND") == "1",
    )


# --- database and registry ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> None:
    """Use a test database of its own, so a `make test` running at the same time cannot drop it under us."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    test = db.setdefault("TEST", {})
    if db["ENGINE"].endswith("sqlite3"):
        name = Path(test.get("NAME") or settings.LOCAL_DIR / "test_db.sqlite3")
        test["NAME"] = str(name.with_name(f"{name.stem}_e2e{name.suffix}"))
    else:
        test["NAME"] = f"{test.get('NAME') or 'test_' + db['NAME']}_e2e"


@pytest.fixture(scope="session")
def django_db_setup(
    request: pytest.FixtureRequest,
    django_test_environment: None,
    django_db_blocker: Any,
    django_db_keepdb: bool,
    django_db_createdb: bool,
    django_db_modify_db_settings: None,
) -> Iterator[None]:
    """Create the test database for the E2E session.

    pytest-django's own fixture only sets up the databases of tests marked `django_db` (or using `db`). These
    tests are not marked: that marker is function-scoped, and with `transaction=True` it would flush the rows
    the session registered after the first test. Without this override the session would write to the
    development database.
    """
    from django.test.utils import setup_databases, teardown_databases

    verbosity = request.config.option.verbose
    keepdb = django_db_keepdb and not django_db_createdb
    with django_db_blocker.unblock():
        config = setup_databases(verbosity=verbosity, interactive=False, aliases={"default"}, keepdb=keepdb)  # type: ignore[arg-type]  # django-stubs: Mapping, Django: any collection
    yield
    if not django_db_keepdb:
        with django_db_blocker.unblock():
            teardown_databases(config, verbosity=verbosity)


@pytest.fixture(scope="session")
def e2e_registry(django_db_setup: None, django_db_blocker: Any, e2e_config: E2EConfig) -> Iterator[E2ERegistry]:
    """Register the pool, a too-impatient copy of it and the embedding server; committed, so the platform sees them."""
    from django.db import connection

    from backends.models import Backend, GpuPool, ServedModel
    from backends.services import registry_vllm_register

    cfg = e2e_config
    database, test_database = connection.settings_dict["NAME"], connection.settings_dict["TEST"]["NAME"]
    assert database == test_database, f"refusing to write E2E rows to {database!r}: not the test database"
    with django_db_blocker.unblock():
        model, names = registry_vllm_register(urls=list(cfg.backend_urls), model_name=cfg.model, pool_name=CHAT_POOL)
        row = ServedModel.objects.get(name=model)
        row.max_context_length = cfg.max_model_len
        row.save()
        # The same server behind a backend whose read timeout is far shorter than any generation: the 504 path.
        slow_pool = GpuPool.objects.create(name=SLOW_POOL, description="E2E: read timeout shorter than a generation")
        Backend.objects.create(
            pool=slow_pool, name=f"{SLOW_POOL}-1", base_url=cfg.backend_urls[0], read_timeout_s=SLOW_READ_TIMEOUT_S
        )
        slow_model = ServedModel.objects.create(
            name=f"{model}-slowtest", served_name=model, kind="chat", pool=slow_pool
        ).name
        embed_model = None
        if cfg.embed_url and cfg.embed_model:
            embed_model, _ = registry_vllm_register(
                urls=[cfg.embed_url], model_name=cfg.embed_model, pool_name=EMBED_POOL, kind="embedding"
            )
        if cfg.api_key:
            Backend.objects.filter(pool__name__in=[CHAT_POOL, SLOW_POOL, EMBED_POOL]).update(api_key=cfg.api_key)
    yield E2ERegistry(
        model=model,
        slow_model=slow_model,
        embed_model=embed_model,
        backends=dict(zip(names, cfg.backend_urls, strict=True)),
    )
    with django_db_blocker.unblock():
        pools = [CHAT_POOL, SLOW_POOL, EMBED_POOL]
        ServedModel.objects.filter(pool__name__in=pools).delete()
        GpuPool.objects.filter(name__in=pools).delete()


@pytest.fixture
def registry_db(django_db_blocker: Any) -> Iterator[None]:
    """Direct (committed) access to the test database inside a test, as the probe service needs."""
    with django_db_blocker.unblock():
        yield


# --- the platform and clients ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def platform(e2e_registry: E2ERegistry) -> Iterator[PlatformProcess]:
    """The real ASGI app under uvicorn, on the test database, in front of the registered vLLM servers."""
    with PlatformProcess(master_key=MASTER_KEY) as process:
        yield process


@pytest.fixture(scope="session")
def client(platform: PlatformProcess) -> Iterator[openai.OpenAI]:
    """The official SDK pointed at the platform (no SDK retries: every status must be the platform's own)."""
    sdk = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=120.0)
    yield sdk
    sdk.close()


@pytest.fixture(scope="session")
def backend_http(e2e_config: E2EConfig) -> Iterator[httpx.Client]:
    """An HTTP client for calling the first backend directly (e.g. /tokenize), bypassing the platform."""
    with httpx.Client(base_url=e2e_config.backend_urls[0], headers=e2e_config.backend_headers, timeout=60) as http:
        yield http


# --- latency --------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """One request through the platform: how long it took, until the first token when streamed."""

    label: str
    started: float
    seconds: float = 0.0
    ttft_s: float | None = None
    outcome: str = "ok"
    note: str = ""

    def first_token(self) -> None:
        """Note the arrival of the first token (streaming); later calls are ignored."""
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.started


@dataclass
class LatencyLog:
    """Every timed request of the session, printed as a table at the end."""

    target: str = ""
    model: str = ""
    records: list[Timing] = field(default_factory=list)

    @contextmanager
    def measure(self, label: str) -> Iterator[Timing]:
        """Time the block as one request; a request over MAX_REQUEST_S fails the test."""
        timing = Timing(label=label, started=time.perf_counter())
        try:
            yield timing
        except BaseException as exc:
            timing.outcome = type(exc).__name__
            raise
        finally:
            timing.seconds = time.perf_counter() - timing.started
            self.records.append(timing)
        assert timing.seconds <= MAX_REQUEST_S, (
            f"{label}: {timing.seconds:.1f} s through the platform, over the {MAX_REQUEST_S:g} s limit "
            "(GPU contention, model loading or network problems?)"
        )


_LATENCY_KEY = pytest.StashKey[LatencyLog]()


@pytest.fixture(scope="session")
def latency(request: pytest.FixtureRequest, e2e_config: E2EConfig) -> LatencyLog:
    """The session's latency log (printed by pytest_terminal_summary)."""
    log = request.config.stash.setdefault(_LATENCY_KEY, LatencyLog())
    hosts = ", ".join(u.split("//", 1)[-1] for u in e2e_config.backend_urls)
    log.model = e2e_config.model
    log.target = f"{e2e_config.model} (max_model_len {e2e_config.max_model_len}) on {hosts}"
    return log


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    """Print every timed request, then the seed's expected latencies next to this run's figures."""
    log = config.stash.get(_LATENCY_KEY, None)
    if log is None or not log.records:
        return
    write = terminalreporter.write_line
    terminalreporter.write_sep("=", f"E2E latency through the platform: {log.target}")
    width = max(len(r.label) for r in log.records)
    write(f"{'request':<{width}}  {'total':>8}  {'TTFT':>8}  outcome")
    for r in log.records:
        ttft = f"{r.ttft_s:7.3f}s" if r.ttft_s is not None else f"{'-':>8}"
        write(f"{r.label:<{width}}  {r.seconds:7.3f}s  {ttft}  {r.outcome}{'  ' + r.note if r.note else ''}")
    answered = [r for r in log.records if r.outcome == "ok"]  # the expected-error requests end in milliseconds
    seconds = sorted(r.seconds for r in answered) or [0.0]
    ttfts = [r.ttft_s for r in answered if r.ttft_s is not None]
    p95 = seconds[min(len(seconds) - 1, round(0.95 * (len(seconds) - 1)))]
    rows = [
        *EXPECTED_LATENCIES,
        (f"this run: {log.model}", f"{statistics.median(seconds):.2f} s median, {seconds[-1]:.2f} s max", "E2E"),
    ]
    col = max(len(r[0]) for r in rows)
    lat = max(len(r[1]) for r in rows)
    write("")
    write(f"{'backend type':<{col}}  {'latency':<{lat}}  use case")
    for name, value, use in rows:
        write(f"{name:<{col}}  {value:<{lat}}  {use}")
    detail = f"this run: {len(answered)} answered requests, p95 {p95:.2f} s"
    if ttfts:
        detail += f", median time to first token {statistics.median(ttfts):.3f} s ({len(ttfts)} streamed)"
    write(f"{detail}; {len(log.records) - len(answered)} expected-error requests not counted.")
    write(f"Limit: {MAX_REQUEST_S:g} s per request (slower fails the test: GPU contention, model loading, network).")


# --- collection: skip without a backend, destructive tests last, skips as failures on demand ------------------


def _in_suite(item: pytest.Item) -> bool:
    return Path(str(item.path)).resolve().is_relative_to(E2E_DIR)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the suite without VLLM_BACKEND_URL; run modules flagged E2E_RUN_LAST (they stop a backend) at the end."""
    if not _env_urls("VLLM_BACKEND_URL"):
        for item in items:
            if _in_suite(item):
                item.add_marker(pytest.mark.skip(reason=SKIP_NO_BACKEND))
    items.sort(key=lambda item: _in_suite(item) and bool(getattr(getattr(item, "module", None), "E2E_RUN_LAST", 0)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """With E2E_REQUIRE=1 a skipped E2E test is reported as failed: the E2E run must pass, not skip."""
    report = yield
    required = os.environ.get("E2E_REQUIRE") == "1" and item.get_closest_marker("e2e") is not None
    if required and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"E2E_REQUIRE=1, but this E2E test was skipped: {reason}"
    return report
