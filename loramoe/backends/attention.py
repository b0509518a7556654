"""Attention for training in bf16 on a CPU: torch's fused SDPA, computed in fp32.

torch 2.13's CPU flash-attention *backward* is slow in bf16 at the short sequences this
product trains on: on a 2-core Xeon with AMX, a frozen-base train step of 16 × 64 tokens spent
422 ms of 1.67 s in it, against 67 ms for the same kernel in fp32, while the bf16 matmuls ran
3.2× faster than fp32's. Casting q, k, v to fp32 for the attention product alone (the
projections around it stay bf16) took 16–20 % off a whole trainer step of full SFT, LoRA
and LoRAMoE there (docs/benchmarks.md §7, benchmarks/bench_attention.py). The forward alone
is not slow in bf16, so evaluation and serving keep transformers' "sdpa".

It plugs in through transformers' AttentionInterface (with the sdpa mask), so the model's
code is untouched and `model.config._attn_implementation` names what ran.
"""

from __future__ import annotations

import torch

NAME = "loramoe_sdpa_fp32"


def sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa_attention_forward on fp32 copies of q, k, v (B, heads, T, D); the
    output goes back to the query's dtype. Autocast is off inside, or it would cast the
    fp32 copies straight back to bf16 (full SFT trains under bf16 autocast)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()  # additive masks must match the query dtype
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                              attention_mask, **kwargs)
    return out.to(query.dtype), weights


def register() -> None:
    """Make NAME a valid `attn_implementation` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_in_fp32)
    # without a mask function transformers passes no mask at all to a custom attention
    AttentionMaskInterface.register(NAME, sdpa_mask)


def needs_fp32_attention(compute_dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and compute_dtype == torch.bfloat16


def use_training_attention(model, compute_dtype: torch.dtype, device: torch.device) -> bool:
    """Switch `model` (a transformers model, or a PEFT wrapper of one) from "sdpa" to the fp32
    attention where training computes in bf16 on a CPU; True if it did. Other attention
    implementations (eager, flash on GPUs) are left as chosen."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if (not needs_fp32_attention(compute_dtype, device)
            or getattr(inner.config, "_attn_implementation", None) != "sdpa"):
        return False
    register()
    inner.set_attn_implementation(NAME)
    return True
