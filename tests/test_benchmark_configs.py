"""The pipeline configs the benchmarks time stay valid and do what docs/benchmarks.md says."""

from __future__ import annotations

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
