"""Methods × data scales on one model: train, evaluate, compare knowledge retention.

    python scripts/run_experiment.py configs/experiment.toml [--out outputs/experiment]

Builds the mixture, validates it (great-expectations), evaluates the base model once, then
for every (scale, method) trains on the same data for the same steps and evaluates with
retention against the base. Writes results.json, results.md and results.png into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import tomllib

from loramoe.data import MixtureConfig, build_mixture, write_mixture
from loramoe.evaluate import evaluate
from loramoe.train import TrainConfig, train


def run(config_path: Path, out: Path) -> list[dict]:
    spec = tomllib.loads(config_path.read_text())
    mixture = MixtureConfig.from_dict(spec["mixture"])
    data_dir = out / "data"
    write_mixture(build_mixture(mixture), mixture, data_dir)
    from validation import validate_mixture

    reports = validate_mixture(data_dir)
    for report in reports:
        print(report.summary())
    if not all(r.success for r in reports):
        raise SystemExit("data validation failed")
    eval_file = data_dir / "eval.jsonl"
    base_dir = out / "eval-base"
    if not (base_dir / "metrics.json").exists():
        evaluate(eval_file, base_dir, model=spec["train"]["model"], progress=False)
    rows = [{"method": "base", "scale": 0,
             **_row(json.loads((base_dir / "metrics.json").read_text()))}]
    for scale in mixture.scales:
        for name, method_spec in spec["methods"].items():
            run_dir = out / f"{name}-{scale}"
            config = TrainConfig.from_dict({**spec["train"], **method_spec,
                                            "train_file": str(data_dir / f"train_{scale}.jsonl"),
                                            "output_dir": str(run_dir)})
            start = time.perf_counter()
            result = train(config, progress=False)
            train_seconds = time.perf_counter() - start
            metrics = evaluate(eval_file, run_dir / "eval", run=run_dir, base_dir=base_dir,
                               progress=False)
            rows.append({"method": name, "scale": scale, "steps": result.steps,
                         "train_seconds": round(train_seconds, 1),
                         "tokens_per_s": round(result.tokens_per_second, 1), **_row(metrics)})
            print(json.dumps(rows[-1]), flush=True)
            (out / "results.json").write_text(json.dumps(rows, indent=2))
    return rows


def _row(metrics: dict) -> dict:
    row = {"knowledge_acc": metrics.get("knowledge_score"),
           "downstream_score": metrics.get("downstream_score")}
    if "retention" in metrics:
        row["retention"] = metrics["retention"]["overall"]
    if "router_type_weights" in metrics:
        weights = metrics["router_type_weights"]
        per_type: dict[str, list[float]] = {}
        for task, by_type in weights.items():
            kind = metrics["per_task"][task]["task_type"]
            per_type.setdefault(kind, []).append(by_type["knowledge"])
        row["router_knowledge_weight"] = {k: round(sum(v) / len(v), 4)
                                          for k, v in per_type.items()}
    return row


def write_report(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| method | scale | steps | knowledge acc | retention | downstream | "
             "router weight on knowledge experts (knowledge tasks / downstream tasks) | "
             "tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        router = r.get("router_knowledge_weight")
        router_text = (f"{router.get('knowledge', 0):.3f} / {router.get('downstream', 0):.3f}"
                       if router else "–")
        lines.append(
            f"| {r['method']} | {r['scale'] or '–'} | {r.get('steps', '–')} | "
            f"{r['knowledge_acc']:.3f} | {_fmt(r.get('retention'))} | "
            f"{r['downstream_score']:.3f} | {router_text} | {r.get('tokens_per_s', '–')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "base"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        scales = [r["scale"] for r in mine]
        axes[0].plot(scales, [r["retention"] for r in mine], marker="o", label=method)
        axes[1].plot(scales, [r["downstream_score"] for r in mine], marker="o", label=method)
    base = next(r for r in rows if r["method"] == "base")
    axes[1].axhline(base["downstream_score"], color="grey", linestyle="--", label="base")
    axes[0].set(title="Knowledge retention (share of base-known facts kept)",
                xlabel="training examples", ylabel="retention", xscale="log")
    axes[1].set(title="Downstream score (macro over tasks)", xlabel="training examples",
                ylabel="score", xscale="log")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)
    plt.close(fig)


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, default=Path("outputs/experiment"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(args.config, args.out)
    write_report(rows, args.out)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
