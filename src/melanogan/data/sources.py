"""Dataset adapters: each reads one dataset layout into rows of a common schema.

Adapters only read label files and list folders (fast); images are decoded later, once, by the
cache builder. Rows whose image file is missing are kept with `path=""` so the manifest builder can
report them in rejected.csv and still use their patient/lesion ids to keep related images together.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from melanogan.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MELANOMA_FOLDERS = ("melanoma", "mel", "malignant")
# Columns every adapter returns; metadata columns may hold missing values.
SOURCE_COLUMNS = ["image_id", "path", "label", "diagnosis", "group_id", "patient_id", "lesion_id",
                  "sex", "age", "anatom_site", "source", "unlabeled", "origin"]
_ISIC_ID = re.compile(r"ISIC_\d{7}")


def global_isic_id(image_id: str) -> str | None:
    """The archive-wide ISIC id inside an image id (`ISIC_0000017_downsampled` -> `ISIC_0000017`).
    ISIC ids name the same photograph in every ISIC-derived dataset, so they link rows across sources."""
    match = _ISIC_ID.search(image_id)
    return match.group(0) if match else None


def _read_csv(path: Path, required: list[str], what: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found ({what}).") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as CSV ({exc}). Is it the {what}?") from exc
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} needed for the {what}; "
            f"found columns: {', '.join(df.columns) or '(none)'}."
        )
    return df


def _check_unique(df: pd.DataFrame, column: str, path: Path) -> None:
    dup = df[column][df[column].duplicated()].unique()
    if len(dup):
        shown = ", ".join(map(str, dup[:5])) + (" ..." if len(dup) > 5 else "")
        raise DataError(f"{path}: column {column!r} has {len(dup)} duplicated id(s): {shown}. "
                        "Each image must be listed once; remove or rename the duplicated rows.")


def _require_values(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    """Refuse empty cells in columns every row needs, naming the CSV lines (header = line 1)."""
    for column in columns:
        empty = np.flatnonzero(df[column].isna().to_numpy() | (df[column].astype(str).str.strip() == "").to_numpy())
        if len(empty):
            lines = ", ".join(str(i + 2) for i in empty[:5]) + (" ..." if len(empty) > 5 else "")
            raise DataError(f"{path}: {len(empty)} row(s) with an empty {column!r} (line(s) {lines}). Fill them in "
                            "or delete those rows.")


def _binary_labels(values: pd.Series, path: Path, column: str) -> np.ndarray:
    numeric = pd.to_numeric(values, errors="coerce")
    bad = values[numeric.isna() | ~numeric.isin([0, 1])]
    if len(bad):
        shown = ", ".join(f"row {i + 2}: {v!r}" for i, v in list(bad.items())[:5])
        raise DataError(f"{path}: column {column!r} must hold 0 or 1 only; found {shown}. "
                        "Fix those rows or drop them from the file.")
    return numeric.astype(int).to_numpy()


def index_images(root: Path, strip_suffixes: tuple[str, ...] = ()) -> dict[str, str]:
    """Map image stem -> path for every image file below `root` (one directory walk)."""
    found: dict[str, str] = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS or name.startswith("."):
                continue
            for suffix in strip_suffixes:
                stem = stem.removesuffix(suffix)
            found.setdefault(stem, os.path.join(dirpath, name))
    return found


def _frame(**columns) -> pd.DataFrame:
    """Rows in SOURCE_COLUMNS, plus any source-specific `meta_*` columns (kept in the manifest)."""
    n = len(columns["image_id"])
    out = pd.DataFrame({c: columns.get(c, [None] * n) for c in SOURCE_COLUMNS})
    for name, values in columns.items():
        if name.startswith("meta_"):
            out[name] = pd.Series(list(values), dtype="string")
    out["label"] = out["label"].astype(int)
    out["unlabeled"] = out["unlabeled"].fillna(False).astype(bool)
    out["age"] = pd.to_numeric(out["age"], errors="coerce")
    for col in ("sex", "anatom_site", "patient_id", "lesion_id", "origin"):
        out[col] = out[col].astype("string")
    out["path"] = out["path"].fillna("").astype(str)
    # An image without a patient/lesion/case id is its own group (for every reader, here once). Left
    # missing, every such row would share the one group "nan" and so one split (pandas 3 also keeps
    # it missing through string ops).
    group = out["group_id"]
    missing = group.isna() | (group.astype(str).str.strip() == "")
    out["group_id"] = group.where(~missing, out["image_id"]).astype(str)
    return out


def _require_dir(path: Path, kind: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: does not exist (source {kind}). Check the path after '{kind}='.")
    return path


def _pick_image_dirs(root: Path, candidates: list[str]) -> list[Path]:
    dirs = [root / c for c in candidates if (root / c).is_dir()]
    return dirs or [root]


def read_siim_isic_2020(path: Path) -> pd.DataFrame:
    """SIIM-ISIC 2020: Kaggle `train.csv` (+ `test.csv`, unlabeled) or the official
    `ISIC_2020_Training_GroundTruth.csv`; images in `jpeg/train/`, `train/` or the CSV's folder."""
    path = _require_dir(path, "siim-isic-2020")
    root = path.parent if path.is_file() else path
    if path.is_file():
        label_file = path
    else:
        options = [root / "train.csv", root / "ISIC_2020_Training_GroundTruth.csv",
                   root / "ISIC_2020_Training_GroundTruth_v2.csv"]
        label_file = next((p for p in options if p.is_file()), None)
        if label_file is None:
            raise DataError(f"{root}: no train.csv or ISIC_2020_Training_GroundTruth.csv found "
                            "(expected the SIIM-ISIC 2020 Kaggle or official layout).")
    frames = []
    df = _read_csv(label_file, ["image_name", "patient_id", "target"], "SIIM-ISIC 2020 label file")
    _check_unique(df, "image_name", label_file)
    labels = _binary_labels(df["target"], label_file, "target")
    images: dict[str, str] = {}
    for d in reversed(_pick_image_dirs(root, ["jpeg/train", "train", "ISIC_2020_Training_JPEG/train",
                                              "ISIC_2020_Training_JPEG"])):
        images.update(index_images(d))
    frames.append(_siim_rows(df, labels, images, unlabeled=False, origin=label_file.name))
    test_file = root / "test.csv"
    if test_file.is_file() and label_file.name == "train.csv":
        test = _read_csv(test_file, ["image_name", "patient_id"], "SIIM-ISIC 2020 test file")
        _check_unique(test, "image_name", test_file)
        test_images: dict[str, str] = {}
        for d in reversed(_pick_image_dirs(root, ["jpeg/test", "test", "ISIC_2020_Test_Input"])):
            test_images.update(index_images(d))
        frames.append(_siim_rows(test, np.full(len(test), -1), test_images, unlabeled=True, origin="test.csv"))
    return pd.concat(frames, ignore_index=True)


def _siim_rows(df: pd.DataFrame, labels: np.ndarray, images: dict[str, str], unlabeled: bool,
               origin: str) -> pd.DataFrame:
    ids = df["image_name"].str.strip()
    if "diagnosis" in df.columns:
        diagnosis = df["diagnosis"].fillna("unknown").str.strip()
    else:
        # Derived from the label only: not a diagnosis the auxiliary head could learn anything from.
        diagnosis = pd.Series(np.where(labels == 1, "melanoma", "unknown"), index=df.index)
    if unlabeled:
        diagnosis = pd.Series(["unlabeled"] * len(df), index=df.index)
    patient = df["patient_id"].str.strip()
    return _frame(
        image_id=ids.tolist(), path=[images.get(i, "") for i in ids], label=labels, diagnosis=diagnosis.tolist(),
        group_id=patient.tolist(), patient_id=patient.tolist(), lesion_id=None,
        sex=df.get("sex"), age=df.get("age_approx"), anatom_site=df.get("anatom_site_general_challenge"),
        source="siim-isic-2020", unlabeled=[unlabeled] * len(df), origin=[origin] * len(df),
    )


ISIC_2019_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def read_isic_2019(path: Path) -> pd.DataFrame:
    """ISIC 2019: one-hot `ISIC_2019_Training_GroundTruth.csv` (MEL is positive), optional
    `ISIC_2019_Training_Metadata.csv` for lesion ids, images in `ISIC_2019_Training_Input/` or beside."""
    path = _require_dir(path, "isic-2019")
    root = path.parent if path.is_file() else path
    label_file = path if path.is_file() else root / "ISIC_2019_Training_GroundTruth.csv"
    df = _read_csv(label_file, ["image", "MEL"], "ISIC 2019 ground-truth file")
    _check_unique(df, "image", label_file)
    classes = [c for c in ISIC_2019_CLASSES if c in df.columns]
    onehot = np.column_stack([_binary_labels(df[c], label_file, c)
                              for c in classes])
    sums = onehot.sum(axis=1)
    if (sums != 1).any():
        bad = np.flatnonzero(sums != 1)[:5]
        raise DataError(f"{label_file}: rows {', '.join(str(i + 2) for i in bad)} are not one-hot over "
                        f"{', '.join(classes)} (each row needs exactly one 1).")
    ids = df["image"].str.strip()
    diagnosis = [classes[i] for i in onehot.argmax(axis=1)]
    lesion = pd.Series([None] * len(df), dtype="string")
    sex = age = site = None
    meta_file = root / "ISIC_2019_Training_Metadata.csv"
    if meta_file.is_file():
        meta = _read_csv(meta_file, ["image"], "ISIC 2019 metadata file")
        _check_unique(meta, "image", meta_file)
        meta = meta.set_index(meta["image"].str.strip()).reindex(ids)
        lesion = meta["lesion_id"].astype("string").reset_index(drop=True) if "lesion_id" in meta else lesion
        sex = meta.get("sex", pd.Series(dtype=str)).tolist() if "sex" in meta else None
        age = meta["age_approx"].tolist() if "age_approx" in meta else None
        site = meta["anatom_site_general"].tolist() if "anatom_site_general" in meta else None
    images: dict[str, str] = {}
    for d in reversed(_pick_image_dirs(root, ["ISIC_2019_Training_Input/ISIC_2019_Training_Input",
                                              "ISIC_2019_Training_Input", "images"])):
        images.update(index_images(d))
    # Files may be named with or without `_downsampled` independently of the CSV's id.
    paths = [images.get(i) or images.get(i.removesuffix("_downsampled")) or images.get(i + "_downsampled") or ""
             for i in ids]
    return _frame(image_id=ids.tolist(), path=paths, label=onehot[:, classes.index("MEL")],
                  diagnosis=diagnosis, group_id=lesion.tolist(), patient_id=None, lesion_id=lesion.tolist(),
                  sex=sex, age=age, anatom_site=site, source="isic-2019", unlabeled=None,
                  origin=[label_file.name] * len(df))


def read_ham10000(path: Path) -> pd.DataFrame:
    """HAM10000: `HAM10000_metadata.csv` (`dx == mel` positive, `lesion_id` groups) and images in
    `HAM10000_images_part_1/`, `HAM10000_images_part_2/` or any folder below the metadata file."""
    path = _require_dir(path, "ham10000")
    root = path.parent if path.is_file() else path
    meta_file = path if path.is_file() else root / "HAM10000_metadata.csv"
    if not meta_file.is_file():
        alternatives = sorted(root.glob("*metadata*.csv"))
        if not alternatives:
            raise DataError(f"{root}: no HAM10000_metadata.csv found (expected the official HAM10000 layout).")
        meta_file = alternatives[0]
    df = _read_csv(meta_file, ["image_id", "lesion_id", "dx"], "HAM10000 metadata file")
    _check_unique(df, "image_id", meta_file)
    ids = df["image_id"].str.strip()
    images = index_images(root)
    dx = df["dx"].str.strip().str.lower()
    lesion = df["lesion_id"].str.strip()
    # how each diagnosis was confirmed (histo, follow_up, consensus, confocal): an excised naevus
    # (histo) is a harder negative than one watched unchanged (train --excised-weight)
    confirmed = {"meta_dx_type": df["dx_type"].str.strip().str.lower()} if "dx_type" in df.columns else {}
    return _frame(image_id=ids.tolist(), path=[images.get(i, "") for i in ids], label=(dx == "mel").astype(int),
                  diagnosis=dx.tolist(), group_id=lesion.tolist(), patient_id=None,
                  lesion_id=lesion.tolist(), sex=df.get("sex"), age=df.get("age"),
                  anatom_site=df.get("localization"), source="ham10000", unlabeled=None,
                  origin=[meta_file.name] * len(df), **confirmed)


DERM7PT_CRITERIA = ("pigment_network", "streaks", "pigmentation", "regression_structures", "dots_and_globules",
                    "blue_whitish_veil", "vascular_structures")


def read_derm7pt(path: Path) -> pd.DataFrame:
    """Derm7pt (the seven-point checklist set): `meta/meta.csv` with `diagnosis`, the seven criteria
    (kept as `meta_*` columns) and `derm`, the dermoscopic image's path under `images/`. Melanoma is
    every diagnosis beginning with "melanoma" (in situ, by thickness, metastasis). Paths are matched
    case-insensitively: the published file names `FCl/Fcl068.jpg`, stored as `FCL/Fcl068.jpg`, and
    some images end in `.JPG`. Groups: `case_num` when the file has it, else one case per image."""
    path = _require_dir(path, "derm7pt")
    if path.is_file():
        meta_file, root = path, path.parent.parent if path.parent.name == "meta" else path.parent
    else:
        root = path
        meta_file = next((f for f in (root / "meta" / "meta.csv", root / "meta.csv") if f.is_file()), None)
        if meta_file is None:
            raise DataError(f"{root}: no meta/meta.csv found (expected the published Derm7pt layout: meta/meta.csv "
                            "and images/).")
    df = _read_csv(meta_file, ["diagnosis", "derm"], "Derm7pt meta.csv")
    _require_values(df, ["diagnosis", "derm"], meta_file)
    _check_unique(df, "derm", meta_file)
    image_root = root / "images" if (root / "images").is_dir() else root
    by_lower: dict[str, str] = {}
    for dirpath, _, files in os.walk(image_root):
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                full = os.path.join(dirpath, name)
                by_lower.setdefault(Path(full).relative_to(image_root).as_posix().lower(), full)
    derm = df["derm"].str.strip()
    ids = derm.str.replace(r"\.[A-Za-z]+$", "", regex=True)
    dx = df["diagnosis"].str.strip()
    group = df["case_num"].str.strip().radd("case-") if "case_num" in df.columns else ids
    criteria = {f"meta_{c}": df[c].str.strip() for c in DERM7PT_CRITERIA if c in df.columns}
    return _frame(image_id=ids.tolist(), path=[by_lower.get(d.lower(), "") for d in derm],
                  label=dx.str.lower().str.startswith("melanoma").astype(int), diagnosis=dx.tolist(),
                  group_id=group.tolist(), patient_id=None, lesion_id=None, sex=df.get("sex"), age=None,
                  anatom_site=df.get("location"), source="derm7pt", unlabeled=None,
                  origin=[meta_file.name] * len(df), **criteria)


def read_folder(path: Path, melanoma_folders: tuple[str, ...] = DEFAULT_MELANOMA_FOLDERS) -> pd.DataFrame:
    """Class subfolders at any depth (`Train/melanoma/x.jpg`): the image's parent folder is its
    diagnosis; folders named in `melanoma_folders` (case-insensitive) are positive. The image id is
    the path relative to the root (unique); `origin` keeps the top folder (e.g. Train/Test)."""
    root = _require_dir(path, "folder")
    if not root.is_dir():
        raise DataError(f"{root}: the folder source needs a directory of class subfolders.")
    positive = {m.strip().lower() for m in melanoma_folders}
    rows = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for name in sorted(files):
            ext = os.path.splitext(name)[1]
            if ext.lower() not in IMAGE_EXTENSIONS or name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            rel = Path(full).relative_to(root)
            if len(rel.parts) < 2:
                raise DataError(f"{full}: images must sit in class subfolders (e.g. {root}/melanoma/{name}).")
            diagnosis = rel.parts[-2]
            rows.append((rel.with_suffix("").as_posix(), full, int(diagnosis.lower() in positive), diagnosis,
                         rel.parts[0] if len(rel.parts) > 2 else ""))
    if not rows:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in class subfolders.")
    ids, paths, labels, diagnoses, origins = map(list, zip(*rows, strict=True))
    if sum(labels) == 0:
        found = sorted({d for d in diagnoses})
        raise DataError(f"{root}: no folder is named as melanoma ({', '.join(sorted(positive))}); folders found: "
                        f"{', '.join(found[:12])}. Pass --melanoma-folders with the right name(s).")
    return _frame(image_id=ids, path=paths, label=labels, diagnosis=diagnoses, group_id=ids, patient_id=None,
                  lesion_id=None, sex=None, age=None, anatom_site=None, source="folder", unlabeled=None,
                  origin=origins)


READERS: dict[str, Callable[..., pd.DataFrame]] = {
    "siim-isic-2020": read_siim_isic_2020,
    "isic-2019": read_isic_2019,
    "ham10000": read_ham10000,
    "derm7pt": read_derm7pt,
    "folder": read_folder,
}


def parse_source(spec: str) -> tuple[str, Path]:
    """`KIND=PATH` -> (kind, path), with a clear error for an unknown kind."""
    if "=" not in spec:
        raise DataError(f"--source {spec!r}: expected KIND=PATH with KIND one of {', '.join(READERS)}.")
    kind, _, raw = spec.partition("=")
    kind = kind.strip().lower()
    if kind not in READERS:
        raise DataError(f"--source {spec!r}: unknown kind {kind!r}; use one of {', '.join(READERS)}.")
    return kind, Path(raw).expanduser()


def read_source(kind: str, path: Path, melanoma_folders: tuple[str, ...] = DEFAULT_MELANOMA_FOLDERS) -> pd.DataFrame:
    """Read one source; several sources of the same kind are told apart by `source` = kind[:name]."""
    if kind == "folder":
        return read_folder(path, melanoma_folders)
    return READERS[kind](path)
