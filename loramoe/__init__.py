"""loramoe: LoRAMoE (Dou et al., 2023) as a plugin for stock Hugging Face models."""

__version__ = "0.1.0"

from loramoe.adapter import AdapterError, load_adapter, save_adapter
from loramoe.config import ConfigError, LoRAMoEConfig
from loramoe.injection import (
    apply_loramoe,
    clear_router_probs,
    collect_router_probs,
    parameter_summary,
)
from loramoe.loss import balance_loss, localized_balancing_loss, router_cv
from loramoe.model import DEFAULT_MODEL, load_base_model

__all__ = [
    "DEFAULT_MODEL",
    "AdapterError",
    "ConfigError",
    "LoRAMoEConfig",
    "apply_loramoe",
    "balance_loss",
    "clear_router_probs",
    "collect_router_probs",
    "load_adapter",
    "load_base_model",
    "localized_balancing_loss",
    "parameter_summary",
    "router_cv",
    "save_adapter",
]
