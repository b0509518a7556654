"""experiments/forgetting.py end to end on the tiny random model: snapshots, probe, report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
name = "fg-tiny"
mlflow_experiment = "fg-tiny"
registered_model = "fg-tiny"
[mixture]
scales = [16, 32]
seed = 0
eval_size = 3
knowledge_share = 0.25
task_types = ["knowledge", "downstream"]
tasks = [{ name = "country_capital", eval_size = 20 },
         { name = "city_country", train = false, eval_size = 20 },
         { name = "arithmetic" }, { name = "sort_numbers" }]
[train]
model = "tiny-random-llama"
batch_size = 8
max_length = 128
lr = 0.005
lr_schedule = "constant"
[methods]
sft = { method = "sft" }
loramoe = { method = "loramoe", lr = 0.02 }
"""


def test_forgetting_experiment_writes_its_report(tmp_path):
    config = tmp_path / "forgetting.toml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "experiments/forgetting.py"),
                           "--config", str(config), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pd.read_csv(out / "results.csv")
    tuned = rows[rows["method"] != "base"]
    assert list(tuned["scale"]) == [16, 32, 16, 32] and list(tuned["steps"]) == [2, 4, 2, 4]
    assert (tuned["probe_base_known"]
            == rows.loc[rows["method"] == "base", "probe_base_known"].iloc[0]).all()
    assert (tuned["kept"] <= tuned["probe_base_known"]).all()
    assert tuned["untrained_retention"].notna().all()
    assert (tuned.groupby("method")["vs_first_p"].first() == 1.0).all()  # first vs itself
    # each change carries its 95% interval (Newcombe, paired); the first is the reference
    later = tuned[tuned["scale"] > 16]
    assert (later["vs_first_diff_lo"] <= later["vs_first_diff"]).all()
    assert (later["vs_first_diff"] <= later["vs_first_diff_hi"]).all()
    assert tuned.loc[tuned["scale"] == 16, "vs_first_diff_lo"].isna().all()
    for method in ("sft", "loramoe"):
        assert (out / method / "snapshots" / "step-00002" / "probe.jsonl").is_file()
    report = (out / "report.md").read_text()
    assert report.count("Verdict:") == 2 and (out / "retention.png").is_file()
    for line in (x for x in report.splitlines() if x.startswith("Verdict:")):
        assert re.search(r"\([+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]; lost", line), line
    paired = pd.read_csv(out / "paired.csv")
    pairs = {(r["comparison"], r["a"], r["b"]) for _, r in paired.iterrows()}
    assert pairs == {("method", "sft-16", "loramoe-16"), ("method", "sft-32", "loramoe-32"),
                     ("scale", "sft-16", "sft-32"), ("scale", "loramoe-16", "loramoe-32")}
    known = rows.loc[rows["method"] == "base", "probe_base_known"].iloc[0]
    assert (paired["items"] == known).all() and (paired["p_holm"] >= paired["p"]).all()
    kept = {f"{r['method']}-{r['scale']}": r["kept"] for _, r in tuned.iterrows()}
    for _, r in paired.iterrows():  # discordant counts agree with the kept counts
        assert r["only_a"] - r["only_b"] == kept[r["a"]] - kept[r["b"]]
    assert "Paired comparisons" in report


def test_narrowed_runs_report_what_they_ran_and_pair_across_runs(tmp_path):
    """--methods / --scales narrow the run, and the report's setup says so (it used to list
    every method of the config although only the chosen ones ran); two such runs pair on the
    same facts with experiments/pair_runs.py, which refuses runs over different facts."""
    config = tmp_path / "forgetting.toml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "experiments/forgetting.py"),
                           "--config", str(config), "--out", str(out), "--methods", "loramoe",
                           "--scales", "16"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pd.read_csv(out / "results.csv")
    assert list(rows["method"]) == ["base", "loramoe"] and list(rows["scale"]) == [0, 16]
    setup = (out / "report.md").read_text().split("## ")[1]
    assert "`loramoe`" in setup and "`sft`" not in setup and "[16]" in setup

    # a second, separate run of the other method pairs with this one on the same facts
    other = tmp_path / "other"
    subprocess.run([sys.executable, str(ROOT / "experiments/forgetting.py"), "--config",
                    str(config), "--out", str(other), "--methods", "sft", "--scales", "16"],
                   capture_output=True, text=True, timeout=600, check=True)
    paired = subprocess.run([sys.executable, str(ROOT / "experiments/pair_runs.py"),
                             str(other), str(out)], capture_output=True, text=True, timeout=300)
    assert paired.returncode == 0, paired.stderr[-3000:]
    row = next(line for line in paired.stdout.splitlines() if line.startswith("| 16 |"))
    _, scale, a, b, kept_a, kept_b, diff, discordant, p, p_holm, _ = (
        c.strip() for c in row.split("|"))
    kept = {m: int(pd.read_csv(d / "results.csv").set_index("method").loc[m, "kept"])
            for m, d in (("sft", other), ("loramoe", out))}
    assert (a, b, int(kept_a), int(kept_b)) == ("sft", "loramoe", kept["sft"], kept["loramoe"])
    only_a, only_b = (int(n) for n in discordant.split("/"))
    assert only_a - only_b == kept["sft"] - kept["loramoe"] and 0 < float(p) <= 1
    assert float(p) <= float(p_holm) <= 1  # one scale, one comparison: the same p
    value, lo, hi = (float(x) for x in re.findall(r"[+-]\d\.\d{3}", diff))
    known = int(pd.read_csv(out / "results.csv").set_index("method").loc["base",
                                                                          "probe_base_known"])
    assert value == pytest.approx((kept["sft"] - kept["loramoe"]) / known, abs=5e-4)
    assert lo <= value <= hi and lo < hi  # the difference and its 95% interval

    # folders that are not forgetting.py runs are named, not read into a traceback
    for bad, message in [(tmp_path / "none", "first: "), (config, "first: "),
                         (tmp_path, "holds no base_probe.jsonl or results.csv")]:
        refused = subprocess.run([sys.executable, str(ROOT / "experiments/pair_runs.py"),
                                  str(bad), str(out)], capture_output=True, text=True,
                                 timeout=300)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr

    # runs over different facts (or base answers) are refused, not paired
    base = pd.read_json(other / "base_probe.jsonl", lines=True)
    base.loc[0, "mc_correct"] = not base.loc[0, "mc_correct"]
    base.to_json(other / "base_probe.jsonl", orient="records", lines=True)
    refused = subprocess.run([sys.executable, str(ROOT / "experiments/pair_runs.py"),
                              str(other), str(out)], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "not comparable" in refused.stderr


def test_bad_arguments_are_named_before_any_work(tmp_path):
    # Before: tracebacks (PipelineConfigError from the config, NotADirectoryError from --out
    # once the mixture was built); --batch 0 went on to the first generation.
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for args, message in [(["--out", str(a_file / "x")], f"--out: {a_file / 'x'} cannot be made"),
                          (["--batch", "0"], "--batch: must be >= 1, got 0"),
                          (["--scales", "0"], "mixture.scales: must be a list of positive"),
                          (["--methods", "nope"], "--methods: ['nope'] not in config.methods")]:
        done = subprocess.run([sys.executable, str(ROOT / "experiments/forgetting.py"),
                               "--out", str(tmp_path / "out"), *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_an_earlier_run_in_out_is_kept(tmp_path):
    # Before: a second run into the same --out rewrote config.json, data/ and
    # base_probe.jsonl, measured the base model and then stopped with a traceback when
    # training met the earlier run's method folder.
    out = tmp_path / "out"
    (out / "loramoe").mkdir(parents=True)
    (out / "report.md").write_text("earlier")
    done = subprocess.run([sys.executable, str(ROOT / "experiments/forgetting.py"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"--out: {out} already holds files (loramoe, report.md)" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["loramoe", "report.md"]
    assert (out / "report.md").read_text() == "earlier"
