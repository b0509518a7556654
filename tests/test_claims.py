"""The paper-claims verdicts come from paired tests on constructed outcomes with known
answers, and the markdown report is written from the run's own table."""

from __future__ import annotations

import pandas as pd

from loramoe.pipeline.claims import paper_claims, role
from loramoe.pipeline.markdown import with_ci

KNOWN = [f"f{i}" for i in range(200)]
ITEMS = {"id": [f"d{i}" for i in range(60)], "task": ["t1", "t2"] * 30,
         "task_type": ["downstream"] * 60}


def outcome(name, method, scale, kept, scores, beta=0.1, form="paper", separation=None):
    config = {"method": method, "loramoe": {"lbc_beta": beta, "lbc_form": form}}
    metrics = {"probe_retention": {"known_ids": KNOWN, "kept_ids": KNOWN[:kept]},
               "item_scores": {**ITEMS, "score": scores}}
    if separation is not None:
        metrics["router_separation"] = separation
    return {"name": name, "method_name": name.rsplit("-", 1)[0], "scale": scale,
            "method": method, "metrics": metrics, "trained": {"train_config": config}}


def test_roles_follow_what_the_branch_trained():
    assert role(outcome("a-1", "sft", 1, 0, [0] * 60)) == "sft"
    assert role(outcome("a-1", "loramoe", 1, 0, [0] * 60, beta=0.0)) == "loramoe_nolbc"
    assert role(outcome("a-1", "loramoe", 1, 0, [0] * 60, form="aligned")) == "loramoe_aligned"


def test_verdicts_on_constructed_outcomes():
    ones, zeros, half = [1.0] * 60, [0.0] * 60, [1.0, 0.0] * 30
    branches = [
        outcome("sft-10", "sft", 10, 200, ones), outcome("sft-100", "sft", 100, 150, ones),
        outcome("lora-100", "lora", 100, 148, half),
        outcome("moe_paper-100", "loramoe", 100, 190, ones,
                separation={"value": 0.001, "ci": [0.0005, 0.0015]}),  # > 0, negligible
        outcome("moe_aligned-100", "loramoe", 100, 150, zeros, form="aligned",
                separation={"value": 0.2, "ci": [0.1, 0.3]}),
        outcome("moe_b0-100", "loramoe", 100, 150, ones, beta=0.0),
    ]
    claims = paper_claims(branches).set_index("claim")["verdict"]
    # 50 facts lost by SFT from 10 to 100 examples, none regained: McNemar p << 0.05
    assert claims["Vanilla SFT forgets world knowledge as instruction data grows"] == "reproduced"
    assert claims["LoRAMoE + LBC keeps more world knowledge than SFT"] == "reproduced"
    assert claims["LoRAMoE + LBC keeps more world knowledge than LORA"] == "reproduced"
    assert claims["LoRAMoE's downstream score is within a few points of vanilla SFT"] == \
        "reproduced"  # identical scores: the paired CI is [0, 0]
    assert claims["The LBC (paper form) helps LoRAMoE"] == "reproduced"  # +40 facts kept
    assert claims["The LBC (aligned form) helps LoRAMoE"] == "not reproduced"  # downstream −1
    # a CI inside ±0.02 is no separation; a positive CI is separation
    assert claims["Routers separate by expert type (LBC, paper form)"] == "not reproduced"
    assert claims["Routers separate by expert type (LBC, aligned form)"] == "reproduced"


def test_a_difference_inside_the_noise_is_inconclusive_and_missing_roles_are_said():
    ones = [1.0] * 60
    branches = [outcome("sft-10", "sft", 10, 150, ones), outcome("sft-100", "sft", 100, 148,
                                                                ones)]
    claims = paper_claims(branches).set_index("claim")["verdict"]
    assert claims["Vanilla SFT forgets world knowledge as instruction data grows"] == \
        "inconclusive"  # 2 facts of 200: p = 0.5
    assert claims["The LBC (paper form) helps LoRAMoE"] == "not measured"


def test_numbers_are_written_with_their_interval():
    row = pd.Series({"x": 0.5, "x_lo": 0.4, "x_hi": 0.6, "y": -0.01, "y_lo": None})
    assert with_ci(row, "x") == "0.500 [0.400, 0.600]"
    assert with_ci(row, "y", signed=True) == "-0.010"
