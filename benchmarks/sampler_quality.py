"""Sample quality of the demo MedDiffusion model under different samplers, scored against its training volumes.

For each sampler (DDPM with every training step, the original DDIM at 100 steps, DPM-Solver++ and UniPC at 10, 25
and 50 steps) and each region of the model, `--num-volumes` volumes are generated from the same seeds (so the
deterministic samplers start from the same noise), then scored with `meddiffusers.evaluation`:

- FID, KID and Gaussian MMD (the biased V-statistic, which stays >= 0 with two real volumes) between the
  generated volumes of both regions and the model's training volumes (the two volumes
  `examples/demo/build_demo_model.py` trains the demo from, percentile-scaled to [-1, 1] as in training), on
  features of the seeded random extractor (no pretrained 3D extractor is available offline: the numbers compare
  samplers with each other on this model only, never with published results);
- MS-SSIM between pairs of generated volumes of one region (diversity: lower is more diverse) and between each
  generated volume and its region's training volume (closeness to the only example the model saw);
- seconds per volume (one batch of `--num-volumes` per region, CPU).

A "noise floor" row scores a second DDIM-100 set from other seeds against the first: the distance two sets of the
same sampler already have at this sample size.

    python benchmarks/sampler_quality.py --data_dir ../shared/data --num-volumes 8 --output /tmp/sampler_quality.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# (label, scheduler name of meddiffusers.schedulers.SCHEDULERS, steps; None = every training step)
SAMPLERS = [
    ("DDIM-100 (original)", "ddim", 100),
    ("DPM-Solver++ 10", "dpm++", 10),
    ("DPM-Solver++ 25", "dpm++", 25),
    ("DPM-Solver++ 50", "dpm++", 50),
    ("UniPC 10", "unipc", 10),
    ("UniPC 25", "unipc", 25),
    ("UniPC 50", "unipc", 50),
    ("DDPM-1000", "ddpm", None),  # last: the longest
]
MS_SSIM = {"weights": (0.0448, 0.2856, 0.3001), "kernel_size": 7}  # 3 scales: sides >= 28 (the demo is 32 x 64 x 64)


def training_volumes(data_dir: str) -> dict[str, torch.Tensor]:
    """The demo's training volumes as the model saw them: RAS+, resampled, centred in 32 x 64 x 64, in [-1, 1]."""
    from meddiffusers.io import PercentileScaling

    script = os.path.join(REPO, "examples", "demo", "build_demo_model.py")
    spec = importlib.util.spec_from_file_location("build_demo_model", script)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    volumes = {}
    for region, (name, spacing) in build.SOURCES.items():
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} not found: pass --data_dir with the demo's source volumes.")
        volumes[region] = PercentileScaling()(build.canonical_demo_volume(path, spacing))
    return volumes


def score(real: torch.Tensor, fake: torch.Tensor, extractor, kid_seed: int = 0) -> dict:
    """FID, KID and Gaussian MMD (biased) between two `(N, 1, D, H, W)` sets on `extractor`'s features."""
    from meddiffusers.evaluation import frechet_distance, kernel_inception_distance, maximum_mean_discrepancy

    a, b = extractor(real), extractor(fake)
    kid, kid_std = kernel_inception_distance(a, b, num_subsets=100, seed=kid_seed)
    mmd = maximum_mean_discrepancy(a, b, unbiased=False)
    return {"fid": frechet_distance(a, b), "kid": kid, "kid_std": kid_std, "mmd": mmd}


def mean_pairwise_ms_ssim(volumes: torch.Tensor) -> float:
    """Mean MS-SSIM over all pairs of a `(N, 1, D, H, W)` set (data range 2)."""
    from meddiffusers.evaluation import ms_ssim_3d

    values = [
        float(ms_ssim_3d(volumes[i : i + 1], volumes[j : j + 1], data_range=2.0, **MS_SSIM))
        for i in range(len(volumes))
        for j in range(i + 1, len(volumes))
    ]
    return sum(values) / len(values)


def ms_ssim_to(volumes: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean MS-SSIM of each volume of a set with one reference volume."""
    from meddiffusers.evaluation import ms_ssim_3d

    return float(ms_ssim_3d(volumes, reference.expand_as(volumes), data_range=2.0, **MS_SSIM))


def main() -> None:
    """Generate, score and print one Markdown row per sampler."""
    from meddiffusers import MedDiffusionPipeline
    from meddiffusers.demo import demo_model_path
    from meddiffusers.evaluation import RandomFeatureExtractor
    from meddiffusers.schedulers import scheduler_from_name

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "data"))
    parser.add_argument("--num-volumes", type=int, default=8, help="Volumes per region and sampler (>= 2).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU).")
    parser.add_argument("--samplers", nargs="+", default=None, help="Labels to run (default: all).")
    parser.add_argument("--output", default=None, help="Also write the rows as JSON here.")
    args = parser.parse_args()
    if args.num_volumes < 2:
        raise SystemExit("--num-volumes must be at least 2 (FID, KID and diversity need pairs).")
    torch.set_num_threads(args.threads)

    real_by_region = training_volumes(args.data_dir)
    pipe = MedDiffusionPipeline.from_pretrained(demo_model_path())
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler.config
    regions = list(real_by_region)
    real = torch.cat([real_by_region[r] for r in regions])
    extractor = RandomFeatureExtractor(seed=0)
    n = args.num_volumes
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); {n} volumes per region; regions {', '.join(regions)}",
        flush=True,
    )

    def generate(name, steps, seed_offset):
        pipe.scheduler = scheduler_from_name(name, base)
        steps = steps or pipe.scheduler.config.num_train_timesteps
        sets, seconds = {}, 0.0
        for index, region in enumerate(regions):
            generators = [torch.Generator().manual_seed(seed_offset + 1000 * index + i) for i in range(n)]
            start = time.perf_counter()
            out = pipe(
                region, num_inference_steps=steps, generator=generators, num_volumes_per_region=n, output_type="pt"
            )
            seconds += time.perf_counter() - start
            sets[region] = out.volumes.float().clamp(-1, 1)
        return sets, steps, seconds / (n * len(regions))

    def pair(values):
        return " / ".join(f"{values[r]:.3f}" for r in regions)

    rows = []
    header = (
        "| sampler | steps | FID | KID (± std) | MMD | MS-SSIM between samples (MR / CT) | "
        "MS-SSIM to training volume (MR / CT) | s / volume |"
    )
    print(header + "\n| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    ddim_sets = None
    for label, name, steps in SAMPLERS:
        if args.samplers and label not in args.samplers:
            continue
        sets, steps, per_volume = generate(name, steps, 0)
        if name == "ddim":
            ddim_sets = sets
        fake = torch.cat([sets[r] for r in regions])
        row = {"sampler": label, "steps": steps, "seconds_per_volume": per_volume, **score(real, fake, extractor)}
        row["diversity"] = {r: mean_pairwise_ms_ssim(sets[r]) for r in regions}
        row["to_training"] = {r: ms_ssim_to(sets[r], real_by_region[r]) for r in regions}
        rows.append(row)
        print(
            f"| {label} | {steps} | {row['fid']:.4f} | {row['kid']:.4f} ± {row['kid_std']:.4f} | {row['mmd']:.4f} | "
            f"{pair(row['diversity'])} | {pair(row['to_training'])} | {per_volume:.2f} |",
            flush=True,
        )
    if ddim_sets is not None:
        other, _, _ = generate("ddim", 100, 500)
        a, b = torch.cat([ddim_sets[r] for r in regions]), torch.cat([other[r] for r in regions])
        floor = score(a, b, extractor)
        rows.append({"sampler": "noise floor: DDIM-100 vs DDIM-100 (other seeds)", **floor})
        print(
            f"| noise floor: DDIM-100 vs DDIM-100, other seeds | 100 | {floor['fid']:.4f} | "
            f"{floor['kid']:.4f} ± {floor['kid_std']:.4f} | {floor['mmd']:.4f} | | | |",
            flush=True,
        )
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"num_volumes_per_region": n, "extractor": extractor.describe(), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
