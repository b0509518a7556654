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
# deepspeed_zero3.yaml when DeepSpeed's wheels were installed, launched as a gpu > 1 branch
# launches them, against one plain process) and the smoke flow with resources.gpu = 1
# (benchmarks/configs/gpu_smoke.toml, then benchmarks/gpu_flow_summary.py: where each branch
# trained and where the champion was scored). The flow needs ~100 MiB of wheels, more than one
# call can carry: benchmarks/gpu_wheels.sh splits them in two folders, installed by two calls
# made back to back (the warm machine keeps the first call's packages):
#
#   run(command="bash benchmarks/gpu_install.sh", carry=["benchmarks/wheels/1"])
#   run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/wheels/2"])
#
# A part whose packages are missing is skipped with the reason.
# Results of the 2026-12-04 H200 run: docs/benchmarks.md §4.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
status=0
bash benchmarks/gpu_install.sh || status=1
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
echo "== the smoke flow with resources.gpu = 1"
missing=$(python benchmarks/gpu_flow_summary.py --missing)
if [ -n "$missing" ]; then
    echo "skipped: $missing missing (carry benchmarks/wheels/1 and 2: see the top of this file)"
elif ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "skipped: no CUDA GPU"
else
    started=$SECONDS
    METAFLOW_USER=${METAFLOW_USER:-${USER:-gpu-check}} timeout 240 python flows/full_pipeline.py \
        --config config benchmarks/configs/gpu_smoke.toml run > "$LOG/flow.log" 2>&1
    flow=$?
    echo "flow exit $flow in $((SECONDS - started)) s (log: flow.log)"
    [ $flow -eq 0 ] || { grep -E "Error|error" "$LOG/flow.log" | tail -5; status=1; }
    python benchmarks/gpu_flow_summary.py || status=1
fi
exit $status
