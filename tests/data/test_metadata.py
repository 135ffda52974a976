"""Metadata encoding: exact vectors on constructed rows, missing values explicit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from melanogan.data.metadata import (
    SITE_GROUPS,
    encode_metadata,
    metadata_dim,
    missing_vector,
    missingness_warning,
    parse_fields,
    read_metadata_csv,
    site_group,
)
from melanogan.errors import MelanoganError


def test_encoding_exact_with_missing_values():
    rows = pd.DataFrame({"age": [45.0, None, 130.0], "sex": ["Male", None, "unknown"],
                         "anatom_site": ["back", "acral", "unknown"]})
    enc = encode_metadata(rows, ["age", "sex", "site"])
    assert enc.shape == (3, metadata_dim(["age", "sex", "site"])) == (3, 2 + 3 + len(SITE_GROUPS) + 1)
    torso, palms = SITE_GROUPS.index("torso"), SITE_GROUPS.index("palms/soles")
    site = np.eye(len(SITE_GROUPS) + 1, dtype=np.float32)
    np.testing.assert_array_equal(enc[0], np.concatenate([[0.45, 0], [1, 0, 0], site[torso]]).astype(np.float32))
    np.testing.assert_array_equal(enc[1], np.concatenate([[0, 1], [0, 0, 1], site[palms]]).astype(np.float32))
    # an impossible age and unknown values are missing, each with its own flag
    np.testing.assert_array_equal(enc[2], np.concatenate([[0, 1], [0, 0, 1], site[-1]]).astype(np.float32))
    np.testing.assert_array_equal(missing_vector(["age", "sex", "site"]), enc[2])


def test_fields_order_absent_columns_and_site_aliases():
    assert parse_fields("site, AGE") == ["age", "site"] and parse_fields("") == [] and parse_fields(None) == []
    with pytest.raises(MelanoganError, match="unknown field"):
        parse_fields("age,weight")
    only_sex = encode_metadata(pd.DataFrame({"uid": ["a", "b"]}), ["sex"])  # a source without metadata
    np.testing.assert_array_equal(only_sex, [[0, 0, 1], [0, 0, 1]])
    assert [site_group(s) for s in ("face", "Lower Extremity", "posterior torso", "genital", "hand", None, "x")] == \
        ["head/neck", "lower extremity", "torso", "oral/genital", "upper extremity", None, None]


def test_missingness_that_predicts_the_label_is_named():
    rows = pd.DataFrame({"age": [50.0] * 10 + [None] * 10})
    labels = np.array([1] + [0] * 9 + [1] * 5 + [0] * 5)  # 10% with age, 50% without
    assert "melanoma rate (50.0%) differs from the rest (10.0%)" in missingness_warning(rows, labels, ["age"])
    assert missingness_warning(rows, np.array([1, 0] * 10), ["age"]) is None
    assert missingness_warning(rows, labels, []) is None


def test_metadata_csv_needs_its_columns(tmp_path):
    (tmp_path / "ok.csv").write_text("image,age,site\nimgs/a.jpg,40,back\nb.png,,\n")
    table = read_metadata_csv(tmp_path / "ok.csv")
    assert list(table.index) == ["a.jpg", "b.png"] and table.at["a.jpg", "anatom_site"] == "back"
    (tmp_path / "bad.csv").write_text("file,weight\na.jpg,70\n")
    with pytest.raises(MelanoganError, match="needs an `image` column"):
        read_metadata_csv(tmp_path / "bad.csv")
    (tmp_path / "dup.csv").write_text("image,age\na.jpg,1\nx/a.jpg,2\n")
    with pytest.raises(MelanoganError, match="more than once"):
        read_metadata_csv(tmp_path / "dup.csv")
