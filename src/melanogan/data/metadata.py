"""Patient metadata as model input: age, sex and anatomical site, with missing values explicit.

Why: ISIC-challenge winners joined age, sex and site to the image features (melanoma is commoner
on older patients' backs and men's trunks), and ISIC 2020/2019 and HAM10000 carry them. Why
"explicit": a missing value is information a model can misuse (a source without metadata and with
another melanoma rate makes "missing" a label proxy), so each field has its own missing flag, the
run records which fields it uses, and prediction without metadata feeds the same "missing" code
the model saw in training for images without it (never zeros that look like a value).

Layout of the encoded vector (float32), in the order of the fields asked for:
- age:  [age / 100 (0 when missing), missing]
- sex:  [male, female, missing]
- site: one-hot over SITE_GROUPS, then missing
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from melanogan.errors import MelanoganError

METADATA_FIELDS = ("age", "sex", "site")
# The ISIC 2020 "anatom_site_general" groups; HAM10000's and ISIC 2019's finer localisations map onto them.
SITE_GROUPS = ("head/neck", "upper extremity", "lower extremity", "torso", "palms/soles", "oral/genital")
_SITE_ALIASES = {
    "head/neck": "head/neck", "face": "head/neck", "scalp": "head/neck", "ear": "head/neck", "neck": "head/neck",
    "upper extremity": "upper extremity", "hand": "upper extremity", "upper limb": "upper extremity",
    "lower extremity": "lower extremity", "foot": "lower extremity", "lower limb": "lower extremity",
    "torso": "torso", "anterior torso": "torso", "posterior torso": "torso", "lateral torso": "torso",
    "trunk": "torso", "back": "torso", "chest": "torso", "abdomen": "torso",
    "palms/soles": "palms/soles", "acral": "palms/soles",
    "oral/genital": "oral/genital", "genital": "oral/genital",
}
_SEX = {"male": "male", "m": "male", "female": "female", "f": "female"}
_WIDTH = {"age": 2, "sex": 3, "site": len(SITE_GROUPS) + 1}
METADATA_LAYOUT = {"age": ["age / 100 (0 when missing)", "age missing"], "sex": ["male", "female", "sex missing"],
                   "site": [*SITE_GROUPS, "site missing"]}


def parse_fields(text: str | list[str] | None) -> list[str]:
    """`age,sex,site` (any subset, any order) -> the fields in canonical order; empty = none."""
    if text is None:
        return []
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t and t.strip()]
    unknown = sorted(set(items) - set(METADATA_FIELDS))
    if unknown:
        raise MelanoganError(f"--metadata {','.join(items)}: unknown field(s) {', '.join(unknown)}; use any of "
                             f"{','.join(METADATA_FIELDS)}.")
    return [f for f in METADATA_FIELDS if f in items]


def metadata_dim(fields: list[str]) -> int:
    return sum(_WIDTH[f] for f in fields)


def site_group(value) -> str | None:
    """An anatomical site as one of SITE_GROUPS, or None (missing, unknown or unrecognised)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return _SITE_ALIASES.get(str(value).strip().lower())


def _age(value) -> float | None:
    try:
        age = float(value)
    except (TypeError, ValueError):
        return None
    return age if math.isfinite(age) and 0 <= age <= 120 else None


def encode_metadata(rows: pd.DataFrame, fields: list[str]) -> np.ndarray:
    """(N, metadata_dim(fields)) float32 from the manifest columns `age`, `sex`, `anatom_site`;
    a column that is absent counts as missing for every row (e.g. a source without metadata)."""
    n = len(rows)
    parts = []
    for field in fields:
        if field == "age":
            ages = [_age(v) for v in (rows["age"] if "age" in rows else [None] * n)]
            parts.append(np.array([[a / 100.0, 0.0] if a is not None else [0.0, 1.0] for a in ages], np.float32)
                         .reshape(n, 2))
        elif field == "sex":
            sexes = [_SEX.get(str(v).strip().lower()) if v is not None and v is not pd.NA else None
                     for v in (rows["sex"] if "sex" in rows else [None] * n)]
            parts.append(np.array([[s == "male", s == "female", s is None] for s in sexes], np.float32).reshape(n, 3))
        elif field == "site":
            sites = [site_group(v) for v in (rows["anatom_site"] if "anatom_site" in rows else [None] * n)]
            block = np.zeros((n, len(SITE_GROUPS) + 1), np.float32)
            for i, s in enumerate(sites):
                block[i, SITE_GROUPS.index(s) if s else len(SITE_GROUPS)] = 1.0
            parts.append(block)
        else:
            raise MelanoganError(f"unknown metadata field {field!r}")
    return np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), np.float32)


def missing_vector(fields: list[str]) -> np.ndarray:
    """The encoding of a row with every field missing (what prediction without metadata feeds)."""
    return encode_metadata(pd.DataFrame({"age": [None], "sex": [None], "anatom_site": [None]}), fields)[0]


def missingness_warning(rows: pd.DataFrame, labels: np.ndarray, fields: list[str]) -> str | None:
    """A note when the melanoma rate differs a lot between training rows with and without metadata:
    then "missing" itself predicts the label (e.g. one source without metadata and a higher rate)."""
    if not fields:
        return None
    enc = encode_metadata(rows, fields)
    missing_cols, col = [], 0
    for f in fields:
        col += _WIDTH[f]
        missing_cols.append(col - 1)
    missing = enc[:, missing_cols].max(axis=1) > 0
    if missing.all() or not missing.any():
        return None
    rate_missing, rate_known = float(labels[missing].mean()), float(labels[~missing].mean())
    if max(rate_missing, rate_known) >= 1.5 * max(min(rate_missing, rate_known), 1e-9):
        return (f"metadata is missing for {int(missing.sum())} of {len(missing)} training images, whose melanoma rate "
                f"({rate_missing:.1%}) differs from the rest ({rate_known:.1%}): the model can learn 'missing "
                "metadata' as a cue. Compare with a run without --metadata, or train on sources that have it.")
    return None


def read_metadata_csv(path) -> pd.DataFrame:
    """A CSV of per-image metadata for `predict --metadata-csv`: an `image` column (file name or
    path) and any of `age`, `sex`, `site` (or `anatom_site`). Returns it indexed by file name, with
    the manifest's column names (age, sex, anatom_site)."""
    from pathlib import Path

    try:
        table = pd.read_csv(path, dtype={"image": str, "sex": str, "site": str, "anatom_site": str})
    except (OSError, ValueError) as exc:
        raise MelanoganError(f"{path}: cannot read the metadata CSV ({exc}).") from exc
    table = table.rename(columns={"site": "anatom_site"})
    if "image" not in table.columns or not {"age", "sex", "anatom_site"} & set(table.columns):
        raise MelanoganError(f"{path}: a metadata CSV needs an `image` column (file name or path) and at least one of "
                             f"age, sex, site; found columns {', '.join(map(str, table.columns)) or 'none'}.")
    table["image"] = table["image"].map(lambda p: Path(str(p)).name)
    duplicated = table["image"][table["image"].duplicated()]
    if len(duplicated):
        raise MelanoganError(f"{path}: image {duplicated.iat[0]!r} is listed more than once.")
    return table.set_index("image")
