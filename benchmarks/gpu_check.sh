#!/usr/bin/env bash
# The GPU check, in one short call (target: <= 8 minutes on one H100/H200-class GPU).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#
# The borrowed GPU machine is bare and offline (torch, transformers, peft, accelerate,
# safetensors, pandas, pytest; no mlflow, metaflow, great-expectations, gguf, datasets), so
# this installs loramoe without dependencies and uses only those packages. Prints: the CUDA
# tests (tests/test_cuda.py: layer in bf16 vs the fp64 formula, generate with the KV cache,
# one train step of each method) and the train-step benchmark (benchmarks/bench_gpu.py:
# LoRAMoE vs PEFT LoRA vs frozen base, tokens/s and peak memory, SmolLM2-135M-shaped and
# ~1B Llama-shaped random models, batch 8 x 1024; the fused node, the default backend,
# against the formula) and the launch check (benchmarks/gpu_launch_check.py: full SFT and
# LoRAMoE and LoRA under infra/accelerate/fsdp.yaml, LoRAMoE under ddp.yaml, full SFT under
# deepspeed_zero3.yaml when benchmarks/wheels was carried, launched as a gpu > 1 branch
# launches them, against one plain process). The smoke flow with gpu = 1 needs
# mlflow, metaflow and great-expectations wheels: ~61 MiB beyond the machine's packages
# (44 without boto), too close to the 64 MiB that can be brought: not run here.
# Results of the 2026-12-04 H200 run: docs/benchmarks.md §4.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
status=0
python -m pip install --quiet --no-deps --no-build-isolation -e . || status=1
# DeepSpeed for the ZeRO-3 launch check, when its wheels were carried (benchmarks/gpu_wheels.sh)
if [ -d benchmarks/wheels ]; then
    python -m pip install --quiet --no-index --find-links benchmarks/wheels deepspeed || status=1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, transformers, peft; print('torch', torch.__version__, '| cuda', \
torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__)"
echo "== CUDA tests"
LOG=${OUT:-/tmp}  # the device tool brings back what is written under $OUT
timeout 180 python -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider -rs \
    2>&1 | tee "$LOG/cuda_tests.log" | tail -25 || status=1
echo "== train step: LoRAMoE vs PEFT LoRA vs frozen base"
timeout 200 python benchmarks/bench_gpu.py --device cuda --repeats 10 --rounds 2 \
    2>&1 | tee "$LOG/bench_gpu.log" || status=1
echo "== launched branches: FSDP / DDP configs vs one plain process"
timeout 150 python benchmarks/gpu_launch_check.py 2>&1 | tee "$LOG/launch_check.log" \
    | grep -v "it/s" || status=1
exit $status
