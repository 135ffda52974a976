"""What the Python API (`melanogan.api`) returns: small typed objects holding paths, key numbers and
pandas tables (where the CLI writes a CSV), with a readable `repr`, an `_repr_html_` for notebooks
and, where a picture says it better, `.plot()` returning a matplotlib figure.

They are views of files the run folders already hold: a result can be rebuilt later from its folder
(`Evaluation.load(out)`, ...), so a notebook and the CLI see the same numbers.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from melanogan.fileio import read_json


def _fig():
    import matplotlib

    if matplotlib.get_backend().lower() in ("", "agg") and not _in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None
    except ImportError:
        return False


def _png_tag(path: Path, width: int = 480) -> str:
    if not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<img src='data:image/png;base64,{data}' style='max-width:{width}px'>"


def _table_html(df: pd.DataFrame, max_rows: int = 20) -> str:
    return df.head(max_rows).to_html(index=False, float_format=lambda x: f"{x:.3f}", border=0)


def _fmt_ci(value, ci) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    lo, hi = ci or (None, None)
    return f"{value:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


@dataclass
class Prepared:
    """A prepared DATA_DIR: the manifest, what was rejected and why, near-duplicate pairs."""

    data_dir: Path
    manifest: pd.DataFrame
    rejected: pd.DataFrame
    near_duplicates: pd.DataFrame
    cache_dir: Path
    cache_size: int
    notes: list[str] = field(default_factory=list)

    @property
    def summary(self) -> pd.DataFrame:
        """Images kept per source and class, and rejected per source."""
        m, rej = self.manifest, self.rejected
        sources = sorted(set(m["source"]) | set(rej["source"].dropna()))
        return pd.DataFrame([{"source": s, "kept": int((m["source"] == s).sum()),
                              "melanoma": int(((m["source"] == s) & (m["label"] == 1)).sum()),
                              "other": int(((m["source"] == s) & (m["label"] == 0)).sum()),
                              "unlabeled": int(((m["source"] == s) & (m["label"] == -1)).sum()),
                              "rejected": int((rej["source"] == s).sum())} for s in sources])

    @property
    def splits(self) -> pd.DataFrame:
        labeled = self.manifest[self.manifest["label"] >= 0]
        g = labeled.groupby("split")["label"].agg(images="size", melanoma="sum").reset_index()
        return g.assign(rate=g["melanoma"] / g["images"].clip(lower=1))

    def __repr__(self) -> str:
        s = self.summary
        return (f"Prepared({self.data_dir}: {int(s['kept'].sum())} images kept, {int(s['melanoma'].sum())} melanoma, "
                f"{int(s['rejected'].sum())} rejected; {len(self.near_duplicates)} near-duplicate pairs)")

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(repr(self))}</p>" + _table_html(self.summary) + _table_html(self.splits)


@dataclass
class Audit:
    """Leakage checks of a DATA_DIR (`passed` is False when any check fails)."""

    data_dir: Path
    checks: pd.DataFrame  # check, passed, detail
    per_split: pd.DataFrame
    warnings: list[str]
    as_dict: dict  # the report as `audit --json` writes it

    @property
    def passed(self) -> bool:
        return bool(self.checks["passed"].all())

    def __repr__(self) -> str:
        failed = self.checks.loc[~self.checks["passed"], "check"].tolist()
        return f"Audit({self.data_dir}: {'passed' if not failed else 'FAILED: ' + '; '.join(failed)})"

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(repr(self))}</p>" + _table_html(self.checks) + _table_html(self.per_split)


def _stats(path: Path) -> pd.DataFrame:
    if not Path(path).is_file():
        return pd.DataFrame()
    return pd.DataFrame([json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()])


@dataclass
class GanRun:
    """A GAN run folder: where training stands, its logged losses, the latest sample grid."""

    run_dir: Path
    step: int
    finished: bool
    training_images: dict
    # what the run wants its user to know, e.g. options given with --resume that were not used
    notes: list[str] = field(default_factory=list)

    @property
    def stats(self) -> pd.DataFrame:
        return _stats(self.run_dir / "stats.jsonl")

    @property
    def latest_samples(self) -> Path | None:
        grids = sorted((self.run_dir / "samples").glob("step-*.png"))
        return grids[-1] if grids else None

    def plot(self):
        """Critic/Wasserstein/generator losses over steps."""
        plt = _fig()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        s = self.stats
        for col in ("wasserstein", "critic_loss", "generator_loss"):
            if col in s:
                ax.plot(s["step"], s[col], label=col)
        ax.set(xlabel="generator step", title="GAN training")
        ax.legend()
        return fig

    def __repr__(self) -> str:
        return f"GanRun({self.run_dir}: step {self.step}, {'finished' if self.finished else 'paused'})"

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(repr(self))}</p>" + (_png_tag(self.latest_samples) if self.latest_samples else "")


@dataclass
class SyntheticSet:
    """A SYN_DIR: its manifest (with provenance) and images."""

    syn_dir: Path
    manifest: pd.DataFrame
    rejected: int = 0

    def grid(self, n: int = 32, cols: int = 8) -> np.ndarray:
        """The first `n` cached images as one uint8 grid."""
        from melanogan.data.dataset import CachedImageDataset

        ds = CachedImageDataset(self.syn_dir, "train", manifest=self.manifest)
        tiles = [ds.raw(i).permute(1, 2, 0).numpy() for i in range(min(n, len(ds)))]
        if not tiles:
            return np.zeros((8, 8, 3), np.uint8)
        side = tiles[0].shape[0]
        rows = -(-len(tiles) // cols)
        out = np.full((rows * side, cols * side, 3), 255, np.uint8)
        for k, t in enumerate(tiles):
            r, c = divmod(k, cols)
            out[r * side:(r + 1) * side, c * side:(c + 1) * side] = t
        return out

    def plot(self, n: int = 32):
        plt = _fig()
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.imshow(self.grid(n))
        ax.set_axis_off()
        ax.set_title(f"{self.syn_dir.name}: first {min(n, len(self.manifest))} images")
        return fig

    def __repr__(self) -> str:
        counts = self.manifest["label"].value_counts()
        return (f"SyntheticSet({self.syn_dir}: {int(counts.get(1, 0))} melanoma, {int(counts.get(0, 0))} other"
                + (f"; {self.rejected} rejected" if self.rejected else "") + ")")

    def _repr_html_(self) -> str:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.grid(16)).save(buf, format="PNG")
        data = base64.b64encode(buf.getvalue()).decode()
        return f"<p>{html.escape(repr(self))}</p><img src='data:image/png;base64,{data}' style='max-width:600px'>"


@dataclass
class Quality:
    """Synthetic-image quality (evaluate-gan): the full result and a one-line-per-score summary."""

    out: Path
    result: dict

    @property
    def summary(self) -> pd.DataFrame:
        return pd.DataFrame([{"score": k, "value": v} for k, v in self.result["summary"].items()])

    @classmethod
    def load(cls, out: Path) -> Quality:
        return cls(Path(out), read_json(Path(out) / "quality.json"))

    def __repr__(self) -> str:
        return "Quality(" + "; ".join(f"{k}: {v}" for k, v in list(self.result["summary"].items())[:4]) + ", ...)"

    def _repr_html_(self) -> str:
        return _table_html(self.summary, 50)


@dataclass
class TrainRun:
    """A classifier run folder: the training summary and its per-epoch log."""

    run_dir: Path
    summary: dict

    @property
    def stats(self) -> pd.DataFrame:
        return _stats(self.run_dir / "stats.jsonl")

    def plot(self):
        """Training/validation loss and validation AUC per epoch."""
        plt = _fig()
        s = self.stats
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
        if len(s):
            a.plot(s["epoch"], s["train_loss"], label="train loss")
            a.plot(s["epoch"], s["val_loss"], label="validation loss")
            b.plot(s["epoch"], s["val_auc"], color="C2", label="validation ROC-AUC")
        for ax in (a, b):
            ax.set_xlabel("epoch")
            ax.legend()
        return fig

    def __repr__(self) -> str:
        s = self.summary
        figure = "AUC" if s.get("select", "auc") == "auc" else "worst-source AUC"
        return (f"TrainRun({self.run_dir}: {s.get('epochs')} epoch(s), {s.get('stopped_by')}, best validation "
                f"{figure} {s.get('best_val_auc', float('nan')):.3f} at epoch {s.get('best_epoch')})")

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(repr(self))}</p>" + _png_tag(self.run_dir / "curves.png", 700)


@dataclass
class Evaluation:
    """An evaluation folder: metrics (dict), predictions, subgroups and diagnoses (DataFrames), plots."""

    out: Path
    metrics: dict

    @classmethod
    def load(cls, out: Path) -> Evaluation:
        return cls(Path(out), read_json(Path(out) / "metrics.json"))

    @property
    def predictions(self) -> pd.DataFrame:
        return pd.read_csv(self.out / "predictions.csv")

    @property
    def subgroups(self) -> pd.DataFrame:
        return pd.read_csv(self.out / "subgroups.csv")

    @property
    def diagnoses(self) -> pd.DataFrame:
        """Per diagnosis: images, share called melanoma, ROC-AUC of the melanomas against it."""
        return pd.read_csv(self.out / "diagnoses.csv")

    @property
    def operating_points(self) -> pd.DataFrame:
        return pd.DataFrame([{"threshold_name": k, **{c: v.get(c) for c in ("threshold", "sensitivity", "specificity",
                                                                          "precision", "accuracy")}}
                             for k, v in self.metrics["thresholds"].items()])

    def plot(self):
        """ROC curve with the operating points."""
        from sklearn.metrics import roc_curve

        plt = _fig()
        p = self.predictions
        fig, ax = plt.subplots(figsize=(4.5, 4.2))
        if 0 < p["label"].sum() < len(p):
            fpr, tpr, _ = roc_curve(p["label"], p["probability"])
            ax.plot(fpr, tpr, label=f"ROC-AUC {self.metrics['roc_auc']:.3f}")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        for name, m in self.metrics["thresholds"].items():
            ax.plot(1 - m["specificity"], m["sensitivity"], "o", label=name)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=self.out.name)
        ax.legend(fontsize=8)
        return fig

    def __repr__(self) -> str:
        m = self.metrics
        t = m["thresholds"]["val_youden"]
        return (f"Evaluation({m['split']} of {Path(m['data_dir']).name}: {m['n_images']} images, {m['n_melanoma']} "
                f"melanoma; ROC-AUC {_fmt_ci(m['roc_auc'], m.get('roc_auc_ci95'))}; at the validation threshold "
                f"sensitivity {t['sensitivity']:.3f}, specificity {t['specificity']:.3f})")

    def _repr_html_(self) -> str:
        return (f"<p>{html.escape(repr(self))}</p>" + _png_tag(self.out / "roc.png", 360)
                + _table_html(self.operating_points))


@dataclass
class StudyResult:
    """A study folder: the report and the arms-versus-baseline table."""

    study_dir: Path
    report: Path

    @property
    def table(self) -> pd.DataFrame:
        """One row per arm: ROC-AUC difference from the baseline, CI, p, Holm p and verdict."""
        path = self.study_dir / "versus_baseline.csv"
        return pd.read_csv(path) if path.is_file() else pd.DataFrame()

    def __repr__(self) -> str:
        t = self.table
        verdicts = "; ".join(f"{r.arm}: {r.verdict}" for r in t.itertuples()) if len(t) else "no comparison yet"
        return f"StudyResult({self.report}: {verdicts})"

    def _repr_html_(self) -> str:
        return f"<p>Report: {html.escape(str(self.report))}</p>" + _table_html(self.table)


@dataclass
class Predictions:
    """predict's table: path, probability, logit, decision, threshold, error (one row per image)."""

    table: pd.DataFrame
    out: Path | None = None

    def __repr__(self) -> str:
        t = self.table
        ok = t[t["error"] == ""]
        return (f"Predictions({len(ok)} scored, {int((t['decision'] == 'melanoma').sum())} melanoma at "
                f"{t['threshold_name'].iat[0]} {t['threshold'].iat[0]:.3f}, {len(t) - len(ok)} unreadable)")

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(repr(self))}</p>" + _table_html(self.table, 50)


@dataclass
class Explanation:
    """Grad-CAM of one image: the probability and the overlay PNG."""

    image: Path
    heatmap: Path
    probability: float

    def plot(self):
        from PIL import Image

        plt = _fig()
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(np.asarray(Image.open(self.heatmap)))
        ax.set_axis_off()
        ax.set_title(f"melanoma probability {self.probability:.3f}")
        return fig

    def __repr__(self) -> str:
        return f"Explanation({self.image.name}: probability {self.probability:.3f}; heat map {self.heatmap})"

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(repr(self))}</p>" + _png_tag(self.heatmap, 320)


@dataclass
class Exported:
    """An exported model file and its sidecar (input shape, preprocessing, thresholds)."""

    file: Path
    sidecar: dict

    def __repr__(self) -> str:
        return (f"Exported({self.file} ({self.sidecar['format']}); max |difference| vs PyTorch "
                f"{self.sidecar['max_abs_difference_vs_pytorch']:.2e})")


@dataclass
class Calibration:
    """A site's operating point (calibrate): thresholds, temperature and what they should give there."""

    site_dir: Path
    result: dict

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{"threshold_name": name, "threshold": t,
                              "expected_sensitivity": self.result["expected"][name]["sensitivity"],
                              "sensitivity_ci95": self.result["expected"][name]["sensitivity_ci95"],
                              "expected_specificity": self.result["expected"][name]["specificity"],
                              "specificity_ci95": self.result["expected"][name]["specificity_ci95"]}
                             for name, t in self.result["thresholds"].items()])

    def __repr__(self) -> str:
        r = self.result
        return (f"Calibration({self.site_dir.name}: {r['n_images']} images, {r['n_melanoma']} melanoma; ROC-AUC "
                f"{_fmt_ci(r['roc_auc'], r.get('roc_auc_ci95'))}; temperature {r['temperature']:.2f})")

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(repr(self))}</p>" + _table_html(self.table)


@dataclass
class ModelCard:
    """The model card's two files."""

    markdown: Path
    html: Path

    @property
    def text(self) -> str:
        return self.markdown.read_text()

    def __repr__(self) -> str:
        return f"ModelCard({self.markdown}, {self.html.name})"

    def _repr_html_(self) -> str:
        body = self.html.read_text()
        return body[body.find("<body>") + 6:body.rfind("</body>")]
