"""Device/precision/DDP choices shared by the GAN and classifier training loops (Lightning Fabric)."""

from __future__ import annotations

import os

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from melanogan.errors import MelanoganError

# User spellings -> Fabric precision names.
PRECISIONS = {"32": "32-true", "32-true": "32-true", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
              "16": "16-mixed", "16-mixed": "16-mixed"}


def fabric_precision(precision: str, accelerator: str = "auto") -> str:
    """Fabric's name for `precision`; bf16 on a CUDA GPU without bf16 (before Ampere) is refused with
    what to use instead, rather than left to fail or crawl inside the first step."""
    if precision not in PRECISIONS:
        raise MelanoganError(f"precision {precision!r} is not supported; use 32, bf16-mixed or 16-mixed.")
    name = PRECISIONS[precision]
    if (name == "bf16-mixed" and accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported()):
        raise MelanoganError("this GPU has no bf16 support; pass --precision 16-mixed (or 32).")
    return name


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


class TrainingBar:
    """The training loops' Rich progress bar: done/total, a free-text status, elapsed time and (when
    the total is what ends the run) an ETA."""

    def __init__(self, label: str, total: int, completed: int = 0, eta: bool = True):
        columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn()]
        if eta:
            columns += [TextColumn("ETA"), TimeRemainingColumn()]
        self._progress = Progress(*columns)
        self._progress.start()
        self._task = self._progress.add_task(label, total=total, completed=completed, info="")

    def update(self, info: str, completed: int | None = None) -> None:
        extra = {} if completed is None else {"completed": completed}
        self._progress.update(self._task, info=info, **extra)

    def close(self) -> None:
        self._progress.stop()
