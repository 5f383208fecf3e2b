"""Training data: NIfTI manifests, shared preprocessing, random patches and the reference augmentations."""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils import logging

from ..io.intensity import HUWindow, PercentileScaling
from ..io.nifti import load_nifti
from ..io.regions import RegionRegistry

logger = logging.get_logger(__name__)


def read_manifest(path: str | os.PathLike, regions: RegionRegistry | None = None):
    """Read a manifest of volumes into a `datasets.Dataset` with columns `image`, `region`, `class_id`, `mask`,
    `condition`.

    The manifest is a JSON list of `{"image": path, "region": name, "mask": optional label file, "condition":
    optional paired condition volume}` objects or a CSV file with the same columns. Relative paths are resolved
    against the manifest's folder. Every file must exist and every region must be known (to `regions`, when
    given); all problems are reported together, with the file names.
    """
    import datasets

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Manifest not found: {path!r}.")
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        with open(path, encoding="utf-8") as handle:
            rows = json.load(handle)
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"Manifest {path!r} must be a non-empty list of {{'image': ..., 'region': ...}} entries.")
    root = os.path.dirname(os.path.abspath(path))
    problems, records = [], []
    for index, row in enumerate(rows):
        image = row.get("image")
        if not image:
            problems.append(f"entry {index}: no 'image'")
            continue
        image = image if os.path.isabs(image) else os.path.join(root, image)
        mask, condition = (row.get(key) or None for key in ("mask", "condition"))
        mask = mask if mask is None or os.path.isabs(mask) else os.path.join(root, mask)
        condition = condition if condition is None or os.path.isabs(condition) else os.path.join(root, condition)
        for file in filter(None, (image, mask, condition)):
            if not os.path.isfile(file):
                problems.append(f"entry {index}: file not found {file!r}")
        region = row.get("region", "")
        class_id = 0
        if regions is not None:
            try:
                class_id = regions.resolve(int(region) if str(region).isdigit() else region).class_id
            except ValueError:
                problems.append(f"entry {index} ({os.path.basename(image)}): unknown region {region!r}")
        records.append(
            {
                "image": image,
                "region": str(region),
                "class_id": class_id,
                "mask": mask or "",
                "condition": condition or "",
            }
        )
    if problems:
        valid = f" Valid regions: {regions.describe()}." if regions is not None else ""
        raise ValueError(f"Manifest {path!r} has {len(problems)} problem(s): " + "; ".join(problems) + valid)
    return datasets.Dataset.from_list(records)


@dataclass
class VolumePreprocessor:
    """Load a NIfTI file into model space: optional resampling, intensity scaling, padding to a multiple.

    Args:
        intensity: `"percentile"` (0.5/99.5 per volume) or a CT window name / `"ct:<min>:<max>"` in HU.
        spacing: Resample to this `(D, H, W)` spacing in mm (trilinear); `None` keeps the file's grid.
        multiple: Pad (with -1, the background) every side up to a multiple of this.
    """

    intensity: str = "percentile"
    spacing: tuple[float, float, float] | None = None
    multiple: int = 1

    def scale(self, volume: torch.Tensor) -> torch.Tensor:
        """Scanner intensities of `(1, C, D, H, W)` to `[-1, 1]`."""
        if self.intensity == "percentile":
            return PercentileScaling()(volume)
        if self.intensity.startswith("ct:"):
            low, high = (float(v) for v in self.intensity[3:].split(":"))
            return HUWindow(low, high)(volume)
        return HUWindow.preset(self.intensity)(volume)

    def __call__(self, path: str) -> torch.Tensor:
        """`(C, D, H, W)` float tensor in `[-1, 1]`; a `ValueError` names the file when it cannot be used."""
        try:
            volume = load_nifti(path)
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"{path}: {error}") from None
        tensor = volume.tensor.float()
        if self.spacing is not None:
            size = [round(n * s / t) for n, s, t in zip(tensor.shape[2:], volume.spacing, self.spacing)]
            tensor = F.interpolate(tensor, size=size, mode="trilinear", align_corners=False)
        tensor = self.scale(tensor)
        pads = []
        for side in reversed(tensor.shape[2:]):
            pads += [0, (-side) % self.multiple]
        return F.pad(tensor, pads, value=-1.0)[0] if any(pads) else tensor[0]


def random_crop(volume: torch.Tensor, size, generator: random.Random, reject_empty: bool = True) -> torch.Tensor:
    """A random `size` crop of `(C, D, H, W)` (padded with -1 when smaller); re-drawn a few times to avoid crops that
    are all background."""
    size = (size,) * 3 if isinstance(size, int) else tuple(size)
    pads = []
    for side, want in zip(reversed(volume.shape[1:]), reversed(size)):
        pads += [0, max(want - side, 0)]
    volume = F.pad(volume, pads, value=-1.0) if any(pads) else volume
    crop = volume
    for _ in range(10):
        starts = [generator.randint(0, side - want) for side, want in zip(volume.shape[1:], size)]
        crop = volume[
            :, starts[0] : starts[0] + size[0], starts[1] : starts[1] + size[1], starts[2] : starts[2] + size[2]
        ]
        if not reject_empty or (crop > -1).any():
            break
    return crop


def augment(volume: torch.Tensor, generator: random.Random) -> torch.Tensor:
    """The reference augmentations: random flips of the in-plane axes (H, W) and a random rot90 in that plane (only
    when H == W, so that every item keeps its shape)."""
    for axis in (2, 3):
        if generator.random() < 0.5:
            volume = volume.flip(axis)
    if generator.random() < 0.5 and volume.shape[2] == volume.shape[3]:
        volume = volume.rot90(1, dims=(2, 3))
    return volume


class VolumeDataset(torch.utils.data.Dataset):
    """Items of a manifest as `{"pixel_values": (C, D, H, W), "class_labels": int}`.

    A file that fails to load is logged with its name and replaced by another item, so one bad file never stops a
    long run; if more than half the files fail, the run stops with an error listing them.

    Args:
        manifest: Dataset from [`read_manifest`].
        preprocessor: How files become model-space tensors.
        crop_size: Random crop size (a patch for the autoencoder's first stage); `None` keeps whole volumes.
        augmentation: Apply [`augment`].
        seed: Seed of the crop/augmentation random stream.
    """

    def __init__(self, manifest, preprocessor: VolumePreprocessor, crop_size=None, augmentation=True, seed=0):
        self.manifest = manifest
        self.preprocessor = preprocessor
        self.crop_size = crop_size
        self.augmentation = augmentation
        self.random = random.Random(seed)
        self.failed: set[str] = set()

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self)):
            row = self.manifest[(index + attempt) % len(self)]
            try:
                volume = self.preprocessor(row["image"])
            except ValueError as error:
                if row["image"] not in self.failed:
                    logger.warning(f"Skipping unreadable training volume: {error}")
                    self.failed.add(row["image"])
                if len(self.failed) > len(self) // 2:
                    raise RuntimeError(f"Too many unreadable training volumes: {sorted(self.failed)}") from None
                continue
            if self.crop_size is not None:
                volume = random_crop(volume, self.crop_size, self.random)
            if self.augmentation:
                volume = augment(volume, self.random)
            return {"pixel_values": volume.contiguous(), "class_labels": int(row["class_id"])}
        raise RuntimeError(f"No readable training volume in the manifest (failed: {sorted(self.failed)}).")
