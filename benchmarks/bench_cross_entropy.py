"""Does the chunked training loss pay its way? Whole train steps, before vs after, one run.

    python benchmarks/bench_cross_entropy.py [--dtypes bf16,fp32] [--repeats 8]
        [--trainer-rounds 4] [--batches 4] [--threads 1]

The trainer's loss (ResponseLM) computed two ways on the same model, interleaved round after
round: F.cross_entropy on the fp32-cast logits (before) and loramoe/backends/
cross_entropy.py's chunked loss (what the trainer uses). Two settings:

1. `train_step.py`'s step of every method on one random batch (16 × 64, every token a
   response token: the loss's largest share), models built as bench_precision.py builds
   them (frozen weights stored in that dtype, full SFT under autocast with fp32 master
   weights, the trainer's attention), 2 threads;
2. the trainer's own step (length pieces, LBC) on the default mixture's first batches, where
   only response tokens reach the LM head, per method, `--threads` (1: as a pipeline branch).

The rule (docs/benchmarks.md): it stays only if it saves at least 5 % of a whole step.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import bench_length_pieces  # sibling scripts: benchmarks/ is on sys.path
import tomllib
import torch
import torch.nn.functional as F
from bench_precision import build
from train_step import interleaved, make_step

from loramoe.backends.attention import use_training_attention
from loramoe.backends.cross_entropy import cross_entropy_sum
from loramoe.data import build_mixture
from loramoe.pipeline import PipelineConfig
from loramoe.train.builders import build_model, precision_plan
from loramoe.train.objective import ResponseLM

CONFIGS = Path(__file__).resolve().parents[1] / "flows" / "configs"


def plain(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


LOSSES = {"F.cross_entropy": plain, "chunked": cross_entropy_sum}


def random_batch_steps(args) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    ids = torch.randint(100, 49_152, (args.batch, args.seq))
    steps = {}
    for dtype in args.dtypes.split(","):
        for method in args.methods.split(","):
            model, autocast = build(method, dtype)
            for loss_name, loss in LOSSES.items():
                steps[(dtype, method, loss_name)] = make_step(
                    model, ids, method == "LoRAMoE", lr=1e-5, autocast=autocast,
                    cross_entropy=loss)
    return interleaved(steps, args.repeats)


def trainer_steps(args) -> dict:
    torch.set_num_threads(args.threads)
    pipeline = PipelineConfig.from_dict(tomllib.loads((CONFIGS / "default.toml").read_text()),
                                        base_dir=CONFIGS)
    frame = build_mixture(pipeline.mixture).train[max(pipeline.mixture.scales)]
    steps, batches = {}, None
    for dtype_name in args.dtypes.split(","):
        for method in ("sft", "lora", "loramoe"):
            config = dataclasses.replace(
                pipeline.train_config({"method": method}, Path("unused"), Path("unused")),
                dtype=dtype_name)
            dtype, autocast, _ = precision_plan(config, torch.device("cpu"))
            model, tokenizer = build_model(config, dtype)
            use_training_attention(model, dtype, torch.device("cpu"))
            batches = batches or bench_length_pieces.first_batches(config, tokenizer, frame,
                                                                   args.batches)
            for loss_name, loss in LOSSES.items():
                objective = ResponseLM(model, loss).train()
                steps[(dtype_name, method, loss_name)] = (
                    lambda o=objective, c=config, a=autocast, bs=batches: [
                        bench_length_pieces.step(o, b, c, split=True, autocast=a)
                        for b in bs])
    for step in steps.values():
        step()  # warm-up
    seconds: dict = {key: [] for key in steps}
    for _ in range(args.trainer_rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[key].append((time.perf_counter() - start) / len(batches))
    return seconds


def report(title: str, times: dict) -> None:
    print(title)
    print(f"  {'dtype':<5} {'method':<12} {'F.c_e ms':>9} {'chunked ms':>11} {'saved':>7}"
          f"  (per round: median, range)")
    for dtype, method, _ in list(times)[::2]:
        before = times[(dtype, method, "F.cross_entropy")]
        after = times[(dtype, method, "chunked")]
        saved = [1 - a / b for a, b in zip(after, before, strict=True)]
        print(f"  {dtype:<5} {method:<12} {1000 * statistics.median(before):9.1f} "
              f"{1000 * statistics.median(after):11.1f} "
              f"{1 - statistics.median(after) / statistics.median(before):7.1%}"
              f"  ({statistics.median(saved):.1%}, {min(saved):.1%} to {max(saved):.1%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--dtypes", default="bf16")
    parser.add_argument("--methods", default="frozen base,PEFT LoRA,LoRAMoE,sft")
    parser.add_argument("--trainer-rounds", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    header = f"torch {torch.__version__}, SmolLM2-135M-Instruct"
    if args.repeats:
        report(f"1. train_step.py, random batch {args.batch} x {args.seq} (all tokens "
               f"response), 2 threads, {args.repeats} rounds, {header}",
               random_batch_steps(args))
    if args.trainer_rounds:
        report(f"2. the trainer's step, default mixture, first {args.batches} batches, "
               f"{args.threads} thread(s), {args.trainer_rounds} rounds, ms per batch, "
               f"{header}", trainer_steps(args))


if __name__ == "__main__":
    main()
