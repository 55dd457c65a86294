#!/usr/bin/env bash
# The demo: the embedded SmolLM2-135M-Instruct on built-in arithmetic word problems, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m slime.demo "$@"
