"""The likelihood probe on the default eval's held-out facts: speed, and what the base knows.

    python benchmarks/bench_probe.py [--batch 64] [--dtypes bf16,fp32]
        [--methods base,lora,loramoe] [--threads 1] [--facts 512]

Builds the default config's eval set (flows/configs/default.toml), probes every fact with the
default model in each dtype (one run), and prints facts/s, multiple-choice accuracy with its
Wilson interval, the facts right per relation, and the paired comparison of the dtypes on the
same facts (exact McNemar) with the mean |difference| of the gold log-prob. Then the
ceiling: the context tokens a fact costs, the matmul FLOPs per token (every linear of the
blocks; the vocabulary projection runs only at the options' tokens), the rate of this CPU's
matmul at the probe's own shapes (a batch of facts' tokens through each block linear), and
the facts/s that rate allows if nothing but those matmuls ran. With --methods, each dtype is
also probed with each method's adapters attached as the trainer attaches them (B non-zero),
as a pipeline branch evaluates them; --threads 1 is how a default-run branch evaluates.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from arguments import (
    ADAPTED_METHODS,
    at_least,
    listed,
)
from bench_generation import with_adapters  # a sibling script: benchmarks/ is on sys.path
from default_config import default_pipeline  # a sibling script: benchmarks/ is on sys.path

from loramoe.data import build_mixture
from loramoe.evaluate.probe import fact_tokens, probe_facts, probed_rows
from loramoe.evaluate.stats import paired_binary, wilson_interval
from loramoe.model import load_base_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=at_least(1), default=64)
    parser.add_argument("--dtypes", type=listed(DTYPES), default="bf16,fp32")
    parser.add_argument("--methods", type=listed(ADAPTED_METHODS), default="base")
    parser.add_argument("--threads", type=at_least(0), default=0, help="torch threads (0: torch's)")
    parser.add_argument("--facts", type=at_least(0), default=0, help="the first N facts (0: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = default_pipeline()
    facts = build_mixture(config.mixture).eval
    facts = facts.head(args.facts) if args.facts else facts
    results = {}
    for name in args.dtypes:
        for method in args.methods:
            model, tokenizer = load_base_model(config.base_model, dtype=DTYPES[name])
            model = with_adapters(model, config.base_model, method)
            start = time.perf_counter()
            probe = probe_facts(model, tokenizer, facts, batch_size=args.batch)
            rate = len(probe) / (time.perf_counter() - start)
            print(f"{name}, {method}, {torch.get_num_threads()} thread(s): {len(probe)} facts "
                  f"= {rate:.1f} facts/s")
            if method == "base":  # what the base knows, and the ceiling
                report_base(probe, facts, name)
                results[name] = probe.set_index("id")
                ceiling(model, tokenizer, facts, args.batch, DTYPES[name], rate)
    if len(results) == 2:
        a, b = (results[name] for name in results)
        b = b.loc[a.index]
        test = paired_binary(a["mc_correct"], b["mc_correct"])
        names = " - ".join(results)
        print(f"paired {names}: diff {test['diff']:+.4f}, discordant {test['only_a']} vs "
              f"{test['only_b']}, exact McNemar p = {test['p']:.3f}; mean |Δ gold log-prob| "
              f"{(a['gold_logprob'] - b['gold_logprob']).abs().mean():.3f}")


def report_base(probe, facts, name: str) -> None:
    """Multiple-choice accuracy with its Wilson interval, overall and per relation."""
    right, n = int(probe["mc_correct"].sum()), len(probe)
    lo, hi = wilson_interval(right, n)
    print(f"{name}: right {right}/{n} = {right / n:.4f} [{lo:.4f}, {hi:.4f}]")
    per_task = probe.merge(facts[["id", "task"]], on="id").groupby("task")["mc_correct"]
    for task, group in per_task:
        print(f"  {task}: {int(group.sum())}/{len(group)} ({group.mean():.3f})")


def context_tokens(tokenizer, facts) -> list[int]:
    """Tokens each fact's context costs (chat-formatted question + answer prefix)."""
    contexts, _ = fact_tokens(tokenizer, probed_rows(facts))
    return [len(context) for context in contexts]


def block_linears(model) -> list[torch.nn.Linear]:
    from loramoe.model import backbone_and_head

    backbone, _ = backbone_and_head(model)
    return [m for m in backbone.modules() if isinstance(m, torch.nn.Linear)]


def matmul_rate(model, rows: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of x·Wᵀ through one block's linears (every block has the same shapes),
    `rows` tokens at a time, median of `repeats`."""
    linears = block_linears(model)
    one_block = linears[: len(linears) // model.config.num_hidden_layers]
    inputs = [torch.randn(rows, m.in_features, dtype=dtype) for m in one_block]
    flops = sum(2 * rows * m.in_features * m.out_features for m in one_block)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for x, m in zip(inputs, one_block, strict=True):
                torch.nn.functional.linear(x, m.weight)
            times.append(time.perf_counter() - start)
    return flops / statistics.median(times[1:]) / 1e9


def ceiling(model, tokenizer, facts, batch: int, dtype: torch.dtype, measured: float) -> None:
    tokens = statistics.mean(context_tokens(tokenizer, facts))
    rows = int(batch * tokens)
    per_token = 2 * sum(m.in_features * m.out_features for m in block_linears(model))
    per_fact = per_token * tokens
    rate = matmul_rate(model, rows, dtype)
    print(f"ceiling ({dtype}, {torch.get_num_threads()} threads): {tokens:.1f} "
          f"context tokens a fact, {per_token / 1e6:.0f} MFLOP a token -> "
          f"{per_fact / 1e9:.2f} GFLOP a fact; block matmuls at the probe's shapes "
          f"({rows} rows) run at {rate:.0f} GFLOP/s -> at most "
          f"{rate / (per_fact / 1e9):.0f} facts/s from matmuls alone; the probe ran "
          f"{measured:.1f} ({measured * per_fact / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
