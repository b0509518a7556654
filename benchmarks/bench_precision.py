"""bf16 vs fp32: the whole train step of every method on the default model, one run.

    python benchmarks/bench_precision.py [--batch 16] [--seq 64] [--repeats 6]

Each method is built twice, once with its frozen weights stored in fp32 and once in bf16
(`load_base_model(dtype=...)`; adapters and routers stay fp32), and the steps run
interleaved, round after round. Full SFT in bf16 follows the trainer's recipe: fp32 master
weights, bf16 compute under autocast. PEFT LoRA's dropout is the trainer's
(PositionsDropout, loramoe/backends/dropout.py). In bf16 on a CPU the attention product runs
in fp32, as the trainer runs it (loramoe/backends/attention.py; --attention sdpa: torch's
bf16 kernel). Prints ms/step, tokens/s, bf16 speed-up per method and
LoRAMoE / frozen base in each dtype.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from train_step import make_step

from loramoe import LoRAMoEConfig, apply_loramoe, load_base_model
from loramoe.backends.attention import use_training_attention
from loramoe.backends.dropout import use_positions_dropout

FFN = ["gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(method: str, dtype: str, attention: str = "trainer"):
    """(model, autocast dtype or None) for one method with frozen weights in `dtype`."""
    storage = torch.float32 if method == "sft" else DTYPES[dtype]
    model, _ = load_base_model(dtype=storage)
    if attention == "trainer":
        use_training_attention(model, DTYPES[dtype], torch.device("cpu"))
    if method == "frozen base":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif method == "PEFT LoRA":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules=FFN, task_type="CAUSAL_LM"))
        use_positions_dropout(model)  # as the trainer builds its LoRA
    elif method == "LoRAMoE":
        apply_loramoe(model, LoRAMoEConfig())
    autocast = DTYPES[dtype] if method == "sft" and dtype != "fp32" else None
    return model.train(), autocast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--methods", default="frozen base,PEFT LoRA,LoRAMoE,sft")
    parser.add_argument("--attention", choices=["trainer", "sdpa"], default="trainer")
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(100, 49_152, (args.batch, args.seq))
    steps = {}
    for method in args.methods.split(","):
        for dtype in DTYPES:
            model, autocast = build(method, dtype, args.attention)
            steps[(method, dtype)] = make_step(model, ids, method == "LoRAMoE", lr=1e-5,
                                               autocast=autocast)
    for step in steps.values():  # warm-up
        step()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(args.repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    report(times, args)


def report(times, args) -> None:
    ms = {key: 1000 * statistics.median(t) for key, t in times.items()}
    tokens = args.batch * args.seq
    print(f"Train step, SmolLM2-135M-Instruct, batch {args.batch} x {args.seq}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.repeats} rounds, "
          f"attention in bf16: {args.attention}")
    print(f"  {'method':<12} {'fp32 ms':>9} {'bf16 ms':>9} {'bf16 tok/s':>11} {'speed-up':>9}"
          f"  (per round: median, range)")
    for method in dict.fromkeys(m for m, _ in times):
        paired = [a / b for a, b in zip(times[(method, "fp32")], times[(method, "bf16")],
                                        strict=True)]
        print(f"  {method:<12} {ms[(method, 'fp32')]:9.1f} {ms[(method, 'bf16')]:9.1f} "
              f"{tokens / ms[(method, 'bf16')] * 1000:11.0f} "
              f"{ms[(method, 'fp32')] / ms[(method, 'bf16')]:8.2f}x  "
              f"({statistics.median(paired):.2f}, {min(paired):.2f}-{max(paired):.2f})")
    if ("LoRAMoE", "fp32") in ms and ("frozen base", "fp32") in ms:
        for dtype in DTYPES:
            print(f"  LoRAMoE / frozen base in {dtype}: "
                  f"{ms[('LoRAMoE', dtype)] / ms[('frozen base', dtype)]:.3f}x")


if __name__ == "__main__":
    main()
