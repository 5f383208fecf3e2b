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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `meddiffusers` command."""
    parser = argparse.ArgumentParser(prog="meddiffusers", description="3D medical diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

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
