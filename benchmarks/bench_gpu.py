"""Train step on a GPU: LoRAMoE vs PEFT LoRA vs the frozen base, tokens/s and peak memory.

    python benchmarks/bench_gpu.py [--device cuda] [--models smollm2-135m,llama-1b]
                                   [--batch 8] [--seq 1024] [--repeats 10]

Models are built from configs with random weights (a SmolLM2-135M-shaped and a ~1B
Llama-shaped one, TinyLlama's shape), frozen weights in bf16 (fp32 where the device has no
bf16), adapters fp32, FFN targets, forward + backward + AdamW (the LoRAMoE step with the
LBC). Variants run interleaved; peak memory is torch.cuda.max_memory_allocated per variant
(model, optimizer state and activations of one step). Imports only torch, transformers,
peft and loramoe's core, as the bare GPU machine has nothing else.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from train_step import make_step
from transformers import LlamaConfig, LlamaForCausalLM

from loramoe import LoRAMoEConfig, apply_loramoe
from loramoe.precision import resolve_dtype

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                     num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),  # a check of the script
}
FFN = ["gate_proj", "up_proj", "down_proj"]
VARIANTS = ("frozen base", "PEFT LoRA r=4", "LoRAMoE N=6 r=4")


def build(shape: str, variant: str, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    model = LlamaForCausalLM(config).to(device, dtype)
    if variant == "frozen base":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif variant.startswith("PEFT"):
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules=FFN, task_type="CAUSAL_LM"))
    else:
        apply_loramoe(model, LoRAMoEConfig(target_modules=FFN))
    return model.train()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(shape: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    """{variant: (ms per step, peak GiB)}: one variant alive at a time, for honest peaks."""
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (args.batch, args.seq), device=device)
    results = {}
    for variant in VARIANTS:
        model = build(shape, variant, device, dtype)
        step = make_step(model, ids, variant.startswith("LoRAMoE"))
        step()  # warm-up
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        results[variant] = (1000 * statistics.median(times), peak)
        del model, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="smollm2-135m,llama-1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = resolve_dtype("auto", device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"Train step on {name}, frozen weights {dtype}, batch {args.batch} x {args.seq}, "
          f"torch {torch.__version__}, median of {args.repeats}")
    print(f"  {'model':<14} {'variant':<17} {'ms/step':>9} {'tokens/s':>10} {'peak GiB':>9}")
    for shape in args.models.split(","):
        results = measure(shape, args, device, dtype)
        for variant, (ms, peak) in results.items():
            print(f"  {shape:<14} {variant:<17} {ms:9.1f} "
                  f"{args.batch * args.seq / ms * 1000:10.0f} {peak:9.2f}")
        moe, lora, base = (results[v] for v in ("LoRAMoE N=6 r=4", "PEFT LoRA r=4",
                                                 "frozen base"))
        memory = f", memory {moe[1] / lora[1]:.3f}x (target <= 1.10x)" if lora[1] else ""
        print(f"  {shape:<14} LoRAMoE / PEFT LoRA: time {moe[0] / lora[0]:.3f}x "
              f"(target <= 1.15x){memory}; LoRAMoE / frozen base {moe[0] / base[0]:.3f}x")


if __name__ == "__main__":
    main()
