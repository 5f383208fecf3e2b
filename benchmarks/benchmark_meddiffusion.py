"""Speed and peak memory of BiFlowNet3DModel and MedDiffusionPipeline (released 8x configuration, random weights).

Modes, each in a fresh process:
  forward   one BiFlowNet forward pass on a latent of side N (batch 1; mean of 3 after a warm-up)
  step      one sampling step (forward + MedDiffusionDDIMScheduler.step; mean of 3 after a warm-up)
  generate  a whole generation: --steps DDIM steps on a latent of side N, then the joint (or tiled) decode

    python benchmarks/benchmark_meddiffusion.py --latent-sizes 16 32 --modes forward step
    python benchmarks/benchmark_meddiffusion.py --latent-sizes 16 --modes generate --steps 10
    python benchmarks/benchmark_meddiffusion.py --latent-sizes 32 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import platform

from measure import peak_memory_gib, reset_peak_memory, run_worker, timed


def measure(mode: str, latent: int, steps: int, device: str, dtype: str) -> dict:
    """Time one forward, one step or one generation and return the row to print."""
    import torch

    from meddiffusers import BiFlowNet3DModel, MedDiffusionDDIMScheduler, MedDiffusionPipeline, VQModel3D

    torch.manual_seed(0)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    unet = BiFlowNet3DModel().to(device).eval()
    if torch_dtype != torch.float32:
        unet = unet.to(torch_dtype)
    sample = torch.randn(1, 8, latent, latent, latent, device=device, dtype=torch_dtype)
    labels = torch.tensor([3], device=device)
    scheduler = MedDiffusionDDIMScheduler()
    scheduler.set_timesteps(100)
    with torch.no_grad():
        if mode == "forward":
            run = lambda: unet(sample, 999, labels).sample  # noqa: E731
        elif mode == "step":
            run = lambda: scheduler.step(unet(sample, 999, labels).sample, 999, sample).prev_sample  # noqa: E731
        else:
            vqvae = VQModel3D().to(device).eval()
            pipe = MedDiffusionPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).to(device)
            pipe.set_progress_bar_config(disable=True)
            size = (latent * vqvae.downsample_factor,) * 3
            run = lambda: pipe("MRBrain", num_inference_steps=steps, volume_size=size, output_type="pt")  # noqa: E731
        repeats = 1 if mode == "generate" else 3
        if repeats > 1:
            run()  # warm-up: first-call allocations and kernel selection are not what a sampling loop pays
        reset_peak_memory(device)
        seconds = sum(timed(run, device)[0] for _ in range(repeats)) / repeats
    peak_gib = round(peak_memory_gib(device), 2)
    return {"mode": mode, "latent": latent, "seconds": round(seconds, 2), "peak_gib": peak_gib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent-sizes", type=int, nargs="+", default=[16, 32], help="Cubic latent sides.")
    parser.add_argument("--modes", nargs="+", default=["forward", "step"], choices=["forward", "step", "generate"])
    parser.add_argument("--steps", type=int, default=10, help="Denoising steps for `generate`.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(measure(args.modes[0], args.latent_sizes[0], args.steps, args.device, args.dtype)))
        return

    import torch

    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.device}, {args.dtype}")
    print("| mode | latent | volume (8x) | seconds | peak memory (GiB) |")
    print("| --- | --- | --- | --- | --- |")
    for latent in args.latent_sizes:
        for mode in args.modes:
            arguments = ["--latent-sizes", str(latent), "--modes", mode, "--steps", str(args.steps)]
            row = run_worker(__file__, [*arguments, "--device", args.device, "--dtype", args.dtype])
            label = f"generate ({args.steps} DDIM steps + decode)" if mode == "generate" else mode
            if isinstance(row, str):
                print(f"| {label} | {latent}³ | {latent * 8}³ | failed: {row} | |", flush=True)
                continue
            print(f"| {label} | {latent}³ | {latent * 8}³ | {row['seconds']} | {row['peak_gib']} |", flush=True)


if __name__ == "__main__":
    main()
