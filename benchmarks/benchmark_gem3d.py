"""Speed and peak memory of GEM3DVolumePipeline (random weights): one window step, and whole volumes against S.

Configurations (random weights; the U-Net is the stage-2 pseudo-3D model):
  tiny  the parity fixture's sizes: channels (32, 32), 1 block per level, 8 x 8 latents (16 x 16 images)
  mid   channels (64, 128, 192, 256), 1 block per level, attention on levels 1-3, 32 x 32 latents (256 x 256)
        (the released model is (224, 448, 672, 896), 2 blocks, 64 x 64 latents)

Modes, each in a fresh process:
  step    one window step: the U-Net on one 16-slice window + DDIMScheduler.step (mean of 3 after a warm-up)
  volume  a whole volume of S slices from mask latents (exact geometry, --steps DDIM steps per window, latents out)

    python benchmarks/benchmark_gem3d.py --configs tiny mid --modes step
    python benchmarks/benchmark_gem3d.py --configs tiny mid --modes volume --slices 16 32 64 --steps 10
"""

from __future__ import annotations

import argparse
import json
import platform

from measure import peak_memory_gib, reset_peak_memory, run_worker, timed

CONFIGS = {
    "tiny": dict(unet=dict(block_out_channels=(32, 32), layers_per_block=1, attention_levels=(False, True),
                           attention_head_dim=8), latent=8),
    "mid": dict(unet=dict(block_out_channels=(64, 128, 192, 256), layers_per_block=1,
                          attention_levels=(False, True, True, True), attention_head_dim=32), latent=32),
}  # fmt: skip


def build(config: str, device: str):
    """A random-weight pipeline of the given configuration (the VAE is unused with mask latents)."""
    import torch
    from diffusers import AutoencoderKL

    from meddiffusers import GEM3DUNetModel, GEM3DVolumePipeline, gem3d_ddim_scheduler

    torch.manual_seed(0)
    unet = GEM3DUNetModel(**CONFIGS[config]["unet"]).eval()
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8)
    pipe = GEM3DVolumePipeline(vae=vae, unet=unet, scheduler=gem3d_ddim_scheduler()).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(mode: str, config: str, slices: int, steps: int, device: str) -> dict:
    """Time one window step or one whole volume and return the row to print."""
    import torch

    pipe = build(config, device)
    latent = CONFIGS[config]["latent"]
    with torch.no_grad():
        if mode == "step":
            sample = torch.randn(1, 12, 16, latent, latent, device=device)
            pipe.scheduler.set_timesteps(200)
            t = pipe.scheduler.timesteps[0]

            def run():
                eps = pipe.unet(sample, t).sample
                return pipe.scheduler.step(eps, t, sample[:, :4], eta=1.0).prev_sample

            run()  # warm-up
            reset_peak_memory(device)
            seconds = sum(timed(run, device)[0] for _ in range(3)) / 3
            windows = 1
        else:
            masks = torch.randn(1, 4, slices, latent, latent, device=device)
            informed = torch.randn(1, 4, latent, latent, device=device)
            generator = torch.Generator(device).manual_seed(0)

            def run():
                return pipe(
                    mask_latents=masks, informed_latents=informed, start_slice=slices // 2,
                    num_inference_steps=steps, generator=generator, output_type="latent",
                )  # fmt: skip

            reset_peak_memory(device)
            seconds, _ = timed(run, device)
            from meddiffusers.pipelines.gem3d import plan_windows

            windows = len(plan_windows(slices, slices // 2))
    return {"seconds": round(seconds, 3), "peak_gib": round(peak_memory_gib(device), 2), "windows": windows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=sorted(CONFIGS))
    parser.add_argument("--modes", nargs="+", default=["step", "volume"], choices=["step", "volume"])
    parser.add_argument("--slices", type=int, nargs="+", default=[16, 32, 64], help="Volume lengths S.")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per window for `volume`.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(measure(args.modes[0], args.configs[0], args.slices[0], args.steps, args.device)))
        return

    import torch

    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.device}")
    print("| config | mode | slices | windows | seconds | s / window step | peak memory (GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for config in args.configs:
        for mode in args.modes:
            for slices in [16] if mode == "step" else args.slices:
                arguments = ["--configs", config, "--modes", mode, "--slices", str(slices), "--steps", str(args.steps)]
                row = run_worker(__file__, [*arguments, "--device", args.device])
                label = "window step" if mode == "step" else f"volume ({args.steps} steps / window)"
                if isinstance(row, str):
                    print(f"| {config} | {label} | {slices} | | failed: {row} | | |", flush=True)
                    continue
                per_step = row["seconds"] / (1 if mode == "step" else row["windows"] * args.steps)
                print(
                    f"| {config} | {label} | {slices} | {row['windows']} | {row['seconds']} | {per_step:.3f} | "
                    f"{row['peak_gib']} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
