"""One vocabulary for the sources' diagnosis names."""

from __future__ import annotations

import pytest

from melanogan.data.diagnoses import GROUPS, diagnosis_group

AK_SCC = "actinic keratosis / squamous cell carcinoma"


@pytest.mark.parametrize(("name", "group"), [
    # HAM10000's codes
    ("mel", "melanoma"), ("nv", "nevus"), ("bkl", "benign keratosis"), ("bcc", "basal cell carcinoma"),
    ("akiec", AK_SCC), ("vasc", "vascular lesion"), ("df", "dermatofibroma"),
    # the ISIC archive's folder names
    ("melanoma", "melanoma"), ("nevus", "nevus"), ("pigmented benign keratosis", "benign keratosis"),
    ("seborrheic keratosis", "benign keratosis"), ("actinic keratosis", AK_SCC), ("squamous cell carcinoma", AK_SCC),
    ("basal cell carcinoma", "basal cell carcinoma"), ("vascular lesion", "vascular lesion"),
    ("dermatofibroma", "dermatofibroma"), ("solar lentigo", "benign keratosis"), ("lentigo NOS", "benign keratosis"),
    ("lichenoid keratosis", "benign keratosis"),
    # Derm7pt's, in their case and spacing
    ("melanoma (in situ)", "melanoma"), ("melanoma (less than 0.76 mm)", "melanoma"),
    ("melanoma metastasis", "melanoma"), ("clark nevus", "nevus"), ("reed or spitz nevus", "nevus"),
    ("Blue  Nevus ", "nevus"), ("congenital nevus", "nevus"), ("lentigo", "benign keratosis"),
    ("melanosis", "other"), ("miscellaneous", "other"),
    # nothing known
    ("unknown", "other"), ("atypical melanocytic proliferation", "other"), (None, "other"), (float("nan"), "other"),
])
def test_each_sources_names_fall_in_one_group(name, group):
    assert diagnosis_group(name) == group and group in GROUPS
