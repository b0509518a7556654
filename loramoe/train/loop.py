"""One training loop for vanilla SFT, PEFT LoRA and LoRAMoE (±LBC), on accelerate.

The loop is explicit: forward, LM loss on response tokens only, plus β·LBC for LoRAMoE,
backward, step. Every step logs lm loss, lbc loss, lr, tokens/s and the router's coefficient
of variation through a MetricsSink (no-op by default; the pipeline plugs MLflow in).
Everything it runs on is built in builders.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from accelerate.utils import DistributedType

from loramoe.precision import hardware_name
from loramoe.train.builders import Training, build_training, save_artifact
from loramoe.train.checkpoints import diverged, gradients_finite, save_if_finite
from loramoe.train.config import TrainConfig, run_part, write_run_config
from loramoe.train.objective import (
    gather_samples,
    global_mean,
    global_token_share,
    process_sum,
    response_tokens,
)
from loramoe.train.pieces import RoutedBatch, joined, length_pieces


class MetricsSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class JsonlSink:
    """Appends one JSON line per logged step (kept next to the checkpoints)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_metrics: dict[str, float]
    artifact: Path  # adapter folder (lora/loramoe) or model folder (sft)
    tokens_per_second: float


def response_loss(model, batch: dict[str, torch.Tensor], token_count=None) -> torch.Tensor:
    """Cross-entropy summed over the batch's response tokens / token_count (default: their
    number, i.e. the mean)."""
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"], token_count)


def forward_batch(model, batch: dict[str, torch.Tensor], config: TrainConfig, token_count=None,
                  split: bool = False) -> tuple[torch.Tensor, RoutedBatch | None]:
    """The batch's LM loss and, for LoRAMoE, what its routers saw. With `split`, the batch
    runs in two pieces of similar length (pieces.py): the same loss, less padding."""
    pieces = length_pieces(batch) if split else [batch]
    if len(pieces) > 1 and token_count is None:
        token_count = response_tokens(batch)  # every piece divides by the whole batch's
    from loramoe.injection import collect_router_probs

    lm_loss, probs = 0.0, []
    for piece in pieces:
        lm_loss = lm_loss + response_loss(model, piece, token_count)
        if config.method == "loramoe":
            probs.append(collect_router_probs(model))  # the next piece's forward replaces them
    return lm_loss, joined(pieces, probs) if probs else None


def use_pieces(acc, config: TrainConfig) -> bool:
    """Length pieces on one process only: DDP, FSDP and DeepSpeed expect one forward per
    backward."""
    return config.split_by_length and acc.distributed_type == DistributedType.NO


def lbc_term(routed: RoutedBatch | None, config: TrainConfig, gather=None, total=None
             ) -> tuple[torch.Tensor | None, float | None]:
    """(β-free LBC loss or None, router CV) for LoRAMoE; padding excluded from Q. With
    several processes, `gather` gives the LBC the global batch's Q and `total` sums the CV's
    expert importance over processes."""
    if routed is None:
        return None, None
    from loramoe.loss import localized_balancing_loss, router_cv

    cv = router_cv(routed.probs, routed.attention_mask, total).item()
    if config.loramoe.lbc_beta == 0:
        return None, cv
    lbc = localized_balancing_loss(routed.probs, routed.attention_mask, routed.sample_types,
                                   config.loramoe.expert_type_ids(), config.loramoe.lbc_delta,
                                   gather=gather, form=config.loramoe.lbc_form,
                                   load=config.loramoe.lbc_load)
    return lbc, cv


def train(config: TrainConfig, sink: MetricsSink | None = None, resume: bool = False,
          progress: bool = True) -> TrainResult:
    """Train per the config; returns where the adapter (or full model) was written."""
    from loramoe.progress import progress as progress_bar

    run = build_training(config, resume)
    acc, model, optimizer, output_dir = run.accelerator, run.model, run.optimizer, \
        Path(config.output_dir)
    sinks = [sink] if sink is not None else []
    sinks.append(JsonlSink(output_dir / "metrics.jsonl"))
    at = run.progress
    bar = progress_bar(run.total_steps, f"train {config.method}", initial=at.step,
                       enabled=progress and acc.is_main_process)
    tokens, start, last = 0, time.perf_counter(), {}
    # several processes: the LBC's Q and the router CV's importance span the global batch
    gather, total = (gather_samples, process_sum(acc)) if acc.num_processes > 1 else (None, None)
    split = use_pieces(acc, config)
    model.train()
    for batch in run.batches() if at.step < run.total_steps else ():
        with acc.accumulate(model):
            with run.autocast():
                lm_loss, routed = forward_batch(model, batch, config,
                                                global_token_share(acc, batch), split)
                lbc, cv = lbc_term(routed, config, gather, total)
                loss = lm_loss if lbc is None else lm_loss + config.loramoe.lbc_beta * lbc
            if not torch.isfinite(loss.detach()):
                raise diverged("non-finite loss", at.step, output_dir, config.learning_rate,
                               f"lm {lm_loss.item()}, lbc {None if lbc is None else lbc.item()}")
            acc.backward(loss)
            # A huge but finite loss can still give inf/nan gradients: check them before
            # AdamW turns them into NaN weights.
            if acc.sync_gradients and not gradients_finite(run.params):
                raise diverged("non-finite gradients", at.step, output_dir, config.learning_rate)
            optimizer.step()
            if acc.sync_gradients:
                run.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum()) * acc.num_processes
        if not acc.sync_gradients:
            continue
        at.step += 1
        speed = tokens / max(time.perf_counter() - start, 1e-9)
        last = step_metrics(global_mean(acc, lm_loss), lbc, cv, run, speed)
        if acc.is_main_process and at.step % config.log_every == 0:
            for each in sinks:
                each.log_metrics(last, at.step)
        bar.set_postfix(loss=f"{last['lm_loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        bar.update(1)
        if at.step in config.snapshot_steps:
            write_artifact(run, output_dir / "snapshots" / f"step-{at.step:05d}")
        if config.save_every and at.step % config.save_every == 0:
            save_if_finite(acc, run.params, at.to_dict(), config)
        if at.step >= run.total_steps:
            break
    bar.close()
    return finish(run, last)


def step_metrics(lm_loss: float, lbc, cv, run: Training, tokens_per_s: float
                 ) -> dict[str, float]:
    metrics = {"lm_loss": lm_loss, "lr": run.scheduler.get_last_lr()[0],
               "tokens_per_s": tokens_per_s}
    if lbc is not None:
        metrics["lbc_loss"] = lbc.item()
    if cv is not None:
        metrics["router_cv"] = cv
    return metrics


def sharded_state(acc, model) -> dict[str, torch.Tensor] | None:
    """The full state dict of an FSDP/DeepSpeed-sharded model (keys as the LM's own), else
    None (the unwrapped model holds its full weights)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    state = acc.get_state_dict(model)  # collective: every process takes part
    if state is None:  # ZeRO-3 consolidates on the main process only, which writes it
        return None
    return {key.removeprefix("lm."): value for key, value in state.items()}


def unwrapped(acc, model):
    """The model inside accelerate's wrappers (DDP, DeepSpeed's engine). One plain process
    has none, and there accelerate's unwrap_model would import DeepSpeed (2-6 s of every
    CPU training) only to ask whether the model is its engine. (A full model's
    save_pretrained still asks: loramoe.model.save_model.)"""
    from accelerate.utils import DistributedType

    return model if acc.distributed_type == DistributedType.NO else acc.unwrap_model(model)


def write_artifact(run: Training, folder: Path) -> Path:
    """The adapter (or model) as it is now, in folder/adapter (folder/model), with the run's
    train_config.json beside it: a folder load_for_eval(run=...) reads."""
    acc, config = run.accelerator, run.config
    acc.wait_for_everyone()
    artifact = folder / run_part(config.method)
    # Sharded weights (FSDP, ZeRO-3) are gathered on every process, adapters' too (their
    # parameters are shards as well); rank 0 writes them.
    full = sharded_state(acc, run.model)
    if acc.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        artifact = save_artifact(unwrapped(acc, run.model).lm, run.tokenizer, config,
                                 folder, full)
        write_run_config(folder, config)
    acc.wait_for_everyone()
    return artifact


def finish(run: Training, last: dict[str, float]) -> TrainResult:
    """Write the adapter (or model) and the final metrics, on the main process."""
    acc, output_dir = run.accelerator, Path(run.config.output_dir)
    artifact = write_artifact(run, output_dir)
    if acc.is_main_process:
        (output_dir / "final_metrics.json").write_text(
            json.dumps({"steps": run.progress.step, "processes": acc.num_processes,
                        "device": acc.device.type, "hardware": hardware_name(acc.device),
                        "examples": len(run.dataset),
                        "examples_dropped": run.dataset.dropped,
                        "examples_truncated": run.dataset.truncated,
                        "examples_with_control_text": run.dataset.control_text, **last}))
    acc.wait_for_everyone()
    return TrainResult(output_dir, run.progress.step, last, artifact,
                       last.get("tokens_per_s", 0.0))
