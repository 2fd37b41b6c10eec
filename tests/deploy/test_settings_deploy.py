"""Production settings come from the environment only: `check --deploy` is clean, static files are served by the
production server after collectstatic, and secrets never reach the logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import MASTER_KEY
from tests.deploy.serve import PRODUCTION_ENV, SECRET_KEY, ServeProcess
from tests.live import ROOT

# What an operator sets in production (docs/deploy.md); the URLs need not be reachable for the checks.
DEPLOY_ENV = {
    **PRODUCTION_ENV,
    "DJANGO_ALLOWED_HOSTS": "router.example.com",
    "DJANGO_CSRF_TRUSTED_ORIGINS": "https://router.example.com",
    "DATABASE_URL": "postgres://llm:db-password-0123@db.invalid:5432/llm",
    "REDIS_URL": "redis://:redis-password-0123@redis.invalid:6379/0",
    "ROUTER_MASTER_KEY": "sk-router-production-test-key",
}


def _manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "SECURE_"))}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_deploy_is_clean_with_production_variables() -> None:
    result = _manage("check", "--deploy", "--fail-level", "WARNING", env=DEPLOY_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout
    assert "db-password-0123" not in result.stdout + result.stderr


def test_check_deploy_flags_development_defaults() -> None:
    # the same command with debug on (what make run sets) reports the problem it exists to catch
    result = _manage("check", "--deploy", "--fail-level", "WARNING", env={**DEPLOY_ENV, "DJANGO_DEBUG": "1"})
    assert result.returncode != 0 and "security.W018" in result.stdout + result.stderr
    # and so it does without DJANGO_SECRET_KEY (a checkout's defaults: plain HTTP, a key of this host's own)
    env = {k: v for k, v in DEPLOY_ENV.items() if k != "DJANGO_SECRET_KEY"}
    result = _manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    assert result.returncode != 0 and "security.W008" in result.stdout + result.stderr


def test_debug_off_refuses_the_development_secret_key() -> None:
    # the key this project once shipped as its development default is public
    env = {**DEPLOY_ENV, "DJANGO_SECRET_KEY": "dev-insecure-secret-key-change-me-in-production-0123456789"}
    result = _manage("check", env=env)
    assert result.returncode != 0 and "DJANGO_SECRET_KEY" in result.stderr


@pytest.mark.django_db(transaction=True)
def test_production_server_serves_static_files_and_logs_no_secret(tmp_path: Path) -> None:
    # given the production command with DEBUG off, running collectstatic into a fresh STATIC_ROOT first, and
    # logging as much as it can
    env = {
        "COLLECTSTATIC": "1",
        "STATIC_ROOT": str(tmp_path / "static"),
        "ROUTER_MASTER_KEY": MASTER_KEY + "-production-secret",
        "LOG_LEVEL": "DEBUG",
        "UVICORN_LOG_LEVEL": "debug",
        "ACCESS_LOG": "1",
    }
    with ServeProcess(log_path=tmp_path / "serve.log", env=env) as server:
        https = {"X-Forwarded-Proto": "https"}  # as the TLS proxy in front sets it (uvicorn --proxy-headers)
        css = httpx.get(f"{server.url}/static/admin/css/base.css", headers=https, timeout=5)
        # then WhiteNoise serves admin's CSS, with a long cache lifetime under its hashed name
        assert css.status_code == 200 and "text/css" in css.headers["content-type"]
        assert len(css.content) > 1000
        manifest = json.loads((tmp_path / "static" / "staticfiles.json").read_text())
        hashed = manifest["paths"]["admin/css/base.css"]
        cached = httpx.get(f"{server.url}/static/{hashed}", headers=https, timeout=5)
        assert cached.status_code == 200 and "immutable" in cached.headers.get("cache-control", "")
        # and the admin login page renders with secure cookies and HSTS
        login = httpx.get(f"{server.url}/admin/login/", headers=https, timeout=5)
        assert login.status_code == 200 and hashed.split("/")[-1] in login.text
        assert "strict-transport-security" in login.headers
        assert "secure" in login.headers["set-cookie"].lower()
        # plain HTTP is redirected to HTTPS (except the probes)
        plain = httpx.get(f"{server.url}/admin/login/", timeout=5)
        assert plain.status_code == 301 and plain.headers["location"].startswith("https://")
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
        # authenticated and rejected API calls are logged without their keys
        auth = {"Authorization": f"Bearer {env['ROUTER_MASTER_KEY']}"}
        assert httpx.get(f"{server.url}/v1/models", headers=auth, timeout=5).status_code == 200
        bad = {"Authorization": "Bearer sk-wrong-key-that-must-not-be-logged"}
        assert httpx.get(f"{server.url}/v1/models", headers=bad, timeout=5).status_code == 401
    log = server.log()
    assert "GET /v1/models" in log  # the access log was on
    for secret in (SECRET_KEY, env["ROUTER_MASTER_KEY"], "sk-wrong-key-that-must-not-be-logged"):
        assert secret not in log


@pytest.mark.parametrize(
    ("url", "connect_timeout"),
    [("postgres://llm@db.invalid:5432/llm", 10), ("postgres://llm@db.invalid:5432/llm?connect_timeout=3", 3)],
)
def test_postgresql_connections_have_bounded_waits(url: str, connect_timeout: int) -> None:
    # given a PostgreSQL DATABASE_URL, with or without its own connect_timeout
    code = "from django.conf import settings; import json; print(json.dumps(settings.DATABASES['default']['OPTIONS']))"
    # when the settings are loaded
    result = _manage("shell", "-c", code, env={**DEPLOY_ENV, "DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    options = json.loads(result.stdout.strip().splitlines()[-1])
    # then a connection attempt is bounded (the URL's value wins) and a vanished server is found by TCP keepalives
    assert options["connect_timeout"] == connect_timeout
    assert (options["keepalives"], options["keepalives_idle"], options["keepalives_count"]) == (1, 30, 3)


@pytest.mark.parametrize(
    ("url", "env", "options"),
    [
        ("postgres://llm@db.invalid:5432/llm", {}, "-c statement_timeout=30000"),
        ("postgres://llm@db.invalid:5432/llm", {"DB_STATEMENT_TIMEOUT_MS": "500"}, "-c statement_timeout=500"),
        ("postgres://llm@db.invalid:5432/llm", {"DB_STATEMENT_TIMEOUT_MS": "0"}, None),
        (
            "postgres://llm@db.invalid:5432/llm?options=-c%20search_path%3Dllm",
            {},
            "-c search_path=llm -c statement_timeout=30000",
        ),
        (
            "postgres://llm@db.invalid:5432/llm?options=-c%20statement_timeout%3D5s",
            {"DB_STATEMENT_TIMEOUT_MS": "500"},
            "-c statement_timeout=5s",
        ),
    ],
)
def test_postgresql_statements_are_bounded_in_time(url: str, env: dict[str, str], options: str | None) -> None:
    # given a PostgreSQL DATABASE_URL, its own libpq options or none, and DB_STATEMENT_TIMEOUT_MS set or not
    code = "from django.conf import settings; import json; print(json.dumps(settings.DATABASES['default']['OPTIONS']))"
    # when the settings are loaded
    result = _manage("shell", "-c", code, env={**DEPLOY_ENV, "DATABASE_URL": url, **env})
    assert result.returncode == 0, result.stderr
    # then the server cancels statements after the bound (30 s by default), added to the URL's own options, unless
    # the bound is 0 or the URL sets one itself
    assert json.loads(result.stdout.strip().splitlines()[-1]).get("options") == options
