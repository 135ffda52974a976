"""`melanogan evaluate`: clinical evaluation of a trained classifier on real images only.

Thresholds come from the run's own validation split (Youden's J, and 95% sensitivity) and are
applied unchanged to the evaluated images, next to the fixed 0.5 of the original study. A
different prepared dataset can be named for an external test; its synthetic rows, if any, are
ignored, and so are its images that are the same photographs as any image of the training data
set (same file, same ISIC id or perceptual-hash match): their number is reported.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from melanogan.classify import metrics as M
from melanogan.classify.train import load_model, predict_logits
from melanogan.data.cache import Cache, CacheOptions
from melanogan.data.dataset import CachedImageDataset
from melanogan.data.dedup import DEFAULT_PHASH_DISTANCE, hamming_pairs
from melanogan.data.diagnoses import diagnosis_group
from melanogan.data.manifest import cache_for, load_manifest, manifest_hash
from melanogan.data.metadata import encode_metadata
from melanogan.data.sources import global_isic_id
from melanogan.data.transforms import eval_preset
from melanogan.errors import MelanoganError
from melanogan.fileio import read_json, save_figure, write_csv, write_json

ORACLE_NOTE = ("oracle: read off the evaluated images' own ROC curve (chosen with their labels); an upper bound "
               "that no clinic could set in advance, not comparable with the validation-chosen thresholds")


def json_safe(obj):
    """JSON-safe: NaN -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj


def overlapping_uids(external: pd.DataFrame, own: pd.DataFrame, phash_distance: int = DEFAULT_PHASH_DISTANCE) -> set:
    """External rows that are photographs of the training data set: same file, same ISIC id, or a
    perceptual-hash match. An external test containing them would measure memory, not generalisation."""
    hits = set(external.loc[external["content_hash"].isin(set(own["content_hash"])), "uid"])
    # A comprehension, not Series.map: pandas 3 turns the None of an id without an ISIC number into
    # NaN, NaN is truthy, and isin() matches NaN to NaN, so every non-ISIC external image would "overlap".
    own_ids = {i for i in map(global_isic_id, own["image_id"].astype(str)) if i}
    ext_ids = pd.Series([global_isic_id(i) for i in external["image_id"].astype(str)], index=external.index,
                        dtype=object)
    hits |= set(external.loc[ext_ids.isin(own_ids), "uid"])
    both = pd.concat([external[["uid", "phash"]].assign(ext=True), own[["uid", "phash"]].assign(ext=False)],
                     ignore_index=True)
    pairs = hamming_pairs(both["phash"].to_numpy(), phash_distance)
    is_ext = both["ext"].to_numpy()
    for i, j, _ in pairs:
        if is_ext[i] != is_ext[j]:
            hits.add(both["uid"].iat[i if is_ext[i] else j])
    return hits


def seen_in_training(data_dir: Path, manifest: pd.DataFrame, own_data: Path) -> set | None:
    """Uids of DATA_DIR's rows that are photographs of the run's own data set (`own_data`): none when
    it is the run's own data set (its splits already keep them apart), None when `own_data` is not
    on this machine (a run folder copied to a site), so the caller can say it could not check."""
    if Path(data_dir).resolve() == Path(own_data).resolve():
        return set()
    if not (Path(own_data) / "manifest.parquet").is_file():
        return None
    return overlapping_uids(manifest, load_manifest(own_data))


def run_cache_options(run_dir: Path) -> CacheOptions:
    """The preprocessing a classifier run was trained with (recorded in its run.json)."""
    info = read_json(Path(run_dir) / "run.json")
    if not info.get("cache_options"):
        raise MelanoganError(f"{run_dir}/run.json does not record the preprocessing the model was trained with, "
                             "so it cannot be evaluated on matching pixels; re-train it with this version.")
    return CacheOptions.from_dict(info["cache_options"])


def current_skin_tone(data_dir: Path) -> bool:
    """Whether DATA_DIR's manifest holds skin tones estimated by this version's method."""
    from melanogan.data.skin import SKIN_TONE_VERSION

    info = Path(data_dir) / "prepare.json"
    return info.is_file() and read_json(info).get("skin_tone_version") == SKIN_TONE_VERSION


def eval_dir_name(data_dir: Path, split: str, external: bool, tta: int = 1) -> str:
    """`eval-SPLIT`, or for another DATA_DIR `eval-external-NAME-HASH-SPLIT` (HASH of its resolved path:
    two external sets in folders of the same name never overwrite each other); `-ttaN` with TTA, so
    that a TTA evaluation sits beside the plain one instead of replacing it."""
    suffix = f"-tta{tta}" if tta > 1 else ""
    if not external:
        return f"eval-{split}{suffix}"
    digest = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:8]
    return f"eval-external-{Path(data_dir).resolve().name}-{digest}-{split}{suffix}"


def predict_split(model, cfg, data_dir: Path, splits: list[str], batch_size: int = 64,
                  exclude: set | None = None, cache: Cache | None = None, tta: int = 1) -> pd.DataFrame:
    """Logits for the real, labeled rows of `splits` ('all' = every labeled real row), minus `exclude`.
    `cache`: the pixels to read (the run's preprocessing; default DATA_DIR's own cache). Scored in
    fp32, as `predict`, `serve` and exports score: thresholds chosen here hold there. `tta`: views
    averaged (classify/tta.py)."""
    ds, metadata = split_dataset(cfg, data_dir, splits, exclude, cache)
    return score_dataset(model, ds, metadata, batch_size, tta)


def score_dataset(model, ds: CachedImageDataset, metadata: np.ndarray | None, batch_size: int = 64,
                  tta: int = 1) -> pd.DataFrame:
    """`predict_split`'s table for a dataset already built by `split_dataset` (a caller that also
    adapts the model to the same images builds it once)."""
    logits = predict_logits(model, ds, batch_size=batch_size, device=torch.device("cpu"), autocast=False, tta=tta,
                            metadata=metadata)
    rows = ds.rows
    return pd.DataFrame({"uid": rows["uid"], "split": rows["split"], "source": rows["source"].astype(str),
                         "label": rows["label"].astype(int),
                         "group": rows["source"].astype(str) + ":" + rows["cluster_id"].astype(str),
                         "logit": logits, "probability": M.sigmoid(logits)})


def split_dataset(cfg, data_dir: Path, splits: list[str], exclude: set | None = None,
                  cache: Cache | None = None) -> tuple[CachedImageDataset, np.ndarray | None]:
    """The real, labeled rows of `splits` minus `exclude`, with the evaluation preprocessing of `cfg`,
    and their encoded metadata for a model trained with it."""
    manifest = load_manifest(data_dir)
    manifest = manifest[(manifest["label"].isin([0, 1])) & (manifest["source"] != "synthetic")]
    if exclude:
        manifest = manifest[~manifest["uid"].isin(exclude)]
    if splits != ["all"]:
        manifest = manifest[manifest["split"].isin(splits)]
    if manifest.empty:
        raise MelanoganError(f"{data_dir}: no labeled real images in split {'/'.join(splits)}.")
    ds = CachedImageDataset(data_dir, "all", transform=eval_preset(cfg.image_size), manifest=manifest, cache=cache)
    return ds, (encode_metadata(ds.rows, cfg.metadata) if cfg.metadata else None)


def auc_summary(test: pd.DataFrame, temperature: float, bootstrap: int, seed: int) -> dict:
    """Images, melanomas, ROC-AUC and its grouped-bootstrap CI (NaN when `test` has one class only)."""
    y, p = test["label"].to_numpy(), M.sigmoid(test["logit"].to_numpy() / temperature)
    ci = [math.nan, math.nan]
    if 0 < y.sum() < len(y):  # else no resample has both classes: skip the bootstrap loop
        ci = list(M.bootstrap_ci(y, p, test["group"].to_numpy(), M.roc_auc, n=bootstrap, seed=seed))
    return {"n_images": len(y), "n_melanoma": int(y.sum()), "roc_auc": M.roc_auc(y, p), "roc_auc_ci95": ci}


# A subgroup needs this many melanomas (and other images) for its ROC-AUC to be reported; smaller
# ones are listed with their counts and why, never dropped.
MIN_PER_CLASS_FOR_AUC = 5
SUBGROUP_VARIABLES = ("source", "sex", "age_band", "anatom_site", "ita_category")
DIAGNOSIS_COLUMNS = ["diagnosis", "group", "melanoma", "n_images", "called_melanoma", "roc_auc_vs_melanoma",
                     "roc_auc_vs_melanoma_ci95", "note"]


def age_band(age) -> str:
    """Age in the bands dermatology reports use; `unknown` when missing."""
    if age is None or pd.isna(age):
        return "unknown"
    for upper, name in ((30, "<30"), (45, "30-44"), (60, "45-59"), (75, "60-74")):
        if age < upper:
            return name
    return ">=75"


def subgroup_table(test: pd.DataFrame, threshold: float, temperature: float = 1.0, bootstrap: int = 1000,
                   seed: int = 0, variables=SUBGROUP_VARIABLES) -> list[dict]:
    """Per value of every subgroup variable present in `test` (columns label, logit, group and the
    variables): images, melanomas, ROC-AUC with its grouped-bootstrap CI, and sensitivity and
    specificity at `threshold` (the validation-chosen one). A subgroup with fewer than
    MIN_PER_CLASS_FOR_AUC of either class gets its counts and a reason instead of an AUC."""
    rows = []
    for variable in variables:
        if variable not in test.columns or test[variable].isna().all():
            continue
        values = test[variable].astype("string").fillna("unknown")
        for value, part in test.groupby(values.to_numpy(), sort=True):
            y = part["label"].to_numpy()
            p = M.sigmoid(part["logit"].to_numpy() / temperature)
            n_mel, n_other = int(y.sum()), int(len(y) - y.sum())
            c = M.confusion_at(y, p, threshold)
            row = {"variable": variable, "value": str(value), "n_images": len(y), "n_melanoma": n_mel,
                   "sensitivity": c["sensitivity"], "specificity": c["specificity"]}
            if min(n_mel, n_other) >= MIN_PER_CLASS_FOR_AUC:
                row.update(auc_summary(part, temperature, bootstrap, seed), note="")
            else:
                row.update(roc_auc=float("nan"), roc_auc_ci95=[float("nan"), float("nan")],
                           note=f"too few for an AUC ({n_mel} melanoma, {n_other} other; needs "
                                f"{MIN_PER_CLASS_FOR_AUC} of each)")
            rows.append(row)
    return rows


def diagnosis_table(test: pd.DataFrame, threshold: float | None, temperature: float = 1.0, bootstrap: int = 1000,
                    seed: int = 0) -> list[dict]:
    """Per diagnosis in `test` (columns label, logit, group, diagnosis): its images, whether they are
    melanomas, the share of them called melanoma at `threshold` (a melanoma diagnosis: its
    sensitivity; any other: its false-positive rate), and, for a non-melanoma diagnosis, the ROC-AUC of
    all of `test`'s melanomas against it alone, with the grouped-bootstrap CI: which benign lesions the
    model confuses with melanoma. A diagnosis is one class, so its own AUC (the subgroup table's
    figure) is undefined; and a site's AUC over all benign images mixes these in its own case mix, so
    two sites' AUCs can differ by case mix alone. Fewer than MIN_PER_CLASS_FOR_AUC of either side: the
    counts and a reason instead of an AUC. Each row also names its group across sources
    (data/diagnoses.py). `threshold` None (scores no threshold belongs to, e.g. an
    ensemble's mean logits): no shares. Rows: melanoma diagnoses first, then by images, most first."""
    y = test["label"].to_numpy()
    p = M.sigmoid(test["logit"].to_numpy() / temperature)
    dx = test["diagnosis"].astype("string").fillna("unknown").to_numpy()
    melanomas = y == 1
    n_mel = int(melanomas.sum())
    rows = []
    # by (diagnosis, label): a source's diagnosis string could in principle hold both labels
    for (value, label), idx in pd.Series(np.arange(len(y))).groupby([dx, y], sort=True):
        idx = idx.to_numpy()
        row = {"diagnosis": str(value), "group": diagnosis_group(str(value)), "melanoma": bool(label),
               "n_images": len(idx),
               "called_melanoma": None if threshold is None else float((p[idx] >= threshold).mean())}
        if label == 1:
            row.update(roc_auc_vs_melanoma=None, roc_auc_vs_melanoma_ci95=None, note="")
        elif min(n_mel, len(idx)) >= MIN_PER_CLASS_FOR_AUC:
            s = auc_summary(test.iloc[np.concatenate([np.flatnonzero(melanomas), idx])], temperature, bootstrap, seed)
            row.update(roc_auc_vs_melanoma=s["roc_auc"], roc_auc_vs_melanoma_ci95=s["roc_auc_ci95"], note="")
        else:
            row.update(roc_auc_vs_melanoma=float("nan"), roc_auc_vs_melanoma_ci95=[float("nan"), float("nan")],
                       note=f"too few for an AUC ({n_mel} melanoma, {len(idx)} {value}; needs "
                            f"{MIN_PER_CLASS_FOR_AUC} of each)")
        rows.append(row)
    return sorted(rows, key=lambda r: (not r["melanoma"], -r["n_images"], r["diagnosis"]))


def clinical_metrics(val: pd.DataFrame, test: pd.DataFrame, temperature: float = 1.0, bootstrap: int = 1000,
                     seed: int = 0) -> dict:
    """All metrics of the evaluation on `test`, thresholds chosen on `val` (probabilities)."""
    yv, pv = val["label"].to_numpy(), M.sigmoid(val["logit"].to_numpy() / temperature)
    y, p = test["label"].to_numpy(), M.sigmoid(test["logit"].to_numpy() / temperature)
    groups = test["group"].to_numpy()
    chosen = M.validation_thresholds(yv, pv)  # the same choice `predict` stores for the checkpoint
    thresholds = {"fixed_0.5": 0.5, "val_youden": chosen["val-youden"], "val_sens95": chosen["val-sens95"]}
    pr_ci = M.bootstrap_ci(y, p, groups, M.pr_auc, n=bootstrap, seed=seed)
    rel = M.reliability(y, p, 10)
    return {
        **auc_summary(test, temperature, bootstrap, seed), "n_groups": len(np.unique(groups)),
        "pr_auc": M.pr_auc(y, p), "pr_auc_ci95": list(pr_ci), "prevalence": float(y.mean()),
        "thresholds": {name: {**M.confusion_at(y, p, t), "chosen_on": "validation" if name != "fixed_0.5" else "fixed"}
                       for name, t in thresholds.items()},
        # Read off the evaluated images' own ROC, i.e. chosen with their labels: an oracle, kept for
        # comparison with papers, never beside the validation-chosen thresholds above.
        "oracle_operating_points": {
            "note": ORACLE_NOTE,
            "specificity_at_sensitivity_90": M.specificity_at_sensitivity(y, p, 0.90),
            "specificity_at_sensitivity_95": M.specificity_at_sensitivity(y, p, 0.95),
            "sensitivity_at_specificity_80": M.sensitivity_at_specificity(y, p, 0.80)},
        "calibration": {"temperature": temperature, "brier": M.brier(y, p),
                        "ece": M.expected_calibration_error(y, p, 10),
                        "reliability": {"confidence": rel["confidence"].tolist(), "observed": rel["observed"].tolist(),
                                        "count": rel["count"].tolist()}},
    }


def evaluate_run(run_dir: Path, data_dir: Path | None = None, split: str | None = None,
                 temperature_scaling: bool = False, bootstrap: int = 1000, out: Path | None = None,
                 log: Callable[[str], None] | None = None, tta: int = 1) -> dict:
    """Evaluate RUN_DIR's best checkpoint on pixels preprocessed as in its training; writes
    metrics.json, predictions.csv and plots. `split` None: `test` of the run's own data, `all` of
    another DATA_DIR (an external test set is all of it). `tta`: logits averaged over that many
    flips/rotations, for the validation predictions that choose the thresholds too."""
    from melanogan.classify.tta import check_tta

    check_tta(tta)
    run_dir = Path(run_dir)
    model, cfg, best_state = load_model(run_dir / "best")
    run_info = read_json(run_dir / "run.json")
    own_data = Path(run_info["data_dir"])
    data_dir = Path(data_dir) if data_dir else own_data
    external = data_dir.resolve() != own_data.resolve()
    split = split or ("all" if external else "test")
    if split not in ("test", "val", "all"):
        raise MelanoganError(f"--split {split!r}: use test, val or all.")
    options = run_cache_options(run_dir)
    data_manifest = load_manifest(data_dir)  # read once: overlap, subgroup metadata, hash
    val = predict_split(model, cfg, own_data, ["val"], cache=cache_for(own_data, options, log), tta=tta)
    overlap = seen_in_training(data_dir, data_manifest, own_data) or set()  # own_data exists: val came from it
    test = predict_split(model, cfg, data_dir, ["all"] if split == "all" else [split], exclude=overlap,
                         cache=cache_for(data_dir, options, log), tta=tta)
    temperature = M.fit_temperature(val["logit"], val["label"]) if temperature_scaling else 1.0
    result = clinical_metrics(val, test, temperature, bootstrap=bootstrap, seed=cfg.seed)
    if test["source"].nunique() > 1:  # a multi-source dataset: how the model does on each source
        result["by_source"] = {str(src): auc_summary(part, temperature, bootstrap, cfg.seed)
                               for src, part in test.groupby("source")}
    columns = [c for c in ("sex", "age", "anatom_site", "ita_category") if c in data_manifest.columns]
    if "ita_category" in columns and not current_skin_tone(data_dir):
        columns.remove("ita_category")  # an estimate an older melanogan made is not reported as current
        if log:
            log(f"{data_dir}: its skin-tone estimates come from an older melanogan; run `melanogan prepare` on it "
                "again to include skin tone in the subgroup table")
    meta = data_manifest.set_index("uid")[columns]
    with_meta = test.join(meta, on="uid").assign(age_band=lambda d: d["age"].map(age_band))
    result["by_subgroup"] = subgroup_table(with_meta, result["thresholds"]["val_youden"]["threshold"], temperature,
                                           bootstrap, cfg.seed)
    result["by_diagnosis"] = diagnosis_table(test.join(data_manifest.set_index("uid")["diagnosis"], on="uid"),
                                             result["thresholds"]["val_youden"]["threshold"], temperature,
                                             bootstrap, cfg.seed)
    result.update({"run_dir": str(run_dir), "data_dir": str(data_dir), "split": split, "external": external,
                   "excluded_overlap": len(overlap), "best_epoch": best_state.get("epoch"),
                   "val_auc_at_best": best_state.get("val_auc"),
                   "manifest_hash": manifest_hash(data_manifest), "model": cfg.model,
                   "image_size": cfg.image_size, "preprocessing": options.to_dict(), "tta": tta})
    out = Path(out) if out else run_dir / eval_dir_name(data_dir, split, external, tta)
    result["out"] = str(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "predictions.csv", test.assign(probability=M.sigmoid(test["logit"] / temperature)))
    write_json(out / "metrics.json", json_safe(result))
    write_csv(out / "subgroups.csv", pd.DataFrame(result["by_subgroup"]).drop(columns="roc_auc_ci95").assign(
        auc_ci_low=[r["roc_auc_ci95"][0] for r in result["by_subgroup"]],
        auc_ci_high=[r["roc_auc_ci95"][1] for r in result["by_subgroup"]]))
    cis = [r["roc_auc_vs_melanoma_ci95"] or [None, None] for r in result["by_diagnosis"]]  # melanoma rows: none
    write_csv(out / "diagnoses.csv", pd.DataFrame(result["by_diagnosis"], columns=DIAGNOSIS_COLUMNS).drop(
        columns="roc_auc_vs_melanoma_ci95").assign(auc_ci_low=[c[0] for c in cis], auc_ci_high=[c[1] for c in cis]))
    plot_evaluation(test, result, out, temperature)
    plot_subgroups(result["by_subgroup"], out / "subgroups.png")
    return result


def plot_subgroups(rows: list[dict], path: Path, title: str = "ROC-AUC by subgroup (95% CI)") -> None:
    """One line per subgroup: its AUC with the grouped-bootstrap CI, or the reason it has none, so
    that small subgroups are visible rather than missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6.5, 0.28 * len(rows) + 1.2))
    labels = []
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        labels.append(f"{r['variable']}: {r['value']} (n={r['n_images']}, mel={r['n_melanoma']})")
        auc = r.get("roc_auc")
        if auc is not None and np.isfinite(auc):
            lo, hi = r["roc_auc_ci95"]
            ax.errorbar(auc, y, xerr=[[auc - lo], [hi - auc]], fmt="o", color="C0", capsize=2, ms=4)
        else:
            ax.text(0.52, y, "too few for an AUC", va="center", fontsize=7, color="0.4")
    ax.axvline(0.5, color="k", ls="--", lw=0.8)
    ax.set_yticks(range(len(rows)), labels[::-1], fontsize=7)
    ax.set(xlim=(0.3, 1.0), xlabel="ROC-AUC", title=title)
    save_figure(fig, path)


def plot_evaluation(test: pd.DataFrame, result: dict, out: Path, temperature: float = 1.0) -> None:
    """roc.png, pr.png, scores.png (histogram by class), reliability.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    y, p = test["label"].to_numpy(), M.sigmoid(test["logit"].to_numpy() / temperature)

    def save(fig, name: str) -> None:
        save_figure(fig, out / name)

    if 0 < y.sum() < len(y):
        fpr, tpr, _ = roc_curve(y, p)
        fig, ax = plt.subplots(figsize=(4.5, 4.2))
        ax.plot(fpr, tpr, label=f"AUC {result['roc_auc']:.3f}")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        for name, m in result["thresholds"].items():
            ax.plot(1 - m["specificity"], m["sensitivity"], "o", label=f"{name} (t={m['threshold']:.2f})")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
        ax.legend(fontsize=8)
        save(fig, "roc.png")
        prec, rec, _ = precision_recall_curve(y, p)
        fig, ax = plt.subplots(figsize=(4.5, 4.2))
        ax.plot(rec, prec, label=f"PR-AUC {result['pr_auc']:.3f}")
        ax.axhline(y.mean(), color="k", ls="--", lw=0.8, label=f"prevalence {y.mean():.3f}")
        ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall")
        ax.legend(fontsize=8)
        save(fig, "pr.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(0, 1, 26)
    ax.hist(p[y == 0], bins=bins, alpha=0.6, density=True, label="not melanoma")
    ax.hist(p[y == 1], bins=bins, alpha=0.6, density=True, label="melanoma")
    ax.set(xlabel="predicted melanoma probability", ylabel="density", title="Scores by class")
    ax.legend()
    save(fig, "scores.png")
    rel = result["calibration"]["reliability"]
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    filled = [i for i, n in enumerate(rel["count"]) if n > 0]
    conf = [rel["confidence"][i] for i in filled]
    obs = [rel["observed"][i] for i in filled]
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot(conf, obs, "o-", label=f"ECE {result['calibration']['ece']:.3f}")
    ax.set(xlabel="mean predicted probability", ylabel="observed melanoma rate", title="Reliability")
    ax.legend()
    save(fig, "reliability.png")


# A mean rise of the melanoma probability of benign images this large, after nothing but the
# generator's down/up resampling, is reported as a shortcut (when also significant).
SHORTCUT_MIN_RISE = 0.01


def probe_summary(before_logits, after_logits, alpha: float = 0.05) -> dict:
    """Mean melanoma probability of the same benign images before and after the generator's
    resampling path; a significant rise (Wilcoxon signed-rank, paired) of at least SHORTCUT_MIN_RISE
    means the model scores softness as melanoma."""
    from scipy.stats import wilcoxon

    before, after = M.sigmoid(before_logits), M.sigmoid(after_logits)
    rise = float(np.mean(after - before))
    diff = after - before
    p = float(wilcoxon(diff, alternative="greater").pvalue) if np.any(diff != 0) else 1.0
    return {"n_images": len(before), "mean_before": float(before.mean()), "mean_after": float(after.mean()),
            "rise": rise, "p_value": p, "warning": bool(rise >= SHORTCUT_MIN_RISE and p < alpha)}


def shortcut_probe(model, image_size: int, data_dir: Path, resolution: int, cache: Cache | None = None,
                   split: str = "val", metadata_fields: list[str] | tuple = ()) -> dict:
    """`probe_summary` of `model` on the real non-melanomas of `split`, as they are and after the
    generator's resolution path (`GeneratorResolution`): does resampling alone make them melanomas?"""
    from torchvision.transforms import v2

    from melanogan.data.transforms import GeneratorResolution

    plain = CachedImageDataset(data_dir, split, transform=eval_preset(image_size), labels=[0], cache=cache)
    resampled = CachedImageDataset(data_dir, split, labels=[0], cache=cache,
                                   transform=v2.Compose([GeneratorResolution(resolution), eval_preset(image_size)]))
    device = torch.device("cpu")
    metadata = encode_metadata(plain.rows, list(metadata_fields)) if metadata_fields else None
    return {**probe_summary(predict_logits(model, plain, device=device, metadata=metadata),
                            predict_logits(model, resampled, device=device, metadata=metadata)),
            "resolution": resolution, "split": split}
