"""loramoe: LoRAMoE (Dou et al., 2023) as a plugin for stock Hugging Face models."""

from __future__ import annotations

from loramoe.lazy import lazy_exports

__version__ = "0.1.0"

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "loramoe.adapter": ["AdapterError", "load_adapter", "save_adapter"],
    "loramoe.config": ["ConfigError", "LoRAMoEConfig"],
    "loramoe.injection": ["apply_loramoe", "clear_router_probs", "collect_router_probs",
                          "parameter_summary"],
    "loramoe.loss": ["balance_loss", "localized_balancing_loss", "router_cv"],
    "loramoe.model": ["DEFAULT_MODEL", "load_base_model"],
})
