"""Does fine-tuning the default model make it forget what it knew as the data grow?

    python experiments/forgetting.py [--config flows/configs/forgetting.toml]
                                     [--out outputs/forgetting] [--methods sft,loramoe]
                                     [--scales 64,256,1024,4096]

The nested-prefix design of issue #15 item 4: one training run per method over the largest
scale, with a constant lr after the warm-up, and a snapshot of the model/adapter after the
optimizer steps that make up each smaller scale (examples seen = steps x batch size). What it
changes against the paper's one-run-per-scale design: every scale shares one run's data order
and its schedule has no decay at the end. Each snapshot and the base model go through the
likelihood probe on every held-out fact (each model under the same answer prefix, so answer
style does not count) and through generation on the downstream items. The report
(report.md, results.csv, retention.png in --out) is written after each method, so a run cut
short keeps what it measured: retention of the base-known facts with its Wilson interval,
overall and on relations never trained on, the mean change of their gold log-prob, the
downstream score, and exact McNemar tests on the same facts of each snapshot against the
method's first one, of consecutive snapshots and of every two methods at one scale
(paired.csv).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]

from forgetting_report import write_report  # noqa: E402  (experiments/, beside this file)

from loramoe.data import build_mixture, write_mixture  # noqa: E402
from loramoe.data.records import read_records, write_records  # noqa: E402
from loramoe.evaluate.generation import generate_predictions  # noqa: E402
from loramoe.evaluate.probe import probe_facts, probe_retention  # noqa: E402
from loramoe.evaluate.run import load_for_eval  # noqa: E402
from loramoe.evaluate.scoring import score_predictions  # noqa: E402
from loramoe.evaluate.stats import stratified_bootstrap  # noqa: E402
from loramoe.folders import folder_problem  # noqa: E402
from loramoe.pipeline import PipelineConfig  # noqa: E402
from loramoe.pipeline.config import PipelineConfigError  # noqa: E402
from loramoe.pipeline.paired import paired_kept, paired_on  # noqa: E402
from loramoe.pipeline.precheck import check_config  # noqa: E402
from loramoe.pipeline.report import score_columns  # noqa: E402
from loramoe.train import train  # noqa: E402


def measure(model_name: str | None, run: Path | None, facts: pd.DataFrame,
            downstream: pd.DataFrame, batch: int) -> tuple[pd.DataFrame, dict]:
    """(probe of every fact, downstream macro score with its bootstrap interval)."""
    model, tokenizer, _ = load_for_eval(model=model_name, run=run)
    probe = probe_facts(model, tokenizer, facts, batch_size=64)
    scored = score_predictions(downstream, generate_predictions(model, tokenizer, downstream,
                                                                batch))
    score = stratified_bootstrap(scored["score"], scored["task"])
    return probe, {"downstream_score": score["value"], "downstream_score_ci": score["ci"]}


def retention_columns(kept: dict, scores: dict) -> dict:
    """The pipeline's result columns (value, _lo, _hi) for one snapshot's probe retention and
    downstream score, and the kept count."""
    return {**score_columns({"probe_retention": kept, **scores}), "kept": kept["kept"]}


def versus_first(rows: list[dict], kept: list[dict]) -> None:
    """Each snapshot vs the method's first, on the base-known facts (exact McNemar; the
    difference's 95% interval by Newcombe)."""
    first = {"metrics": {"probe_retention": kept[0]}}
    for index, (row, now) in enumerate(zip(rows, kept, strict=True)):
        test = paired_kept({"metrics": {"probe_retention": now}}, first, "probe_retention")
        row["vs_first_diff"], row["vs_first_p"] = test["diff"], test["p"]
        # the first is the reference: no interval for it against itself
        row["vs_first_diff_lo"], row["vs_first_diff_hi"] = (test["ci"] if index and test["ci"]
                                                            else (None, None))
        row["vs_first_lost"], row["vs_first_regained"] = test["only_b"], test["only_a"]


def loss_at(run_dir: Path, step: int, window: int = 4) -> float:
    """The mean training lm loss of the `window` steps up to `step`."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    near = [r["lm_loss"] for r in rows if step - window < r["step"] <= step]
    return sum(near) / len(near)


def as_branches(name: str, scales: list[int], kept: list[dict]) -> list[dict]:
    """One snapshot per scale in the shape the pipeline's paired comparisons read."""
    return [{"name": f"{name}-{scale}", "method_name": name, "scale": scale,
             "metrics": {"probe_retention": now}} for scale, now in zip(scales, kept, strict=True)]


def run_method(name: str, config: PipelineConfig, data: Path, out: Path, facts, downstream,
               base_probe, args) -> tuple[list[dict], list[dict]]:
    """Train one method over the largest scale with snapshots, measure every snapshot:
    (result rows, the snapshots as branches for the paired comparisons)."""
    scales = config.mixture.scales
    method = config.train_config({"method": name}, data / f"train_{scales[-1]}.jsonl", out / name)
    per_step = method.batch_size * method.grad_accum
    steps = [math.ceil(scale / per_step) for scale in scales]
    method = replace(method, snapshot_steps=steps, max_steps=steps[-1])
    started = time.perf_counter()
    train(method, progress=False)
    train_s = time.perf_counter() - started
    rows, kept = [], []
    for scale, step in zip(scales, steps, strict=True):
        snapshot = out / name / "snapshots" / f"step-{step:05d}"
        probe, scores = measure(None, snapshot, facts, downstream, args.batch)
        write_records(probe, snapshot / "probe.jsonl")
        kept.append(probe_retention(base_probe, probe, facts, config.untrained_tasks))
        rows.append({"method": name, "lr": method.lr, "scale": scale, "steps": step,
                     "train_loss": loss_at(out / name, step),
                     **retention_columns(kept[-1], scores)})
        print(f"[{name}] scale {scale}: retention {kept[-1]['overall']:.3f}", flush=True)
    versus_first(rows, kept)
    for row in rows:
        row["train_seconds"] = round(train_s)
    return rows, as_branches(name, scales, kept)


def earlier_run(out: Path) -> str:
    """Why `out` would lose an earlier run's results ('' if it would not): a second run
    there rewrote its config.json, data and base probe and then stopped in training on the
    earlier run's folders."""
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held:
        return ""
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    return f"{out} already holds files ({shown}); choose an empty or new folder"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "flows/configs/forgetting.toml"))
    parser.add_argument("--out", default=str(ROOT / "outputs/forgetting"))
    parser.add_argument("--methods", default="", help="comma-separated subset of [methods]")
    parser.add_argument("--batch", type=int, default=16, help="generation batch size")
    parser.add_argument("--scales", default="", help="comma-separated, replaces the config's")
    args = parser.parse_args()
    if problem := folder_problem(args.out) or earlier_run(Path(args.out)):
        parser.error(f"--out: {problem}")
    if args.batch < 1:
        parser.error(f"--batch: must be >= 1, got {args.batch}")
    path = Path(args.config)
    try:  # the run's own methods and scales, so the report's setup lists what was run
        config = check_config(path, path.parent, {"scales": args.scales,
                                                  "methods": args.methods})
    except PipelineConfigError as err:
        parser.error(f"config {path}: {err}")
    out = Path(args.out)
    data = write_mixture(build_mixture(config.mixture), config.mixture, out / "data")
    frame = read_records(data / "eval.jsonl")
    facts = frame[frame["task_type"] == "knowledge"].reset_index(drop=True)
    downstream = frame[frame["task_type"] != "knowledge"].reset_index(drop=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    base_probe, base_scores = measure(config.base_model, None, facts, downstream, args.batch)
    write_records(base_probe, out / "base_probe.jsonl")
    rows = [{"method": "base", "scale": 0, "steps": 0, **score_columns(base_scores),
             "probe_base_known": int(base_probe["mc_correct"].sum()),
             "facts": len(base_probe)}]
    branches: list[dict] = []
    for name in config.methods:
        method_rows, method_branches = run_method(name, config, data, out, facts, downstream,
                                                  base_probe, args)
        rows, branches = rows + method_rows, branches + method_branches
        # every two methods at one scale, each method's consecutive scales (exact McNemar,
        # Holm-adjusted as one family)
        paired = paired_on(branches, "probe_retention")
        write_report(pd.DataFrame(rows), paired, config, out, " ".join(sys.argv))


if __name__ == "__main__":
    main()
