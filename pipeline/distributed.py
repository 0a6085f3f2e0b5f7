"""One process or several: rank helpers for multi-GPU training.

Several processes come from `accelerate launch` (or torchrun), which sets RANK/WORLD_SIZE, or from a SLURM
job with several tasks started by Hydra's submitit launcher, whose tasks get the same variables from
submitit's TorchDistributedEnvironment. Rank 0 alone writes artifacts; the other ranks only train.
"""
from __future__ import annotations

import os
from datetime import timedelta

# Rank 0 may build the NF4 base, or wait for another job's lock, while the other ranks wait for its word:
# far longer than torch.distributed's default timeout of 10 minutes.
WAIT_FOR_RANK0 = timedelta(hours=12)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def fsdp() -> bool:
    """Launched by accelerate with an FSDP config (conf/accelerate/fsdp_qlora.yaml)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def setup() -> None:
    """Join the process group when there is more than one process (a no-op otherwise)."""
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:  # a multi-task SLURM job: one task per GPU
            submitit.helpers.TorchDistributedEnvironment().export()
    if world_size() > 1:
        from accelerate import PartialState

        PartialState(timeout=WAIT_FOR_RANK0)


def broadcast(value):
    """Rank 0's `value` on every rank."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
