#!/usr/bin/env bash
# What sglang-router's launcher imports (fastapi, uvicorn and theirs) and the GPU machines lack, as .gpu/web.tar.xz
# next to the parts of ../shared/gpu/bundle.sh (the prelude unpacks every .gpu/*.tar.xz). Run from the repo root:
#   ../shared/gpu/bundle.sh ray router math && benchmarks/gpu/bundle_router_deps.sh
set -euo pipefail
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$tmp" fastapi==0.165.0 uvicorn==0.54.0 starlette==1.10.0 pydantic==2.14.3 \
  pydantic-core==2.50.4 annotated-types typing-inspection opentelemetry-api==1.45.2 importlib-metadata
mkdir -p "$tmp/x" && for f in "$tmp"/*.whl; do (cd "$tmp/x" && unzip -qo "$f"); done
tar -C "$tmp/x" -cf - . | xz -T0 -6 > .gpu/web.tar.xz
du -sh .gpu/web.tar.xz
