"""The likelihood probe: what a model knows, without generation and without answer style.

For a fact (question, answer_prefix, choices = [gold, distractors...]) the model reads the
chat-formatted question and, in its own turn, the relation's answer prefix ("The capital of
Japan is"); each choice is scored as the continuation (" Tokyo"): the sum of its tokens'
log-probabilities. gold_logprob is the gold's; mc_correct says whether the gold scores
highest (lm-evaluation-harness's `acc` for multiple choice). Every model sees the same
prefix, so a model that learned another answer format is not penalised for it.

One forward pass per fact: its row holds the question + prefix, then the tokens of each
option longer than one token (all but the last), each option seeing the context and its own
earlier tokens only (a block mask, positions restarting after the context) — the way
packed sequences are trained. The context's last state predicts every option's first token,
an option's own states its later ones; the vocabulary projection runs only at those states.
The first tokens every context shares (the chat header) run once per probe, and every row
reads their KV cache: 11 % of the default eval's tokens (docs/benchmarks.md §14).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import pandas as pd
import torch

from loramoe.data.collate import prompt_ids
from loramoe.evaluate.generation import pad_rows
from loramoe.evaluate.shards import WHOLE, Shard
from loramoe.model import backbone_and_head


def context_ids(tokenizer, prompt: str, prefix: str) -> list[int]:
    """The chat-formatted question, then the answer prefix in the model's own turn."""
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    return prompt_ids(tokenizer, prompt) + prefix_ids


def continuation_ids(tokenizer, prefix: str, option: str) -> list[int]:
    """The tokens `option` adds after `prefix` (BPE merges across the space respected)."""
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    full = tokenizer(f"{prefix} {option}" if prefix else option,
                     add_special_tokens=False)["input_ids"]
    if full[: len(head)] == head and len(full) > len(head):
        return full[len(head):]
    return tokenizer(f" {option}", add_special_tokens=False)["input_ids"]


@dataclass
class SharedPrefix:
    """The first `length` tokens of every context, run through the model once: `cache`, their
    KV cache, which every packed row of every batch reads instead of computing them again."""
    length: int = 0
    cache: object | None = None


@torch.no_grad()
def shared_prefix(model, contexts: list[list[int]]) -> SharedPrefix:
    """The contexts' common first tokens (each context keeps its last token: it predicts the
    options' first) and their KV cache; none for fewer than two contexts."""
    most = min(map(len, contexts), default=1) - 1
    length = 0
    while length < most and all(c[length] == contexts[0][length] for c in contexts):
        length += 1
    if len(contexts) < 2 or length == 0:
        return SharedPrefix()
    backbone, _ = backbone_and_head(model)
    if (name := cache_name(backbone)) is None:  # a model without a KV cache: rows hold all
        return SharedPrefix()
    ids = torch.tensor([contexts[0][:length]], device=model.device)  # (1, P)
    cache = backbone(input_ids=ids, use_cache=True).get(name)
    return SharedPrefix(length, cache) if cache is not None else SharedPrefix()


def cache_name(backbone) -> str | None:
    """The forward's KV-cache argument and output, None without one: transformers 5.2x
    renamed `past_key_values` to `cache` (the old name warns, then goes); earlier 5.x know
    only the old one."""
    parameters = inspect.signature(backbone.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


@torch.no_grad()
def choice_logprobs(model, tokenizer, contexts: list[list[int]], options: list[list[list[int]]],
                    prefix: SharedPrefix | None = None) -> torch.Tensor:
    """(B, K) summed log-probs of each fact's K option continuations (-inf for padding).
    `prefix`: the contexts' shared first tokens, already run (default: found among these)."""
    backbone, head = backbone_and_head(model)
    device = model.device
    prefix = shared_prefix(model, contexts) if prefix is None else prefix
    p = prefix.length
    packed = pack_options([c[p:] for c in contexts], options)
    ids, _ = pad_rows(packed.rows, tokenizer.pad_token_id or 0, left=False)  # (B, L)
    segment = pad_rows(packed.segments, -1, left=False)[0]  # (B, L), -1 on padding
    positions = pad_rows(packed.positions, 0, left=False)[0] + p  # (B, L)
    mask = option_mask(segment, model.dtype)  # (B, 1, L, L)
    extra = {}
    if p:  # every token sees the prefix: its columns come first in the cache
        mask = torch.cat([mask.new_zeros(*mask.shape[:3], p), mask], dim=-1)  # (B, 1, L, P+L)
        cache = copy.deepcopy(prefix.cache)  # the forward appends this batch's keys to it
        cache.batch_repeat_interleave(len(contexts))  # (1, ·, P, ·) -> (B, ·, P, ·)
        extra = {cache_name(backbone): cache}
    hidden = backbone(input_ids=ids.to(device), position_ids=positions.to(device),
                      attention_mask=mask.to(device), **extra).last_hidden_state  # (B, L, H)
    state_row, state_at = (torch.tensor(x, device=device) for x in zip(*packed.states,
                                                                     strict=True))  # (S,)
    logp = head(hidden[state_row, state_at]).float().log_softmax(-1)  # (S, V)
    state, token, fact, choice = (torch.tensor(x, device=device)
                                  for x in zip(*packed.targets, strict=True))  # (M,) each
    k = max(len(o) for o in options)
    scores = torch.zeros(len(options), k, device=device)  # (B, K)
    scores.index_put_((fact, choice), logp[state, token], accumulate=True)
    exists = torch.tensor([[j < len(o) for j in range(k)] for o in options], device=device)
    return scores.masked_fill(~exists, float("-inf")).cpu()


@dataclass
class PackedOptions:
    """One row per fact: its context, then its longer options' tokens but the last."""
    rows: list[list[int]] = field(default_factory=list)
    segments: list[list[int]] = field(default_factory=list)  # 0: context, j + 1: choice j
    positions: list[list[int]] = field(default_factory=list)  # options restart after context
    states: list[tuple[int, int]] = field(default_factory=list)  # (row, index) to project
    targets: list[tuple[int, int, int, int]] = field(default_factory=list)
    # (state, token it predicts, fact, choice)


def packed_length(context: list[int], choices: list[list[int]]) -> int:
    """Tokens in a fact's packed row: its context, then every option but its last token."""
    return len(context) + sum(len(choice) - 1 for choice in choices)


def pack_options(contexts: list[list[int]], options: list[list[list[int]]]) -> PackedOptions:
    """Each fact's row, and which state predicts which of its choices' tokens."""
    packed = PackedOptions()
    for f, (context, choices) in enumerate(zip(contexts, options, strict=True)):
        row, segment = list(context), [0] * len(context)
        positions = list(range(len(context)))
        last = len(packed.states)
        packed.states.append((f, len(context) - 1))  # predicts every first token
        for j, choice in enumerate(choices):
            packed.targets.append((last, choice[0], f, j))
            start, rest = len(row), choice[:-1]  # a choice's last token predicts nothing
            row += rest
            segment += [j + 1] * len(rest)
            positions += range(len(context), len(context) + len(rest))
            for t, token in enumerate(choice[1:]):
                packed.targets.append((len(packed.states), token, f, j))
                packed.states.append((f, start + t))  # the state of token t predicts t + 1
        packed.rows.append(row)
        packed.segments.append(segment)
        packed.positions.append(positions)
    return packed


def option_mask(segment: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) additive attention mask: a token sees the earlier tokens of its fact's
    context and of its own option; padding (segment -1) is seen by no one."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (L, L)
    query, key = segment[:, :, None], segment[:, None, :]  # (B, L, 1), (B, 1, L)
    seen = causal & (key >= 0) & ((key == 0) | (key == query))  # (B, L, L)
    return torch.zeros(seen.shape, dtype=dtype).masked_fill(
        ~seen, torch.finfo(dtype).min)[:, None]  # (B, 1, L, L)


def probed_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows with choices to score (a frame with a `choices` column)."""
    return frame[frame["choices"].map(lambda c: isinstance(c, list) and len(c) > 0)]


def fact_tokens(tokenizer, rows: pd.DataFrame
                ) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Each row's context ids and its choices' continuation ids; a row without an answer
    prefix is read with "" as its prefix."""
    prefixes = rows["answer_prefix"] if "answer_prefix" in rows else [""] * len(rows)
    contexts, options = [], []
    for prompt, prefix, choices in zip(rows["prompt"], prefixes, rows["choices"], strict=True):
        prefix = prefix if isinstance(prefix, str) else ""
        contexts.append(context_ids(tokenizer, prompt, prefix))
        options.append([continuation_ids(tokenizer, prefix, c) for c in choices])
    return contexts, options


def probe_facts(model, tokenizer, frame: pd.DataFrame, batch_size: int = 64,
                shard: Shard = WHOLE) -> pd.DataFrame:
    """id, gold_logprob, mc_correct for every row with choices (others are skipped), in the
    frame's order; only the rows of this `shard`'s batches."""
    if "choices" not in frame:  # e.g. a user's eval file: nothing to probe
        return pd.DataFrame(columns=["id", "gold_logprob", "mc_correct"])
    rows = probed_rows(frame)
    contexts, options = fact_tokens(tokenizer, rows)
    # by packed row length: batches of similar rows pad least
    order = sorted(range(len(contexts)), key=lambda i: packed_length(contexts[i], options[i]))
    scores: dict[int, torch.Tensor] = {}
    model.eval()
    # found over every fact, not per batch or shard: a fact's score does not depend on them
    prefix = shared_prefix(model, contexts)
    for batch in shard.take([order[at:at + batch_size]
                             for at in range(0, len(order), batch_size)]):
        got = choice_logprobs(model, tokenizer, [contexts[i] for i in batch],
                              [options[i] for i in batch], prefix)
        scores.update(zip(batch, got, strict=True))
    done = sorted(scores)
    return pd.DataFrame({"id": rows["id"].iloc[done].tolist(),
                         "gold_logprob": [float(scores[i][0]) for i in done],
                         "mc_correct": [bool(scores[i].argmax() == 0) for i in done]})


def probe_summary(probe: pd.DataFrame, frame: pd.DataFrame) -> dict:
    """Multiple-choice accuracy (Wilson interval) and mean gold log-prob, overall and per task."""
    from loramoe.evaluate.stats import wilson_interval

    joined = probe.merge(frame[["id", "task"]], on="id")
    per_task = {task: {"mc_accuracy": float(g["mc_correct"].mean()),
                       "mc_accuracy_ci": wilson_interval(int(g["mc_correct"].sum()), len(g)),
                       "gold_logprob": float(g["gold_logprob"].mean()), "n": int(len(g))}
                for task, g in joined.groupby("task", sort=True)}
    right = int(joined["mc_correct"].sum())
    return {"facts": int(len(joined)), "mc_accuracy": right / len(joined) if len(joined) else None,
            "mc_accuracy_ci": wilson_interval(right, int(len(joined))),
            "gold_logprob": float(joined["gold_logprob"].mean()) if len(joined) else None,
            "per_task": per_task}


def probe_retention(base: pd.DataFrame, tuned: pd.DataFrame, frame: pd.DataFrame,
                    untrained_tasks: set[str] | None = None) -> dict:
    """Facts the base got right in multiple choice that the tuned model still gets right
    (share, Wilson interval, the facts), and the mean change of gold log-prob on them
    (stratified bootstrap interval); also per group: relations the mixture trains on vs
    relations it never trains on (untrained_tasks)."""
    from loramoe.evaluate.stats import stratified_bootstrap, wilson_interval

    joined = base.merge(tuned, on="id", suffixes=("_base", "_tuned")).merge(
        frame[["id", "task"]], on="id")
    known = joined[joined["mc_correct_base"]]
    untrained = untrained_tasks or set()

    def share(part: pd.DataFrame) -> dict:
        kept = int(part["mc_correct_tuned"].sum())
        change = stratified_bootstrap(part["gold_logprob_tuned"] - part["gold_logprob_base"],
                                      part["task"])
        return {"overall": kept / len(part) if len(part) else None, "kept": kept,
                "base_correct": int(len(part)), "ci": wilson_interval(kept, int(len(part))),
                "logprob_change": change["value"], "logprob_change_ci": change["ci"]}

    per_task = {t: g["mc_correct_tuned"] for t, g in known.groupby("task", sort=True)}
    groups = {"trained": known[~known["task"].isin(untrained)],
              "untrained": known[known["task"].isin(untrained)]}
    return {**share(known), "known_ids": known["id"].tolist(),
            "kept_ids": known["id"][known["mc_correct_tuned"]].tolist(),
            "groups": {name: share(part) for name, part in groups.items() if len(part)},
            "per_task": {t: float(kept.mean()) for t, kept in per_task.items()},
            "per_task_ci": {t: wilson_interval(int(kept.sum()), len(kept))
                            for t, kept in per_task.items()}}
