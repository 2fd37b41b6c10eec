"""setup_platform (run by make run): demo registry on first start, or the servers of VLLM_BACKEND_URL."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from backends.mock_vllm import MockServer
from backends.models import Backend, GpuPool, ServedModel

pytestmark = pytest.mark.django_db


def test_first_start_loads_demo_and_creates_admin(monkeypatch: pytest.MonkeyPatch, settings, tmp_path) -> None:
    settings.LOCAL_DIR = tmp_path
    monkeypatch.delenv("VLLM_BACKEND_URL", raising=False)
    monkeypatch.delenv("DJANGO_SUPERUSER_PASSWORD", raising=False)
    call_command(
        "setup_platform",
        "--mock-url",
        "http://127.0.0.1:8101",
        "--mock-url",
        "http://127.0.0.1:8102",
        stdout=io.StringIO(),
    )
    assert [b.name for b in Backend.objects.order_by("name")] == ["demo-mock-1", "demo-mock-2"]
    assert set(ServedModel.objects.values_list("name", "kind")) == {("mock-chat", "chat"), ("mock-embed", "embedding")}
    password = (tmp_path / "admin_password").read_text().strip()
    assert get_user_model().objects.get(username="admin").check_password(password)
    # a second start keeps the registry as the operator left it
    GpuPool.objects.filter(name="demo").update(description="edited")
    call_command("setup_platform", stdout=io.StringIO())
    assert GpuPool.objects.get(name="demo").description == "edited" and Backend.objects.count() == 2


def test_vllm_backend_url_registers_a_pool_and_discovers_the_model(
    monkeypatch: pytest.MonkeyPatch, settings, tmp_path
) -> None:
    settings.LOCAL_DIR = tmp_path
    with MockServer(models=["org/llama-3-8b"]) as a, MockServer(models=["org/llama-3-8b"]) as b:
        monkeypatch.setenv("VLLM_BACKEND_URL", f"{a.url}/v1, {b.url}")
        monkeypatch.delenv("VLLM_MODEL_NAME", raising=False)
        out = io.StringIO()
        call_command("setup_platform", stdout=out)
    assert "org/llama-3-8b" in out.getvalue()
    pool = GpuPool.objects.get(name="vllm")
    assert sorted(b.base_url for b in pool.backends.all()) == sorted([a.url, b.url])
    assert ServedModel.objects.get(name="org/llama-3-8b").pool == pool


def test_unreachable_vllm_backend_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_BACKEND_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("VLLM_MODEL_NAME", raising=False)
    with pytest.raises(CommandError, match="Cannot register VLLM_BACKEND_URL"):
        call_command("setup_platform", stdout=io.StringIO())
