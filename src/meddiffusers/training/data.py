"""Training data: NIfTI manifests, shared preprocessing (one orientation for every volume), random patches and
augmentations (the reference ones or orientation-preserving ones)."""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
from diffusers.utils import logging

from ..io.intensity import HUWindow, PercentileScaling
from ..io.nifti import NiftiVolume, load_nifti, nifti_array_to_tensor
from ..io.regions import RegionRegistry
from ..utils.volume import pad_to_multiple, pad_to_size, resample_to_spacing

logger = logging.get_logger(__name__)


def read_manifest_rows(path: str | os.PathLike, entry: str = "{'image': ..., 'region': ...}") -> tuple[list, str]:
    """The raw rows of a JSON (list of objects) or CSV manifest and the folder its relative paths are resolved
    against. A missing file raises `FileNotFoundError`, an empty or non-list manifest a `ValueError` that shows
    `entry`, the expected shape of one entry."""
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
        raise ValueError(f"Manifest {path!r} must be a non-empty list of {entry} entries.")
    return rows, os.path.dirname(os.path.abspath(path))


def resolve_manifest_path(root: str, file: str | None) -> str | None:
    """`file` of a manifest entry as a path: relative ones are taken from the manifest's folder `root`; an empty
    entry stays `None`."""
    if not file:
        return None
    return file if os.path.isabs(file) else os.path.join(root, file)


def read_manifest(path: str | os.PathLike, regions: RegionRegistry | None = None):
    """Read a manifest of volumes into a `datasets.Dataset` with columns `image`, `region`, `class_id`, `mask`,
    `condition`, `anatomy`.

    The manifest is a JSON list of `{"image": path, "region": name, "mask": optional label file, "condition":
    optional paired condition volume, "anatomy": optional anatomy label file}` objects or a CSV file with the same
    columns (missing optional files are `""`). Relative paths are resolved
    against the manifest's folder. Every file must exist and every region must be known (to `regions`, when
    given); all problems are reported together, with the file names.
    """
    import datasets

    path = os.fspath(path)
    rows, root = read_manifest_rows(path)
    problems, records = [], []
    for index, row in enumerate(rows):
        image = resolve_manifest_path(root, row.get("image"))
        if image is None:
            problems.append(f"entry {index}: no 'image'")
            continue
        mask, condition, anatomy = (
            resolve_manifest_path(root, row.get(key)) for key in ("mask", "condition", "anatomy")
        )
        for file in filter(None, (image, mask, condition, anatomy)):
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
                "anatomy": anatomy or "",
            }
        )
    if problems:
        valid = f" Valid regions: {regions.describe()}." if regions is not None else ""
        raise ValueError(f"Manifest {path!r} has {len(problems)} problem(s): " + "; ".join(problems) + valid)
    return datasets.Dataset.from_list(records)


_AXIS_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})


def parse_axcodes(orientation: str) -> tuple[str, str, str]:
    """Validate an orientation string such as `"RAS"`, `"LPS"` or `"RAS+"` and return its three axis codes.

    Each letter is the anatomical direction the file's `x`, `y`, `z` array axis points to as its index grows
    (nibabel's axis codes); each of L/R, A/P and S/I must appear exactly once.
    """
    codes = tuple(orientation.upper().rstrip("+"))
    if len(codes) != 3 or any(sum(code in pair for code in codes) != 1 for pair in _AXIS_PAIRS):
        raise ValueError(
            f"Orientation {orientation!r} is not a valid axis-code string: use three letters with one of L/R, one of "
            "A/P and one of S/I, e.g. 'RAS' (the default) or 'LPS'."
        )
    return codes


def reorient(volume: NiftiVolume, orientation: str) -> NiftiVolume:
    """Reorient a volume's data array to the axis codes `orientation` (e.g. `"RAS"`, `"LPS"`), nibabel-style.

    Only axis permutations and flips are applied (no resampling): each array axis goes to the closest of the target
    directions (`nibabel.orientations.io_orientation`), and the affine is updated so that every voxel keeps its
    world position. `reorient(volume, "RAS")` gives the same array as `load_nifti(path, canonical=True)`.
    """
    codes = parse_axcodes(orientation)
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(volume.affine), nib.orientations.axcodes2ornt(codes)
    )
    array = volume.tensor[0].permute(2, 3, 1, 0).numpy()  # (C, z, x, y) -> (x, y, z, C)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(transform, array.shape[:3])
    array = np.ascontiguousarray(nib.orientations.apply_orientation(array, transform))
    return NiftiVolume(tensor=nifti_array_to_tensor(array), affine=affine, header=volume.header)


@dataclass
class VolumePreprocessor:
    """Load a NIfTI file into model space: reorientation, optional resampling, intensity scaling, padding.

    Every training volume is first brought to one known orientation, so that a model learns where the anatomy is
    along each tensor axis. With the default `"RAS"` (closest RAS+, `nibabel.as_closest_canonical`) the
    `(C, D, H, W)` tensor's `D` axis runs inferior -> superior (a `D` slice is axial), `H` left -> right (the index
    grows toward the patient's right) and `W` posterior -> anterior, whatever the orientation the file was stored
    in (LSA, LPS, ...). The voxels are only permuted and flipped, never interpolated, by the reorientation.

    Args:
        intensity: `"percentile"` (0.5/99.5 per volume) or a CT window name / `"ct:<min>:<max>"` in HU.
        spacing: Resample to this `(D, H, W)` spacing in mm (trilinear, after the reorientation); `None` keeps
            the file's grid.
        multiple: Pad (with -1, the background) every side up to a multiple of this.
        orientation: `"RAS"` (default), another axis-code string for the file's `x, y, z` axes (e.g. `"LPS"`, the
            DICOM/ITK convention), or `None` / `"native"` to keep the array exactly as stored (the behaviour of
            meddiffusers before this option; the orientation then differs between files from different sources).
    """

    intensity: str = "percentile"
    spacing: tuple[float, float, float] | None = None
    multiple: int = 1
    orientation: str | None = "RAS"

    def __post_init__(self):
        if self.orientation is not None and self.orientation.lower() != "native":
            parse_axcodes(self.orientation)

    def load(self, path: str) -> NiftiVolume:
        """The file as a [`NiftiVolume`] in this preprocessor's orientation (no resampling or scaling yet)."""
        if self.orientation is None or self.orientation.lower() == "native":
            return load_nifti(path)
        if parse_axcodes(self.orientation) == ("R", "A", "S"):
            return load_nifti(path, canonical=True)
        return reorient(load_nifti(path), self.orientation)

    def scale(self, volume: torch.Tensor) -> torch.Tensor:
        """Scanner intensities of `(1, C, D, H, W)` to `[-1, 1]`."""
        if self.intensity == "percentile":
            return PercentileScaling()(volume)
        if self.intensity.startswith("ct:"):
            low, high = (float(v) for v in self.intensity[3:].split(":"))
            return HUWindow(low, high)(volume)
        return HUWindow.preset(self.intensity)(volume)

    def _load_named(self, path: str) -> NiftiVolume:
        """[`load`], with the file's name in the `ValueError` when it cannot be read."""
        try:
            return self.load(path)
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"{path}: {error}") from None

    def labels(self, path: str) -> torch.Tensor:
        """An integer label file (e.g. an anatomy mask) as a `(C, D, H, W)` int64 tensor, on the grid that `__call__`
        gives an image stored on the file's grid: the same orientation, nearest-neighbour resampling to `spacing`
        (`"nearest-exact"`: the voxel centres of the trilinear image resampling), padding with 0 (background)."""
        volume = self._load_named(path)
        tensor = volume.tensor.round().long()
        if self.spacing is not None:
            tensor = resample_to_spacing(tensor, volume.spacing, self.spacing, mode="nearest-exact")
        return pad_to_multiple(tensor, self.multiple, value=0)[0]

    def __call__(self, path: str) -> torch.Tensor:
        """`(C, D, H, W)` float tensor in `[-1, 1]`; a `ValueError` names the file when it cannot be used."""
        volume = self._load_named(path)
        tensor = volume.tensor.float()
        if self.spacing is not None:
            tensor = resample_to_spacing(tensor, volume.spacing, self.spacing, mode="trilinear")
        return pad_to_multiple(self.scale(tensor), self.multiple, value=-1.0)[0]


def random_crop(volume: torch.Tensor, size, generator: random.Random, reject_empty: bool = True) -> torch.Tensor:
    """A random `size` crop of `(C, D, H, W)` (padded with -1 when smaller); re-drawn a few times to avoid crops that
    are all background."""
    size = (size,) * 3 if isinstance(size, int) else tuple(size)
    volume = pad_to_size(volume, size, value=-1.0)
    crop = volume
    for _ in range(10):
        starts = [generator.randint(0, side - want) for side, want in zip(volume.shape[1:], size)]
        crop = volume[
            :, starts[0] : starts[0] + size[0], starts[1] : starts[1] + size[1], starts[2] : starts[2] + size[2]
        ]
        if not reject_empty or (crop > -1).any():
            break
    return crop


AUGMENTATIONS = {
    "reference": {"flips": (2, 3), "rot90": True},
    "lr_flip": {"flips": (2,), "rot90": False},
    "none": {"flips": (), "rot90": False},
}
"""Named augmentation settings for [`augment`] (keyword arguments), chosen with `--augmentation` in the scripts:

- `"reference"`: the 3D MedDiffusion augmentations, random flips of `H` and `W` and a random rot90 in that plane.
  The model then learns several in-plane orientations and a sample's orientation depends on the seed.
- `"lr_flip"`: only a random left-right flip (`H` with the default RAS orientation), which keeps superior up and
  anterior in front; use it for roughly left-right symmetric anatomy such as the head.
- `"none"`: no augmentation; the only choice that keeps asymmetric anatomy (heart, liver) on its side.
"""


def augmentation_options(name: str | bool) -> dict:
    """Keyword arguments of [`augment`] for a name of [`AUGMENTATIONS`] (`True` = `"reference"`, `False` =
    `"none"`)."""
    if isinstance(name, bool):
        name = "reference" if name else "none"
    if name not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}.")
    return dict(AUGMENTATIONS[name])


def augment(volume: torch.Tensor, generator: random.Random, flips=(2, 3), rot90: bool = True) -> torch.Tensor:
    """Random flips and rot90 of a `(C, D, H, W)` volume; by default the reference augmentations.

    Args:
        volume: `(C, D, H, W)` tensor.
        generator: The random stream (one draw per flip axis, one for the rotation when enabled).
        flips: Dimensions of `volume` that are each flipped with probability 1/2: `(2, 3)` = `H` and `W` (the
            reference), `(2,)` = left-right only with the default RAS orientation, `()` = none.
        rot90: Also rotate by 90 degrees in the `(H, W)` plane with probability 1/2 (only when `H == W`, so that every
            item keeps its shape). A model meant to generate anatomically oriented volumes must not use it.
    """
    for axis in flips:
        if generator.random() < 0.5:
            volume = volume.flip(axis)
    if rot90 and generator.random() < 0.5 and volume.shape[2] == volume.shape[3]:
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
        augmentation: A name of [`AUGMENTATIONS`] (`"reference"`, `"lr_flip"`, `"none"`) or a bool (`True` =
            `"reference"`, `False` = `"none"`) for [`augment`].
        seed: Seed of the crop/augmentation random stream.
    """

    def __init__(self, manifest, preprocessor: VolumePreprocessor, crop_size=None, augmentation=True, seed=0):
        self.manifest = manifest
        self.preprocessor = preprocessor
        self.crop_size = crop_size
        self.augmentation = augmentation
        self.augment_options = augmentation_options(augmentation)
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
            if self.augment_options["flips"] or self.augment_options["rot90"]:
                volume = augment(volume, self.random, **self.augment_options)
            return {"pixel_values": volume.contiguous(), "class_labels": int(row["class_id"])}
        raise RuntimeError(f"No readable training volume in the manifest (failed: {sorted(self.failed)}).")
