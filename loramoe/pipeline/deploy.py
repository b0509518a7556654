"""Compile the scheduled-retraining deployment to manifests, without touching a cluster.

    python -m loramoe.pipeline.deploy argo --config flows/configs/paper.toml --out outputs/deploy
    python -m loramoe.pipeline.deploy step-functions --config flows/configs/paper.toml --out ...

Metaflow compiles the flow itself (`argo-workflows create --only-json`, `step-functions
create --only-json`); both upload the flow's code package to the configured cloud datastore
first, so the METAFLOW_* datastore settings of the target cloud must be in the environment
(tests/test_deploy.py uses a loopback S3 server). `--only-json` prints the workflow but not
its schedule, which Metaflow otherwise sends straight to the cluster's API: written here as
the same CronWorkflow (Argo) or EventBridge rule (AWS) so that `kubectl apply -f` / GitOps can
deploy the schedule from files too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from loramoe.folders import folder_problem

FLOW = Path(__file__).resolve().parents[2] / "flows" / "full_pipeline.py"


class DeployCompileError(RuntimeError):
    """Metaflow could not compile the flow (its own message is kept)."""


def metaflow_json(target: str, config: Path, env: dict[str, str] | None = None) -> dict:
    """The workflow Metaflow compiles for `target` (argo-workflows | step-functions)."""
    decorator = {"argo-workflows": "kubernetes", "step-functions": "batch"}[target]
    done = subprocess.run(
        [sys.executable, str(FLOW), "--config", "config", str(config), "--with", decorator,
         target, "create", "--only-json"],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise DeployCompileError(f"{target} create --only-json failed for {config}:\n"
                                 f"{done.stderr[-4000:]}")
    return json.loads(done.stdout[done.stdout.index("{"):])


def argo_cron_workflow(template: dict) -> dict | None:
    """The CronWorkflow Metaflow would create for this template (argo_client.py
    schedule_workflow_template), from the schedule it annotates; None when unscheduled."""
    cron = json.loads(template["metadata"]["annotations"].get("metaflow/cron", "null") or "null")
    if not cron or not cron.get("schedule"):
        return None
    name = template["metadata"]["name"]
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "CronWorkflow",
        "metadata": {"name": name, "namespace": template["metadata"].get("namespace")},
        "spec": {"suspend": False, "schedule": cron["schedule"],
                 "timezone": cron.get("tz") or None,
                 "failedJobsHistoryLimit": 10000, "successfulJobsHistoryLimit": 10000,
                 "startingDeadlineSeconds": 3540,
                 "workflowSpec": {"workflowTemplateRef": {"name": name}}},
    }


def compile_argo(config: Path, out: Path, env: dict[str, str] | None = None) -> dict[str, Path]:
    """WorkflowTemplate (+ CronWorkflow when the flow is scheduled) as JSON files in `out`."""
    template = metaflow_json("argo-workflows", config, env)
    files = {"workflow_template": template, "cron_workflow": argo_cron_workflow(template)}
    return write_manifests(files, out)


def compile_step_functions(config: Path, out: Path,
                           env: dict[str, str] | None = None) -> dict[str, Path]:
    """State machine (+ the EventBridge rule's schedule expression) as JSON files in `out`."""
    machine = metaflow_json("step-functions", config, env)
    schedule = flow_schedule(config, env)
    rule = None if schedule is None else {"ScheduleExpression": f"cron({schedule})",
                                          "State": "ENABLED"}
    return write_manifests({"state_machine": machine, "eventbridge_rule": rule}, out)


def flow_schedule(config: Path, env: dict[str, str] | None = None) -> str | None:
    """The flow's @schedule as the AWS cron expression Metaflow gives EventBridge."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
            "from full_pipeline import LoRAMoEPipeline; from metaflow import FlowSpec; "
            "found = FlowSpec._flow_decorators.fget(LoRAMoEPipeline).get('schedule'); "
            # flow_init is where Metaflow turns weekly/daily/cron into the expression; it
            # reads only the decorator's own attributes
            "found and found[0].flow_init(*[None] * 8); "
            "print(json.dumps(found[0].schedule if found else None))")
    done = subprocess.run([sys.executable, "-c", code, str(FLOW.parent)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise DeployCompileError(f"reading the flow's @schedule failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_manifests(manifests: dict[str, dict | None], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, body in manifests.items():
        if body is not None:
            written[name] = out / f"{name}.json"
            written[name].write_text(json.dumps(body, indent=2))
    return written


def check_config(config: Path) -> None:
    """The config validated as the flow's start step will validate it, before Metaflow
    compiles anything (a deployed schedule with a broken config would fail at every run). A
    local model folder that is missing here is only warned about: it may exist on the
    workers only, whose start step checks it again."""
    from loramoe.pipeline.precheck import check_config as check

    check(config, base_dir=FLOW.parent / "configs", workers_elsewhere=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loramoe.pipeline.deploy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=["argo", "step-functions"])
    parser.add_argument("--config", type=Path, required=True, help="a flows/configs TOML")
    parser.add_argument("--out", type=Path, required=True, help="folder for the manifests")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"--config: no such file {args.config}")
    if problem := folder_problem(args.out):
        parser.error(f"--out: {problem}")
    try:
        check_config(args.config)
    except ValueError as err:
        parser.error(f"--config {args.config}: {err}")
    compile_ = compile_argo if args.target == "argo" else compile_step_functions
    try:
        written = compile_(args.config.resolve(), args.out)
    except DeployCompileError as err:  # Metaflow's own message, e.g. the datastore it needs
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
