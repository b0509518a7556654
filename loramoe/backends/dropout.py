"""Expert dropout drawn as the positions it zeroes, not as a dense random mask.

Dropout with p = 0.05 zeroes one element in twenty, independently. Drawing a random number
per element (torch's CPU bernoulli_, as nn.Dropout does) costs more than the whole adapter.
The gaps between the zeroed positions of such a Bernoulli(p) process are i.i.d.
Geometric(p), so drawing only those gaps (about p·numel draws) and summing them gives the
same distribution (to float32 resolution, see bernoulli_positions) at a twentieth of the
draws. On the default model this saves 13-15 % of a whole train step (docs/benchmarks.md).
A GPU draws a dense mask instead: its generator is fast, and host-drawn positions are not.

PositionsDropout is the same draw as an nn.Dropout drop-in, for the LoRA baseline: PEFT's
`lora_dropout` is an nn.Dropout on the fp32 copy of every adapted layer's input
(`use_positions_dropout` swaps it in; docs/benchmarks.md §9 for what it saves).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def bernoulli_positions(numel: int, p: float, chunk: int | None = None) -> torch.Tensor:
    """Sorted positions in [0, numel) where i.i.d. Bernoulli(p) draws came out 1.

    The gaps between them are Geometric(p), drawn by inversion from float32 uniforms
    (1 + floor(log(1-u) / log(1-p)); float32 truncates gaps above ~320, which a true
    geometric exceeds with probability (1-p)^320, 7e-8 at p = 0.05).
    """
    if chunk is None:  # enough gaps to reach numel with overwhelming probability (mean + 6 sd)
        expected = numel * p
        chunk = int(expected + 6 * math.sqrt(expected * (1 - p)) + 16)
    inv_log_keep = 1.0 / math.log1p(-p)
    chunks, start = [], 0  # start: the first position the next chunk's first gap counts from
    while True:
        # 1 + log(1-u)/log(1-p) >= 1; cumsum's int64 cast truncates each term, i.e. floors it.
        gaps = torch.rand(chunk).neg_().log1p_().mul_(inv_log_keep).add_(1.0)  # (chunk,)
        positions = torch.cumsum(gaps, 0, dtype=torch.int64).add_(start - 1)  # (chunk,)
        inside = int(torch.searchsorted(positions, numel))  # how many fall below numel
        if inside < chunk:  # this chunk ran past the end
            chunks.append(positions[:inside])
            break
        chunks.append(positions)
        start = int(positions[-1]) + 1
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def draw_dropped(numel: int, p: float, device: torch.device) -> torch.Tensor:
    """One dropout draw over `numel` elements, as the node takes it: on the CPU the sorted
    flat positions (bernoulli_positions: a twentieth of the draws); on an accelerator a flat
    bool mask from the device's own generator (one kernel, 1 byte an element), since
    positions would be drawn on the host and copied over for every layer."""
    if device.type == "cpu":
        return bernoulli_positions(numel, p)
    return torch.rand(numel, device=device) < p


def zero_dropped_(t: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Zero the dropped elements of a contiguous t in place and return it; `dropped` is the
    flat positions or a flat bool mask (draw_dropped)."""
    if dropped.dtype == torch.bool:
        t.view(-1).masked_fill_(dropped, 0)
    else:
        t.view(-1).index_fill_(0, dropped, 0)
    return t


def dropped_copy(x2d: torch.Tensor, dropped: torch.Tensor | None) -> torch.Tensor:
    """The experts' input: x with the dropped positions zeroed (x itself without dropout)."""
    if dropped is None:
        return x2d
    return zero_dropped_(x2d.clone(memory_format=torch.contiguous_format), dropped)


class PositionsDropout(nn.Dropout):
    """nn.Dropout whose zeroed elements are drawn as positions (bernoulli_positions) on a
    CPU: the same law (each element zeroed independently with probability p, the rest scaled
    by 1/(1-p)), at a twentieth of the random draws for p = 0.05. Other devices, eval mode
    and p = 0 run F.dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training, self.inplace)
        out = (x * (1.0 / (1.0 - self.p))).contiguous()  # a fresh tensor, zeroed in place
        return zero_dropped_(out, bernoulli_positions(x.numel(), self.p))


def use_positions_dropout(model: nn.Module) -> int:
    """Swap every plain nn.Dropout inside PEFT LoRA's `lora_dropout` containers for a
    PositionsDropout with the same p; returns how many were swapped."""
    swapped = 0
    for name, module in model.named_modules():
        if not name.endswith("lora_dropout") or not isinstance(module, nn.ModuleDict):
            continue
        for key, dropout in module.items():
            if type(dropout) is nn.Dropout:
                module[key] = PositionsDropout(dropout.p)
                swapped += 1
    return swapped
