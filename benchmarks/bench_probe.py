"""The likelihood probe on the default eval's held-out facts: speed, and what the base knows.

    python benchmarks/bench_probe.py [--batch 64] [--dtypes bf16,fp32]

Builds the default config's eval set (flows/configs/default.toml), probes every fact with the
default model in each dtype (one run), and prints facts/s, multiple-choice accuracy with its
Wilson interval, the facts right per relation, and the paired comparison of the dtypes on the
same facts (exact McNemar) with the mean |difference| of the gold log-prob.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import tomllib
import torch

from loramoe.data import build_mixture
from loramoe.evaluate.probe import probe_facts
from loramoe.evaluate.stats import paired_binary, wilson_interval
from loramoe.model import load_base_model
from loramoe.pipeline import PipelineConfig

CONFIGS = Path(__file__).resolve().parents[1] / "flows" / "configs"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtypes", default="bf16,fp32")
    args = parser.parse_args()
    config = PipelineConfig.from_dict(tomllib.loads((CONFIGS / "default.toml").read_text()),
                                      base_dir=CONFIGS)
    facts = build_mixture(config.mixture).eval
    results = {}
    for name in args.dtypes.split(","):
        model, tokenizer = load_base_model(config.base_model, dtype=DTYPES[name])
        start = time.perf_counter()
        probe = probe_facts(model, tokenizer, facts, batch_size=args.batch)
        seconds = time.perf_counter() - start
        right, n = int(probe["mc_correct"].sum()), len(probe)
        lo, hi = wilson_interval(right, n)
        print(f"{name}: {n} facts in {seconds:.0f} s = {n / seconds:.1f} facts/s; "
              f"right {right}/{n} = {right / n:.4f} [{lo:.4f}, {hi:.4f}]")
        per_task = probe.merge(facts[["id", "task"]], on="id").groupby("task")["mc_correct"]
        for task, group in per_task:
            print(f"  {task}: {int(group.sum())}/{len(group)} ({group.mean():.3f})")
        results[name] = probe.set_index("id")
    if len(results) == 2:
        a, b = (results[name] for name in results)
        b = b.loc[a.index]
        test = paired_binary(a["mc_correct"], b["mc_correct"])
        names = " - ".join(results)
        print(f"paired {names}: diff {test['diff']:+.4f}, discordant {test['only_a']} vs "
              f"{test['only_b']}, exact McNemar p = {test['p']:.3f}; mean |Δ gold log-prob| "
              f"{(a['gold_logprob'] - b['gold_logprob']).abs().mean():.3f}")


if __name__ == "__main__":
    main()
