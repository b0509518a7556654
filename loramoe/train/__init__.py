"""Training: config, builders (model, tokenizer, optimizer, data), the loop, checkpoints.

    python -m loramoe.train --config FILE.toml [--set key=value ...] [--resume]
"""

from __future__ import annotations

from loramoe.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "loramoe.train.builders": ["build_model", "build_training"],
    "loramoe.train.checkpoints": ["TrainingDiverged"],
    "loramoe.train.config": ["TrainConfig", "TrainConfigError"],
    "loramoe.train.loop": ["JsonlSink", "MetricsSink", "TrainResult", "train"],
})
