"""The study report: report.md and a self-contained report.html (figures embedded)."""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from melanogan import __version__
from melanogan.classify import metrics as M
from melanogan.classify.evaluate import eval_dir_name
from melanogan.data.audit import audit_manifest
from melanogan.data.manifest import load_manifest, manifest_hash
from melanogan.errors import MelanoganError
from melanogan.fileio import atomic_path, read_json, save_figure, write_csv, write_text
from melanogan.render import markdown_to_html
from melanogan.study.layout import ORIGINAL_DIR, arm_dir
from melanogan.study.stats import ALPHA, compare_with_baseline


def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _nanmean(values) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def _mean_ci(values) -> str:
    s = M.summarize(values)
    if s["n"] == 0:
        return "n/a"
    if s["n"] == 1:
        return _fmt(s["mean"])
    return f"{_fmt(s['mean'])} [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]"


def _score_ci(ms: list[dict], key: str) -> str:
    """`key` (e.g. roc_auc) over seeds: the mean with a t CI; with one seed, that run's grouped-bootstrap
    CI (`{key}_ci95`), so a single-seed report still shows its uncertainty."""
    if len(ms) == 1 and ms[0].get(f"{key}_ci95") and not math.isnan(value := _nan(ms[0].get(key))):
        lo, hi = ms[0][f"{key}_ci95"]
        return f"{_fmt(value)} [{_fmt(_nan(lo))}, {_fmt(_nan(hi))}]"
    return _mean_ci([_nan(m.get(key)) for m in ms])


def _by_arm(cfg, metrics: dict):
    """(arm, metrics of each finished seed) for every arm with at least one finished run."""
    for arm in cfg.arms:
        ms = [metrics[(s, arm)] for s in cfg.seeds if (s, arm) in metrics]
        if ms:
            yield arm, ms


def source_table(cfg, metrics: dict) -> list[str]:
    """Markdown lines: ROC-AUC of every arm on each source's part of the test split (empty when the
    test split has one source)."""
    sources = sorted({src for m in metrics.values() for src in m.get("by_source", {})})
    if not sources:
        return []
    sizes = {}
    for m in metrics.values():
        for src, part in m.get("by_source", {}).items():
            sizes.setdefault(src, f"{src} ({part['n_images']} images, {part['n_melanoma']} melanoma)")
    rows = [[arm] + [_score_ci([m["by_source"][src] for m in ms if src in m.get("by_source", {})], "roc_auc")
                     for src in sources] for arm, ms in _by_arm(cfg, metrics)]
    return ["## By source", "",
            "ROC-AUC on each source's part of the test split (same CIs as above): a model can do well overall "
            "and poorly on one clinic's or archive's images.", ""] + \
        _table(["arm"] + [sizes[src] for src in sources], rows) + [""]


def subgroup_section(cfg, metrics: dict) -> list[str]:
    """Markdown lines: every arm's test ROC-AUC (mean over seeds) in each subgroup that `evaluate`
    reports (source, sex, age band, site, skin-tone band), its difference from the baseline, and the
    subgroups too small for an AUC listed as such. Descriptive: no test per subgroup (dozens of
    comparisons on small groups would mostly find noise), which the text says."""
    keys: dict[tuple[str, str], dict] = {}
    for m in metrics.values():
        for g in m.get("by_subgroup", []):
            keys.setdefault((g["variable"], g["value"]), g)
    if not keys:
        return []
    arms = [arm for arm, _ in _by_arm(cfg, metrics)]

    def auc(arm: str, key) -> float:
        values = [_nan(g["roc_auc"]) for s in cfg.seeds if (s, arm) in metrics
                  for g in metrics[(s, arm)].get("by_subgroup", []) if (g["variable"], g["value"]) == key]
        return _nanmean(values)

    rows, mixed = [], {}
    for key, g in sorted(keys.items()):
        base = auc("baseline", key)
        cells = []
        for arm in arms:
            value = auc(arm, key)
            if math.isnan(value):
                cells.append("too few")
                continue
            delta = value - base
            cells.append(_fmt(value) + ("" if arm == "baseline" or math.isnan(base) else f" ({delta:+.3f})"))
            if arm != "baseline" and not math.isnan(base) and abs(delta) >= 0.02:
                mixed.setdefault((arm, key[0]), set()).add(delta > 0)
        rows.append([f"{key[0]}: {key[1]}", str(g["n_images"]), str(g["n_melanoma"])] + cells)
    lines = ["## Who does each arm fail? (subgroups of the test split)", "",
             "ROC-AUC per subgroup, mean over seeds, difference from the baseline in brackets; subgroups with too "
             "few melanomas or benign images for an AUC are listed, not dropped. Descriptive only: subgroups are "
             "small and many, so differences here are not tested and most are within noise (see each run's "
             "subgroups.csv for the bootstrap CIs). Skin tone is the ITA band of the skin around the lesion.", ""]
    lines += _table(["subgroup", "images", "melanoma"] + arms, rows) + [""]
    both = sorted(f"{arm} ({variable})" for (arm, variable), signs in mixed.items() if signs == {True, False})
    lines += [("Arms that gain at least 0.02 AUC in one subgroup and lose at least 0.02 in another of the same "
               "variable: " + ", ".join(both) + ".") if both else
              "No arm gains at least 0.02 AUC in one subgroup while losing at least 0.02 in another of the same "
              "variable.", ""]
    return lines


LEAKY_BANNER = ("**Leaky by design**: images split without regard to patient or lesion (the audit below fails), the "
                "GAN trained on every melanoma including validation and test ones, the original CNN at 224 px, "
                "decisions at a fixed 0.5, one seed. These numbers do not estimate performance on new patients; "
                "they show how the original study's figures arose.")


def original_comparison(study_dir: Path, cfg) -> list[str]:
    """Markdown lines: the original (leaky) protocol beside this study, arm by arm, at 0.5 and at the
    validation-chosen threshold: a recall jump that comes with a moved threshold is the threshold,
    and an AUC gap between the protocols on the same arm is the leak."""
    seed = cfg.seeds[0]
    rows = []
    for protocol, root in (("this study", study_dir), ("original (LEAKY)", study_dir / ORIGINAL_DIR)):
        for arm in ("baseline", "gan"):
            path = arm_dir(root, seed, arm) / "eval-test" / "metrics.json"
            if not path.is_file():
                continue
            m = read_json(path)
            fixed, youden = m["thresholds"]["fixed_0.5"], m["thresholds"]["val_youden"]
            rows.append([protocol, arm, _fmt(_nan(fixed["recall"])), _fmt(_nan(fixed["specificity"])),
                         _fmt(_nan(fixed["accuracy"])), _fmt(_nan(m["roc_auc"])), _fmt(_nan(youden["threshold"])),
                         _fmt(_nan(youden["sensitivity"])), _fmt(_nan(youden["specificity"]))])
    if not rows:
        return []
    return ["## The original protocol beside this one", "",
            f"Seed {seed}, each protocol on its own test split ({ORIGINAL_DIR}/report.md has the original's full, "
            "leaky report). Where the original's recall at 0.5 jumps for the gan arm while its validation-chosen "
            "threshold moves and its ROC-AUC does not, the jump is a moved threshold, not a better model; the ROC-AUC "
            "gap between the protocols on the same arm is what the leak (split by image, GAN on every melanoma) "
            "adds.", ""] + _table(["protocol", "arm", "recall at 0.5", "specificity at 0.5", "accuracy at 0.5",
                                   "ROC-AUC", "validation (Youden) threshold", "sensitivity there",
                                   "specificity there"], rows) + [""]


def resolution_section(study_dir: Path, cfg, comps: list[dict]) -> list[str]:
    """Markdown lines: which resolution path the arms' real training images took, what it cost the
    baseline, and the shortcut probe of every arm trained with synthetic images."""
    if not cfg.uses_gan:
        return []
    res = cfg.gan_resolution
    lines = ["## Resolution control", ""]
    if cfg.resolution == "matched":
        lines.append(f"`resolution: matched`: every arm's real training images passed through the generator's path "
                     f"(down to {res} px, then up to the cache size as synthetic images are), so that a soft, "
                     "upsampled texture cannot stand for melanoma; validation and test images did not.")
        cost = next((c for c in comps if c["arm"] == "baseline-native-res"), None)
        if cost is not None:
            lines.append(f"Its cost for the baseline: `baseline-native-res` (the baseline without the path) minus "
                         f"baseline = {cost['difference']:+.3f} ROC-AUC (95% CI {_fmt(cost['ci_low'])} to "
                         f"{_fmt(cost['ci_high'])}).")
    else:
        lines.append(f"`resolution: native`: real training images at the cache resolution, synthetic ones upsampled "
                     f"from {res} px. Read the gan arms with the shortcut probe below in mind.")
    lines += ["", "Shortcut probe: mean melanoma probability of the real validation non-melanomas, as they are and "
              f"after the generator's {res} px resampling alone; a significant rise (one-sided Wilcoxon, >= 0.01) "
              "means the arm scores softness as melanoma.", ""]
    rows = []
    for seed in cfg.seeds:
        for arm in cfg.arms:
            path = arm_dir(study_dir, seed, arm) / "shortcut_probe.json"
            if path.is_file():
                p = read_json(path)
                rows.append([arm, str(seed), _fmt(p["mean_before"]), _fmt(p["mean_after"]), f"{p['rise']:+.3f}",
                             _fmt(p["p_value"]), "**WARNING: shortcut**" if p["warning"] else "no shortcut found"])
    return lines + _table(["arm", "seed", "before", "after", "rise", "p", "verdict"], rows) + [""]


def collect(study_dir: Path, cfg) -> tuple[dict, dict]:
    """metrics[(seed, arm)] and predictions[(seed, arm)] of the test split."""
    metrics, preds = {}, {}
    for seed in cfg.seeds:
        for arm in cfg.arms:
            ev = arm_dir(study_dir, seed, arm) / "eval-test"
            if (ev / "metrics.json").is_file():
                metrics[(seed, arm)] = read_json(ev / "metrics.json")
                preds[(seed, arm)] = pd.read_csv(ev / "predictions.csv")
    return metrics, preds


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def leakage_audit(study_dir: Path, cfg) -> list[tuple[str, bool, str]]:
    data = Path(cfg.data)
    real = load_manifest(data)
    checks = [(f"real data: {name}", ok, detail) for name, ok, detail in audit_manifest(real).checks]
    data_hash = manifest_hash(real)
    for seed in cfg.seeds:
        syn = study_dir / f"seed-{seed}" / "synthetic"
        if (syn / "manifest.parquet").is_file():
            m = load_manifest(syn)
            checks.append((f"seed {seed}: synthetic rows only in train", bool((m["split"] == "train").all()),
                           f"{len(m)} rows, splits {sorted(m['split'].unique())}"))
            combined = pd.concat([real, m.reindex(columns=real.columns)], ignore_index=True)
            failed = [n for n, ok, _ in audit_manifest(combined).checks if not ok]
            checks.append((f"seed {seed}: real + synthetic manifest passes the audit", not failed,
                           "; ".join(failed) or "all checks pass"))
        gan_run = study_dir / f"seed-{seed}" / "gan" / "run.json"
        if gan_run.is_file():
            info = read_json(gan_run)
            ok = info.get("trained_on_split") == "train" and info.get("manifest_hash") == data_hash
            where = f", on {info.get('accelerator')}" + (
                f" from a {info['packed']['size']} px JPEG-{info['packed']['jpeg_quality']} pack"
                if info.get("packed") else "")
            syn_info = syn / "prepare.json"
            generator = read_json(syn_info).get("generator", "ema") if syn_info.is_file() else "not generated yet"
            checks.append((f"seed {seed}: GAN trained on the training split only", ok,
                           f"split={info.get('trained_on_split')}, images={info.get('training_images')}, "
                           f"data hash {'matches' if info.get('manifest_hash') == data_hash else 'DIFFERS'}{where}; "
                           f"synthetic images from the {generator} generator"))
    return checks


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "not a git checkout"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(cfg) -> dict:
    versions = {}
    for pkg in ("torch", "torchvision", "lightning-fabric", "numpy", "pandas", "scikit-learn", "scipy", "pillow",
                "opencv-python-headless"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {"melanogan": __version__, "git_commit": _git_commit(), "python": platform.python_version(),
            "platform": platform.platform(), "libraries": versions,
            "data_manifest_hash": manifest_hash(load_manifest(Path(cfg.data)))}


def _roc_figure(cfg, preds: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    seed = cfg.seeds[0]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    drawn = False
    for arm in cfg.arms:
        p = preds.get((seed, arm))
        if p is None or not (0 < p["label"].sum() < len(p)):
            continue
        fpr, tpr, _ = roc_curve(p["label"], p["logit"])
        ax.plot(fpr, tpr, label=f"{arm} (AUC {M.roc_auc(p['label'], p['logit']):.3f})")
        drawn = True
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC on the test split (seed {seed})")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return drawn


def _synthetic_grid(study_dir: Path, cfg, path: Path, n: int = 8) -> bool:
    """Real validation images beside synthetic ones, per class (two rows each: real, then synthetic),
    both from their caches (the same preprocessing), at the same display size."""
    from PIL import Image

    from melanogan.data.dataset import CachedImageDataset

    syn = study_dir / f"seed-{cfg.seeds[0]}" / "synthetic"
    if not (syn / "manifest.parquet").is_file():
        return False
    rows = []
    for label in (1, 0):
        try:
            fake = CachedImageDataset(syn, "train", labels=[label])
            real = CachedImageDataset(Path(cfg.data), "val", labels=[label])
        except MelanoganError:
            continue
        for ds in (real, fake):
            tiles = [np.asarray(Image.fromarray(ds.raw(i).permute(1, 2, 0).numpy()).resize((96, 96)))
                     for i in range(min(n, len(ds)))]
            rows.append(tiles + [np.full((96, 96, 3), 255, np.uint8)] * (n - len(tiles)))
    if not rows:
        return False
    grid = np.full((len(rows) * 98, n * 98, 3), 255, np.uint8)
    for r, tiles in enumerate(rows):
        for c, t in enumerate(tiles):
            grid[r * 98:r * 98 + 96, c * 98:c * 98 + 96] = t
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return True


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _changed_options(classifier) -> str:
    """The classifier options a study set away from `train`'s defaults (model and size aside: the report
    names them), so a reader knows the baseline is not the plain default classifier."""
    defaults = type(classifier)()
    changed = [f"{k} {v}" for k, v in classifier.model_dump().items()
               if k not in ("model", "image_size") and v != getattr(defaults, k)]
    return f" ({', '.join(changed)}; otherwise `train`'s defaults)" if changed else " (`train`'s defaults)"


def write_report(study_dir: Path, cfg) -> Path:
    """Build report.md and report.html from whatever runs have finished."""
    study_dir = Path(study_dir)
    figures = study_dir / "figures"
    figures.mkdir(exist_ok=True)
    metrics, preds = collect(study_dir, cfg)
    lines = ["# melanogan study: does synthetic data help the melanoma classifier?", ""]
    if cfg.protocol == "original":
        lines = ["# LEAKY: the original study's protocol, reproduced", "", LEAKY_BANNER, ""]
    n_done = len(metrics)
    lines += [f"Data: `{cfg.data}`. Arms: {', '.join(cfg.arms)}. Seeds: {', '.join(map(str, cfg.seeds))} "
              f"({n_done} of {len(cfg.arms) * len(cfg.seeds)} runs finished). Classifier: {cfg.classifier.model} at "
              f"{cfg.classifier.image_size}px{_changed_options(cfg.classifier)}. "
              f"GAN: preset {cfg.gan.preset}, {cfg.n_synthetic} synthetic melanomas "
              + (f"from one GAN (seed {cfg.seeds[0]}) shared by every seed, so the spread over seeds leaves out the "
                 "GAN's own variance; it was " if cfg.gan.shared_across_seeds else "per seed, ")
              + ("trained on every melanoma of every split (LEAKY)." if cfg.protocol == "original"
                 else "trained on the training split only."), ""]
    any_m = next(iter(metrics.values()), None)
    if any_m:
        lines += [f"Test split: {any_m['n_images']} real images, {any_m['n_melanoma']} melanoma "
                  f"({any_m['prevalence']:.1%}), {any_m['n_groups']} patient/lesion groups.", ""]

    lines += ["## The original study's table (threshold 0.5)", "",
              "Accuracy, precision and recall at a fixed 0.5 threshold depend on where the scores happen to fall; "
              "a large recall change with falling accuracy usually means the threshold moved, not that the model "
              "got better. Shown for comparability only (mean over seeds).", ""]
    rows = []
    for arm, ms in _by_arm(cfg, metrics):
        t = [m["thresholds"]["fixed_0.5"] for m in ms]
        rows.append([arm, _fmt(_nanmean([_nan(x["accuracy"]) for x in t])),
                     _fmt(_nanmean([_nan(x["precision"]) for x in t])),
                     _fmt(_nanmean([_nan(x["recall"]) for x in t])),
                     _fmt(_nanmean([_nan(m["roc_auc"]) for m in ms]))])
    lines += _table(["arm", "accuracy", "precision", "recall", "AUC"], rows) + [""]

    lines += ["## The honest table", "",
              "Threshold-free discrimination (ROC-AUC, PR-AUC) and the operating point chosen on validation "
              "(Youden's J), applied unchanged to the test split. Mean over seeds with a 95% CI (t over seeds); "
              "ROC-AUC and PR-AUC of a single seed with that run's 95% CI from a bootstrap over patients/lesions.", ""]
    rows = []
    for arm, ms in _by_arm(cfg, metrics):
        y = [m["thresholds"]["val_youden"] for m in ms]
        rows.append([arm, _score_ci(ms, "roc_auc"), _score_ci(ms, "pr_auc"),
                     _mean_ci([_nan(x["sensitivity"]) for x in y]), _mean_ci([_nan(x["specificity"]) for x in y])])
    lines += _table(["arm", "ROC-AUC", "PR-AUC", "sensitivity (val threshold)", "specificity (val threshold)"],
                    rows) + [""]
    lines += source_table(cfg, metrics)
    lines += subgroup_section(cfg, metrics)

    comps = compare_with_baseline(cfg.arms, cfg.seeds, preds, n_bootstrap=cfg.bootstrap)
    if comps:  # the table as data, for notebooks (melanogan.study(...).table) and spreadsheets
        write_csv(study_dir / "versus_baseline.csv", pd.DataFrame([
            {k: (", ".join(f"{p:.4g}" for p in v) if isinstance(v, list) else v) for k, v in c.items()}
            for c in comps]))
    lines += ["## Versus baseline", "",
              "Primary test: a paired bootstrap of the ROC-AUC difference on the same test images, resampling "
              "patient/lesion clusters, pooled over seeds; p-values Holm-adjusted over the arms compared with the "
              f"baseline, and the verdict uses the adjusted p (alpha {ALPHA}). Secondary: DeLong per seed (ignores "
              "clusters) and, with several seeds, the mean difference with a t interval over seeds.", ""]
    rows = [[c["arm"], f"{c['difference']:+.3f}", f"{_fmt(c['ci_low'])} to {_fmt(c['ci_high'])}",
             _fmt(c["p_value"]), _fmt(c["p_holm"]),
             (f"{c['seed_mean_difference']:+.3f} [{_fmt(c['seed_ci_low'])}, {_fmt(c['seed_ci_high'])}]"
              if c["seeds"] > 1 else "one seed"),
             ", ".join(f"{p:.3f}" for p in c["delong_p_values"]), c["verdict"]] for c in comps]
    lines += _table(["arm", "AUC difference", "95% CI (cluster bootstrap)", "p", "p (Holm)",
                     "over seeds", "DeLong p per seed", "verdict"], rows) + [""]
    for c in comps:
        base = [metrics[(s, "baseline")]["thresholds"]["val_youden"] for s in cfg.seeds if (s, "baseline") in metrics]
        arm_t = [metrics[(s, c["arm"])]["thresholds"]["val_youden"] for s in cfg.seeds if (s, c["arm"]) in metrics]
        if base and arm_t:
            fp_base = np.mean([x["fp"] / max(x["fp"] + x["tn"], 1) * 100 for x in base])
            fp_arm = np.mean([x["fp"] / max(x["fp"] + x["tn"], 1) * 100 for x in arm_t])
            lines.append(f"- **{c['arm']}**: {c['verdict']} At the validation-chosen threshold: sensitivity "
                         f"{np.mean([_nan(x['sensitivity']) for x in arm_t]):.3f} vs "
                         f"{np.mean([_nan(x['sensitivity']) for x in base]):.3f}; false positives per 100 benign "
                         f"lesions {fp_arm:.1f} vs {fp_base:.1f}.")
    lines.append("")

    lines += resolution_section(study_dir, cfg, comps)
    if cfg.protocol == "both":
        lines += original_comparison(study_dir, cfg)

    lines += ["## Oracle operating points (not validation-chosen)", "",
              "Read off each arm's own test ROC curve, i.e. chosen with the test labels: upper bounds for comparison "
              "with papers that report them, not operating points a clinic could set in advance.", ""]
    rows = []
    for arm, ms in _by_arm(cfg, metrics):
        oracle = [m.get("oracle_operating_points", {}) for m in ms]
        rows.append([arm] + [_mean_ci([_nan(o.get(k)) for o in oracle]) for k in
                             ("specificity_at_sensitivity_90", "specificity_at_sensitivity_95",
                              "sensitivity_at_specificity_80")])
    lines += _table(["arm", "specificity at 90% sensitivity (oracle)", "specificity at 95% sensitivity (oracle)",
                     "sensitivity at 80% specificity (oracle)"], rows) + [""]

    if cfg.external:
        lines += ["## External test sets", "", "Thresholds from the training data's validation split.", ""]
        for ext in cfg.external:
            ext_metrics = {(s, arm): read_json(p) for s in cfg.seeds for arm in cfg.arms
                           if (p := arm_dir(study_dir, s, arm) / eval_dir_name(Path(ext), "all", True) /
                               "metrics.json").is_file()}
            rows = [[arm, _score_ci(ms, "roc_auc"), _score_ci(ms, "pr_auc")] for arm, ms in _by_arm(cfg, ext_metrics)]
            lines += [f"### {ext}", ""] + _table(["arm", "ROC-AUC", "PR-AUC"], rows) + [""]

    quality = study_dir / f"seed-{cfg.seeds[0]}" / "synthetic" / "quality" / "quality.json"
    if quality.is_file():
        q = read_json(quality)
        lines += ["## Synthetic image quality", ""]
        lines += [f"- {k}: {v}" for k, v in q.get("summary", {}).items()] + [""]

    lines += ["## Figures", ""]
    if _roc_figure(cfg, preds, figures / "roc.png"):
        lines += ["![ROC curves of every arm](figures/roc.png)", ""]
    if _synthetic_grid(study_dir, cfg, figures / "synthetic.png"):
        lines += ["Real validation images and synthetic ones, side by side (first seed's GAN; rows: real melanomas, "
                  "synthetic melanomas, real non-melanomas, synthetic non-melanomas):", "",
                  "![real and synthetic, per class](figures/synthetic.png)", ""]
    losses = study_dir / f"seed-{cfg.seeds[0]}" / "gan" / "samples" / "losses.png"
    if losses.is_file():
        (figures / "gan_losses.png").write_bytes(losses.read_bytes())
        lines += ["![GAN training losses](figures/gan_losses.png)", ""]

    lines += ["## Leakage audit", ""]
    audit_rows = [[name, "pass" if ok else "FAIL", detail] for name, ok, detail in leakage_audit(study_dir, cfg)]
    lines += _table(["check", "result", "detail"], audit_rows) + [""]

    prov = provenance(cfg)
    lines += ["## Provenance", "", f"- melanogan {prov['melanogan']}, git commit {prov['git_commit']}",
              f"- Python {prov['python']} on {prov['platform']}",
              "- " + ", ".join(f"{k} {v}" for k, v in prov["libraries"].items()),
              f"- data manifest hash {prov['data_manifest_hash']}", "", "Config:", "", "```yaml",
              yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip(), "```", ""]
    text = "\n".join(lines)
    write_text(study_dir / "report.md", text)
    write_text(study_dir / "report.html", markdown_to_html(text, study_dir, "melanogan study"))
    write_text(study_dir / "results.json", json.dumps({"comparisons": comps, "provenance": prov}, indent=2,
                                                      default=str))
    return study_dir / "report.md"
