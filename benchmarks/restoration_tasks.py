"""Measure `DiffPIRPipeline` on restoration tasks of real volumes with the bundled demo priors.

    OMP_NUM_THREADS=1 python benchmarks/restoration_tasks.py --data_dir ../shared/data [--tasks ct_denoise mri_4x]

Each task degrades a real volume with a [`LinearOperator`], restores it with DiffPIR and prints PSNR / SSIM (3D,
Gaussian window sigma 1.5, intensities on `[0, 1]`) of the restoration and of the usual baseline (the noisy volume,
trilinear interpolation, FBP, zero-filled inverse FFT, mean fill) against the ground truth.

Priors: CT tasks use the bundled MedDiff-FM demo (`meddiff-fm-demo`, a pixel-space patch U-Net trained on one chest
CT at 8 mm voxels, HU window [-1400, 400], 16³ windows); MRI tasks use the bundled MedDiffusion demo
(`meddiffusion-demo`, latent, trained on one T1 head slab at 8 x 4 x 4 mm). Both demos have seen the very volume
they restore here, so the numbers show that the recipes run end to end on real data, not what a real prior achieves.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import torch
import torch.nn.functional as F

from meddiffusers import (
    AveragePoolOperator,
    DiffPIRPipeline,
    HUWindow,
    IdentityOperator,
    IntensityMap,
    MaskOperator,
    MedDiffusionPipeline,
    PatchSlidingWindowPipeline,
    PercentileScaling,
    RayTransform,
    UndersampledMRI,
)
from meddiffusers.demo import demo_model_path, patch_demo_model_path
from meddiffusers.evaluation import psnr, ssim_3d
from meddiffusers.operators import cartesian_mask
from meddiffusers.training.data import VolumePreprocessor
from meddiffusers.utils.volume import resample_to_spacing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CT_FILE, MRI_FILE = "ct_chest_pyradiomics_lung1.nii.gz", "mr_t1_itk_kmeanstest.nii.gz"


# ---------------------------------------------------------------------------------------------------- metrics


def scores(model_space: torch.Tensor, truth: torch.Tensor) -> dict:
    """PSNR / SSIM (`meddiffusers.evaluation.psnr` / `ssim_3d`: 11-voxel Gaussian window, sigma 1.5, valid
    windows) of a model-space `[-1, 1]` volume against the model-space truth, both mapped to `[0, 1]`."""
    estimate = (model_space.float().clamp(-1, 1) + 1) / 2
    reference = (truth.float().clamp(-1, 1) + 1) / 2
    return {
        "psnr": round(float(psnr(estimate, reference, data_range=1.0)), 2),
        "ssim": round(float(ssim_3d(estimate, reference, data_range=1.0)), 4),
    }


# ---------------------------------------------------------------------------------------------------- data


def ct_volume(data_dir: str, depth: int) -> torch.Tensor:
    """The chest CT as the MedDiff-FM demo was trained on it (RAS+, 8 mm voxels), in HU, `depth` central slices."""
    volume = VolumePreprocessor().load(os.path.join(data_dir, CT_FILE))
    hu = resample_to_spacing(volume.tensor.float(), volume.spacing, (8.0, 8.0, 8.0), mode="trilinear")
    start = (hu.shape[2] - depth) // 2
    return hu[:, :, start : start + depth]


def mri_volume(data_dir: str) -> torch.Tensor:
    """The T1 head slab as the MedDiffusion demo was trained on it (RAS+, 8 x 4 x 4 mm, 32 x 64 x 64), raw values."""
    path = os.path.join(ROOT, "examples", "demo", "build_demo_model.py")
    spec = importlib.util.spec_from_file_location("build_demo_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.canonical_demo_volume(os.path.join(data_dir, MRI_FILE), (8.0, 4.0, 4.0))


def gaussian(shape, std: float, seed: int, complex_valued: bool = False) -> torch.Tensor:
    """Measurement noise (complex with `std` per real and imaginary part when asked)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=generator) * std
    if complex_valued:
        noise = torch.complex(noise, torch.randn(shape, generator=generator) * std)
    return noise


# ---------------------------------------------------------------------------------------------------- tasks
# Each task: truth (model space), measurement, operator, intensity map, baseline (model space), DiffPIR arguments.


def ct_task(name: str, data_dir: str, fm: PatchSlidingWindowPipeline, seed: int) -> dict:
    """One CT task on the demo chest (HU data space through the prior's window, or attenuation for sparse view)."""
    window = fm.hu_window("Chest")  # [-1400, 400] HU <-> [-1, 1]
    width = window.max_hu - window.min_hu
    depth = 30 if name == "ct_sr_5x" else 28
    extra_scores = {}
    hu = ct_volume(data_dir, depth).clamp(window.min_hu, window.max_hu)
    truth = window(hu)
    if name == "ct_denoise":
        # MedDiff-FM's low-dose setting: sigma_n = 0.15 of the [-160, 240] HU window = 60 HU.
        noise_hu = 0.15 * 400.0
        operator, intensity_map = IdentityOperator(), window
        measurement = hu + gaussian(hu.shape, noise_hu, seed)
        baseline, baseline_name = window(measurement), "noisy input"
        arguments = dict(noise_level=noise_hu / width, lambda_=10.0, zeta=0.3)
        soft_tissue = HUWindow(-160.0, 240.0)
        extra_scores = {"soft_tissue_window": lambda model: soft_tissue(window.inverse(model))}
    elif name in ("ct_sr_4x", "ct_sr_5x"):
        factor = 4 if name == "ct_sr_4x" else 5
        operator, intensity_map = AveragePoolOperator(factor, axes=(0,)), window
        measurement = operator(hu)
        upsampled = F.interpolate(measurement, size=hu.shape[2:], mode="trilinear", align_corners=False)
        baseline, baseline_name = window(upsampled), "trilinear"
        arguments = dict(noise_level=0.01, lambda_=7.0, zeta=0.3)
    elif name == "ct_sparse_view":
        # Attenuation relative to water (air 0, water 1): the window [-1400, 400] HU is [-0.4, 1.4].
        intensity_map = IntensityMap(window.min_hu / 1000 + 1, window.max_hu / 1000 + 1)
        operator = RayTransform(tuple(hu.shape[3:]), num_views=24, geometry="parallel", cg_iterations=10)
        mu = hu / 1000 + 1
        measurement = operator(mu)
        baseline, baseline_name = intensity_map.to_model(operator.fbp(measurement)), "FBP"
        arguments = dict(noise_level=0.01, lambda_=7.0, zeta=0.3)
    elif name == "ct_inpaint":
        mask = torch.ones_like(hu)
        d, h, w = hu.shape[2:]
        mask[:, :, d // 2 - 4 : d // 2 + 4, h // 2 - 6 : h // 2 + 6, w // 2 - 10 : w // 2 + 2] = 0  # a 8 x 12 x 12 box
        operator, intensity_map = MaskOperator(mask), window
        measurement = operator(hu)
        fill = hu[mask.bool()].mean()
        baseline, baseline_name = window(torch.where(mask.bool(), hu, fill)), "mean fill"
        arguments = dict(noise_level=0.0, lambda_=1.0, zeta=1.0)  # the original's inpainting settings
    else:
        raise ValueError(f"Unknown CT task {name!r}.")
    return dict(
        truth=truth, measurement=measurement, operator=operator, intensity_map=intensity_map, baseline=baseline,
        baseline_name=baseline_name, arguments=arguments, extra_scores=extra_scores,
    )  # fmt: skip


def mri_task(name: str, data_dir: str, seed: int) -> dict:
    """Cartesian undersampling of the demo T1 slab (lines along W, fastMRI centre fractions), raw intensities."""
    raw = mri_volume(data_dir)
    scaled, (low, high) = PercentileScaling()(raw, return_range=True)
    intensity_map = IntensityMap(low, high)
    data = intensity_map.to_data(scaled)  # raw values clipped to the percentile range
    acceleration, centre = {"mri_4x": (4, 0.08), "mri_8x": (8, 0.04)}[name]
    operator = UndersampledMRI(cartesian_mask(data.shape[-1], acceleration, center_fraction=centre, seed=seed))
    measurement = operator(data)  # noiseless
    baseline = intensity_map.to_model(operator.zero_filled(measurement))
    return dict(
        truth=scaled, measurement=measurement, operator=operator, intensity_map=intensity_map, baseline=baseline,
        baseline_name="zero-filled", arguments=dict(noise_level=0.01, lambda_=7.0, zeta=0.3),
    )  # fmt: skip


CT_TASKS = ("ct_denoise", "ct_sr_4x", "ct_sr_5x", "ct_sparse_view", "ct_inpaint")
MRI_TASKS = ("mri_4x", "mri_8x")


def run_task(name: str, args, pipes: dict) -> dict:
    """Degrade, restore, score."""
    if name in CT_TASKS:
        task, pipe = ct_task(name, args.data_dir, pipes["fm"], args.seed), pipes["ct"]
        extra = dict(region="Chest", window_size=16, overlap=0.5, window_batch_size=16)
        prior = "meddiff-fm-demo (pixel, 16³ windows)"
    else:
        task, pipe = mri_task(name, args.data_dir, args.seed), pipes["mri"]
        extra = dict(region="MRBrainT1")
        prior = "meddiffusion-demo (latent)"
    started = time.perf_counter()
    restored = pipe(
        task["measurement"], task["operator"], num_inference_steps=args.steps, intensity_map=task["intensity_map"],
        generator=torch.Generator().manual_seed(args.seed), start_timestep=args.start_timestep, output_type="pt",
        **task["arguments"], **extra,
    ).volumes  # fmt: skip
    seconds = time.perf_counter() - started
    row = {
        "task": name,
        "prior": prior,
        "shape": list(task["truth"].shape[2:]),
        "steps": args.steps,
        "start_timestep": args.start_timestep,
        "arguments": task["arguments"],
        "baseline": task["baseline_name"],
        "baseline_scores": scores(task["baseline"], task["truth"]),
        "diffpir_scores": scores(restored, task["truth"]),
        "seconds": round(seconds, 1),
    }
    for label, remap in task.get("extra_scores", {}).items():  # the same volumes scored in another window
        row[f"{label}_scores"] = {
            "baseline": scores(remap(task["baseline"]), remap(task["truth"])),
            "diffpir": scores(remap(restored), remap(task["truth"])),
        }
    if name in MRI_TASKS:  # what the latent prior can reach at best: the autoencoder's reconstruction of the truth
        vqvae = pipe.vqvae
        with torch.no_grad():
            latents = vqvae.encode(task["truth"].clamp(-1, 1)).latents
            row["autoencoder_ceiling"] = scores(vqvae.decode(latents).sample, task["truth"])
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
    parser.add_argument("--tasks", nargs="+", default=[*CT_TASKS, *MRI_TASKS], choices=[*CT_TASKS, *MRI_TASKS])
    parser.add_argument("--steps", type=int, default=50, help="DiffPIR's iter_num (quad timesteps).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--start_timestep",
        type=int,
        default=None,
        help="DiffPIR's start noise level (default T - 1, as the original).",
    )
    parser.add_argument("--output", default=None, help="Write the rows as JSON here.")
    args = parser.parse_args()
    pipes = {}
    if any(name in CT_TASKS for name in args.tasks):
        pipes["fm"] = PatchSlidingWindowPipeline.from_pretrained(patch_demo_model_path())
        pipes["ct"] = DiffPIRPipeline.from_pipe(pipes["fm"])
    if any(name in MRI_TASKS for name in args.tasks):
        pipes["mri"] = DiffPIRPipeline.from_pipe(MedDiffusionPipeline.from_pretrained(demo_model_path()))
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    rows = []
    print("| task | prior | baseline | baseline PSNR / SSIM | DiffPIR PSNR / SSIM | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.tasks:
        row = run_task(name, args, pipes)
        rows.append(row)
        base, ours = row["baseline_scores"], row["diffpir_scores"]
        print(
            f"| {name} | {row['prior']} | {row['baseline']} | {base['psnr']} / {base['ssim']} | {ours['psnr']} / "
            f"{ours['ssim']} | {row['seconds']} |",
            flush=True,
        )
        if args.output:
            with open(args.output, "w") as handle:
                json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
