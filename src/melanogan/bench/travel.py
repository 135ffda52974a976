"""`melanogan bench travel`: does the default pipeline travel to a source it never saw?

Leave one source out over the three sources of ../shared/data (HAM10000, the ISIC 9-class set,
Derm7pt): train on two, split the third by patient/lesion into a part to choose on and a part to
report on (never overlapping), and report on the second part: ROC-AUC, and sensitivity/specificity
at the validation-chosen threshold (which does not travel) and at the threshold `calibrate` chose on
the first part. The same command takes `--model efficientnet_b0 --weights imagenet --image-size 256`
(the ISIC winners' recipe) for a user with a GPU and internet; we have not measured that here.

Levers (`--vary KEY=VALUE`, repeatable): each changes one setting of the defaults, is run under the
same protocol and seed, and is compared with the defaults by a paired cluster bootstrap on the same
report images, Holm-adjusted over every lever and held-out source. One factor at a time, so each
difference is that lever's own effect. `gan=N` is the GAN arm under the same protocol: a cWGAN-GP
trained on the training sources only, N synthetic images of each class added to the classifier's
training set, the GAN's minutes reported beside the classifier's. `--repeats N` trains everything
with N training seeds and compares each lever over all of them, since one time-budgeted run moves by
up to 0.03 of AUC."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from melanogan.classify import metrics as M

SOURCES = {"ham10000": ("ham10000", "ham10000_224"), "isic9": ("folder", "isic9_180"),
           "derm7pt": ("derm7pt", "derm7pt_384")}
# What each lever changes: the cached pixels (prepare), the training run, or only the evaluation
# (then the defaults' trained model is reused: TTA costs no training).
LEVERS = {"resize_mode": "prepare", "color_constancy": "prepare", "hair_removal": "prepare", "hair_method": "prepare",
          "white_level": "prepare", "clahe": "prepare",
          "image_size": "train", "augment": "train", "color_augment": "train",
          "style_augment": "train", "illumination_augment": "train", "crop_aspect": "train", "grayscale": "train",
          "mixup": "train",
          "coral": "train",
          "excised_weight": "train", "diagnosis_weight": "train", "diagnosis_vocabulary": "train",
          "sampler": "train", "loss": "train", "model": "train", "lr": "train", "weight_decay": "train",
          "select": "train", "weight_average": "train",
          "minutes": "train", "epochs": "train", "patience": "train", "ensemble": "train",
          "gan": "train", "gan_steps": "train", "gan_resolution": "train", "gan_preset": "train",
          "tta": "evaluate", "adapt": "evaluate", "adapt_layers": "evaluate"}
# The site name under which the `adapt` lever's calibration (with its batch-normalisation statistics)
# is stored beside the run, apart from the plain "choose" calibration of the site threshold; a variant
# adapting only the first N layers gets "-N", so two adapt variants of one run never share a site.
ADAPTED_SITE = "choose-batchnorm"
# ... and the `adapt=head` lever's (the head refitted on the choose part's labelled images).
REFIT_SITE = "choose-head"


# Training levers that are TrainConfig fields as they are (image_size is set for every variant;
# minutes, epochs and ensemble become the budget and the members).
# A patience no run reaches: early stopping off (the clock budget, or patience=off with epochs).
_NEVER_STOP = 1000
_CONFIG_LEVERS = ("augment", "color_augment", "style_augment", "illumination_augment", "crop_aspect", "grayscale",
                  "mixup", "coral",
                  "excised_weight", "diagnosis_weight", "diagnosis_vocabulary", "sampler", "loss", "select",
                  "weight_average", "lr", "weight_decay")

# Levers that are the training budget: --match-steps (which fixes the budget) refuses them.
_BUDGET_LEVERS = {"minutes", "epochs", "patience", "ensemble"}


def _trains(settings: dict, defaults: dict) -> bool:
    """Whether a variant trains a model of its own: it changes a setting of prepare or train (an
    evaluation-only lever, TTA or adapt, rescores the defaults' model)."""
    return any(settings[k] != defaults.get(k) for k, stage in LEVERS.items() if stage != "evaluate" and k in settings)


def is_control(settings: dict, defaults: dict, model: str) -> bool:
    """Whether a variant sets only values the defaults already have (e.g. `augment=classic`): an
    identical-settings control. `run` trains it a model of its own (at the defaults' steps with
    --match-steps) instead of reusing the defaults' one, so its difference from the defaults is what
    this protocol reads for a lever that changes nothing: training noise (CPU arithmetic is not
    bit-reproducible) and, with --match-steps, the step schedule against the clock's. The ledger
    judges levers beside it, not it by the rule."""
    from melanogan.classify.train import TrainConfig
    from melanogan.data.cache import CacheOptions

    config, cache = TrainConfig(), CacheOptions()
    own = {**{k: getattr(config, k) for k in _CONFIG_LEVERS},
           **{k: getattr(cache, k) for k, stage in LEVERS.items() if stage == "prepare"}, "model": model, **defaults}
    return all(k in own and own[k] == v for k, v in settings.items())


# The GAN arm (`gan=N`): a cWGAN-GP trained on the training sources' train split only (never on the
# held-out source), N synthetic melanomas and N synthetic non-melanomas added to the classifier's
# training set (both classes, so that "synthetic" cannot stand for the label), the classifier's own
# budget unchanged. What the other gan_* keys default to:
# - gan_steps 600: ~1.4 s per generator step on 2 cores in fp32 at 64 px with the cpu preset (about
#   14 minutes), so that prepare (<= 2) + GAN + the 8-minute classifier stay within #15's 25
#   CPU-minutes. A GPU affords the study's 20,000 (`--vary gan=1000+gan_steps=20000+gan_preset=default`).
# - gan_preset cpu: the 2-core study's GAN (studies/shared-data-cpu.yaml): the default preset at half
#   width with a faster learning rate and a shorter EMA, for runs of a few hundred to a few thousand
#   steps; default: the shipped preset as it is.
GAN_DEFAULTS = {"gan": 0, "gan_steps": 600, "gan_resolution": 64, "gan_preset": "cpu"}
GAN_PRESETS = {"cpu": ("default", {"generator_channels": 128, "critic_channels": 32, "lr": 2e-4, "ema_decay": 0.995}),
               "default": ("default", {})}


def parse_levers(vary: tuple[str, ...]) -> list[tuple[str, dict[str, object]]]:
    """["resize_mode=lesion", "epochs=30+patience=off", ...] -> [(name, {key: typed value})], every value
    checked before any work. A variant joins settings with "+" when they only make sense together
    (an epoch count without early stopping): it is still one variant, compared with the defaults."""
    from melanogan.errors import MelanoganError

    out = []
    for item in vary:
        settings: dict[str, object] = {}
        for part in item.split("+"):
            key, value = _parse_setting(item, part)
            if key in settings:
                raise MelanoganError(f"--vary {item!r} sets {key} twice.")
            settings[key] = value
        # joined settings that would silently override one another are refused: one budget per variant
        if "epochs" in settings and ("minutes" in settings or "ensemble" in settings):
            other = "minutes" if "minutes" in settings else "ensemble"
            raise MelanoganError(f"--vary {item!r}: epochs and {other} are two budgets (an epoch count; the "
                                 "clock, split between members for an ensemble); join one of them only.")
        if settings.get("adapt", "none") != "none" and (settings.get("tta", 1) > 1 or settings.get("ensemble", 1) > 1):
            # the adapted statistics belong to one model's single views (as `predict --site` refuses TTA)
            raise MelanoganError(f"--vary {item!r}: adapt applies to one model scored without TTA; join it to "
                                 "neither tta nor ensemble.")
        if "hair_method" in settings and settings.get("hair_removal") is not True:
            raise MelanoganError(f"--vary {item!r}: hair_method says which mask hair removal inpaints; join "
                                 "hair_removal=true, e.g. hair_removal=true+hair_method=blackhat.")
        if "adapt_layers" in settings and settings.get("adapt") != "batchnorm":
            raise MelanoganError(f"--vary {item!r}: adapt_layers says how many layers adapt=batchnorm adapts; join "
                                 "them, e.g. adapt=batchnorm+adapt_layers=3.")
        gan_keys = sorted(k for k in settings if k.startswith("gan_"))
        if gan_keys and "gan" not in settings:  # a GAN setting without the GAN arm would change nothing
            raise MelanoganError(f"--vary {item!r}: {', '.join(gan_keys)} set how the gan lever's GAN is trained; "
                                 "join them to it, e.g. gan=1000+gan_steps=2000.")
        if "patience" in settings and "epochs" not in settings:
            # the clock budget has no early stopping to change: patience only means something with epochs
            raise MelanoganError(f"--vary {item!r}: patience applies to an epoch budget; join it to one, "
                                 "e.g. epochs=30+patience=off.")
        _check_joined(item, settings)
        out.append((item.strip(), settings))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise MelanoganError(f"--vary names a lever twice: {names}.")
    return out


def _check_joined(item: str, settings: dict) -> None:
    """The training settings of one variant, together, as TrainConfig checks them (e.g. two draws that
    exclude each other), so that a bench refuses them before any work rather than midway."""
    from pydantic import ValidationError

    from melanogan.classify.train import TrainConfig
    from melanogan.errors import MelanoganError

    joined = {k: v for k, v in settings.items() if k in _CONFIG_LEVERS}
    if len(joined) > 1:
        try:
            TrainConfig(**joined)
        except ValidationError as exc:
            raise MelanoganError(f"--vary {item!r}: {exc.errors()[0]['msg']}") from None


def _parse_setting(item: str, part: str) -> tuple[str, object]:
    from pydantic import ValidationError

    from melanogan.classify.train import TrainConfig
    from melanogan.classify.tta import check_tta
    from melanogan.data.cache import CacheOptions
    from melanogan.errors import MelanoganError

    key, sep, raw = part.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in LEVERS:
        raise MelanoganError(f"--vary {item!r}: use KEY=VALUE (or several joined by +) with KEY one of "
                             f"{', '.join(LEVERS)}.")
    raw = raw.strip()
    try:
        if key in ("color_constancy", "hair_removal"):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{raw!r} is not true or false")
            value: object = raw.lower() in ("true", "1", "yes")
        elif key == "resize_mode":
            value = str(CacheOptions(resize_mode=raw).resize_mode)
        elif key == "hair_method":  # joined to hair_removal=true (parse_levers checks)
            value = str(CacheOptions(hair_removal=True, hair_method=raw).hair_method)
        elif key == "white_level":
            value = CacheOptions(white_level=int(raw)).white_level
        elif key == "clahe":
            value = CacheOptions(clahe=float(raw)).clahe
        elif key == "tta":
            value = check_tta(int(raw))
        elif key == "adapt":  # batchnorm: AdaBN on the choose part's images (calibrate --adapt-batchnorm);
            # head: the melanoma head refitted on the choose part's labelled images (calibrate --refit-head)
            if raw not in ("none", "batchnorm", "head"):
                raise ValueError(f"{raw!r}: use none, batchnorm or head")
            value = raw
        elif key == "adapt_layers":  # the first N batch-normalisation layers in forward order (checked at the model)
            value = int(raw)
            if value < 1:
                raise ValueError("adapt at least 1 layer")
        elif key == "ensemble":
            value = int(raw)
            if not 2 <= value <= 16:
                raise ValueError("an ensemble has 2 to 16 members (the budget is split between them)")
        elif key == "epochs":
            value = int(raw)
            if not 1 <= value <= 500:
                raise ValueError("use 1 to 500 epochs")
        elif key == "patience":  # "off" (0): every epoch runs, so the schedule anneals to the last one
            if raw.lower() == "off":
                value = 0
            else:
                value = int(raw)
                if value < 1:
                    raise ValueError("patience is a number of epochs (1 or more) or off")
        elif key == "model":  # another registered architecture, from scratch (weights belong to --model)
            from melanogan.classify.models import list_classifiers

            if raw not in list_classifiers():
                raise ValueError(f"unknown model {raw!r}; registered: {', '.join(list_classifiers())}")
            value = raw
        elif key == "gan":  # synthetic images of each class
            value = int(raw)
            if not 1 <= value <= 100_000:
                raise ValueError("gan is the number of synthetic images of each class: 1 to 100000")
        elif key == "gan_steps":
            value = int(raw)
            if value < 1:
                raise ValueError("train the GAN for at least 1 generator step")
        elif key == "gan_resolution":
            value = int(raw)
            if value not in (32, 64, 128, 256):
                raise ValueError("the GAN's resolution is 32, 64, 128 or 256")
        elif key == "gan_preset":
            if raw not in GAN_PRESETS:
                raise ValueError(f"{raw!r}: use {' or '.join(GAN_PRESETS)}")
            value = raw
        elif key == "minutes":
            value = float(raw)
            if not value > 0:
                raise ValueError("the budget must be positive")
        else:
            value = getattr(TrainConfig(**{key: raw}), key)
    except ValidationError as exc:
        raise MelanoganError(f"--vary {item!r}: {exc.errors()[0]['msg']}") from None
    except (ValueError, MelanoganError) as exc:
        raise MelanoganError(f"--vary {item!r}: {exc}") from None
    return key, value


def run(shared: Path = Path("../shared"), minutes: float = 8.0, holdout: tuple[str, ...] = tuple(SOURCES),
        model: str = "small-cnn", weights: str | None = None, image_size: int = 96, seed: int = 0,
        accelerator: str = "auto", vary: tuple[str, ...] = (), json_out: Path | None = None,
        batch_size: int = 32, repeats: int = 1, match_steps: bool = False) -> dict:
    """`batch_size`: the training batch (raise it on a GPU, which 32 leaves mostly idle). `json_out`: also
    written after each variant (`"complete": false` until the last), so that an hour-long
    comparison stopped midway (a machine's time limit) keeps every variant it measured.

    `repeats` > 1 trains every variant again with training seeds seed + 1000 r (the splits, and so
    the report images, stay those of `seed`): a time-budgeted run moves by up to 0.03 of AUC from
    seed to seed, which one run's paired bootstrap (over images) does not see. Each lever is then
    also compared over all repeats at once (`combined`: the mean of the per-seed differences, its
    bootstrap over the same image resamples, and each seed's own difference).

    `match_steps`: every lever that trains stops at the optimisation step the defaults reached on the
    same held-out source and training seed (their clock's budget), instead of at its own clock: one run
    of 8 minutes gets 18 epochs and the next 20 on the same machine (its speed varies by 10-20% from run
    to run), which the comparison would otherwise count as the lever's effect. The lever's own cost per
    step then shows in its training minutes and images per second instead of in its epochs, so budget
    levers (minutes, epochs, patience, ensemble), whose point is the budget, are refused with it."""
    from melanogan.classify.train import TrainConfig
    from melanogan.errors import MelanoganError
    from melanogan.fileio import write_json
    from melanogan.runtime import machine_info

    data = Path(shared) / "data"
    levers = parse_levers(tuple(vary))  # a typo fails here, before any work
    unknown = [h for h in holdout if h not in SOURCES]
    if unknown or not holdout or len(set(holdout)) != len(holdout):
        raise MelanoganError(f"--holdout {','.join(holdout) or '(none)'}: name each of {', '.join(SOURCES)} at most "
                             "once, at least one.")
    if weights and any("model" in settings for _, settings in levers):
        raise MelanoganError(f"--vary model=... with --weights {weights}: the weights belong to --model {model}; "
                             "compare architectures from scratch (no --weights), or run the bench once per model.")
    budget_levers = [name for name, settings in levers if set(settings) & _BUDGET_LEVERS]
    if match_steps and budget_levers:
        raise MelanoganError(f"--match-steps with --vary {', '.join(budget_levers)}: that lever changes the budget "
                             "itself, which --match-steps fixes at the defaults' steps; run it without "
                             "--match-steps.")
    if not 1 <= repeats <= 10:
        raise MelanoganError(f"--repeats {repeats}: use 1 to 10 (each repeat trains every variant again).")
    missing = [folder for _, folder in SOURCES.values() if not (data / folder).is_dir()]
    if missing:
        raise MelanoganError(f"{data}: bench travel needs {', '.join(missing)} (../shared/data).")
    # patience: `train`'s early stopping, used only with an epoch budget (the clock has none)
    defaults = {"minutes": minutes, "epochs": None, "patience": TrainConfig().patience, "image_size": image_size,
                "tta": 1, "adapt": "none", "adapt_layers": None, "batch_size": batch_size, "ensemble": 1,
                **GAN_DEFAULTS}
    variants = [("defaults", defaults)] + [(name, {**defaults, **settings}) for name, settings in levers]
    controls = [name for name, settings in levers if is_control(settings, defaults, model)]
    train_seeds = [seed + 1000 * r for r in range(repeats)]
    machine = machine_info(accelerator)
    rows, combined = [], []
    with tempfile.TemporaryDirectory(prefix="melanogan-bench-travel-") as tmp:
        tmp = Path(tmp)
        for held in holdout:
            prepared, trained, report_preds, steps = {}, {}, {}, {}
            for r, train_seed in enumerate(train_seeds):  # every variant of one seed before the next seed
                for name, settings in variants:
                    control = name in controls
                    if match_steps and name != "defaults" and (_trains(settings, defaults) or control):
                        settings = {**settings, "max_steps": steps[r]}
                    row, report_preds[name, r] = _one(data, tmp, held, settings, model, weights, seed, accelerator,
                                                      prepared, trained, train_seed, own_run=name if control else None)
                    rows.append({**row, "variant": name, "repeat": r, "train_seed": train_seed})
                    if name == "defaults":  # the step count --match-steps holds this seed's levers to
                        steps[r] = row["steps"]
                    else:  # paired on the same report images: the lever's own effect
                        rows[-1]["vs_defaults"] = _paired(report_preds["defaults", r], report_preds[name, r])
                    if json_out:  # every variant kept as it finishes: a GAN lever alone can take an hour
                        write_json(json_out, _result(rows, combined, model, weights, image_size, minutes, seed,
                                                     train_seeds, variants, False, match_steps, controls, machine))
            if repeats > 1:
                for name, _ in variants[1:]:
                    per_seed = [x["vs_defaults"]["difference"] for x in rows
                                if x["held_out"] == held and x["variant"] == name]
                    combined.append({"held_out": held, "variant": name, "repeats": repeats,
                                     **_paired([report_preds["defaults", r] for r in range(repeats)],
                                               [report_preds[name, r] for r in range(repeats)]),
                                     "per_seed_differences": per_seed})
            result = _result(rows, combined, model, weights, image_size, minutes, seed, train_seeds, variants,
                             held == holdout[-1], match_steps, controls, machine)
            if json_out:
                write_json(json_out, result)
    return result


def _cache_options(settings: dict):
    """The cache a variant's pixels come from: today's `prepare` defaults, changed by its prepare levers."""
    from melanogan.data.cache import CacheOptions

    return CacheOptions(size=max(256, settings["image_size"]), **{
        k: settings[k] for k, stage in LEVERS.items() if stage == "prepare" and k in settings})


def _result(rows: list[dict], combined: list[dict], model, weights, image_size, minutes, seed, train_seeds,
            variants, complete: bool, match_steps: bool = False, controls: list[str] | None = None,
            machine: dict | None = None) -> dict:
    """The figures so far, p-values Holm-adjusted over every lever and held-out source compared so far
    (the per-seed comparisons and the combined ones each a family of their own), with the machine they
    were measured on (runtime.machine_info) and the defaults' preprocessing (`cache_options`: what
    `prepare`'s defaults were when the comparison ran, so a later reader of the file knows which pixels
    the defaults' row was trained on after a default has changed)."""
    for family in ([r["vs_defaults"] for r in rows if "vs_defaults" in r], combined):
        for r, p in zip(family, M.holm([r["p_value"] for r in family]), strict=True):
            r["p_holm"] = round(p, 4)
    return {"model": model, "weights": weights, "image_size": image_size, "minutes": minutes, "seed": seed,
            "train_seeds": train_seeds, "batch_size": variants[0][1]["batch_size"],
            "levers": [name for name, _ in variants[1:]], "complete": complete, "match_steps": match_steps,
            "controls": controls or [], "machine": machine,
            "cache_options": _cache_options(variants[0][1]).to_dict(),
            "protocol": "leave one source out; the held-out source split by patient/lesion into a part the "
                        "site threshold is chosen on and a disjoint part everything is reported on; each "
                        "lever changes one setting of the defaults and is compared on the same report images",
            "rows": rows, "combined": combined}


def _one(data: Path, tmp: Path, held: str, settings: dict, model: str, weights: str | None, seed: int,
         accelerator: str, prepared: dict, trained: dict, train_seed: int,
         own_run: str | None = None) -> tuple[dict, pd.DataFrame]:
    """Train on the two other sources, report on half of `held`, choose the site threshold on the other
    half. `prepared` and `trained` hold what earlier variants made, so that a lever reuses the data
    (and the model) it does not change. `seed` splits the data; `train_seed` trains. `own_run` (a
    control's name): train a model of its own even where the settings equal an earlier variant's, since
    reusing the defaults' model would give a control a difference of exactly 0."""
    from melanogan.classify.calibrate import calibrate_site
    from melanogan.classify.evaluate import diagnosis_table, evaluate_run, json_safe
    from melanogan.classify.train import TrainConfig
    from melanogan.data.manifest import load_manifest, prepare
    from melanogan.data.splits import SplitFractions

    options = _cache_options(settings)
    if options.key not in prepared:
        tag = f"{held}-{options.key}"
        t0 = time.perf_counter()
        train_sources = [(kind, data / folder) for name, (kind, folder) in SOURCES.items() if name != held]
        prepare(train_sources, tmp / f"train-{tag}", options, seed=seed)
        # the training sources' prepare is part of the budget (the issue's 25 CPU-minutes are prepare +
        # train); the held-out source's is the evaluation's
        prepare_minutes = (time.perf_counter() - t0) / 60
        kind, folder = SOURCES[held]
        # the held-out source: half to choose on (split "train"), half to report on ("test")
        prepare([(kind, data / folder)], tmp / f"site-{tag}", options, SplitFractions(0.5, 0.0, 0.5), seed=seed)
        prepared[options.key] = (tmp / f"train-{tag}", tmp / f"site-{tag}", prepare_minutes)
    train_dir, site_dir, prepare_minutes = prepared[options.key]
    if settings.get("max_steps"):  # --match-steps: the defaults' step count, neither the clock nor early stopping
        budget = {"epochs": 200, "max_minutes": None, "max_steps": settings["max_steps"], "patience": _NEVER_STOP}
    elif settings["epochs"]:  # `train`'s own kind of budget: an epoch count, early stopping (off: 0), no clock
        budget = {"epochs": settings["epochs"], "max_minutes": None,
                  "patience": settings["patience"] or _NEVER_STOP}
    else:  # the clock alone ends the run
        budget = {"epochs": 200, "max_minutes": settings["minutes"], "patience": _NEVER_STOP}
    cfg = TrainConfig(model=settings.get("model", model), weights=weights, image_size=settings["image_size"],
                      batch_size=settings["batch_size"], **budget,
                      seed=train_seed, **{k: settings[k] for k in _CONFIG_LEVERS if k in settings})
    gan = _synthetic(train_dir, tmp, held, options.key, settings, train_seed, accelerator, trained) \
        if settings["gan"] else None
    if gan:
        cfg = cfg.model_copy(update={"synthetic": [gan["syn_dir"]]})
    members = settings["ensemble"]
    if members > 1:  # the same budget split between members of different seeds
        cfgs = [cfg.model_copy(update={"seed": train_seed + i, "max_minutes": settings["minutes"] / members})
                for i in range(members)]
    else:
        cfgs = [cfg]
    runs = [_train(train_dir, tmp, held, options.key, c, accelerator, trained, own_run) for c in cfgs]
    tta, adapted = settings["tta"], settings["adapt"] != "none"
    internal = [evaluate_run(r["run_dir"], bootstrap=300, tta=tta, out=tmp / f"eval-{held}-{time.monotonic_ns()}")
                for r in runs]
    if adapted:  # the run adapted to the choose part, then reported: its batch normalisation to the part's
        # images (no labels), or its melanoma head refitted on the part's labelled images
        layers, refit = settings["adapt_layers"], settings["adapt"] == "head"
        name = REFIT_SITE if refit else ADAPTED_SITE if layers is None else f"{ADAPTED_SITE}-{layers}"
        site = calibrate_site(runs[0]["run_dir"], site_dir, name, split="train", adapt_batchnorm=not refit,
                              adapt_layers=layers, refit_head=refit)
        adapted_report, preds = _adapted_report(runs[0]["run_dir"], site_dir, name)
        report = [adapted_report]
    else:
        report = [evaluate_run(r["run_dir"], data_dir=site_dir, split="test", bootstrap=300, tta=tta,
                               out=tmp / f"eval-{held}-{time.monotonic_ns()}") for r in runs]
        preds = _mean_logits([pd.read_csv(Path(r["out"]) / "predictions.csv") for r in report])
    row = {
        "held_out": held, "trained_on": [n for n in SOURCES if n != held], "members": members,
        "epochs": sum(r["epochs"] for r in runs), "steps": sum(r["steps"] for r in runs),
        "train_minutes": round(sum(r["minutes"] for r in runs), 1),
        "prepare_minutes": round(prepare_minutes, 1),
        "train_img_per_s": runs[0]["img_per_s"], "precision": runs[0]["precision"], "tta": tta,
        "report_images": report[0]["n_images"], "report_melanoma": report[0]["n_melanoma"],
        "excluded_overlap": report[0]["excluded_overlap"],
    }
    if gan:  # the GAN's cost beside the classifier's: prepare + GAN + train is the pipeline's budget
        row["gan"] = {k: gan[k] for k in ("steps", "resolution", "preset", "minutes", "synthetic_per_class",
                                          "training_images", "generator", "diverged", "label_effect")}
    if members == 1:
        # an adapted model's validation threshold would be the unadapted model's: none is reported
        travelled = report[0]["thresholds"]["val_youden"] if not adapted else None
        row.update({
            "internal_test_auc": round(internal[0]["roc_auc"], 4),
            # the rule's "internal AUC does not fall by more than its CI" needs the CI beside it
            "internal_test_auc_ci95": [round(x, 4) for x in internal[0]["roc_auc_ci95"]],
            "external_auc": round(report[0]["roc_auc"], 4),
            "external_auc_ci95": [round(x, 4) for x in report[0]["roc_auc_ci95"]],
            "validation_threshold": travelled and {"sensitivity": travelled["sensitivity"],
                                                   "specificity": travelled["specificity"]}})
    else:  # the ensemble's scores are the members' mean logits; its thresholds are not chosen here
        own = _mean_logits([pd.read_csv(Path(r["out"]) / "predictions.csv") for r in internal])
        low, high = M.bootstrap_ci(preds["label"], preds["logit"], preds["group"], n=300)
        own_ci = M.bootstrap_ci(own["label"], own["logit"], own["group"], n=300)
        row.update({"internal_test_auc": round(M.roc_auc(own["label"], own["logit"]), 4),
                    "internal_test_auc_ci95": [round(x, 4) for x in own_ci],
                    "external_auc": round(M.roc_auc(preds["label"], preds["logit"]), 4),
                    "external_auc_ci95": [round(low, 4), round(high, 4)], "validation_threshold": None})
    if tta == 1 and members == 1:
        if not adapted:  # (the adapted model's calibration was made above, on the same choose part)
            # explicitly unadapted, head as trained: the report scores it is applied to are the model's own
            site = calibrate_site(runs[0]["run_dir"], site_dir, "choose", split="train", adapt_batchnorm=False,
                                  refit_head=False)
        y, p = preds["label"].to_numpy(), M.sigmoid(preds["logit"].to_numpy() / site["temperature"])
        at_site = M.confusion_at(y, p, site["thresholds"]["val-youden"])
        row["site_threshold"] = {"chosen_on_images": site["n_images"], "sensitivity": at_site["sensitivity"],
                                 "specificity": at_site["specificity"]}
    else:  # calibrate scores one model's single views; its threshold would not fit averaged logits
        row["site_threshold"] = None
    # Which of the site's benign diagnoses the scores confuse with melanoma: a held-out source's AUC
    # is an average over its own case mix, so this says whether a source travels worse for its case
    # mix or for its pictures. Shares called melanoma at the site's own threshold, where there is one.
    site_dx = load_manifest(site_dir).set_index("uid")["diagnosis"]
    at_site = (site["thresholds"]["val-youden"], site["temperature"]) if row["site_threshold"] else (None, 1.0)
    scored = preds.join(site_dx, on="uid")
    row["report_by_diagnosis"] = json_safe(diagnosis_table(scored, *at_site, bootstrap=300, seed=train_seed))
    row["case_mix"] = json_safe(case_mix(scored, load_manifest(train_dir), seed=train_seed))
    return row, preds


def case_mix(scored: pd.DataFrame, training: pd.DataFrame, bootstrap: int = 300, seed: int = 0) -> dict:
    """The report part's external AUC with its benign images re-weighted to the training sources' own
    benign case mix (diagnosis groups of their train split, data/diagnoses.py), with a grouped-bootstrap
    CI: the AUC this model would score on these pictures if the site saw the cases it learned from.
    Beside the plain external AUC it separates a case-mix gap from a picture gap. `scored`: report
    predictions with their `diagnosis`; `training`: the training data's manifest."""
    from melanogan.classify.evaluate import MIN_PER_CLASS_FOR_AUC
    from melanogan.data.diagnoses import diagnosis_group

    def shares(diagnoses: pd.Series) -> dict[str, float]:
        counts = diagnoses.map(diagnosis_group).value_counts()
        return {str(k): round(float(v / counts.sum()), 4) for k, v in counts.items()}

    benign = training[(training["split"] == "train") & (training["label"] == 0) & (training["source"] != "synthetic")]
    mix = shares(benign["diagnosis"])
    y, z = scored["label"].to_numpy(), scored["logit"].to_numpy()
    kinds = scored["diagnosis"].map(diagnosis_group).to_numpy()
    auc, covered = M.case_mix_auc(y, z, kinds, mix, min_per_kind=MIN_PER_CLASS_FOR_AUC)

    def at_mix(y_resampled, positions):  # the bootstrap resamples positions, so the kinds follow the scores
        i = positions.astype(int)
        return M.case_mix_auc(y_resampled, z[i], kinds[i], mix, min_per_kind=MIN_PER_CLASS_FOR_AUC)[0]

    ci = M.bootstrap_ci(y, np.arange(len(y)), scored["group"].to_numpy(), at_mix, n=bootstrap, seed=seed)
    return {"training_mix": mix, "report_mix": shares(scored.loc[scored["label"] == 0, "diagnosis"]),
            "external_auc_at_training_mix": auc, "ci95": list(ci), "training_mix_covered": round(covered, 4)}


def _adapted_report(run_dir: Path, site_dir: Path, name: str) -> tuple[dict, pd.DataFrame]:
    """The report part ("test") scored by the run's model with site `name`'s adapted batch
    normalisation; photographs shared with the training data removed, as `evaluate` removes them."""
    from melanogan.classify.calibrate import apply_site, site_calibration
    from melanogan.classify.evaluate import predict_split, run_cache_options, seen_in_training
    from melanogan.classify.train import load_model
    from melanogan.data.manifest import cache_for, load_manifest
    from melanogan.fileio import read_json

    model, cfg, _ = load_model(run_dir / "best")
    apply_site(model, run_dir, name, site_calibration(run_dir, name))
    own = Path(read_json(run_dir / "run.json")["data_dir"])
    overlap = seen_in_training(site_dir, load_manifest(site_dir), own) or set()
    preds = predict_split(model, cfg, site_dir, ["test"], exclude=overlap,
                          cache=cache_for(site_dir, run_cache_options(run_dir)))
    y, z, g = preds["label"].to_numpy(), preds["logit"].to_numpy(), preds["group"].to_numpy()
    return {"roc_auc": M.roc_auc(y, z), "roc_auc_ci95": list(M.bootstrap_ci(y, z, g, n=300, seed=cfg.seed)),
            "n_images": len(preds), "n_melanoma": int(y.sum()), "excluded_overlap": len(overlap)}, preds


def _train(train_dir: Path, tmp: Path, held: str, data_key: str, cfg, accelerator: str, trained: dict,
           own_run: str | None = None) -> dict:
    """Train `cfg` on `train_dir` once: a later variant with the same data and settings reuses the run,
    unless it asks for a run of its own (`own_run`, a control)."""
    from melanogan.classify.train import train_classifier

    key = json.dumps([data_key, cfg.model_dump(), own_run], sort_keys=True, default=str)
    if key not in trained:
        run_dir = tmp / f"run-{held}-{len(trained)}"
        t0 = time.perf_counter()
        summary = train_classifier(train_dir, run_dir, cfg, accelerator=accelerator, progress=False)
        stats = [json.loads(x) for x in (run_dir / "stats.jsonl").read_text().splitlines() if x.strip()]
        speeds = [r["img_per_s"] for r in stats if "img_per_s" in r]
        trained[key] = {"run_dir": run_dir, "epochs": summary["epochs"], "steps": summary["steps"],
                        "minutes": (time.perf_counter() - t0) / 60,
                        "img_per_s": round(float(np.median(speeds)), 1) if speeds else None,
                        # as the run resolved it (precision auto: bf16-mixed or 32-true on this machine)
                        "precision": yaml.safe_load((run_dir / "config.yaml").read_text())["precision"]}
    return trained[key]


def _synthetic(train_dir: Path, tmp: Path, held: str, data_key: str, settings: dict, seed: int, accelerator: str,
               trained: dict) -> dict:
    """Train the gan lever's GAN on `train_dir`'s train split (the held-out source is not in it) and
    generate settings["gan"] images of each class; a later variant with the same GAN settings reuses
    the GAN (and, asking for as many images, the synthetic set)."""
    from melanogan.errors import MelanoganError
    from melanogan.fileio import read_json
    from melanogan.gan import evaluate as gan_evaluate
    from melanogan.gan.checkpoint import latest_checkpoint
    from melanogan.gan.config import load_config
    from melanogan.gan.sample import generate
    from melanogan.gan.train import GanDivergedError, train_gan

    spec = {k: settings[k] for k in ("gan_steps", "gan_resolution", "gan_preset")}
    gan_key = json.dumps(["gan", data_key, spec, seed], sort_keys=True)
    if gan_key not in trained:
        gan_dir = tmp / f"gan-{held}-{len(trained)}"
        preset, overrides = GAN_PRESETS[settings["gan_preset"]]
        steps = settings["gan_steps"]
        cfg = load_config(preset, **{**overrides, "resolution": settings["gan_resolution"], "steps": steps,
                                     "seed": seed, "kid_every": 0, "sample_every": steps,
                                     # checkpoints along the way: a GAN that diverges late still has one
                                     "checkpoint_every": max(1, steps // 4), "log_every": min(25, steps)})
        t0 = time.perf_counter()
        try:
            summary = train_gan(train_dir, gan_dir, cfg, accelerator=accelerator, progress=False)
            done, diverged = summary["step"], None
        except GanDivergedError as exc:
            # A diverged GAN is a result of this lever, not a reason to lose the held-out sources still to
            # come: its last good checkpoint draws the images, and the row says so.
            last = latest_checkpoint(gan_dir)
            if last is None:
                raise MelanoganError(f"bench travel, {held} held out: the gan lever's GAN diverged before its first "
                                     f"checkpoint ({exc}). The held-out sources finished so far are in the --json "
                                     "file; lower the GAN's learning rate (gan_preset=default) and run again.") from exc
            done, diverged = read_json(last / "state.json")["step"], str(exc)
        trained[gan_key] = {"gan_dir": gan_dir, "steps": done, "resolution": cfg.resolution,
                            "preset": settings["gan_preset"], "minutes": round((time.perf_counter() - t0) / 60, 1),
                            "training_images": read_json(gan_dir / "run.json").get("training_images"),
                            "diverged": diverged, "sets": {}}
    made = trained[gan_key]
    n = settings["gan"]
    if n not in made["sets"]:
        syn_dir = made["gan_dir"].with_name(f"{made['gan_dir'].name}-synthetic-{n}")
        generate(made["gan_dir"], n, "melanoma", syn_dir, seed=seed)
        generate(made["gan_dir"], n, "other", syn_dir, seed=seed)
        made["sets"][n] = {"syn_dir": str(syn_dir), "generator": read_json(syn_dir / "prepare.json")["generator"],
                           "label_effect": gan_evaluate.label_effect_of(syn_dir)}
    return {**{k: v for k, v in made.items() if k not in ("sets", "gan_dir")}, **made["sets"][n],
            "synthetic_per_class": n}


def _mean_logits(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """One prediction table with each image's logit averaged over the members (images all scored)."""
    if len(frames) == 1:
        return frames[0]
    logits = pd.concat([f.set_index("uid")["logit"] for f in frames], axis=1, join="inner")
    out = frames[0].set_index("uid").loc[logits.index].copy()
    out["logit"] = logits.mean(axis=1).to_numpy()
    return out.reset_index()


NAMES = {"ham10000": "HAM10000", "isic9": "ISIC 9-class", "derm7pt": "Derm7pt"}


def table(results: dict) -> str:
    """The figures as the README's Markdown table: one row per held-out source and setting."""
    def pair(d: dict | None) -> str:
        return "-" if not d else f"{d['sensitivity']:.2f} / {d['specificity']:.2f}"

    lines = ["| held out (report part) | setting | epochs | internal test AUC [95% CI] | external ROC-AUC [95% CI] | "
             "difference vs defaults [95% CI] (p, Holm) | validation threshold: sens / spec | "
             "site threshold: sens / spec |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        v = r.get("vs_defaults")
        diff = "-" if v is None else (f"{v['difference']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] "
                                      f"({v['p_value']:.3f}, {v.get('p_holm', float('nan')):.3f})")
        low, high = r["external_auc_ci95"]
        several = len(results.get("train_seeds", [0])) > 1
        setting = f"{r['variant']} (seed {r['train_seed']})" if several else r["variant"]
        if r["variant"] in results.get("controls", ()):  # the defaults' own settings: training noise
            setting += " (control)"
        if r.get("gan"):  # the GAN's own cost, beside the classifier's epochs
            diverged = ", diverged: images from its last good checkpoint" if r["gan"].get("diverged") else ""
            effect = r["gan"].get("label_effect")  # rows of runs before it have none
            effect = f", label/noise effect {effect['ratio']:.2f}" if effect else ""
            setting += (f" (GAN: {r['gan']['steps']:,} steps at {r['gan']['resolution']} px, {r['gan']['minutes']} min"
                        f"{effect}{diverged})")
        internal = f"{r['internal_test_auc']:.3f}"
        if r.get("internal_test_auc_ci95"):  # rows of earlier runs have none
            internal += " [{:.3f}, {:.3f}]".format(*r["internal_test_auc_ci95"])
        epochs = str(r["epochs"])
        if results.get("match_steps"):  # equal steps: the lever's cost shows in its minutes and speed instead
            epochs += f" ({r['steps']:,} steps, {r['train_minutes']} min, {r['train_img_per_s']} img/s)"
        lines.append(f"| {NAMES[r['held_out']]} ({r['report_images']:,} images, {r['report_melanoma']} mel) | "
                     f"{setting} | {epochs} | {internal} | {r['external_auc']:.3f} "
                     f"[{low:.3f}, {high:.3f}] | {diff} | {pair(r.get('validation_threshold'))} | "
                     f"{pair(r.get('site_threshold'))} |")
    if results.get("combined"):
        lines += ["", f"Over {len(results['train_seeds'])} training seeds (each lever against the defaults of its "
                  "own seed, on the same report images):", "",
                  "| held out | setting | mean difference vs defaults [95% CI] (p, Holm) | per seed |",
                  "| --- | --- | --- | --- |"]
        for c in results["combined"]:
            lines.append(f"| {NAMES[c['held_out']]} | {c['variant']} | {c['difference']:+.3f} [{c['ci95'][0]:+.3f}, "
                         f"{c['ci95'][1]:+.3f}] ({c['p_value']:.3f}, {c.get('p_holm', float('nan')):.3f}) | "
                         f"{', '.join(f'{d:+.3f}' for d in c['per_seed_differences'])} |")
    return "\n".join(lines)


def diagnosis_lines(results: dict) -> str:
    """Per held-out source and benign diagnosis of its report part: the ROC-AUC of the melanomas
    against that diagnosis alone, for the defaults (with its CI and the share called melanoma at the
    site threshold) and each lever (first training seed); empty for results saved before it was kept."""
    rows = [r for r in results["rows"] if r.get("report_by_diagnosis") and r.get("repeat", 0) == 0]
    if not rows:
        return ""
    levers = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] != "defaults"))
    lines = ["| held out | diagnosis (report part) | images | defaults: ROC-AUC vs melanoma [95% CI] | "
             "defaults: called melanoma at the site threshold |" + "".join(f" {v} |" for v in levers),
             "| --- | --- | --- | --- | --- |" + " --- |" * len(levers)]

    def auc(d: dict | None) -> str:
        return "-" if not d or d["roc_auc_vs_melanoma"] is None else f"{d['roc_auc_vs_melanoma']:.3f}"

    for held in dict.fromkeys(r["held_out"] for r in rows):
        mine = {r["variant"]: {d["diagnosis"]: d for d in r["report_by_diagnosis"] if not d["melanoma"]}
                for r in rows if r["held_out"] == held}
        base = mine.get("defaults")
        if base is None:
            continue
        for name, d in base.items():
            ci = d["roc_auc_vs_melanoma_ci95"]
            first = auc(d) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else "")
            called = "-" if d["called_melanoma"] is None else f"{d['called_melanoma']:.0%}"
            lines.append(f"| {NAMES[held]} | {name} | {d['n_images']} | {first} | {called} |"
                         + "".join(f" {auc(mine.get(v, {}).get(name))} |" for v in levers))
    return "\n".join(lines)


def case_mix_lines(results: dict) -> str:
    """Per held-out source and setting (first training seed): the external AUC at the site's own case
    mix and re-weighted to the training sources' benign mix, with both mixes; empty for results saved
    before it was kept."""
    rows = [r for r in results["rows"] if r.get("case_mix") and r.get("repeat", 0) == 0]
    if not rows:
        return ""

    def mix(shares: dict) -> str:
        return ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))

    lines = ["| held out | setting | external ROC-AUC (the site's case mix) | at the training sources' case mix "
             "[95% CI] (share of it covered) | the site's benign mix | the training sources' benign mix |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c = r["case_mix"]
        at = "-" if c["external_auc_at_training_mix"] is None else (
            f"{c['external_auc_at_training_mix']:.3f}"
            + (f" [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]" if None not in c["ci95"] else " [CI n/a]")
            + f" ({c['training_mix_covered']:.0%})")
        lines.append(f"| {NAMES[r['held_out']]} | {r['variant']} | {r['external_auc']:.3f} | {at} | "
                     f"{mix(c['report_mix'])} | {mix(c['training_mix'])} |")
    return "\n".join(lines)


def _paired(first: pd.DataFrame | list[pd.DataFrame], other: pd.DataFrame | list[pd.DataFrame]) -> dict:
    """AUC(other) - AUC(first) on the report images every run scored, by a paired bootstrap over
    patient/lesion groups; lists (one frame per seed, in the same order) give the mean over seeds of
    the per-seed differences, each bootstrap replicate resampling the images once for all seeds."""
    firsts = first if isinstance(first, list) else [first]
    others = other if isinstance(other, list) else [other]
    both = firsts[0][["uid", "label", "group"]]
    for i, frame in enumerate(firsts + others):
        both = both.merge(frame[["uid", "logit"]].rename(columns={"logit": f"logit_{i}"}), on="uid")
    k = len(firsts)
    r = M.paired_bootstrap_auc_difference(both["label"], [both[f"logit_{k + i}"] for i in range(k)],
                                          [both[f"logit_{i}"] for i in range(k)], both["group"], n=1000)
    return {"images": len(both), "difference": round(r["difference"], 4),
            "ci95": [round(r["ci_low"], 4), round(r["ci_high"], 4)], "p_value": round(r["p_value"], 4)}
