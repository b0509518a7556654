"""Batched greedy generation: left padding, KV cache, stop at EOS; short answers (QA,
labels) also stop at their first newline and keep only that line."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from itertools import groupby
from typing import Any

import pandas as pd
import torch
from transformers import StoppingCriteriaList

from loramoe.data.collate import prompt_ids
from loramoe.evaluate.routing import RouterRecorder
from loramoe.evaluate.shards import WHOLE, Shard
from loramoe.evaluate.stopping import SHORT_ANSWER_METRICS, StopAtNewline, first_line
from loramoe.model import contiguous_head_input

MAX_NEW_TOKENS = {"contains": 24, "exact_match": 24, "f1": 16, "accuracy": 8, "rouge_l": 64,
                  "chrf": 32}


def pad_rows(rows: list[list[int]], pad_id: int, left: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (len(rows), longest row), padded on the left (prompts to
    continue) or on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


def generate_predictions(model, tokenizer, frame: pd.DataFrame, batch_size: int = 16,
                         max_prompt_tokens: int = 768, recorder: RouterRecorder | None = None,
                         progress: bool = False, max_new_tokens: int | None = None,
                         shard: Shard = WHOLE, encode: Callable[[Any, str], list[int]] = prompt_ids
                         ) -> list[str | None]:
    """Greedy answers for every prompt, in the frame's order (None for the items of
    another `shard`'s batches).

    New tokens per batch: max_new_tokens if given, else by the items' metrics (short for QA).
    encode(tokenizer, prompt): a prompt's ids in the chat template (serving reads control
    tokens' text as characters, collate.literal_prompt_ids).
    """
    from loramoe.progress import track

    if recorder is not None and shard != WHOLE:
        raise ValueError("the router recorder needs every batch in one process")
    encoded = [encode(tokenizer, p) for p in frame["prompt"]]
    cut = sum(len(e) > max_prompt_tokens for e in encoded)
    if cut:
        warnings.warn(f"{cut} prompt(s) longer than {max_prompt_tokens} tokens keep only their "
                      f"last {max_prompt_tokens} tokens", stacklevel=2)
        encoded = [e[-max_prompt_tokens:] for e in encoded]
    # A batch decodes until its longest answer is done: items of one answer budget (short
    # answers with their newline stop apart from 64-token summaries) batch together, and
    # within a budget prompts of similar length waste less compute on padding.
    budgets = [max_new_tokens or MAX_NEW_TOKENS.get(m, 24) for m in frame["metric"]]
    order = sorted(range(len(encoded)), key=lambda i: (budgets[i], len(encoded[i])))
    predictions: dict[int, str] = {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    model.eval()
    contiguous_head_input(model)
    batches = [group[i:i + batch_size] for group in budget_groups(order, budgets)
               for i in range(0, len(group), batch_size)]
    batches = shard.take(batches)
    label = "generate" if shard == WHOLE else f"generate, shard {shard.index + 1} of {shard.count}"
    for batch in track(batches, len(batches), label, enabled=progress):
        ids, mask = (t.to(model.device) for t in pad_rows([encoded[i] for i in batch], pad_id))
        max_new = max(budgets[i] for i in batch)
        short = [frame["metric"].iloc[i] in SHORT_ANSWER_METRICS for i in batch]
        stop = StopAtNewline(tokenizer, ids.shape[1], torch.tensor(short))
        if recorder is not None:
            recorder.start_batch(mask)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                 do_sample=False, pad_token_id=pad_id, eos_token_id=eos,
                                 stopping_criteria=StoppingCriteriaList([stop]))
        if recorder is not None:
            recorder.end_batch()
        for row, index in enumerate(batch):
            text = tokenizer.decode(out[row, ids.shape[1]:], skip_special_tokens=True).strip()
            predictions[index] = first_line(text) if short[row] else text
    if recorder is not None:  # re-order recorded samples to the frame's order
        recorder.per_sample = [torch.cat(recorder.per_sample, dim=1)[:, _inverse(order)]]
    return [predictions.get(i) for i in range(len(encoded))]


def budget_groups(order: list[int], budgets: list[int]) -> list[list[int]]:
    """`order` cut where the answer budget changes (order is sorted by budget)."""
    return [list(group) for _, group in groupby(order, key=budgets.__getitem__)]


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for position, index in enumerate(order):
        inverse[index] = position
    return inverse
