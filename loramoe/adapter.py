"""Adapter files: router + expert weights as safetensors, plus loramoe_config.json.

The names are our own, so neither PEFT nor loramoe mistakes the other's folder for its
own: `load_adapter` on a PEFT folder says it is one, and PEFT finds no adapter_config.json
here. Adapters written by loramoe 0.1.0 (under PEFT's file names) still load.

Loading checks everything before touching the model (config, checksum, base fingerprint,
tensor names, shapes, finiteness), so a bad file fails with a clear error and no partial load.
No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loramoe.config import ConfigError, LoRAMoEConfig
from loramoe.digest import file_sha256
from loramoe.injection import apply_loramoe, find_target_modules, loramoe_layers
from loramoe.layer import ADAPTER_PARAM_NAMES, in_out_features

CONFIG_NAME = "loramoe_config.json"
WEIGHTS_NAME = "loramoe_adapter.safetensors"
LEGACY_CONFIG_NAME = "adapter_config.json"  # loramoe 0.1.0, and PEFT's name
FORMAT_VERSION = 1
_SAMPLES_PER_TENSOR = 512


class AdapterError(ValueError):
    """An adapter folder cannot be loaded onto this model; the message says why."""


def library_version() -> str:
    from loramoe import __version__

    return __version__


def _base_named_parameters(model: nn.Module, state: dict[str, torch.Tensor] | None = None
                           ) -> list[tuple[str, torch.Tensor]]:
    """Base-model parameters under their pre-injection names (".base_layer" removed), read
    from `state` (the model's full state dict) when given."""
    adapter_ids = {
        id(getattr(layer, p)) for _, layer in loramoe_layers(model) for p in ADAPTER_PARAM_NAMES
    }
    return sorted(
        (name.replace(".base_layer.", "."), param if state is None else state[name])
        for name, param in model.named_parameters()
        if id(param) not in adapter_ids
    )


def base_fingerprint(model: nn.Module, state: dict[str, torch.Tensor] | None = None
                     ) -> dict[str, Any]:
    """Architecture and weights digests that survive injection and a bf16/fp32 change.

    Weights: a strided sample of every base tensor rounded to bf16, so the same checkpoint
    loaded in fp32 or bf16 matches, and hashing a 7B model stays cheap.
    """
    params = _base_named_parameters(model, state)
    arch = hashlib.sha256()
    weights = hashlib.sha256()
    for name, param in params:
        arch.update(f"{name}:{tuple(param.shape)};".encode())
        weights.update(name.encode())
        if param.device.type == "meta":
            continue
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu", torch.bfloat16)
        weights.update(sample.view(torch.int16).numpy().tobytes())
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return {
        "model_type": model_type,
        "num_parameters": sum(p.numel() for _, p in params),
        "architecture_sha256": arch.hexdigest(),
        "weights_sha256": weights.hexdigest(),
    }


def _base_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name: str | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write only router + expert weights and the adapter config into ``directory``.

    `state_dict`: the model's full state, gathered by the caller where the parameters are
    shards (FSDP, ZeRO-3) that cannot be read as whole tensors; the model is then read only
    for its structure."""
    layers = loramoe_layers(model)
    if not layers:
        raise AdapterError("model has no LoRAMoE layers: call apply_loramoe first")
    config: LoRAMoEConfig = model.loramoe_config
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    def weight(name: str, layer: nn.Module, p: str) -> torch.Tensor:
        return getattr(layer, p) if state_dict is None else state_dict[f"{name}.{p}"]

    tensors = {
        f"{name}.{p}": weight(name, layer, p).detach().to("cpu").contiguous()
        for name, layer in layers
        for p in ADAPTER_PARAM_NAMES
    }
    weights_path = out / WEIGHTS_NAME
    _atomic_write(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    meta = {
        "format_version": FORMAT_VERSION,
        "library": "loramoe",
        "library_version": library_version(),
        "loramoe_config": config.to_dict(),
        "base_model": base_model_name or _base_name(model),
        "base_fingerprint": base_fingerprint(model, state_dict),
        "layers": [name for name, _ in layers],
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": file_sha256(weights_path),
    }
    _atomic_write(
        out / CONFIG_NAME,
        lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, sort_keys=True)),
    )
    return out


def adapter_config_path(directory: str | os.PathLike) -> Path:
    """The folder's LoRAMoE config file: ours, or a 0.1.0 one under PEFT's name."""
    directory = Path(directory)
    if (directory / CONFIG_NAME).is_file():
        return directory / CONFIG_NAME
    legacy = directory / LEGACY_CONFIG_NAME
    if not legacy.is_file():
        raise AdapterError(f"{directory / CONFIG_NAME} not found: not a LoRAMoE adapter folder")
    try:
        peft_type = json.loads(legacy.read_text()).get("peft_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        peft_type = None
    if peft_type:
        raise AdapterError(f"{directory} is a PEFT adapter (peft_type {peft_type}), not a "
                           f"LoRAMoE one: load it with peft.PeftModel.from_pretrained")
    return legacy


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed adapter config, with its LoRAMoEConfig validated."""
    path = adapter_config_path(directory)
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is not valid JSON ({err}); the file is corrupt") from None
    required = ("loramoe_config", "base_fingerprint", "layers", "weights_sha256")
    missing = [key for key in required if key not in meta]
    if missing:
        raise AdapterError(f"{path} lacks field(s) {missing}")
    try:
        meta["loramoe_config"] = LoRAMoEConfig.from_dict(meta["loramoe_config"])
    except (ConfigError, TypeError) as err:
        raise AdapterError(f"{path}: invalid loramoe_config: {err}") from None
    return meta


def _check_base(meta: dict[str, Any], model: nn.Module, path: Path) -> None:
    saved, current = meta["base_fingerprint"], base_fingerprint(model)
    trained_on = meta.get("base_model") or "an unnamed model"
    if saved.get("architecture_sha256") != current["architecture_sha256"]:
        raise AdapterError(
            f"{path}: adapter was trained on {trained_on} ({saved.get('model_type')}, "
            f"{saved.get('num_parameters'):,} params); this model's architecture differs "
            f"({current['model_type']}, {current['num_parameters']:,} params)"
        )
    if saved.get("weights_sha256") != current["weights_sha256"]:
        raise AdapterError(
            f"{path}: adapter was trained on {trained_on}; this model has the same architecture "
            f"but different weights. Pass check_base=False to load it anyway."
        )


def _expected_shapes(model: nn.Module, config: LoRAMoEConfig, names: list[str]
                     ) -> dict[str, tuple[int, ...]]:
    n, r = config.num_experts, config.rank
    shapes = {}
    for name in names:
        d_in, d_out = in_out_features(model.get_submodule(name))
        shapes[f"{name}.router_weight"] = (n, d_in)
        shapes[f"{name}.lora_A"] = (n, r, d_in)
        shapes[f"{name}.lora_B"] = (n, d_out, r)
    return shapes


def check_adapter_files(directory: str | os.PathLike) -> dict[str, Any]:
    """The folder's adapter config (validated) and weights file (present, with the checksum
    the config holds), checked without a model: what load_adapter checks first, cheap enough
    to run before a base model is loaded for it."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    path = directory / meta.get("weights_file", WEIGHTS_NAME)
    if not path.is_file():
        raise AdapterError(f"{path} not found")
    if file_sha256(path) != meta["weights_sha256"]:
        raise AdapterError(
            f"{path} does not match the checksum in its adapter config: the file is corrupt or "
            f"was replaced"
        )
    return meta


def _read_tensors(meta: dict[str, Any], directory: Path) -> dict[str, torch.Tensor]:
    path = directory / meta.get("weights_file", WEIGHTS_NAME)
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise AdapterError(f"{path} is not a readable safetensors file: {err}") from None


def _check_tensors(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                   path: Path) -> None:
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise AdapterError(
            f"{path}: tensors do not match this model's LoRAMoE layers; "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {extra[:5]}{'…' if len(extra) > 5 else ''} ({len(extra)})"
        )
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise AdapterError(
                f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {shape}"
            )
        if not torch.isfinite(tensors[key]).all():
            raise AdapterError(f"{path}: tensor {key} holds NaN or inf values")


def load_adapter(base_model: nn.Module, directory: str | os.PathLike, check_base: bool = True
                 ) -> nn.Module:
    """Rebuild the LoRAMoE plugin on ``base_model`` and load the saved weights strictly."""
    directory = Path(directory)
    meta = check_adapter_files(directory)
    config_path = adapter_config_path(directory)
    if loramoe_layers(base_model):
        raise AdapterError("model already has LoRAMoE layers; load an adapter onto a clean base")
    config: LoRAMoEConfig = meta["loramoe_config"]
    if check_base:
        _check_base(meta, base_model, config_path)
    try:
        names = find_target_modules(base_model, config)
    except ConfigError as err:
        raise AdapterError(f"{config_path}: {err}") from None
    if names != list(meta["layers"]):
        raise AdapterError(
            f"{config_path}: adapter layers {meta['layers'][:3]}… do not match this model's "
            f"target layers {names[:3]}…"
        )
    tensors = _read_tensors(meta, directory)
    _check_tensors(tensors, _expected_shapes(base_model, config, names),
                   directory / meta.get("weights_file", WEIGHTS_NAME))
    apply_loramoe(base_model, config)
    with torch.no_grad():
        for name, layer in loramoe_layers(base_model):
            for p in ADAPTER_PARAM_NAMES:
                getattr(layer, p).copy_(tensors[f"{name}.{p}"])
    return base_model
