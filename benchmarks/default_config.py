"""The pipeline's default config (flows/configs/default.toml), as the benchmarks read it."""

from __future__ import annotations

from pathlib import Path

import tomllib

from loramoe.pipeline import PipelineConfig

CONFIGS = Path(__file__).resolve().parents[1] / "flows" / "configs"


def default_pipeline() -> PipelineConfig:
    """The default config, its relative data paths resolved against flows/configs."""
    return PipelineConfig.from_dict(tomllib.loads((CONFIGS / "default.toml").read_text()),
                                    base_dir=CONFIGS)
