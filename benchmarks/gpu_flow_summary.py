"""Where a flow run's branches trained and its champion was scored, read back from MLflow.

    python benchmarks/gpu_flow_summary.py [--experiment loramoe-gpu-smoke] [--device cuda]

Run after `python flows/full_pipeline.py --config config benchmarks/configs/gpu_smoke.toml run`
(benchmarks/gpu_check.sh does both): one line per branch run of the latest parent run (its
`train_device` tag, the trainer's accelerator device), the GPUs or CPUs they trained on
(`train_hardware`), where the base model was scored (the parent run's `base_eval_settings`)
and the registered champion's `eval_settings` (the device its scores were computed on). Exits
1 unless every branch that trained did so on --device and the base and the champion were
scored there.

    python benchmarks/gpu_flow_summary.py --missing

prints the packages of benchmarks/gpu_requirements_flow.txt that are not installed (none:
the flow can run), any version counting as installed, as benchmarks/gpu_install.sh counts.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

FLOW_REQUIREMENTS = Path(__file__).with_name("gpu_requirements_flow.txt")


def missing_packages() -> list[str]:
    names = [line.split("==")[0] for line in FLOW_REQUIREMENTS.read_text().splitlines()
             if line and not line.startswith("#")]
    missing = []
    for name in names:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="loramoe-gpu-smoke")
    parser.add_argument("--model", default="loramoe-gpu-smoke", help="registered model name")
    parser.add_argument("--device", default="cuda", help="where everything should have run")
    parser.add_argument("--missing", action="store_true",
                        help="only list the flow's packages that are not installed")
    args = parser.parse_args()
    if args.missing:
        print(*missing_packages())
        return 0
    import mlflow

    client = mlflow.MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"no experiment {args.experiment!r} at {args.tracking_uri}: did the flow run?")
        return 1
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    wrong = []
    print(f"  {'branch':<12} {'status':<9} {'trained on':<10} {'knowledge':>9} {'downstream':>10}")
    for child in sorted(children, key=lambda r: r.info.run_name):
        device, metrics = child.data.tags.get("train_device", "-"), child.data.metrics
        if device != "-" and device != args.device:
            wrong.append(f"{child.info.run_name} trained on {device}")
        print(f"  {child.info.run_name:<12} {child.info.status:<9} {device:<10} "
              f"{metrics.get('knowledge_score', float('nan')):>9.3f} "
              f"{metrics.get('downstream_score', float('nan')):>10.3f}")
    if not any(c.data.tags.get("train_device") for c in children):
        wrong.append("no branch recorded where it trained")
    hardware = sorted({c.data.tags["train_hardware"] for c in children
                       if "train_hardware" in c.data.tags})
    print(f"  trained on: {'; '.join(hardware) or '-'}")
    base = json.loads(parent.data.tags.get("base_eval_settings", "{}"))
    print(f"  base model scored with {base or '-'}")
    if base.get("device") != args.device:
        wrong.append(f"the base was scored on {base.get('device', 'an unrecorded device')}")
    champion = client.get_model_version_by_alias(args.model, "champion")
    settings = json.loads(champion.tags["eval_settings"])
    print(f"  champion: {args.model} v{champion.version}, scored with {settings}; decision: "
          f"{parent.data.tags.get('champion_decision', '-')}")
    if settings["device"] != args.device:
        wrong.append(f"the champion was scored on {settings['device']}")
    print("  " + ("; ".join(wrong) if wrong else f"every step ran on {args.device}"))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
