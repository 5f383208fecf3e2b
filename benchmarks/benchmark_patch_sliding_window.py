"""Time per sampling step and peak memory of PatchSlidingWindowPipeline against window size, overlap and volume size.

Each row runs in a fresh process: one pipeline call of `--steps` DDIM steps (after a one-step warm-up) on a random-
weight PatchUNet3DModel; the time per step is the call's time divided by the steps. The cost of a step should grow
with the number of windows and nothing else (the blend is a weighted sum on the volume).

    python benchmarks/benchmark_patch_sliding_window.py                      # small model, CPU-sized grid
    python benchmarks/benchmark_patch_sliding_window.py --model paper --windows 128 --volumes 128 192 256 \
        --overlaps 0.25 0.5 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform

from measure import peak_memory_gib, reset_peak_memory, run_worker, timed

MODELS = {
    # MedDiff-FM's widths (base 32, a spatial transformer at the 16³ level of a 128³ window): 15 M parameters.
    "paper": dict(block_out_channels=(32, 64, 128, 128), attention_levels=(False, False, False, True)),
    # A CPU-sized model of the same shape (2.3 M parameters).
    "small": dict(block_out_channels=(16, 32, 64), attention_levels=(False, False, True), norm_num_groups=8),
}


def measure(model: str, volume: int, window: int, overlap: float, blend: str, steps: int, batch: int, device: str):
    """Run one generation and return the row to print."""
    import torch
    from diffusers import DDIMScheduler

    from meddiffusers import PatchSlidingWindowPipeline, PatchUNet3DModel
    from meddiffusers.utils import window_locations

    torch.manual_seed(0)
    unet = PatchUNet3DModel(**MODELS[model]).to(device).eval()
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True)
    pipe = PatchSlidingWindowPipeline(unet, scheduler, window_size=window).to(device)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(volume_size=(volume,) * 3, overlap=overlap, blend=blend, window_batch_size=batch, output_type="pt")
    pipe("Chest", num_inference_steps=1, **kwargs)  # warm-up
    reset_peak_memory(device)
    seconds, _ = timed(lambda: pipe("Chest", num_inference_steps=steps, **kwargs), device)
    windows = len(window_locations((volume,) * 3, window, overlap))
    return {
        "windows": windows,
        "seconds_per_step": round(seconds / steps, 3),
        "seconds_per_window": round(seconds / steps / windows, 4),
        "peak_gib": round(peak_memory_gib(device), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--volumes", type=int, nargs="+", default=[32, 48, 64], help="Cubic volume sides.")
    parser.add_argument("--windows", type=int, nargs="+", default=[32], help="Cubic window sides.")
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--blend", choices=["constant", "gaussian"], default="constant")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--window-batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--point", nargs=3, type=float, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        volume, window, overlap = int(args.point[0]), int(args.point[1]), args.point[2]
        row = measure(args.model, volume, window, overlap, args.blend, args.steps, args.window_batch_size, args.device)
        print(json.dumps(row))
        return

    import torch

    machine = platform.processor() or platform.machine()
    print(
        f"# {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.device}, model {args.model}"
    )
    print("| volume | window | overlap | windows | s / step | s / step / window | peak memory (GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    common = ["--model", args.model, "--blend", args.blend, "--steps", str(args.steps), "--device", args.device]
    common += ["--window-batch-size", str(args.window_batch_size)]
    for window in args.windows:
        for volume in args.volumes:
            for overlap in args.overlaps:
                row = run_worker(__file__, [*common, "--point", str(volume), str(window), str(overlap)])
                head = f"| {volume}³ | {window}³ | {overlap} |"
                if isinstance(row, str):
                    print(f"{head} failed: {row} | | | |", flush=True)
                    continue
                print(
                    f"{head} {row['windows']} | {row['seconds_per_step']} | {row['seconds_per_window']} | "
                    f"{row['peak_gib']} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
