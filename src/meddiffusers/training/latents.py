"""Cached diffusion latents: encode a manifest once with a trained `VQModel3D`, store them with `datasets`."""

from __future__ import annotations

import json
import os
import random

import torch
import torch.nn.functional as F

from ..io.regions import RegionRegistry
from .data import VolumePreprocessor, augment

REGIONS_FILE = "regions.json"


def center_crop_or_pad(volume: torch.Tensor, size) -> torch.Tensor:
    """Centre-crop or pad (with -1) a `(C, D, H, W)` volume to `size` `(D, H, W)`."""
    for axis, want in enumerate(size, start=1):
        have = volume.shape[axis]
        if have > want:
            start = (have - want) // 2
            volume = volume.narrow(axis, start, want)
        elif have < want:
            before = (want - have) // 2
            pads = [0, 0] * (4 - axis) + [before, want - have - before]
            volume = F.pad(volume, pads, value=-1.0)
    return volume


@torch.no_grad()
def encode_manifest(
    vqvae, manifest, preprocessor: VolumePreprocessor, volume_size=None, device="cpu", augment_copies=0, seed=0
) -> dict:
    """Encode every volume of a manifest into normalised latents (the diffusion model's space).

    With `augment_copies > 0`, that many randomly flipped / rotated copies of each volume (the reference
    augmentations) are encoded too. Returns columns for `datasets.Dataset.from_dict`: `latents` (flattened
    float32), `shape`, `class_id`, `region`, `source`. Unreadable files are reported together with their names.
    """
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
            variant = volume if copy == 0 else augment(volume, generator)
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
