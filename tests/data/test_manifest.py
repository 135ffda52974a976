"""prepare end to end: schema, rejections, duplicates forced together, stable re-runs."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from melanogan.data.audit import audit, audit_manifest
from melanogan.data.cache import CacheOptions
from melanogan.data.manifest import MANIFEST_COLUMNS, load_manifest, prepare, squashed_copies_notes
from melanogan.errors import DataError
from melanogan.fileio import read_json
from tests.conftest import write_jpeg


def test_demo_manifest_schema_and_audit(demo_prepared):
    m = load_manifest(demo_prepared)
    assert list(m.columns) == MANIFEST_COLUMNS
    assert len(m) == 60 and m["label"].isin([0, 1]).all()
    assert m["uid"].is_unique and set(m["split"]) == {"train", "val", "test"}
    assert (m["width"] == 96).all() and (m["height"] == 80).all()
    report = audit(demo_prepared)
    assert report.passed, report.checks


def test_rejections_are_reported_and_run_goes_on(tmp_path):
    names = [f"ISIC_{i:07d}" for i in range(12)]
    pd.DataFrame({"image_name": names, "patient_id": [f"P{i // 2}" for i in range(12)],
                  "target": [1, 0] * 6}).to_csv(tmp_path / "train.csv", index=False)
    for i, n in enumerate(names[:9]):
        write_jpeg(tmp_path / "train" / f"{n}.jpg", i)
    (tmp_path / "train" / f"{names[9]}.jpg").write_bytes(b"")
    (tmp_path / "train" / f"{names[10]}.jpg").write_text("hello")
    result = prepare([("siim-isic-2020", tmp_path)], tmp_path / "out", CacheOptions(size=32))
    rejected = pd.read_csv(tmp_path / "out" / "rejected.csv").set_index("image_id")["reason"].to_dict()
    assert rejected == {names[9]: "empty-file", names[10]: "not-an-image", names[11]: "missing-file"}
    assert len(result.manifest) == 9


def test_square_copies_of_a_source_published_at_one_wider_size_are_named_with_their_squash():
    manifest = pd.DataFrame({"source": ["ham10000"] * 4 + ["ham10000#2"] * 2 + ["folder"] * 2,
                             "width": [224, 224, 180, 600, 600, 600, 180, 180],
                             "height": [224, 224, 180, 450, 450, 450, 180, 180]})
    kinds = {"ham10000": "ham10000", "ham10000#2": "ham10000", "folder": "folder"}
    notes = squashed_copies_notes(manifest, kinds)
    # the first HAM10000 source: 3 of its 4 images square, most of them 224x224, lesions 450/600 as wide;
    # the second is published-size only; a folder source has no published size (square is its own)
    assert len(notes) == 1
    assert notes[0].startswith("ham10000: 3 of 4 images are square (most 224x224), but ham10000's photographs are "
                               "published at 600x450") and "0.75 as wide" in notes[0]
    assert squashed_copies_notes(manifest[manifest["source"] != "ham10000"], kinds) == []


def test_prepare_says_when_ham10000_files_are_squashed_copies(tmp_path):
    ids = [f"ISIC_{i:07d}" for i in range(4)]
    pd.DataFrame({"lesion_id": [f"L{i}" for i in range(4)], "image_id": ids,
                  "dx": ["mel", "nv", "nv", "nv"]}).to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    for i, n in enumerate(ids):  # three square copies, one at the published 600x450 (4:3) shape
        write_jpeg(tmp_path / "HAM10000_images_part_1" / f"{n}.jpg", i, (64, 64) if i < 3 else (60, 45))
    result = prepare([("ham10000", tmp_path)], tmp_path / "out", CacheOptions(size=32))
    squash = [n for n in result.notes if "squashed" in n]
    assert len(squash) == 1 and squash[0].startswith("ham10000: 3 of 4 images are square (most 64x64)")
    assert squash == [n for n in read_json(tmp_path / "out" / "prepare.json")["notes"] if "squashed" in n]


def test_exact_duplicates_with_conflicting_labels_are_all_rejected(tmp_path):
    for folder in ("Train/melanoma", "Test/nevus"):
        write_jpeg(tmp_path / "src" / folder / "same.jpg", 7)
    write_jpeg(tmp_path / "src" / "Train" / "melanoma" / "m2.jpg", 1)
    write_jpeg(tmp_path / "src" / "Train" / "nevus" / "n1.jpg", 2)
    write_jpeg(tmp_path / "src" / "Test" / "nevus" / "n1copy.jpg", 2)  # identical to n1, same label
    result = prepare([("folder", tmp_path / "src")], tmp_path / "out", CacheOptions(size=32))
    reasons = result.rejected.set_index("image_id")["reason"].to_dict()
    assert reasons["Train/melanoma/same"] == reasons["Test/nevus/same"] == "label-conflict"
    assert reasons["Train/nevus/n1"] == "exact-duplicate" or reasons["Test/nevus/n1copy"] == "exact-duplicate"
    assert len(result.manifest) == 2


def test_rerun_keeps_splits_and_adding_a_source_keeps_them_too(demo_raw, tmp_path):
    out = tmp_path / "data"
    first = prepare([("siim-isic-2020", demo_raw)], out, CacheOptions(size=32), seed=0)
    again = prepare([("siim-isic-2020", demo_raw)], out, CacheOptions(size=32), seed=99)
    assert first.manifest.set_index("uid")["split"].equals(again.manifest.set_index("uid")["split"])
    write_jpeg(tmp_path / "extra" / "melanoma" / "e1.jpg", 5)
    write_jpeg(tmp_path / "extra" / "nevus" / "e2.jpg", 6)
    grown = prepare([("siim-isic-2020", demo_raw), ("folder", tmp_path / "extra")], out, CacheOptions(size=32))
    old = first.manifest.set_index("uid")["split"]
    assert grown.manifest.set_index("uid")["split"].reindex(old.index).equals(old)
    assert len(grown.manifest) == len(first.manifest) + 2


def test_real_ham_and_isic9_copies_share_a_split(shared_data, tmp_path):
    """743 HAM10000 photographs are also in the ISIC 9-class folders under the same id; a manifest
    from both must keep every such pair (and their lesions) in one split."""
    isic9 = shared_data / "isic9_180"
    result = prepare([("ham10000", shared_data / "ham10000_224"), ("folder", isic9)], tmp_path / "d",
                     CacheOptions(size=24), workers=2)
    m = result.manifest
    assert (result.rejected["reason"] == "missing-file").sum() == 4031
    ham = m[m["source"] == "ham10000"].set_index("image_id")["split"]
    folder = m[m["source"] == "folder"].assign(isic=lambda d: d["image_id"].str.extract(r"(ISIC_\d{7})")[0])
    shared = folder[folder["isic"].isin(ham.index)]
    assert len(shared) >= 700
    assert (shared["split"].to_numpy() == ham.reindex(shared["isic"]).to_numpy()).all()
    # the perceptual hash alone (without ids) finds nearly all of them
    phash_pairs = result.near_duplicates[result.near_duplicates["evidence"] == "perceptual-hash"]
    ids = m.set_index("uid")["image_id"].str.extract(r"(ISIC_\d{7})")[0]
    same = ids.reindex(phash_pairs["uid_a"]).to_numpy() == ids.reindex(phash_pairs["uid_b"]).to_numpy()
    assert same.sum() >= 0.95 * len(shared)
    assert audit(tmp_path / "d").passed


def test_audit_catches_leaks():
    m = pd.DataFrame({"uid": ["a", "b", "c", "s"], "source": ["x", "x", "x", "synthetic"],
                      "group_id": ["g", "g", "h", "s"], "cluster_id": ["g", "g", "h", "s"],
                      "content_hash": ["1", "2", "3", "4"], "split": ["train", "test", "val", "val"],
                      "label": [0, 1, 1, 1]})
    report = audit_manifest(m)
    failed = {name for name, ok, _ in report.checks if not ok}
    assert failed == {"no linked cluster (patient, lesion or near-duplicate) in two splits",
                      "no patient/lesion group in two splits", "synthetic images only in train"}


def test_no_source_and_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="no --source"):
        prepare([], tmp_path)
    with pytest.raises(DataError, match="melanogan prepare"):
        load_manifest(tmp_path)


def test_prepare_estimates_skin_tone_from_the_image_as_captured(tmp_path):
    """ITA in the manifest is the raw skin's, though the cache is colour-corrected (which greys skin);
    a lesion that fills the frame gets NaN with its reason; prepare.json counts the bands."""
    import math

    import numpy as np
    from PIL import Image

    from melanogan.data.manifest import MANIFEST
    from melanogan.fileio import read_json
    from tests.data.test_skin import _skin_with_lesion, _srgb_to_lab

    skins = {"light": (233, 196, 170), "brown": (120, 80, 58)}
    for name, rgb in skins.items():
        (tmp_path / "src" / "nevus").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_skin_with_lesion(rgb, size=128, radius=24)).save(tmp_path / "src" / "nevus" / f"{name}.png")
    (tmp_path / "src" / "melanoma").mkdir()
    Image.fromarray(_skin_with_lesion((220, 180, 150), size=128, radius=84)).save(
        tmp_path / "src" / "melanoma" / "filled.png")
    prepare([("folder", tmp_path / "src")], tmp_path / "out", CacheOptions(size=64, color_constancy=True))
    m = load_manifest(tmp_path / "out").set_index("image_id")
    for name, rgb in skins.items():
        lab = _srgb_to_lab(rgb)
        assert m.at[f"nevus/{name}", "ita"] == pytest.approx(math.degrees(math.atan((lab[0] - 50) / lab[2])), abs=0.05)
    assert m.at["nevus/light", "ita_category"] == "very light" and m.at["nevus/brown", "ita_category"] == "dark"
    assert math.isnan(m.at["melanoma/filled", "ita"]) and m.at["melanoma/filled", "ita_category"] == "unknown"
    assert "too little skin" in m.at["melanoma/filled", "ita_reason"]
    tones = read_json(tmp_path / "out" / "prepare.json")["skin_tone"]["folder"]
    assert (tones["very light"], tones["dark"], tones["unknown"], tones["light"]) == (1, 1, 1, 0)
    # a cache holding an older skin-tone estimate is decoded again, once, by prepare (never shown as current)
    from melanogan.data.cache import Cache

    cache_dir = next((tmp_path / "out" / "cache").iterdir())
    index = pd.read_parquet(cache_dir / "index.parquet")
    index.assign(ita=-99.0, ita_version=1).to_parquet(cache_dir / "index.parquet")
    assert Cache.open(cache_dir).index["ita"].isna().all()
    (tmp_path / "out" / MANIFEST).unlink()
    prepare([("folder", tmp_path / "src")], tmp_path / "out", CacheOptions(size=64, color_constancy=True))
    again = load_manifest(tmp_path / "out").set_index("image_id")
    assert again.at["nevus/light", "ita"] == pytest.approx(m.at["nevus/light", "ita"])
    assert np.isfinite(again.at["nevus/brown", "ita"])


def test_a_script_without_its_main_guard_gets_told_to_add_one(demo_raw, tmp_path):
    # decoding workers are spawned and import the script again; unguarded, each would run prepare too
    script = tmp_path / "unguarded.py"
    script.write_text(f"import melanogan as mg\nmg.prepare(['siim-isic-2020={demo_raw}'], 'out', size=32, workers=2)\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "a decoding worker process died" in done.stderr  # the parent's error says what to do
    assert 'call prepare under `if __name__ == "__main__":`' in done.stderr
    # and the workers refused to run a second prepare into the same folder
    assert f"prepare was called while a decoding worker imported {script}" in done.stderr
    assert not (tmp_path / "out" / "manifest.parquet").exists()
