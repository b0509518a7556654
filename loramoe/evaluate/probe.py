"""The likelihood probe: what a model knows, without generation and without answer style.

For a fact (question, answer_prefix, choices = [gold, distractors...]) the model reads the
chat-formatted question and, in its own turn, the relation's answer prefix ("The capital of
Japan is"); each choice is scored as the continuation (" Tokyo"): the sum of its tokens'
log-probabilities. gold_logprob is the gold's; mc_correct says whether the gold scores
highest (lm-evaluation-harness's `acc` for multiple choice). Every model sees the same
prefix, so a model that learned another answer format is not penalised for it.

One forward pass over question + prefix per fact; its last state predicts every choice's
first token (one vocabulary projection per fact). Only choices of more than one token need
more: one short pass over them, each reading its fact's context from the KV cache, with the
vocabulary projection only where a choice's token is predicted.
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
    # options with more than one token: only they need a pass of their own
    longer = [(f, j) for f, o in enumerate(options) for j, c in enumerate(o) if len(c) > 1]
    ids, mask = (t.to(device) for t in pad_rows(contexts, pad_id, left=True))  # (B, P)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, P): left padding shifts nothing
    out = backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                   use_cache=bool(longer))
    # the context's last state predicts every option's first token: one projection per fact
    first = head(out.last_hidden_state[:, -1]).float().log_softmax(-1)  # (B, V)
    first_ids = torch.tensor([[o[j][0] if j < len(o) else 0 for j in range(k)]
                              for o in options], device=device)  # (B, K)
    scores = first.gather(-1, first_ids)  # (B, K)
    if longer:
        facts, cols = (torch.tensor(x, device=device)
                       for x in zip(*longer, strict=True))  # (R,) each
        scores[facts, cols] += rest_logprobs(backbone, head, out, mask, facts, pad_id,
                                             [options[f][j] for f, j in longer])
    exists = torch.tensor([[j < len(o) for j in range(k)] for o in options], device=device)
    return scores.masked_fill(~exists, float("-inf")).cpu()


def rest_logprobs(backbone, head, out, mask: torch.Tensor, facts: torch.Tensor, pad_id: int,
                  longer: list[list[int]]) -> torch.Tensor:
    """(R,) summed log-probs of each `longer` option's tokens after its first: the states
    before them come from one pass over those options, each reading the context of its fact
    (`facts`, (R,)) from the first pass's KV cache."""
    device = mask.device
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.batch_select_indices(facts)  # (R) rows: each longer option's own context
    opt_ids, opt_mask = (t.to(device) for t in pad_rows(longer, pad_id, left=False))  # (R, O)
    steps = opt_ids.shape[1] - 1
    start = mask.sum(-1)[facts]  # (R,) real context length
    hidden = backbone(input_ids=opt_ids[:, :-1],
                      position_ids=start[:, None] + torch.arange(steps, device=device),
                      attention_mask=torch.cat([mask[facts], opt_mask[:, :-1]], -1),
                      **{cache_kwarg(backbone): cache}).last_hidden_state  # (R, O-1, H)
    # the state at token t predicts token t+1; an option's last token predicts nothing
    keep = opt_mask[:, 1:].bool()  # (R, O-1)
    logp = head(hidden[keep]).float().log_softmax(-1)  # (M, V), only at option tokens
    token_logp = torch.zeros(keep.shape, device=device)  # (R, O-1)
    token_logp[keep] = logp.gather(-1, opt_ids[:, 1:][keep][:, None]).squeeze(-1)
    return token_logp.sum(-1)  # (R,)


def probe_facts(model, tokenizer, frame: pd.DataFrame, batch_size: int = 64) -> pd.DataFrame:
    """id, gold_logprob, mc_correct for every row with choices (others are skipped)."""
    if "choices" not in frame:  # e.g. a user's eval file: nothing to probe
        return pd.DataFrame(columns=["id", "gold_logprob", "mc_correct"])
    rows = frame[frame["choices"].map(lambda c: isinstance(c, list) and len(c) > 0)]
    prefixes = rows["answer_prefix"] if "answer_prefix" in rows else [""] * len(rows)
    contexts, options = [], []
    for prompt, prefix, choices in zip(rows["prompt"], prefixes, rows["choices"], strict=True):
        prefix = prefix if isinstance(prefix, str) else ""
        contexts.append(context_ids(tokenizer, prompt, prefix))
        options.append([continuation_ids(tokenizer, prefix, c) for c in choices])
    # by context length (least padding in the pass every fact needs), then option width
    order = sorted(range(len(contexts)),
                   key=lambda i: (len(contexts[i]), width_of([options[i]])))
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
