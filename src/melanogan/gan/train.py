"""cWGAN-GP training loop (Lightning Fabric: devices, precision, DDP), resumable bitwise on CPU.

RUN_DIR/
  config.yaml     the resolved config;  run.json  data, devices, precision, package version
  stats.jsonl     one record per `log_every` steps (critic loss, GP, Wasserstein estimate, G loss, lr, img/s)
  samples/        fixed-noise grids per class every `sample_every` steps; losses.png
  checkpoints/    step-NNNNNNN/ (safetensors + optimiser state), latest.json

Only the training split reaches the generator: validation and test melanomas never do.
All randomness of a step (batch indices, noise, penalty interpolation, DiffAugment) is drawn from
generators seeded by (seed, step, rank), so an interrupted run resumed from a checkpoint takes
exactly the steps an uninterrupted one would have taken.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from melanogan import __version__
from melanogan.data.dataset import CachedImageDataset
from melanogan.data.manifest import load_manifest, manifest_hash
from melanogan.data.pack import data_space
from melanogan.data.transforms import eval_preset
from melanogan.errors import DataError, MelanoganError
from melanogan.fileio import append_jsonl, atomic_path, read_json, save_figure, write_json, write_text
from melanogan.gan.checkpoint import build_models, latest_checkpoint, load_checkpoint, save_checkpoint
from melanogan.gan.config import GanConfig
from melanogan.gan.losses import critic_loss, diff_augment, generator_loss, gradient_penalty, wasserstein_estimate
from melanogan.runtime import (
    RunLog,
    TrainingBar,
    ddp_strategy,
    fabric_loggers,
    fabric_precision,
    not_used_note,
    shutdown_distributed,
)

CLASS_NAMES = {0: "other", 1: "melanoma"}


class GanDivergedError(MelanoganError):
    """Losses became NaN/inf or the Wasserstein estimate exploded; the last good checkpoint is kept."""


def step_seed(seed: int, step: int, rank: int, purpose: int) -> int:
    """A well-mixed 63-bit seed for one step's randomness of one kind on one rank."""
    return int(np.random.SeedSequence([seed, step, rank, purpose]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


PRELOAD_MAX_BYTES = 2 * 2**30


class BatchSource:
    """Draws training batches from the training split only (`train_splits`, which only the original
    protocol's reproduction widens), optionally class-balanced."""

    def __init__(self, data_dir: Path, cfg: GanConfig, preload: bool = True):
        manifest = load_manifest(data_dir)
        train = manifest[manifest["split"].isin(cfg.train_splits) & manifest["label"].isin(cfg.classes)]
        for c in cfg.classes:
            if not (train["label"] == c).any():
                raise MelanoganError(f"{data_dir}: the training split has no {CLASS_NAMES[c]} image, so the GAN "
                                     f"cannot learn that class. Check the manifest (melanogan audit {data_dir}) "
                                     "or set classes in the config.")
        preset = eval_preset(cfg.resolution, "tanh")
        self.dataset = CachedImageDataset(data_dir, cfg.train_splits, transform=preset, labels=cfg.classes,
                                          manifest=manifest)
        self.resize, self.to_float = preset.transforms  # the preset's two stages, applied apart when preloaded
        self.by_class = {c: np.flatnonzero(self.dataset.labels == c) for c in cfg.classes}
        self.cfg = cfg
        self.counts = {CLASS_NAMES[c]: len(v) for c, v in self.by_class.items()}
        # Every image resized once, kept as uint8: a step draws n_critic batches, and resizing them
        # image by image on the host starved a GPU. Bounded so a large dataset at high resolution
        # falls back to reading the memory-mapped cache per image.
        self.preloaded: torch.Tensor | None = None
        if preload and len(self.dataset) * 3 * cfg.resolution ** 2 <= PRELOAD_MAX_BYTES:
            self.preloaded = torch.stack([self.resize(self.dataset.raw(i)) for i in range(len(self.dataset))])

    def batch(self, size: int, seed: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch drawn with `seed`: a DDP run sees the same global
        batches as a single process would."""
        rng = np.random.default_rng(seed)
        classes = list(self.by_class)
        if self.cfg.balance_classes and len(classes) > 1:
            labels = rng.choice(classes, size=size)
            index = np.array([rng.choice(self.by_class[c]) for c in labels])
        else:
            index = rng.integers(0, len(self.dataset), size=size)
            labels = self.dataset.labels[index]
        part = slice(rank * size // world, (rank + 1) * size // world)
        if self.preloaded is not None:  # same values as the per-image path (the float stage is per pixel)
            images = self.to_float(self.preloaded[torch.as_tensor(index[part])])
        else:
            images = torch.stack([self.dataset[int(i)][0] for i in index[part]])
        return images, torch.as_tensor(np.asarray(labels)[part], dtype=torch.long)


def make_adam(module: nn.Module, cfg: GanConfig) -> torch.optim.Optimizer:
    """Adam with the fused kernel (one pass over all tensors: 5x faster than the loop on CPU)."""
    return torch.optim.Adam(module.parameters(), lr=cfg.lr, betas=tuple(map(float, cfg.betas)), fused=True)


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA decay used after generator step `step` (0-based): `decay`, warmed up as TensorFlow's
    ExponentialMovingAverage with num_updates does, min(decay, (1 + step) / (10 + step)). Why: without
    it the EMA generator keeps decay**steps of its random initial weights (0.999**1000 = 37%: a
    1,000-step run sampled grey noise from the EMA while the raw generator drew lesions, measured
    on the GPU run of the #12 study)."""
    return min(decay, (1 + step) / (10 + step))


def ema_initial_share(decay: float, steps: int, warmup: bool = True) -> float:
    """Share of the EMA generator's weights still the random initial ones after `steps` updates."""
    if not warmup:
        return decay ** steps
    share = 1.0
    for step in range(steps):
        share *= ema_decay_at(decay, step)
        if share < 1e-12:
            return 0.0
    return share


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


@torch.no_grad()
def sample_grid(generator: nn.Module, cfg: GanConfig, per_class: int = 8,
                device: torch.device | None = None) -> torch.Tensor:
    """Fixed-noise samples, one row per learned class, as a [0, 1] image grid tensor."""
    from torchvision.utils import make_grid

    device = device or next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    g = _generator(torch.device("cpu"), cfg.seed + 7919)
    rows = []
    z = torch.randn(per_class, cfg.noise_dim, generator=g)  # same noise in every row: conditioning shows
    for c in cfg.classes:
        labels = torch.full((per_class,), c, dtype=torch.long)
        rows.append(generator(z.to(device), labels.to(device)).float().cpu())
    generator.train(was_training)
    if cfg.resolution < 96:  # small samples are unreadable at 1:1
        rows = [torch.nn.functional.interpolate(r, scale_factor=96 // cfg.resolution, mode="nearest") for r in rows]
    return make_grid(torch.cat(rows), nrow=per_class, normalize=True, value_range=(-1, 1), padding=2)


def save_image(tensor: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = (tensor.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy())
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def plot_losses(run_dir: Path) -> Path | None:
    """losses.png from stats.jsonl."""
    stats_path = run_dir / "stats.jsonl"
    if not stats_path.is_file():
        return None
    records = [json.loads(line) for line in stats_path.read_text().splitlines() if line.strip()]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["wasserstein"] for r in records], label="Wasserstein estimate")
    axes[0].plot(steps, [r["critic_loss"] for r in records], label="critic loss (incl. GP)", alpha=0.7)
    axes[1].plot(steps, [r["generator_loss"] for r in records], color="C2", label="generator loss")
    axes[2].plot(steps, [r["gradient_penalty"] for r in records], color="C3", label="gradient penalty")
    for ax in axes:
        ax.set_xlabel("generator step")
        ax.legend()
        ax.grid(alpha=0.3)
    out = run_dir / "samples" / "losses.png"
    out.parent.mkdir(exist_ok=True)
    save_figure(fig, out)
    return out


def _truncate_stats(path: Path, step: int) -> None:
    """After a resume, drop records written after the checkpoint (they will be written again)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text(path, "".join(line + "\n" for line in lines))


def prepare_run_dir(run_dir: Path, cfg: GanConfig, resume: bool,
                    resume_steps: int | None = None) -> tuple[GanConfig, Path | None]:
    """Check the run folder, and on resume return the checkpoint's config (with its total steps
    raised to `resume_steps` if given) and path."""
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
    if resume:
        if ckpt is None:
            if (run_dir / "config.yaml").is_file():
                return cfg, None  # started but never checkpointed: start over
            raise MelanoganError(f"{run_dir}: nothing to resume (no checkpoint). Drop --resume to start a new run.")
        saved = json.loads((ckpt / "state.json").read_text())["config"]
        resumed = GanConfig(**{**saved, "steps": max(resume_steps or 0, saved["steps"])})
        return resumed, ckpt
    if ckpt is not None or (run_dir / "stats.jsonl").is_file():
        raise MelanoganError(f"{run_dir}: already holds a GAN run. Pass --resume to continue it, or a new --out.")
    return cfg, None


def train_gan(
    data_dir: Path,
    run_dir: Path,
    cfg: GanConfig,
    resume: bool = False,
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    precision: str = "auto",
    progress: bool = True,
    stop_after: int | None = None,
    resume_steps: int | None = None,
    logger: str | None = None,
    requested: Iterable[str] = (),
) -> dict:
    """Train (or resume) a cWGAN-GP; returns a summary. On resume the run's own config is used
    (`cfg` is ignored) and `resume_steps` may extend its total steps; the fields of `cfg` named in
    `requested` (those the user set explicitly) that differ from the run's are listed in the summary's
    notes as not used. `stop_after` ends this invocation after that many steps (the run stays
    resumable): for time-boxed CPU sessions. `logger`: csv or tensorboard beside stats.jsonl
    (runtime.fabric_loggers)."""
    from lightning_fabric import Fabric

    fabric_prec = fabric_precision(precision, accelerator)
    run_dir = Path(run_dir)
    given = cfg
    cfg, ckpt = prepare_run_dir(run_dir, cfg, resume, resume_steps)
    # in the config's own field order: `requested` is a set, and a note must read the same from run to run
    wanted = set(requested)
    asked = {k: getattr(given, k) for k in GanConfig.model_fields if k in wanted}
    ignored = not_used_on_resume(asked, cfg) if ckpt and asked else None
    previous = read_json(run_dir / "run.json") if ckpt and (run_dir / "run.json").is_file() else None
    switched = precision_switch_note(previous, fabric_prec)
    BatchSource(data_dir, cfg, preload=False)  # fail early, in the launching process, on an empty class
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, precision=fabric_prec,
                    loggers=fabric_loggers(logger, run_dir),
                    strategy=ddp_strategy(devices * num_nodes))
    summary = fabric.launch(_train_worker, Path(data_dir), run_dir, cfg, str(ckpt) if ckpt else None,
                            fabric_prec, progress, stop_after, previous)
    return {**summary, "notes": [n for n in (ignored, switched) if n]}


def precision_history(previous: dict | None, start_step: int, precision: str) -> list[dict]:
    """The precision each stretch of a run's steps was trained in, for run.json. Precision is not part
    of the GAN's config: a run may be resumed in another one (on another machine, say), and `run.json`'s
    `precision` then names only the latest. The history keeps the earlier stretches, so a run trained
    partly in 32 and partly in bf16 does not read as one or the other. Stretches that start at or after
    `start_step` are dropped: a resume from an earlier checkpoint trains those steps again."""
    if previous and previous.get("precision_history"):
        history = [h for h in previous["precision_history"] if h["from_step"] < start_step]
    elif previous and previous.get("precision") and start_step > 0:  # a run.json from before the history
        history = [{"from_step": 0, "precision": previous["precision"]}]
    else:
        history = []
    if not history or history[-1]["precision"] != precision:
        history.append({"from_step": start_step, "precision": precision})
    return history


def precision_switch_note(previous: dict | None, precision: str) -> str | None:
    """Said when a resumed run continues in another precision than its last stretch (the resumed part
    then follows other arithmetic than the steps before, and is not bitwise what an uninterrupted run
    would have given)."""
    last = (previous or {}).get("precision")
    if not last or last == precision:
        return None
    return (f"resumed in precision {precision}; the run's steps so far were trained in {last} (run.json's "
            f"precision_history records each stretch). Pass --precision {last} to continue as it was trained.")


def not_used_on_resume(requested: dict, resumed: GanConfig) -> str | None:
    """A resumed run continues with its own config (its checkpoints, schedule and samples belong to one
    run; only its total steps may grow). Settings the user asked for with --resume that differ from it
    are therefore not used; this says which, instead of dropping them silently. `requested` holds only
    what was asked for explicitly (an option, a --config file's fields, a preset other than the default),
    so a preset's values the run had overridden at its start are not mistaken for a request."""
    differ = []
    for key, mine in requested.items():
        theirs = getattr(resumed, key)
        if mine != theirs:
            why = " (--steps can extend a resumed run, not shorten it; --max-steps pauses it)" if key == "steps" else ""
            differ.append(f"{key} {mine!r} (the run's: {theirs!r}){why}")
    return not_used_note(differ, "its checkpoint's config")


def _train_worker(fabric, data_dir: Path, run_dir: Path, cfg: GanConfig, ckpt: str | None, precision: str,
                  progress: bool, stop_after: int | None, previous: dict | None = None) -> dict:
    """WGAN-GP (Gulrajani et al. 2017, Algorithm 1) with class labels: each generator step follows
    n_critic critic steps on real and generated batches with the gradient penalty; the EMA generator
    follows the generator. Logging, checkpoints, KID and sample grids run after each step."""
    source = BatchSource(data_dir, cfg)
    models = _GanModels.build_or_load(fabric, cfg, ckpt)
    if fabric.global_rank == 0:
        _write_run_info(fabric, data_dir, run_dir, cfg, source, precision, models.start_step, previous)
    fabric.barrier()
    if cfg.batch_size % fabric.world_size:
        raise MelanoganError(f"batch size {cfg.batch_size} must be divisible by the number of processes "
                             f"({fabric.world_size}).")
    steps = _GanSteps(fabric, cfg, source, models)
    end_step = cfg.steps if stop_after is None else min(cfg.steps, models.start_step + stop_after)
    after = _AfterStep(fabric, data_dir, run_dir, cfg, models, end_step, progress)
    try:
        for step in range(models.start_step, end_step):
            models.set_lr(cfg.lr_at(step))
            for k in range(cfg.n_critic):
                labels = steps.critic_step(step, k)
            steps.generator_step(step, labels)
            after.step(step + 1, steps)
    finally:
        after.close()
    shutdown_distributed(fabric)
    return {"run_dir": str(run_dir), "step": end_step, "finished": end_step >= cfg.steps,
            "training_images": source.counts}


class _GanModels:
    """Generator, critic, EMA generator and their optimizers, set up for Fabric."""

    @classmethod
    def build_or_load(cls, fabric, cfg: GanConfig, ckpt: str | None) -> _GanModels:
        self = cls()
        device, world = fabric.device, fabric.world_size
        self.start_step, loaded = 0, None
        if ckpt:
            loaded = load_checkpoint(Path(ckpt))
            if loaded["critic"] is None:
                raise MelanoganError(f"{ckpt}: holds no critic.safetensors (a copy for sampling only), so training "
                                     "cannot resume from it. Resume from the full checkpoint where it was trained.")
            generator, critic, generator_ema = loaded["generator"], loaded["critic"], loaded["generator_ema"]
            self.start_step = loaded["step"]
        else:
            torch.manual_seed(cfg.seed)  # identical initial weights on every rank
            generator, critic = build_models(cfg)
            generator_ema = copy.deepcopy(generator) if cfg.ema_decay else None
        if world > 1 and device.type == "cuda":  # small per-GPU batches: generator BN statistics over all GPUs
            generator = nn.SyncBatchNorm.convert_sync_batchnorm(generator)
            if generator_ema is not None:
                generator_ema = nn.SyncBatchNorm.convert_sync_batchnorm(generator_ema)
        self.channels_last = device.type == "cpu"  # 1.6-1.8x for convolutions on CPU (measured)
        if self.channels_last:
            generator = generator.to(memory_format=torch.channels_last)
            critic = critic.to(memory_format=torch.channels_last)
        opt_g, opt_d = make_adam(generator, cfg), make_adam(critic, cfg)
        self.generator, self.opt_g = fabric.setup(generator, opt_g)
        self.critic, self.opt_d = fabric.setup(critic, opt_d)
        if loaded is not None and loaded["optimizers"] is not None:
            # After setup: load_state_dict puts the moments on each parameter's device. Loaded before
            # it, they stayed on the CPU and the fused Adam step failed on a GPU at resume.
            opt_g.load_state_dict(loaded["optimizers"]["generator"])
            opt_d.load_state_dict(loaded["optimizers"]["critic"])
        self.raw_critic, self.raw_generator = self.critic.module, self.generator.module
        self.generator_ema = generator_ema
        if generator_ema is not None:
            self.generator_ema = generator_ema.to(device)
            self.generator_ema.eval()
            _set_requires_grad(self.generator_ema, False)
        return self

    @property
    def sampler(self) -> nn.Module:
        """The generator that samples and is scored: the EMA one when the run has it."""
        return self.generator_ema if self.generator_ema is not None else self.raw_generator

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = lr

    def save(self, run_dir: Path, step: int, cfg: GanConfig, **kwargs) -> None:
        save_checkpoint(run_dir, step, cfg, self.raw_generator, self.raw_critic, self.generator_ema, self.opt_g,
                        self.opt_d, **kwargs)


def _write_run_info(fabric, data_dir: Path, run_dir: Path, cfg: GanConfig, source: BatchSource, precision: str,
                    start_step: int, previous: dict | None) -> None:
    """`previous`: the run.json a resumed run had (None for a new run), for the precision history."""
    space = data_space(data_dir)
    packed = read_json(Path(data_dir) / "prepare.json").get("packed") if space else None  # space: it exists
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    write_json(run_dir / "run.json", {
        "melanogan_version": __version__, "data_dir": str(Path(data_dir).resolve()),
        "manifest_hash": manifest_hash(load_manifest(data_dir)), "training_images": source.counts,
        "trained_on_split": ",".join(cfg.train_splits), "precision": precision,
        "precision_history": precision_history(previous, start_step, precision), "world_size": fabric.world_size,
        "accelerator": fabric.device.type, "torch": torch.__version__,
        # The preprocessing the training pixels stand for: generated images are cached for it (also
        # when the GAN trained elsewhere, on a pack of the data: then `packed` says so).
        "data_space": space.to_dict() if space else None, **({"packed": packed} if packed else {}),
    })
    _truncate_stats(run_dir / "stats.jsonl", start_step)


class _GanSteps:
    """One critic step and one generator step. Every random draw is seeded by (seed, step, purpose), and
    by rank only for augmentation, so a resumed or multi-GPU run draws what a single run would."""

    def __init__(self, fabric, cfg: GanConfig, source: BatchSource, models: _GanModels) -> None:
        self.fabric, self.cfg, self.source, self.m = fabric, cfg, source, models
        self.rank, self.world, self.device = fabric.global_rank, fabric.world_size, fabric.device
        self.per_rank_batch = cfg.batch_size // self.world
        self.mine = slice(self.rank * self.per_rank_batch, (self.rank + 1) * self.per_rank_batch)
        self.acc: dict[str, list[torch.Tensor]] = {"critic_loss": [], "gradient_penalty": [], "wasserstein": [],
                                                   "generator_loss": []}
        self.images = 0  # real + generated images the critic scored since the last log record

    def critic_step(self, step: int, k: int) -> torch.Tensor:
        """max_D E[D(x)] - E[D(G(z))] - lambda * GP on this rank's part of the batch; returns its labels."""
        cfg, m, device = self.cfg, self.m, self.device
        real, labels = self.source.batch(cfg.batch_size, step_seed(cfg.seed, step, 0, 10 + k), self.rank, self.world)
        real, labels = real.to(device), labels.to(device)
        if m.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        g = _generator(device, step_seed(cfg.seed, step, 0, 100 + k))
        z = torch.randn(cfg.batch_size, cfg.noise_dim, device=device, generator=g)[self.mine]
        alpha = torch.rand(cfg.batch_size, 1, 1, 1, device=device, generator=g)[self.mine]
        g = _generator(device, step_seed(cfg.seed, step, self.rank, 200 + k))  # augmentation: per rank
        with torch.no_grad():
            fake = m.generator(z, labels)
        real_aug = diff_augment(real, cfg.diffaugment, g)
        fake_aug = diff_augment(fake.to(real.dtype), cfg.diffaugment, g)
        scores = m.critic(torch.cat([real_aug, fake_aug]), torch.cat([labels, labels])).float()
        d_real, d_fake = scores[:self.per_rank_batch], scores[self.per_rank_batch:]
        gp = gradient_penalty(m.raw_critic, real_aug, fake_aug, labels, alpha=alpha)
        loss_d = critic_loss(d_real, d_fake) + cfg.gp_lambda * gp
        m.opt_d.zero_grad(set_to_none=True)
        self.fabric.backward(loss_d)
        m.opt_d.step()
        self.images += self.per_rank_batch * self.world
        if k == cfg.n_critic - 1:  # logged: the last critic step before the generator's
            self.acc["critic_loss"].append(loss_d.detach())
            self.acc["gradient_penalty"].append(gp.detach())
            self.acc["wasserstein"].append(wasserstein_estimate(d_real, d_fake).detach())
        return labels

    def generator_step(self, step: int, labels: torch.Tensor) -> None:
        """min_G -E[D(G(z))] with the critic frozen, then the EMA update."""
        cfg, m, device = self.cfg, self.m, self.device
        _set_requires_grad(m.raw_critic, False)
        g = _generator(device, step_seed(cfg.seed, step, 0, 1000))
        z = torch.randn(cfg.batch_size, cfg.noise_dim, device=device, generator=g)[self.mine]
        g = _generator(device, step_seed(cfg.seed, step, self.rank, 2000))
        fake = m.generator(z, labels)
        with self.fabric.autocast():
            fake_scores = m.raw_critic(diff_augment(fake, cfg.diffaugment, g), labels)
        loss_g = generator_loss(fake_scores)
        m.opt_g.zero_grad(set_to_none=True)
        self.fabric.backward(loss_g)
        m.opt_g.step()
        _set_requires_grad(m.raw_critic, True)
        if m.generator_ema is not None:
            _update_ema(m.generator_ema, m.raw_generator, ema_decay_at(cfg.ema_decay, step))
        self.acc["generator_loss"].append(loss_g.detach())

    def take_means(self) -> tuple[dict[str, float], int]:
        """Mean of each logged loss since the last call (over ranks too) and the images scored."""
        means = {k: float(torch.stack(v).float().mean()) for k, v in self.acc.items()}
        if self.world > 1:
            means = {k: float(self.fabric.all_reduce(torch.tensor(v, device=self.device), reduce_op="mean"))
                     for k, v in means.items()}
        images, self.images = self.images, 0
        self.acc = {k: [] for k in self.acc}
        return means, images


class _AfterStep:
    """What happens after a generator step: the log record (and divergence check), checkpoints, KID
    with its best checkpoint, sample grids and the progress bar."""

    def __init__(self, fabric, data_dir: Path, run_dir: Path, cfg: GanConfig, models: _GanModels, end_step: int,
                 progress: bool) -> None:
        self.fabric, self.run_dir, self.cfg, self.m, self.end_step = fabric, run_dir, cfg, models, end_step
        rank0 = fabric.global_rank == 0
        self.kid = KidTracker(data_dir, cfg, run_dir) if cfg.kid_every and rank0 else None
        self.bar = TrainingBar("GAN", cfg.steps, models.start_step) if progress and rank0 else None
        self.log = RunLog(fabric, run_dir / "stats.jsonl")
        self.t_last = time.perf_counter()

    def step(self, done: int, steps: _GanSteps) -> None:
        cfg, last = self.cfg, done == self.end_step
        if done % cfg.log_every == 0 or done % cfg.checkpoint_every == 0 or last:
            means, images = steps.take_means()
            _check_divergence(means, done, cfg, self.run_dir)
            now = time.perf_counter()
            record = {"step": done, **{k: round(v, 6) for k, v in means.items()}, "lr": self.m.lr,
                      "img_per_s": round(images / max(now - self.t_last, 1e-9), 2), "time": time.time()}
            self.t_last = now
            self.log.write(record, done)
            if self.bar:
                self.bar.update(_status(record), completed=done)
        if done % cfg.checkpoint_every == 0 or last:
            if self.fabric.global_rank == 0:
                self.m.save(self.run_dir, done, cfg)
            self.fabric.barrier()
        if self.kid is not None and done % cfg.kid_every == 0:
            kid = self.kid.evaluate(self.m.sampler, done)
            if self.kid.improved:
                self.m.save(self.run_dir, done, cfg, extra={"kid": kid}, name="best-kid")
        if self.fabric.global_rank == 0 and (done % cfg.sample_every == 0 or last):
            save_image(sample_grid(self.m.sampler, cfg), self.run_dir / "samples" / f"step-{done:07d}.png")
            plot_losses(self.run_dir)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        self.log.close()


class KidTracker:
    """KID of generated melanomas against the validation melanomas (images the GAN never trains on:
    against its own training images, copying them would look best) every `kid_every` steps, logged
    to RUN_DIR/kid.jsonl; `improved` tells whether the last value is the best so far."""

    def __init__(self, data_dir: Path, cfg: GanConfig, run_dir: Path):
        from melanogan.gan.features import create_extractor, dataset_features

        self.cfg, self.run_dir = cfg, run_dir
        self.label = 1 if 1 in cfg.classes else cfg.classes[0]
        self.extractor = create_extractor(cfg.kid_features)
        try:
            real = CachedImageDataset(data_dir, "val", labels=[self.label])
        except DataError as exc:
            raise MelanoganError(f"{data_dir}: kid_every needs real validation images of class {self.label} to "
                                 f"select the best checkpoint by ({exc}); pass --kid-every 0.") from exc
        if len(real) < 2:
            raise MelanoganError(f"{data_dir}: the validation split has {len(real)} image(s) of class {self.label}; "
                                 "KID needs at least 2. Pass --kid-every 0, or prepare with a larger --val.")
        self.real = dataset_features(real, self.extractor, cache_dir=Path(data_dir) / "features")
        self.best = math.inf
        self.improved = False
        log = run_dir / "kid.jsonl"
        if log.is_file():  # resumed: the best so far is still the best
            values = [json.loads(x)["kid"] for x in log.read_text().splitlines() if x.strip()]
            self.best = min(values, default=math.inf)

    @torch.no_grad()
    def evaluate(self, generator: nn.Module, step: int) -> float:
        from melanogan.gan.quality import kid

        device = next(generator.parameters()).device
        was_training = generator.training
        generator.eval()
        g = _generator(torch.device("cpu"), step_seed(self.cfg.seed, 0, 0, 31337))  # same noise every time
        fakes = []
        for start in range(0, self.cfg.kid_samples, 64):
            n = min(64, self.cfg.kid_samples - start)
            z = torch.randn(n, self.cfg.noise_dim, generator=g).to(device)
            y = torch.full((n,), self.label, dtype=torch.long, device=device)
            imgs = generator(z, y).float().clamp(-1, 1).add(1).mul(127.5).round().byte().cpu()
            fakes.append(self.extractor(imgs).numpy())
        generator.train(was_training)
        value = kid(self.real, np.concatenate(fakes), seed=step)["mean"]
        self.improved = value < self.best
        self.best = min(self.best, value)
        append_jsonl(self.run_dir / "kid.jsonl", {"step": step, "kid": value, "features": self.extractor.name,
                                                 "reference": "val", "best": self.improved})
        return value


def _check_divergence(means: dict[str, float], step: int, cfg: GanConfig, run_dir: Path) -> None:
    bad = {k: v for k, v in means.items() if not math.isfinite(v)}
    if bad:
        raise GanDivergedError(f"training diverged at step {step}: {', '.join(f'{k}={v}' for k, v in bad.items())}. "
                               f"The last good checkpoint in {run_dir / 'checkpoints'} is kept; resume from it with a "
                               "lower --lr or a larger gp_lambda, or with --precision 32.")
    if abs(means["wasserstein"]) > cfg.max_wasserstein:
        raise GanDivergedError(f"training diverged at step {step}: the Wasserstein estimate "
                               f"{means['wasserstein']:.3g} exceeds {cfg.max_wasserstein:g}. The last good checkpoint "
                               f"in {run_dir / 'checkpoints'} is kept; lower the learning rate and resume.")


def _status(record: dict) -> str:
    return (f"W {record['wasserstein']:.3f} GP {record['gradient_penalty']:.3f} "
            f"G {record['generator_loss']:.3f} {record['img_per_s']:.1f} img/s")
