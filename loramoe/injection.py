"""Put LoRAMoE layers into a stock Hugging Face model, freeze the rest, read the routers."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from loramoe.config import ConfigError, LoRAMoEConfig, default_targets
from loramoe.layer import ADAPTER_PARAM_NAMES, LoRAMoELinear, is_supported_base

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParameterSummary:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.percent:.4f}"
        )


def parameter_summary(model: nn.Module) -> ParameterSummary:
    params = list(model.parameters())
    return ParameterSummary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )


def resolve_targets(model: nn.Module, config: LoRAMoEConfig) -> list[str]:
    """The target patterns: the config's, or the FFN linears of the model's architecture."""
    if config.target_modules is not None:
        return list(config.target_modules)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = default_targets(model_type)
    if targets is None:
        raise ConfigError(
            f"LoRAMoEConfig.target_modules: no default FFN targets for model_type "
            f"{model_type!r}; set target_modules explicitly. Linear layers in this model: "
            f"{_linear_suffixes(model)}"
        )
    return list(targets)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _linear_suffixes(model: nn.Module) -> list[str]:
    """Distinct 'parent.child' names of supported layers, for error messages."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if is_supported_base(module):
            seen[".".join(name.split(".")[-2:])] = None
    return list(seen)


def find_target_modules(model: nn.Module, config: LoRAMoEConfig) -> list[str]:
    """Qualified names of the layers apply_loramoe would wrap, in module order."""
    targets = resolve_targets(model, config)
    names = [
        name
        for name, module in model.named_modules()
        if is_supported_base(module)
        and not _inside_loramoe(model, name)
        and any(_matches(name, t) for t in targets)
    ]
    if not names:
        raise ConfigError(
            f"LoRAMoEConfig.target_modules: {targets} match no nn.Linear/Conv1D module. "
            f"Modules seen: {_linear_suffixes(model)}"
        )
    # a name the user listed that matches nothing is a typo, not a choice: the others would
    # otherwise be adapted alone, silently
    supported = [name for name, module in model.named_modules() if is_supported_base(module)]
    unmatched = [t for t in config.target_modules or []
                 if not any(_matches(name, t) for name in supported)]
    if unmatched:
        raise ConfigError(
            f"LoRAMoEConfig.target_modules: {unmatched} match no nn.Linear/Conv1D module "
            f"(of {targets}). Modules seen: {_linear_suffixes(model)}"
        )
    return names


def _inside_loramoe(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part)
        if isinstance(module, LoRAMoELinear):
            return True
    return False


def loramoe_layers(model: nn.Module) -> list[tuple[str, LoRAMoELinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAMoELinear)]


def apply_loramoe(
    model: nn.Module, config: LoRAMoEConfig | None = None, *, backend: str = "auto",
    verbose: bool = False,
) -> nn.Module:
    """Wrap the target layers of ``model`` in place; only experts and routers stay trainable.

    backend: "auto" or "formula", see loramoe.backends (the same numbers either way).
    Returns the same model, with ``model.loramoe_config`` set. Logs the parameter summary
    (prints it with verbose=True); ``parameter_summary(model)`` returns it.
    """
    from loramoe.backends import select_backend  # the layer itself never imports a backend

    config = config or LoRAMoEConfig()
    accelerate = select_backend(backend)
    if loramoe_layers(model):
        raise ValueError("model already has LoRAMoE layers; load or apply an adapter only once")
    names = find_target_modules(model, config)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        # New modules start in training mode; follow the base layer's mode instead, or an
        # eval-mode model would silently run expert dropout.
        layer = LoRAMoELinear(base, config).train(base.training)
        layer.backend = accelerate
        setattr(parent, child, layer)
    # Freeze by module type: everything except the adapters' own parameters.
    for _, layer in loramoe_layers(model):
        for param_name in ADAPTER_PARAM_NAMES:
            getattr(layer, param_name).requires_grad_(True)
    model.loramoe_config = config
    summary = parameter_summary(model)
    logger.info("LoRAMoE on %d layers: %s", len(names), summary)
    if verbose:
        print(f"LoRAMoE on {len(names)} layers: {summary}")
    return model


def collect_router_probs(model: nn.Module) -> list[torch.Tensor]:
    """Router probabilities of the last forward, one (B, T, N) tensor per layer, module order.

    During training they keep their autograd graph, so a loss on them trains the routers.
    """
    probs = []
    for name, layer in loramoe_layers(model):
        if layer.router_probs is None:
            raise RuntimeError(f"LoRAMoE layer {name!r} has not run a forward pass yet")
        probs.append(layer.router_probs)
    return probs


def clear_router_probs(model: nn.Module) -> None:
    """Drop the stored probabilities (and the graph they hold) e.g. before evaluation."""
    for _, layer in loramoe_layers(model):
        layer.router_probs = None


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing that keeps the LBC trainable.

    Non-reentrant checkpointing is required: the reentrant variant runs the forward under
    no_grad, so the router probabilities the LBC reads would carry no graph.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
