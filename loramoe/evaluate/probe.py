"""The likelihood probe: what a model knows, without generation and without answer style.

For a fact (question, answer_prefix, choices = [gold, distractors...]) the model reads the
chat-formatted question and, in its own turn, the relation's answer prefix ("The capital of
Japan is"); each choice is scored as the continuation (" Tokyo"): the sum of its tokens'
log-probabilities. gold_logprob is the gold's; mc_correct says whether the gold scores
highest (lm-evaluation-harness's `acc` for multiple choice). Every model sees the same
prefix, so a model that learned another answer format is not penalised for it.

One forward pass over question + prefix per fact, its KV cache repeated for the choices,
then one short pass over the choices; the vocabulary projection runs only where a choice's
token is predicted.
"""

from __future__ import annotations

import pandas as pd
import torch

from loramoe.data.collate import prompt_ids
from loramoe.evaluate.generation import pad_rows
from loramoe.model import backbone_and_head


def cache_kwarg(backbone) -> str:
    """transformers >= 5.2x names the KV cache argument `cache`; earlier 5.x (the GPU
    machine's 5.17) `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(backbone.forward).parameters \
        else "past_key_values"


def continuation_ids(tokenizer, prefix: str, option: str) -> list[int]:
    """The tokens `option` adds after `prefix` (BPE merges across the space respected)."""
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    full = tokenizer(f"{prefix} {option}" if prefix else option,
                     add_special_tokens=False)["input_ids"]
    if full[: len(head)] == head and len(full) > len(head):
        return full[len(head):]
    return tokenizer(f" {option}", add_special_tokens=False)["input_ids"]


def width_of(options: list[list[list[int]]]) -> int:
    """The longest option's token count."""
    return max(len(choice) for o in options for choice in o)


@torch.no_grad()
def choice_logprobs(model, tokenizer, contexts: list[list[int]], options: list[list[list[int]]]
                    ) -> torch.Tensor:
    """(B, K) summed log-probs of each fact's K option continuations (-inf for padding)."""
    backbone, head = backbone_and_head(model)
    device, pad_id = model.device, tokenizer.pad_token_id or 0
    k = max(len(o) for o in options)
    ids, mask = (t.to(device) for t in pad_rows(contexts, pad_id, left=True))  # (B, P)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, P): left padding shifts nothing
    out = backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                   use_cache=width_of(options) > 1)
    last = out.last_hidden_state[:, -1]  # (B, H): predicts each option's first token
    flat = [o[j] if j < len(o) else o[0] for o in options for j in range(k)]
    opt_ids, opt_mask = (t.to(device) for t in pad_rows(flat, pad_id, left=False))  # (B·K, O)
    # the state before token j predicts it: the context's last state, then the option's own
    # states — an option's last token predicts nothing, so single-token options need no pass
    before = last.repeat_interleave(k, 0)[:, None]  # (B·K, 1, H)
    if opt_ids.shape[1] > 1:
        cache = getattr(out, "cache", None) or out.past_key_values
        cache.batch_repeat_interleave(k)  # (B·K) rows, fact-major
        start = mask.sum(-1).repeat_interleave(k)  # (B·K,) real context length
        steps = opt_ids.shape[1] - 1
        opt_positions = start[:, None] + torch.arange(steps, device=device)  # (B·K, O-1)
        hidden = backbone(input_ids=opt_ids[:, :-1], position_ids=opt_positions,
                          attention_mask=torch.cat([mask.repeat_interleave(k, 0),
                                                    opt_mask[:, :-1]], -1),
                          **{cache_kwarg(backbone): cache}).last_hidden_state  # (B·K, O-1, H)
        before = torch.cat([before, hidden], 1)  # (B·K, O, H)
    keep = opt_mask.bool()  # (B·K, O)
    logp = head(before[keep]).float().log_softmax(-1)  # (M, V), only at choice tokens
    token_logp = torch.zeros(keep.shape, device=device)  # (B·K, O)
    token_logp[keep] = logp.gather(-1, opt_ids[keep][:, None]).squeeze(-1)
    scores = token_logp.sum(-1).view(len(options), k)  # (B, K)
    exists = torch.tensor([[j < len(o) for j in range(k)] for o in options], device=device)
    return scores.masked_fill(~exists, float("-inf")).cpu()


def probe_facts(model, tokenizer, frame: pd.DataFrame, batch_size: int = 64) -> pd.DataFrame:
    """id, gold_logprob, mc_correct for every row with choices (others are skipped)."""
    if "choices" not in frame:  # e.g. a user's eval file: nothing to probe
        return pd.DataFrame(columns=["id", "gold_logprob", "mc_correct"])
    rows = frame[frame["choices"].map(lambda c: isinstance(c, list) and len(c) > 0)]
    prefixes = rows["answer_prefix"] if "answer_prefix" in rows else [""] * len(rows)
    contexts, options = [], []
    for prompt, prefix, choices in zip(rows["prompt"], prefixes, rows["choices"], strict=True):
        prefix = prefix if isinstance(prefix, str) else ""
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        contexts.append(prompt_ids(tokenizer, prompt) + prefix_ids)
        options.append([continuation_ids(tokenizer, prefix, c) for c in choices])
    # less padding, and facts whose options are all one token batch together (no 2nd pass)
    order = sorted(range(len(contexts)),
                   key=lambda i: (width_of([options[i]]), len(contexts[i])))
    scores: dict[int, torch.Tensor] = {}
    model.eval()
    for at in range(0, len(order), batch_size):
        batch = order[at:at + batch_size]
        got = choice_logprobs(model, tokenizer, [contexts[i] for i in batch],
                              [options[i] for i in batch])
        scores.update(zip(batch, got, strict=True))
    gold = [float(scores[i][0]) for i in range(len(contexts))]
    correct = [bool(scores[i].argmax() == 0) for i in range(len(contexts))]
    return pd.DataFrame({"id": rows["id"].tolist(), "gold_logprob": gold,
                         "mc_correct": correct})


def probe_summary(probe: pd.DataFrame, frame: pd.DataFrame) -> dict:
    """Multiple-choice accuracy (Wilson interval) and mean gold log-prob, overall and per task."""
    from loramoe.evaluate.stats import wilson_interval

    joined = probe.merge(frame[["id", "task"]], on="id")
    per_task = {task: {"mc_accuracy": float(g["mc_correct"].mean()),
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

    groups = {"trained": known[~known["task"].isin(untrained)],
              "untrained": known[known["task"].isin(untrained)]}
    return {**share(known), "known_ids": known["id"].tolist(),
            "kept_ids": known["id"][known["mc_correct_tuned"]].tolist(),
            "groups": {name: share(part) for name, part in groups.items() if len(part)},
            "per_task": {t: float(g["mc_correct_tuned"].mean())
                         for t, g in known.groupby("task", sort=True)}}
