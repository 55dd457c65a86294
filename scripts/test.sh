#!/usr/bin/env bash
# The test suite: ruff, then pytest (unit + integration on loopback with the real engine, router and Ray).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
