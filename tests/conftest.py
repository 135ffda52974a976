"""Shared fixtures: real data from ../shared/data (skipped with a reason when absent) and small
generated datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Under pytest-xdist (`pytest -n 2`), each worker gets its share of the cores: two workers each
# running torch on every core would oversubscribe them and run slower than one. Set before torch is
# imported, and in the environment, so the CLI subprocesses and the notebook kernel inherit it.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_share))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MELANOGAN_SHARED_DATA", REPO.parent / "shared" / "data"))


# CI has ../shared: there, `.ci/run` sets this so that a test which would skip for want of it fails.
REQUIRE_SHARED = os.environ.get("MELANOGAN_REQUIRE_SHARED_DATA") == "1"


def require_shared_data() -> Path:
    """../shared/data, or a skip saying why (a failure where it is required)."""
    if not (SHARED_DATA / "README.md").is_file():
        message = f"real data not available: {SHARED_DATA} is absent (set MELANOGAN_SHARED_DATA to its path)"
        if REQUIRE_SHARED:
            pytest.fail(message + "; MELANOGAN_REQUIRE_SHARED_DATA=1 requires it", pytrace=False)
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    """A small distinct JPEG (smooth random colour field) at `path`."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90)
    return path


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims huge dimensions (a decompression bomb header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory) -> Path:
    """A 60-image phantom dataset in the SIIM-ISIC 2020 layout."""
    from melanogan.data.demo import generate_demo_dataset

    out = tmp_path_factory.mktemp("demo_raw")
    generate_demo_dataset(out, n_images=60, melanoma_rate=0.2, seed=1, width=96, height=80)
    return out


@pytest.fixture(scope="session")
def demo_prepared(demo_raw, tmp_path_factory) -> Path:
    from melanogan.data.cache import CacheOptions
    from melanogan.data.manifest import prepare

    out = tmp_path_factory.mktemp("demo_prepared")
    prepare([("siim-isic-2020", demo_raw)], out, CacheOptions(size=64), seed=0)
    return out


@pytest.fixture(scope="session")
def demo_prepared_skin_colour(demo_raw, tmp_path_factory) -> Path:
    """The demo phantoms without colour constancy (which makes skin grey): for tests that need the
    data's own colour."""
    from melanogan.data.cache import CacheOptions
    from melanogan.data.manifest import prepare

    out = tmp_path_factory.mktemp("demo_prepared_skin")
    prepare([("siim-isic-2020", demo_raw)], out, CacheOptions(size=64, color_constancy=False), seed=0)
    return out
