"""`melanogan card RUN_DIR`: a model card (markdown + self-contained html) from what the run and its
evaluations measured; nothing in it is typed by hand.

Structure: the sections of Model Cards (Mitchell et al. 2019), with the reporting items of
TRIPOD+AI (Collins et al. 2024) and CLAIM (2024 update) that a trained run can answer named in
COVERED_ITEMS. Items about study design, clinical setting and ethics approval cannot come from a run
folder; the card lists them as the user's to fill in rather than leaving them out silently.

Failure modes are found, not asserted: a subgroup whose AUC CI lies wholly below the overall AUC,
an external set whose AUC CI lies wholly below the internal one, and an operating point whose
sensitivity or specificity on another set falls more than OPERATING_POINT_DROP below the internal.
"""

from __future__ import annotations

import math
from pathlib import Path

from melanogan import __version__
from melanogan.errors import MelanoganError
from melanogan.fileio import read_json, write_text

OPERATING_POINT_DROP = 0.10
COVERED_ITEMS = {
    "Model Cards (Mitchell 2019)": ["model details", "intended use", "factors (subgroups)", "metrics",
                                    "evaluation data", "training data", "quantitative analyses (subgroups)",
                                    "caveats and recommendations"],
    "TRIPOD+AI": ["5 data sources", "6 participants (counts, prevalence)", "8 outcome (melanoma vs other)",
                  "9 predictors (image, metadata)", "10 sample size (counts)", "11 missing data (metadata codes)",
                  "12 analytical methods (model, preprocessing, training)", "12e performance measures with CIs",
                  "12f calibration", "14 participants' characteristics (subgroup make-up)",
                  "16 model performance (internal and external)", "20 limitations"],
    "CLAIM (2024)": ["7 data sources", "9 data preprocessing", "11 ground truth (label source)",
                     "13 data partitions (patient/lesion-grouped splits)", "14-16 model and training details",
                     "22 metrics of performance", "26 external testing", "28 performance with CIs",
                     "29 failure analysis (subgroups)"],
}
NOT_FROM_A_RUN = ["ethics approval and consent", "clinical setting and intended users in your deployment",
                  "reader study or comparison with dermatologists", "prospective or real-world evaluation",
                  "funding and conflicts of interest"]


def _hair(cache: dict) -> str:
    if not cache.get("hair_removal"):
        return "off"
    from melanogan.data.cache import CacheOptions
    from melanogan.data.images import HairMethod

    method = CacheOptions.from_dict(cache).hair_method  # a run from before the option: the old mask
    return ("on (long thin lines only)" if method == HairMethod.lines
            else "on (every thin dark structure, pigment network included)")


def _preprocessing(cache: dict, image_size: int) -> str:
    # the optional steps after colour constancy, named only where a run used them
    steps = f"exposure normalised to grey level {cache['white_level']}, " if cache.get("white_level") else ""
    if cache.get("clahe"):
        steps += f"local contrast equalised (CLAHE, clip limit {cache['clahe']:g}), "
    return (f"Decoded once at {cache.get('size')} px ({cache.get('resize_mode')}), colour constancy "
            f"{'on' if cache.get('color_constancy') else 'off'}, {steps}hair removal {_hair(cache)}; then resized "
            f"to {image_size} px and normalised with ImageNet statistics. `predict`, `serve` and `export` apply the "
            "same steps from run.json.")


def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(m: dict, key: str = "roc_auc") -> str:
    lo, hi = (m.get(f"{key}_ci95") or [None, None])
    return f"{_fmt(m.get(key))} [{_fmt(lo)}, {_fmt(hi)}]"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def evaluations(run_dir: Path) -> dict[str, dict]:
    """metrics.json of every evaluation folder in RUN_DIR (eval-test, eval-external-..., eval-*-ttaN)."""
    found = {}
    for path in sorted(Path(run_dir).glob("eval-*/metrics.json")):
        found[path.parent.name] = read_json(path)
    return found


def failure_modes(internal: dict | None, others: dict[str, dict]) -> list[str]:
    """Findings, each a sentence with its numbers (pure: metrics dicts in, text out)."""
    found = []
    if internal:
        overall = internal.get("roc_auc")
        for g in internal.get("by_subgroup", []):
            hi = (g.get("roc_auc_ci95") or [None, None])[1]
            if overall is not None and hi is not None and not math.isnan(hi) and hi < overall:
                found.append(f"Subgroup {g['variable']} = {g['value']} ({g['n_images']} images, {g['n_melanoma']} "
                             f"melanoma): ROC-AUC {_ci(g)}, wholly below the overall {_fmt(overall)}.")
        for d in internal.get("by_diagnosis", []):  # a benign diagnosis the model mistakes for melanoma
            hi = (d.get("roc_auc_vs_melanoma_ci95") or [None, None])[1]
            if overall is not None and hi is not None and not math.isnan(hi) and hi < overall:
                found.append(f"Diagnosis {d['diagnosis']} ({d['n_images']} images): the melanomas are told from it "
                             f"at ROC-AUC {_ci(d, 'roc_auc_vs_melanoma')}, wholly below the overall {_fmt(overall)}; "
                             f"{_fmt(d.get('called_melanoma'))} of them called melanoma at the validation threshold.")
        small = [f"{g['variable']} = {g['value']}" for g in internal.get("by_subgroup", []) if g.get("note")]
        if small:
            found.append(f"Not assessable (too few images of a class for an AUC): {', '.join(small)}. The model's "
                         "behaviour there is unknown.")
    for name, m in others.items():
        if internal and m.get("roc_auc") is not None and internal.get("roc_auc_ci95"):
            hi = (m.get("roc_auc_ci95") or [None, None])[1]
            if hi is not None and not math.isnan(hi) and hi < internal["roc_auc_ci95"][0]:
                found.append(f"{name}: ROC-AUC {_ci(m)}, wholly below the internal test's {_ci(internal)}: the model "
                             "does not travel to these images as it is.")
        t_int = (internal or {}).get("thresholds", {}).get("val_youden")
        t_ext = m.get("thresholds", {}).get("val_youden")
        if t_int and t_ext:
            for key in ("sensitivity", "specificity"):
                a, b = t_int.get(key), t_ext.get(key)
                if a is not None and b is not None and a - b > OPERATING_POINT_DROP:
                    found.append(f"{name}: at the validation threshold ({_fmt(t_ext['threshold'])}) {key} is "
                                 f"{_fmt(b)} against {_fmt(a)} internally: the operating point does not transfer; "
                                 "calibrate it on local cases (`melanogan calibrate`).")
    return found


def model_card(run_dir: Path) -> str:
    """The card as markdown."""
    run_dir = Path(run_dir)
    if not (run_dir / "best" / "state.json").is_file():
        raise MelanoganError(f"{run_dir}: no trained classifier (best/state.json). Train one with `melanogan train`.")
    from melanogan.classify.train import load_model

    _, cfg, best = load_model(run_dir / "best")
    run = read_json(run_dir / "run.json")
    evals = evaluations(run_dir)
    internal = evals.get("eval-test")
    others = {k: v for k, v in evals.items() if k != "eval-test"}
    lines = [f"# Model card: {run_dir.name}", "",
             f"Written by melanogan {__version__} from {run_dir} (every number below was measured by `train`/"
             "`evaluate`; regenerate with `melanogan card` after new evaluations).", ""]

    lines += ["## Model details", "",
              f"- Classifier `{cfg.model}` at {cfg.image_size} px, weights {cfg.weights or 'from scratch'}; "
              f"best epoch {best.get('epoch')} by validation ROC-AUC ({_fmt(best.get('val_auc'))}).",
              "- Output: a melanoma logit; probability = sigmoid(logit). Decision thresholds chosen on the validation "
              "split (Youden's J; 95% sensitivity) and stored with the checkpoint's hash.",
              f"- Training: loss {cfg.loss}, sampler {cfg.sampler}, augmentation {cfg.augment}, auxiliary diagnosis "
              f"head weight {cfg.diagnosis_weight}"
              + (f" ({cfg.diagnosis_vocabulary} diagnosis classes)" if cfg.diagnosis_weight else "")
              + f", {cfg.epochs} epochs max, seed {cfg.seed}, precision "
              f"{cfg.precision}.",
              "- Inputs: the dermoscopic image" + (f" and patient metadata ({', '.join(cfg.metadata)}; missing values "
                                                    "have their own code)." if cfg.metadata else "."), ""]

    lines += ["## Intended use", "",
              "- Intended: research on melanoma classification from dermoscopic images; decision support studied "
              "by dermatology researchers, with the thresholds calibrated on the deploying site's own cases.",
              "- Not intended: diagnosis without a clinician; clinical or smartphone (non-dermoscopic) photographs; "
              "populations, skin tones or devices absent from the training data (see below); any use where the "
              "operating point has not been checked on local data.", ""]

    lines += _training_data(run)
    cache = run.get("cache_options") or {}
    lines += ["## Preprocessing", "", _preprocessing(cache, cfg.image_size), ""]

    lines += ["## Metrics", ""]
    if not evals:
        lines += ["No evaluation yet: run `melanogan evaluate RUN_DIR` (and `--data OTHER_DATA_DIR` for external "
                  "sets), then `melanogan card` again.", ""]
    else:
        rows = []
        for name, m in evals.items():
            t = m.get("thresholds", {}).get("val_youden", {})
            cal = m.get("calibration", {})
            rows.append([name + (" (external)" if m.get("external") else ""), m.get("n_images"), m.get("n_melanoma"),
                         _ci(m), _ci(m, "pr_auc"), _fmt(t.get("sensitivity")), _fmt(t.get("specificity")),
                         _fmt(cal.get("ece")), _fmt(cal.get("brier"))])
        lines += ["ROC-AUC and PR-AUC with 95% CIs from a bootstrap over patients/lesions; sensitivity and "
                  "specificity at the threshold chosen on validation (not on the set reported); calibration by "
                  "expected calibration error (ECE) and Brier score.", ""]
        lines += _table(["evaluation", "images", "melanoma", "ROC-AUC", "PR-AUC", "sensitivity", "specificity", "ECE",
                         "Brier"], rows) + [""]
    if internal and internal.get("by_subgroup"):
        lines += ["## Subgroups (internal test)", "",
                  "ROC-AUC with its grouped-bootstrap CI and the operating point per subgroup; skin tone is the ITA "
                  "band of the skin around the lesion. Subgroups too small for an AUC are listed.", ""]
        lines += _table(["variable", "value", "images", "melanoma", "ROC-AUC", "sensitivity", "specificity", "note"],
                        [[g["variable"], g["value"], g["n_images"], g["n_melanoma"],
                          _ci(g) if g.get("roc_auc") is not None else "n/a", _fmt(g.get("sensitivity")),
                          _fmt(g.get("specificity")), g.get("note", "")] for g in internal["by_subgroup"]]) + [""]

    if internal and internal.get("by_diagnosis"):
        lines += ["## Diagnoses (internal test)", "",
                  "Per diagnosis: the share called melanoma at the validation threshold (for a benign diagnosis, "
                  "its false-positive rate) and the ROC-AUC of all the melanomas against that diagnosis alone, with "
                  "its grouped-bootstrap CI: which benign lesions the model confuses with melanoma.", ""]
        lines += _table(["diagnosis", "group", "melanoma", "images", "called melanoma", "ROC-AUC against the melanomas",
                         "note"],
                        [[d["diagnosis"], d.get("group", ""), "yes" if d["melanoma"] else "no", d["n_images"],
                          _fmt(d.get("called_melanoma")),
                          _ci(d, "roc_auc_vs_melanoma") if d.get("roc_auc_vs_melanoma") is not None else "n/a",
                          d.get("note", "")] for d in internal["by_diagnosis"]]) + [""]

    findings = failure_modes(internal, others)
    lines += ["## Known failure modes (found by the evaluations above)", ""]
    lines += [f"- {f}" for f in findings] if findings else ["- None found by these evaluations; that is not evidence "
                                                            "of none: evaluate on more sets."]
    lines += [""]
    lines += _synthetic(run)
    lines += ["## Reporting items covered", ""]
    for guideline, items in COVERED_ITEMS.items():
        lines.append(f"- **{guideline}**: {'; '.join(items)}.")
    lines += [f"- **Yours to add** (not knowable from a run folder): {'; '.join(NOT_FROM_A_RUN)}.", ""]
    return "\n".join(lines)


def _training_data(run: dict) -> list[str]:
    from melanogan.data.manifest import load_manifest

    lines = ["## Training data", ""]
    data_dir = Path(run.get("data_dir", ""))
    try:
        m = load_manifest(data_dir)
    except MelanoganError:
        return lines + [f"{run.get('train_images')} training images ({run.get('train_melanoma')} melanoma) from "
                        f"{data_dir} (not here any more: its make-up cannot be listed).", ""]
    real = m[(m["label"] >= 0) & (m["source"] != "synthetic")]
    rows = []
    for (source, split), g in real.groupby(["source", "split"], sort=True):
        rows.append([source, split, len(g), int(g["label"].sum()), f"{g['label'].mean():.1%}"])
    lines += [f"DATA_DIR {data_dir}; splits grouped by patient/lesion and near-duplicate cluster (no patient in two "
              "splits). Labels: melanoma vs any other diagnosis, from the sources' label files.", ""]
    lines += _table(["source", "split", "images", "melanoma", "prevalence"], rows) + [""]
    train = real[real["split"] == "train"]
    makeup = []
    for column, name in (("sex", "sex"), ("ita_category", "skin tone (ITA band)"), ("anatom_site", "site")):
        if column in train.columns:
            counts = train[column].astype("string").fillna("unknown").value_counts()
            makeup.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if "age" in train.columns:
        ages = train["age"].dropna()
        makeup.append(f"- age: median {ages.median():.0f} (IQR {ages.quantile(.25):.0f}-{ages.quantile(.75):.0f}), "
                      f"missing {int(train['age'].isna().sum())}" if len(ages) else "- age: missing for every image")
    if makeup:
        lines += ["Training split make-up:", ""] + makeup + [""]
    return lines


def _synthetic(run: dict) -> list[str]:
    if not run.get("synthetic"):
        return ["## Synthetic data", "", "None used in training.", ""]
    lines = ["## Synthetic data", ""]
    for s in run["synthetic"]:
        lines.append(f"- {s['dir']}: {s['images']} images (manifest {s['manifest_hash']}).")
        quality = Path(s["dir"]) / "quality" / "quality.json"
        if quality.is_file():
            for key, value in read_json(quality).get("summary", {}).items():
                lines.append(f"  - {key}: {value}")
        else:
            lines.append("  - quality not measured: run `melanogan evaluate-gan` on it (written to SYN_DIR/quality).")
    return lines + [""]


def write_card(run_dir: Path, out: Path | None = None) -> tuple[Path, Path]:
    """RUN_DIR/model_card.md and .html (or OUT.md/.html)."""
    from melanogan.render import markdown_to_html

    text = model_card(run_dir)
    md = Path(out).with_suffix(".md") if out else Path(run_dir) / "model_card.md"
    write_text(md, text)
    html = md.with_suffix(".html")
    write_text(html, markdown_to_html(text, md.parent, f"Model card: {Path(run_dir).name}"))
    return md, html
