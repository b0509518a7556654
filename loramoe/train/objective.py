"""What one step optimises, as modules and helpers that stay right under data parallelism:
the response-token LM loss as the wrapped forward, the token count of the global batch, and
the LBC's Z gathered over processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loramoe.data.collate import IGNORE_INDEX
from loramoe.model import backbone_and_head


class ResponseLM(torch.nn.Module):
    """The causal LM as the trainer runs it: forward gives the cross-entropy over response
    tokens, with the LM head applied only there (the vocabulary projection is the biggest
    matmul of a small model; prompt and padding positions would waste most of it).

    A module rather than a function around the backbone so that DDP/FSDP wrap *this*
    forward: a forward that bypasses the wrapper leaves DDP's reducer unprepared, and its
    gradients would silently not be averaged.
    """

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The LM's transformer block classes. FSDP's transformer auto-wrap (accelerate)
        reads them off the module it is given, this one: without them it wraps no block and
        shards the whole model as one unit, gathering all of a 7B model's weights at once."""
        return getattr(self.lm, "_no_split_modules", None)

    def forward(self, input_ids, attention_mask, labels, token_count=None) -> torch.Tensor:
        backbone, head = backbone_and_head(self.lm)
        # use_cache=False: training reads no KV cache, and under activation checkpointing
        # (FSDP's) the recompute would append every block's keys to it a second time
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False).last_hidden_state  # (B, T, H)
        targets = labels[:, 1:]  # (B, T-1)
        keep = targets != IGNORE_INDEX  # (B, T-1)
        logits = head(hidden[:, :-1][keep])  # (K, V)
        total = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return total / (keep.sum() if token_count is None else token_count)


def response_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def global_token_share(acc, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """What each process divides its token sum by so that DDP's gradient *average* over P
    processes is the token mean of the global batch: (global response tokens) / P. None on
    one process (the local mean is then the global one)."""
    if acc.num_processes == 1:
        return None
    return acc.reduce(response_tokens(batch).float(), reduction="sum") / acc.num_processes


def global_mean(acc, lm_loss: torch.Tensor) -> float:
    """The global batch's LM loss, as one process would log it: each process's term is its
    token sum / (global tokens / P) (global_token_share), so their mean over P is the global
    token mean; rank 0's own term alone is not."""
    if acc.num_processes == 1:
        return lm_loss.item()
    return acc.reduce(lm_loss.detach(), reduction="mean").item()


def process_sum(acc):
    """Sums a tensor over the data-parallel processes (for the router CV's importance)."""
    return lambda t: acc.reduce(t, reduction="sum")


def gather_samples(z: torch.Tensor) -> torch.Tensor:
    """(L, N, B) per process -> (L, N, B·P): the LBC's Z of the global batch. The autograd
    all_gather sums every process's gradient back into its slice, which DDP's average then
    turns into exactly the one-process gradient."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z.contiguous()), dim=-1)  # (L, N, B·P)
