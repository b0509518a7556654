"""The champion rule: promotion only for an adapter that beat the base model significantly
and kept retention above the threshold by its lower bound; no promotion is an outcome."""

from __future__ import annotations

import json

import pandas as pd

from loramoe.pipeline import choose_candidate
from loramoe.pipeline.champion import (
    challenge,
    current_champion,
    keep_rescore,
    not_comparable,
    reevaluate_champion,
    rescored_tag,
    scored_by_tags,
)


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
    assert reason.count("Holm p 0.09)") == 3 and "not a significant gain" in reason
    alone, why = choose_candidate(three[:1], threshold=0.9)
    assert alone is three[0] and "Holm p 0.03)" in why and "1 candidate;" in why


# The challenge: a new adapter takes the alias only if it beats the current champion on the
# same eval records (paired bootstrap, Holm over every candidate that earned promotion).

def champion_items(n: int = 60) -> pd.DataFrame:
    """The champion's per-item downstream scores: 20 of 60 items correct, two tasks."""
    return pd.DataFrame({"id": [f"d{i}" for i in range(n)],
                         "task": ["t1" if i % 2 else "t2" for i in range(n)],
                         "task_type": "downstream", "score": [float(i % 3 == 0) for i in range(n)]})


def challenger(name: str, fixed: int, start: int = 0) -> dict:
    """A candidate that gets `fixed` more of the champion's wrong items right."""
    items = champion_items()
    wrong = items.index[items["score"] == 0][start:start + fixed]
    items.loc[wrong, "score"] = 1.0
    b = branch(name, float(items["score"].mean()), gain(0.2, [0.1, 0.3]), 0.99, [0.97, 1.0])
    b["metrics"]["item_scores"] = items.to_dict(orient="list")
    return b


def holder(items: pd.DataFrame | None, why_not: str = "") -> dict:
    return {"version": 3, "run_id": "r", "score": 1 / 3, "items": items, "why_not": why_not,
            "note": ""}


def test_a_clear_gain_over_the_champion_on_the_same_items_takes_the_alias():
    best = challenger("loramoe-256", fixed=10)  # +0.167, p 0.0002
    promoted, why = challenge(best, [best], holder(champion_items()), "significant")
    assert promoted
    # the registry's description writes numbers as the report does: a bootstrap p of
    # 0.0002 read "Holm p 0.000" there before
    assert "beats current champion: downstream +0.167 vs current champion (version 3; " \
           "95% CI [+0.083, +0.267], Holm p 0.0002 over 1 tested)" in why


def test_a_gain_inside_the_noise_keeps_the_champion():
    # The old rule moved the alias on any higher point score (+0.033 here, CI reaching 0).
    best = challenger("loramoe-256", fixed=2)
    promoted, why = challenge(best, [best], holder(champion_items()), "significant")
    assert not promoted
    assert "does not beat current champion significantly: downstream +0.033" in why
    assert "Holm p 0.272" in why
    same = challenger("loramoe-64", 0)
    tie, _ = challenge(same, [same], holder(champion_items()), "significant")
    assert not tie  # the same adapter again (a resumed run) does not move the alias


def test_every_candidate_that_earned_it_is_one_family_against_the_champion():
    # Alone, 4 items more is p = 0.030; the best of two such candidates is Holm p 0.060.
    first, second = challenger("loramoe-64", 4), challenger("loramoe-256", 4, start=4)
    alone, why = challenge(first, [first], holder(champion_items()), "significant")
    assert alone and "Holm p 0.03 over 1 tested" in why
    promoted, why = challenge(first, [first, second], holder(champion_items()), "significant")
    assert not promoted and "Holm p 0.06 over 2 tested" in why


def test_scores_on_other_eval_records_are_not_compared():
    best = challenger("loramoe-256", fixed=10)
    for rule in ("significant", "best"):
        promoted, why = challenge(best, [best], holder(None, "it was evaluated on other eval "
                                                             "records"), rule)
        assert not promoted
        assert "not compared with the current champion (version 3): it was evaluated on " \
               "other eval records; it keeps the alias" in why


def test_the_best_rule_compares_point_scores():
    assert challenge(challenger("a", 1), [], holder(champion_items()), "best")[0]
    kept, why = challenge(challenger("a", 0), [], holder(champion_items()), "best")
    assert not kept and "does not beat current champion (version 3, 0.333)" in why


def test_the_reported_gain_of_the_best_of_several_is_called_optimistic():
    two = [branch(f"loramoe-{s}", 0.3 + s / 1000, gain(0.2, [0.1, 0.3]), 0.99, [0.97, 1.0])
           for s in (64, 256)]
    best, reason = choose_candidate(two, threshold=0.9)
    assert best is two[1]
    assert "the highest of the 2 that earned it, so its gain is an optimistic estimate" in reason
    assert "optimistic" not in choose_candidate(two[:1], threshold=0.9)[1]


SETTINGS = '{"batch_size": 16, "device": "cpu", "dtype": "bfloat16", "generate_per_task": 12}'
SCORED = {"eval_records": "abc", "eval_code": "c1", "eval_settings": SETTINGS}


def test_scores_are_paired_only_when_the_same_records_and_code_scored_them():
    assert not_comparable(SCORED, SCORED) == ""
    assert not_comparable(SCORED, {**SCORED, "eval_records": "def"}) == \
        "it was evaluated on other eval records"
    assert not_comparable(SCORED, {**SCORED, "eval_code": "c2"}).startswith(
        "it was scored by other evaluation code")
    fp32 = SETTINGS.replace("bfloat16", "float32")
    assert not_comparable(SCORED, {**SCORED, "eval_settings": fp32}) == \
        f"it was scored with other evaluation settings ({SETTINGS} vs {fp32})"
    assert not_comparable({"downstream_score": "0.3"}, SCORED) == \
        "its version does not record what scored it"  # registered before versions did
    assert not_comparable(SCORED, {}) == "this run does not record what scored it"
    b = branch("loramoe-256", 0.3, gain(0.2, [0.1, 0.3]), 0.99, [0.97, 1.0])
    assert scored_by_tags(b["metrics"]) == {}
    b["metrics"]["scored_by"] = {"records": "abc", "code": "c1",  # as evaluate() writes it
                                 "settings": SETTINGS}
    assert scored_by_tags(b["metrics"]) == SCORED


def test_the_current_champion_is_read_from_a_real_registry(tmp_path):
    """Its per-item scores come from its run's eval/metrics.json in MLflow, only when its
    version records the same eval records, evaluation code and settings."""
    import mlflow

    from loramoe.tracking import store_folder

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "a").as_uri())
    assert current_champion("m", SCORED, tmp_path) is None  # no registered model yet
    run_id = client.create_run(experiment).info.run_id
    metrics = tmp_path / "eval" / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"item_scores": champion_items().to_dict(orient="list")}))
    store_folder(run_id, [metrics], "eval")
    client.create_registered_model("m")
    version = client.create_model_version("m", f"runs:/{run_id}/model", run_id=run_id,
                                          tags={"downstream_score": "0.333", **SCORED})
    assert current_champion("m", SCORED, tmp_path) is None  # registered, but no alias yet
    client.set_registered_model_alias("m", "champion", version.version)

    found = current_champion("m", SCORED, tmp_path / "w")
    assert found["version"] == 1 and found["score"] == 0.333 and not found["why_not"]
    pd.testing.assert_frame_equal(found["items"], champion_items())
    other = current_champion("m", {**SCORED, "eval_records": "def"}, tmp_path / "w2")
    assert other["items"] is None and other["why_not"] == "it was evaluated on other eval records"
    client.delete_run(run_id)
    (tmp_path / "a").rename(tmp_path / "gone")  # its artifacts lost: not comparable
    lost = current_champion("m", SCORED, tmp_path / "w4")
    assert lost["items"] is None and lost["why_not"].startswith("its scores could not be read")


def test_a_champion_evaluated_again_once_is_paired_from_then_on(tmp_path):
    """A champion scored with other settings, evaluated again by one run's register step: its
    version points to those scores (keep_rescore), and a later run scored the same way reads
    them instead of evaluating it again; a run scored otherwise, or a pointer to a lost run,
    finds nothing and evaluates it again as before."""
    import mlflow

    from loramoe.tracking import store_folder

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "a").as_uri())
    first = client.create_run(experiment).info.run_id  # the champion's own run
    fp32 = SETTINGS.replace("bfloat16", "float32")
    client.create_registered_model("m")
    client.create_model_version("m", f"runs:/{first}/model", run_id=first,
                                tags={"downstream_score": "0.5", **SCORED,
                                      "eval_settings": fp32})
    client.set_registered_model_alias("m", "champion", "1")
    found = current_champion("m", SCORED, tmp_path / "w1")
    why = f"it was scored with other evaluation settings ({fp32} vs {SETTINGS})"
    assert found["items"] is None and found["why_not"] == why  # nothing stored yet

    # what reevaluate_champion hands over: evaluate()'s metrics.json under this run's settings
    again = tmp_path / "again" / "metrics.json"
    again.parent.mkdir()
    again.write_text(json.dumps({"downstream_score": 1 / 3, "item_scores":
                                 champion_items().to_dict(orient="list"),
                                 "scored_by": {"records": "abc", "code": "c1",
                                               "settings": SETTINGS}}))
    register_run = client.create_run(experiment).info.run_id
    keep_rescore("m", {**found, "rescored": again}, SCORED, register_run)
    tags = client.get_model_version("m", "1").tags
    assert tags["eval_settings"] == fp32  # what first scored it stays recorded
    assert json.loads(tags[rescored_tag(SCORED)]) == {
        "run_id": register_run, "path": "champion_again/v1/metrics.json"}

    later = current_champion("m", SCORED, tmp_path / "w2")
    assert not later["why_not"] and later["score"] == 1 / 3
    assert later["note"] == f", evaluated again in run {register_run}: {why}"
    pd.testing.assert_frame_equal(later["items"], champion_items())
    best = challenger("a", 10)
    promoted, reason = challenge(best, [best], later, "significant")
    assert promoted and f"(version 1, evaluated again in run {register_run}: " in reason

    batch32 = {**SCORED, "eval_settings": SETTINGS.replace("16", "32")}
    assert rescored_tag(batch32) != rescored_tag(SCORED)
    assert current_champion("m", batch32, tmp_path / "w3")["items"] is None
    # a pointer whose file says it was scored otherwise is not believed
    client.set_model_version_tag("m", "1", rescored_tag(batch32), tags[rescored_tag(SCORED)])
    assert current_champion("m", batch32, tmp_path / "w4")["items"] is None
    client.delete_run(register_run)
    store_folder(first, [again], "unrelated")  # the champion's own run still has files
    (tmp_path / "a" / register_run).rename(tmp_path / "gone")  # the stored scores are lost
    lost = current_champion("m", SCORED, tmp_path / "w5")
    assert lost["items"] is None and lost["why_not"] == why


def test_a_champion_that_cannot_be_evaluated_again_is_not_compared(tmp_path):
    """Its run's trained folder is gone (another store, a deleted run): the reason says so."""
    from pathlib import Path

    import mlflow
    import tomllib

    from loramoe.pipeline.config import PipelineConfig

    smoke = Path(__file__).parents[1] / "flows" / "configs" / "smoke.toml"
    config = PipelineConfig.from_dict(tomllib.loads(smoke.read_text()))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    champion = {"version": 2, "run_id": "0" * 32, "items": None, "note": "", "score": 0.3,
                "why_not": "it was evaluated on other eval records"}
    found = reevaluate_champion(config, champion, champion_items(), SCORED, tmp_path)
    assert found["items"] is None
    assert found["why_not"].startswith("it was evaluated on other eval records, and "
                                       "evaluating it again here failed (")
    promoted, why = challenge(challenger("a", 10), [], found, "significant")
    assert not promoted and "not compared with the current champion (version 2)" in why


def test_a_champion_is_not_evaluated_again_without_the_gpus_asked_for(tmp_path):
    """A register worker scheduled without its GPUs used to evaluate the champion on its CPU
    (a 7B model for hours) only to find the scores unpairable; now it says why at once."""
    from pathlib import Path

    import tomllib
    import torch

    from loramoe.pipeline.config import PipelineConfig

    smoke = Path(__file__).parents[1] / "flows" / "configs" / "smoke.toml"
    data = tomllib.loads(smoke.read_text())
    data["resources"]["eval_gpu"] = torch.cuda.device_count() + 1
    config = PipelineConfig.from_dict(data, base_dir=smoke.parent)
    champion = {"version": 2, "run_id": "0" * 32, "items": None, "note": "", "score": 0.3,
                "why_not": "it was scored with other evaluation settings"}
    found = reevaluate_champion(config, champion, champion_items(), SCORED, tmp_path)
    assert found["items"] is None and "GpuRequestError: config.resources.eval_gpu = " in \
        found["why_not"]
    assert not (tmp_path / "champion_again" / "run").exists()  # nothing fetched
