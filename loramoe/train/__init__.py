"""Training: config, builders (model, tokenizer, optimizer, data), the loop, checkpoints.

    python -m loramoe.train --config FILE.toml [--set key=value ...] [--resume]
"""

from loramoe.train.builders import build_model, build_training
from loramoe.train.checkpoints import TrainingDiverged
from loramoe.train.config import TrainConfig, TrainConfigError
from loramoe.train.loop import JsonlSink, MetricsSink, TrainResult, train

__all__ = [
    "JsonlSink", "MetricsSink", "TrainConfig", "TrainConfigError", "TrainResult",
    "TrainingDiverged", "build_model", "build_training", "train",
]
