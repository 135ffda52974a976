"""`melanogan study CONFIG.yaml --out STUDY_DIR`: the original study's experiment, done right.

For each seed: one GAN trained on the training split only, N synthetic melanomas, then every arm
trained and evaluated on the same real test split (and any external test sets). Every stage
writes into its own folder and is skipped when already finished, so an interrupted study resumes.

STUDY_DIR/
  study.yaml                 the resolved config
  seed-S/gan/                GAN run;  seed-S/synthetic/  generated images
  seed-S/arms/ARM/           classifier run with eval-test/ (and eval-external-*/, shortcut_probe.json)
  original-protocol/         with `protocol: both`: the original (leaky) protocol, its own report
  report.md, report.html, figures/
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from melanogan.classify.evaluate import eval_dir_name, evaluate_run, run_cache_options, shortcut_probe
from melanogan.classify.train import TrainConfig, load_model, train_classifier
from melanogan.data.manifest import cache_for, load_manifest, manifest_hash
from melanogan.data.splits import split_by_image
from melanogan.errors import MelanoganError
from melanogan.fileio import read_json, write_json, write_parquet, write_text
from melanogan.gan.checkpoint import latest_checkpoint
from melanogan.gan.config import GanConfig, load_config
from melanogan.gan.sample import generate
from melanogan.gan.train import train_gan
from melanogan.study.layout import ORIGINAL_DIR, arm_dir
from melanogan.study.report import write_report

# What each arm changes relative to the baseline classifier options.
ARMS: dict[str, dict] = {
    "baseline": {},
    "weighted-loss": {"loss": "weighted"},
    "focal-loss": {"loss": "focal"},
    "oversample": {"sampler": "balanced"},
    "classic-aug": {"augment": "classic"},
    "gan": {"synthetic": True},
    "gan+classic-aug": {"synthetic": True, "augment": "classic"},
    # the baseline without the generator's resolution path: what `resolution: matched` costs it
    "baseline-native-res": {"native_resolution": True},
}
# The baseline is the recommended classifier (classic augmentation, diagnosis head where the data
# has diagnoses); an arm identical to it (classic-aug then) is refused. `classifier: {augment: none}`
# gives the original study's six-arm comparison.
DEFAULT_ARMS = ["baseline", "weighted-loss", "oversample", "gan", "baseline-native-res"]
ORIGINAL_ARMS = ["baseline", "weighted-loss", "oversample", "classic-aug", "gan", "gan+classic-aug"]


# TrainConfig fields that a study sets itself: the seeds (`seeds`), each arm's synthetic set, the
# generator's resolution path (`resolution`) and the diagnosis classes (from the data).
STUDY_OWNED = ("seed", "synthetic", "generator_resolution", "diagnosis_classes")

# The baseline classifier of every arm: every other TrainConfig field, with TrainConfig's own
# annotation, default and bounds. Built from TrainConfig rather than listed, so that a study can use
# any option `train` has (mixup, color_augment, select, ...) and its defaults can never drift from
# `train`'s; the cross-field checks run when StudyConfig builds each arm's TrainConfig.
ClassifierOptions = create_model(
    "ClassifierOptions",
    __config__=ConfigDict(extra="forbid"),
    __doc__="The baseline classifier of every arm: `TrainConfig`'s fields (but " + ", ".join(STUDY_OWNED)
            + ") and defaults.",
    **{name: (field.annotation, field) for name, field in TrainConfig.model_fields.items()
       if name not in STUDY_OWNED},
)


class GanOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preset: str = "default"
    overrides: dict = Field(default_factory=dict)  # any GanConfig field, e.g. resolution, steps
    precision: str = "auto"
    # Time-box a long GAN on a CPU: at most this many steps per `melanogan study` invocation; the arms
    # that need synthetic images wait (the others run) and the next invocation resumes the GAN.
    max_steps_per_invocation: int | None = Field(None, ge=1)
    # One GAN (the first seed's) whose synthetic set every classifier seed uses: for CPU budgets where
    # a GAN per seed is unaffordable. The seeds' spread then leaves out the GAN's own variance, and
    # the report says so.
    shared_across_seeds: bool = False


class StudyConfig(BaseModel):
    """A study: data, arms, seeds, classifier and GAN options."""

    model_config = ConfigDict(extra="forbid")
    data: str
    external: list[str] = Field(default_factory=list)
    arms: list[str] = Field(default_factory=lambda: list(DEFAULT_ARMS))
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    n_synthetic: int = 1000
    # Synthetic non-melanomas too, so that "synthetic" is not a proxy for the label.
    n_synthetic_other: int = Field(0, ge=0)
    # matched (the default with a gan arm): every arm's real training images pass through the
    # generator's down/up resampling path, as synthetic ones did; native: cache resolution.
    resolution: Literal["matched", "native"] | None = None
    classifier: ClassifierOptions = Field(default_factory=ClassifierOptions)
    gan: GanOptions = Field(default_factory=GanOptions)
    bootstrap: int = 1000
    # honest: this study. original: the original study's (leaky) protocol on the same data, to show
    # where its reported recall came from. both: the honest study, with the original protocol run
    # beside it (STUDY_DIR/original-protocol/) and compared in the report.
    protocol: Literal["honest", "original", "both"] = "honest"

    def model_post_init(self, _context) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; available: {', '.join(ARMS)}")
        if "baseline" not in self.arms:
            raise ValueError("the arms must include 'baseline': every arm is compared with it")
        if self.resolution is None:
            self.resolution = "matched" if self.uses_gan else "native"
        seen: dict[str, str] = {}
        for arm in self.arms:  # two arms that would train the same classifier compare nothing
            options, synthetic = self.arm_options(arm)
            try:  # refuse now what training would refuse hours later (e.g. color_augment lab with augment none)
                TrainConfig(**options)
            except ValidationError as exc:
                problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                raise ValueError(f"arm {arm!r}: its classifier options are not a valid `train` config: "
                                 f"{problems}") from None
            key = repr((sorted(options.items()), synthetic))
            if key in seen:
                raise ValueError(f"arms {seen[key]!r} and {arm!r} would train the same classifier with classifier "
                                 f"options {self.classifier.model_dump()}; drop one, or set e.g. "
                                 "`classifier: {augment: none}` to compare augmentation with none.")
            seen[key] = arm

    @property
    def uses_gan(self) -> bool:
        return any(ARMS[a].get("synthetic") for a in self.arms)

    @property
    def gan_resolution(self) -> int:
        return load_config(self.gan.preset, **self.gan.overrides).resolution

    def arm_options(self, arm: str) -> tuple[dict, bool]:
        """An arm's classifier options (TrainConfig fields, seed and synthetic paths aside) and whether
        it trains with synthetic images."""
        spec = dict(ARMS[arm])
        synthetic = spec.pop("synthetic", False)
        native = spec.pop("native_resolution", False)
        options = {**self.classifier.model_dump(), **spec}
        options["generator_resolution"] = self.gan_resolution if self.resolution == "matched" and not native else None
        return options, synthetic


def demo_study_config(data_dir: Path, seeds: list[int]) -> StudyConfig:
    """A study sized for minutes on 2 CPU cores: a 32px GAN, a small CNN at 64px, every default arm."""
    return StudyConfig(
        data=str(Path(data_dir).resolve()), seeds=seeds, n_synthetic=300, bootstrap=500,
        classifier=ClassifierOptions(model="small-cnn", image_size=64, epochs=12, patience=5, lr=2e-3),
        gan=GanOptions(preset="default", overrides={
            # no DiffAugment: over 600 steps it lowered sample diversity on the phantoms (measured)
            "resolution": 32, "generator_channels": 128, "critic_channels": 32, "n_critic": 3, "lr": 2e-4,
            "diffaugment": [],
            "ema_decay": 0.99, "steps": 600, "batch_size": 32, "log_every": 50, "sample_every": 300,
            "checkpoint_every": 200}),
    )


def load_study_config(path: Path) -> StudyConfig:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise MelanoganError(f"{path}: cannot read the study config ({exc}).") from exc
    try:
        cfg = StudyConfig(**data)
    except ValidationError as exc:  # model_post_init's ValueErrors too: pydantic wraps them
        raise MelanoganError(f"{path}: invalid study config: {exc}") from exc
    base = Path(path).resolve().parent
    resolve = (lambda p: str((base / p).resolve()) if not Path(p).is_absolute() else p)  # noqa: E731
    return cfg.model_copy(update={"data": resolve(cfg.data), "external": [resolve(e) for e in cfg.external]})


def _log(message: str, log: Callable[[str], None] | None) -> None:
    if log:
        log(message)


def original_protocol_config(cfg: StudyConfig, data_by_image: Path) -> StudyConfig:
    """The original study's protocol on `cfg`'s data (re-split by image into `data_by_image`): the GAN
    trained on every melanoma (validation and test ones too), the original 3-conv CNN at 224 px
    without augmentation or auxiliary head, no resolution control, one seed, baseline vs gan. The
    training budget is the honest study's, so the two differ in protocol only."""
    c = cfg.classifier
    return cfg.model_copy(update={
        "data": str(data_by_image), "external": [], "arms": ["baseline", "gan"], "seeds": cfg.seeds[:1],
        "n_synthetic_other": 0, "resolution": "native", "protocol": "original",
        "classifier": ClassifierOptions(model="original-cnn", image_size=224, augment="none", diagnosis_weight=0.0,
                                        epochs=c.epochs, max_minutes=c.max_minutes, batch_size=c.batch_size,
                                        lr=c.lr, patience=c.patience, precision=c.precision, workers=c.workers),
        "gan": cfg.gan.model_copy(update={"overrides": {**cfg.gan.overrides,
                                                        "train_splits": ["train", "val", "test"]}}),
    })


def split_data_by_image(data: Path, out: Path, seed: int) -> Path:
    """A DATA_DIR whose manifest is `data`'s re-split image by image (group and cluster ids kept, so
    the audit shows the leak), sharing `data`'s cache."""
    out = Path(out)
    if (out / "manifest.parquet").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(data)
    labeled = manifest["label"].isin([0, 1]) & (manifest["source"] != "synthetic")
    manifest = manifest[labeled].copy()
    manifest["split"] = split_by_image(manifest["label"], seed=seed).to_numpy()
    info = read_json(Path(data) / "prepare.json")
    link = out / "cache"
    if not link.exists():
        link.symlink_to((Path(data) / "cache").resolve(), target_is_directory=True)
    write_json(out / "prepare.json", {**info, "protocol": "original (split by image: leaky)",
                                      "derived_from": str(Path(data).resolve())})
    write_parquet(out / "manifest.parquet", manifest)  # last: its presence marks the folder complete
    return out


def same_study_config(saved: object, cfg: StudyConfig) -> bool:
    """Whether a study folder's saved study.yaml (`saved`, as parsed) is `cfg`. A study.yaml written
    before an option existed holds no key for it: it is read with that option's default (what the
    study ran with), so adding an option does not orphan the studies already run."""
    try:
        saved = StudyConfig.model_validate(saved).model_dump(mode="json")
    except (ValueError, TypeError):
        return False  # not a config this version reads
    return saved == cfg.model_dump(mode="json")


def run_study(cfg: StudyConfig, out: Path, log: Callable[[str], None] | None = print, progress: bool = True) -> Path:
    """Run (or resume) every stage; returns the path of report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study_file = out / "study.yaml"
    if study_file.is_file() and not same_study_config(yaml.safe_load(study_file.read_text()), cfg):
        raise MelanoganError(f"{out}: holds a study with a different config ({study_file}). Use a new --out, "
                             "or the same config to resume it.")
    write_text(study_file, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    load_manifest(Path(cfg.data))  # clear error if the data is not prepared
    if cfg.protocol == "original":
        cfg = original_protocol_config(cfg, split_data_by_image(Path(cfg.data), out / "data-by-image", cfg.seeds[0]))
        _log("LEAKY: running the original study's protocol (images split without regard to patient or lesion, "
             "the GAN trained on every melanoma); its numbers do not estimate performance on new patients", log)
    _run_arms(cfg, out, log, progress)
    if cfg.protocol == "both":
        original = out / ORIGINAL_DIR
        ocfg = original_protocol_config(cfg, split_data_by_image(Path(cfg.data), original / "data-by-image",
                                                                 cfg.seeds[0]))
        _log(f"the original (leaky) protocol beside it, in {original}", log)
        _run_arms(ocfg, original, log, progress)
        write_report(original, ocfg)
    report = write_report(out, cfg)
    _log(f"report: {report} and {report.with_suffix('.html')}", log)
    return report


def _run_arms(cfg: StudyConfig, out: Path, log, progress: bool) -> None:
    """Every seed's GAN, synthetic images, arms and synthetic-image quality, each skipped when done."""
    data = Path(cfg.data)
    for seed in cfg.seeds:
        gan_seed = cfg.seeds[0] if cfg.gan.shared_across_seeds else seed
        seed_dir = out / f"seed-{gan_seed}"
        syn_dir = seed_dir / "synthetic"
        gan_ready = True
        if cfg.uses_gan:
            gan_ready = _gan_stage(cfg, data, seed_dir, gan_seed, log, progress)
        for arm in cfg.arms:
            if gan_ready or not ARMS[arm].get("synthetic"):
                _arm_stage(cfg, data, arm_dir(out, seed, arm), arm, seed, syn_dir, log, progress)
        if cfg.uses_gan and gan_ready and not (syn_dir / "quality" / "quality.json").is_file():
            from melanogan.gan.evaluate import evaluate_gan

            _log(f"seed {gan_seed}: scoring the synthetic images against real validation images the GAN never saw "
                 "(pixels and baseline-classifier features; memorisation against the training split)", log)
            evaluate_gan(syn_dir, data, syn_dir / "quality", split="val",
                         features=["pixels", f"classifier:{arm_dir(out, gan_seed, 'baseline')}"])


_GAN_BOOKKEEPING = {"steps", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints", "kid_every",
                    "kid_features", "kid_samples", "max_wasserstein"}


def _gan_stage(cfg: StudyConfig, data: Path, seed_dir: Path, seed: int, log, progress: bool) -> bool:
    """Train (or resume) the seed's GAN and generate its synthetic set; False while a time-boxed GAN
    is not finished."""
    gan_dir, syn_dir = seed_dir / "gan", seed_dir / "synthetic"
    gan_cfg = load_config(cfg.gan.preset, **{**cfg.gan.overrides, "seed": seed})
    ckpt = latest_checkpoint(gan_dir) if gan_dir.exists() else None
    if (gan_dir / "run.json").is_file():  # e.g. a GAN trained on a GPU machine and put here: same data?
        trained, ours = read_json(gan_dir / "run.json").get("manifest_hash"), manifest_hash(load_manifest(data))
        if trained != ours:
            raise MelanoganError(f"{gan_dir}: this GAN was trained on data with manifest hash {trained}, but the "
                                 f"study's data {data} has {ours}; its synthetic images would not be the study's. "
                                 "Move the folder away to train the study's GAN again.")
    if ckpt is not None:  # and with the study's settings (steps aside: a GAN may be extended; and bookkeeping)
        saved = GanConfig(**read_json(ckpt / "state.json")["config"]).model_dump(exclude=_GAN_BOOKKEEPING)
        differ = sorted(k for k, v in gan_cfg.model_dump(exclude=_GAN_BOOKKEEPING).items() if saved.get(k) != v)
        if differ:
            raise MelanoganError(f"{gan_dir}: this GAN was trained with other settings than the study's gan options "
                                 f"({', '.join(f'{k}: {saved.get(k)!r} vs {getattr(gan_cfg, k)!r}' for k in differ)})"
                                 ". Fix the study config or move the folder away.")
    done_step = read_json(ckpt / "state.json")["step"] if ckpt else 0
    if done_step < gan_cfg.steps:
        _log(f"seed {seed}: training the GAN ({gan_cfg.preset}, {gan_cfg.resolution}px, {gan_cfg.steps} steps"
             + (f", resuming at {done_step}" if ckpt else "") + ")", log)
        summary = train_gan(data, gan_dir, gan_cfg, resume=ckpt is not None or (gan_dir / "config.yaml").is_file(),
                            precision=cfg.gan.precision, progress=progress,
                            stop_after=cfg.gan.max_steps_per_invocation)
        if not summary["finished"]:
            _log(f"seed {seed}: GAN paused at step {summary['step']} of {gan_cfg.steps} (max_steps_per_invocation); "
                 "the arms with synthetic images wait: run the same `melanogan study` command again to go on", log)
            return False
    else:
        _log(f"seed {seed}: GAN already trained", log)
    manifest = syn_dir / "manifest.parquet"
    wanted = {1: cfg.n_synthetic, 0: cfg.n_synthetic_other}
    have = load_manifest(syn_dir)["label"].value_counts().to_dict() if manifest.is_file() else {}
    if any(have.get(label, 0) != n for label, n in wanted.items()):
        _log(f"seed {seed}: generating {cfg.n_synthetic} synthetic melanomas"
             + (f" and {cfg.n_synthetic_other} synthetic non-melanomas" if cfg.n_synthetic_other else ""), log)
        if syn_dir.exists():
            import shutil

            shutil.rmtree(syn_dir)
        generate(gan_dir, cfg.n_synthetic, "melanoma", syn_dir, seed=seed)
        if cfg.n_synthetic_other:
            generate(gan_dir, cfg.n_synthetic_other, "other", syn_dir, seed=seed)
        _log(f"seed {seed}: generator {read_json(syn_dir / 'prepare.json')['generator']}", log)
    return True


def _arm_stage(cfg: StudyConfig, data: Path, run_dir: Path, arm: str, seed: int, syn_dir: Path, log,
               progress: bool) -> None:
    if (run_dir / "eval-test" / "metrics.json").is_file() and all(
            (run_dir / eval_dir_name(Path(e), "all", True) / "metrics.json").is_file() for e in cfg.external):
        _log(f"seed {seed}: {arm} already done", log)
        return
    options, uses_synthetic = cfg.arm_options(arm)
    train_cfg = TrainConfig(**options, synthetic=[str(syn_dir)] if uses_synthetic else [], seed=seed)
    if not (run_dir / "best" / "state.json").is_file() or not (run_dir / "done.json").is_file():
        resume = (run_dir / "last" / "state.json").is_file()
        _log(f"seed {seed}: training {arm}" + (" (resuming)" if resume else ""), log)
        if not resume and run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)  # started but never checkpointed
        summary = train_classifier(data, run_dir, train_cfg, resume=resume, progress=progress)
        write_json(run_dir / "done.json", summary)
    _log(f"seed {seed}: evaluating {arm}", log)
    evaluate_run(run_dir, split="test", bootstrap=cfg.bootstrap, log=lambda m: _log(m, log))
    if uses_synthetic:  # does resampling alone make the model call benign validation images melanoma?
        model, model_cfg, _ = load_model(run_dir / "best")
        probe = shortcut_probe(model, model_cfg.image_size, data, cfg.gan_resolution,
                               cache=cache_for(data, run_cache_options(run_dir)), metadata_fields=model_cfg.metadata)
        write_json(run_dir / "shortcut_probe.json", probe)
        if probe["warning"]:
            _log(f"seed {seed}: WARNING {arm} scores benign validation images higher after the generator's "
                 f"{cfg.gan_resolution} px resampling alone (mean probability {probe['mean_before']:.3f} -> "
                 f"{probe['mean_after']:.3f}): it may have learned a resolution shortcut", log)
    for ext in cfg.external:
        evaluate_run(run_dir, data_dir=Path(ext), split="all", bootstrap=cfg.bootstrap, log=lambda m: _log(m, log))
