"""The operations dashboard (the admin's front page): per pool and backend, health, circuit, in flight, rates, TTFT
percentiles, engine figures and the nightly checks; a JSON refresh endpoint; staff only; read from aggregates,
never from the usage records."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from governance.models import UsageRecord
from llm_platform.ops.selectors import dashboard_charts, dashboard_get
from tests.ops.conftest import Fleet

pytestmark = pytest.mark.django_db


def _backend(data: dict[str, Any], pool: str, name: str) -> dict[str, Any]:
    (pool_row,) = [p for p in data["pools"] if p["name"] == pool]
    (row,) = [b for b in pool_row["backends"] if b["name"] == name]
    return row


def test_figures_per_pool_and_backend(fleet: Fleet) -> None:
    data = dashboard_get(now=fleet.now).as_json()
    assert [p["name"] for p in data["pools"]] == ["batch-l4", "chat-a100"]
    gpu1 = _backend(data, "chat-a100", "gpu-1")
    # health and state from the registry, circuit and in flight from the runtime view
    assert (gpu1["health"], gpu1["state"], gpu1["circuit"], gpu1["in_flight"]) == ("healthy", "enabled", "closed", 3)
    gpu2 = _backend(data, "chat-a100", "gpu-2")
    assert (gpu2["health"], gpu2["circuit"], gpu2["in_flight"]) == ("unhealthy", "open", 0)
    assert gpu2["health_error"].startswith("cannot connect")
    # the engine's figures where scraped, nothing where not
    assert (gpu1["kv_cache_usage"], gpu1["vllm_waiting"]) == (0.42, 2.0)
    assert (gpu1["prefix_hit_rate"], gpu1["prefix_source"]) == (0.62, "engine")
    assert (gpu2["kv_cache_usage"], gpu2["prefix_hit_rate"], gpu2["prefix_source"]) == (None, None, "")
    # traffic from the buckets: gpu-1 answered 10 requests in the last minute (one 503) and gpu-2 failed one
    # attempt; yesterday's two requests count in neither the rate nor the last hour
    figures = gpu1["figures"]
    assert figures["requests_1h"] == 10
    window = data["rate_window_s"]
    assert 300 <= window <= 600
    assert figures["rps"] == pytest.approx(10 / window, rel=0.01)
    assert figures["error_rate"] == pytest.approx(1 / 10)
    assert gpu2["figures"]["error_rate"] == pytest.approx(1.0)  # its only attempt failed
    # TTFT of 8 streams at 80..220 ms: p50 in the 100-200 ms bucket, p95 in the 200-350 ms one
    assert 100 < figures["ttft_p50_ms"] <= 200 and 200 < figures["ttft_p95_ms"] <= 350
    # nightly checks per backend, and the run they come from
    assert (gpu1["checks_passed"], gpu1["checks_total"]) == (2, 2)
    assert (gpu2["checks_passed"], gpu2["checks_total"]) == (1, 2)
    run = data["check_run"]
    assert run["id"] == fleet.run.pk and run["status"] == "failed" and (run["passed"], run["total"]) == (3, 4)
    assert run["url"] == reverse("admin:backends_checkrun_change", args=[fleet.run.pk])
    # pool totals and the whole fleet
    chat = next(p for p in data["pools"] if p["name"] == "chat-a100")
    assert chat["in_flight"] == 3 and chat["healthy"] == 1 and chat["figures"]["requests_1h"] == 10
    batch = next(p for p in data["pools"] if p["name"] == "batch-l4")
    assert batch["figures"]["requests_1h"] == 2 and batch["backends"][0]["state"] == "draining"
    assert data["total"]["requests_1h"] == 13 and data["unrouted"]["requests_1h"] == 1


def test_charts_show_the_last_24_hours_per_pool(fleet: Fleet) -> None:
    charts = dashboard_charts(now=fleet.now)
    assert [c.pool for c in charts] == ["batch-l4", "chat-a100"]
    chat = charts[1]
    assert "chat-a100: requests per hour" in chat.requests and "<svg" in chat.requests
    assert "time to first token" in chat.ttft
    # this hour's bar holds the 10 requests answered or failed now, and yesterday's hour its 2
    now_label = (fleet.now - timedelta(seconds=30)).strftime("%H:00")  # when the fleet's traffic was recorded
    old_label = (fleet.now - timedelta(hours=20)).strftime("%H:00")
    assert f"{now_label}: answered 9, failed 2" in chat.requests
    assert f"{old_label}: answered 2, failed 0" in chat.requests
    # TTFT only where there were streams (this hour): other hours are gaps, not zeros
    assert chat.ttft.count("<circle") == 2 and f"{now_label}: p50 140" in chat.ttft
    assert charts[0].ttft.count("<circle") == 0  # the batch pool streamed nothing


def test_the_front_page_is_the_dashboard_with_the_app_list_below(admin_client: Client, fleet: Fleet) -> None:
    page = admin_client.get(reverse("admin:index"))
    assert page.status_code == 200
    html = page.content.decode()
    # the dashboard: pools linked to their page, backends, their pills, the check run linked
    assert f'href="{reverse("admin:backends_gpupool_change", args=[fleet.chat.pk])}"' in html
    assert 'data-backend="gpu-1"' in html and 'data-backend="gpu-2"' in html
    assert "ops-circuit-open" in html and ">unhealthy<" in html and ">draining<" in html
    assert f'href="{reverse("admin:backends_checkrun_change", args=[fleet.run.pk])}"' in html
    assert 'id="ops-dashboard"' in html and reverse("admin:ops_dashboard_data") in html
    assert "ops/dashboard.js" in html and "ops/dashboard.css" in html
    assert "chat-a100: requests per hour" in html
    # and the admin's app list after it
    assert html.index('id="ops-dashboard"') < html.index('id="ops-apps"')
    assert reverse("admin:governance_usagerecord_changelist") in html
    assert reverse("admin:backends_backend_changelist") in html


def test_the_refresh_endpoint(admin_client: Client, fleet: Fleet) -> None:
    url = reverse("admin:ops_dashboard_data")
    answer = admin_client.get(url)
    assert answer.status_code == 200 and "no-store" in answer["Cache-Control"]
    data = answer.json()
    assert _backend(data, "chat-a100", "gpu-1")["in_flight"] == 3
    assert 'data-backend="gpu-1"' in data["html"]["live"] and "charts" not in data["html"]
    # a change in the runtime view shows at the next refresh
    fleet.dispatcher.in_flight["gpu-1"] = 7
    data = admin_client.get(url + "?charts=1").json()
    assert _backend(data, "chat-a100", "gpu-1")["in_flight"] == 7
    assert "chat-a100: requests per hour" in data["html"]["charts"]


def test_staff_only(client: Client, django_user_model: Any) -> None:
    for url in (reverse("admin:index"), reverse("admin:ops_dashboard_data")):
        assert client.get(url).status_code == 302  # to the login page
    user = django_user_model.objects.create_user(username="someone", password="pw-123456789")
    client.force_login(user)  # not staff
    answer = client.get(reverse("admin:ops_dashboard_data"))
    assert answer.status_code == 302 and "/login/" in answer["Location"]


def test_no_usage_record_is_read(admin_client: Client, fleet: Fleet) -> None:
    table = UsageRecord._meta.db_table
    with CaptureQueriesContext(connection) as queries:
        assert admin_client.get(reverse("admin:index")).status_code == 200
        assert admin_client.get(reverse("admin:ops_dashboard_data") + "?charts=1").status_code == 200
    statements = [q["sql"] for q in queries.captured_queries]
    assert any("governance_usagebackendbucket" in sql for sql in statements)
    assert not [sql for sql in statements if table in sql]
    # and the page costs a bounded number of queries, whatever the traffic
    assert len(statements) < 40


def test_an_empty_fleet(admin_client: Client) -> None:
    page = admin_client.get(reverse("admin:index")).content.decode()
    assert "No pools yet" in page and "no run yet" in page
