"""Django settings for the LLM routing platform.

Everything is read from environment variables with safe defaults; production differs only by environment (see
`.env.example`, which lists every variable). Debug mode is off unless DJANGO_DEBUG=1, which only `make run` sets.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent
# Untracked folder for local state: the SQLite database, the generated master key, the embedded broker.
LOCAL_DIR = Path(os.environ.get("LOCAL_STATE_DIR", BASE_DIR / ".local"))


def env_bool(name: str, default: bool) -> bool:
    """Read a boolean environment variable ("1", "true", "yes", "on" are true)."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_float(name: str, default: float) -> float:
    """Read a float environment variable."""
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def env_int(name: str, default: int) -> int:
    """Read an integer environment variable."""
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def env_list(name: str, default: str = "") -> list[str]:
    """Read a comma-separated environment variable into a list of non-empty, stripped items."""
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def local_secret_key(folder: Path) -> str:
    """The checkout's own random secret key: generated once into `folder/secret_key` (mode 0600), then reused.

    Processes starting together (web, worker, beat) agree: the first to link its file into place wins.
    """
    path = folder / "secret_key"
    try:
        if key := path.read_text().strip():
            return key
        path.unlink()  # an empty file (a crash between create and write): replace it
    except FileNotFoundError:
        pass
    try:
        folder.mkdir(parents=True, exist_ok=True)
        draft = folder / f".secret_key.{os.getpid()}"
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(50) + "\n")
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
        return path.read_text().strip()
    except OSError as exc:
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(f"Set DJANGO_SECRET_KEY (cannot keep a generated one in {folder}: {exc}).") from exc


# Debug pages show settings and tracebacks: off unless DJANGO_DEBUG=1, which `make run` sets (docs/security.md).
DEBUG = env_bool("DJANGO_DEBUG", False)
# Production sets DJANGO_SECRET_KEY (the same on every host). Without it this is a developer's or CI's checkout:
# a random key kept in .local/, and the local defaults below (plain HTTP, static files from the apps' folders).
LOCAL_CHECKOUT = not os.environ.get("DJANGO_SECRET_KEY", "")
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "") or local_secret_key(LOCAL_DIR)
# The key this project once shipped as its development default is public: never with debug off.
if not DEBUG and SECRET_KEY == "dev-insecure-secret-key-change-me-in-production-0123456789":
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured("DJANGO_SECRET_KEY is a published example value: set a long random one.")
# Earlier keys, still accepted when verifying (sessions, signed values, Responses API ids) during a rotation.
SECRET_KEY_FALLBACKS = env_list("DJANGO_SECRET_KEY_FALLBACKS")
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")

# --- HTTPS hardening (docs/deploy.md). Off in development (DEBUG on, or no DJANGO_SECRET_KEY); else it follows
# DJANGO_HTTPS (default on): the site is reached over HTTPS through a TLS-terminating proxy, whose X-Forwarded-Proto
# uvicorn turns into the request scheme (--proxy-headers, trusting FORWARDED_ALLOW_IPS). Every value can be
# overridden on its own.
HTTPS = env_bool("DJANGO_HTTPS", not DEBUG and not LOCAL_CHECKOUT)
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", HTTPS)
# Answered over plain HTTP even with the redirect on (probes and scrapes inside the cluster).
SECURE_REDIRECT_EXEMPT = env_list("DJANGO_SECURE_REDIRECT_EXEMPT", "^healthz$,^readyz$,^metrics$")
# Only when the proxy always sets (and strips a client's) header, e.g. "HTTP_X_FORWARDED_PROTO,https".
_proxy_ssl_header = env_list("DJANGO_SECURE_PROXY_SSL_HEADER")
SECURE_PROXY_SSL_HEADER = (_proxy_ssl_header[0], _proxy_ssl_header[1]) if len(_proxy_ssl_header) == 2 else None
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", HTTPS)
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", HTTPS)
# HSTS starts at one hour (raise to 31536000 once HTTPS is settled); sent on HTTPS responses only.
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 3600 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", HTTPS)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", HTTPS)

INSTALLED_APPS = [
    # django.contrib.admin, with the operations dashboard as its front page (llm_platform/ops, docs/operations.md)
    "llm_platform.ops.admin_config.OpsAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "channels",
    "django_celery_beat",
    "backends",
    "routing",
    "governance",
    "batches",
    "llm_platform.ops",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "llm_platform.urls"
ASGI_APPLICATION = "llm_platform.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

_default_db_url = f"sqlite:///{LOCAL_DIR / 'db.sqlite3'}"
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", _default_db_url), conn_max_age=env_int("DB_CONN_MAX_AGE", 60)
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web, worker and beat share the file: WAL and a busy timeout keep them from tripping over each other.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
    LOCAL_DIR.mkdir(parents=True, exist_ok=True)
    # A file, not memory, so that server processes started by the tests see the test database (they get its
    # path in DATABASE_URL); one per test run, so that two runs on one checkout do not share it.
    DATABASES["default"]["TEST"] = {"NAME": str(LOCAL_DIR / f"test_db_{os.getpid()}.sqlite3")}

elif DATABASES["default"]["ENGINE"].startswith("django.db.backends.postgresql"):
    # Bounded waits on the database (docs/deploy.md): a connection attempt gives up after DB_CONNECT_TIMEOUT_S, and
    # TCP keepalives find a connection whose server vanished without a word (a failover, a dropped network path)
    # in about a minute, where the kernel's defaults take two hours; meanwhile the web process's database thread
    # (core.db.run_db) would hold the usage writes and the registry and key polls. libpq's own parameters:
    # values given in DATABASE_URL's query string win.
    _pg_options = DATABASES["default"].setdefault("OPTIONS", {})
    _pg_options.setdefault("connect_timeout", env_int("DB_CONNECT_TIMEOUT_S", 10))
    for _name, _value in (
        ("keepalives", 1),
        ("keepalives_idle", 30),
        ("keepalives_interval", 10),
        ("keepalives_count", 3),
    ):
        _pg_options.setdefault(_name, _value)
    # And a statement that runs longer than DB_STATEMENT_TIMEOUT_MS (a lock wait, a runaway report) is cancelled by
    # the server instead of holding its connection and thread: the database thread's writes and polls, an admin
    # page. 0 turns it off; `deploy/entrypoint.sh migrate` and `make run` migrate with 0 (a migration may be long).
    # A statement_timeout already in DATABASE_URL's `options` wins. Behind PgBouncer, which refuses the `options`
    # startup parameter, the operator sets 0 and bounds the database role instead (docs/deploy.md).
    _statement_timeout_ms = env_int("DB_STATEMENT_TIMEOUT_MS", 30_000)
    _libpq_options = str(_pg_options.get("options", ""))
    if _statement_timeout_ms > 0 and "statement_timeout" not in _libpq_options:
        _pg_options["options"] = f"{_libpq_options} -c statement_timeout={_statement_timeout_ms}".strip()

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", BASE_DIR / "staticfiles"))
STORAGES: dict[str, dict[str, Any]] = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
# In development WhiteNoise serves straight from the apps' static folders, so no collectstatic is needed.
WHITENOISE_USE_FINDERS = DEBUG or LOCAL_CHECKOUT
WHITENOISE_AUTOREFRESH = DEBUG
if DEBUG or LOCAL_CHECKOUT:
    STORAGES["staticfiles"] = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}

# Batch API files (docs/batches.md): local files under BATCH_FILES_DIR by default; any S3-compatible store with
# BATCH_STORAGE_BACKEND=storages.backends.s3.S3Storage (django-storages) and its AWS_* settings.
BATCH_STORAGE_BACKEND = os.environ.get("BATCH_STORAGE_BACKEND", "django.core.files.storage.FileSystemStorage")
BATCH_FILES_DIR = Path(os.environ.get("BATCH_FILES_DIR", LOCAL_DIR / "batch-files"))
STORAGES["batches"] = {
    "BACKEND": BATCH_STORAGE_BACKEND,
    "OPTIONS": {"location": str(BATCH_FILES_DIR)} if BATCH_STORAGE_BACKEND.endswith("FileSystemStorage") else {},
}

REDIS_URL = os.environ.get("REDIS_URL", "")

# Channels: in-process layer by default, Redis when REDIS_URL is set.
if REDIS_URL:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}}
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Celery: Redis when REDIS_URL is set, else the embedded filesystem broker, which needs no server.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", REDIS_URL or "filesystem://localhost//")
_broker_dir = LOCAL_DIR / "celery-broker"
CELERY_BROKER_TRANSPORT_OPTIONS = (
    {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),  # else kombu writes it into the working directory
        "store_processed": False,
    }
    if CELERY_BROKER_URL.startswith("filesystem://")
    else {}
)
if CELERY_BROKER_URL.startswith("filesystem://"):
    for _folder in ("queue", "processed", "control"):
        (_broker_dir / _folder).mkdir(parents=True, exist_ok=True)
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", "") or None
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # First, so that an unauthenticated call gets 401 with WWW-Authenticate: Bearer (not 403).
        "governance.auth.MasterKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # The master key, or a staff session holding the model permission of the action, as in admin (llm_platform/api.py).
    "DEFAULT_PERMISSION_CLASSES": ["llm_platform.api.ManagementPermission"],
    "EXCEPTION_HANDLER": "llm_platform.api.api_exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "UNAUTHENTICATED_USER": None,
}

# --- The router itself -------------------------------------------------------------------------------------
# Bearer key accepted on /v1 and by the management API; `make run` generates one when unset.
ROUTER_MASTER_KEY = os.environ.get("ROUTER_MASTER_KEY", "")
# Largest request body accepted on /v1 (bytes); larger bodies get 413.
ROUTER_MAX_BODY_BYTES = env_int("ROUTER_MAX_BODY_BYTES", 4 * 1024 * 1024)
# Client limits (docs/security.md, "Client limits"): items in `messages`, `tools`, `stop`, in one message's content
# parts or tool calls, and prompts in a `prompt`/`input` batch (also texts in a rerank/score list); over one, 400
# array_above_max_length. Characters in one rerank/score text (query or document): over it, 400.
ROUTER_MAX_MESSAGES = max(1, env_int("ROUTER_MAX_MESSAGES", 4096))
ROUTER_MAX_TOOLS = max(0, env_int("ROUTER_MAX_TOOLS", 256))
ROUTER_MAX_STOP = max(0, env_int("ROUTER_MAX_STOP", 64))
ROUTER_MAX_CONTENT_PARTS = max(1, env_int("ROUTER_MAX_CONTENT_PARTS", 256))
ROUTER_MAX_INPUTS = max(1, env_int("ROUTER_MAX_INPUTS", 2048))
ROUTER_MAX_TEXT_CHARS = max(1, env_int("ROUTER_MAX_TEXT_CHARS", 65536))
# WebSocket sockets before they authenticate: the wait for an `auth` message (seconds), the largest frame (bytes;
# larger closes with 1009), and how many may be pending at once per process (more: the handshake is refused, 503).
ROUTER_WS_AUTH_TIMEOUT_S = env_float("ROUTER_WS_AUTH_TIMEOUT_S", 5.0)
ROUTER_WS_PREAUTH_MAX_BYTES = max(256, env_int("ROUTER_WS_PREAUTH_MAX_BYTES", 8192))
ROUTER_WS_MAX_PENDING = max(1, env_int("ROUTER_WS_MAX_PENDING", 64))
# How often each web process checks whether the registry changed (seconds); the reload guarantee is 2 s.
ROUTER_REGISTRY_POLL_S = env_float("ROUTER_REGISTRY_POLL_S", 0.5)
# Pooled upstream connections per process.
ROUTER_MAX_CONNECTIONS = env_int("ROUTER_MAX_CONNECTIONS", 1000)
ROUTER_MAX_KEEPALIVE = env_int("ROUTER_MAX_KEEPALIVE", 200)
# Limits on what a backend may send (routing/upstream.py; past one the request gets a 502 and the connection is
# closed): one response header line, header lines per head, the whole head, and a body read whole (non-streamed
# answers and error bodies; 64 MiB holds e.g. 2,048 embeddings of 4,096 floats as JSON).
ROUTER_UPSTREAM_MAX_HEADER_LINE_BYTES = max(256, env_int("ROUTER_UPSTREAM_MAX_HEADER_LINE_BYTES", 8190))
ROUTER_UPSTREAM_MAX_HEADERS = max(16, env_int("ROUTER_UPSTREAM_MAX_HEADERS", 128))
ROUTER_UPSTREAM_MAX_HEAD_BYTES = max(1024, env_int("ROUTER_UPSTREAM_MAX_HEAD_BYTES", 65536))
ROUTER_UPSTREAM_MAX_BODY_BYTES = max(65536, env_int("ROUTER_UPSTREAM_MAX_BODY_BYTES", 64 * 1024 * 1024))
# Attempts per request before the first byte reached the client (1 = no retry).
ROUTER_MAX_ATTEMPTS = env_int("ROUTER_MAX_ATTEMPTS", 2)

# --- Batch API (docs/batches.md) ---------------------------------------------------------------------------
# Largest uploaded batch file (bytes; larger: 413) and most requests in one file.
BATCH_MAX_FILE_BYTES = max(1, env_int("BATCH_MAX_FILE_BYTES", 100 * 1024 * 1024))
BATCH_MAX_LINES = max(1, env_int("BATCH_MAX_LINES", 50_000))
# Lines of one pool a batch worker runs at once; below live traffic: a line waits while the pool's engines report
# at least BATCH_BACKOFF_QUEUE_DEPTH waiting requests (0: never), re-checking every BATCH_BACKOFF_S seconds.
BATCH_MAX_CONCURRENCY_PER_POOL = max(1, env_int("BATCH_MAX_CONCURRENCY_PER_POOL", 2))
BATCH_BACKOFF_QUEUE_DEPTH = max(0, env_int("BATCH_BACKOFF_QUEUE_DEPTH", 1))
BATCH_BACKOFF_S = max(0.1, env_float("BATCH_BACKOFF_S", 1.0))
# A worker's claim on a line (renewed while it runs); a line whose worker died is run again after it lapses.
BATCH_LINE_LEASE_S = max(1.0, env_float("BATCH_LINE_LEASE_S", 60.0))
# Celery queue of batch runs (empty: the default queue).
BATCH_CELERY_QUEUE = os.environ.get("BATCH_CELERY_QUEUE", "")
# Seconds between SSE keep-alive comments while waiting for a streamed response's first token.
ROUTER_STREAM_KEEPALIVE_S = env_float("ROUTER_STREAM_KEEPALIVE_S", 5.0)
# Timeout between two streamed chunks after the first one (seconds); 0 uses the backend's read timeout.
ROUTER_STREAM_IDLE_TIMEOUT_S = env_float("ROUTER_STREAM_IDLE_TIMEOUT_S", 0.0)
# Ask vLLM for usage on every streamed chunk (stripped for clients that did not ask), so a client that leaves
# mid-stream is charged for what was generated up to then.
ROUTER_STREAM_CONTINUOUS_USAGE = env_bool("ROUTER_STREAM_CONTINUOUS_USAGE", True)
# Prefix-cache-aware routing (pools with strategy prefix_aware; docs/routing.md): block size of the prompt index,
# its cap per backend, the share of a prompt that must match, the load guard, and sharing through Redis.
ROUTER_PREFIX_BLOCK_BYTES = max(16, env_int("ROUTER_PREFIX_BLOCK_BYTES", 256))
ROUTER_PREFIX_MAX_BLOCKS = max(1, env_int("ROUTER_PREFIX_MAX_BLOCKS", 16384))
ROUTER_PREFIX_MIN_MATCH = env_float("ROUTER_PREFIX_MIN_MATCH", 0.3)
ROUTER_PREFIX_BALANCE_ABS = env_int("ROUTER_PREFIX_BALANCE_ABS", 16)
ROUTER_PREFIX_BALANCE_REL = env_float("ROUTER_PREFIX_BALANCE_REL", 1.5)
ROUTER_PREFIX_SYNC = env_bool("ROUTER_PREFIX_SYNC", True)
# Precise prefix mode (docs/kv-events.md): score prefix_aware pools by the blocks vLLM engines report holding
# (their KV-cache events, found through GET /kv_event_sources), with token ids from the backend's POST /tokenize
# (bounded; on failure the request is routed in approximate mode). Off by default.
ROUTER_KV_EVENTS = env_bool("ROUTER_KV_EVENTS", False)
ROUTER_KV_EVENTS_MAX_BLOCKS = max(1, env_int("ROUTER_KV_EVENTS_MAX_BLOCKS", 65536))
ROUTER_KV_EVENTS_TOKENIZE_TIMEOUT_MS = max(1, env_int("ROUTER_KV_EVENTS_TOKENIZE_TIMEOUT_MS", 100))
ROUTER_KV_EVENTS_DISCOVERY_S = max(1.0, env_float("ROUTER_KV_EVENTS_DISCOVERY_S", 30.0))
# How long this router's own placements count beside the events (an engine publishes a prompt's blocks only
# after its prefill), in milliseconds.
ROUTER_KV_EVENTS_RECENT_MS = max(0, env_int("ROUTER_KV_EVENTS_RECENT_MS", 2000))
# Send `x-router-backend` (the backend's name) to every client key, not only to the master key.
ROUTER_EXPOSE_BACKEND = env_bool("ROUTER_EXPOSE_BACKEND", False)
# OpenTelemetry tracing is set up from the standard OTEL_* variables (core/telemetry.py, docs/operations.md). With
# this on, request spans also carry the prompt (messages / prompt / input, cut to 16 KiB): off by default.
ROUTER_TRACE_CAPTURE_PROMPTS = env_bool("ROUTER_TRACE_CAPTURE_PROMPTS", False)
# Passive health: consecutive failures (connect errors, timeouts, 5xx) that open a backend's circuit, and the
# cool-down before one trial request is let through.
ROUTER_CIRCUIT_FAILURES = env_int("ROUTER_CIRCUIT_FAILURES", 3)
ROUTER_CIRCUIT_COOLDOWN_S = env_float("ROUTER_CIRCUIT_COOLDOWN_S", 10.0)
# Retries are capped at this fraction of recent requests (10 s window), with a floor of ROUTER_RETRY_BUDGET_MIN.
ROUTER_RETRY_BUDGET_RATIO = env_float("ROUTER_RETRY_BUDGET_RATIO", 0.2)
ROUTER_RETRY_BUDGET_MIN = env_int("ROUTER_RETRY_BUDGET_MIN", 10)
# Requests waiting for a backend slot (max concurrent requests reached): how many per pool and process, how long;
# a class served nothing for this long has its oldest request moved up one class (docs/routing.md, "Priority classes").
ROUTER_QUEUE_MAX = env_int("ROUTER_QUEUE_MAX", 100)
ROUTER_QUEUE_TIMEOUT_S = env_float("ROUTER_QUEUE_TIMEOUT_S", 10.0)
ROUTER_QUEUE_PROMOTE_AFTER_S = env_float("ROUTER_QUEUE_PROMOTE_AFTER_S", 5.0)
# Shadow traffic (docs/routing.md): mirrored requests running at once and waiting per process (beyond, dropped),
# the longest a mirror may take, and how often the comparisons are added to the database rollup (seconds).
ROUTER_SHADOW_CONCURRENCY = max(0, env_int("ROUTER_SHADOW_CONCURRENCY", 2))
ROUTER_SHADOW_QUEUE = max(0, env_int("ROUTER_SHADOW_QUEUE", 16))
ROUTER_SHADOW_TIMEOUT_S = env_float("ROUTER_SHADOW_TIMEOUT_S", 30.0)
ROUTER_SHADOW_FLUSH_S = env_float("ROUTER_SHADOW_FLUSH_S", 5.0)
# How often vLLM's /metrics are scraped for kv_cache_aware pools (background, never per request).
ROUTER_METRICS_SCRAPE_S = env_float("ROUTER_METRICS_SCRAPE_S", 2.0)
# Rate limits when Redis cannot be reached: "local" (fail open to per-process counters), "closed" (503 for
# limited keys) or "open" (no limits).
RATE_LIMIT_ON_REDIS_ERROR = os.environ.get("RATE_LIMIT_ON_REDIS_ERROR", "local")
# Timeout of the health probe ("Check health now" and the periodic task), seconds.
ROUTER_PROBE_TIMEOUT_S = env_float("ROUTER_PROBE_TIMEOUT_S", 5.0)
CHECKS_WEBHOOK_URL = os.environ.get("CHECKS_WEBHOOK_URL", "")  # check run reports are posted here (Slack JSON)

# --- Usage accounting, Prometheus metrics, OpenAPI (governance) ------------------------------------------------
# Usage records are buffered in memory and written in batches off the request path: every USAGE_FLUSH_INTERVAL_S
# seconds or as soon as USAGE_FLUSH_MAX events wait (a crash loses at most one interval). While the database is
# unreachable at most USAGE_BUFFER_MAX events are kept per process (the oldest are dropped beyond).
USAGE_FLUSH_INTERVAL_S = env_float("USAGE_FLUSH_INTERVAL_S", 1.0)
USAGE_FLUSH_MAX = env_int("USAGE_FLUSH_MAX", 2000)
USAGE_BUFFER_MAX = env_int("USAGE_BUFFER_MAX", 100_000)
# The periodic rollup (every 10 min) rebuilds the hourly usage of this many past hours.
USAGE_ROLLUP_LOOKBACK_H = env_int("USAGE_ROLLUP_LOOKBACK_H", 3)
# Days of per-backend 5-minute traffic buckets kept for the operations dashboard (pruned by that rollup task).
USAGE_BACKEND_RETENTION_D = max(1, env_int("USAGE_BACKEND_RETENTION_D", 8))
# Link from a usage record to its trace in a tracing UI: "{trace_id}" is replaced by the record's trace id, e.g.
# https://jaeger.example/trace/{trace_id} or https://grafana.example/explore?...{trace_id}; empty: no link.
ROUTER_TRACE_LINK_TEMPLATE = os.environ.get("ROUTER_TRACE_LINK_TEMPLATE", "")
# How often the operations dashboard (admin front page) refreshes its figures in the browser, seconds.
OPS_DASHBOARD_REFRESH_S = max(1, env_int("OPS_DASHBOARD_REFRESH_S", 5))
# /metrics (Prometheus) answers clients whose address is in these networks, or that send this bearer token.
METRICS_ALLOWED_CIDRS = env_list("METRICS_ALLOWED_CIDRS", "127.0.0.1/32,::1/128")
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")
INSTALLED_APPS += ["drf_spectacular", "drf_spectacular_sidecar"]
REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"] = "drf_spectacular.openapi.AutoSchema"
SPECTACULAR_SETTINGS = {
    "TITLE": "LLM routing platform",
    "DESCRIPTION": (
        "Management API (`/api/`: registry, checks, usage; master key or staff session) and the "
        "OpenAI-compatible API (`/v1/`: client keys or the master key)."
    ),
    "VERSION": "1.0.0",
    "SCHEMA_PATH_PREFIX": "/api/",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",  # Swagger UI's files come from drf-spectacular-sidecar: no CDN
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "PREPROCESSING_HOOKS": ["llm_platform.openapi.add_gateway_endpoints"],
    "ENUM_NAME_OVERRIDES": {
        "BackendHealthStatusEnum": "backends.models.HealthStatus",
        "CheckRunStatusEnum": "backends.checks.models.RunStatus",
        "PriorityEnum": "governance.priority.CHOICES",
    },
}

LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django": {"handlers": ["console"], "level": os.environ.get("DJANGO_LOG_LEVEL", "WARNING"), "propagate": False},
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}
