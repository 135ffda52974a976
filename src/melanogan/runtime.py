"""Device/precision/DDP choices shared by the GAN and classifier training loops (Lightning Fabric)."""

from __future__ import annotations

import os

import torch

from melanogan.errors import MelanoganError

# User spellings -> Fabric precision names.
PRECISIONS = {"32": "32-true", "32-true": "32-true", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
              "16": "16-mixed", "16-mixed": "16-mixed"}


def fabric_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise MelanoganError(f"precision {precision!r} is not supported; use 32, bf16-mixed or 16-mixed.")
    return PRECISIONS[precision]


def ddp_strategy(world_size: int) -> str:
    """`auto` for one process; `ddp` when a launcher (torchrun, SLURM) started the processes, else
    `ddp_spawn` so that one command starts them itself."""
    if world_size <= 1:
        return "auto"
    return "ddp" if "LOCAL_RANK" in os.environ or "SLURM_PROCID" in os.environ else "ddp_spawn"


def shutdown_distributed(fabric) -> None:
    """Leave the process group together: a spawned gloo worker exiting with the group alive aborted
    now and then ("terminate called without an active exception")."""
    if fabric.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        fabric.barrier()
        torch.distributed.destroy_process_group()
