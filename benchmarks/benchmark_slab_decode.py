"""Exact slab decoding against the full decode: time, time per voxel, peak memory, and the difference.

The autoencoder is the released 8x Patch-Volume configuration (built by the checkpoint converter from the original
`cfg`), with random weights perturbed so that every GroupNorm and bias takes part. Every measurement runs in a fresh
subprocess so the peak resident memory it reports (`ru_maxrss`, weights included) is its own. `compare` runs both
decodes in one process and prints the largest absolute difference (only where the full decode fits in memory).

    python benchmarks/benchmark_slab_decode.py --sizes 128 --modes full slab --repeats 3
    python benchmarks/benchmark_slab_decode.py --sizes 128 192 --modes compare
    python benchmarks/benchmark_slab_decode.py --sizes 256 512 --modes slab --memory-budget 4 12
    python benchmarks/benchmark_slab_decode.py --sizes 128 --modes encode_previous encode --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform

from measure import peak_memory_gib, run_worker, timed

RELEASED_8X_CFG = {
    "model": {"n_hiddens": 48, "downsample": [8, 8, 8], "embedding_dim": 8, "n_codes": 8192, "num_groups": 24},
    "dataset": {"image_channels": 1, "patch_size": 64},
}


def build_model():
    """The released 8x `VQModel3D` with seeded, perturbed random weights."""
    import torch

    from meddiffusers import VQModel3D
    from meddiffusers.loaders.original_patch_volume import config_from_original

    torch.manual_seed(0)
    model = VQModel3D(**config_from_original(RELEASED_8X_CFG)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def previous_inference_forward(stack, sample):
    """The encoder/decoder loop before the lean inference path (kept here to measure the memory it saved)."""
    hidden_states = stack.conv_in(sample)
    for block in stack.ordered_blocks():
        hidden_states = block(hidden_states)
    import torch.nn.functional as F

    return stack.conv_out(F.silu(stack.norm_out(hidden_states)))


def measure(size: int, mode: str, budget: float, slab: int | None, threads: int) -> dict:
    """One decode (or encode) of a `size`³ volume in this process: seconds, seconds per voxel and peak memory."""
    import torch

    torch.set_num_threads(threads)
    model = build_model()
    generator = torch.Generator().manual_seed(1)
    side = size // model.downsample_factor
    latents = torch.randn(1, model.config.latent_channels, side, side, side, generator=generator)
    row = {"size": size, "mode": mode, "threads": threads}
    with torch.no_grad():
        if mode == "encode_previous":
            from meddiffusers.models.autoencoders.patch_volume import _BlockStack

            _BlockStack._inference_forward = previous_inference_forward
        if mode.startswith("encode"):
            volume = torch.rand(1, 1, size, size, size, generator=generator) * 2 - 1
            seconds, _ = timed(lambda: model.encode(volume).latents, "cpu")
        elif mode == "compare":
            full = model.decode(latents).sample
            model.enable_slab_decoding(slab_latent_size=slab, memory_budget=budget)
            seconds, sliced = timed(lambda: model.decode(latents).sample, "cpu")
            row["max_abs_difference"] = float((sliced - full).abs().max())
            row["full_max_abs"] = float(full.abs().max())
        else:
            if mode == "slab":
                model.enable_slab_decoding(slab_latent_size=slab, memory_budget=budget)
            elif mode == "tiled":
                model.enable_tiling()
            seconds, _ = timed(lambda: model.decode(latents).sample, "cpu")
            if mode == "slab":
                plan = model.slab_plan
                row["slab_latent_size"] = plan["slab_latent_size"]
                row["kept_tensors"] = len(plan["kept"])
                row["budget_gib"] = budget
    row["seconds"] = round(seconds, 2)
    row["microseconds_per_voxel"] = round(seconds / size**3 * 1e6, 3)
    row["peak_rss_gib"] = round(peak_memory_gib("cpu"), 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128], help="Cubic output sides in voxels.")
    parser.add_argument(
        "--modes", nargs="+", default=["full", "slab"], help="full, slab, tiled, compare, encode or encode_previous."
    )
    parser.add_argument(
        "--memory-budget", type=float, nargs="+", default=[4.0], help="GiB for slab decoding, one per size or one."
    )
    parser.add_argument("--slab-latent-size", type=int, default=None, help="Slab thickness in latent slices.")
    parser.add_argument("--repeats", type=int, default=1, help="Fresh processes per configuration (modes alternate).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    budgets = args.memory_budget * len(args.sizes) if len(args.memory_budget) == 1 else args.memory_budget

    if args.worker:
        row = measure(args.sizes[0], args.modes[0], budgets[0], args.slab_latent_size, args.threads)
        print(json.dumps(row))
        return

    import torch

    print(f"# {platform.machine()}, {args.threads} threads, torch {torch.__version__}, fp32, 8x released config")
    print("| volume | mode | seconds (median) | µs / voxel | peak RSS (GiB) | notes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size, budget in zip(args.sizes, budgets):
        rows = {mode: [] for mode in args.modes}
        for _ in range(args.repeats):
            for mode in args.modes:  # alternate the modes, the machine is shared
                arguments = ["--sizes", str(size), "--modes", mode, "--memory-budget", str(budget)]
                arguments += ["--threads", str(args.threads)]
                if args.slab_latent_size is not None:
                    arguments += ["--slab-latent-size", str(args.slab_latent_size)]
                row = run_worker(__file__, arguments)
                print(f"# {json.dumps(row) if isinstance(row, dict) else row}", flush=True)
                if isinstance(row, dict):
                    rows[mode].append(row)
        for mode, done in rows.items():
            if not done:
                print(f"| {size}³ | {mode} | failed | | | |", flush=True)
                continue
            done.sort(key=lambda r: r["seconds"])
            median = done[len(done) // 2]
            notes = ""
            if "max_abs_difference" in median:
                difference, scale = median["max_abs_difference"], median["full_max_abs"]
                notes = f"max abs difference {difference:.2e} (output max {scale:.2f})"
            elif mode == "slab":
                notes = f"budget {budget} GiB, slab {median['slab_latent_size']} latent slices"
            peak = max(r["peak_rss_gib"] for r in done)
            print(
                f"| {size}³ | {mode} | {median['seconds']} | {median['microseconds_per_voxel']} | {peak} | {notes} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
