"""A lossy copy of ../shared/data's three travel sources small enough for a GPU machine's upload.

`bench travel` prepares from the sources' own files (HAM10000 224 px, the ISIC 9-class set 180 px,
Derm7pt 384 px: 154 MB together), more than a device upload of 64 MiB holds. This writes the same
layout and file names (Derm7pt's upper-case folder and `.JPG` files included; label files copied as
they are) with every image shrunk to a longest side of 160 px (Derm7pt 192 px) and re-encoded as
JPEG quality 85: about 48 MiB. The bench's classifier sees 96 px and the GAN at most 128 px, so the
shrink is above both; it is still a lossy copy, so figures made on it compare within one run only
(defaults against a lever on the same copy), not with tables made on the originals.

    python studies/device_sources.py ../shared/data .gpu/shared/data
    # then, on the GPU machine, with .gpu carried: bash studies/gpu_travel_gan.sh
"""

from __future__ import annotations

import argparse
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

SIZES = {"ham10000_224": 160, "isic9_180": 160, "derm7pt_384": 192}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def shrink(job: tuple[Path, Path, int, int]) -> None:
    src, dst, size, quality = job
    with Image.open(src) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size), Image.LANCZOS)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        im.save(tmp, "JPEG", quality=quality)
        tmp.replace(dst)  # atomic: a stopped copy never leaves a truncated image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="../shared/data")
    ap.add_argument("dst", type=Path, help="where the copy goes (a folder git ignores)")
    ap.add_argument("--quality", type=int, default=85)
    args = ap.parse_args()
    missing = [f for f in SIZES if not (args.src / f).is_dir()]
    if missing:
        raise SystemExit(f"{args.src}: no {', '.join(missing)}; give the shared data folder (../shared/data).")
    jobs = []
    for folder, size in SIZES.items():
        for p in sorted((args.src / folder).rglob("*")):
            if not p.is_file():
                continue
            d = args.dst / folder / p.relative_to(args.src / folder)
            if p.suffix.lower() in IMAGE_SUFFIXES:
                jobs.append((p, d, size, args.quality))
            else:
                d.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, d)
    with ProcessPoolExecutor() as ex:
        list(ex.map(shrink, jobs, chunksize=64))
    total = sum(f.stat().st_size for f in args.dst.rglob("*") if f.is_file())
    print(f"{len(jobs)} images, {total / 2**20:.1f} MiB in {args.dst}")


if __name__ == "__main__":
    main()
