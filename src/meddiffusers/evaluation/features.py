"""The feature-extractor interface, safe reading of weight files, and the seeded random extractor.

A feature extractor maps `(B, 1, D, H, W)` volumes in the model intensity space `[-1, 1]` to `(B, F)` features.
Before that, [`FeatureExtractor.prepare`] brings one volume to the extractor's input convention (resampling to its
voxel spacing, centre crop / pad to its input size with the background value -1); the extractor's own intensity
normalisation happens inside `forward`. `describe()` returns everything a result needs to be reproduced: the name,
the weight file and its sha256, whether the numbers are comparable with published ones, and the input convention.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

from ..utils import center_crop_or_pad, resample_to_spacing


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """The sha256 of a file as a hex string, read in chunks (weight files can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_weight_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a local `.safetensors` file or a PyTorch pickle, never executing pickled code.

    Pickles go through [`load_original_checkpoint`] (PyTorch's restricted unpickler with a small allowlist), in the
    zip format of `torch.save` or the older non-zip one (PyTorch < 1.6, e.g. the MedicalNet releases of 2019). A
    pickle that asks for anything else (a function to call, a class to build) is refused with a `ValueError`.
    Checkpoints that wrap the weights (`{"state_dict": ...}`, `{"model": ...}`) are unwrapped.
    """
    from ..loaders import load_original_checkpoint

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weight file not found: {path!r}.")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"Could not read {path!r} as safetensors: {error}") from None
    checkpoint = load_original_checkpoint(path)  # zip or legacy format, never executing pickled code
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path!r} does not hold a state dict (a mapping of names to tensors).")
    return dict(checkpoint)


def check_sha256(path: str, expected: str | None) -> str:
    """Hash `path`; raise a `ValueError` if `expected` is given and differs. Returns the file's sha256."""
    digest = file_sha256(path)
    if expected is not None and digest != expected.lower():
        raise ValueError(
            f"{path!r} has sha256 {digest}, not the expected {expected.lower()}: it is another file, a different "
            "release or a corrupted download."
        )
    return digest


class FeatureExtractor(nn.Module):
    """Base class of the feature extractors: `(B, 1, D, H, W)` volumes in `[-1, 1]` to `(B, F)` features.

    Attributes:
        name: Short identifier written into results (e.g. `"medicalnet-resnet50"`).
        weights_path: The weight file the extractor was built from (`None` for random weights).
        weights_sha256: The sha256 of that file (`None` for random weights).
        comparable: Whether its numbers can be compared with results published with the same extractor and
            weights (never for random weights).
        input_size: `(D, H, W)` every volume is centre-cropped / padded to (`None`: kept as it is).
        input_spacing: `(D, H, W)` millimetres every volume is resampled to first (`None`: kept as it is).
        intensity_note: How `forward` normalises the `[-1, 1]` input before the network.
        feature_size: `F`.
    """

    name: str = "feature-extractor"
    comparable: bool = False
    intensity_note: str = ""

    def __init__(
        self,
        feature_size: int,
        input_size: tuple[int, int, int] | None = None,
        input_spacing: tuple[float, float, float] | None = None,
        weights_path: str | None = None,
        weights_sha256: str | None = None,
    ):
        super().__init__()
        self.feature_size = feature_size
        self.input_size = tuple(input_size) if input_size is not None else None
        self.input_spacing = tuple(float(s) for s in input_spacing) if input_spacing is not None else None
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256

    def prepare(self, volume: torch.Tensor, spacing: tuple[float, float, float] | None = None) -> torch.Tensor:
        """Bring one `(1, 1, D, H, W)` model-space volume with voxel `spacing` (mm, `(D, H, W)`) to the input
        convention: trilinear resampling to `input_spacing` (when both are known), then centre crop / pad with -1
        to `input_size`."""
        if self.input_spacing is not None and spacing is not None:
            volume = resample_to_spacing(volume, spacing, self.input_spacing)
        if self.input_size is not None:
            volume = center_crop_or_pad(volume, self.input_size, value=-1.0)
        return volume

    def input_convention(self) -> str:
        """A sentence describing what `prepare` and `forward` do to a volume."""
        geometry = []
        geometry.append(
            f"resampled to {self.input_spacing} mm (D, H, W)" if self.input_spacing else "kept at its own spacing"
        )
        geometry.append(
            f"centre-cropped / padded with -1 to {self.input_size} (D, H, W)"
            if self.input_size
            else "kept at its own size"
        )
        return f"RAS+ volume in [-1, 1], {', '.join(geometry)}; {self.intensity_note}"

    def describe(self) -> dict:
        """What a result needs to record about this extractor."""
        return {
            "name": self.name,
            "weights_path": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "comparable": self.comparable,
            "feature_size": self.feature_size,
            "input_size": list(self.input_size) if self.input_size else None,
            "input_spacing": list(self.input_spacing) if self.input_spacing else None,
            "input_convention": self.input_convention(),
        }

    def check_input(self, x: torch.Tensor) -> None:
        """`ValueError` unless `x` is a finite `(B, 1, D, H, W)` tensor."""
        from ..utils.validation import check_volume_tensor

        check_volume_tensor(x, "volumes", channels=1)


class RandomFeatureExtractor(FeatureExtractor):
    """A small 3D CNN with seeded random weights, for tests and smoke runs. **Never comparable** with anything but
    itself at the same seed: its features measure nothing learned.

    Three stride-2 3x3x3 convolutions (1 → 16 → 32 → 64 channels, ReLU), then the global mean and standard deviation
    of each channel (`F = 128`). Weights are drawn from a `torch.Generator` seeded with `seed` (standard normal,
    scaled by `1 / sqrt(fan_in)`), so the same seed gives the same features on every machine.

    Args:
        seed: Seed of the weights.
        input_size: Optional `(D, H, W)` to crop / pad to; every side must end up >= 8.
        input_spacing: Optional `(D, H, W)` spacing in mm to resample to.
    """

    comparable = False
    intensity_note = "no further intensity normalisation (random weights: not comparable)"

    def __init__(self, seed: int = 0, input_size=None, input_spacing=None):
        super().__init__(128, input_size=input_size, input_spacing=input_spacing)
        self.seed = seed
        self.name = f"random-seed{seed}"
        generator = torch.Generator().manual_seed(seed)
        channels = [1, 16, 32, 64]
        self.convs = nn.ModuleList(
            nn.Conv3d(c_in, c_out, 3, stride=2, padding=1) for c_in, c_out in zip(channels, channels[1:])
        )
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / fan_in**0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, 1, D, H, W)` in `[-1, 1]` → `(B, 128)`: per-channel mean and std of the last feature map."""
        self.check_input(x)
        h = x.float()
        for conv in self.convs:
            h = torch.relu(conv(h))
        h = h.flatten(2)
        return torch.cat([h.mean(2), h.std(2, correction=0)], dim=1)


def build_feature_extractor(spec: str, input_size=None, input_spacing=None) -> FeatureExtractor:
    """The extractor a `--features` string names.

    - `random` or `random:SEED`: [`RandomFeatureExtractor`] (not comparable);
    - `medicalnet10|18|34|50:PATH`: [`MedicalNetFeatureExtractor`] from a local MedicalNet weight file, fed the
      `[-1, 1]` volumes as they are (HA-GAN); `medicalnet50-zscore:PATH` z-scores each volume first;
    - `maisi25d:BACKBONE:PATH`: [`Planes25DFeatureExtractor`] running the torchvision 2D `BACKBONE` (e.g.
      `resnet50`) from a local weight file over the three orthogonal planes.

    Nothing is downloaded. `input_size` / `input_spacing` override the extractor's defaults.
    """
    kind, _, rest = spec.partition(":")
    options = {"input_size": input_size, "input_spacing": input_spacing}
    if kind == "random":
        try:
            seed = int(rest) if rest else 0
        except ValueError:
            raise ValueError(f"--features {spec!r}: the seed after 'random:' must be an integer.") from None
        return RandomFeatureExtractor(seed, **options)
    if kind.startswith("medicalnet"):
        from .medicalnet import MEDICALNET_DEPTHS, MedicalNetFeatureExtractor

        depth, _, normalization = kind[len("medicalnet") :].partition("-")
        valid_depth = depth.isdigit() and int(depth) in MEDICALNET_DEPTHS
        if not valid_depth or not rest or normalization not in ("", "zscore"):
            raise ValueError(
                f"--features {spec!r}: use medicalnet<depth>:PATH or medicalnet<depth>-zscore:PATH with depth one "
                f"of {sorted(MEDICALNET_DEPTHS)}, e.g. medicalnet50:resnet_50.pth."
            )
        return MedicalNetFeatureExtractor.from_weights(
            rest, depth=int(depth), normalization=normalization or "none", **options
        )
    if kind == "maisi25d":
        from .planes import Planes25DFeatureExtractor

        backbone, _, path = rest.partition(":")
        if not backbone or not path:
            raise ValueError(
                f"--features {spec!r}: use maisi25d:<torchvision backbone>:PATH, e.g. maisi25d:resnet50:w.pth."
            )
        return Planes25DFeatureExtractor.from_torchvision(backbone, path, **options)
    raise ValueError(
        f"Unknown --features {spec!r}; use random[:SEED], medicalnet<10|18|34|50>:PATH or maisi25d:<backbone>:PATH."
    )
