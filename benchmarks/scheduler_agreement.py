"""How close each scheduler's sample comes to the original DDIM sampler at 100 steps, and how long it takes.

Every scheduler is built the way a user builds it, `X.from_config(pipe.scheduler.config)`, starts from the same
initial noise as the reference, and its decoded volume is compared with the reference volume (Pearson correlation
over all voxels). Deterministic solvers should agree closely; stochastic ones (DDPM, ancestral samplers, DDIM with
`eta=1`) draw fresh noise at every step and only need to stay in distribution.

    python benchmarks/scheduler_agreement.py                      # bundled demo model, MRBrain, seeds 0 and 1
    python benchmarks/scheduler_agreement.py --model PATH --region CTChest --steps 10 25 50
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

SCHEDULERS = [
    ("MedDiffusionDDIMScheduler", {}),
    ("MedDiffusionDDIMScheduler", {"eta": 1.0}),
    ("DDPMScheduler", {}),
    ("DDIMScheduler", {}),
    ("PNDMScheduler", {}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverSinglestepScheduler", {}),
    ("UniPCMultistepScheduler", {}),
    ("DEISMultistepScheduler", {}),
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", {}),
    ("KDPM2AncestralDiscreteScheduler", {}),
]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two volumes over all voxels."""
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def main() -> None:
    """Print one row per scheduler and step count."""
    import diffusers

    import meddiffusers
    from meddiffusers import MedDiffusionPipeline
    from meddiffusers.demo import demo_model_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Pipeline folder or Hub id (default: the bundled demo).")
    parser.add_argument("--region", default="MRBrain")
    parser.add_argument("--steps", type=int, nargs="+", default=[25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()

    pipe = MedDiffusionPipeline.from_pretrained(args.model or demo_model_path())
    pipe.set_progress_bar_config(disable=True)
    default = pipe.scheduler
    shape = (1, pipe.unet.config.in_channels, *pipe.latent_size(pipe.get_region(args.region).volume_size))
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("scheduler | eta | steps | correlation with DDIM-100 (per seed) | |x| > 1.1 | seconds")
    for seed in args.seeds:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        pipe.scheduler = default
        reference = pipe(args.region, num_inference_steps=100, latents=noise).volumes
        for name, kwargs in SCHEDULERS:
            cls = getattr(diffusers, name, None) or getattr(meddiffusers, name)
            try:
                pipe.scheduler = cls.from_config(default.config)
            except ImportError as error:  # LMS needs scipy
                print(f"{name} | - | - | skipped: {error} | |")
                continue
            for steps in args.steps:
                start = time.perf_counter()
                volume = pipe(
                    args.region,
                    num_inference_steps=steps,
                    latents=noise,
                    generator=torch.Generator().manual_seed(seed + 100),
                    **kwargs,
                ).volumes
                seconds = time.perf_counter() - start
                outside = float(np.mean(np.abs(volume) > 1.1))
                eta = kwargs.get("eta", "")
                print(
                    f"{name} | {eta} | {steps} | seed {seed}: {correlation(volume, reference):.3f} | "
                    f"{outside:.4f} | {seconds:.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
