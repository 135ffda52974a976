"""The SYN_DIR contract between the GAN (which writes synthetic sets) and the classifier (which
reads them): in which preprocessing the generated images live, and how they are cached."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from melanogan.data.cache import CacheOptions
from melanogan.errors import MelanoganError
from melanogan.fileio import read_json

# 2: images cached without a second colour constancy / hair removal; `cache_options` is the real
# data's preprocessing (the space the images live in), `decode_options` what was applied to them.
SYNTHETIC_FORMAT = 2


def synthetic_decode_options(space: CacheOptions) -> CacheOptions:
    """How generated images are cached for real data preprocessed with `space`: same size, nothing
    applied a second time."""
    return replace(space, hair_removal=False, color_constancy=False)


def check_synthetic_space(syn_dir: Path, data_options: CacheOptions) -> None:
    """Refuse a SYN_DIR whose images were generated in another preprocessing than `data_options` (the
    classifier's real data): mixing them would teach the classifier that a colour cast or a size
    means melanoma."""
    info_path = Path(syn_dir) / "prepare.json"
    info = read_json(info_path) if info_path.is_file() else {}
    if info.get("kind") != "synthetic":
        raise MelanoganError(f"{syn_dir}: not a synthetic set from `melanogan generate` (no synthetic prepare.json).")
    space = CacheOptions(**info["cache_options"])
    if info.get("synthetic_format", 1) < SYNTHETIC_FORMAT and (space.color_constancy or space.hair_removal):
        raise MelanoganError(f"{syn_dir}: made by an older melanogan that applied colour constancy/hair removal to "
                             "the generated images a second time. Regenerate it with `melanogan generate`.")
    if space != data_options:
        raise MelanoganError(f"{syn_dir}: generated for data preprocessed as {space.name} (from "
                             f"{info.get('real_data_dir')}), but the classifier's data is preprocessed as "
                             f"{data_options.name}. Train the GAN on this DATA_DIR (or prepare the data with the "
                             "same options) and generate again.")
