"""Put on PYTHONPATH of a launched test branch: lets accelerate run its FSDP and DeepSpeed
ZeRO-3 paths on CPU processes (gloo).

accelerate 1.16 runs either only on GPU-like devices: on CPU (ACCELERATE_USE_CPU) its state
turns `distributed_type: FSDP` into plain data parallelism, and without that flag a machine
with no GPU gets no process group at all, so DeepSpeed's processes each think they are
alone. In a process the launcher started with FSDP settings (ACCELERATE_USE_FSDP=true) this
promotes accelerate's choice back to FSDP; with DeepSpeed settings it hands accelerate the
gloo backend DeepSpeed's CPU accelerator uses. FSDP2 (fully_shard, DTensor shards), ZeRO-3
(partitioned parameters), accelerate's prepare, activation checkpointing and the state-dict
gathers are the real ones (DeepSpeed's CPU-only shared-memory op aside: not compiled). Each
process writes what `prepare` returned to $SHARDING_REPORT/rank<N>.json, so a test can tell
that the model really was sharded. With EMULATE_BF16=1 a CPU without native bf16 accepts
`dtype = "bf16"` (torch emulates it: slow, but exact bf16 arithmetic), so the GPU's storage
plan runs on any CI machine.
"""

import json
import os
from pathlib import Path


def lift_fsdp_gate() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    state_init = state.AcceleratorState.__init__

    def promoting_init(self, *args, fsdp_plugin=None, **kwargs):
        state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = promoting_init


def lift_deepspeed_gate() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    prepare_backend = state.PartialState._prepare_backend

    def gloo_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = prepare_backend(self, cpu, sagemaker_dp, backend)
        if found is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU  # DeepSpeed then takes over the type
        return found, kind

    state.PartialState._prepare_backend = gloo_backend


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU accelerator compiles its shared-memory all-reduce op (C++, at run time)
    when its process group starts: 50-90 s on a 2-core VM, and the launch fails where no C++
    compiler is installed. Only deepspeed.comm.inference_all_reduce uses that op, never ZeRO
    training, and a GPU's accelerator has none. Marked not compatible, as DeepSpeed marks an op
    it cannot build, the backend starts without it."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def report_prepared_models() -> None:
    import accelerate

    prepare = accelerate.Accelerator.prepare

    def reporting_prepare(self, *args, **kwargs):
        import torch
        from torch.distributed.tensor import DTensor

        prepared = prepare(self, *args, **kwargs)
        models = [m for m in (prepared if isinstance(prepared, (tuple, list)) else (prepared,))
                  if isinstance(m, torch.nn.Module)]
        params = [p for m in models for p in m.parameters()]
        folder = os.environ.get("SHARDING_REPORT")
        if folder and models:  # (the trainer also prepares its data loader alone)
            # a ZeRO-3 parameter keeps its partition in ds_tensor, an FSDP2 one is a DTensor
            stored = [getattr(p, "ds_tensor", p) for p in params]
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / f"rank{self.process_index}.json").write_text(json.dumps({
                "distributed_type": str(self.distributed_type),
                "parameters": len(params),
                "sharded": sum(isinstance(p, DTensor) or hasattr(p, "ds_tensor")
                               for p in params),
                "dtypes": sorted({str(t.dtype) for t in stored})}))
        return prepared

    accelerate.Accelerator.prepare = reporting_prepare


if os.environ.get("ACCELERATE_USE_FSDP") == "true":
    lift_fsdp_gate()
    report_prepared_models()
if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
    lift_deepspeed_gate()
    skip_deepspeed_shm_build()
    report_prepared_models()
if os.environ.get("EMULATE_BF16") == "1":
    import loramoe.precision

    loramoe.precision.cpu_has_native_bf16 = lambda: True
