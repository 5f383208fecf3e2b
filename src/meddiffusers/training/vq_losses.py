"""Losses of the Patch-Volume autoencoder: 3D PatchGAN discriminator, hinge GAN, feature matching, tri-plane
perceptual loss."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from diffusers.utils import logging
from torch import nn

logger = logging.get_logger(__name__)


class PatchDiscriminator3D(nn.Module):
    """3D PatchGAN discriminator returning its logits and every intermediate feature map (for feature matching).

    `num_layers` stride-2 convolutions (kernel 4, padding 2; BatchNorm from the second on, LeakyReLU 0.2), one
    stride-1 convolution at twice the width, and a stride-1 convolution to one logit channel.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 32, num_layers: int = 3):
        super().__init__()
        layers, width, previous = [], base_channels, in_channels
        for index in range(num_layers + 1):
            stride = 2 if index < num_layers else 1
            block = [nn.Conv3d(previous, width, kernel_size=4, stride=stride, padding=2)]
            if index > 0:
                block.append(nn.BatchNorm3d(width))
            block.append(nn.LeakyReLU(0.2, inplace=True))
            layers.append(nn.Sequential(*block))
            previous, width = width, min(width * 2, base_channels * 8)
        layers.append(nn.Conv3d(previous, 1, kernel_size=4, stride=1, padding=2))
        self.layers = nn.ModuleList(layers)

    def forward(self, volume: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = []
        for layer in self.layers:
            volume = layer(volume)
            features.append(volume)
        return volume, features[:-1]


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """`0.5 · (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))`."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """`-mean D(x̂)`: the generator side of the hinge GAN."""
    return -fake_logits.mean()


def feature_matching_loss(fake_features, real_features) -> torch.Tensor:
    """Sum over discriminator layers of `mean |D_i(x̂) - sg(D_i(x))|`."""
    return sum(F.l1_loss(fake, real.detach()) for fake, real in zip(fake_features, real_features))


VGG16_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# Index (in `features`) of the ReLU that ends each LPIPS stage: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16_TAPS = (3, 8, 15, 22, 29)


class VGG16Features(nn.Module):
    """The convolutional part of VGG16 with the same `features.<index>` parameter names as torchvision, returning the
    five LPIPS feature maps. Weights are never downloaded: load them with [`VGG16Features.from_file`]."""

    def __init__(self):
        super().__init__()
        layers, previous = [], 3
        for item in VGG16_LAYERS:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(previous, item, 3, padding=1), nn.ReLU(inplace=False)]
                previous = item
        self.features = nn.Sequential(*layers)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> VGG16Features:
        """Load VGG16 weights from a local `.safetensors` or `.pth` file (torchvision key names, `features.*`)."""
        path = os.fspath(path)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        model = cls()
        wanted = {k: v for k, v in state_dict.items() if k.startswith("features.")}
        missing = set(model.features.state_dict()) - {k[len("features.") :] for k in wanted}
        if missing:
            raise ValueError(f"{path!r} is not a VGG16 weight file (missing {sorted(missing)[:4]}).")
        model.features.load_state_dict({k[len("features.") :]: v for k, v in wanted.items()})
        return model.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        hidden, taps = (images - self.shift) / self.scale, []
        for index, layer in enumerate(self.features):
            hidden = layer(hidden)
            if index in VGG16_TAPS:
                taps.append(hidden)
            if index == VGG16_TAPS[-1]:
                break
        return taps


class TriPlanePerceptualLoss(nn.Module):
    """LPIPS-style distance on random slices along the three axes of `(B, 1, D, H, W)` volumes.

    For each axis a random `fraction` of slice positions (shared by input and reconstruction) is compared with the
    2D network's unit-normalised features; the three means are summed.
    """

    def __init__(self, network: nn.Module, fraction: float = 0.2):
        super().__init__()
        self.network = network
        self.fraction = fraction

    def _distance(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for a, b in zip(self.network(first.expand(-1, 3, -1, -1)), self.network(second.expand(-1, 3, -1, -1))):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (a - b).square().sum(dim=1).mean()
        return total

    def forward(self, target: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        loss = 0.0
        for axis in (2, 3, 4):
            count = max(1, int(target.shape[axis] * self.fraction))
            chosen = torch.randperm(target.shape[axis], device=target.device)[:count]
            slices = [volume.index_select(axis, chosen).movedim(axis, 1) for volume in (target, reconstruction)]
            flat = [s.reshape(-1, 1, *s.shape[3:]) for s in slices]
            loss = loss + self._distance(flat[0], flat[1])
        return loss


def build_perceptual_loss(weights_path: str | None) -> TriPlanePerceptualLoss | None:
    """The tri-plane perceptual loss from local VGG16 weights, or `None` (with a warning) when no path is given."""
    if not weights_path:
        logger.warning(
            "No --perceptual_weights given: the tri-plane perceptual loss is OFF. Pass a local VGG16 weight file "
            "(torchvision `features.*` names, .pth or .safetensors) to enable it; nothing is downloaded."
        )
        return None
    return TriPlanePerceptualLoss(VGG16Features.from_file(weights_path))
