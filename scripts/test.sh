#!/usr/bin/env bash
# The test suite: ruff, then pytest (unit + integration on loopback with the real engine, router and Ray).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# the run report's test opens the page in a real headless browser: Debian's chromium (root + apt on CI's machine)
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && command -v apt-get >/dev/null; then
  echo "installing chromium for the report test (apt-get)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/tmp/slime-chromium-install.log 2>&1 \
    || { echo "chromium could not be installed; see /tmp/slime-chromium-install.log"; exit 1; }
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
