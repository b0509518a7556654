"""The trainer's config: one typed dataclass, validated field by field when it is built."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import tomllib

from loramoe.config import ConfigError, LoRAMoEConfig
from loramoe.fields import check_fields, from_mapping, problems_of

Method = Literal["sft", "lora", "loramoe"]
DEFAULT_LR = {"sft": 2e-5, "lora": 2e-4, "loramoe": 2e-4}


class TrainConfigError(ValueError):
    """A training config value is invalid; the message names the field."""


@dataclass
class TrainConfig:
    method: Method = "loramoe"
    model: str = "smollm2-135m-instruct"
    train_file: str = ""
    output_dir: str = "outputs/train"
    lr: float | None = None  # None: 2e-5 for sft, 2e-4 for lora/loramoe (the paper's)
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None  # optimizer steps; None: run `epochs`
    epochs: float = 1.0
    warmup_ratio: float = 0.03
    # after the warm-up: "cosine" decays to 0 at the last step; "constant" holds the lr, so a
    # snapshot after s steps is what an s-step run would give (nested-prefix scale design)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.0
    seed: int = 0
    max_length: int = 256
    gradient_checkpointing: bool = False
    # on one process, run each batch in two pieces of similar length (train/pieces.py): the
    # same samples and gradient with less padding (a default-model train step 15-26 % shorter
    # in fp32 on a CPU; in bf16 on an AMX CPU 5 % for LoRAMoE, 18 % for LoRA, none for full
    # SFT: benchmarks/bench_length_pieces.py, docs/benchmarks.md §6)
    split_by_length: bool = True
    # frozen weights stored in this dtype (adapters and routers stay fp32); "auto": bf16
    # where the hardware multiplies it natively, else fp32 (loramoe/precision.py)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    # keep the newest N checkpoints, removing older ones after each save (0: keep all; a 7B
    # full-SFT checkpoint holds ~80 GB of optimizer state)
    keep_checkpoints: int = 0
    # also write the model/adapter after these optimizer steps, each in
    # output_dir/snapshots/step-NNNNN/ (a folder `python -m loramoe.evaluate --run` reads)
    snapshot_steps: list[int] = field(default_factory=list)
    log_every: int = 1
    # LoRAMoE (method="loramoe"); lbc_beta=0 is the no-LBC ablation
    loramoe: LoRAMoEConfig = field(default_factory=LoRAMoEConfig)
    # the routers' lr is lr × this (1: one lr for all, as in the paper). AdamW moves each
    # parameter by ~lr a step whatever the loss weight, so a larger LBC β cannot move the
    # routers faster; this can (docs/router_lr.md)
    router_lr_scale: float = 1.0
    # single LoRA (method="lora"), on the same target modules
    lora_rank: int = 4
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05

    # task types trained with no LBC term on purpose (their samples match no expert type);
    # any other type the experts do not know is an error, not a silently untyped sample
    untyped_task_types: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        found = {}  # the nested table's problems, reported with this level's
        if isinstance(self.loramoe, dict):
            try:
                self.loramoe = LoRAMoEConfig.from_dict(self.loramoe)
            except ConfigError as err:
                found["loramoe"] = [f"TrainConfig.loramoe: {p}" for p in problems_of(err)]
        expert_types = self.loramoe.type_names if isinstance(self.loramoe, LoRAMoEConfig) else []
        check_fields(self, [
            ("model", bool, "a model name, hub id or folder"),
            ("lr", lambda v: v is None or v > 0, "> 0 (or unset for the method default)"),
            ("batch_size", lambda v: v >= 1, ">= 1"),
            ("grad_accum", lambda v: v >= 1, ">= 1"),
            ("max_steps", lambda v: v is None or v >= 1, ">= 1 or unset"),
            ("epochs", lambda v: v > 0, "> 0"),
            ("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("weight_decay", lambda v: v >= 0, ">= 0"),
            ("max_length", lambda v: v >= 8, ">= 8"),
            ("save_every", lambda v: v >= 0, ">= 0"),
            ("keep_checkpoints", lambda v: v >= 0, ">= 0 (0: keep every checkpoint)"),
            ("snapshot_steps", lambda v: all(isinstance(s, int) and s >= 1 for s in v),
             "a list of optimizer steps >= 1"),
            ("snapshot_steps", lambda v: not isinstance(self.max_steps, int)
             or all(s <= self.max_steps for s in v if isinstance(s, int)),
             f"steps <= max_steps ({self.max_steps})"),
            ("log_every", lambda v: v >= 1, ">= 1"),
            ("router_lr_scale", lambda v: v > 0, "> 0"),
            ("router_lr_scale", lambda v: v == 1 or self.method == "loramoe",
             f"1 for method {self.method!r} (only LoRAMoE has routers)"),
            ("lora_rank", lambda v: v >= 1, ">= 1"),
            ("lora_alpha", lambda v: v > 0, "> 0"),
            ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("untyped_task_types", lambda v: not set(v) & set(expert_types),
             f"task types that are not expert types {expert_types}"),
        ], TrainConfigError, found=found)
        self.snapshot_steps = sorted(set(self.snapshot_steps))
        if self.lr is None:  # resolved once, so the saved config holds the lr that was used
            self.lr = DEFAULT_LR[self.method]

    @property
    def learning_rate(self) -> float:
        return self.lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_mapping(cls, data, TrainConfigError)

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"--config: {path} " + ("is a folder, not a config file"
                                                          if path.is_dir() else "does not exist"))
        text = path.read_text()
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except ValueError as err:
            kind = "TOML" if path.suffix == ".toml" else "JSON"
            raise TrainConfigError(f"--config: {path} is not valid {kind}: {err}") from None
        data = data.get("train", data)
        for item in overrides or []:
            key, equals, raw = item.partition("=")
            if not equals or not key:
                raise TrainConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. "
                                       "--set loramoe.lbc_beta=0")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            target = data
            *parents, leaf = key.split(".")
            for parent in parents:
                target = target.setdefault(parent, {})
            target[leaf] = value
        return cls.from_dict(data)


# A run folder (python -m loramoe.train, a pipeline branch) holds this file beside its
# adapter/ or model/: the config it was trained with, what evaluation and serving load from.
RUN_CONFIG = "train_config.json"


def run_part(method: str) -> str:
    """The folder a run folder keeps its weights in: the whole model for full SFT, the
    adapter (LoRA or LoRAMoE) otherwise."""
    return "model" if method == "sft" else "adapter"


def write_run_config(folder: Path, config: TrainConfig) -> None:
    """The run's config in `folder`; an earlier, different one (a resume that changed the
    run's length or where it reads and writes) is kept as train_config.json.previous-K."""
    from loramoe.train.checkpoints import set_aside

    path, text = folder / RUN_CONFIG, json.dumps(config.to_dict(), indent=2)
    if path.is_file() and path.read_text() != text:
        set_aside(path)
    path.write_text(text)


def read_run_config(run: str | Path) -> dict[str, Any]:
    """The config a run folder was trained with, as a dict, read as it was written: not
    through TrainConfig, whose fields a run of another version may not match (an adapter in
    the Model Registry outlives the code that trained it). A clear error naming the file
    when it is missing, not a JSON object, or names no method (for an adapter: no base model)."""
    path = Path(run) / RUN_CONFIG
    if not path.is_file():
        raise TrainConfigError(f"{run}: no {RUN_CONFIG} there (a folder written by python "
                               "-m loramoe.train or a pipeline branch)")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise TrainConfigError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise TrainConfigError(f"{path}: a JSON object of TrainConfig fields, got "
                               f"{type(config).__name__}")
    method = config.get("method")
    if method not in get_args(Method):
        raise TrainConfigError(f"{path}: method must be one of {list(get_args(Method))}, got "
                               f"{method!r}")
    if method != "sft" and not (isinstance(config.get("model"), str) and config["model"]):
        raise TrainConfigError(f"{path}: model must name the base model the {method} adapter "
                               f"was trained on, got {config.get('model')!r}")
    return config


def check_run_weights(run: str | Path, config: dict[str, Any]) -> None:
    """The weights a run folder must hold for its method, checked without loading a model:
    a LoRAMoE adapter's config and checksum (loramoe.adapter), a PEFT LoRA adapter's
    config and weights file, a full-SFT model's config and weights. AdapterError (a
    ValueError) naming the folder and what is wrong."""
    from loramoe.adapter import AdapterError, check_adapter_files

    part = Path(run) / run_part(config["method"])
    if config["method"] == "loramoe":
        check_adapter_files(part)
        return
    needs = {"lora": ("adapter_config.json", "adapter_model"), "sft": ("config.json", "model")}
    config_file, weights = needs[config["method"]]
    if not (part / config_file).is_file():
        raise AdapterError(f"{part / config_file} not found: {run} is not a complete "
                           f"{config['method']} run folder")
    try:
        json.loads((part / config_file).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterError(f"{part / config_file} is not valid JSON ({err}); the file is "
                           "corrupt") from None
    if not any(part.glob(f"{weights}*.safetensors")) and not any(part.glob(f"{weights}*.bin")):
        raise AdapterError(f"{part} holds no {weights}*.safetensors (or .bin) weights file")
