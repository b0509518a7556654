"""The paper-claims verdicts come from paired tests on constructed outcomes with known
answers, and the markdown report is written from the run's own table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

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


def test_a_beta_sweep_is_read_at_the_papers_beta_and_the_branches_are_named():
    """Three aligned-LBC branches share a role and scale; the claims are about the paper's
    configuration, so they read the β = 0.1 one (before: the last in config order), and say
    which branches they read."""
    ones = [1.0] * 60
    sweep = [outcome(f"moe_aligned_b{b}-100", "loramoe", 100, 150, ones, beta=b, form="aligned",
                     separation={"value": sep, "ci": [sep - 0.01, sep + 0.01]})
             for b, sep in ((1.0, 0.3), (0.1, 0.001), (10.0, 0.5))]
    branches = [*sweep, outcome("moe_b0-100", "loramoe", 100, 150, ones, beta=0.0)]
    claims = paper_claims(branches).set_index("claim")
    row = claims.loc["Routers separate by expert type (LBC, aligned form)"]
    assert row["verdict"] == "not reproduced" and "moe_aligned_b0.1-100" in row["ours"]
    helps = claims.loc["The LBC (aligned form) helps LoRAMoE", "ours"]
    assert "moe_aligned_b0.1-100 vs moe_b0-100" in helps


def test_numbers_are_written_with_their_interval():
    row = pd.Series({"x": 0.5, "x_lo": 0.4, "x_hi": 0.6, "y": -0.01, "y_lo": None})
    assert with_ci(row, "x") == "0.500 [0.400, 0.600]"
    assert with_ci(row, "y", signed=True) == "-0.010"
    assert with_ci(pd.Series({"x": float("nan")}), "x") == "–"


def test_one_way_of_writing_numbers_everywhere():
    from loramoe.pipeline.numbers import bounds, p_value, score, with_interval

    assert p_value(0.0002) == "0.0002" and p_value(6.1e-05) == "6.1e-05"  # never "0.000"
    assert p_value(0.0625) == "0.0625" and p_value(None) == "–"
    assert score(0.8385) == "0.839" and score(0.0, signed=True) == "+0.000"
    assert bounds(-0.01, 0.03, signed=True) == "[-0.010, +0.030]" and bounds(None, 1) == "–"
    assert with_interval(0.05, 0.004, 0.1, signed=True) == "+0.050 [+0.004, +0.100]"
    assert with_interval(0.5, None, None) == "0.500" and with_interval(None, 0, 1) == "–"


def test_claims_read_holm_adjusted_p_across_the_table():
    # Each test alone: 6 facts lost, none regained (exact McNemar p = 2/2^6 = 0.031 < 0.05).
    # Together they are a family of two: Holm p = 2 x 0.031 = 0.0625, so neither verdict
    # may say "reproduced" (the unadjusted table said it twice).
    ones = [1.0] * 60
    branches = [outcome("sft-10", "sft", 10, 200, ones),
                outcome("sft-100", "sft", 100, 194, ones),
                outcome("moe_paper-100", "loramoe", 100, 200, ones)]
    claims = paper_claims(branches).set_index("claim")
    forget = claims.loc["Vanilla SFT forgets world knowledge as instruction data grows"]
    keeps = claims.loc["LoRAMoE + LBC keeps more world knowledge than SFT"]
    assert forget["verdict"] == keeps["verdict"] == "inconclusive"
    # with the difference's 95% interval (Newcombe, paired): it excludes 0 as the raw p does
    assert "-0.030 [-0.064, -0.005] (McNemar p = 0.0312, Holm p = 0.0625" in forget["ours"]
    assert int(claims["tests_in_family"].iloc[0]) == 2
    # the same forgetting test as the only one in its table is significant
    alone = paper_claims(branches[:2]).set_index("claim")["verdict"]
    assert alone["Vanilla SFT forgets world knowledge as instruction data grows"] == "reproduced"


def test_paired_table_verdicts_read_holm_adjusted_p():
    from loramoe.pipeline.paired import paired_comparisons

    def branch(name, scale, kept):
        return {"name": name, "method_name": name.rsplit("-", 1)[0], "scale": scale,
                "metrics": {"probe_retention": {"known_ids": KNOWN, "kept_ids": KNOWN[:kept]}}}

    # three methods at two scales: 3 pairs a scale + 3 scale steps = 9 tests in the family.
    # sft-100 lost 6 facts, no other branch any: p = 2/2^6 = 0.031 in three of them (vs
    # lora-100, vs moe-100, vs sft-10), p = 1 in the rest; Holm: 9 x 0.031 = 0.28
    branches = [branch("sft-10", 10, 200), branch("sft-100", 100, 194),
                branch("lora-10", 10, 200), branch("lora-100", 100, 200),
                branch("moe-10", 10, 200), branch("moe-100", 100, 200)]
    paired = paired_comparisons(branches)
    probe = paired[paired["measure"] == "probe_retention"].set_index(["a", "b"])
    assert len(probe) == 3 * 2 + 3  # 3 method pairs a scale, 3 scale steps
    row = probe.loc[("sft-100", "lora-100")]
    assert row["p"] == 2 / 2**6 and row["p_holm"] == pytest.approx(9 * 2 / 2**6)
    assert row["verdict"] == "not significant"
    assert (probe["p_holm"] >= probe["p"]).all() and (probe["p_holm"] <= 1).all()
    # every retention difference carries its 95% interval (before: "–" in the report)
    assert probe["diff_lo"].notna().all() and (probe["diff_lo"] <= probe["diff"]).all()
    assert (probe["diff"] <= probe["diff_hi"]).all() and row["diff_hi"] < 0


def holm_reread():
    """experiments/holm_reread.py as a module (experiments/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "holm_reread.py"
    spec = importlib.util.spec_from_file_location("holm_reread", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_old_reports_are_re_read_with_holm(tmp_path):
    report = tmp_path / "report.md"
    report.write_text(
        "## Paired comparisons (same base-known facts, exact McNemar)\n\n"
        "| measure | kind | a | b | facts | a − b | only a / only b | p | verdict |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        "| probe_retention | method | x-1 | y-1 | 200 | -0.030 | 0 / 6 | 0.031 | significant |\n"
        "| probe_retention | method | x-2 | y-2 | 200 | +0.000 | 1 / 1 | 1.000 "
        "| not significant |\n"
        "\n## Figures\n")
    out = holm_reread().reread(report)
    # p = 2/2^6 recomputed from the counts; a family of two: Holm p = 0.0625
    assert "| 0 / 6 | 0.0312 | 0.0625 | **not significant** (was significant) |" in out
    assert "1 of 2 verdicts change." in out


def test_holm_reread_names_a_bad_argument(tmp_path):
    # Before: FileNotFoundError, IsADirectoryError and a bare StopIteration tracebacks.
    script = Path(__file__).resolve().parents[1] / "experiments" / "holm_reread.py"
    (tmp_path / "notes.md").write_text("# notes\n")
    for arg, message in [(tmp_path / "none.md", "none.md: no such file"),
                         (tmp_path, "a folder, not a report"),
                         (tmp_path / "notes.md", "no '## Paired comparisons' section")]:
        done = subprocess.run([sys.executable, str(script), str(arg)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr


def test_paired_table_compares_downstream_on_the_same_items():
    from loramoe.pipeline.paired import paired_comparisons

    good, bad = [1.0] * 60, [1.0, 0.0] * 30  # bad misses every t2 item: macro 1.0 vs 0.5
    branches = [outcome("sft-100", "sft", 100, 200, good),
                outcome("lora-100", "lora", 100, 200, bad),
                outcome("moe-100", "loramoe", 100, 200, good)]
    down = paired_comparisons(branches).query("measure == 'downstream'").set_index(["a", "b"])
    assert len(down) == 3  # three pairs at one scale, no scale steps
    row = down.loc[("sft-100", "lora-100")]
    assert row["items"] == 60 and row["diff"] == pytest.approx(0.5)
    assert row["diff_lo"] == row["diff_hi"] == pytest.approx(0.5)  # every resample: 0.5
    assert row["verdict"] == "significant" and row["p_holm"] < 0.05
    same = down.loc[("sft-100", "moe-100")]
    assert same["diff"] == 0 and same["verdict"] == "not significant"


def test_reports_written_with_holm_are_not_re_read(tmp_path):
    from loramoe.pipeline.markdown import paired_section
    from loramoe.pipeline.paired import paired_comparisons

    ones = [1.0] * 60
    branches = [outcome("sft-100", "sft", 100, 200, ones),
                outcome("lora-100", "lora", 100, 194, [1.0, 0.0] * 30)]
    report = tmp_path / "report.md"
    report.write_text(paired_section(paired_comparisons(branches)) + "\n")
    assert "read Holm-adjusted p already" in holm_reread().reread(report)


def test_the_card_prints_the_paired_table_as_the_report_does():
    # Before: the Metaflow card printed paired.csv's raw records, so a downstream row's
    # missing discordant counts and interval showed as "nan" / "None".
    from loramoe.pipeline.markdown import PAIRED_HEADERS, paired_rows
    from loramoe.pipeline.paired import paired_comparisons

    branches = [outcome("sft-100", "sft", 100, 200, [1.0] * 60),
                outcome("lora-100", "lora", 100, 194, [1.0, 0.0] * 30)]
    records = paired_comparisons(branches).to_dict(orient="records")  # the card's input
    rows = paired_rows(pd.DataFrame(records))
    assert all(len(row) == len(PAIRED_HEADERS) for row in rows)
    cells = [str(c) for row in rows for c in row]
    assert not {"nan", "None", "NaN"} & set(cells)
    down = next(r for r in rows if r[0] == "downstream")
    assert down[PAIRED_HEADERS.index("only a / only b")] == "–"
    assert down[PAIRED_HEADERS.index("95% CI")].startswith("[")


def test_results_table_reads_the_gains_over_the_base_as_one_family():
    from loramoe.pipeline.report import results_table

    def branch(name, p):
        gain = {"diff": 0.05, "ci": [0.004, 0.1], "p": p, "significant": p < 0.05}
        return {"name": name, "method_name": name.rsplit("-", 1)[0], "scale": 10,
                "metrics": {"vs_base": {"downstream": gain}}}

    three = results_table([branch(f"m{i}-10", 0.03) for i in range(3)], {}).set_index("branch")
    assert three.loc["m0-10", "downstream_vs_base_p_holm"] == pytest.approx(0.09)
    assert not three["downstream_vs_base_significant"].iloc[1:].any()  # raw p 0.03 each
    one = results_table([branch("m0-10", 0.03)], {}).set_index("branch")
    assert one.loc["m0-10", "downstream_vs_base_significant"]
    assert one.loc["base", "downstream_vs_base_significant"] is None  # the base: no test


def test_a_branch_scored_otherwise_than_the_base_is_named_in_the_table_and_report():
    """Workers of another kind (or thread count) round bf16 otherwise: a branch scored so is
    named beside its numbers instead of being compared with the base silently."""
    import json

    from loramoe.pipeline.markdown import results_section
    from loramoe.pipeline.report import results_table

    def scored(threads, cpu="X"):
        return {"records": "r", "code": "c", "settings": json.dumps(
            {"dtype": "bfloat16", "threads": threads, "cpu": cpu}, sort_keys=True)}

    def branch(name, scored_by):
        return {"name": name, "method_name": name.rsplit("-", 1)[0], "scale": 10,
                "metrics": {"scored_by": scored_by}}

    table = results_table([branch("alike-10", scored(1)), branch("other-10", scored(2, "Y")),
                           branch("unsaid-10", None)], {"scored_by": scored(1)})
    unlike = table.set_index("branch")["scored_otherwise"]
    assert unlike["alike-10"] == "" and unlike["unsaid-10"] == ""
    assert unlike["other-10"] == "cpu X vs Y, threads 1 vs 2"
    text = results_section(table.assign(probe_base_known=None))
    assert "**Scored otherwise than the base**: `other-10` (cpu X vs Y, threads 1 vs 2)." \
        in text and "alike-10`" not in text.split("Scored otherwise")[1]
    same = results_table([branch("alike-10", scored(1))], {"scored_by": scored(1)})
    assert "Scored otherwise" not in results_section(same.assign(probe_base_known=None))


def test_the_router_figure_draws_every_loramoe_branch_at_the_largest_scale(tmp_path):
    """A run comparing LBC variants drew only the first branch's routers (β = 0 in the
    study and lbc_beta runs); now a panel per branch at the largest scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loramoe.pipeline.plots import router_panels, router_types_plot

    def moe(name, scale, knowledge_weight):
        branch = outcome(name, "loramoe", scale, 150, [1.0] * 60)
        branch["trained"]["train_config"]["loramoe"] = {
            "expert_types": {"knowledge": 2, "downstream": 1}}
        weights = {"t_down": knowledge_weight - 0.1, "t_know": knowledge_weight}
        branch["metrics"]["router_type_weights"] = {
            t: {"knowledge": w, "downstream": 1 - w} for t, w in weights.items()}
        branch["metrics"]["per_task"] = {"t_down": {"task_type": "downstream"},
                                         "t_know": {"task_type": "knowledge"}}
        return branch

    branches = [moe("b0-10", 10, 0.6), moe("b0-100", 100, 0.6), moe("lbc-100", 100, 0.7)]
    panels = router_panels(branches)
    assert [p["name"] for p in panels] == ["b0-100", "lbc-100"]
    assert panels[1]["tasks"] == ["t_know", "t_down"]  # the knowledge tasks first
    assert panels[1]["values"] == [0.7, pytest.approx(0.6)]
    assert panels[1]["type_blind"] == pytest.approx(2 / 3)  # 2 of 3 experts are knowledge
    assert router_types_plot(branches, tmp_path / "r.png", plt).stat().st_size > 0


def test_the_report_says_which_tasks_ran_short_of_data():
    """lbc_long.toml asked 4,096 examples and translation could supply 42 fewer; the report
    said "Scales: [4096]" and nothing else (found reading that run's report)."""
    from pathlib import Path

    import tomllib

    from loramoe.pipeline import PipelineConfig
    from loramoe.pipeline.markdown import setup_section

    configs = Path(__file__).resolve().parents[1] / "flows" / "configs"
    config = PipelineConfig.from_dict(tomllib.loads((configs / "lbc_long.toml").read_text()),
                                      base_dir=configs)
    assert "Short of data" not in setup_section(config, None, {})
    from loramoe.precision import cpu_kernels

    # unsaid: this machine, with its flags, and saying so
    assert f"on {cpu_kernels()} (this machine; the base did not say))" in setup_section(
        config, None, {})
    text = setup_section(config, None, {"translation": 42, "nli": 1200})
    assert "**Short of data**" in text and "nli 1,200, translation 42" in text


def test_the_lbc_is_judged_against_a_control_that_differs_in_the_lbc_alone():
    """router_lr.toml: the aligned LBC at the default router lr, and β = 0 only with the
    routers at 10× the lr. Before, the claim compared the two and credited the router lr to
    the LBC; now it picks a matched control, or says it has none."""
    ones = [1.0] * 60

    def moe(name, kept, beta, form="paper", router_lr_scale=1.0):
        branch = outcome(name, "loramoe", 100, kept, ones, beta=beta, form=form)
        branch["trained"]["train_config"]["router_lr_scale"] = router_lr_scale
        return branch

    unmatched = [moe("aligned-100", 190, 1.0, "aligned"), moe("b0_r10-100", 150, 0.0,
                                                              router_lr_scale=10.0)]
    rows = paper_claims(unmatched).set_index("claim")
    row = rows.loc["The LBC (aligned form) helps LoRAMoE"]
    assert row["verdict"] == "not measured"
    assert "also differ in router_lr_scale" in row["ours"]
    matched = [*unmatched, moe("b0-100", 150, 0.0)]  # same as aligned-100 but for the LBC
    row = paper_claims(matched).set_index("claim").loc["The LBC (aligned form) helps LoRAMoE"]
    assert row["verdict"] == "reproduced" and "aligned-100 vs b0-100" in row["ours"]


def test_a_run_with_seeds_pairs_branches_within_each_seed():
    """Replicates are not paired across seeds: sft-s0 vs lora-s1 would mix training noise
    into a method comparison (replicates.py pools seeds instead)."""
    from loramoe.pipeline.paired import comparison_pairs

    branches = [{"name": f"{m}-{s}-s{seed}", "method_name": m, "scale": s, "seed": seed}
                for m in ("sft", "lora") for s in (10, 100) for seed in (0, 1)]
    pairs = comparison_pairs(branches)
    assert len(pairs) == 2 * 2 + 2 * 2  # a method pair per scale and seed; a scale step
    assert all(a["seed"] == b["seed"] for a, b, _ in pairs)  # per method and seed
    assert {(a["scale"], b["scale"]) for a, b, kind in pairs if kind == "scale"} == {(10, 100)}


def seeded(name, method, scale, seed, kept, separation=None):
    branch = outcome(name, method, scale, kept, [1.0] * 60, separation=separation)
    return {**branch, "name": f"{name}-s{seed}", "method_name": name.rsplit("-", 1)[0],
            "seed": seed}


def test_claims_pool_seed_replicates():
    """LoRAMoE keeps 40 more facts than SFT with seed 0 and 40 fewer with seed 1: each seed
    alone reads "reproduced" or "not reproduced", the two together "inconclusive"."""
    sep = {"value": 0.2, "ci": [0.1, 0.3]}
    flip = [seeded("sft-100", "sft", 100, 0, 150), seeded("moe-100", "loramoe", 100, 0, 190, sep),
            seeded("sft-100", "sft", 100, 1, 190), seeded("moe-100", "loramoe", 100, 1, 150,
                                                            {"value": 0.0, "ci": [-0.01, 0.01]})]
    keeps = "LoRAMoE + LBC keeps more world knowledge than SFT"
    separate = "Routers separate by expert type (LBC, paper form)"
    assert paper_claims(flip[:2]).set_index("claim").loc[keeps, "verdict"] == "reproduced"
    assert paper_claims(flip[2:]).set_index("claim").loc[keeps, "verdict"] == "not reproduced"
    both = paper_claims(flip).set_index("claim")
    assert both.loc[keeps, "verdict"] == "inconclusive"
    assert "2 seeds, each +0.200 / -0.200; 200 items" in both.loc[keeps, "ours"]
    # a pooled row names the methods, not one seed's branches
    assert "moe-100 vs sft-100:" in both.loc[keeps, "ours"]
    assert "-s0" not in both.loc[keeps, "ours"]
    # separation read per seed: one seed separates, the other does not
    assert both.loc[separate, "verdict"] == "inconclusive"
    assert "moe-100-s0" in both.loc[separate, "ours"] and "moe-100-s1" in both.loc[separate, "ours"]
    # the same +0.2 in both seeds is a pooled, significant difference
    agree = [seeded("sft-100", "sft", 100, s, 150) for s in (0, 1)] + \
            [seeded("moe-100", "loramoe", 100, s, 190, sep) for s in (0, 1)]
    pooled = paper_claims(agree).set_index("claim")
    assert pooled.loc[keeps, "verdict"] == "reproduced"
    assert pooled.loc[separate, "verdict"] == "reproduced"
    # two seeds at one scale are not two scales
    forgets = "Vanilla SFT forgets world knowledge as instruction data grows"
    assert pooled.loc[forgets, "verdict"] == "not measured"
    scales = paper_claims(agree + [seeded("sft-10", "sft", 10, s, 200) for s in (0, 1)])
    row = scales.set_index("claim").loc[forgets]
    assert row["verdict"] == "reproduced" and "100 vs 10 examples" in row["ours"]
    assert "2 seeds, each -0.250 / -0.250" in row["ours"]


def test_the_report_says_where_the_branches_ran_not_where_compare_runs():
    """On GPU workers the compare step runs on a plain one (no [resources]); the report's setup
    line used to resolve the dtype and name the device there: "bfloat16 on <its CPU>" for a
    study trained and scored in bf16 on H100s."""
    import json
    from pathlib import Path

    import tomllib

    from loramoe.pipeline import PipelineConfig
    from loramoe.pipeline.markdown import setup_section

    configs = Path(__file__).resolve().parents[1] / "flows" / "configs"
    config = PipelineConfig.from_dict(tomllib.loads((configs / "paper.toml").read_text()),
                                      base_dir=configs)
    gpu = "NVIDIA H100 80GB HBM3"
    scored_by = {"records": "r", "code": "c", "settings": json.dumps(
        {"batch_size": 64, "device": "cuda", "dtype": "bfloat16", "generate_per_task": 0,
         "gpu": gpu})}
    text = setup_section(config, None, None, scored_by, [gpu])
    assert f"(= bfloat16 on {gpu})" in text and f"- Trained on: {gpu}" in text
    cpu = {**scored_by, "settings": json.dumps({"dtype": "float32", "device": "cpu",
                                                "threads": 1, "cpu": "Some CPU (avx2)"})}
    assert "(= float32 on Some CPU (avx2))" in setup_section(config, None, None, cpu)


def test_the_report_counts_the_examples_max_length_cut_from_a_branch():
    """A branch labelled 256 that trained on 190 examples (the rest cut by max_length) was
    reported as 256, the count only in its final_metrics.json. Rows holding a control token's
    text are counted likewise (before: only in the train step's log)."""
    from pathlib import Path

    import tomllib

    from loramoe.pipeline import PipelineConfig
    from loramoe.pipeline.markdown import setup_section
    from loramoe.pipeline.report import row_caveats

    configs = Path(__file__).resolve().parents[1] / "flows" / "configs"
    config = PipelineConfig.from_dict(tomllib.loads((configs / "default.toml").read_text()),
                                      base_dir=configs)
    outcomes = [
        {"name": "loramoe-256", "error": None,
         "trained": {"final": {"examples": 190, "examples_dropped": 66,
                               "examples_truncated": 12}}},
        {"name": "lora-256", "error": None,
         "trained": {"final": {"examples": 256, "examples_dropped": 0,
                               "examples_truncated": 0}}},
        {"name": "sft-256", "error": "boom"},  # failed: nothing trained, nothing to count
        {"name": "lora-64", "error": None, "trained": {"final": {"examples": 64}}},  # older run
        # kept every row but cut 3 responses short (before: not reported)
        {"name": "sft-64", "error": None,
         "trained": {"final": {"examples": 64, "examples_dropped": 0,
                               "examples_truncated": 3, "examples_with_control_text": 2}}},
        {"name": "loramoe-64", "error": None,  # nothing cut, control text alone
         "trained": {"final": {"examples": 64, "examples_dropped": 0,
                               "examples_truncated": 0, "examples_with_control_text": 1}}},
    ]
    caveats = row_caveats(outcomes)
    assert caveats == {"loramoe-256": (66, 12, 0, 256), "sft-64": (0, 3, 2, 64),
                       "loramoe-64": (0, 0, 1, 64)}
    text = setup_section(config, None, None, None, None, caveats)
    assert "**Cut by max_length**" in text
    assert "loramoe-256 66 of 256 cut away, 12 cut short; sft-64 3 cut short)" not in text
    assert ": loramoe-256 66 of 256 cut away, 12 cut short; sft-64 3 cut short\n" in text
    assert ("**Control-token text in training rows** (e.g. '<|im_end|>' in a response: the "
            "tokenizer reads it as the token, and the row trains a turn that ends there; the "
            "train step's log names the rows): sft-64 2 of 64; loramoe-64 1 of 64") in text
    assert "Cut by max_length" not in setup_section(config, None, None, None, None, {})
    only_control = setup_section(config, None, None, None, None,
                                 {"loramoe-64": caveats["loramoe-64"]})
    assert "Control-token text" in only_control and "Cut by max_length" not in only_control
