"""bf16 vs fp32: the whole train step of every method on the default model, one run.

    python benchmarks/bench_precision.py [--batch 16] [--seq 64] [--repeats 6]
    python benchmarks/bench_precision.py --workload trainer [--batches 4] [--repeats 6]

Each method is built twice, once with its frozen weights stored in fp32 and once in bf16
(adapters and routers stay fp32), and the steps run interleaved, round after round. Full
SFT in bf16 follows the trainer's recipe: fp32 master weights, bf16 compute under autocast.
In bf16 on a CPU the attention product runs in fp32, as the trainer runs it
(loramoe/backends/attention.py; --attention sdpa: torch's bf16 kernel).

Two workloads. `random` (default): a random batch × seq of token ids, every token a
response token, torch's default thread count; PEFT LoRA's dropout is the trainer's
(PositionsDropout, loramoe/backends/dropout.py). `trainer`: each method as the trainer
builds it (bench_length_pieces.trainer_model) on the default mixture's first batches, the
trainer's step (length pieces, response tokens only, LBC, backward, fused AdamW), one thread
as a pipeline branch trains (--threads). Prints ms/step, tokens/s, the bf16 speed-up per
method and each adapter method / frozen base in each dtype.
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench_length_pieces  # a sibling script: benchmarks/ is on sys.path
import torch
from arguments import at_least, listed
from peft import LoraConfig, get_peft_model
from train_step import frozen_floor, make_step

from loramoe import LoRAMoEConfig, apply_loramoe, load_base_model
from loramoe.backends.attention import use_training_attention
from loramoe.backends.dropout import use_positions_dropout
from loramoe.train.objective import ResponseLM

FFN = ["gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
AS_TRAINER_NAMES = {"frozen base": "frozen", "PEFT LoRA": "lora", "LoRAMoE": "loramoe",
                   "sft": "sft"}  # this script's names -> the trainer's


def build(method: str, dtype: str, attention: str = "trainer"):
    """(model, autocast dtype or None) for one method with frozen weights in `dtype`."""
    storage = torch.float32 if method == "sft" else DTYPES[dtype]
    model, _ = load_base_model(dtype=storage)
    if attention == "trainer":
        use_training_attention(model, DTYPES[dtype], torch.device("cpu"))
    if method == "frozen base":
        frozen_floor(model)
    elif method == "PEFT LoRA":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules=FFN, task_type="CAUSAL_LM"))
        use_positions_dropout(model)  # as the trainer builds its LoRA
    elif method == "LoRAMoE":
        apply_loramoe(model, LoRAMoEConfig())
    autocast = DTYPES[dtype] if method == "sft" and dtype != "fp32" else None
    return model.train(), autocast


def random_steps(methods: list[str], args) -> tuple[dict, int, int]:
    """A closure per (method, dtype) running one step on one random batch; its tokens a
    step; steps a call (1)."""
    torch.manual_seed(0)
    ids = torch.randint(100, 49_152, (args.batch, args.seq))
    steps = {}
    for method in methods:
        for dtype in DTYPES:
            model, autocast = build(method, dtype, args.attention)
            steps[(method, dtype)] = make_step(model, ids, method == "LoRAMoE", lr=1e-5,
                                               autocast=autocast)
    return steps, args.batch * args.seq, 1


def trainer_steps(methods: list[str], args) -> tuple[dict, int, int]:
    """A closure per (method, dtype) running the trainer's step on each of the default
    mixture's first `args.batches` batches (the same batches for all); real tokens a step;
    steps a call."""
    pipeline, frame = bench_length_pieces.default_train_frame()
    steps, batches = {}, None
    for method in methods:
        for dtype in DTYPES:
            model, tokenizer, config, autocast = bench_length_pieces.trainer_model(
                pipeline, AS_TRAINER_NAMES[method], dtype, args.attention == "trainer")
            batches = batches or bench_length_pieces.first_batches(config, tokenizer, frame,
                                                                   args.batches)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True) if params else None
            steps[(method, dtype)] = bench_length_pieces.steps_on(
                ResponseLM(model).train(), batches, config, autocast, optimizer)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    return steps, round(tokens), len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", choices=["random", "trainer"], default="random")
    parser.add_argument("--batch", type=at_least(1), default=16, help="random workload")
    parser.add_argument("--seq", type=at_least(1), default=64, help="random workload")
    parser.add_argument("--batches", type=at_least(1), default=4, help="trainer workload")
    parser.add_argument("--threads", type=at_least(1), default=None,
                        help="default: torch's (random), 1 (trainer)")
    parser.add_argument("--repeats", type=at_least(1), default=6)
    parser.add_argument("--methods", type=listed(AS_TRAINER_NAMES),
                        default="frozen base,PEFT LoRA,LoRAMoE,sft")
    parser.add_argument("--attention", choices=["trainer", "sdpa"], default="trainer")
    args = parser.parse_args()
    threads = args.threads or (1 if args.workload == "trainer" else None)
    if threads:
        torch.set_num_threads(threads)
    methods = args.methods
    make = trainer_steps if args.workload == "trainer" else random_steps
    steps, tokens, per_call = make(methods, args)
    for step in steps.values():  # warm-up
        step()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(args.repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append((time.perf_counter() - start) / per_call)
    report(times, tokens, args)


def report(times, tokens: int, args) -> None:
    ms = {key: 1000 * statistics.median(t) for key, t in times.items()}
    shape = (f"batch {args.batch} x {args.seq}" if args.workload == "random" else
             f"the trainer's step on the default mixture's first {args.batches} batches "
             f"({tokens} real tokens a step)")
    print(f"Train step, SmolLM2-135M-Instruct, {shape}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.repeats} rounds, attention in bf16: "
          f"{args.attention}")
    print(f"  {'method':<12} {'fp32 ms':>9} {'bf16 ms':>9} {'bf16 tok/s':>11} {'speed-up':>9}"
          f"  (per round: median, range)")
    methods = list(dict.fromkeys(m for m, _ in times))
    for method in methods:
        print(f"  {method:<12} {ms[(method, 'fp32')]:9.1f} {ms[(method, 'bf16')]:9.1f} "
              f"{tokens / ms[(method, 'bf16')] * 1000:11.0f} "
              f"{ms[(method, 'fp32')] / ms[(method, 'bf16')]:8.2f}x  "
              f"({paired(times[(method, 'fp32')], times[(method, 'bf16')])})")
    if "frozen base" not in methods:
        return
    for method in (m for m in methods if m in ("PEFT LoRA", "LoRAMoE")):
        for dtype in DTYPES:
            print(f"  {method} / frozen base in {dtype}: "
                  f"{ms[(method, dtype)] / ms[('frozen base', dtype)]:.3f}x  (per round: "
                  f"{paired(times[(method, dtype)], times[('frozen base', dtype)])})")


def paired(numerator: list[float], denominator: list[float]) -> str:
    """'median, min-max' of the per-round ratios (a round's steps run seconds apart, so the
    slow drift of a noisy machine cancels in them)."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return f"{statistics.median(ratios):.2f}, {min(ratios):.2f}-{max(ratios):.2f}"


if __name__ == "__main__":
    main()
