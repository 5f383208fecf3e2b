"""MedicalNet's 3D ResNets (Chen, Ma and Zheng 2019, "Med3D") as feature extractors, from a user's weight file.

The layout follows the released `models/resnet.py` of Tencent/MedicalNet so that its checkpoints load by name:
`conv1` (7³, stride 2, 1 → 64) · `bn1` · max-pool (3³, stride 2) · `layer1` … `layer4` (64, 128, 256, 512 planes;
`layer2` has stride 2, `layer3` and `layer4` stride 1 with dilation 2 and 4), each block `conv1`/`bn1`/`conv2`/
`bn2` (+ `conv3`/`bn3` for bottlenecks) and, where the shape changes, a `downsample` (`0` = 1³ conv, `1` = batch
norm) for shortcut type B, or a parameter-free strided subsampling padded with zero channels for type A. The
segmentation head `conv_seg` of the released files is not used; features are the global average of `layer4`
(512 channels for depths 10/18/34, 2048 for 50).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .features import FeatureExtractor, check_sha256, load_weight_file

#: depth -> (block, blocks per layer, shortcut type), as in MedicalNet's README ("resnet_18: --resnet_shortcut A").
MEDICALNET_DEPTHS = {
    10: ("basic", (1, 1, 1, 1), "B"),
    18: ("basic", (2, 2, 2, 2), "A"),
    34: ("basic", (3, 4, 6, 3), "A"),
    50: ("bottleneck", (3, 4, 6, 3), "B"),
}

#: Published sha256 of the released weight files. MedicalNet publishes none: its files come as one archive from
#: Google Drive / Tencent Weiyun, and the Hugging Face copies (`TencentMedicalNet/MedicalNet-Resnet*`) state no
#: checksum in their model cards. The table stays empty, so the sha256 of the file used is computed, printed and
#: recorded with every result; pass `expected_sha256` to pin a file you trust.
MEDICALNET_SHA256: dict[str, str] = {}
#: Intensity normalisations of [`MedicalNetFeatureExtractor`].
MEDICALNET_NORMALIZATIONS = ("none", "zscore")


def _conv3(in_planes: int, planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class _ZeroPadShortcut(nn.Module):
    """Shortcut type A: subsample by `stride` (a 1³ average pool) and append zero channels up to `planes`."""

    def __init__(self, planes: int, stride: int):
        super().__init__()
        self.planes, self.stride = planes, stride

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.planes - x.shape[1]))


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3(in_planes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv3d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class MedicalNetResNet3D(nn.Module):
    """The MedicalNet 3D ResNet encoder (no segmentation head): `(B, 1, D, H, W)` → `layer4` feature map.

    Args:
        depth: 10, 18, 34 or 50.
        shortcut_type: `"A"` (zero padding) or `"B"` (1³ convolution); default: MedicalNet's choice for `depth`.
    """

    def __init__(self, depth: int = 50, shortcut_type: str | None = None):
        super().__init__()
        if depth not in MEDICALNET_DEPTHS:
            raise ValueError(f"`depth` must be one of {sorted(MEDICALNET_DEPTHS)}, got {depth!r}.")
        kind, blocks, default_shortcut = MEDICALNET_DEPTHS[depth]
        self.shortcut_type = shortcut_type or default_shortcut
        if self.shortcut_type not in ("A", "B"):
            raise ValueError(f"`shortcut_type` must be 'A' or 'B', got {shortcut_type!r}.")
        block = _BasicBlock if kind == "basic" else _Bottleneck
        self.depth = depth
        self.out_channels = 512 * block.expansion
        self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self.in_planes = 64
        self.layer1 = self._make_layer(block, 64, blocks[0])
        self.layer2 = self._make_layer(block, 128, blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, blocks[2], dilation=2)
        self.layer4 = self._make_layer(block, 512, blocks[3], dilation=4)

    def _make_layer(self, block, planes, count, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.in_planes != planes * block.expansion:
            if self.shortcut_type == "A":
                downsample = _ZeroPadShortcut(planes * block.expansion, stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self.in_planes, planes * block.expansion, 1, stride=stride, bias=False),
                    nn.BatchNorm3d(planes * block.expansion),
                )
        layers = [block(self.in_planes, planes, stride, dilation, downsample)]
        self.in_planes = planes * block.expansion
        layers += [block(self.in_planes, planes, dilation=dilation) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The `layer4` feature map `(B, out_channels, D/8, H/8, W/8)` (rounded up)."""
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def medicalnet_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict, list[str]]:
    """Match a MedicalNet checkpoint's names to [`MedicalNetResNet3D`]: drop the `module.` prefix of
    DataParallel checkpoints and the `conv_seg` head, then check the keys strictly.

    BatchNorm `num_batches_tracked` counters (absent from files saved by PyTorch < 0.4.1) may be missing; any other
    missing or unexpected key raises a `ValueError` listing them (typically a depth or shortcut type that does not
    match the file).

    Returns:
        The renamed state dict and the list of dropped original keys.
    """
    renamed, dropped = {}, []
    for key, value in state_dict.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name.startswith("conv_seg.") or name.startswith("fc."):
            dropped.append(key)
        else:
            renamed[name] = value
    expected = model.state_dict()
    missing = [k for k in expected if k not in renamed and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in renamed if k not in expected]
    shapes = [
        f"{k} {tuple(renamed[k].shape)} (model {tuple(expected[k].shape)})"
        for k in renamed
        if k in expected and renamed[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:

        def listed(keys):
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

        problems = []
        if missing:
            problems.append(f"missing {len(missing)} key(s): {listed(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} key(s): {listed(unexpected)}")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatch(es): {listed(shapes)}")
        raise ValueError(
            f"The weights do not fit MedicalNet ResNet-{getattr(model, 'depth', '?')} (shortcut "
            f"{getattr(model, 'shortcut_type', '?')}): {'; '.join(problems)}. Check the depth in --features "
            "(medicalnet10/18/34/50) against the file name."
        )
    for key, value in expected.items():  # counters the old files lack
        renamed.setdefault(key, value)
    return renamed, dropped


class MedicalNetFeatureExtractor(FeatureExtractor):
    """Global-average-pooled `layer4` features of a MedicalNet 3D ResNet (ResNet-50 is the encoder of the HA-GAN
    FID / MMD protocol that 3D MedDiffusion reports).

    Intensity (`normalization`):
    - `"none"` (default): the `[-1, 1]` volume goes into the network as it is, as HA-GAN's `evaluation/fid_score.py`
      does (its generated and real volumes are both in `[-1, 1]`);
    - `"zscore"`: each volume is z-scored over all its voxels first, `(x - mean) / (std + 1e-5)`, the normalisation
      MedicalNet was trained with (as MONAI's MedicalNet perceptual loss and MAISI's scripts apply it).

    Build it with [`from_weights`]; the network runs in eval mode (batch-norm running statistics).

    Args:
        network: A [`MedicalNetResNet3D`] with loaded weights.
        weights_path, weights_sha256: The file it came from.
        input_size, input_spacing: See [`FeatureExtractor`] (default: volumes kept as they are; the network is fully
            convolutional and pools globally, but features depend on the field of view and voxel size, so fix both
            for any comparison; HA-GAN used 256³ volumes).
        normalization: `"none"` or `"zscore"`.
    """

    comparable = True

    def __init__(
        self,
        network: MedicalNetResNet3D,
        weights_path=None,
        weights_sha256=None,
        input_size=None,
        input_spacing=None,
        normalization: str = "none",
    ):
        super().__init__(network.out_channels, input_size, input_spacing, weights_path, weights_sha256)
        if normalization not in MEDICALNET_NORMALIZATIONS:
            raise ValueError(f"`normalization` must be one of {MEDICALNET_NORMALIZATIONS}, got {normalization!r}.")
        self.network = network.eval()
        self.normalization = normalization
        self.name = f"medicalnet-resnet{network.depth}"
        self.comparable = weights_path is not None
        self.intensity_note = (
            "z-scored per volume ((x - mean) / (std + 1e-5)) before the network"
            if normalization == "zscore"
            else "[-1, 1] values fed to the network as they are (HA-GAN)"
        )

    @classmethod
    def from_weights(
        cls,
        path: str | os.PathLike,
        depth: int = 50,
        shortcut_type: str | None = None,
        expected_sha256: str | None = None,
        input_size=None,
        input_spacing=None,
        normalization: str = "none",
    ) -> MedicalNetFeatureExtractor:
        """Build the extractor from a local MedicalNet file (`resnet_50_23dataset.pth`, ...) or a safetensors copy.

        The file is read without executing code ([`load_weight_file`]), its sha256 is computed and checked against
        `expected_sha256` or the published one where known ([`MEDICALNET_SHA256`]: none are published), and the
        original key names load strictly ([`medicalnet_state_dict`]).
        """
        path = os.fspath(path)
        state_dict = load_weight_file(path)
        expected = expected_sha256 or MEDICALNET_SHA256.get(os.path.basename(path))
        digest = check_sha256(path, expected)
        network = MedicalNetResNet3D(depth, shortcut_type)
        weights, _ = medicalnet_state_dict(state_dict, network)
        network.load_state_dict(weights, strict=True)
        return cls(network, path, digest, input_size, input_spacing, normalization)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, 1, D, H, W)` in `[-1, 1]` → `(B, 512 or 2048)`."""
        self.check_input(x)
        x = x.float()
        if self.normalization == "zscore":
            flat = x.flatten(1)
            x = (x - flat.mean(1).view(-1, 1, 1, 1, 1)) / (flat.std(1).view(-1, 1, 1, 1, 1) + 1e-5)
        return self.network(x).mean(dim=(2, 3, 4))
