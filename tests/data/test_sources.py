"""Adapters against the real label files and folders in ../shared/data, plus malformed inputs."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from melanogan.data.cache import CacheOptions
from melanogan.data.sources import (
    global_isic_id,
    parse_source,
    read_folder,
    read_ham10000,
    read_isic_2019,
    read_siim_isic_2020,
)
from melanogan.errors import DataError
from tests.conftest import write_jpeg


def test_siim_2020_official_csv_with_generated_images(shared_data, tmp_path):
    gt = pd.read_csv(shared_data / "isic_labels" / "ISIC_2020_Training_GroundTruth.csv")
    subset = pd.concat([gt[gt.target == 1].head(10), gt[gt.target == 0].head(40)])
    subset.to_csv(tmp_path / "ISIC_2020_Training_GroundTruth.csv", index=False)
    for i, name in enumerate(subset.image_name.iloc[:45]):  # the last 5 images are missing
        write_jpeg(tmp_path / "train" / f"{name}.jpg", i)
    rows = read_siim_isic_2020(tmp_path)
    assert len(rows) == 50 and rows["label"].sum() == 10
    assert (rows["path"] == "").sum() == 5
    assert (rows["group_id"] == subset["patient_id"].to_numpy()).all()
    assert set(rows["diagnosis"]) <= set(gt["diagnosis"].unique())
    assert rows["age"].dtype.kind == "f"


def test_siim_2020_full_csv_reads_fast_and_keeps_counts(shared_data, tmp_path):
    shutil.copy(shared_data / "isic_labels" / "ISIC_2020_Training_GroundTruth.csv", tmp_path / "train.csv")
    rows = read_siim_isic_2020(tmp_path)
    assert len(rows) == 33126 and rows["label"].sum() == 584
    assert rows["patient_id"].nunique() == 2056
    assert rows["age"].isna().sum() > 0  # real missing ages survive as NaN


def test_siim_2020_kaggle_layout_with_unlabeled_test(tmp_path):
    pd.DataFrame({"image_name": ["ISIC_1000001", "ISIC_1000002"], "patient_id": ["IP_1", "IP_1"],
                  "target": [1, 0]}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"image_name": ["ISIC_2000001"], "patient_id": ["IP_9"]}).to_csv(tmp_path / "test.csv", index=False)
    for i, name in enumerate(["ISIC_1000001", "ISIC_1000002"]):
        write_jpeg(tmp_path / "jpeg" / "train" / f"{name}.jpg", i)
    write_jpeg(tmp_path / "jpeg" / "test" / "ISIC_2000001.jpg", 9)
    rows = read_siim_isic_2020(tmp_path)
    assert rows["unlabeled"].tolist() == [False, False, True]
    assert rows.loc[2, "label"] == -1 and rows.loc[2, "path"].endswith("ISIC_2000001.jpg")
    assert rows["diagnosis"].tolist() == ["melanoma", "unknown", "unlabeled"]


def test_isic_2019_real_csv_with_downsampled_names(shared_data, tmp_path):
    gt = pd.read_csv(shared_data / "isic_labels" / "ISIC_2019_Training_GroundTruth.csv")
    assert len(gt) == 25331
    sub = pd.concat([gt.head(30), gt[gt.image.str.endswith("_downsampled")].head(40)]).drop_duplicates("image")
    sub.to_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", index=False)
    pd.DataFrame({"image": sub.image, "lesion_id": ["L1"] * 4 + [None] * (len(sub) - 4)}).to_csv(
        tmp_path / "ISIC_2019_Training_Metadata.csv", index=False)
    for i, name in enumerate(sub.image):
        # write half of the downsampled files without the suffix: the adapter must find both
        stem = name.removesuffix("_downsampled") if i % 2 else name
        write_jpeg(tmp_path / "ISIC_2019_Training_Input" / f"{stem}.jpg", i)
    rows = read_isic_2019(tmp_path)
    assert (rows["path"] != "").all()
    assert rows["label"].tolist() == sub["MEL"].astype(int).tolist()
    assert rows.loc[:3, "group_id"].tolist() == ["L1"] * 4
    assert rows.loc[5, "group_id"] == rows.loc[5, "image_id"]
    assert set(rows["diagnosis"]) <= {"MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"}
    assert global_isic_id("ISIC_0000017_downsampled") == "ISIC_0000017"


def test_isic_2019_full_real_csv_class_counts(shared_data, tmp_path):
    shutil.copy(shared_data / "isic_labels" / "ISIC_2019_Training_GroundTruth.csv", tmp_path)
    rows = read_isic_2019(tmp_path)
    assert rows["label"].sum() == 4522  # the official MEL count
    assert (rows["path"] == "").all()  # no images here: all reported missing, none crash


def test_ham10000_real_metadata_reports_missing_images(shared_data):
    rows = read_ham10000(shared_data / "ham10000_224")
    assert len(rows) == 10015
    assert (rows["path"] == "").sum() == 4031
    present = rows[rows["path"] != ""]
    assert len(present) == 5984 and present["label"].sum() == 491
    assert rows["group_id"].str.startswith("HAM_").all()
    # how each diagnosis was confirmed, kept: 1,082 of the naevi present were excised (dx_type histo)
    naevi = present[present["diagnosis"] == "nv"]
    assert naevi["meta_dx_type"].value_counts().to_dict() == {"follow_up": 2971, "histo": 1082, "consensus": 270}


def test_folder_real_nine_class_layout(shared_data):
    rows = read_folder(shared_data / "isic9_180")
    assert len(rows) == 2359
    assert set(rows.loc[rows.label == 1, "diagnosis"]) == {"melanoma"}
    assert rows["image_id"].is_unique  # Train/ and Test/ copies of one file stay distinct rows
    assert set(rows["origin"]) == {"Train", "Test"}
    assert rows.loc[rows.label == 1].shape[0] == 454


def test_folder_custom_melanoma_names(tmp_path):
    write_jpeg(tmp_path / "a" / "MM" / "x.jpg", 1)
    write_jpeg(tmp_path / "a" / "benign" / "y.jpg", 2)
    with pytest.raises(DataError, match="--melanoma-folders"):
        read_folder(tmp_path)
    rows = read_folder(tmp_path, ("mm",))
    assert rows.set_index("diagnosis")["label"].to_dict() == {"MM": 1, "benign": 0}


def test_csv_without_needed_column_names_file_and_column(tmp_path):
    pd.DataFrame({"image_name": ["a"], "patient": ["p"], "target": [0]}).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError) as e:
        read_siim_isic_2020(tmp_path)
    assert "train.csv" in str(e.value) and "'patient_id'" in str(e.value)


def test_duplicate_ids_are_an_error(tmp_path):
    pd.DataFrame({"lesion_id": ["L1", "L2"], "image_id": ["ISIC_1", "ISIC_1"], "dx": ["mel", "nv"]}).to_csv(
        tmp_path / "HAM10000_metadata.csv", index=False)
    with pytest.raises(DataError, match=r"duplicated id.*ISIC_1"):
        read_ham10000(tmp_path)


def test_labels_outside_zero_one_are_an_error(tmp_path):
    pd.DataFrame({"image_name": ["a", "b"], "patient_id": ["p", "q"], "target": [0, 2]}).to_csv(
        tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match=r"'target'.*row 3: '2'"):
        read_siim_isic_2020(tmp_path)


def test_isic_2019_row_not_one_hot(tmp_path):
    pd.DataFrame({"image": ["a"], "MEL": [1.0], "NV": [1.0]}).to_csv(
        tmp_path / "ISIC_2019_Training_GroundTruth.csv", index=False)
    with pytest.raises(DataError, match="not one-hot"):
        read_isic_2019(tmp_path)


def test_wrong_path_and_unknown_kind(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_ham10000(tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown kind 'isic-2018'"):
        parse_source("isic-2018=/x")
    with pytest.raises(DataError, match="KIND=PATH"):
        parse_source("/just/a/path")


def test_derm7pt_layout_with_its_quirks(tmp_path):
    from melanogan.data.manifest import load_manifest, prepare
    from melanogan.data.sources import read_derm7pt

    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "meta.csv").write_text(
        "diagnosis,pigment_network,streaks,pigmentation,regression_structures,dots_and_globules,"
        "blue_whitish_veil,vascular_structures,derm\n"
        "melanoma (in situ),atypical,absent,absent,absent,absent,absent,absent,FCl/Fcl068.jpg\n"
        "clark nevus,typical,absent,absent,absent,regular,absent,absent,Aal/Aal002.jpg\n"
        "melanoma (0.76 to 1.5 mm),atypical,irregular,absent,absent,absent,present,absent,Aal/Aal003.jpg\n"
        "seborrheic keratosis,absent,absent,absent,absent,absent,absent,absent,Aal/Aal404.jpg\n")
    write_jpeg(tmp_path / "images" / "FCL" / "Fcl068.jpg", 1)  # folder case differs from meta.csv
    write_jpeg(tmp_path / "images" / "Aal" / "Aal002.JPG", 2)  # upper-case extension
    write_jpeg(tmp_path / "images" / "Aal" / "Aal003.jpg", 3)  # Aal404 is missing
    rows = read_derm7pt(tmp_path).set_index("image_id")
    assert rows["label"].to_dict() == {"FCl/Fcl068": 1, "Aal/Aal002": 0, "Aal/Aal003": 1, "Aal/Aal404": 0}
    assert rows.loc["FCl/Fcl068", "path"].endswith("FCL/Fcl068.jpg")
    assert rows.loc["Aal/Aal002", "path"].endswith("Aal002.JPG") and rows.loc["Aal/Aal404", "path"] == ""
    assert rows.loc["Aal/Aal003", "meta_blue_whitish_veil"] == "present"
    result = prepare([("derm7pt", tmp_path)], tmp_path / "data", CacheOptions(size=32))
    m = load_manifest(tmp_path / "data").set_index("image_id")
    assert set(m.index) == {"FCl/Fcl068", "Aal/Aal002", "Aal/Aal003"}  # the missing one is in rejected.csv
    assert m.loc["Aal/Aal003", "meta_streaks"] == "irregular" and m.loc["Aal/Aal002", "diagnosis"] == "clark nevus"
    assert result.rejected["reason"].tolist() == ["missing-file"]


def test_derm7pt_case_without_a_number_is_its_own_group(tmp_path):
    from melanogan.data.sources import read_derm7pt

    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "meta.csv").write_text(
        "case_num,diagnosis,derm\n1,nevus,a/1.jpg\n1,nevus,a/2.jpg\n,nevus,a/3.jpg\n,melanoma,a/4.jpg\n")
    assert read_derm7pt(tmp_path)["group_id"].tolist() == ["case-1", "case-1", "a/3", "a/4"]


def test_derm7pt_empty_cells_name_their_lines(tmp_path):
    from melanogan.data.sources import read_derm7pt

    (tmp_path / "meta").mkdir()
    csv = tmp_path / "meta" / "meta.csv"
    csv.write_text("diagnosis,derm\nclark nevus,Aal/Aal002.jpg\n,Aal/Aal003.jpg\nmelanoma,Aal/Aal004.jpg\n")
    with pytest.raises(DataError, match=r"1 row\(s\) with an empty 'diagnosis' \(line\(s\) 3\)"):
        read_derm7pt(tmp_path)
    csv.write_text("diagnosis,derm\nclark nevus,Aal/Aal002.jpg\nmelanoma,  \n")
    with pytest.raises(DataError, match=r"empty 'derm' \(line\(s\) 3\)"):
        read_derm7pt(tmp_path)


def test_derm7pt_real_meta(shared_data):
    from melanogan.data.sources import read_derm7pt

    rows = read_derm7pt(shared_data / "derm7pt_384")
    assert len(rows) == 1011 and int(rows["label"].sum()) == 252 and (rows["path"] != "").all()
    assert rows["path"].str.endswith(".JPG").sum() == 52
    assert rows.loc[rows["image_id"] == "FCl/Fcl068", "path"].iat[0].endswith("FCL/Fcl068.jpg")
