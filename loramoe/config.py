"""LoRAMoE configuration: one typed, self-validating dataclass."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

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
    """

    num_experts: int = 6
    rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    expert_types: dict[str, int] = field(
        default_factory=lambda: {"knowledge": 3, "downstream": 3}
    )
    lbc_delta: float = 0.1
    lbc_beta: float = 0.1
    top_k: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
        self.expert_types = dict(self.expert_types)
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            _fail("num_experts", f"must be an integer >= 1, got {self.num_experts!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            _fail("rank", f"must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            _fail("alpha", f"must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            _fail("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None and (
            not self.target_modules
            or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            _fail("target_modules", f"must be None or non-empty module names, got "
                  f"{self.target_modules!r}")
        if not self.expert_types:
            _fail("expert_types", "needs at least one type, e.g. {'knowledge': 3, 'downstream': 3}")
        for name, count in self.expert_types.items():
            if not isinstance(count, int) or count < 1:
                _fail("expert_types", f"type {name!r} has count {count!r}; counts must be >= 1")
        total = sum(self.expert_types.values())
        if total != self.num_experts:
            _fail("expert_types", f"counts {self.expert_types} sum to {total}, but "
                  f"num_experts is {self.num_experts}")
        if not 0.0 <= self.lbc_delta <= 1.0:
            _fail("lbc_delta", f"must be in [0, 1], got {self.lbc_delta!r}")
        if self.lbc_beta < 0:
            _fail("lbc_beta", f"must be >= 0 (0 disables the LBC), got {self.lbc_beta!r}")
        if self.top_k is not None and not (
            isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts
        ):
            _fail("top_k", f"must be None (dense) or an integer in [1, num_experts="
                  f"{self.num_experts}], got {self.top_k!r}")

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"LoRAMoEConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def default_targets(model_type: str | None) -> tuple[str, ...] | None:
    return FFN_TARGETS.get(model_type or "")
