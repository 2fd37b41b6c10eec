"""Debug mode is off unless `make run` switches it on, and no secret key is built in (issue 14 item 11)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MASTER_KEY
from tests.live import ROOT, PlatformProcess

OLD_PUBLIC_KEY = "dev-insecure-secret-key-change-me-in-production-0123456789"
PRINT_SETTINGS = (
    "import json; from django.conf import settings as s; "
    "print(json.dumps({'debug': s.DEBUG, 'key': s.SECRET_KEY, 'https': s.SECURE_SSL_REDIRECT}))"
)


def _settings(local_dir: Path, **env: str) -> dict[str, Any]:
    """The settings a bare checkout gets: no DJANGO_* variable but those given, its own state folder."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "SECURE_"))}
    result = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {PRINT_SETTINGS}"],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "llm_platform.settings", "LOCAL_STATE_DIR": str(local_dir), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_debug_is_off_by_default(tmp_path: Path) -> None:
    # given no DJANGO_DEBUG, then debug is off; DJANGO_DEBUG=1 (what make run sets) turns it on
    assert _settings(tmp_path)["debug"] is False
    assert _settings(tmp_path, DJANGO_DEBUG="1")["debug"] is True


def test_without_a_secret_key_one_is_generated_per_checkout(tmp_path: Path) -> None:
    # given no DJANGO_SECRET_KEY: a random key is generated once into the state folder (owner-only), then reused
    first = _settings(tmp_path / "a")["key"]
    assert first != OLD_PUBLIC_KEY and len(first) >= 50
    key_file = tmp_path / "a" / "secret_key"
    assert key_file.read_text().strip() == first
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert _settings(tmp_path / "a")["key"] == first
    # and another checkout gets another key; an explicit DJANGO_SECRET_KEY wins
    assert _settings(tmp_path / "b")["key"] != first
    assert _settings(tmp_path / "a", DJANGO_SECRET_KEY="k" * 60)["key"] == "k" * 60


def test_the_old_public_development_key_is_refused_with_debug_off(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={**clean, "LOCAL_STATE_DIR": str(tmp_path), "DJANGO_SECRET_KEY": OLD_PUBLIC_KEY},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "DJANGO_SECRET_KEY" in result.stderr


def test_manage_check_passes_on_a_bare_checkout(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={**clean, "LOCAL_STATE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.django_db(transaction=True)
def test_a_server_with_default_settings_shows_no_debug_page() -> None:
    # given the platform served with the default settings (no DJANGO_DEBUG, no DJANGO_SECRET_KEY)
    with PlatformProcess(master_key=MASTER_KEY, env={"DJANGO_DEBUG": "", "DJANGO_SECRET_KEY": ""}) as platform:
        auth = {"Authorization": f"Bearer {MASTER_KEY}"}
        # when a Django URL does not exist, then the answer is the JSON 404, not the debug page listing the URLs
        missing = httpx.get(f"{platform.url}/api/no-such-thing/", headers=auth, timeout=10)
        assert missing.status_code == 404 and missing.headers["content-type"].startswith("application/json")
        assert missing.json()["error"]["code"] == "unknown_url"
        # and the usage date that overflowed is a 400 naming the parameter
        usage = httpx.get(f"{platform.url}/api/usage/", params={"to": "0001-01-01T00:00:00Z"}, headers=auth, timeout=10)
        assert usage.status_code == 400 and "to" in usage.json(), usage.text[:300]
        assert "DJANGO_SETTINGS_MODULE" not in usage.text + missing.text
