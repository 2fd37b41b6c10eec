"""The admin in a real browser: Playwright drives Debian's Chromium (never a downloaded browser) through a login,
the operations dashboard (its refresh without reloading the page, a laptop-sized window, the dark theme), a pool
page, a check run and a usage record with its trace link.

Screenshots are saved under the test's temporary folder, and into docs/img/ (what docs/operations.md shows) when
DOCS_SCREENSHOTS=1 (`make docs-screenshots`). Skipped when Chromium or Playwright is missing, unless
BROWSER_TESTS_REQUIRED=1 (as .ci/run sets after installing Chromium), where that fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.ops.conftest import TRACE, Fleet

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
DOCS_IMG = ROOT / "docs" / "img"
LAPTOP: Any = {"width": 1366, "height": 768}  # a ViewportSize
# As the machine's notes say: without the background-networking flags Chromium keeps dialling out (refused here).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "browser-test-Passw0rd"


def chromium_path() -> str | None:
    """Debian's Chromium: $CHROMIUM_PATH, else `chromium` on the PATH, else /usr/bin/chromium."""
    for candidate in (os.environ.get("CHROMIUM_PATH"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _missing(reason: str) -> NoReturn:
    if os.environ.get("BROWSER_TESTS_REQUIRED") == "1":
        pytest.fail(f"{reason} (BROWSER_TESTS_REQUIRED=1)")
    pytest.skip(reason)


@pytest.fixture
def browser_page(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A Chromium page in a laptop-sized window."""
    executable = chromium_path()
    if executable is None:
        _missing("Chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright is not installed (requirements-dev.txt)")
    # Playwright's sync API runs an event loop in this thread; the ORM is used by the live server's thread only.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport=LAPTOP, color_scheme="light")
        context.set_default_timeout(15_000)
        page = context.new_page()
        try:
            yield page
        finally:
            context.close()
            browser.close()


def shot(page: Any, name: str, folder: Path, *, full_page: bool = True) -> None:
    """Save a screenshot in the test's folder, and in docs/img/ when DOCS_SCREENSHOTS=1."""
    png = page.screenshot(path=str(folder / name), full_page=full_page)
    assert len(png) > 10_000  # a real picture, not an empty page
    if os.environ.get("DOCS_SCREENSHOTS") == "1":
        (DOCS_IMG / name).write_bytes(png)


def test_dashboard_pool_check_run_and_request_log_in_chromium(
    fleet: Fleet,
    live_server: Any,
    browser_page: Any,
    settings: Any,
    django_user_model: Any,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    settings.OPS_DASHBOARD_REFRESH_S = 1
    settings.ROUTER_TRACE_LINK_TEMPLATE = "https://jaeger.example/trace/{trace_id}"
    django_user_model.objects.create_superuser(username="operator", email="op@example.com", password=PASSWORD)
    page = browser_page
    base = live_server.url

    # --- log in: the front page is the dashboard ---------------------------------------------------------------
    page.goto(f"{base}/admin/login/?next=/admin/")
    page.fill("#id_username", "operator")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"{base}/admin/")
    dashboard = page.locator("#ops-dashboard")
    expect(dashboard).to_be_visible()
    chat = page.locator('section.ops-pool[data-pool="chat-a100"]')
    expect(chat.locator("h2 a")).to_have_text("chat-a100")
    gpu1 = chat.locator('tr[data-backend="gpu-1"]')
    gpu2 = chat.locator('tr[data-backend="gpu-2"]')
    expect(gpu1.locator(".ops-in-flight")).to_have_text("3")
    expect(gpu1.locator("td").nth(1)).to_have_text("healthy")
    expect(gpu2.locator("td").nth(1)).to_have_text("unhealthy")
    expect(gpu2.locator("td").nth(2)).to_have_text("open")
    expect(gpu2.locator("td").nth(11)).to_have_text("1/2")  # nightly checks: one of two passed
    expect(gpu1.locator("td").nth(5)).to_have_text("10 %")  # error rate: 1 of 10
    expect(gpu1.locator("td").nth(8)).to_have_text("42 %")  # KV cache, scraped from the engine
    expect(gpu1.locator("td").nth(9)).to_have_text("2 waiting · 0 running")
    expect(gpu1.locator("td").nth(10)).to_have_text("62 %")  # the engine's prefix-cache hit rate
    expect(page.locator("#ops-total-requests")).to_have_text("13")
    expect(page.locator("#ops-check-run")).to_contain_text(f"run #{fleet.run.pk} failed")
    expect(page.locator(".ops-chart svg")).to_have_count(4)  # two charts per pool
    # the admin's app list is still there, below
    expect(page.locator("#ops-apps")).to_be_visible()
    expect(page.locator("#content-main a", has_text="Usage records")).to_be_visible()
    # a laptop screen: nothing wider than the window
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, "dashboard.png", tmp_path)

    # --- the figures refresh without reloading the page ------------------------------------------------------------
    page.evaluate("window.__sameDocument = true")
    fleet.dispatcher.in_flight["gpu-1"] = 5
    expect(gpu1.locator(".ops-in-flight")).to_have_text("5", timeout=10_000)
    assert page.evaluate("window.__sameDocument === true")  # no navigation happened
    assert int(page.locator("#ops-dashboard").get_attribute("data-refreshed") or 0) >= 1

    # --- the dark theme: the dashboard follows the admin's colours ---------------------------------------------------
    page.emulate_media(color_scheme="dark")
    page.reload()
    expect(gpu1.locator(".ops-in-flight")).to_have_text("5")
    brightness = page.evaluate(
        """() => {
            const rgb = (colour) => colour.match(/\\d+/g).slice(0, 3).map(Number);
            const sum = (c) => c[0] + c[1] + c[2];
            const style = (selector) => getComputedStyle(document.querySelector(selector));
            const background = (selector) => sum(rgb(style(selector).backgroundColor));
            return {
                body: background('body'),
                tile: background('.ops-tile'),
                chart: background('.ops-chart svg'),
                text: sum(rgb(style('.ops-value').color)),
            };
        }"""
    )
    assert brightness["body"] < 200 and brightness["tile"] < 200 and brightness["chart"] < 200, brightness
    assert brightness["text"] > 450, brightness  # light text on the dark background
    shot(page, "dashboard-dark.png", tmp_path)
    page.emulate_media(color_scheme="light")

    # --- a pool page ------------------------------------------------------------------------------------------------
    page.click('section.ops-pool[data-pool="chat-a100"] h2 a')
    page.wait_for_url(f"{base}/admin/backends/gpupool/{fleet.chat.pk}/change/")
    live = page.locator("table.live-backends")
    expect(live).to_contain_text("gpu-1")
    expect(live.locator("tr", has_text="gpu-2")).to_contain_text("open")
    expect(page.locator("#id_name")).to_have_value("chat-a100")
    shot(page, "pool.png", tmp_path)

    # --- the nightly check run, from the dashboard's link -----------------------------------------------------------
    page.goto(f"{base}/admin/")
    page.click("#ops-check-run")
    page.wait_for_url(f"{base}/admin/backends/checkrun/{fleet.run.pk}/change/")
    expect(page.locator("#content")).to_contain_text(f"check run #{fleet.run.pk}")
    expect(page.locator("body")).to_contain_text("capital")
    expect(page.locator("body")).to_contain_text("gpu-2")
    shot(page, "check-run.png", tmp_path)

    # --- the request log: search a trace id, open the record, its trace link ------------------------------------------
    page.goto(f"{base}/admin/governance/usagerecord/")
    page.fill("#searchbar", TRACE)
    page.press("#searchbar", "Enter")
    rows = page.locator("#result_list tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("s0")
    trace = rows.first.locator("a.trace-link")
    expect(trace).to_have_attribute("href", f"https://jaeger.example/trace/{TRACE}")
    expect(rows.first.locator("td.field-ttft")).to_have_text("80 ms")
    page.click("#toggle-nav-sidebar")  # the admin's navigation folded away: the whole log fits a laptop screen
    page.evaluate("window.scrollTo(0, 0)")
    results, link_box = page.locator("#changelist .results").bounding_box(), trace.bounding_box()
    assert results is not None and link_box is not None
    assert link_box["x"] + link_box["width"] <= results["x"] + results["width"]  # the trace column is in sight
    shot(page, "request-log.png", tmp_path, full_page=False)
    rows.first.locator("a", has_text="s0").click()
    page.wait_for_url(re.compile(r"/admin/governance/usagerecord/\d+/change/"))  # (with the list's filters)
    link = page.locator(".field-trace a.trace-link")
    expect(link).to_have_attribute("href", f"https://jaeger.example/trace/{TRACE}")
    expect(link).to_have_attribute("target", "_blank")
    expect(page.locator(".field-ttft")).to_contain_text("80 ms")
    shot(page, "usage-record.png", tmp_path)
