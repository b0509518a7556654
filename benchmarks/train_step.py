"""The train step every benchmark times: the trainer's loss (ResponseLM: every token a
response token) on `ids`, plus β·LBC for LoRAMoE, backward, AdamW. Shared by the bench_*.py
scripts (run from the repository root, `python benchmarks/NAME.py`, so this folder is on
sys.path)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

from loramoe import LoRAMoEConfig, collect_router_probs, localized_balancing_loss
from loramoe.train.objective import ResponseLM


def frozen_floor(model: torch.nn.Module) -> torch.nn.Module:
    """`model` as the floor every adapter is measured against: every weight frozen, the
    input embeddings requiring grad, so backward still runs through every block."""
    model.requires_grad_(False)
    model.enable_input_require_grads()
    return model


def make_step(model: torch.nn.Module, ids: torch.Tensor, with_lbc: bool, lr: float = 1e-4,
              autocast: torch.dtype | None = None, fused: bool | None = None
              ) -> Callable[[], None]:
    """A closure running one step. A model without trainable parameters (the frozen-base
    floor) gets no optimizer; `autocast` runs the forward under that dtype's autocast;
    `fused` picks torch's fused AdamW (None: torch's default)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, fused=fused) if params else None
    config = LoRAMoEConfig()
    sample_types = torch.arange(len(ids), device=ids.device) % len(config.expert_types)  # (B,)
    mask = torch.ones_like(ids)  # (B, T): no padding
    objective = ResponseLM(model)
    model.train()

    def step() -> None:
        context = (torch.autocast(ids.device.type, dtype=autocast) if autocast is not None
                   else contextlib.nullcontext())
        with context:
            loss = objective(ids, mask, ids)  # (B, T) labels = ids: all response tokens
            if with_lbc:
                loss = loss + config.lbc_beta * localized_balancing_loss(
                    collect_router_probs(model), mask, sample_types, config.expert_type_ids(),
                    config.lbc_delta)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def interleaved(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each step over `repeats` rounds, one step of every variant per round (so
    slow drift of a noisy machine hits all variants alike), after one warm-up step each."""
    for step in steps.values():
        step()  # warm-up: allocates optimizer state, packs weights
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times
