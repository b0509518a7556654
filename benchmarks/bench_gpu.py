"""Train step on a GPU: LoRAMoE vs PEFT LoRA vs the frozen base, tokens/s and peak memory.

    python benchmarks/bench_gpu.py [--device cuda] [--models smollm2-135m,llama-1b]
                                   [--batch 8] [--seq 1024] [--repeats 10]

Models are built from configs with random weights (a SmolLM2-135M-shaped and a ~1B
Llama-shaped one, TinyLlama's shape), frozen weights in bf16 (fp32 where the device has no
bf16), adapters fp32, FFN targets, forward + backward + AdamW (the LoRAMoE step with the
LBC). Two LoRAMoE variants: the layer's formula and the fused node (bf16 products, dense
dropout mask), the default backend, which stays only while it saves >= 5 % of the whole
step (docs/benchmarks.md §4). One variant is alive at a time; peak memory is
torch.cuda.max_memory_allocated per variant (model, optimizer state and activations of one
step). Imports only torch, transformers, peft and loramoe's core, as the bare GPU machine
has nothing else.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from arguments import at_least, listed
from peft import LoraConfig, get_peft_model
from train_step import frozen_floor, make_step
from transformers import LlamaConfig, LlamaForCausalLM

from loramoe import LoRAMoEConfig, apply_loramoe
from loramoe.backends import attach_backend
from loramoe.precision import PrecisionError, resolve_device, resolve_dtype

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
MOE, FUSED = "LoRAMoE N=6 r=4", "LoRAMoE fused node"
VARIANTS = ("frozen base", "PEFT LoRA r=4", MOE, FUSED)


def build(shape: str, variant: str, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    with torch.device(device):  # random init on the device: seconds, not a minute, for 1B
        model = LlamaForCausalLM(config).to(dtype)
    if variant == "frozen base":
        frozen_floor(model)
    elif variant.startswith("PEFT"):
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules=FFN, task_type="CAUSAL_LM"))
    else:
        apply_loramoe(model, LoRAMoEConfig(target_modules=FFN))
        attach_backend(model, "fused" if variant == FUSED else "formula")
    return model.train()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variant(shape: str, variant: str, ids: torch.Tensor, args, device: torch.device,
                 dtype: torch.dtype) -> tuple[float, float]:
    """(median ms per step, peak GiB) of one variant, the only model alive."""
    model = build(shape, variant, device, dtype)
    step = make_step(model, ids, variant in (MOE, FUSED))
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
    return 1000 * statistics.median(times), peak


def measure(shape: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    """{variant: [(ms per step, peak GiB) per round]}: rounds of every variant in turn, one
    alive at a time (honest peaks); a variant that fails is reported and skipped."""
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (args.batch, args.seq), device=device)
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            try:
                results[variant].append(time_variant(shape, variant, ids, args, device, dtype))
            except Exception as err:  # noqa: BLE001 - one broken variant must not hide the rest
                print(f"  {shape:<14} {variant:<17} FAILED: {type(err).__name__}: {err}"[:400])
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {v: r for v, r in results.items() if r}


def ratio_line(shape: str, name: str, results: dict, a: str, b: str) -> str:
    """a / b in time (per round, and of the medians) and in peak memory."""
    if a not in results or b not in results:
        return f"  {shape:<14} {name}: not measured"
    per_round = [x[0] / y[0] for x, y in zip(results[a], results[b], strict=False)]
    ms_a, ms_b = (statistics.median(t for t, _ in results[v]) for v in (a, b))
    peak_a, peak_b = results[a][0][1], results[b][0][1]
    memory = f", memory {peak_a / peak_b:.3f}x" if peak_b else ""
    rounds = ", ".join(f"{r:.3f}" for r in per_round)
    return f"  {shape:<14} {name}: time {ms_a / ms_b:.3f}x (rounds {rounds}){memory}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", type=listed(SHAPES), default="smollm2-135m,llama-1b")
    parser.add_argument("--batch", type=at_least(1), default=8)
    parser.add_argument("--seq", type=at_least(1), default=1024)
    parser.add_argument("--repeats", type=at_least(1), default=10)
    parser.add_argument("--rounds", type=at_least(1), default=2)
    args = parser.parse_args()
    try:
        device = resolve_device(args.device, "--device")
    except PrecisionError as err:
        parser.error(str(err))
    dtype = resolve_dtype("auto", device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"Train step on {name}, frozen weights {dtype}, batch {args.batch} x {args.seq}, "
          f"torch {torch.__version__}, median of {args.repeats} steps, {args.rounds} rounds")
    print(f"  {'model':<14} {'variant':<17} {'ms/step':>9} {'tokens/s':>10} {'peak GiB':>9}")
    for shape in args.models:
        results = measure(shape, args, device, dtype)
        for variant, rounds in results.items():
            ms = statistics.median(t for t, _ in rounds)
            print(f"  {shape:<14} {variant:<17} {ms:9.1f} "
                  f"{args.batch * args.seq / ms * 1000:10.0f} {rounds[0][1]:9.2f}")
        for variant in (MOE, FUSED):
            print(ratio_line(shape, f"{variant} / PEFT LoRA (target <= 1.15x time, <= 1.10x "
                                    "memory)", results, variant, "PEFT LoRA r=4"))
            print(ratio_line(shape, f"{variant} / frozen base", results, variant,
                             "frozen base"))
        print(ratio_line(shape, "fused node / formula (a backend stays at <= 0.95x)", results,
                         FUSED, MOE))


if __name__ == "__main__":
    main()
