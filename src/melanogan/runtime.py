"""Device/precision/DDP choices shared by the GAN and classifier training loops (Lightning Fabric)."""

from __future__ import annotations

import contextlib
import os
import platform
import warnings
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from melanogan.errors import MelanoganError

# User spellings -> Fabric precision names ("auto": see auto_precision).
PRECISIONS = {"32": "32-true", "32-true": "32-true", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
              "16": "16-mixed", "16-mixed": "16-mixed", "auto": "auto"}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX). Why it matters: where it does,
    bf16 autocast trained small-cnn 1.7x faster than fp32; where it does not, PyTorch emulates bf16
    and the same training ran at 4.7 images/s against 58 in fp32 (2-core AVX2 machine): 12x slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # an older or other build: no way to tell, so no bf16
        return False


def machine_info(accelerator: str = "auto") -> dict:
    """What a measurement ran on, for a benchmark's record. Why: throughput, and so the steps a clock
    budget buys, depend on the machine (small-cnn trained at ~80 images/s on a 2-core CPU without native
    bf16 and ~260 on one with it), so figures from two machines are not one series unless they say so."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # Linux names the model here; platform.processor()
        # often gives only the architecture
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "cpu_native_bf16": cpu_has_native_bf16(),
            "gpu": torch.cuda.get_device_name(0) if _uses_cuda(accelerator) else None, "torch": torch.__version__}


def _uses_cuda(accelerator: str) -> bool:
    return accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available()


def auto_precision(accelerator: str = "auto") -> str:
    """The fastest precision the hardware runs natively: bf16 mixed precision on a CUDA GPU with bf16
    (Ampere or later) and on a CPU with native bf16, fp32 elsewhere (older GPUs, Apple MPS, CPUs
    that would emulate bf16)."""
    if _uses_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return "32-true"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def fabric_precision(precision: str, accelerator: str = "auto") -> str:
    """Fabric's name for `precision` ("auto": `auto_precision`); bf16 on a CUDA GPU without bf16
    (before Ampere) is refused with what to use instead, rather than left to fail or crawl inside the
    first step; bf16 asked for on a CPU that would emulate it is warned about (it runs, 12x slower)."""
    if precision not in PRECISIONS:
        raise MelanoganError(f"precision {precision!r} is not supported; use auto, 32, bf16-mixed or 16-mixed.")
    name = PRECISIONS[precision]
    if name == "auto":
        return auto_precision(accelerator)
    if name == "bf16-mixed" and _uses_cuda(accelerator) and not torch.cuda.is_bf16_supported():
        raise MelanoganError("this GPU has no bf16 support; pass --precision 16-mixed (or 32, or auto).")
    if name == "bf16-mixed" and not _uses_cuda(accelerator) and accelerator != "mps" and not cpu_has_native_bf16():
        warnings.warn("--precision bf16-mixed on a CPU without native bf16 (AVX-512 BF16 or AMX): PyTorch emulates "
                      "it, about 12x slower than fp32 here; --precision auto (the default) or 32 is faster.",
                      stacklevel=2)
    return name


def not_used_note(differences: list[str], kept_in: str) -> str | None:
    """The note a resumed run gives for options that differ from its own stored settings (`kept_in`: where
    those live). Both training loops resume with their stored settings, since a run's optimiser state,
    schedule and checkpoints belong to one set of them; they differ in what they compare (see each
    `not_used_on_resume`), not in what they say."""
    if not differences:
        return None
    return (f"resumed with the run's own settings ({kept_in}); these options differ from them and were not used: "
            f"{'; '.join(differences)}. Train a new run (another --out) to change them.")


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


LOGGERS = ("csv", "tensorboard")


def fabric_loggers(kind: str | None, run_dir) -> list:
    """Lightning Fabric loggers for `--logger` (beside stats.jsonl, which is always written): csv ->
    RUN_DIR/csv/version_N/metrics.csv, tensorboard -> RUN_DIR/tensorboard/version_N/ (one version per
    invocation, so a resumed run never overwrites the logs of the earlier ones)."""
    if kind in (None, "", "none"):
        return []
    if kind == "csv":
        from lightning_fabric.loggers import CSVLogger

        return [CSVLogger(root_dir=str(run_dir), name="csv")]
    if kind == "tensorboard":
        from lightning_fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE

        if not (_TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE):
            raise MelanoganError("--logger tensorboard needs TensorBoard: pip install 'melanogan[tensorboard]' "
                                 "(or drop --logger; stats.jsonl is always written).")
        from lightning_fabric.loggers import TensorBoardLogger

        return [TensorBoardLogger(root_dir=str(run_dir), name="tensorboard")]
    raise MelanoganError(f"--logger {kind!r}: use csv or tensorboard (stats.jsonl is always written).")


class RunLog:
    """One place where a training loop's records go: stats.jsonl (rank 0, always) and the run's
    Fabric loggers (numbers only), at the loop's own step (generator step, or epoch)."""

    def __init__(self, fabric, path) -> None:
        self.fabric, self.path = fabric, path

    def write(self, record: dict, step: int) -> None:
        from melanogan.fileio import append_jsonl

        if self.fabric.global_rank == 0:
            append_jsonl(self.path, record)
        if self.fabric.loggers:
            self.fabric.log_dict({k: float(v) for k, v in record.items()
                                  if isinstance(v, int | float) and not isinstance(v, bool) and k != "time"}, step=step)

    def close(self) -> None:
        for logger in self.fabric.loggers:
            logger.finalize("success")
