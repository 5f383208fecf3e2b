"""Encode / decode speed and peak memory of `VQModel3D` (released 8x or 4x configuration, random weights).

Each measurement runs in a fresh subprocess so that the peak memory it reports is its own: peak resident memory on
CPU, `torch.cuda.max_memory_allocated` on GPU.

    python benchmarks/benchmark_vq_model_3d.py --sizes 128 256 --config 8x
    python benchmarks/benchmark_vq_model_3d.py --sizes 256 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import platform

from measure import peak_memory_gib, reset_peak_memory, run_worker, timed

RELEASED = {"8x": {"block_out_channels": (48, 96, 192)}, "4x": {"block_out_channels": (48, 96)}}


def measure(config: str, size: int, mode: str, device: str, dtype: str, tile: int, overlap: int, blend: str) -> dict:
    """Run one encode or decode of a `size`³ volume and return its time and peak memory."""
    import torch

    from meddiffusers import VQModel3D

    torch.manual_seed(0)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = VQModel3D(**RELEASED[config]).to(device).eval()
    if torch_dtype != torch.float32:
        model = model.to(torch_dtype)
    factor = model.downsample_factor
    with torch.no_grad():
        if mode == "encode":
            inputs = torch.rand(1, 1, size, size, size, device=device, dtype=torch_dtype) * 2 - 1
            run = lambda: model.encode(inputs, patch_batch_size=8).latents  # noqa: E731
        else:
            latents = torch.randn(
                1, 8, size // factor, size // factor, size // factor, device=device, dtype=torch_dtype
            )
            if mode == "decode_tiled":
                model.enable_tiling(tile_latent_size=tile, tile_latent_overlap=overlap, mode=blend)
            run = lambda: model.decode(latents).sample  # noqa: E731
        reset_peak_memory(device)
        seconds, _ = timed(run, device)
    peak_gib = peak_memory_gib(device)
    return {"config": config, "size": size, "mode": mode, "seconds": round(seconds, 2), "peak_gib": round(peak_gib, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="Cubic volume sides in voxels.")
    parser.add_argument("--config", choices=sorted(RELEASED), default="8x")
    parser.add_argument("--modes", nargs="+", default=["encode", "decode", "decode_tiled"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--tile", type=int, default=16, help="Latent tile side for decode_tiled.")
    parser.add_argument("--overlap", type=int, default=4, help="Latent tile overlap for decode_tiled.")
    parser.add_argument("--blend", choices=["constant", "gaussian"], default="constant", help="Tile blending.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        size, mode = args.sizes[0], args.modes[0]
        row = measure(args.config, size, mode, args.device, args.dtype, args.tile, args.overlap, args.blend)
        print(json.dumps(row))
        return

    import torch

    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| config | volume | mode | seconds | peak memory (GiB) |")
    print("| --- | --- | --- | --- | --- |")
    for size in args.sizes:
        for mode in args.modes:
            arguments = ["--sizes", str(size), "--modes", mode, "--config", args.config, "--device", args.device]
            arguments += ["--dtype", args.dtype, "--tile", str(args.tile), "--overlap", str(args.overlap)]
            arguments += ["--blend", args.blend]
            row = run_worker(__file__, arguments)
            if isinstance(row, str):
                print(f"| {args.config} | {size}³ | {mode} | failed: {row} | |", flush=True)
                continue
            label = mode
            if mode == "decode_tiled":
                label = f"decode tiled ({args.tile}³ latent tiles, overlap {args.overlap}, {args.blend} blend)"
            print(f"| {row['config']} | {size}³ | {label} | {row['seconds']} | {row['peak_gib']} |", flush=True)


if __name__ == "__main__":
    main()
