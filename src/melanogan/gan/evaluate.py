"""`melanogan evaluate-gan`: are the synthetic images any good? quality.json + quality.html."""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from melanogan.data.dataset import CachedImageDataset
from melanogan.data.manifest import load_manifest
from melanogan.errors import MelanoganError
from melanogan.fileio import write_json, write_text
from melanogan.gan import quality as Q
from melanogan.gan.features import create_extractor, dataset_features

if TYPE_CHECKING:
    import pandas as pd

CLASS_NAMES = {0: "other", 1: "melanoma"}
NEAR_IDENTICAL_MS_SSIM = 0.95
EXPLANATIONS = {
    "fid": "Fréchet distance between Gaussian fits of real and synthetic features; 0 = same mean and "
           "covariance. Biased upward for small N: compare only at equal N and extractor.",
    "kid_mean": "Kernel Inception Distance (unbiased MMD², cubic kernel) over random subsets; about 0 when "
                "the distributions match, usable at small N. ± is the std over subsets.",
    "precision": "Share of synthetic images inside the real manifold (k-NN balls): fidelity.",
    "recall": "Share of real images inside the synthetic manifold: how much of the real variety is covered.",
    "density": "How many real neighbourhoods a synthetic image sits in, / k; about 1 when matched, >1 = "
               "crowding around common real images.",
    "coverage": "Share of real images that have a synthetic image within their k-NN ball: mode coverage.",
}


def _resized(ds: CachedImageDataset, indices, size: int, block: int = 64) -> torch.Tensor:
    """Images `indices` of `ds` as float32 in [0, 1] at `size` px, built block by block (bounded memory)."""
    indices = list(indices)
    parts = []
    for start in range(0, len(indices), block):
        batch = torch.stack([ds.raw(int(i)) for i in indices[start:start + block]]).float() / 255
        parts.append(torch.nn.functional.interpolate(batch, size=(size, size), mode="area"))
    return torch.cat(parts)


def _itas(ds: CachedImageDataset, limit: int = 2000) -> np.ndarray:
    """ITA of up to `limit` images of `ds`, from its cached pixels."""
    from melanogan.data.skin import estimate_ita

    return np.array([estimate_ita(ds.raw(i).permute(1, 2, 0).numpy())[0] for i in range(min(limit, len(ds)))])


def _png_data_uri(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _grid(images: list[np.ndarray], cols: int = 8, tile: int = 96) -> np.ndarray:
    rows = max(1, -(-len(images) // cols))
    grid = np.full((rows * (tile + 2), cols * (tile + 2), 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * (tile + 2):r * (tile + 2) + tile, c * (tile + 2):c * (tile + 2) + tile] = np.asarray(
            Image.fromarray(im).resize((tile, tile)))
    return grid


def evaluate_gan(syn_dir: Path, real_dir: Path, out: Path, split: str = "val", features: list[str] | None = None,
                 inception_weights: str | None = None, n_pairs: int = 200, seed: int = 0) -> dict:
    """Compute every quality view per synthetic class; write OUT/quality.json and OUT/quality.html.

    Fidelity and diversity are measured against real images of `split`, by default validation images
    the GAN never saw: against its own training images a generator that copies them would score best.
    Memorisation is always checked against the training split."""
    syn_dir, real_dir, out = Path(syn_dir), Path(real_dir), Path(out)
    if split not in ("train", "val", "test"):
        raise MelanoganError(f"--split {split!r}: use val (default), test or train.")
    features = features or ["pixels"]
    syn_manifest = load_manifest(syn_dir)
    # first: an unreadable image fails before the long part, not after it
    effect = label_effect_of(syn_dir, manifest=syn_manifest)
    extractors = [create_extractor(f, inception_weights) for f in features]
    cache_dir = real_dir / "features"
    t0 = time.perf_counter()
    result: dict = {"synthetic_dir": str(syn_dir), "real_dir": str(real_dir), "real_split": split,
                    "extractors": [e.describe() for e in extractors], "classes": {}, "summary": {}}
    html_sections = []
    for label in sorted(syn_manifest["label"].unique()):
        name = CLASS_NAMES.get(int(label), str(label))
        fake_ds = CachedImageDataset(syn_dir, "train", labels=[int(label)])
        try:
            real_ds = CachedImageDataset(real_dir, split, labels=[int(label)])
            train_ds = CachedImageDataset(real_dir, "train", labels=[int(label)])
        except MelanoganError as exc:
            raise MelanoganError(f"{real_dir}: no real {name} images in split {split} to compare with "
                                 f"({exc}).") from exc
        entry: dict = {"n_real": len(real_ds), "n_synthetic": len(fake_ds), "by_extractor": {}}
        first_feats = None
        for ex in extractors:
            real_f = dataset_features(real_ds, ex, cache_dir=cache_dir)
            fake_f = dataset_features(fake_ds, ex)
            scores = {"fid": Q.fid(real_f, fake_f)}
            k = Q.kid(real_f, fake_f, seed=seed)
            scores.update(kid_mean=k["mean"], kid_std=k["std"], kid_subset_size=k["subset_size"])
            if len(real_f) > 5 and len(fake_f) > 5:
                scores.update({k2: v for k2, v in Q.precision_recall(real_f, fake_f).items() if k2 != "k"})
                scores.update({k2: v for k2, v in Q.density_coverage(real_f, fake_f).items() if k2 != "k"})
            entry["by_extractor"][ex.name] = {**scores, **ex.describe(), "n_real": len(real_f), "n_synthetic":
                                              len(fake_f)}
            short = ex.name if not ex.name.startswith("classifier:") else "classifier"
            result["summary"][f"{name} FID ({short})"] = round(scores["fid"], 3)
            result["summary"][f"{name} KID ({short})"] = f"{scores['kid_mean']:.4f} ± {scores['kid_std']:.4f}"
            if first_feats is None:
                first_feats = (ex, dataset_features(train_ds, ex, cache_dir=cache_dir), fake_f)

        size = min(128, fake_ds.cache.options.size)
        fake_imgs = _resized(fake_ds, range(min(500, len(fake_ds))), size)
        real_imgs = _resized(real_ds, range(min(500, len(real_ds))), size)
        syn_pairs = Q.pairwise_ms_ssim(fake_imgs, n_pairs, seed)
        real_pairs = Q.pairwise_ms_ssim(real_imgs, n_pairs, seed)
        entry["diversity"] = {"ms_ssim_synthetic": float(syn_pairs.mean()), "ms_ssim_real": float(real_pairs.mean()),
                              "near_identical_share": float((syn_pairs >= NEAR_IDENTICAL_MS_SSIM).mean()),
                              "pairs": len(syn_pairs), "image_size": size,
                              "note": "higher MS-SSIM within the synthetic set than within the real set suggests "
                                      "mode collapse"}
        result["summary"][f"{name} MS-SSIM synthetic vs real"] = (f"{syn_pairs.mean():.3f} vs {real_pairs.mean():.3f}")

        ex, train_f, fake_f = first_feats
        mem = Q.memorisation(train_f, fake_f)
        fake_rows, train_rows = fake_ds.rows, train_ds.rows
        pair_ssim = np.concatenate([
            Q.ssim(_resized(fake_ds, range(s, min(s + 64, len(fake_ds))), size),
                   _resized(train_ds, mem["nearest"][s:s + 64], size)).numpy()
            for s in range(0, len(fake_ds), 64)])
        flagged = [{"synthetic": fake_rows["path"].iat[i], "nearest_training_image": train_rows["path"].iat[int(j)],
                    "nearest_training_uid": train_rows["uid"].iat[int(j)], "distance": float(mem["distance"][i]),
                    "ssim": float(pair_ssim[i])}
                   for i, j in enumerate(mem["nearest"]) if mem["flagged"][i]]
        entry["memorisation"] = {"extractor": ex.name, "threshold_distance": mem["threshold"],
                                 "threshold_rule": "1st percentile of training-to-training nearest-neighbour distances",
                                 "share_flagged": mem["share_flagged"], "n_flagged": len(flagged), "flagged": flagged,
                                 "median_nn_distance": float(np.median(mem["distance"])),
                                 "mean_nn_ssim": float(pair_ssim.mean())}
        result["summary"][f"{name} memorised copies"] = f"{len(flagged)} of {len(fake_ds)}"
        tone = Q.skin_tone_shift(_itas(real_ds), _itas(fake_ds))
        entry["skin_tone"] = {**tone, "note": "ITA of the skin around the lesion, real and synthetic both measured on "
                                              "the cached pixels (the same colour space; with colour constancy not "
                                              "the skin's raw ITA); Kolmogorov-Smirnov two-sample test"}
        result["summary"][f"{name} skin tone (median ITA) synthetic vs real"] = (
            f"{tone['median_synthetic']:.1f} vs {tone['median_real']:.1f} (KS p={tone['p_value']:.3g})")
        result["classes"][name] = entry

        order = np.argsort(mem["distance"])[:12]
        gallery = []
        for i in order:
            gallery += [fake_ds.raw(int(i)).permute(1, 2, 0).numpy(),
                        train_ds.raw(int(mem["nearest"][i])).permute(1, 2, 0).numpy()]
        samples = [fake_ds.raw(i).permute(1, 2, 0).numpy() for i in range(min(32, len(fake_ds)))]
        html_sections.append(_class_html(name, entry, _png_data_uri(_grid(samples)), _png_data_uri(_grid(gallery))))
    if effect:  # both classes drawn from the same noise vectors: does the label change the picture?
        result["label_effect"] = {**effect, "note": "mean pixel distance between the two images drawn from one "
                                  "noise vector with the two labels, over that between two noise vectors of one "
                                  "class; near 0: the generator ignores the label"}
        result["summary"]["label effect (label / noise distance)"] = f"{effect['ratio']:.2f} ({effect['pairs']} pairs)"
        note = html.escape(result["label_effect"]["note"])
        html_sections.insert(0, f"<h2>Conditioning</h2><p>Label effect {effect['ratio']:.2f}: {note} "
                                f"({effect['pairs']} noise twins at 32px).</p>")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "quality.json", result)
    write_text(out / "quality.html", _page(result, html_sections))
    return result


def _class_html(name: str, entry: dict, samples_uri: str, gallery_uri: str) -> str:
    rows = []
    for ex_name, s in entry["by_extractor"].items():
        for metric in ("fid", "kid_mean", "precision", "recall", "density", "coverage"):
            if metric in s:
                value = f"{s[metric]:.4f}" + (f" ± {s['kid_std']:.4f}" if metric == "kid_mean" else "")
                rows.append(f"<tr><td>{html.escape(ex_name)}</td><td>{metric}</td><td>{value}</td>"
                            f"<td>{html.escape(EXPLANATIONS[metric])}</td></tr>")
    d, m, t = entry["diversity"], entry["memorisation"], entry["skin_tone"]
    return (f"<h2>{html.escape(name)}: {entry['n_synthetic']} synthetic vs {entry['n_real']} real</h2>"
            "<table><tr><th>features</th><th>metric</th><th>value</th><th>what it means</th></tr>"
            + "".join(rows) + "</table>"
            f"<p>Diversity: mean pairwise MS-SSIM {d['ms_ssim_synthetic']:.3f} within synthetic vs "
            f"{d['ms_ssim_real']:.3f} within real ({d['pairs']} random pairs at {d['image_size']}px; higher = less "
            f"diverse). Near-identical synthetic pairs (MS-SSIM ≥ {NEAR_IDENTICAL_MS_SSIM}): "
            f"{d['near_identical_share']:.1%}.</p>"
            f"<p>Memorisation ({html.escape(m['extractor'])} features): {m['n_flagged']} synthetic image(s) "
            f"({m['share_flagged']:.1%}) are closer to a training image than {m['threshold_rule']} "
            f"({m['threshold_distance']:.4g}); every one is listed in quality.json.</p>"
            f"<p>Skin tone (ITA of the skin around the lesion; higher = lighter): median {t['median_synthetic']:.1f} "
            f"synthetic vs {t['median_real']:.1f} real; Kolmogorov-Smirnov D = {t['ks_statistic']:.3f}, "
            f"p = {t['p_value']:.3g}. Band shares synthetic / real: "
            + ", ".join(f"{b} {v['synthetic']:.0%} / {v['real']:.0%}" for b, v in t["bands"].items()) + ".</p>"
            f"<h3>Samples</h3><img src='{samples_uri}'>"
            "<h3>Closest pairs (synthetic, then its nearest training image)</h3>"
            f"<img src='{gallery_uri}'>")


def label_effect_of(syn_dir: Path, pairs: int = 200, size: int = 32,
                    manifest: pd.DataFrame | None = None) -> dict | None:
    """How much the class label changes what the GAN drew (quality.label_effect), on up to `pairs`
    noise twins of a synthetic set (the same seed and noise index drawn as melanoma and as other, as
    `generate` draws them for one seed), in pixels at `size` px; None when the set holds fewer than two
    such pairs (one class only, or images from another generator, which have no noise index).
    `manifest`: the set's manifest when the caller has already read it (evaluate_gan)."""
    rows = load_manifest(syn_dir) if manifest is None else manifest
    keys = ["seed", "noise_index"]
    if not set(keys) <= set(rows.columns):
        return None
    rows = rows.dropna(subset=keys)  # imported images: no noise vector to pair them by
    twins = rows[rows["label"] == 1].merge(rows[rows["label"] == 0], on=keys,
                                           suffixes=("_mel", "_oth")).sort_values("noise_index").head(pairs)
    if len(twins) < 2:
        return None

    def pixels(paths) -> np.ndarray:
        out = []
        for p in paths:
            try:
                with Image.open(p) as img:
                    out.append(np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR),
                                          dtype=np.float64).ravel() / 255)
            except OSError as exc:
                raise MelanoganError(f"{p}: cannot read this synthetic image ({exc}); its manifest in {syn_dir} "
                                     "lists it. Generate the set again (or remove the row).") from exc
        return np.stack(out)

    out = Q.label_effect(pixels(twins["path_mel"]), pixels(twins["path_oth"]))
    return {**{k: round(v, 4) for k, v in out.items()}, "pairs": len(twins)}


def _page(result: dict, sections: list[str]) -> str:
    extractors = "".join(f"<li>{html.escape(str(e))}</li>" for e in result["extractors"])
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px}"
             "img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>synthetic image quality</title>"
            f"<style>{style}</style></head><body><h1>Synthetic image quality</h1>"
            f"<p>Synthetic: {html.escape(result['synthetic_dir'])}; real: {html.escape(result['real_dir'])} "
            f"(split {result['real_split']}).</p><p>Feature extractors:</p><ul>{extractors}</ul>"
            + "".join(sections) + "</body></html>\n")
