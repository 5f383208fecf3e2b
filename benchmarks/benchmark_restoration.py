"""Time per step and peak memory of DiffPIRPipeline (each kind of data step) and RePaint3DPipeline against volume
size, with the bundled demo priors.

Each row runs in a fresh process: a warm-up call, then one timed call; the time per step is the call's time over
its network calls (DiffPIR: `--steps` quad timesteps, one call each; RePaint: `--steps` respaced steps without
resampling, one call each), and the data step's own time is measured apart on the same volume. Peak memory is the
process's peak resident set (CPU) or PyTorch's peak allocation (GPU), model loading included.

- patch prior: `meddiff-fm-demo` (0.58 M parameters, 16³ windows at overlap 0.5) on cubic volumes (`--volumes`);
- latent prior: `meddiffusion-demo` (VQ autoencoder x4 + BiFlowNet) on the volumes of `--latent-volumes`
  (sides multiples of 32).

Rows (`--rows`): `denoise` (identity, closed form), `zsr` (thick slices x4 along D, closed form), `sparse-ct` (24
parallel views, 10 CG iterations), `sparse-ct-first-order` (one gradient step), `mri` (4x Cartesian, closed form),
`repaint` (inpainting a central box).

    OMP_NUM_THREADS=1 python benchmarks/benchmark_restoration.py [--volumes 16 32 48] [--latent-volumes 32]
"""

from __future__ import annotations

import argparse
import json
import platform

from measure import peak_memory_gib, reset_peak_memory, run_worker, timed

ROWS = ("denoise", "zsr", "sparse-ct", "sparse-ct-first-order", "mri", "repaint")
LATENT_ROWS = ("mri", "denoise", "repaint")


def measure(prior: str, volume: tuple[int, int, int], row: str, steps: int, device: str) -> dict:
    """Run one restoration (after a warm-up) and return the row to print."""
    import torch

    from meddiffusers import (
        AveragePoolOperator,
        DiffPIRPipeline,
        IdentityOperator,
        MedDiffusionPipeline,
        PatchSlidingWindowPipeline,
        RayTransform,
        RePaint3DPipeline,
        RePaintDDPMScheduler,
        UndersampledMRI,
    )
    from meddiffusers.demo import demo_model_path, patch_demo_model_path
    from meddiffusers.operators import cartesian_mask
    from meddiffusers.utils import window_locations

    patch = prior == "patch"
    source = (
        PatchSlidingWindowPipeline.from_pretrained(patch_demo_model_path())
        if patch
        else MedDiffusionPipeline.from_pretrained(demo_model_path())
    )
    region = "Chest" if patch else "MRBrainT1"
    extra = dict(region=region)
    if patch:
        extra.update(window_size=16, overlap=0.5, window_batch_size=16)
    truth = torch.rand((1, 1, *volume), generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    generator = torch.Generator().manual_seed(0)
    if row == "repaint":
        scheduler = RePaintDDPMScheduler.from_config(
            source.scheduler.config, timestep_spacing="linspace", thresholding=False
        )
        pipe = RePaint3DPipeline.from_pipe(source, scheduler=scheduler).to(device)
        mask = torch.ones_like(truth)
        d, h, w = volume
        mask[..., d // 4 : 3 * d // 4, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 0

        def run(n):
            return pipe(truth.to(device), mask.to(device), num_inference_steps=n, jump_length=1, jump_n_sample=1,
                        generator=generator, output_type="pt", **extra)  # fmt: skip

        data_step = None
        kind = "- (known region re-noised)"
    else:
        pipe = DiffPIRPipeline.from_pipe(source).to(device)
        method = "auto"
        if row == "denoise":
            operator = IdentityOperator()
        elif row == "zsr":
            operator = AveragePoolOperator(4, axes=(0,))
        elif row.startswith("sparse-ct"):
            operator = RayTransform(volume[1:], num_views=24, cg_iterations=10)
            method = "first_order" if row.endswith("first-order") else "cg"
        else:
            operator = UndersampledMRI(cartesian_mask(volume[2], 4, center_fraction=0.08, seed=0))
        measurement = operator(truth).to(device)

        def run(n):
            return pipe(measurement, operator, noise_level=0.01, num_inference_steps=n, data_step=method,
                        generator=generator, output_type="pt", **extra)  # fmt: skip

        def data_step():
            z = (0.5 * truth).to(device)  # away from the solution, so that CG runs all its iterations
            if method == "first_order":
                return operator.gradient_step(z, measurement, 1.0)
            if method == "cg":
                return operator.prox_l2_cg(z, measurement, 1.0)
            return operator.prox_l2(z, measurement, 1.0)

        kind = {"auto": "closed form", "cg": "CG (10 it.)", "first_order": "first order"}[method]
    pipe.set_progress_bar_config(disable=True)
    run(2)  # warm-up
    reset_peak_memory(device)
    seconds, _ = timed(lambda: run(steps), device)
    data_seconds = None
    if data_step is not None:
        data_step()
        data_seconds = min(timed(data_step, device)[0] for _ in range(3))
    windows = len(window_locations(volume, 16, 0.5)) if patch else None
    return {
        "windows": windows,
        "data_step": kind,
        "seconds_per_step": round(seconds / steps, 3),
        "data_step_ms": None if data_seconds is None else round(1000 * data_seconds, 2),
        "peak_gib": round(peak_memory_gib(device), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, nargs="+", default=[16, 32, 48], help="Cubic sides, patch prior.")
    parser.add_argument(
        "--latent-volumes", nargs="+", default=["32", "32x64x64"], help="Latent prior volumes: a side or DxHxW."
    )
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--steps", type=int, default=3, help="Network calls of the timed run (3).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--point", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        prior, d, h, w, row = args.point
        print(json.dumps(measure(prior, (int(d), int(h), int(w)), row, args.steps, args.device)))
        return

    import torch

    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.device}")
    print("| prior | volume | windows | pipeline | data step | s / step | data step alone (ms) | peak memory (GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    points = [("patch", (side,) * 3) for side in args.volumes]
    for text in args.latent_volumes:
        sides = [int(value) for value in text.split("x")]
        points.append(("latent", tuple(sides * 3 if len(sides) == 1 else sides)))
    for prior, volume in points:
        for row in args.rows:
            if prior == "latent" and row not in LATENT_ROWS:
                continue
            result = run_worker(__file__, ["--steps", str(args.steps), "--device", args.device, "--point", prior,
                                           *map(str, volume), row])  # fmt: skip
            name = "meddiff-fm-demo (pixel)" if prior == "patch" else "meddiffusion-demo (latent)"
            pipeline = "RePaint" if row == "repaint" else f"DiffPIR {row.replace('-first-order', '')}"
            head = f"| {name} | {' x '.join(map(str, volume))} |"
            if isinstance(result, str):
                print(f"{head} | {pipeline} | failed: {result} | | | |", flush=True)
                continue
            data = "-" if result["data_step_ms"] is None else result["data_step_ms"]
            print(
                f"{head} {result['windows'] or '-'} | {pipeline} | {result['data_step']} | "
                f"{result['seconds_per_step']} | {data} | {result['peak_gib']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
