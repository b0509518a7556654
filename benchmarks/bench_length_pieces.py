"""Train step with and without length pieces (loramoe/train/pieces.py), on the default model.

    python benchmarks/bench_length_pieces.py [--methods sft,lora,loramoe] [--batches 4]
        [--rounds 2] [--threads 1] [--dtype auto]

Takes the default config's largest train scale, shuffles it as the trainer does, and times
the trainer's own step (forward_batch + LBC + backward) on its first batches, whole and in
pieces, interleaved round by round (one run). Prints the padded/real token ratio of both and
the seconds a step, with the ratio. --threads 1 is how a pipeline branch trains.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from arguments import (
    PRECISIONS,
    TRAINER_METHODS,
    at_least,
    listed,
)
from default_config import default_pipeline  # a sibling script: benchmarks/ is on sys.path
from train_step import frozen_floor

from loramoe.backends.attention import use_training_attention
from loramoe.data import build_mixture
from loramoe.data.collate import Collator, encode_records
from loramoe.model import load_base_model
from loramoe.pipeline import PipelineConfig
from loramoe.precision import resolve_dtype
from loramoe.train import TrainConfig
from loramoe.train.builders import build_model, precision_plan
from loramoe.train.loop import forward_batch, lbc_term
from loramoe.train.objective import ResponseLM
from loramoe.train.pieces import length_pieces


def default_train_frame():
    """The default config and its mixture's largest train scale (what the trainer's step
    benchmarks train on)."""
    pipeline = default_pipeline()
    return pipeline, build_mixture(pipeline.mixture).train[max(pipeline.mixture.scales)]


def trainer_model(pipeline: PipelineConfig, method: str, dtype: str,
                  fp32_attention: bool = True):
    """(model, tokenizer, config, autocast) for `method` as the trainer builds them on the
    CPU in `dtype`: frozen weights stored in it, full SFT under autocast (precision_plan),
    and in bf16 the attention product in fp32 (loramoe/backends/attention.py) unless
    `fp32_attention` is False. `method` "frozen" is the floor the adapters are measured
    against: the base alone, stored as the adapter methods store it, every weight frozen and
    the input embeddings requiring grad (so backward runs through every block), trained on
    the plain LM loss (an "sft" config)."""
    frozen = method == "frozen"
    config = dataclasses.replace(
        pipeline.train_config({"method": "lora" if frozen else method}, Path("unused"),
                              Path("unused")), dtype=dtype)
    storage, autocast, _ = precision_plan(config, torch.device("cpu"))
    if frozen:
        model, tokenizer = load_base_model(config.model, dtype=storage)
        frozen_floor(model)
        config = dataclasses.replace(config, method="sft")
    else:
        model, tokenizer = build_model(config, storage)
    if fp32_attention:
        use_training_attention(model, storage, torch.device("cpu"))
    return model, tokenizer, config, autocast


def padded_tokens(batches: list[dict], split: bool) -> int:
    pieces = [p for b in batches for p in (length_pieces(b) if split else [b])]
    return sum(p["attention_mask"].numel() for p in pieces)


def first_batches(config: TrainConfig, tokenizer, frame, count: int) -> list[dict]:
    """The first `count` collated batches of `frame`, shuffled as the trainer shuffles."""
    data = encode_records(tokenizer, frame["prompt"].tolist(), frame["response"].tolist(),
                          frame["task_type"].tolist(), config.loramoe.type_names,
                          config.max_length)
    order = list(range(len(data)))
    random.Random(config.seed).shuffle(order)
    collate = Collator(tokenizer.pad_token_id or 0)
    size = config.batch_size
    return [collate([data[i] for i in order[at:at + size]])
            for at in range(0, count * size, size)]


def step(model, batch, config: TrainConfig, split: bool,
         autocast: torch.dtype | None = None, optimizer=None) -> None:
    """The trainer's step: forward (under `autocast` if given, as full SFT in bf16), LBC,
    backward, then `optimizer`'s step if one is given; gradients dropped."""
    context = (torch.autocast("cpu", dtype=autocast) if autocast is not None
               else contextlib.nullcontext())
    with context:
        lm_loss, routed = forward_batch(model, batch, config, split=split)
        lbc, _ = lbc_term(routed, config)
        loss = lm_loss if lbc is None else lm_loss + config.loramoe.lbc_beta * lbc
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)


def steps_on(model, batches: list[dict], config: TrainConfig,
             autocast: torch.dtype | None = None, optimizer=None) -> Callable[[], None]:
    """A closure running the trainer's step (in length pieces) on each of `batches`."""
    def run() -> None:
        for batch in batches:
            step(model, batch, config, True, autocast, optimizer)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", type=listed(TRAINER_METHODS), default="sft,lora,loramoe")
    parser.add_argument("--batches", type=at_least(1), default=4)
    parser.add_argument("--rounds", type=at_least(1), default=2)
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--dtype", choices=PRECISIONS, default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipeline, frame = default_train_frame()
    print(f"dtype {resolve_dtype(args.dtype)}, {args.threads} thread(s), {args.batches} "
          f"batches, {args.rounds} interleaved rounds")
    for method in args.methods:
        model, tokenizer, config, autocast = trainer_model(pipeline, method, args.dtype)
        batches = first_batches(config, tokenizer, frame, args.batches)
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        model = ResponseLM(model).train()
        step(model, batches[0], config, split=True, autocast=autocast)  # warm-up
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for split in (False, True):
                start = time.perf_counter()
                for batch in batches:
                    step(model, batch, config, split, autocast)
                seconds[split].append((time.perf_counter() - start) / len(batches))
        whole, pieces = (statistics.median(seconds[s]) for s in (False, True))
        rounds = ", ".join(f"{a:.2f}/{b:.2f}"
                           for a, b in zip(seconds[False], seconds[True], strict=True))
        print(f"{method}: padded/real tokens {padded_tokens(batches, False) / real:.2f} whole, "
              f"{padded_tokens(batches, True) / real:.2f} in pieces; {whole:.2f} -> "
              f"{pieces:.2f} s a step = {pieces / whole:.2f}x "
              f"(rounds, whole/pieces: {rounds})")


if __name__ == "__main__":
    main()
