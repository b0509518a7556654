"""The probe with the contexts' shared first tokens run once (KV cache) vs in every row.

    python benchmarks/bench_probe_prefix.py [--facts 256] [--methods base,loramoe]
        [--rounds 2] [--threads 1] [--dtype auto]

Probes a seeded sample of the default eval's facts (flows/configs/default.toml) with the
default model, each method's adapters attached as a branch evaluates them (B non-zero), both
ways, interleaved rounds in one process: prints the seconds of each probe, the ratio
cached / in every row per round, the shared prefix's length, the tokens it spares, and the
largest |difference| of a gold log-prob and the multiple-choice answers that differ.
--threads 1 is how a default-run branch evaluates.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
from arguments import (
    ADAPTED_METHODS,
    PRECISIONS,
    at_least,
    listed,
)
from bench_generation import with_adapters  # a sibling script: benchmarks/ is on sys.path
from default_config import default_pipeline  # a sibling script: benchmarks/ is on sys.path

from loramoe.data import build_mixture
from loramoe.evaluate import probe
from loramoe.model import load_base_model
from loramoe.precision import resolve_dtype


@contextmanager
def no_shared_prefix():
    """The probe as before the shared prefix: every row holds its whole context."""
    found = probe.shared_prefix
    probe.shared_prefix = lambda model, contexts: probe.SharedPrefix()
    try:
        yield
    finally:
        probe.shared_prefix = found


def token_counts(model, tokenizer, facts) -> tuple[int, int]:
    """(tokens of every packed row, the shared prefix's length)."""
    contexts, options = probe.fact_tokens(tokenizer, facts)
    total = sum(probe.packed_length(c, o) for c, o in zip(contexts, options, strict=True))
    return total, probe.shared_prefix(model, contexts).length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=at_least(1), default=256)
    parser.add_argument("--methods", type=listed(ADAPTED_METHODS), default="base,loramoe")
    parser.add_argument("--rounds", type=at_least(1), default=2)
    parser.add_argument("--threads", type=at_least(0), default=1, help="torch threads (0: torch's)")
    parser.add_argument("--dtype", choices=PRECISIONS, default="auto")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = default_pipeline()
    facts = probe.probed_rows(build_mixture(config.mixture).eval)
    facts = facts.sample(min(args.facts, len(facts)), random_state=0)
    dtype = resolve_dtype(args.dtype)
    for method in args.methods:
        model, tokenizer = load_base_model(config.base_model, dtype=dtype)
        model = with_adapters(model, config.base_model, method)
        total, common = token_counts(model, tokenizer, facts)
        print(f"{method}, {dtype}, {torch.get_num_threads()} thread(s), {len(facts)} facts: "
              f"{total} packed tokens, a shared prefix of {common} spares {common * len(facts)}"
              f" ({common * len(facts) / total:.1%})")
        ratios, got = [], {}
        for round_ in range(args.rounds):
            seconds = {}
            for way in ("every row", "cached"):
                start = time.perf_counter()
                if way == "cached":
                    got[way] = probe.probe_facts(model, tokenizer, facts)
                else:
                    with no_shared_prefix():
                        got[way] = probe.probe_facts(model, tokenizer, facts)
                seconds[way] = time.perf_counter() - start
            ratios.append(seconds["cached"] / seconds["every row"])
            print(f"  round {round_ + 1}: every row {seconds['every row']:.1f} s, cached "
                  f"{seconds['cached']:.1f} s, ratio {ratios[-1]:.3f}", flush=True)
        a, b = got["every row"], got["cached"]
        print(f"  median ratio {statistics.median(ratios):.3f}; max |Δ gold log-prob| "
              f"{(a['gold_logprob'] - b['gold_logprob']).abs().max():.2e}; answers that differ "
              f"{int((a['mc_correct'] != b['mc_correct']).sum())}")


if __name__ == "__main__":
    main()
