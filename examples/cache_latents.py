"""Encode a manifest of NIfTI volumes into normalised latents for BiFlowNet training.

    python examples/cache_latents.py --pretrained_vqvae outputs/vqvae --train_data manifest.json \
        --output_dir outputs/latents [--volume_size 128 128 128] [--intensity percentile] [--spacing 1 1 1]

The manifest is a JSON list (or CSV) of {"image": path, "region": name}. Regions must be known to the region
registry (`--regions regions.json`, default: the seven 3D MedDiffusion classes); the registry is stored with the
latents so the trained pipeline carries the same names.
"""

import argparse
import json

import torch

from meddiffusers import meddiffusion_regions
from meddiffusers.io import RegionRegistry
from meddiffusers.models.autoencoders import load_vq_model
from meddiffusers.training.data import AUGMENTATIONS, VolumePreprocessor, read_manifest
from meddiffusers.training.latents import encode_manifest, save_latent_dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pretrained_vqvae", required=True, help="VQModel3D folder, pipeline folder or original .ckpt."
    )
    parser.add_argument("--train_data", required=True, help="Manifest (JSON or CSV) of NIfTI volumes with regions.")
    parser.add_argument("--output_dir", required=True, help="Where the latent dataset is saved.")
    parser.add_argument("--regions", default=None, help="JSON list of regions (default: the 3D MedDiffusion seven).")
    parser.add_argument("--intensity", default="percentile", help="percentile, a CT window name, or ct:<min>:<max>.")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, help="Resample to this (D, H, W) spacing.")
    parser.add_argument("--volume_size", type=int, nargs=3, default=None, help="Centre crop/pad to (D, H, W).")
    parser.add_argument("--augment_copies", type=int, default=0, help="Also encode N augmented copies per volume.")
    parser.add_argument(
        "--augmentation",
        choices=list(AUGMENTATIONS),
        default="reference",
        help="Augmentation of the copies: reference (random H/W flips and rot90, several in-plane orientations), "
        "lr_flip (left-right flips only) or none. Use lr_flip or none for a model that must generate anatomically "
        "oriented volumes.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.regions:
        with open(args.regions, encoding="utf-8") as handle:
            regions = RegionRegistry(json.load(handle))
    else:
        regions = meddiffusion_regions()
    manifest = read_manifest(args.train_data, regions)
    vqvae = load_vq_model(args.pretrained_vqvae).to(args.device).eval()
    preprocessor = VolumePreprocessor(args.intensity, tuple(args.spacing) if args.spacing else None)
    columns = encode_manifest(
        vqvae,
        manifest,
        preprocessor,
        args.volume_size,
        args.device,
        args.augment_copies,
        args.seed,
        augmentation=args.augmentation,
    )
    save_latent_dataset(columns, regions, args.output_dir)
    shapes = sorted({tuple(shape) for shape in columns["shape"]})
    print(f"encoded {len(columns['shape'])} volume(s) into {args.output_dir}; latent shapes {shapes}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
