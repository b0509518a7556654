"""Everything the training loop needs, built from one TrainConfig: model + tokenizer,
optimizer + schedule, the encoded data and its batches, the step to start from."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramoe.data.collate import Collator
from loramoe.train.config import TrainConfig, TrainConfigError, run_part, write_run_config
from loramoe.train.data import encode_frame, read_train_frame
from loramoe.train.objective import ResponseLM
from loramoe.train.preflight import check_snapshots, check_targets, run_length


def build_model(config: TrainConfig, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) ready for training with the config's method. Adapter methods keep
    the frozen weights in `dtype`; full SFT keeps fp32 master weights (bf16 compute comes from
    autocast, see precision_plan)."""
    from loramoe.injection import enable_checkpointing
    from loramoe.model import load_base_model

    storage = torch.float32 if config.method == "sft" else dtype
    model, tokenizer = load_base_model(config.model, dtype=storage)
    # The adapters' init draws from the seed alone: loading may or may not draw random
    # numbers (a model built from a config the first time, read from a cache later).
    torch.manual_seed(config.seed)
    model = add_adapters(model, config)
    if config.gradient_checkpointing:
        if config.method == "sft":
            model.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            enable_checkpointing(model.get_base_model() if config.method == "lora" else model)
    return model, tokenizer


def add_adapters(model, config: TrainConfig):
    """The method's adapters injected into `model` (LoRAMoE in place; PEFT LoRA wraps it);
    full SFT: the model as it is."""
    from loramoe.injection import apply_loramoe, resolve_targets

    if config.method == "loramoe":
        apply_loramoe(model, config.loramoe)
    elif config.method == "lora":
        from peft import LoraConfig, get_peft_model

        from loramoe.backends.dropout import use_positions_dropout

        targets = resolve_targets(model, config.loramoe)
        model = get_peft_model(model, LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=targets, task_type="CAUSAL_LM"))
        use_positions_dropout(model)  # same law, a twentieth of the draws on a CPU
    return model


def skeleton(model, config: TrainConfig):
    """The trained model's architecture on the meta device, adapters added as in training,
    without the wrappers that training put around its blocks (activation checkpointing,
    FSDP): its module names are the gathered state's keys, which those wrappers leave out.
    Built with the class itself, not from_config: under ZeRO-3 from_config partitions the new
    model with collectives, and only the main process builds a skeleton (it hung there)."""
    base = model.get_base_model() if config.method == "lora" else model
    with torch.device("meta"):
        return add_adapters(type(base)(base.config), config)


def deepspeed_recipe(ds_config: dict, config: TrainConfig, dtype: torch.dtype) -> None:
    """Make DeepSpeed run the trainer's recipe, as DDP and FSDP do, or say why it cannot
    (before the model is loaded). Its batch size comes from a data loader prepared with the
    model, and ours is prepared later (per epoch, after a resume): give it the micro-batch.
    accelerate fills an unset `gradient_clipping` with 1.0, a clip the trainer applies
    nowhere else (full SFT on 2 ZeRO-3 processes moved 1.5 % off one process's weights in 3
    steps): 0 switches it off. ZeRO-3 stores every weight in DeepSpeed's own dtype, not
    train.dtype: a "bf16" LoRAMoE run kept its frozen base in fp32 (2× the memory that plan
    is for), so adapters in a lower precision are refused here."""
    if config.method != "sft" and dtype != torch.float32:
        raise TrainConfigError(
            f"TrainConfig.dtype = {config.dtype!r} ({str(dtype).removeprefix('torch.')}) "
            f"with DeepSpeed ZeRO-3: it would store the frozen base in DeepSpeed's dtype, "
            f"not this one. For {config.method}, use launch.strategy = 'ddp' or 'fsdp' "
            f"(frozen weights in {config.dtype}, adapters fp32), or dtype = 'fp32'")
    ds_config["train_micro_batch_size_per_gpu"] = config.batch_size
    ds_config["gradient_clipping"] = 0.0


def optimizer_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The trainable parameters as AdamW groups: one at train.lr, and with router_lr_scale
    != 1 the LoRAMoE routers (Wg of every layer) in a second one at lr × router_lr_scale."""
    from loramoe.layer import LoRAMoELinear

    params = [p for p in model.parameters() if p.requires_grad]
    if config.router_lr_scale == 1:
        return [{"params": params}]
    routers = {id(m.router_weight) for m in model.modules() if isinstance(m, LoRAMoELinear)}
    return [{"params": [p for p in params if id(p) not in routers]},
            {"params": [p for p in params if id(p) in routers],
             "lr": config.learning_rate * config.router_lr_scale}]


def build_optimizer(params: list[torch.nn.Parameter] | list[dict[str, Any]], config: TrainConfig,
                    total_steps: int, fused: bool = False):
    """AdamW with linear warm-up, then cosine decay to 0 over total_steps or a constant lr;
    params: tensors, or groups with their own lr (the schedule scales each group's lr).

    fused: torch's one-kernel AdamW, for CPU training. On CPU torch's default AdamW loops over
    the tensors: 0.61 s a step for the default model's 135M fp32 parameters vs 0.08 s fused;
    a whole full-SFT step at the default run's batch shape (8 x 64 tokens, one thread) took
    0.84x the time (0.955x at 8 x 96; benchmarks/bench_optimizer.py). GPUs keep torch's
    default (foreach): fused there is not measured, nor checked under FSDP."""
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate,
                                  weight_decay=config.weight_decay, fused=fused or None)
    warmup = int(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def precision_plan(config: TrainConfig, device: torch.device
                   ) -> tuple[torch.dtype, torch.dtype | None, str]:
    """(storage dtype of the frozen weights, autocast dtype or None, accelerate's
    mixed_precision) for the config.

    lora/loramoe store the frozen base in the dtype and compute the adapters in fp32 (no
    autocast); full SFT trains fp32 master weights under bf16 autocast, so AdamW never rounds
    its updates to bf16's 8-bit mantissa. fp16 (GPUs) goes through accelerate's fp16 mode,
    which adds the loss scaler fp16 needs (one such mode per process)."""
    from loramoe.precision import PrecisionError, resolve_dtype

    try:
        dtype = resolve_dtype(config.dtype, device)
    except PrecisionError as err:
        raise TrainConfigError(str(err)) from None
    if dtype == torch.float16:
        return dtype, None, "fp16"
    if dtype == torch.bfloat16 and config.method == "sft":
        return dtype, torch.bfloat16, "no"
    return dtype, None, "no"


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint, so a resume continues exactly."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # each process's own count: it means step's data per process
    processes: int = 0  # data-parallel processes that wrote it (0: not recorded, before)
    dtype: str = ""  # the frozen weights' resolved dtype ("": not recorded, before)

    def to_dict(self) -> dict[str, int | str]:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "processes": self.processes, "dtype": self.dtype}


@dataclass
class Training:
    """The built pieces, already prepared by accelerate."""

    config: TrainConfig
    accelerator: Any
    model: Any
    tokenizer: Any
    dataset: torch.utils.data.Dataset
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[torch.nn.Parameter]
    total_steps: int
    autocast_dtype: torch.dtype | None = None  # full SFT in bf16: fp32 weights, bf16 compute
    progress: Progress = field(default_factory=Progress)

    def autocast(self):
        """The context the forward runs in: bf16 autocast for full SFT in bf16, else none."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.accelerator.device.type, dtype=self.autocast_dtype)

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches epoch after epoch (without end), each epoch in its own seeded order;
        starts inside the epoch `progress` names and counts batches into it."""
        config, progress = self.config, self.progress
        collate = Collator(self.tokenizer.pad_token_id)
        while True:
            order = list(range(len(self.dataset)))
            random.Random(config.seed * 100_003 + progress.epoch).shuffle(order)
            # Own generator: a DataLoader iterator draws its base seed from the generator it
            # is given, or else from the global RNG, which would shift every later dropout
            # mask and break exact resume.
            loader = self.accelerator.prepare_data_loader(torch.utils.data.DataLoader(
                torch.utils.data.Subset(self.dataset, order), batch_size=config.batch_size,
                collate_fn=collate,
                generator=torch.Generator().manual_seed(config.seed + progress.epoch)))
            if progress.batches_in_epoch:
                loader = self.accelerator.skip_first_batches(loader, progress.batches_in_epoch)
            for batch in loader:
                progress.batches_in_epoch += 1
                yield batch
            progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0


def build_training(config: TrainConfig, resume: bool) -> Training:
    """Check the data, pick the checkpoint, load the model, encode, build the optimizer."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        DistributedType,
        parse_flag_from_env,
        set_seed,
    )

    from loramoe.backends.attention import use_training_attention
    from loramoe.precision import dtype_name
    from loramoe.train.checkpoints import read_progress
    from loramoe.train.resume import resume_point, write_data_record

    # The first PartialState fixes the process group: it must see ACCELERATE_USE_CPU (which
    # only Accelerator reads by itself), or CPU data-parallel processes each train alone.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    dtype, autocast, mixed = precision_plan(config, state.device)  # before loading
    # step_scheduler_with_optimizer=False: accelerate would otherwise step the schedule once
    # per process at every optimizer step (P× too fast), whereas total_steps already counts
    # global steps. find_unused_parameters stays False even with top_k: LoRAMoE computes
    # every expert and zeroes the gates of the others, so every parameter gets a gradient
    # (tests/test_distributed.py runs top-k under DDP, which raises on an unused one).
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum,
                              mixed_precision=mixed, step_scheduler_with_optimizer=False,
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=False)])
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        deepspeed_recipe(accelerator.state.deepspeed_plugin.deepspeed_config, config, dtype)
    set_seed(config.seed)
    frame = read_train_frame(config)  # bad rows fail here, before the model is loaded
    # encoding only drops rows: snapshots past a run over every row fail before the model too
    check_snapshots(config, len(frame), accelerator.num_processes, bound="at most ")
    check_targets(config)  # on the architecture alone: a 7B model is not loaded to learn it
    output_dir = Path(config.output_dir)
    made = {"processes": accelerator.num_processes, "dtype": dtype_name(dtype)}
    checkpoint, data = resume_point(accelerator, config, resume, made)  # before the model
    lm, tokenizer = build_model(config, dtype)
    use_training_attention(lm, dtype, state.device)  # bf16 on a CPU: fp32 attention product
    dataset = encode_frame(config, frame, tokenizer)  # none usable: TrainConfigError
    check_snapshots(config, len(dataset), accelerator.num_processes)
    total_steps = run_length(config, len(dataset), accelerator.num_processes)
    groups = optimizer_groups(lm, config)
    params = [p for group in groups for p in group["params"]]
    optimizer, scheduler = build_optimizer(groups, config, total_steps,
                                           fused=state.device.type == "cpu")
    model, optimizer, scheduler = accelerator.prepare(ResponseLM(lm), optimizer, scheduler)
    training = Training(config, accelerator, model, tokenizer, dataset, optimizer, scheduler,
                        params, total_steps, autocast, Progress(**made))
    if accelerator.is_main_process:  # resume_point made the folder, before the model loaded
        write_run_config(output_dir, config)
        write_data_record(output_dir, data)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        training.progress = Progress(**{**read_progress(checkpoint), **made})
    return training


def save_artifact(model, tokenizer, config: TrainConfig, output_dir: Path,
                  state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The adapter folder (lora, loramoe) or the whole model (sft); `state_dict` when the
    weights were gathered from shards (FSDP, ZeRO-3)."""
    from loramoe.adapter import save_adapter
    from loramoe.model import save_model

    if config.method != "sft" and state_dict is not None:
        model = skeleton(model, config)  # names that match the gathered state's keys
    folder = output_dir / run_part(config.method)
    if config.method == "loramoe":
        return save_adapter(model, folder, base_model_name=config.model, state_dict=state_dict)
    if config.method == "sft":
        save_model(model, folder, state_dict=state_dict)
        tokenizer.save_pretrained(folder)
    else:  # PEFT's save_pretrained: the LoRA adapter alone
        model.save_pretrained(folder, state_dict=state_dict)
    return folder
