"""Stop a short answer at its first newline: closed-book QA and labels are one line, and a
model that goes on after it (the base model's long explanations) costs decode steps that
the metric never reads."""

from __future__ import annotations

from functools import cache

import torch
from transformers import StoppingCriteria

SHORT_ANSWER_METRICS = ("contains", "exact_match", "f1", "accuracy")


@cache
def newline_token_ids(tokenizer) -> torch.Tensor:
    """Ids of every vocabulary token whose text holds a newline."""
    vocab = range(len(tokenizer))
    texts = tokenizer.convert_ids_to_tokens(list(vocab))
    return torch.tensor([i for i, t in zip(vocab, texts, strict=True) if t and (
        "\n" in t or "Ċ" in t or "<0x0A>" in t)] or [-1])  # Ċ: byte-level BPE's "\n"


class StopAtNewline(StoppingCriteria):
    """Per row: done once a row that `applies` has generated a newline token."""

    def __init__(self, tokenizer, prompt_width: int, applies: torch.Tensor):
        self.ids, self.width, self.applies = newline_token_ids(tokenizer), prompt_width, applies

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.width:]  # (B, generated so far)
        hit = torch.isin(new, self.ids.to(new.device)).any(-1)  # (B,)
        return hit & self.applies.to(hit.device)


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]
