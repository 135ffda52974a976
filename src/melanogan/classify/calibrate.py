"""`melanogan calibrate`: an operating point for a new site, chosen on a small labelled sample of it.

A model's validation-chosen threshold does not travel: measured here, Youden's threshold that gave
sensitivity 0.95 on validation gave specificity 0.19 at another clinic. A site labels a sample of
its own cases; on it we fit a temperature (calibrated probabilities) and choose the named thresholds,
and estimate what they will give at that site by cross-fitting: thresholds chosen on the other
folds, applied to the held-out one, counts pooled, exact binomial CIs. Choosing and reporting on
the same cases would be optimistic; the CIs are as wide as the sample is small.

RUN_DIR/sites/NAME/calibration.json holds the thresholds, the temperature, the estimates and the
hash of the checkpoint they belong to; `predict`, `serve` and `export` take `--site NAME`. With
`refit_head` the melanoma head is refitted on the labelled sample (classify/site_head.py) and stored
beside it (head.safetensors); every figure is then computed from out-of-fold scores. With
`adapt_batchnorm` the model's batch-normalisation statistics are first replaced by the site sample's
own (classify/adapt.py; no labels used) and stored beside it (batchnorm.safetensors, its hash in
calibration.json); the temperature and thresholds are then those of the adapted model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from melanogan.classify import metrics as M
from melanogan.classify.site_head import (
    HEAD_FILE,
    by_diagnosis,
    captured_head_inputs,
    grouped_folds,
    head_layer,
    json_lambda,
    ranks_worse_notes,
)
from melanogan.classify.site_head import MIN_PER_CLASS as MIN_HEAD_PER_CLASS
from melanogan.classify.site_head import refit_head as fit_site_head
from melanogan.errors import MelanoganError
from melanogan.fileio import file_sha256, read_json, write_json

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MIN_PER_CLASS = 5  # fewer melanomas (or others) than this cannot place a threshold


def site_file(run_dir: Path, name: str) -> Path:
    if not SITE_NAME.match(name or ""):
        raise MelanoganError(f"--site {name!r}: use 1-64 letters, digits, '.', '_' or '-' (it names a folder).")
    return Path(run_dir) / "sites" / name / "calibration.json"


def cross_fitted_operating_points(y: np.ndarray, p: np.ndarray, groups: np.ndarray, folds: int = 5,
                                  seed: int = 0) -> dict[str, dict]:
    """Per named threshold: the confusion counts pooled over folds, each fold's cases decided by the
    threshold chosen on the other folds, with sensitivity/specificity and exact 95% CIs."""
    counts: dict[str, dict[str, int]] = {}
    for train, test in grouped_folds(y, groups, folds, seed, purpose="cross-fit thresholds"):
        for name, t in M.validation_thresholds(y[train], p[train]).items():
            c = M.confusion_at(y[test], p[test], t)
            total = counts.setdefault(name, {"tp": 0, "fn": 0, "tn": 0, "fp": 0})
            for k in total:
                total[k] += c[k]
    out = {}
    for name, c in counts.items():
        pos, neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
        out[name] = {**c, "sensitivity": c["tp"] / pos if pos else float("nan"),
                     "sensitivity_ci95": list(M.clopper_pearson(c["tp"], pos)),
                     "specificity": c["tn"] / neg if neg else float("nan"),
                     "specificity_ci95": list(M.clopper_pearson(c["tn"], neg))}
    return out


BATCHNORM_FILE = "batchnorm.safetensors"


def calibrate_site(run_dir: Path, data_dir: Path, name: str, split: str = "all", folds: int = 5,
                   log: Callable[[str], None] | None = None, adapt_batchnorm: bool = False,
                   adapt_layers: int | None = None, refit_head: bool | None = None) -> dict:
    """Score SITE_DATA_DIR's labelled sample with the run's preprocessing, choose the site's
    temperature and thresholds, estimate them by cross-fitting, and store them under `name`.
    `adapt_batchnorm`: first adapt the model's batch normalisation to the sample's images (AdaBN);
    `adapt_layers`: only its first N batch-normalisation layers in forward order (None: all);
    `refit_head`: refit the melanoma head on the sample (classify/site_head.py), every reported figure
    then from out-of-fold scores; None (the default): refit when the sample has the 20 melanomas and 20
    others a refit needs, else keep the trained head and say so; False: never."""
    from safetensors.torch import save_file

    from melanogan.classify.adapt import (
        MIN_IMAGES,
        batchnorm_layers,
        batchnorm_statistics,
        check_layers,
        dataset_batches,
        even_batch_size,
    )
    from melanogan.classify.adapt import adapt_batchnorm as adapt
    from melanogan.classify.evaluate import (
        MIN_PER_CLASS_FOR_AUC,
        run_cache_options,
        score_dataset,
        seen_in_training,
        split_dataset,
    )
    from melanogan.classify.predict import checkpoint_sha256
    from melanogan.classify.train import load_model
    from melanogan.data.manifest import cache_for, load_manifest
    from melanogan.fileio import atomic_path

    run_dir, data_dir = Path(run_dir), Path(data_dir)
    path = site_file(run_dir, name)
    if split not in ("all", "train", "val", "test"):
        raise MelanoganError(f"--split {split!r}: use all, train, val or test.")
    if adapt_layers is not None and not adapt_batchnorm:
        raise MelanoganError(f"--adapt-layers {adapt_layers} applies to --adapt-batchnorm; add that flag, or leave "
                             "the number out.")
    model, cfg, _ = load_model(run_dir / "best")
    n_layers = len(batchnorm_layers(model))
    check_layers(adapt_layers, n_layers, cfg.model)  # before any image is read
    own = Path(read_json(run_dir / "run.json")["data_dir"])
    exclude = seen_in_training(data_dir, load_manifest(data_dir), own)  # the model has seen them
    if exclude is None and log:
        log(f"the run's training data ({own}) is not on this machine, so photographs of it in "
            f"{data_dir} cannot be removed from the site sample; calibration.json records this "
            "(excluded_overlap null). Copy the training data folder there to check.")
    cache = cache_for(data_dir, run_cache_options(run_dir), log)
    adapted_on, adapted_layers = 0, []
    ds, metadata = split_dataset(cfg, data_dir, [split], exclude or set(), cache)  # adapted on and scored
    if adapt_batchnorm:
        if len(ds) < MIN_IMAGES:
            raise MelanoganError(f"{data_dir}: adapting batch normalisation needs at least {MIN_IMAGES} images of the "
                                 f"site (labels not needed); the sample has {len(ds)}. Add images, or calibrate "
                                 "without --adapt-batchnorm.")
        adapted_on, adapted_layers = adapt(model, dataset_batches(ds, metadata, torch.device("cpu"),
                                                                  even_batch_size(len(ds))), adapt_layers)
    with captured_head_inputs(model) as seen:  # the features the head sees, in the sample's order
        sample = score_dataset(model, ds, metadata)
    y, z = sample["label"].to_numpy(), sample["logit"].to_numpy()
    n_mel, n_other = int(y.sum()), int(len(y) - y.sum())
    if min(n_mel, n_other) < MIN_PER_CLASS:
        raise MelanoganError(f"{data_dir}: the site sample has {n_mel} melanoma(s) and {n_other} other image(s); "
                             f"label at least {MIN_PER_CLASS} of each (more give narrower CIs, see the README).")
    head = None
    if refit_head is None:  # the default: refit where the sample allows it (measured: README, adapt=head)
        refit_head = min(n_mel, n_other) >= MIN_HEAD_PER_CLASS
        if not refit_head and log:
            log(f"the melanoma head is kept as trained: refitting it on the site sample needs at least "
                f"{MIN_HEAD_PER_CLASS} melanomas and {MIN_HEAD_PER_CLASS} other images, and it has {n_mel} and "
                f"{n_other}; label more to let the site's cases re-rank as well as re-threshold.")
    if refit_head:
        if min(n_mel, n_other) < MIN_HEAD_PER_CLASS:
            raise MelanoganError(f"{data_dir}: refitting the head needs at least {MIN_HEAD_PER_CLASS} melanomas and "
                                 f"{MIN_HEAD_PER_CLASS} other images of the site; the sample has {n_mel} and "
                                 f"{n_other}. Label more, or calibrate without --refit-head.")
        layer = head_layer(model)
        fit = fit_site_head(torch.cat(seen).numpy(), y, sample["group"].to_numpy(),
                            layer.weight.detach().double().numpy().reshape(-1), float(layer.bias.detach()),
                            folds=folds, seed=cfg.seed)
        auc_trained_head = M.roc_auc(y, z)
        diagnoses = by_diagnosis(y, z, fit["out_of_fold_logits"], ds.rows["diagnosis"].to_numpy(),
                                 MIN_PER_CLASS_FOR_AUC, groups=sample["group"].to_numpy(),
                                 seed=cfg.seed) if "diagnosis" in ds.rows else []
        for note in ranks_worse_notes(diagnoses):
            if log:
                log(note)
        z = fit["out_of_fold_logits"]  # every figure below: scores of heads that never saw the case
        head = {"fitted_on_images": len(y), "features": int(layer.in_features), "lambda": json_lambda(fit["lambda"]),
                "cv_log_loss": {str(json_lambda(k)): v for k, v in fit["cv_log_loss"].items()},
                "lambda_per_outer_fold": [json_lambda(x) for x in fit["lambda_per_outer_fold"]],
                "roc_auc_trained_head": auc_trained_head, "by_diagnosis": diagnoses,
                "note": "roc_auc, temperature, thresholds and expected come from out-of-fold logits (nested "
                        "cross-validation); roc_auc_trained_head: the trained head on the same sample; "
                        "by_diagnosis: all the sample's melanomas against each benign diagnosis alone, by "
                        "both heads (the refitted one out-of-fold), with the 95% CI of refitted - trained "
                        "by a paired bootstrap over the sample's patients/lesions"}
        head_tensors = {"weight": torch.as_tensor(fit["weight"], dtype=torch.float32).reshape(1, -1),
                        "bias": torch.tensor([fit["bias"]], dtype=torch.float32)}
    temperature = M.fit_temperature(z, y)
    p = M.sigmoid(z / temperature)
    result = {
        "site": name, "data_dir": str(data_dir.resolve()), "split": split, "n_images": len(y), "n_melanoma": n_mel,
        "excluded_overlap": None if exclude is None else len(exclude),
        "checkpoint_sha256": checkpoint_sha256(run_dir / "best"),
        "batchnorm": None,  # the run's own statistics; or those of the site sample (below)
        "head": None,  # the run's own melanoma head; or one refitted on the site sample (below)
        "temperature": temperature, "thresholds": M.validation_thresholds(y, p), "probabilities": "sigmoid(logit / "
        "temperature): thresholds apply to these", "roc_auc": M.roc_auc(y, p),
        "roc_auc_ci95": list(M.bootstrap_ci(y, p, sample["group"].to_numpy(), n=1000, seed=cfg.seed)),
        "expected": cross_fitted_operating_points(y, p, sample["group"].to_numpy(), folds, cfg.seed),
        "expected_note": f"{folds}-fold cross-fitted on the site sample (threshold chosen on the other folds), exact "
                         "binomial 95% CIs: what these thresholds should give on this site's next cases",
    }
    # written only now that every check has passed, the statistics before the calibration that names
    # their hash (a crash in between leaves a mismatch that `--site` refuses, never a silent mix)
    path.parent.mkdir(parents=True, exist_ok=True)
    if adapted_on:
        with atomic_path(path.parent / BATCHNORM_FILE, suffix=".safetensors") as tmp:
            save_file(batchnorm_statistics(model), tmp, metadata={"site": name})
        # the file holds every layer's statistics (the ones not adapted as trained); the names say which moved
        result["batchnorm"] = {"adapted_on_images": adapted_on, "adapted_layers": adapted_layers,
                               "layers_of_model": n_layers,
                               "sha256": file_sha256(path.parent / BATCHNORM_FILE)}
    if head:
        with atomic_path(path.parent / HEAD_FILE, suffix=".safetensors") as tmp:
            save_file(head_tensors, tmp, metadata={"site": name})
        result["head"] = {**head, "sha256": file_sha256(path.parent / HEAD_FILE)}
    write_json(path, result)
    if not adapted_on:  # a calibration without adaptation leaves no earlier site statistics behind
        (path.parent / BATCHNORM_FILE).unlink(missing_ok=True)
    if not head:  # nor an earlier site head
        (path.parent / HEAD_FILE).unlink(missing_ok=True)
    return result


def apply_site(model, run_dir: Path, name: str, calibration: dict) -> None:
    """Give `model` the site's adapted batch-normalisation statistics and refitted head when its
    calibration has them (refused when a file is missing or is not the one calibrated)."""
    from safetensors.torch import load_file

    from melanogan.classify.adapt import load_statistics

    def checked(kind: str, filename: str, flag: str) -> Path:
        path = site_file(run_dir, name).parent / filename
        if not path.is_file() or file_sha256(path) != calibration[kind]["sha256"]:
            raise MelanoganError(f"{path}: missing or not the file site {name!r} was calibrated with; run `melanogan "
                                 f"calibrate {flag}` for site {name!r} again.")
        return path

    if calibration.get("batchnorm"):
        path = checked("batchnorm", BATCHNORM_FILE, "--adapt-batchnorm")
        load_statistics(model, load_file(path), str(path))
    if calibration.get("head"):
        path = checked("head", HEAD_FILE, "--refit-head")
        stored, layer = load_file(path), head_layer(model)
        if set(stored) != {"weight", "bias"} or stored["weight"].shape != layer.weight.shape \
                or stored["bias"].shape != layer.bias.shape:
            raise MelanoganError(f"{path}: not a head for this model ({layer.in_features} features); run `melanogan "
                                 f"calibrate --refit-head` for site {name!r} again.")
        with torch.no_grad():
            layer.weight.copy_(stored["weight"])
            layer.bias.copy_(stored["bias"])


def site_calibration(run_dir: Path, name: str) -> dict:
    """A stored site calibration, refused when it belongs to another checkpoint than `best/`."""
    from melanogan.classify.predict import checkpoint_sha256

    path = site_file(run_dir, name)
    if not path.is_file():
        raise MelanoganError(f"{run_dir}: no calibration for site {name!r}. Run `melanogan calibrate {run_dir} "
                             f"--data SITE_DATA_DIR --site {name}` first.")
    stored = read_json(path)
    if stored.get("checkpoint_sha256") != checkpoint_sha256(Path(run_dir) / "best"):
        raise MelanoganError(f"{path}: calibrated for another checkpoint than {Path(run_dir) / 'best'} (it was "
                             f"retrained or resumed); run `melanogan calibrate` for site {name!r} again.")
    return stored


def draw_groups(rng: np.random.Generator, groups: np.ndarray, n: int) -> np.ndarray:
    """A mask of whole groups (lesions, patients) drawn in random order until at least n cases are
    in: a site sample as a site would label it, never half a lesion."""
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    take = np.zeros(len(inverse), bool)
    for g in rng.permutation(len(uniq)):
        if take.sum() >= n:
            break
        take |= inverse == g
    return take


def sample_size_curve(y: np.ndarray, p: np.ndarray, groups: np.ndarray, sizes: list[int], repeats: int = 200,
                      seed: int = 0, threshold: str = "val-youden") -> list[dict]:
    """How many labelled local cases a site needs: for each sample size n, `repeats` times, draw n of
    the site's cases (whole groups), choose `threshold` on them, and apply it to the site's other
    cases. Reports the spread of the sensitivity/specificity it then really gives (2.5-97.5%
    percentiles: the uncertainty a site of that sample size lives with) and the median width of the
    exact 95% CIs `calibrate` would have reported from the sample alone (cross-fitted)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        sens, spec, widths = [], [], []
        for _ in range(repeats):
            take = draw_groups(rng, groups, n)
            ys, ps = y[take], p[take]
            if min(ys.sum(), len(ys) - ys.sum()) < 2 or (~take).sum() == 0:
                continue
            t = M.validation_thresholds(ys, ps)[threshold]
            c = M.confusion_at(y[~take], p[~take], t)
            sens.append(c["sensitivity"])
            spec.append(c["specificity"])
            if min(ys.sum(), len(ys) - ys.sum()) >= MIN_PER_CLASS:
                e = cross_fitted_operating_points(ys, ps, np.asarray(groups)[take], 5, seed)[threshold]
                widths.append((e["sensitivity_ci95"][1] - e["sensitivity_ci95"][0],
                               e["specificity_ci95"][1] - e["specificity_ci95"][0]))
        if not sens:
            continue
        w = np.array(widths) if widths else np.full((1, 2), np.nan)
        rows.append({"n": n, "draws": len(sens), "sensitivity_median": float(np.nanmedian(sens)),
                     "sensitivity_2.5_97.5": [float(x) for x in np.nanpercentile(sens, [2.5, 97.5])],
                     "specificity_median": float(np.nanmedian(spec)),
                     "specificity_2.5_97.5": [float(x) for x in np.nanpercentile(spec, [2.5, 97.5])],
                     "reported_ci_width_sensitivity": float(np.nanmedian(w[:, 0])),
                     "reported_ci_width_specificity": float(np.nanmedian(w[:, 1]))})
    return rows
