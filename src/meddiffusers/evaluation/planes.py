"""MAISI's 2.5D features: a 2D backbone run over every slice of the three orthogonal planes.

The protocol of MAISI's `compute_fid_2-5d_ct.py` (Project-MONAI tutorials), with the tensor axes of this library
(`D, H, W` = NIfTI `z, x, y` of a RAS+ volume):

- geometry (done by [`FeatureExtractor.prepare`] and the caller): RAS+ orientation, optional resampling to a
  spacing, padding with the background and centre cropping to a target shape;
- intensity: CT clipped to `[-1000, 1000]` HU (the `ct-wide` window, i.e. `[-1, 1]` in model space), then, per
  volume and plane, min-max scaled to `[0, 1]` over the selected slices, repeated to 3 channels and shifted by the
  channel means `(0.406, 0.456, 0.485)`;
- slices: every slice along each axis (or only the central `center_slices_ratio` of them): the "xy" plane slices
  along D and shows `(x, y)`; "yz" slices along H and shows `(y, z)`; "zx" slices along W and shows `(x, z)`;
- features: the backbone's output, spatially averaged when it is a feature map, one vector per slice;
- FID: computed per plane between the slice features of the two sets, then averaged over the three planes
  ([`maisi_frechet_distance`]).

The backbone is any `torch.nn.Module` taking `(N, 3, h, w)`; [`Planes25DFeatureExtractor.from_torchvision`] builds a
torchvision architecture (an optional dependency: `pip install meddiffusers[evaluation]`) from a local weight file.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .features import FeatureExtractor, check_sha256, load_weight_file
from .metrics import frechet_distance

PLANES = ("xy", "yz", "zx")
#: Channel means MAISI subtracts after min-max scaling (listed in its order of the channels).
MAISI_CHANNEL_MEANS = (0.406, 0.456, 0.485)


def _plane_slices(volume: torch.Tensor, plane: str) -> torch.Tensor:
    """All 2D slices of one `(1, D, H, W)` volume in `plane`, as `(S, 1, h, w)` in MAISI's in-plane order."""
    if plane == "xy":
        return volume.permute(1, 0, 2, 3)  # along D: (H, W) = (x, y)
    if plane == "yz":
        return volume.permute(2, 0, 3, 1)  # along H: (W, D) = (y, z)
    return volume.permute(3, 0, 2, 1)  # along W: (H, D) = (x, z)


class Planes25DFeatureExtractor(FeatureExtractor):
    """2.5D features (MAISI's protocol) of a 2D backbone.

    `forward` gives one `(B, 3F)` vector per volume (the mean slice feature of each plane, concatenated: xy, yz,
    zx) for KID / MMD; [`plane_features`] gives the per-slice features that MAISI's FID uses.

    Args:
        backbone: 2D network `(N, 3, h, w)` → `(N, F)` or `(N, F, h', w')`.
        feature_size: `F`.
        name: Identifier written into results.
        weights_path, weights_sha256: The backbone's weight file (`None`: not comparable).
        center_slices_ratio: Keep only the central fraction of the slices of each axis (MAISI's
            `enable_center_slices_ratio`, e.g. 0.4); `None` keeps all.
        input_size, input_spacing: See [`FeatureExtractor`].
    """

    intensity_note = (
        "per volume and plane min-max scaled to [0, 1], repeated to 3 channels, channel means (0.406, 0.456, 0.485) "
        "subtracted (MAISI 2.5D); use --intensity ct-wide for CT as MAISI clips to [-1000, 1000] HU"
    )

    def __init__(
        self,
        backbone: nn.Module,
        feature_size: int,
        name: str = "maisi25d",
        weights_path: str | None = None,
        weights_sha256: str | None = None,
        center_slices_ratio: float | None = None,
        input_size=None,
        input_spacing=None,
        slice_batch_size: int = 64,
    ):
        super().__init__(feature_size * len(PLANES), input_size, input_spacing, weights_path, weights_sha256)
        if center_slices_ratio is not None and not 0 < center_slices_ratio <= 1:
            raise ValueError(f"`center_slices_ratio` must be in (0, 1], got {center_slices_ratio}.")
        self.backbone = backbone.eval()
        self.slice_feature_size = feature_size
        self.name = name
        self.center_slices_ratio = center_slices_ratio
        self.slice_batch_size = slice_batch_size
        self.comparable = weights_path is not None

    @classmethod
    def from_torchvision(
        cls, architecture: str, path: str | os.PathLike, expected_sha256: str | None = None, **kwargs
    ) -> Planes25DFeatureExtractor:
        """Build torchvision's `architecture` (e.g. `resnet50`, `squeezenet1_1`) without weights, then load the local
        file `path` (safetensors or a PyTorch pickle, read without executing code) with its head removed: ResNets
        keep everything up to the global average pool (`fc` is dropped), other models their `features` part.

        RadImageNet's ResNet-50 (MAISI's default) has torchvision's ResNet-50 layout once its keys are renamed to
        torchvision's (`conv1`, `bn1`, `layer1` ...); the file must use those names.
        """
        try:
            import torchvision
        except ImportError:
            raise ValueError(
                "The 2.5D extractor (--features maisi25d:...) needs torchvision, which is not installed: "
                "pip install 'meddiffusers[evaluation]' (or pip install torchvision matching your torch)."
            ) from None
        except (RuntimeError, OSError) as error:  # e.g. a CUDA torchvision wheel next to a CPU-only torch
            raise ValueError(
                f"torchvision is installed but cannot be imported ({' '.join(str(error).split())[:200]}): install "
                "the torchvision build that matches your torch (same version pairing and the same CPU/CUDA index)."
            ) from None
        builder = getattr(torchvision.models, architecture, None)
        if builder is None or not callable(builder):
            raise ValueError(f"torchvision has no model {architecture!r} (e.g. resnet50, resnet18, squeezenet1_1).")
        model = builder(weights=None)
        path = os.fspath(path)
        state_dict = {k.removeprefix("module."): v for k, v in load_weight_file(path).items()}
        digest = check_sha256(path, expected_sha256)
        if hasattr(model, "fc"):
            feature_size = model.fc.in_features
            model.fc = nn.Identity()
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
            backbone = model
        elif hasattr(model, "features"):
            backbone = model.features
            state_dict = {k[len("features.") :]: v for k, v in state_dict.items() if k.startswith("features.")}
            with torch.no_grad():
                feature_size = backbone(torch.zeros(1, 3, 64, 64)).shape[1]
        else:
            raise ValueError(
                f"torchvision's {architecture!r} has neither `fc` nor `features`; pass a backbone instead."
            )
        expected = backbone.state_dict()
        missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state_dict if k not in expected]
        shapes = [k for k in state_dict if k in expected and state_dict[k].shape != expected[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(
                f"{path!r} does not fit torchvision's {architecture}: missing {missing[:8]}, unexpected "
                f"{unexpected[:8]}, shape mismatches {shapes[:8]} (check the architecture name and the key names)."
            )
        backbone.load_state_dict(state_dict, strict=False)  # only num_batches_tracked counters may be absent
        return cls(
            backbone, feature_size, name=f"maisi25d-{architecture}", weights_path=path, weights_sha256=digest, **kwargs
        )

    def _selected(self, slices: torch.Tensor) -> torch.Tensor:
        if self.center_slices_ratio is None:
            return slices
        count = slices.shape[0]
        start = int((1.0 - self.center_slices_ratio) / 2.0 * count)
        end = int((1.0 + self.center_slices_ratio) / 2.0 * count)
        return slices[start:end]

    def _normalise(self, slices: torch.Tensor) -> torch.Tensor:
        low, high = slices.min(), slices.max()
        scaled = (slices - low) / (high - low + 1e-10)
        means = torch.tensor(MAISI_CHANNEL_MEANS, dtype=scaled.dtype, device=scaled.device).view(1, 3, 1, 1)
        return scaled.expand(-1, 3, -1, -1) - means

    def _backbone(self, images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for start in range(0, images.shape[0], self.slice_batch_size):
            out = self.backbone(images[start : start + self.slice_batch_size])
            outputs.append(out.flatten(2).mean(2) if out.ndim > 2 else out)
        return torch.cat(outputs)

    @torch.no_grad()
    def plane_features(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Per-slice features: `{"xy" | "yz" | "zx": [one (S, F) tensor per volume]}` for `(B, 1, D, H, W)` input."""
        self.check_input(x)
        features = {plane: [] for plane in PLANES}
        for volume in x.float():
            for plane in PLANES:
                slices = self._normalise(self._selected(_plane_slices(volume, plane)))
                features[plane].append(self._backbone(slices))
        return features

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, 1, D, H, W)` → `(B, 3F)`: the mean slice feature of each plane, concatenated (xy, yz, zx)."""
        planes = self.plane_features(x)
        return torch.stack(
            [torch.cat([planes[plane][index].mean(0) for plane in PLANES]) for index in range(x.shape[0])]
        )


def maisi_frechet_distance(
    real: dict[str, list[torch.Tensor]], fake: dict[str, list[torch.Tensor]]
) -> dict[str, float]:
    """MAISI's 2.5D FID: the Fréchet distance of the stacked slice features of each plane, and their mean.

    Args:
        real, fake: Outputs of [`Planes25DFeatureExtractor.plane_features`] (lists may be concatenated over batches).

    Returns:
        `{"fid_xy": ..., "fid_yz": ..., "fid_zx": ..., "fid": mean of the three}`.
    """
    values = {f"fid_{plane}": frechet_distance(torch.cat(real[plane]), torch.cat(fake[plane])) for plane in PLANES}
    values["fid"] = sum(values.values()) / len(PLANES)
    return values
