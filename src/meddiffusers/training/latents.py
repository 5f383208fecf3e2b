"""Cached diffusion latents: encode a manifest once with a trained `VQModel3D`, store them with `datasets`."""

from __future__ import annotations

import json
import os
import random

import torch

from ..io.regions import RegionRegistry
from ..utils.volume import center_crop_or_pad
from .data import VolumePreprocessor, augment, augmentation_options

REGIONS_FILE = "regions.json"


@torch.no_grad()
def encode_manifest(
    vqvae,
    manifest,
    preprocessor: VolumePreprocessor,
    volume_size=None,
    device="cpu",
    augment_copies=0,
    seed=0,
    augmentation="reference",
) -> dict:
    """Encode every volume of a manifest into normalised latents (the diffusion model's space).

    With `augment_copies > 0`, that many randomly augmented copies of each volume are encoded too: `augmentation`
    names the setting of [`~meddiffusers.training.data.AUGMENTATIONS`], `"reference"` (random flips of `H`, `W`
    and rot90, several in-plane orientations), `"lr_flip"` (left-right flips only) or `"none"` (identical copies).
    Returns columns for `datasets.Dataset.from_dict`: `latents` (flattened float32), `shape`, `class_id`, `region`,
    `source`. Unreadable files are reported together with their names.
    """
    options = augmentation_options(augmentation)
    generator = random.Random(seed)
    columns = {"latents": [], "shape": [], "class_id": [], "region": [], "source": []}
    problems = []
    for row in manifest:
        try:
            volume = preprocessor(row["image"])
        except ValueError as error:
            problems.append(str(error))
            continue
        if volume_size is not None:
            volume = center_crop_or_pad(volume, volume_size)
        for copy in range(augment_copies + 1):
            variant = volume if copy == 0 else augment(volume, generator, **options)
            latents = vqvae.normalize_latents(vqvae.encode(variant[None].to(device, vqvae.dtype)).latents)[0]
            columns["latents"].append(latents.float().cpu().reshape(-1).numpy())
            columns["shape"].append(list(latents.shape))
            columns["class_id"].append(int(row["class_id"]))
            columns["region"].append(row["region"])
            columns["source"].append(row["image"])
    if problems:
        raise ValueError(f"{len(problems)} volume(s) could not be encoded: " + "; ".join(problems))
    return columns


def save_latent_dataset(columns: dict, regions: RegionRegistry, output_dir: str) -> None:
    """Write the latents with `datasets.save_to_disk` and the region registry next to them."""
    import datasets

    features = datasets.Features(
        {
            "latents": datasets.Sequence(datasets.Value("float32")),
            "shape": datasets.Sequence(datasets.Value("int64")),
            "class_id": datasets.Value("int64"),
            "region": datasets.Value("string"),
            "source": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(output_dir)
    with open(os.path.join(output_dir, REGIONS_FILE), "w", encoding="utf-8") as handle:
        json.dump(regions.to_config(), handle, indent=2)


class LatentDataset(torch.utils.data.Dataset):
    """Cached latents as `{"latents": (C, d, h, w), "class_labels": int}` items, with the saved region registry."""

    def __init__(self, path: str):
        import datasets

        if not os.path.isdir(path):
            raise FileNotFoundError(f"Latent dataset not found: {path!r} (create it with examples/cache_latents.py).")
        self.data = datasets.load_from_disk(path).with_format("numpy")
        with open(os.path.join(path, REGIONS_FILE), encoding="utf-8") as handle:
            self.regions = RegionRegistry(json.load(handle))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        row = self.data[index]
        latents = torch.from_numpy(row["latents"].astype("float32")).reshape(*row["shape"].tolist())
        return {"latents": latents, "class_labels": int(row["class_id"])}
