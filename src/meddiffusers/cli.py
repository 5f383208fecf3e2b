"""The `meddiffusers` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _load_vqvae(source: str, subfolder: str | None):
    from .models import VQModel3D

    if os.path.isfile(source):
        return VQModel3D.from_single_file(source)
    return VQModel3D.from_pretrained(source, subfolder=subfolder)


def _intensity_transform(name: str):
    from .io import HUWindow, PercentileScaling

    if name == "percentile":
        return PercentileScaling()
    if name.startswith("ct-"):
        return HUWindow.preset(name[3:].replace("-", "_"))
    raise ValueError(
        f"Unknown --intensity {name!r}; use 'percentile' or 'ct-<window>' (e.g. ct-wide, ct-soft-tissue)."
    )


def autoencode(args: argparse.Namespace) -> int:
    """Encode a NIfTI volume with a `VQModel3D` and write the reconstruction (and optionally the latent)."""
    import torch

    from .io import HUWindow, affine_from_tensor_spacing, load_nifti, save_nifti

    volume = load_nifti(args.input)
    vqvae = _load_vqvae(args.vqvae, args.subfolder).to(args.device).eval()
    if args.tile:
        vqvae.enable_tiling()
    transform = _intensity_transform(args.intensity)
    if isinstance(transform, HUWindow):
        scaled, value_range = transform(volume.tensor), None
    else:
        scaled, value_range = transform(volume.tensor, return_range=True)
    print(f"input {args.input}: tensor {tuple(volume.tensor.shape)}, spacing (D, H, W) {volume.spacing} mm")
    start = time.perf_counter()
    with torch.no_grad():
        encoded = vqvae.encode(scaled.to(args.device))
        recon = vqvae.decode(encoded.latents, output_size=encoded.input_size).sample.cpu()
    elapsed = time.perf_counter() - start
    restored = transform.inverse(recon) if value_range is None else transform.inverse(recon, value_range)
    save_nifti(restored, args.output, affine=volume.affine, header=volume.header)
    error = (recon - scaled).abs().mean().item()
    print(f"latent {tuple(encoded.latents.shape)}; mean |reconstruction - input| in [-1, 1] space: {error:.4f}")
    print(f"wrote {args.output} ({elapsed:.1f} s)")
    if args.latent_output:
        factor = vqvae.downsample_factor
        latent_spacing = tuple(s * factor for s in volume.spacing)
        save_nifti(
            vqvae.normalize_latents(encoded.latents).cpu(),
            args.latent_output,
            affine=affine_from_tensor_spacing(latent_spacing),
        )
        print(f"wrote {args.latent_output}")
    return 0


def generate(args: argparse.Namespace) -> int:
    """Generate volumes with a `MedDiffusionPipeline` and write them as NIfTI."""
    import torch

    from .pipelines import MedDiffusionPipeline
    from .schedulers import scheduler_from_name

    if args.num_volumes < 1 or args.steps < 1:
        raise ValueError("--num-volumes and --steps must be at least 1.")
    if not args.output.endswith((".nii", ".nii.gz")) and os.path.splitext(args.output)[1]:
        raise ValueError(f"--output must be a .nii/.nii.gz file or a folder, got {args.output!r}.")
    if args.model is None:
        from .demo import demo_model_path

        args.model = demo_model_path()
        print(f"using the bundled demo model ({args.model}): a demonstration, not a clinical model")
    pipe = MedDiffusionPipeline.from_pretrained(args.model)
    pipe.get_region(args.region)  # unknown regions fail here, before any model runs
    if args.scheduler:
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    pipe = pipe.to(args.device)
    generator = torch.Generator(device="cpu").manual_seed(args.seed) if args.seed is not None else None
    size = tuple(args.volume_size) if args.volume_size else None
    start = time.perf_counter()
    output = pipe(
        region=args.region,
        num_inference_steps=args.steps,
        generator=generator,
        num_volumes_per_region=args.num_volumes,
        volume_size=size,
        output_type="pt",
    )
    paths = output.save(args.output)
    shape = tuple(output.volumes.shape[2:])
    print(f"generated {len(paths)} x {output.regions[0]} volume(s) of {shape} in {time.perf_counter() - start:.1f} s")
    for path in paths:
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `meddiffusers` command."""
    parser = argparse.ArgumentParser(prog="meddiffusers", description="3D medical diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate",
        help="Generate CT/MRI volumes with a MedDiffusionPipeline.",
        description="Generate volumes of one region and save them as NIfTI (model-space intensities, region spacing).",
    )
    gen.add_argument("--model", default=None, help="Pipeline folder or Hub repo id (default: the bundled demo model).")
    gen.add_argument("--region", required=True, help="Region name, alias or class id, e.g. MRBrain, CTLegs, 3.")
    gen.add_argument("--output", required=True, help="Output .nii.gz file (an index is added for several) or folder.")
    gen.add_argument("--steps", type=int, default=100, help="Denoising steps (default 100).")
    gen.add_argument("--scheduler", default=None, help="ddim (original), ddpm, dpm++, unipc, euler, heun, deis, ...")
    gen.add_argument("--seed", type=int, default=None, help="Random seed for reproducible volumes.")
    gen.add_argument("--num-volumes", type=int, default=1, help="Volumes to generate.")
    gen.add_argument("--volume-size", type=int, nargs=3, metavar=("D", "H", "W"), help="Override the region's size.")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    gen.set_defaults(handler=generate)

    from .conversion import build_argument_parser, run_from_args

    conv = commands.add_parser(
        "convert",
        help="Convert released 3D MedDiffusion checkpoints into a meddiffusers (safetensors) folder.",
        description="Convert original .ckpt/.pt files (read without executing pickled code) into a pipeline folder.",
    )
    build_argument_parser(conv)
    conv.set_defaults(handler=run_from_args)

    auto = commands.add_parser(
        "autoencode",
        help="Encode and decode a NIfTI volume with a VQModel3D (Patch-Volume autoencoder).",
        description="Encode a NIfTI volume patch-wise, quantise, decode jointly and save the reconstruction.",
    )
    auto.add_argument("--vqvae", required=True, help="Original .ckpt file, a saved VQModel3D folder or a Hub repo id.")
    auto.add_argument("--subfolder", default=None, help="Subfolder of the model inside a pipeline folder or repo.")
    auto.add_argument("--input", required=True, help="Input .nii/.nii.gz volume.")
    auto.add_argument("--output", required=True, help="Reconstruction .nii.gz (input intensity units and affine).")
    auto.add_argument("--latent-output", default=None, help="Also save the normalised latent as NIfTI.")
    auto.add_argument(
        "--intensity", default="percentile", help="'percentile' (0.5/99.5, any modality) or 'ct-<window>' (ct-wide)."
    )
    auto.add_argument("--tile", action="store_true", help="Decode in overlapping tiles (large volumes).")
    auto.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    auto.set_defaults(handler=autoencode)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `meddiffusers` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"meddiffusers {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
