"""Put on PYTHONPATH of a launched test branch: lets accelerate run its FSDP path on CPU.

accelerate 1.16 turns `distributed_type: FSDP` into plain CPU data parallelism when it runs
on CPU (ACCELERATE_USE_CPU): its state picks FSDP only for GPU-like devices. In a process the
launcher started with FSDP settings (ACCELERATE_USE_FSDP=true), this promotes that choice
back to FSDP; FSDP2 itself (fully_shard, DTensor shards, gloo collectives), accelerate's
prepare, activation checkpointing and the state-dict gather are the real ones. Each process
writes what `prepare` returned to $FSDP_ON_CPU_REPORT/rank<N>.json, so a test can tell that
the model really was sharded. With FSDP_ON_CPU_EMULATE_BF16=1 a CPU without native bf16
accepts `dtype = "bf16"` (torch emulates it: slow, but exact bf16 arithmetic), so the GPU's
storage plan — bf16 frozen weights, fp32 adapters — runs under FSDP on any CI machine.
"""

import json
import os
from pathlib import Path

if os.environ.get("ACCELERATE_USE_FSDP") == "true":
    import accelerate
    import accelerate.state as state
    from accelerate.utils import DistributedType

    state_init, prepare = state.AcceleratorState.__init__, accelerate.Accelerator.prepare

    def promoting_init(self, *args, fsdp_plugin=None, **kwargs):
        state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    def reporting_prepare(self, *args, **kwargs):
        import torch
        from torch.distributed.tensor import DTensor

        prepared = prepare(self, *args, **kwargs)
        models = [m for m in (prepared if isinstance(prepared, (tuple, list)) else (prepared,))
                  if isinstance(m, torch.nn.Module)]
        params = [p for m in models for p in m.parameters()]
        folder = os.environ.get("FSDP_ON_CPU_REPORT")
        if folder and models:  # (the trainer also prepares its data loader alone)
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / f"rank{self.process_index}.json").write_text(json.dumps({
                "distributed_type": str(self.distributed_type),
                "parameters": len(params),
                "sharded": sum(isinstance(p, DTensor) for p in params),
                "dtypes": sorted({str(p.dtype) for p in params})}))
        return prepared

    state.AcceleratorState.__init__ = promoting_init
    accelerate.Accelerator.prepare = reporting_prepare

if os.environ.get("FSDP_ON_CPU_EMULATE_BF16") == "1":
    import loramoe.precision

    loramoe.precision.cpu_has_native_bf16 = lambda: True
