"""Train a study's GANs on a GPU machine from a pack, then bring them back for the classifier arms.

For a study whose GAN needs a GPU but whose classifiers are cheap (studies/shared-data-gpu.yaml):
on the GPU machine, with melanogan's source and a `melanogan pack` of the study's data,

    python studies/gpu_gans.py studies/shared-data-gpu.yaml --pack PACK --out STUDY_DIR --budget 360 \
        --bring-back BACK

unpacks the data where the study config expects it, trains the honest study's GAN (on the training
split) and, with `protocol: both`, the original protocol's GAN (every melanoma, split by image) after
it, each for as many steps as `--budget` seconds afford (measured on the first
`--probe` steps; both GANs train the same number of steps). The step count is written to
BACK/gpu_gans.json: put it in the study config's `gan.overrides.steps`. BACK gets one tar per GAN
(config, stats, samples and the generator weights: everything generation needs; the critic and the
optimiser state stay behind). Untar them into STUDY_DIR here and `melanogan study` finds the GANs
trained (it checks their manifest hash against the study's data) and runs the rest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
import time
from pathlib import Path


def _train(data: str, run_dir: str, cfg, precision: str) -> tuple[int, float]:
    from melanogan.gan.train import train_gan

    t0 = time.perf_counter()
    summary = train_gan(Path(data), Path(run_dir), cfg, precision=precision, progress=False)
    return summary["step"], time.perf_counter() - t0


def _bring_back(run_dir: Path, tar_path: Path, part_bytes: int = 15 * 2**20) -> list[Path]:
    """The run with its latest checkpoint only, without the critic and optimiser state (generation
    needs neither), as a tar cut into parts of at most `part_bytes` (`cat` them back together)."""
    from melanogan.gan.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir)

    def keep(info: tarfile.TarInfo):
        parts = Path(info.name).parts
        if info.name.endswith(("critic.safetensors", "optimizers.pt")):
            return None
        if len(parts) >= 3 and parts[1] == "checkpoints" and parts[2] != latest.name:
            return None
        return info

    with tarfile.open(tar_path, "w") as tar:
        tar.add(run_dir, arcname=run_dir.name, filter=keep)
    data = tar_path.read_bytes()
    if len(data) <= part_bytes:
        return [tar_path]
    tar_path.unlink()
    paths = []
    for i in range(0, len(data), part_bytes):
        paths.append(tar_path.with_name(f"{tar_path.name}.part{i // part_bytes}"))
        paths[-1].write_bytes(data[i:i + part_bytes])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--pack", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True,
                        help="STUDY_DIR (the GAN folders go where the study puts them)")
    parser.add_argument("--budget", type=float, required=True, help="seconds of GAN training, probe included")
    parser.add_argument("--probe", type=int, default=100, help="steps timed to choose the step count")
    parser.add_argument("--round", type=int, default=250, help="the step count is a multiple of this")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--bring-back", type=Path, help="folder for the tars and gpu_gans.json")
    args = parser.parse_args()

    import torch

    from melanogan.data.pack import unpack_data_dir
    from melanogan.gan.config import load_config
    from melanogan.study.experiments import (
        ORIGINAL_DIR,
        load_study_config,
        original_protocol_config,
        split_data_by_image,
    )

    cfg = load_study_config(args.config)
    data = Path(cfg.data)
    if not (data / "manifest.parquet").is_file():
        unpack_data_dir(args.pack, data, log=print)
    seed = cfg.seeds[0]
    gan_cfg = load_config(cfg.gan.preset, **{**cfg.gan.overrides, "seed": seed})
    jobs = [(str(data), str(args.out / f"seed-{seed}" / "gan"), gan_cfg)]
    if cfg.protocol == "both":
        by_image = split_data_by_image(data, args.out / ORIGINAL_DIR / "data-by-image", seed)
        ocfg = original_protocol_config(cfg, by_image)
        jobs.append((str(by_image), str(args.out / ORIGINAL_DIR / f"seed-{seed}" / "gan"),
                     load_config(ocfg.gan.preset, **{**ocfg.gan.overrides, "seed": seed})))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{len(jobs)} GAN(s) on {device}, {gan_cfg.resolution} px, budget {args.budget:.0f} s", flush=True)

    # One after another: two GANs at once on one H200 ran 12x slower each than one alone (measured).
    t0 = time.perf_counter()
    d, _, c = jobs[0]
    probe_dir = args.out / ".probe"  # thrown away: a schedule in fractions of steps must see the real count
    shutil.rmtree(probe_dir, ignore_errors=True)
    _, probe_s = _train(d, str(probe_dir), c.model_copy(update={"steps": args.probe}), args.precision)
    shutil.rmtree(probe_dir)
    # The probe's seconds include start-up (data, CUDA, first steps): the rate is a lower bound.
    rate = args.probe / probe_s
    left = args.budget - (time.perf_counter() - t0) - len(jobs) * probe_s  # start-ups, roughly
    steps = max(args.probe, int(rate * left / len(jobs)) // args.round * args.round)
    print(f"probe: {args.probe} steps in {probe_s:.1f} s ({rate:.2f} steps/s); {len(jobs)} GAN(s) to {steps} steps",
          flush=True)
    done = {}
    for d, r, c in jobs:
        done[r] = _train(d, r, c.model_copy(update={"steps": steps}), args.precision)
    wall = time.perf_counter() - t0
    info = {"device": device, "torch": torch.__version__, "resolution": gan_cfg.resolution, "steps": steps,
            "gans": {Path(r).relative_to(args.out).as_posix(): {"step": s, "seconds": round(sec, 1)}
                     for r, (s, sec) in done.items()},
            "probe_steps_per_s": round(rate, 3), "wall_seconds": round(wall, 1), "one_after_another": len(jobs),
            "images_per_gan": steps * gan_cfg.batch_size * gan_cfg.n_critic,
            "precision": args.precision}
    print(json.dumps(info, indent=1), flush=True)
    if args.bring_back:
        args.bring_back.mkdir(parents=True, exist_ok=True)
        (args.bring_back / "gpu_gans.json").write_text(json.dumps(info, indent=1))
        for _, run_dir, _ in jobs:
            name = Path(run_dir).relative_to(args.out).as_posix().replace("/", "__")
            _bring_back(Path(run_dir), args.bring_back / f"{name}.tar")


if __name__ == "__main__":
    main()
