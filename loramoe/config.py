"""LoRAMoE configuration: one typed, self-validating dataclass."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from loramoe.fields import check_fields, from_mapping

# FFN linears per architecture (model.config.model_type). A target matches a module whose
# qualified name equals it or ends with "." + target, so "mlp.c_proj" picks GPT-2's FFN
# projection and not the attention's c_proj.
FFN_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("gate_proj", "up_proj", "down_proj"),
    "mistral": ("gate_proj", "up_proj", "down_proj"),
    "mixtral": ("w1", "w2", "w3"),
    "qwen2": ("gate_proj", "up_proj", "down_proj"),
    "qwen3": ("gate_proj", "up_proj", "down_proj"),
    "gemma": ("gate_proj", "up_proj", "down_proj"),
    "gemma2": ("gate_proj", "up_proj", "down_proj"),
    "olmo": ("gate_proj", "up_proj", "down_proj"),
    "olmo2": ("gate_proj", "up_proj", "down_proj"),
    "granite": ("gate_proj", "up_proj", "down_proj"),
    "phi3": ("gate_up_proj", "down_proj"),
    "gpt2": ("mlp.c_fc", "mlp.c_proj"),
    "starcoder2": ("mlp.c_fc", "mlp.c_proj"),
    "gpt_bigcode": ("mlp.c_fc", "mlp.c_proj"),
    "gpt_neox": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "falcon": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "bloom": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "gptj": ("mlp.fc_in", "mlp.fc_out"),
    "opt": ("fc1", "fc2"),
    "phi": ("fc1", "fc2"),
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _fail(field_name: str, message: str) -> None:
    raise ConfigError(f"LoRAMoEConfig.{field_name}: {message}")


@dataclass
class LoRAMoEConfig:
    """Hyper-parameters of the LoRAMoE plugin. Defaults are the paper's (Dou et al., 2023).

    expert_types is ordered: with {"knowledge": 3, "downstream": 3} experts 0..2 are of type 0
    ("knowledge") and 3..5 of type 1 ("downstream"). Sample task types index the same names.
    The number of experts is their sum (`num_experts`), stated nowhere else.
    """

    rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    expert_types: dict[str, int] = field(
        default_factory=lambda: {"knowledge": 3, "downstream": 3}
    )
    lbc_delta: float = 0.1
    lbc_beta: float = 0.1
    # "paper": Z = I∘Q as published (its minimum gives own-type experts LESS weight);
    # "aligned": Z = Q⊘I (own-type experts get (1+δ)/(1−δ) times the others), see loss.py
    lbc_form: str = "paper"
    lbc_load: str = "sum"  # Q per sample: "sum" over its tokens (paper) or "mean"
    top_k: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.expert_types, dict):
            self.expert_types = dict(self.expert_types)
        self._validate()

    def _validate(self) -> None:
        counts = self.expert_types.values() if isinstance(self.expert_types, dict) else [None]
        n = sum(counts) if all(isinstance(c, int) for c in counts) else None  # checked below
        check_fields(self, [
            ("rank", lambda v: v >= 1, "an integer >= 1"),
            ("alpha", lambda v: v > 0, "> 0"),
            ("dropout", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
            ("target_modules", lambda v: v is None or (v and all(v)),
             "None or non-empty module names"),
            ("expert_types", bool, "at least one type, e.g. {'knowledge': 3, 'downstream': 3}"),
            ("expert_types", lambda v: all(c >= 1 for c in v.values()),
             "counts >= 1 for every type"),
            ("lbc_delta", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
            ("lbc_beta", lambda v: v >= 0, ">= 0 (0 disables the LBC)"),
            ("lbc_form", lambda v: v in ("paper", "aligned"), "'paper' or 'aligned'"),
            ("lbc_load", lambda v: v in ("sum", "mean"), "'sum' or 'mean'"),
            ("lbc_delta", lambda v: self.lbc_form != "aligned" or v < 1,
             "< 1 with lbc_form = 'aligned' (it divides by 1 - delta)"),
            ("top_k", lambda v: v is None or 1 <= v <= n,
             f"None (dense) or an integer in [1, num_experts={n}]"),
        ], ConfigError)

    @property
    def num_experts(self) -> int:
        return sum(self.expert_types.values())

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def type_names(self) -> list[str]:
        return list(self.expert_types)

    def expert_type_ids(self) -> list[int]:
        """Type index of every expert, e.g. [0, 0, 0, 1, 1, 1]."""
        return [i for i, count in enumerate(self.expert_types.values()) for _ in range(count)]

    def type_index(self, type_name: str) -> int:
        try:
            return self.type_names.index(type_name)
        except ValueError:
            raise ConfigError(
                f"task type {type_name!r} is not one of expert_types {self.type_names}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAMoEConfig:
        """From a table; an old `num_experts` key (adapters of 0.1.0) must equal the sum."""
        data = dict(data) if isinstance(data, dict) else data
        legacy = data.pop("num_experts", None) if isinstance(data, dict) else None
        config = from_mapping(cls, data, ConfigError)
        if legacy is not None and legacy != config.num_experts:
            _fail("num_experts", f"{legacy!r} disagrees with expert_types "
                  f"{config.expert_types} (sum {config.num_experts}); the number of experts "
                  "is the sum of expert_types, drop num_experts")
        return config

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def default_targets(model_type: str | None) -> tuple[str, ...] | None:
    return FFN_TARGETS.get(model_type or "")
