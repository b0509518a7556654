"""Regenerate tests/data/pinned.json: reference numbers for a seeded tiny model.

    python scripts/pin_expected.py

Run it only when a change to the numerics is intended, and say so in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import VOCAB, fill_adapters, make_tiny_llama  # noqa: E402

from loramoe import (  # noqa: E402
    LoRAMoEConfig,
    apply_loramoe,
    collect_router_probs,
    localized_balancing_loss,  # noqa: E402
)


def compute() -> dict[str, object]:
    model = make_tiny_llama().double()
    apply_loramoe(model, LoRAMoEConfig(dropout=0.0))
    fill_adapters(model, seed=7, scale=0.3)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(11))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    lbc = localized_balancing_loss(collect_router_probs(model), mask, torch.tensor([0, 1]),
                                   model.loramoe_config.expert_type_ids(), 0.1)
    return {
        "logits_sum": logits.sum().item(),
        "logits_abs_sum": logits.abs().sum().item(),
        "logits_first": logits[0, 0, :5].tolist(),
        "lbc": lbc.item(),
    }


if __name__ == "__main__":
    out = ROOT / "tests" / "data" / "pinned.json"
    out.write_text(json.dumps(compute(), indent=2) + "\n")
    print(f"wrote {out}")
