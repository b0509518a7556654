"""One trainer for vanilla SFT, PEFT LoRA and LoRAMoE (±LBC), built on accelerate.

    python -m loramoe.train --config FILE.toml [--set key=value ...] [--resume]
    accelerate launch --num_processes 2 --cpu -m loramoe.train --config FILE.toml

The loop is explicit: forward, LM loss on response tokens only, plus β·LBC for LoRAMoE,
backward, step. Every step logs lm loss, lbc loss, lr, tokens/s and the router's coefficient
of variation through a MetricsSink (no-op by default; the pipeline plugs MLflow in).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from loramoe.collate import IGNORE_INDEX, Collator
from loramoe.train_config import TrainConfig, TrainConfigError
from loramoe.train_data import encode_frame, read_train_frame


class MetricsSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class NullSink:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass


class JsonlSink:
    """Appends one JSON line per logged step (kept next to the checkpoints)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_metrics: dict[str, float]
    artifact: Path  # adapter folder (lora/loramoe) or model folder (sft)
    tokens_per_second: float


def build_model(config: TrainConfig):
    """(model, tokenizer) ready for training with the config's method."""
    from loramoe.injection import apply_loramoe, enable_checkpointing, resolve_targets
    from loramoe.model import load_base_model

    model, tokenizer = load_base_model(config.model)
    if config.method == "loramoe":
        apply_loramoe(model, config.loramoe)
    elif config.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = resolve_targets(model, config.loramoe)
        model = get_peft_model(model, LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=targets, task_type="CAUSAL_LM"))
    if config.gradient_checkpointing:
        if config.method == "sft":
            model.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            enable_checkpointing(model.get_base_model() if config.method == "lora" else model)
    return model, tokenizer


def _unwrap_hf(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over response tokens, with the LM head applied only there.

    The vocabulary projection is the biggest matmul of a small model; computing it for
    prompt and padding positions would waste most of it.
    """
    hf = _unwrap_hf(model)
    backbone = getattr(hf, hf.base_model_prefix)
    hidden = backbone(input_ids=batch["input_ids"],
                      attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    logits = hf.get_output_embeddings()(hidden[:, :-1][keep])  # (K, V)
    return F.cross_entropy(logits.float(), targets[keep])


def lbc_term(model, batch, config: TrainConfig) -> tuple[torch.Tensor | None, float | None]:
    """(β-free LBC loss or None, router CV) for LoRAMoE; padding excluded from Q."""
    if config.method != "loramoe":
        return None, None
    from loramoe.injection import collect_router_probs
    from loramoe.loss import localized_balancing_loss, router_cv

    probs = collect_router_probs(_unwrap_hf(model))
    cv = router_cv(probs, batch["attention_mask"]).item()
    if config.loramoe.lbc_beta == 0:
        return None, cv
    expert_types = config.loramoe.expert_type_ids()
    lbc = localized_balancing_loss(probs, batch["attention_mask"], batch["sample_types"],
                                   expert_types, config.loramoe.lbc_delta)
    return lbc, cv


def _mixed_precision(config: TrainConfig) -> str:
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"  # CPU autocast to bf16 is slower than fp32 on most laptops


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def _cosine_with_warmup(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_artifact(model, tokenizer, config: TrainConfig, output_dir: Path) -> Path:
    from loramoe.adapter import save_adapter

    if config.method == "loramoe":
        return save_adapter(model, output_dir / "adapter", base_model_name=config.model)
    if config.method == "lora":
        model.save_pretrained(output_dir / "adapter")
        return output_dir / "adapter"
    model.save_pretrained(output_dir / "model")
    tokenizer.save_pretrained(output_dir / "model")
    return output_dir / "model"


def train(config: TrainConfig, sink: MetricsSink | None = None, resume: bool = False,
          progress: bool = True) -> TrainResult:
    """Train per the config; returns where the adapter (or full model) was written."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    sink = sink or NullSink()
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum,
                              mixed_precision=_mixed_precision(config))
    set_seed(config.seed)
    frame = read_train_frame(config)  # bad rows fail here, before the model is loaded
    checkpoint = _start_state(config, output_dir, resume) if accelerator.is_main_process \
        else None
    model, tokenizer = build_model(config)
    dataset = encode_frame(config, frame, tokenizer)
    if len(dataset) == 0:
        raise TrainConfigError(f"TrainConfig.train_file: {config.train_file} has no usable "
                               f"examples (empty, or every response truncated by max_length)")
    per_epoch = math.ceil(len(dataset) / (config.batch_size * accelerator.num_processes
                                          * config.grad_accum))
    total_steps = config.max_steps or max(1, math.ceil(per_epoch * config.epochs))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    scheduler = _cosine_with_warmup(optimizer, int(config.warmup_ratio * total_steps),
                                    total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    collate = Collator(tokenizer.pad_token_id)

    step, epoch, skip_batches = 0, 0, 0
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    local_sink = JsonlSink(output_dir / "metrics.jsonl")
    checkpoint = _shared_checkpoint(accelerator, checkpoint)
    if checkpoint is not None:
        from loramoe.checkpoints import read_progress

        accelerator.load_state(str(checkpoint))
        state = read_progress(checkpoint)
        step, epoch, skip_batches = state["step"], state["epoch"], state["batches_in_epoch"]

    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=not (progress and
                                                             accelerator.is_main_process),
               desc=f"train {config.method}")
    tokens_seen, start, last = 0, time.perf_counter(), {}
    while step < total_steps:
        order = _epoch_order(len(dataset), config.seed, epoch)
        # Own generator: a DataLoader iterator draws its base seed from the generator it is
        # given, or else from the global RNG, which would shift every later dropout mask
        # and break exact resume.
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, order), batch_size=config.batch_size,
            collate_fn=collate, generator=torch.Generator().manual_seed(config.seed + epoch))
        loader = accelerator.prepare_data_loader(loader)
        if skip_batches:
            loader = accelerator.skip_first_batches(loader, skip_batches)
        batches_in_epoch = skip_batches
        for batch in loader:
            with accelerator.accumulate(model):
                lm_loss = response_loss(model, batch)
                lbc, cv = lbc_term(model, batch, config)
                loss = lm_loss if lbc is None else lm_loss + config.loramoe.lbc_beta * lbc
                if not torch.isfinite(loss.detach()):
                    raise _diverged("non-finite loss", step, output_dir, config,
                                    f"lm {lm_loss.item()}, lbc "
                                    f"{None if lbc is None else lbc.item()}")
                accelerator.backward(loss)
                # A huge but finite loss can still give inf/nan gradients: check them
                # before AdamW turns them into NaN weights.
                if accelerator.sync_gradients and not _gradients_finite(params):
                    raise _diverged("non-finite gradients", step, output_dir, config)
                optimizer.step()
                scheduler.step() if accelerator.sync_gradients else None
                optimizer.zero_grad(set_to_none=True)
            batches_in_epoch += 1
            tokens_seen += int(batch["attention_mask"].sum()) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            elapsed = time.perf_counter() - start
            last = {"lm_loss": lm_loss.item(), "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens_seen / max(elapsed, 1e-9)}
            if lbc is not None:
                last["lbc_loss"] = lbc.item()
            if cv is not None:
                last["router_cv"] = cv
            if accelerator.is_main_process and step % config.log_every == 0:
                sink.log_metrics(last, step)
                local_sink.log_metrics(last, step)
            bar.set_postfix(loss=f"{last['lm_loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            bar.update(1)
            if config.save_every and step % config.save_every == 0:
                _checkpoint(accelerator, params, output_dir, config,
                            {"step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch})
            if step >= total_steps:
                break
        else:
            epoch, skip_batches = epoch + 1, 0
            continue
        break
    bar.close()
    accelerator.wait_for_everyone()
    artifact = output_dir / ("model" if config.method == "sft" else "adapter")
    if accelerator.is_main_process:
        artifact = save_artifact(accelerator.unwrap_model(model), tokenizer, config, output_dir)
        (output_dir / "final_metrics.json").write_text(json.dumps({"steps": step, **last}))
    accelerator.wait_for_everyone()
    return TrainResult(output_dir, step, last, artifact, last.get("tokens_per_s", 0.0))


def _shared_checkpoint(accelerator, checkpoint: Path | None) -> Path | None:
    """The main process's choice of checkpoint, for every process."""
    if accelerator.num_processes == 1:
        return checkpoint
    from accelerate.utils import broadcast_object_list

    chosen = [str(checkpoint) if checkpoint is not None else None]
    broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0]) if chosen[0] else None


def _checkpoint(accelerator, params: list[torch.nn.Parameter], output_dir: Path,
                config: TrainConfig, progress: dict[str, int]) -> None:
    """Save a checkpoint only if every trainable weight is finite (never a 'good' NaN one)."""
    from loramoe.checkpoints import save_checkpoint

    if not bool(torch.isfinite(torch.nn.utils.get_total_norm(params))):
        raise _diverged("non-finite weights", progress["step"], output_dir, config)
    save_checkpoint(accelerator, output_dir, progress)


def _gradients_finite(params: list[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def _diverged(what: str, step: int, output_dir: Path, config: TrainConfig,
              detail: str = "") -> TrainingDiverged:
    from loramoe.checkpoints import last_good_checkpoint

    kept = last_good_checkpoint(output_dir)
    detail = f" ({detail})" if detail else ""
    return TrainingDiverged(
        f"{what} at step {step}{detail}; stopped before the update. Last good checkpoint: "
        f"{kept or 'none yet'}. Lower the learning rate ({config.learning_rate}) or check "
        f"the data.")


def _start_state(config: TrainConfig, output_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (or None), after checking that a fresh run would not
    overwrite an earlier one; earlier metrics are kept, never deleted."""
    from loramoe.checkpoints import (
        complete_checkpoints,
        keep_metrics_until,
        last_good_checkpoint,
        read_progress,
        set_aside,
    )

    metrics = output_dir / "metrics.jsonl"
    if not resume:
        earlier = complete_checkpoints(output_dir)
        if earlier or (output_dir / "final_metrics.json").exists():
            raise TrainConfigError(
                f"TrainConfig.output_dir: {output_dir} holds an earlier run "
                f"({earlier[-1].name if earlier else 'final_metrics.json'}); continue it with "
                f"--resume, or choose another output_dir")
        set_aside(metrics)
        return None
    checkpoint = last_good_checkpoint(output_dir)
    if checkpoint is None:
        kept = set_aside(metrics)
        print(f"warning: --resume: no complete checkpoint under {output_dir / 'checkpoints'}; "
              f"starting from step 0" + (f" (earlier metrics kept in {kept})" if kept else ""),
              file=sys.stderr)
        return None
    keep_metrics_until(metrics, read_progress(checkpoint)["step"])
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loramoe.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="TOML or JSON train config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set method=lora --set loramoe.lbc_beta=0")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args(argv)
    from loramoe.data.records import RecordsError
    from loramoe.model import ModelNotAvailableError

    try:
        config = TrainConfig.from_file(args.config, args.set)
        result = train(config, resume=args.resume)
    except (TrainConfigError, RecordsError, ModelNotAvailableError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"output_dir": str(result.output_dir), "steps": result.steps,
                      "artifact": str(result.artifact), **result.final_metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
