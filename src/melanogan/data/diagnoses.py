"""Diagnosis groups shared by the sources: each source names its diagnoses its own way (HAM10000
`nv`, `bkl`, `akiec`; the ISIC archive "pigmented benign keratosis"; Derm7pt "clark nevus",
"melanoma (in situ)"), so comparing two sites' case mix needs one vocabulary. The groups are
HAM10000's seven, the coarsest of the three: its `akiec` holds actinic keratoses and intraepithelial
carcinoma (Bowen's disease), so squamous cell carcinoma joins it; its `bkl` holds seborrhoeic
keratoses, solar lentigines and lichen-planus-like keratoses.
"""

from __future__ import annotations

GROUPS = ("melanoma", "nevus", "benign keratosis", "basal cell carcinoma",
          "actinic keratosis / squamous cell carcinoma", "vascular lesion", "dermatofibroma", "other")

# exact names (lower case) first; then the word rules in `diagnosis_group`
_EXACT = {
    "mel": "melanoma", "nv": "nevus", "bkl": "benign keratosis", "bcc": "basal cell carcinoma",
    "akiec": "actinic keratosis / squamous cell carcinoma", "ak": "actinic keratosis / squamous cell carcinoma",
    "scc": "actinic keratosis / squamous cell carcinoma", "vasc": "vascular lesion", "df": "dermatofibroma",
    "seborrheic keratosis": "benign keratosis", "seborrhoeic keratosis": "benign keratosis",
    "pigmented benign keratosis": "benign keratosis", "solar lentigo": "benign keratosis",
    "lentigo": "benign keratosis", "lentigo nos": "benign keratosis", "lichenoid keratosis": "benign keratosis",
    "basal cell carcinoma": "basal cell carcinoma", "actinic keratosis": "actinic keratosis / squamous cell carcinoma",
    "squamous cell carcinoma": "actinic keratosis / squamous cell carcinoma",
    "vascular lesion": "vascular lesion", "dermatofibroma": "dermatofibroma",
}


def diagnosis_group(name: object) -> str:
    """The group (GROUPS) of one source's diagnosis name; "other" for anything else, an unknown or
    missing diagnosis included (Derm7pt's "melanosis", "miscellaneous")."""
    if not isinstance(name, str):
        return "other"
    key = " ".join(name.strip().lower().split())
    if key in _EXACT:
        return _EXACT[key]
    if key.startswith("melanoma"):  # Derm7pt: "melanoma (in situ)", "melanoma metastasis", by thickness
        return "melanoma"
    if key.endswith(("nevus", "naevus", "nevi")):  # "clark nevus", "reed or spitz nevus", "blue nevus"
        return "nevus"
    return "other"
