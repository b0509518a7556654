"""The champion rule: promotion only for an adapter that beat the base model significantly
and kept retention above the threshold by its lower bound; no promotion is an outcome."""

from __future__ import annotations

from loramoe.pipeline import choose_candidate


def branch(name: str, downstream: float, vs_base: dict, retention: float, ci: list[float],
           method: str = "loramoe") -> dict:
    return {"name": name, "method": method, "error": None,
            "metrics": {"downstream_score": downstream,
                        "retention": {"overall": retention, "ci": ci},
                        "vs_base": {"downstream": vs_base}}}


def gain(diff: float, ci: list[float]) -> dict:
    return {"diff": diff, "ci": ci, "p": 0.001 if ci[0] > 0 else 0.5,
            "significant": ci[0] > 0 or ci[1] < 0}


def test_an_adapter_below_the_base_is_not_promoted():
    # The reported case: loramoe-64 scored 0.067 downstream, the base 0.073, and the old
    # rule (best downstream among branches keeping retention) promoted it.
    below = branch("loramoe-64", 0.067, gain(-0.006, [-0.03, 0.02]), 0.95, [0.91, 0.98])
    best, reason = choose_candidate([below], threshold=0.9)
    assert best is None
    assert "not a significant gain" in reason and "loramoe-64" in reason


def test_significant_gain_and_retention_bound_promote():
    good = branch("loramoe-256", 0.30, gain(0.20, [0.12, 0.28]), 0.96, [0.92, 0.98])
    noisy = branch("loramoe-64", 0.35, gain(0.25, [-0.01, 0.50]), 0.97, [0.93, 0.99])
    best, reason = choose_candidate([noisy, good], threshold=0.9)
    assert best is good  # the higher but not significant score does not win
    assert "lower bound 0.920 >= 0.9" in reason and "rule significant" in reason


def test_retention_is_judged_by_its_lower_bound():
    leaky = branch("loramoe-256", 0.30, gain(0.20, [0.12, 0.28]), 0.93, [0.80, 0.98])
    best, reason = choose_candidate([leaky], threshold=0.9)
    assert best is None and "retention lower bound 0.800 < threshold 0.9" in reason


def test_best_rule_keeps_the_point_estimate_rule_for_smoke_runs():
    flat = branch("loramoe-16", 0.0, gain(0.0, [0.0, 0.0]), 0.5, [0.1, 0.9])
    best, _ = choose_candidate([flat], threshold=0.0, rule="best")
    assert best is flat
    assert choose_candidate([flat], threshold=0.0)[0] is None


def with_probe(b: dict, kept: int, known: int, ci: list[float]) -> dict:
    b["metrics"]["probe_retention"] = {"overall": kept / known, "kept": kept,
                                       "base_correct": known, "ci": ci}
    return b


def test_the_probe_retention_is_judged_when_the_eval_has_a_probe():
    # The default run (2026-12-04): loramoe-256 beat the base on downstream (+0.175, CI
    # [0.072, 0.278]) and kept 0.985 [0.978, 0.989] of 1,846 base-known facts by the probe,
    # but was judged by generation retention on 30 facts (0.400 [0.246, 0.577]) — a measure
    # its own report shows is mostly answer style. Before the fix: not promoted.
    b = with_probe(branch("loramoe-256", 0.305, gain(0.175, [0.072, 0.278]), 0.40,
                          [0.246, 0.577]), 1818, 1846, [0.978, 0.989])
    best, reason = choose_candidate([b], threshold=0.9)
    assert best is b
    assert "probe retention 0.985 (lower bound 0.978 >= 0.9)" in reason
    leaky = with_probe(branch("loramoe-256", 0.305, gain(0.175, [0.072, 0.278]), 0.99,
                              [0.95, 1.0]), 1500, 1846, [0.794, 0.830])
    assert choose_candidate([leaky], threshold=0.9)[0] is None  # judged by the probe


def test_a_threshold_no_branch_could_reach_is_named():
    # 30 of 30 facts kept: Wilson lower bound 0.886 < 0.9, so no branch can ever pass
    tiny = branch("loramoe-256", 0.30, gain(0.20, [0.12, 0.28]), 0.9, [0.74, 0.97])
    tiny["metrics"]["retention"]["base_correct"] = 30
    best, reason = choose_candidate([tiny], threshold=0.9)
    assert best is None
    assert "generation retention lower bound 0.740 < threshold 0.9" in reason
    assert "unreachable on 30 facts: keeping all of them gives a lower bound of 0.886" in reason


def test_a_marginal_gain_among_several_candidates_is_not_enough():
    # Each gain alone: paired bootstrap p = 0.03, CI above 0 (the rule before Holm promoted
    # it). Three candidates tested against the base are one family: Holm p = 3 x 0.03 = 0.09.
    def marginal(name):
        return branch(name, 0.30, {"diff": 0.05, "ci": [0.004, 0.10], "p": 0.03,
                                   "significant": True}, 0.99, [0.97, 1.0])

    three = [marginal(f"loramoe-{s}") for s in (16, 64, 256)]
    best, reason = choose_candidate(three, threshold=0.9)
    assert best is None
    assert reason.count("Holm p 0.090") == 3 and "not a significant gain" in reason
    alone, why = choose_candidate(three[:1], threshold=0.9)
    assert alone is three[0] and "Holm p 0.030" in why and "1 candidate;" in why
