#!/usr/bin/env bash
# Debian's Chromium for the browser tests (tests/ops/test_dashboard_browser.py, Playwright with executable_path):
# installed from Debian's packages when missing and we are root; Playwright's own browser downloads are never used.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "Chromium is missing: run 'sudo apt-get install chromium' (the browser tests skip without it)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
command -v chromium
