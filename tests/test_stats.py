"""Intervals and paired tests against textbook values and constructed cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from loramoe.evaluate.stats import (
    crossed_bootstrap,
    group_difference,
    holm_adjust,
    mcnemar_exact,
    mean_interval,
    newcombe_paired_interval,
    paired_binary,
    paired_bootstrap,
    stratified_bootstrap,
    wilson_interval,
)


@pytest.mark.parametrize(("k", "n", "lo", "hi"), [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_matches_newcombe_1998(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)


def test_wilson_of_no_items_is_undefined():
    assert wilson_interval(0, 0) is None


def test_wilson_bounds_are_exact_at_none_and_all():
    # before: (2.8e-17, 0.2425) for 0 of 12, the formula's rounding
    assert wilson_interval(0, 12)[0] == 0.0 and wilson_interval(12, 12)[1] == 1.0
    assert wilson_interval(0, 12)[1] == pytest.approx(0.2425, abs=5e-5)


def test_exact_mcnemar_on_constructed_cases():
    # 6 discordant pairs all one way: p = 2 · 0.5^6
    assert mcnemar_exact(0, 6) == pytest.approx(0.03125)
    assert mcnemar_exact(6, 0) == mcnemar_exact(0, 6)
    # 3 vs 7: 2·P(X <= 3), X ~ Bin(10, 1/2) = 2·176/1024
    assert mcnemar_exact(3, 7) == pytest.approx(2 * 176 / 1024)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0


def test_paired_binary_counts_discordant_items():
    a = pd.Series([True] * 10 + [False] * 10)
    b = pd.Series([True] * 4 + [False] * 6 + [False] * 10)
    out = paired_binary(a, b)
    assert (out["only_a"], out["only_b"], out["diff"]) == (6, 0, pytest.approx(0.3))
    assert out["p"] == pytest.approx(0.03125) and out["significant"]


def test_paired_binary_gives_the_difference_a_95_interval():
    a = pd.Series([True] * 10 + [False] * 10)
    b = pd.Series([True] * 4 + [False] * 6 + [False] * 10)
    out = paired_binary(a, b)
    lo, hi = out["ci"]
    assert (lo, hi) == pytest.approx(newcombe_paired_interval(4, 6, 0, 10))
    assert 0 < lo < out["diff"] < hi  # 6 vs 0 discordant: the interval excludes 0
    swapped = paired_binary(b, a)
    assert swapped["ci"] == pytest.approx([-hi, -lo])
    assert paired_binary(pd.Series([], dtype=bool), pd.Series([], dtype=bool))["ci"] is None


def test_newcombe_paired_interval_matches_the_textbook():
    # Fagerland, Lydersen & Laake (2017), Statistical Analysis of Contingency Tables, ch. 8:
    # complete response before / after consolidation therapy (Cavo et al. 2012), the
    # Newcombe square-and-add interval: -0.0621 (95% CI -0.1186 to -0.0046).
    assert newcombe_paired_interval(59, 6, 16, 80) == pytest.approx((-0.1186, -0.0046),
                                                                     abs=5e-5)
    # and its exact conditional McNemar test beside it: P = 0.052479
    assert mcnemar_exact(6, 16) == pytest.approx(0.052479, abs=5e-7)


def test_newcombe_paired_interval_edge_tables():
    assert newcombe_paired_interval(0, 0, 0, 0) is None
    lo, hi = newcombe_paired_interval(1800, 0, 0, 47)  # nothing discordant: around 0
    assert lo < 0 < hi and hi == pytest.approx(-lo, abs=1e-12)
    # A right on all 20, B on none: the two Wilson half-widths (0.1611, Table I of Newcombe
    # 1998 for 0/20) squared and added below, nothing above 1
    assert newcombe_paired_interval(0, 20, 0, 0) == pytest.approx(
        (1 - 0.1611 * 2 ** 0.5, 1.0), abs=1e-4)


def test_newcombe_paired_interval_covers_95_percent_of_correlated_tables():
    """Retention pairs are strongly correlated (most facts kept by both models): an interval
    that ignored the correlation would cover ~100 %, one too narrow well below 95 %."""
    rng = np.random.default_rng(0)
    n, draws = 400, 4000
    cells = np.array([0.90, 0.05, 0.02, 0.03])  # both, only A, only B, neither
    truth = cells[1] - cells[2]
    tables = rng.multinomial(n, cells, size=draws)  # (draws, 4)
    covered = 0
    for both, only_a, only_b, neither in tables:
        lo, hi = newcombe_paired_interval(int(both), int(only_a), int(only_b), int(neither))
        covered += lo <= truth <= hi
    assert 0.93 <= covered / draws <= 0.97


def test_paired_bootstrap_finds_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(1)
    tasks = pd.Series(["t1"] * 100 + ["t2"] * 100)
    b = pd.Series(rng.random(200) < 0.5).astype(float)
    better = b.copy()
    better[b == 0] = (rng.random(int((b == 0).sum())) < 0.6).astype(float)  # fixes ~60%
    out = paired_bootstrap(better, b, tasks, rounds=1000)
    assert out["significant"] and out["ci"][0] > 0 and out["p"] < 0.01
    assert out["ci"][0] <= out["diff"] <= out["ci"][1]
    same = paired_bootstrap(b, b, tasks, rounds=200)
    assert same["diff"] == 0 and not same["significant"] and same["p"] == 1.0


def test_stratified_bootstrap_is_a_macro_mean_with_an_interval_around_it():
    tasks = pd.Series(["a"] * 4 + ["b"] * 100)
    scores = pd.Series([1.0] * 4 + [0.0] * 50 + [1.0] * 50)
    out = stratified_bootstrap(scores, tasks, rounds=500)
    assert out["value"] == pytest.approx((1.0 + 0.5) / 2)  # macro: task a weighs as much as b
    lo, hi = out["ci"]
    assert lo < out["value"] < hi and hi - lo < 0.25
    constant = stratified_bootstrap(pd.Series([1.0] * 10), pd.Series(["a"] * 10), rounds=50)
    assert constant["ci"] == [1.0, 1.0]


def scored_frame(scores: list[float], task_type: str = "knowledge") -> pd.DataFrame:
    n = len(scores)
    return pd.DataFrame({"id": [f"i{k}" for k in range(n)],
                         "task": ["t1" if k % 2 else "t2" for k in range(n)],
                         "task_type": task_type, "score": scores})


def test_retention_carries_its_wilson_interval_and_the_facts():
    from loramoe.evaluate.scoring import retention

    base = scored_frame([1.0] * 20 + [0.0] * 4)
    tuned = scored_frame([1.0] * 15 + [0.0] * 9)
    out = retention(base, tuned)
    assert (out["kept"], out["base_correct"], out["overall"]) == (15, 20, 0.75)
    assert out["ci"] == pytest.approx(wilson_interval(15, 20))
    assert len(out["known_ids"]) == 20 and len(out["kept_ids"]) == 15


def test_comparison_with_the_base_is_paired_on_items():
    from loramoe.evaluate.scoring import compare_with_base, summarize

    base = scored_frame([0.0] * 60, "downstream")
    tuned = scored_frame([1.0] * 30 + [0.0] * 30, "downstream")
    out = compare_with_base(base, tuned)["downstream"]
    assert out["diff"] == pytest.approx(0.5) and out["significant"]
    summary = summarize(tuned.assign(metric="accuracy"))
    lo, hi = summary["downstream_score_ci"]
    assert lo < summary["downstream_score"] < hi


def test_a_task_scored_0_or_1_gets_the_wilson_interval_of_its_share():
    # Newcombe (1998) Table I again: 81 of 263
    got = mean_interval(pd.Series([1.0] * 81 + [0.0] * 182))
    assert got == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert mean_interval(pd.Series([], dtype=float)) is None


def test_a_graded_task_gets_the_percentile_bootstrap_of_its_mean():
    scores = pd.Series(np.linspace(0.0, 1.0, 40) ** 2)  # F1-like, not 0/1
    lo, hi = mean_interval(scores)
    # an independent plain bootstrap (another generator): the same interval within the
    # Monte-Carlo error of 10,000 rounds
    rng = np.random.default_rng(12345)
    means = scores.to_numpy()[rng.integers(0, 40, size=(10_000, 40))].mean(axis=1)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), abs=0.01)
    assert lo < scores.mean() < hi


def test_every_task_score_carries_its_interval():
    from loramoe.evaluate.scoring import summarize

    frame = pd.concat([scored_frame([1.0] * 9 + [0.0] * 3, "downstream").assign(task="exact"),
                       scored_frame([0.5, 0.25, 1.0, 0.75] * 3, "downstream").assign(task="f1")])
    per_task = summarize(frame.assign(metric="x"))["per_task"]
    assert per_task["exact"]["ci"] == pytest.approx(wilson_interval(9, 12))
    assert per_task["f1"]["ci"] == pytest.approx(mean_interval(frame[frame["task"] == "f1"]
                                                               ["score"]))
    assert per_task["f1"]["ci"][0] < per_task["f1"]["score"] < per_task["f1"]["ci"][1]


def test_group_difference_is_the_macro_gap_between_task_types():
    # knowledge tasks k1/k2 put weight 0.7/0.5 on knowledge experts, downstream tasks 0.4/0.4
    values = pd.Series([0.7] * 10 + [0.5] * 30 + [0.4] * 20)
    tasks = pd.Series(["k1"] * 10 + ["k2"] * 30 + ["d1"] * 10 + ["d2"] * 10)
    got = group_difference(values, tasks, tasks.str.startswith("k"))
    assert got["value"] == pytest.approx((0.7 + 0.5) / 2 - 0.4)  # macro, not item-weighted
    assert got["ci"] == pytest.approx([0.2, 0.2]) and got["significant"]
    noisy = group_difference(pd.Series([0.0, 1.0] * 20), tasks[:40].where(
        pd.Series(range(40)) < 20, "d1"), pd.Series(range(40)) < 20)
    assert noisy["ci"][0] < 0 < noisy["ci"][1] and not noisy["significant"]
    assert group_difference(values, tasks, pd.Series([True] * 60))["value"] is None


def test_holm_adjustment_matches_the_textbook_example():
    # Holm (1979) as taught (e.g. Wikipedia's "Holm–Bonferroni method"): four hypotheses with
    # p = 0.01, 0.04, 0.03, 0.005 at alpha 0.05 -> H4 and H1 rejected, H3 and H2 not.
    # Adjusted by hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06,
    # 0.04 -> monotone 0.02, 0.03, 0.06, 0.06.
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [p < 0.05 for p in adjusted] == [True, False, False, True]


def test_holm_skips_missing_tests_and_caps_at_one():
    assert holm_adjust([None, 0.2, 0.01]) == pytest.approx([None, 0.2, 0.02])  # 0.01 x 2, 0.2 x 1
    assert holm_adjust([0.6, 0.9]) == [1.0, 1.0]
    assert holm_adjust([0.02]) == [0.02] and holm_adjust([]) == []


def test_paired_bootstrap_p_is_never_zero():
    # every resample of a constant +1 difference is above 0: k = 0 rounds beyond, so
    # p = 2 (0 + 1) / (rounds + 1), the bootstrap's resolution, not 0
    a, b = pd.Series([1.0] * 20), pd.Series([0.0] * 20)
    out = paired_bootstrap(a, b, pd.Series(["t"] * 20), rounds=999)
    assert out["p"] == pytest.approx(2 / 1000) and out["significant"]


def test_bootstrap_interval_matches_normal_theory_for_a_share():
    # 104 of 400 items right: the normal-theory 95% interval is 0.26 ± 1.96·sqrt(.26·.74/400)
    # = [0.2170, 0.3030]; 10,000 percentile-bootstrap rounds land within Monte Carlo error
    scores = pd.Series([1.0] * 104 + [0.0] * 296)
    half = 1.959964 * np.sqrt(0.26 * 0.74 / 400)
    out = stratified_bootstrap(scores, pd.Series(["t"] * 400))
    assert out["ci"] == pytest.approx([0.26 - half, 0.26 + half], abs=0.004)


def test_resampling_in_chunks_draws_the_same_rounds(monkeypatch):
    import loramoe.evaluate.stats as stats

    rng = np.random.default_rng(3)
    a, b = (pd.Series(rng.random(300) < 0.6).astype(float) for _ in range(2))
    tasks = pd.Series(rng.choice(["t1", "t2", "t3"], size=300))
    whole = paired_bootstrap(a, b, tasks, rounds=500)
    monkeypatch.setattr(stats, "CHUNK", 1000)  # a few rounds at a time
    assert paired_bootstrap(a, b, tasks, rounds=500) == whole


def test_default_rounds_resolve_p_for_a_family_of_forty():
    # the study's largest Holm family has 40 tests: its smallest p must stay below 0.05 / 40
    a, b = pd.Series([1.0] * 20), pd.Series([0.0] * 20)
    p = paired_bootstrap(a, b, pd.Series(["t"] * 20))["p"]
    assert p == pytest.approx(2 / 10_001) and 40 * p < 0.05


def test_crossed_bootstrap_interval_spans_the_seeds_when_items_agree():
    # every item scores 0.1 under seed 0 and 0.3 under seed 1: all spread is training noise.
    # A round draws seeds (0,0), (1,1) or a mix with probabilities 1/4, 1/4, 1/2, so the
    # rounds take 0.1, 0.3 or 0.2 and the 95% percentile interval is exactly [0.1, 0.3]
    values = np.array([[0.1] * 50, [0.3] * 50])
    out = crossed_bootstrap(values)
    assert out["value"] == pytest.approx(0.2) and out["per_seed"] == pytest.approx([0.1, 0.3])
    assert out["ci"] == pytest.approx([0.1, 0.3])
    assert out["p"] == pytest.approx(2 / 10_001) and (out["seeds"], out["n"]) == (2, 50)


def test_crossed_bootstrap_finds_nothing_when_seeds_disagree():
    # seed 0 alone would be a certain +0.1 (every item); seed 1 says -0.1: no sign is known
    out = crossed_bootstrap(np.array([[0.1] * 50, [-0.1] * 50]))
    assert out["value"] == pytest.approx(0.0) and out["p"] == 1.0
    assert out["ci"] == pytest.approx([-0.1, 0.1])


def test_crossed_bootstrap_with_one_seed_or_equal_seeds_is_the_item_bootstrap():
    # 104 of 400 right (see the normal-theory test above): one seed, or the same seed twice,
    # gives the items' interval alone
    row = np.array([1.0] * 104 + [0.0] * 296)
    half = 1.959964 * np.sqrt(0.26 * 0.74 / 400)
    for values in (row[None, :], np.stack([row, row])):
        assert crossed_bootstrap(values)["ci"] == pytest.approx([0.26 - half, 0.26 + half],
                                                                abs=0.004)


def test_crossed_bootstrap_is_a_macro_mean_over_tasks():
    # 30 items of t1 all right, 10 of t2 all wrong: macro 0.5 (the item mean would be 0.75),
    # and resampling within each task cannot move it
    values = np.array([[1.0] * 30 + [0.0] * 10] * 2)
    out = crossed_bootstrap(values, pd.Series(["t1"] * 30 + ["t2"] * 10))
    assert out["value"] == pytest.approx(0.5) and out["ci"] == pytest.approx([0.5, 0.5])
