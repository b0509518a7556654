"""A batch in two pieces of similar length: the same samples and the same update, less padding.

The collator pads a batch to its longest row. In a mixture of one-line answers and long
passages that padding is most of a step's compute: the default mixture's batches of 8 hold
1.7-1.9x their real tokens. Sorted by length and cut once where it saves most, each piece
padded to its own longest row, they hold 1.2x. The step does not change: every piece's LM
loss is divided by the whole batch's response-token count, and the LBC and the router CV read
the pieces' router probabilities put back together as one (B, T, N) batch, padding zero and
masked as before, so one backward gives the whole batch's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A second forward costs a fixed overhead (every layer's dispatch): cut only where it saves
# at least this share of the padded tokens.
MIN_SAVING = 0.2


@dataclass
class RoutedBatch:
    """What the routers saw in one step: per layer (B, T, N) probabilities, the (B, T)
    attention mask and the (B,) sample types, rows in the same order."""

    probs: list[torch.Tensor]
    attention_mask: torch.Tensor
    sample_types: torch.Tensor


def length_pieces(batch: dict[str, torch.Tensor], min_saving: float = MIN_SAVING
                  ) -> list[dict[str, torch.Tensor]]:
    """[batch], or its rows in two pieces (shorter, longer) each cut to its longest row when
    that saves at least `min_saving` of the padded tokens. Expects right padding (Collator)."""
    mask = batch["attention_mask"]
    rows, width = mask.shape
    lengths = mask.sum(-1)  # (B,): right padding, so the real lengths
    order = lengths.argsort(stable=True)
    ordered = lengths[order].tolist()
    # the first k rows padded to the k-th length, the others to the longest
    costs = {k: k * ordered[k - 1] + (rows - k) * ordered[-1] for k in range(1, rows)}
    if not costs:
        return [batch]
    cut = min(costs, key=costs.__getitem__)
    if costs[cut] > (1 - min_saving) * rows * width:
        return [batch]
    return [take_rows(batch, order[:cut]), take_rows(batch, order[cut:])]


def take_rows(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Those rows of every tensor, (B, T) ones cut to the rows' longest real length."""
    width = int(batch["attention_mask"][rows].sum(-1).max())
    return {key: value[rows][:, :width] if value.dim() == 2 else value[rows]
            for key, value in batch.items()}


def joined(pieces: list[dict[str, torch.Tensor]], probs: list[list[torch.Tensor]]
           ) -> RoutedBatch:
    """The pieces' router probabilities (per piece, per layer (b, t, N)) as one batch: each
    padded with zeros to the widest piece, rows stacked in piece order."""
    if len(pieces) == 1:
        return RoutedBatch(probs[0], pieces[0]["attention_mask"], pieces[0]["sample_types"])
    width = max(p["attention_mask"].shape[1] for p in pieces)
    layers = [torch.cat([F.pad(p, (0, 0, 0, width - p.shape[1])) for p in layer])  # (B, T, N)
              for layer in zip(*probs, strict=True)]
    mask = torch.cat([F.pad(p["attention_mask"], (0, width - p["attention_mask"].shape[1]))
                      for p in pieces])  # (B, T)
    return RoutedBatch(layers, mask, torch.cat([p["sample_types"] for p in pieces]))
