"""Branches trained with several seeds are pooled: a method difference that one seed shows
and another reverses is not significant, one every seed shows is; the report says both."""

from __future__ import annotations

import pytest

from loramoe.pipeline.paired import paired_comparisons
from loramoe.pipeline.replicates import (
    ReplicateError,
    has_replicates,
    replicate_comparisons,
    replicate_table,
)

KNOWN = [f"f{i}" for i in range(200)]
ITEMS = {"id": [f"d{i}" for i in range(40)], "task": ["t1", "t2"] * 20,
         "task_type": ["downstream"] * 40}


def outcome(method, scale, seed, kept, score=0.5, known=KNOWN):
    """A finished branch that kept the first `kept` base-known facts and scored `score` on
    every downstream item."""
    return {"name": f"{method}-{scale}-s{seed}", "method_name": method, "scale": scale,
            "seed": seed, "metrics": {
                "probe_retention": {"known_ids": known, "kept_ids": known[:kept]},
                "item_scores": {**ITEMS, "score": [score] * 40}}}


def test_a_difference_every_seed_shows_is_significant():
    branches = [outcome("sft", 100, s, 190, 0.6) for s in (0, 1)] + \
               [outcome("moe", 100, s, 150, 0.5) for s in (0, 1)]
    tests = replicate_comparisons(branches).set_index("measure")
    retention = tests.loc["probe_retention"]
    assert (retention["a"], retention["b"], retention["seeds"]) == ("sft-100", "moe-100", "0,1")
    # sft keeps 190, moe 150 of 200 in both seeds: +0.2 on every resample of seeds; the
    # items' resampling alone moves it (40 discordant facts of 200)
    assert retention["diff"] == pytest.approx(0.2) and retention["diff_lo"] > 0
    assert retention["per_seed"] == "+0.200 / +0.200"
    assert retention["verdict"] == "significant"
    down = tests.loc["downstream"]
    assert down["diff"] == pytest.approx(0.1) and down["diff_lo"] == down["diff_hi"]


def test_a_difference_one_seed_shows_and_another_reverses_is_not():
    branches = [outcome("sft", 100, 0, 190), outcome("moe", 100, 0, 150),
                outcome("sft", 100, 1, 150), outcome("moe", 100, 1, 190)]
    # within each seed the paired test is certain (40 vs 0 discordant facts)...
    within = paired_comparisons(branches).query("measure == 'probe_retention'")
    assert (within["verdict"] == "significant").all() and len(within) == 2
    # ...pooled over the seeds the sign is unknown
    pooled = replicate_comparisons(branches).query("measure == 'probe_retention'").iloc[0]
    assert pooled["diff"] == pytest.approx(0.0) and pooled["per_seed"] == "+0.200 / -0.200"
    assert pooled["p"] == 1.0 and pooled["verdict"] == "not significant"


def test_pooled_table_gives_each_seed_and_the_interval():
    branches = [outcome("moe", 100, 0, 150), outcome("moe", 100, 1, 170),
                outcome("moe", 10, 0, 200)]
    table = replicate_table(branches).set_index(["method", "scale"])
    row = table.loc[("moe", 100)]
    assert row["seeds"] == "0,1" and row["probe_retention"] == pytest.approx(0.8)
    assert row["probe_retention_per_seed"] == "0.750 / 0.850"
    assert row["probe_retention_lo"] < 0.75 and row["probe_retention_hi"] > 0.85
    assert table.loc[("moe", 10), "seeds"] == "0"
    assert has_replicates(branches) and not has_replicates(branches[:1] + branches[2:])


def test_a_branch_without_a_seed_field_uses_its_train_seed():
    """Runs made before `seeds` name no seed: their train.seed is the replicate's seed."""
    old = outcome("moe", 100, 0, 150)
    old.pop("seed")
    old["trained"] = {"train_config": {"seed": 7}}
    table = replicate_table([old, outcome("moe", 100, 1, 170)])
    assert table.loc[0, "seeds"] == "1,7"


def test_outcomes_that_cannot_be_pooled_are_named():
    with pytest.raises(ReplicateError, match=r"moe-100-s0 .*seed 0"):
        replicate_table([outcome("moe", 100, 0, 150), outcome("moe", 100, 0, 170)])
    other_facts = outcome("moe", 100, 1, 150, known=[f"g{i}" for i in range(200)])
    with pytest.raises(ReplicateError, match=r"\['moe-100-s1'\] .*same base-known facts"):
        replicate_table([outcome("moe", 100, 0, 150), other_facts])


def test_failed_branches_are_left_out():
    failed = {"name": "moe-100-s1", "method_name": "moe", "scale": 100, "seed": 1,
              "error": "boom"}
    assert replicate_table([outcome("moe", 100, 0, 150), failed]).loc[0, "seeds"] == "0"
