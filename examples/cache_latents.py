"""Encode a manifest of NIfTI volumes into normalised latents for BiFlowNet training.

    python examples/cache_latents.py --pretrained_vqvae outputs/vqvae --train_data manifest.json \
        --output_dir outputs/latents [--volume_size 128 128 128] [--intensity percentile] [--spacing 1 1 1]

The manifest is a JSON list (or CSV) of {"image": path, "region": name}. Regions must be known to the region
registry (`--regions regions.json`, default: the seven 3D MedDiffusion classes); the registry is stored with the
latents so the trained pipeline carries the same names.
"""

import argparse
import json
import os

import torch

from meddiffusers import VQModel3D, meddiffusion_regions
from meddiffusers.io import RegionRegistry
from meddiffusers.training.data import VolumePreprocessor, read_manifest
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
    parser.add_argument("--augment_copies", type=int, default=0, help="Also encode N flipped/rotated copies.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def load_vqvae(path: str) -> VQModel3D:
    if os.path.isfile(path):
        return VQModel3D.from_single_file(path)
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return VQModel3D.from_pretrained(path, subfolder="vqvae")
    return VQModel3D.from_pretrained(path)


def main(argv=None):
    args = parse_args(argv)
    if args.regions:
        with open(args.regions, encoding="utf-8") as handle:
            regions = RegionRegistry(json.load(handle))
    else:
        regions = meddiffusion_regions()
    manifest = read_manifest(args.train_data, regions)
    vqvae = load_vqvae(args.pretrained_vqvae).to(args.device).eval()
    preprocessor = VolumePreprocessor(args.intensity, tuple(args.spacing) if args.spacing else None)
    columns = encode_manifest(
        vqvae, manifest, preprocessor, args.volume_size, args.device, args.augment_copies, args.seed
    )
    save_latent_dataset(columns, regions, args.output_dir)
    shapes = sorted({tuple(shape) for shape in columns["shape"]})
    print(f"encoded {len(columns['shape'])} volume(s) into {args.output_dir}; latent shapes {shapes}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
