// The operations dashboard's refresh: every data-refresh seconds the live figures are fetched as JSON from
// data-url and swapped in (the charts once a minute), without reloading the page. Paused while the tab is hidden.
(function () {
  "use strict";
  const root = document.getElementById("ops-dashboard");
  if (!root || !window.fetch) {
    return;
  }
  const url = root.dataset.url;
  const every = Math.max(1, Number(root.dataset.refresh) || 5) * 1000;
  const chartsEvery = Math.max(1, Math.round(60000 / every));
  let polls = 0;
  let busy = false;

  async function refresh() {
    if (busy || document.hidden) {
      return;
    }
    busy = true;
    polls += 1;
    const withCharts = polls % chartsEvery === 0;
    try {
      const response = await fetch(url + (withCharts ? "?charts=1" : ""), {
        headers: { Accept: "application/json" },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (!response.ok) {
        throw new Error("HTTP " + response.status);
      }
      const data = await response.json(); // a login page (session expired) fails here
      document.getElementById("ops-live").innerHTML = data.html.live;
      if (data.html.charts) {
        document.getElementById("ops-charts").innerHTML = data.html.charts;
      }
      root.classList.remove("ops-stale");
      root.dataset.refreshed = String(polls);
    } catch (error) {
      root.classList.add("ops-stale");
      const updated = document.getElementById("ops-updated");
      if (updated) {
        updated.textContent = updated.textContent.split(" (")[0] + " (refresh failed: " + error.message + ")";
      }
    } finally {
      busy = false;
    }
  }

  window.setInterval(refresh, every);
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) {
      refresh();
    }
  });
})();
