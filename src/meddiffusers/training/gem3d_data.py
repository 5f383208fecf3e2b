"""Training data of GEM-3D: labelled NIfTI volumes, VAE posterior moments of their slices (cached with `datasets` or
computed on the fly), and the random draws of a training sample (a chunk of consecutive slices with an informed slice,
or one slice with its relative position).

The original (`ldm/data/volume_dataset.py`, `slice_dataset.py`) reads nnU-Net-preprocessed arrays, min-max scales the
image of each volume to `[-1, 1]`, maps labels to `2 * label / max_label - 1`, resizes every slice to 512 x 512 and
encodes slices with the frozen KL-f8 VAE, always *sampling* the posterior. Here the posterior's moments (mean and
log-variance) are what is cached or computed, and every training step draws its own posterior sample from them:
caching skips the encoder without changing what the model sees. Tensors are `(C, S, H, W)` with `S` the slice axis
(the array's first spatial axis, the file's third axis `z`, as in the original and in `GEM3DVolumePipeline`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..pipelines.gem3d.mask_processing import check_label_mask, resize_slices, scale_intensities, scale_labels
from .data import VolumePreprocessor, read_manifest_rows, resolve_manifest_path

CACHE_INFO = "gem3d_cache.json"


def read_labelled_manifest(path: str | os.PathLike) -> list[dict]:
    """Read a manifest `[{"image": path, "label": path}, ...]` (JSON, or CSV with those columns; paths relative to
    the manifest's folder), with [`~training.data.read_manifest_rows`].

    Returns the entries with absolute paths; every missing key or file is reported in one `ValueError`.
    """
    path = os.fspath(path)
    rows, root = read_manifest_rows(path, "{'image': ..., 'label': ...}")
    entries, problems = [], []
    for index, row in enumerate(rows):
        entry = {}
        for key in ("image", "label"):
            file = resolve_manifest_path(root, row.get(key) if isinstance(row, dict) else None)
            if file is None:
                problems.append(f"entry {index}: no {key!r}")
                continue
            if not os.path.isfile(file):
                problems.append(f"entry {index}: file not found {file!r}")
            entry[key] = file
        entries.append(entry)
    if problems:
        raise ValueError(f"Manifest {path!r} has {len(problems)} problem(s): " + "; ".join(problems))
    return entries


@dataclass
class GEM3DPreprocessor:
    """An image volume and its label volume in GEM-3D's model space, on the file's in-plane grid.

    Args:
        max_label: Largest label of the dataset (3 for BraTS-style brain data, 4 for the abdomen data); labels become
            `2 * label / max_label - 1`.
        intensity: `"minmax"` (the original: the whole volume min-max scaled to `[-1, 1]`), or any scaling of
            [`~training.data.VolumePreprocessor`] (`"percentile"`, a CT window name, `"ct:<min>:<max>"`).
        orientation: Axis codes both files are brought to (`"RAS"`: slices along inferior -> superior), or
            `"native"`. Give the pipeline masks in the same orientation (`load_nifti(path, canonical=True)` for RAS).
    """

    max_label: int = 3
    intensity: str = "minmax"
    orientation: str | None = "RAS"

    def __post_init__(self):
        self.loader = VolumePreprocessor(
            "percentile" if self.intensity == "minmax" else self.intensity, orientation=self.orientation
        )

    def load(self, image_path: str, label_path: str):
        """The two files as [`NiftiVolume`]s in this orientation; a `ValueError` names a file that does not fit."""
        image, label = self.loader._load_named(image_path), self.loader._load_named(label_path)
        if image.tensor.shape[2:] != label.tensor.shape[2:] or image.tensor.shape[1] != 1:
            raise ValueError(
                f"{label_path}: label grid {tuple(label.tensor.shape[2:])} differs from its single-channel image "
                f"{image_path} {tuple(image.tensor.shape[1:])}; resample the label onto the image grid."
            )
        try:
            check_label_mask(label.tensor, self.max_label, name=os.path.basename(label_path))
        except ValueError as error:
            raise ValueError(f"{label_path}: {error}") from None
        return image, label

    def __call__(self, image_path: str, label_path: str) -> dict:
        """`{"image": (1, S, H, W) in [-1, 1], "mask": (1, S, H, W) scaled labels in [-1, 1]}` (float32)."""
        image, label = self.load(image_path, label_path)
        volume = image.tensor.float()
        scaled = scale_intensities(volume) if self.intensity == "minmax" else self.loader.scale(volume)
        return {"image": scaled[0], "mask": scale_labels(label.tensor, self.max_label)[0]}


class GEM3DVolumes(torch.utils.data.Dataset):
    """The manifest's volumes as `{"image", "mask"}` items of [`GEM3DPreprocessor`] (read from disk at every access,
    as the original reads its arrays), or, from a cache folder of [`cache_moments`], as `{"image_moments",
    "mask_moments"}` items `(S, 2 * latent_channels, h, w)`."""

    def __init__(self, manifest: list[dict] | None = None, preprocessor: GEM3DPreprocessor | None = None, cache=None):
        if (manifest is None) == (cache is None):
            raise ValueError("Give either a manifest (with its preprocessor) or a latent cache folder.")
        self.manifest, self.preprocessor, self.cache = manifest, preprocessor, None
        if cache is not None:
            import datasets

            self.cache = datasets.load_from_disk(cache).with_format("numpy")

    def __len__(self) -> int:
        return len(self.cache) if self.cache is not None else len(self.manifest)

    def __getitem__(self, index: int) -> dict:
        if self.cache is None:
            row = self.manifest[index]
            return self.preprocessor(row["image"], row["label"])
        row = self.cache[index]
        shape = row["shape"].tolist()
        return {key: torch.from_numpy(row[key].astype("float32")).reshape(shape) for key in MOMENT_KEYS}


MOMENT_KEYS = ("image_moments", "mask_moments")


@torch.no_grad()
def encode_moments(vae, slices: torch.Tensor, resolution: tuple[int, int], chunk: int = 16) -> torch.Tensor:
    """VAE posterior moments `(N, 2 * latent_channels, h, w)` (mean, log-variance) of `(N, 1, H, W)` slices.

    The slices are resized to `resolution` (bilinear, anti-aliased, as the pipeline's informed slice) and repeated
    to the VAE's input channels; `chunk` slices go through the encoder at a time.
    """
    device = next(vae.parameters()).device
    images = resize_slices(slices[None].transpose(1, 2), resolution, mode="bilinear")[0].transpose(0, 1)
    moments = []
    for start in range(0, len(images), chunk):
        batch = images[start : start + chunk].to(device, vae.dtype).repeat(1, vae.config.in_channels, 1, 1)
        moments.append(vae.encode(batch).latent_dist.parameters.float())
    return torch.cat(moments)


@torch.no_grad()
def encode_mask_moments(vae, masks: torch.Tensor, resolution: tuple[int, int], chunk: int = 16) -> torch.Tensor:
    """[`encode_moments`] of scaled label slices `(N, 1, H, W)`, resized by nearest neighbour (as the original)."""
    resized = resize_slices(masks[None].transpose(1, 2), resolution, mode="nearest")[0].transpose(0, 1)
    return encode_moments(vae, resized, tuple(resized.shape[-2:]), chunk)


def item_moments(item: dict, slices: slice, vae, resolution, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and mask moments of the slices `slices` of a [`GEM3DVolumes`] item (cached or encoded now)."""
    if "image_moments" in item:
        return item["image_moments"][slices], item["mask_moments"][slices]
    image, mask = item["image"][:, slices].transpose(0, 1), item["mask"][:, slices].transpose(0, 1)
    return encode_moments(vae, image, resolution, chunk), encode_mask_moments(vae, mask, resolution, chunk)


def sample_latents(moments: torch.Tensor, generator: torch.Generator, scaling_factor: float) -> torch.Tensor:
    """A posterior sample `scaling_factor * (mean + std * noise)` of moments `(N, 2C, h, w)`, the noise drawn on the
    CPU from `generator` (so the draw does not depend on the device)."""
    posterior = DiagonalGaussianDistribution(moments)
    noise = torch.randn(posterior.mean.shape, generator=generator).to(moments)
    return (posterior.mean + posterior.std * noise) * scaling_factor


def draw_chunk(num_slices: int, num_frames: int, generator: torch.Generator) -> tuple[int, int]:
    """The first slice of a random chunk of `num_frames` consecutive slices and the index of its informed slice
    (a random slice of the chunk), drawn on the CPU from `generator`.

    The original draws the start in `[0, S - num_frames)`, never using the last chunk (and failing for `S =
    num_frames`); here every start in `[0, S - num_frames]` is possible.
    """
    if num_slices < num_frames:
        raise ValueError(f"A volume of {num_slices} slices is shorter than one {num_frames}-slice training chunk.")
    start = int(torch.randint(num_slices - num_frames + 1, (1,), generator=generator))
    return start, start + int(torch.randint(num_frames, (1,), generator=generator))


def stage2_timestep_weights(num_train_timesteps: int = 1000) -> torch.Tensor:
    """GEM-3D's stage-2 sampling weights of the timesteps `t = 0 .. T-1`: proportional to `2T - t` (2000 - t for
    T = 1000), a linear preference for small `t` (t = 0 is about twice as likely as t = T - 1)."""
    return (2 * num_train_timesteps - torch.arange(num_train_timesteps)).float()


@torch.no_grad()
def cache_moments(vae, dataset: GEM3DVolumes, output_dir: str, resolution, chunk: int = 16) -> None:
    """Encode every volume of `dataset` (a manifest dataset) once and save the moments with `datasets`.

    Columns: `image_moments`, `mask_moments` (flattened float32), `shape` (`[S, 2C, h, w]`), `image`, `label`; a
    `gem3d_cache.json` next to them records the resolution and the VAE configuration the cache was made with, which
    [`check_cache`] compares before a run reuses the folder.
    """
    import datasets

    columns = {"image_moments": [], "mask_moments": [], "shape": [], "image": [], "label": []}
    for index in range(len(dataset)):
        item, row = dataset[index], dataset.manifest[index]
        image, mask = item_moments(item, slice(None), vae, resolution, chunk)
        columns["image_moments"].append(image.cpu().reshape(-1).numpy())
        columns["mask_moments"].append(mask.cpu().reshape(-1).numpy())
        columns["shape"].append(list(image.shape))
        columns["image"].append(row["image"])
        columns["label"].append(row["label"])
    features = datasets.Features(
        {
            "image_moments": datasets.Sequence(datasets.Value("float32")),
            "mask_moments": datasets.Sequence(datasets.Value("float32")),
            "shape": datasets.Sequence(datasets.Value("int64")),
            "image": datasets.Value("string"),
            "label": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(output_dir)
    with open(os.path.join(output_dir, CACHE_INFO), "w", encoding="utf-8") as handle:
        json.dump(cache_info(vae, resolution, dataset), handle, indent=2)


def cache_info(vae, resolution, dataset: GEM3DVolumes) -> dict:
    """What a latent cache depends on: the in-plane resolution, the VAE config, the preprocessing and the files."""
    vae_config = {key: value for key, value in vae.config.items() if not key.startswith("_")}
    preprocessor = dataset.preprocessor
    return {
        "resolution": list(resolution),
        "vae": json.loads(json.dumps(vae_config, default=list)),
        "max_label": preprocessor.max_label,
        "intensity": preprocessor.intensity,
        "orientation": preprocessor.orientation,
        "files": [[row["image"], row["label"]] for row in dataset.manifest],
    }


def check_cache(path: str, vae, resolution, dataset: GEM3DVolumes) -> bool:
    """Whether `path` holds a latent cache made for these settings (`False`: none there); a `ValueError` if it was
    made for others (another VAE, resolution, preprocessing or manifest)."""
    info_path = os.path.join(path, CACHE_INFO)
    if not os.path.isfile(info_path):
        return False
    with open(info_path, encoding="utf-8") as handle:
        saved = json.load(handle)
    wanted = cache_info(vae, resolution, dataset)
    changed = sorted(key for key in wanted if saved.get(key) != wanted[key])
    if changed:
        raise ValueError(f"The latent cache {path!r} was made with other {', '.join(changed)}; remove it or move it.")
    return True
