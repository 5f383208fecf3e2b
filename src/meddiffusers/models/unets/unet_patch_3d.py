"""`PatchUNet3DModel`: MedDiff-FM's pixel-space 3D U-Net for CT patches with global position, region and anatomy.

MedDiff-FM (Yu et al., arXiv 2410.15432) trains one denoiser on 128³ windows of CT volumes at several scales. The
network sees, concatenated to the noisy window, where the window lies in the whole region volume (an encoding of the
global voxel coordinates) and optionally the window's anatomy mask; the region (head and neck, chest, abdomen) is a
class embedding. The paper gives the base width (32), one residual block per level and a spatial transformer at the
16³ level of a 128³ input; every other choice is a config value (`docs/source/en/api/models/patch_unet_3d.md`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ...utils.coordinates import window_coordinates
from ...utils.validation import check_volume_tensor
from ..attention import SpatialTransformer3D
from ..embeddings import fourier_position_encoding, position_encoding_channels
from ..modeling_utils import PortableConfigMixin
from ..resnet import ConditionedResnetBlock3D
from ..sampling import Downsample3D, Upsample3D

ANATOMY_ENCODINGS = ("label_map", "one_hot", "binary_bits")


def anatomy_channels(encoding: str | None, num_classes: int) -> int:
    """Input channels an anatomy mask takes under `encoding` (0 without anatomy conditioning)."""
    if encoding is None:
        return 0
    if encoding not in ANATOMY_ENCODINGS:
        raise ValueError(f"`anatomy_encoding` must be None or one of {ANATOMY_ENCODINGS}, got {encoding!r}.")
    if encoding == "label_map":
        return 1
    if encoding == "one_hot":
        return num_classes
    return max(1, math.ceil(math.log2(num_classes + 1)))


def encode_anatomy(labels: torch.Tensor, encoding: str, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Integer anatomy labels `(B, 1, D, H, W)` (0 background, `1 .. num_classes`) as input channels.

    `"label_map"`: one channel, `label / num_classes * 2 - 1` (background -1). `"one_hot"`: one channel per class
    (background is all zeros). `"binary_bits"`: the label's bits, least significant first, as 0 / 1 channels.
    """
    labels = labels.long()
    if encoding == "label_map":
        return (labels.to(dtype) / num_classes) * 2 - 1
    if encoding == "one_hot":
        one_hot = F.one_hot(labels[:, 0], num_classes + 1)[..., 1:]
        return one_hot.permute(0, 4, 1, 2, 3).to(dtype)
    bits = torch.arange(anatomy_channels(encoding, num_classes), device=labels.device)
    return ((labels >> bits[None, :, None, None, None]) & 1).to(dtype)


@dataclass
class PatchUNet3DOutput(BaseOutput):
    """Output of [`PatchUNet3DModel`].

    Args:
        sample (`torch.Tensor`): The noise prediction, `(B, out_channels, D, H, W)`.
    """

    sample: torch.Tensor


class PatchDownLevel3D(nn.Module):
    """One encoder level: residual blocks (each followed by a spatial transformer where enabled), then a 2x
    downsampler unless it is the deepest level. Returns the features and every skip it produces."""

    def __init__(self, in_channels, out_channels, num_layers, cond_dim, groups, attention, heads, head_dim, cross_dim,
                 transformer_layers, downsample):  # fmt: skip
        super().__init__()
        self.resnets = nn.ModuleList(
            ConditionedResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, cond_dim, groups)
            for i in range(num_layers)
        )
        self.attentions = nn.ModuleList(
            SpatialTransformer3D(out_channels, heads, head_dim, transformer_layers, cross_dim, groups)
            for _ in range(num_layers if attention else 0)
        )
        self.downsampler = Downsample3D(out_channels) if downsample else None
        self.gradient_checkpointing = False

    def forward(self, hidden, condition, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            hidden = _run(self, resnet, hidden, condition)
            if self.attentions:
                hidden = _run(self, self.attentions[i], hidden, context)
            skips.append(hidden)
        if self.downsampler is not None:
            hidden = self.downsampler(hidden)
            skips.append(hidden)
        return hidden, skips


class PatchUpLevel3D(nn.Module):
    """One decoder level: residual blocks on the features concatenated with the matching skips (one more block than
    the encoder level), spatial transformers where enabled, then a 2x upsampler unless it is the shallowest level."""

    def __init__(self, in_channels, skip_channels, out_channels, cond_dim, groups, attention, heads, head_dim,
                 cross_dim, transformer_layers, upsample):  # fmt: skip
        super().__init__()
        widths = [in_channels] + [out_channels] * (len(skip_channels) - 1)
        self.resnets = nn.ModuleList(
            ConditionedResnetBlock3D(width + skip, out_channels, cond_dim, groups)
            for width, skip in zip(widths, skip_channels)
        )
        self.attentions = nn.ModuleList(
            SpatialTransformer3D(out_channels, heads, head_dim, transformer_layers, cross_dim, groups)
            for _ in range(len(skip_channels) if attention else 0)
        )
        self.upsampler = Upsample3D(out_channels) if upsample else None
        self.gradient_checkpointing = False

    def forward(self, hidden, skips, condition, context):
        for i, resnet in enumerate(self.resnets):
            hidden = _run(self, resnet, torch.cat([hidden, skips.pop()], dim=1), condition)
            if self.attentions:
                hidden = _run(self, self.attentions[i], hidden, context)
        if self.upsampler is not None:
            hidden = self.upsampler(hidden)
        return hidden


class PatchMidBlock3D(nn.Module):
    """`resnet -> spatial transformer (optional) -> resnet` at the deepest resolution."""

    def __init__(self, channels, cond_dim, groups, attention, heads, head_dim, cross_dim, transformer_layers):
        super().__init__()
        self.resnets = nn.ModuleList(ConditionedResnetBlock3D(channels, channels, cond_dim, groups) for _ in range(2))
        self.attention = (
            SpatialTransformer3D(channels, heads, head_dim, transformer_layers, cross_dim, groups)
            if attention
            else None
        )
        self.gradient_checkpointing = False

    def forward(self, hidden, condition, context):
        hidden = _run(self, self.resnets[0], hidden, condition)
        if self.attention is not None:
            hidden = _run(self, self.attention, hidden, context)
        return _run(self, self.resnets[1], hidden, condition)


def _run(owner: nn.Module, block: nn.Module, *args):
    """`block(*args)`, through activation checkpointing while `owner` trains with gradient checkpointing on."""
    if owner.gradient_checkpointing and torch.is_grad_enabled():
        return owner._gradient_checkpointing_func(block, *args)
    return block(*args)


class PatchUNet3DModel(PortableConfigMixin, ModelMixin, AttentionMixin, ConfigMixin):
    r"""MedDiff-FM's conditional 3D U-Net: predicts the noise of a CT window from its global position, region and
    anatomy.

    The input of the first convolution is the noisy window, then the encoding of its global coordinates
    (`[p, sin(2^k π p), cos(2^k π p)]`, `k < num_position_frequencies`, per axis), then the encoded anatomy mask.
    Every level has `layers_per_block` conditioned residual blocks (FiLM from the timestep + region embedding);
    levels marked in `attention_levels` and the middle block add a [`SpatialTransformer3D`] (diffusers' transformer
    block; with `region_cross_attention` it also attends to the region embedding). Sides must be multiples of
    `2 ** (len(block_out_channels) - 1)`.

    Parameters:
        in_channels: Image channels of the noisy sample (1 for CT).
        out_channels: Channels of the prediction.
        block_out_channels: Width of each level (`(32, 64, 128, 128)`: a 128³ window reaches 16³ at the last level).
        layers_per_block: Residual blocks per encoder level (the decoder has one more).
        attention_levels: Whether each level has spatial transformers (the paper's 16³ level by default).
        mid_block_attention: Whether the middle block has one.
        attention_head_dim: Features per attention head (heads = width / head_dim).
        transformer_layers: Transformer blocks per spatial transformer.
        norm_num_groups: GroupNorm groups (divides every width; `attention_head_dim` divides the widths with
            attention).
        num_class_embeds: Number of regions (a class embedding added to the timestep embedding); `None` for none.
        region_cross_attention: Also feed the region embedding as the spatial transformers' context token.
        num_position_frequencies: Octaves `L` of the position encoding (0 for raw coordinates only).
        include_raw_position: Keep the raw coordinates as 3 input channels.
        anatomy_encoding: `None`, `"label_map"`, `"one_hot"` or `"binary_bits"` (see [`encode_anatomy`]).
        num_anatomy_classes: Anatomy labels other than background (118 in the paper: 117 TotalSegmentator classes and
            the body).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["PatchDownLevel3D", "PatchUpLevel3D", "PatchMidBlock3D"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        block_out_channels: Sequence[int] = (32, 64, 128, 128),
        layers_per_block: int = 1,
        attention_levels: Sequence[bool] = (False, False, False, True),
        mid_block_attention: bool = True,
        attention_head_dim: int = 32,
        transformer_layers: int = 1,
        norm_num_groups: int = 16,
        num_class_embeds: int | None = 3,
        region_cross_attention: bool = False,
        num_position_frequencies: int = 4,
        include_raw_position: bool = True,
        anatomy_encoding: str | None = None,
        num_anatomy_classes: int = 118,
    ):
        super().__init__()
        widths = list(block_out_channels)
        if len(attention_levels) != len(widths):
            raise ValueError(
                f"`attention_levels` needs one flag per level ({len(widths)}), got {list(attention_levels)}."
            )
        attended = [w for w, on in zip(widths, attention_levels) if on] + ([widths[-1]] if mid_block_attention else [])
        bad = sorted({w for w in widths if w % norm_num_groups} | {w for w in attended if w % attention_head_dim})
        if bad:
            raise ValueError(
                f"Widths {bad} of `block_out_channels` {widths} are not divisible by `norm_num_groups` "
                f"({norm_num_groups}) or, at levels with attention, by `attention_head_dim` ({attention_head_dim})."
            )
        if num_position_frequencies < 0:
            raise ValueError(f"`num_position_frequencies` must be >= 0, got {num_position_frequencies}.")
        if region_cross_attention and not num_class_embeds:
            raise ValueError("`region_cross_attention` needs regions: set `num_class_embeds`.")
        self.position_channels = (
            position_encoding_channels(num_position_frequencies, include_raw_position)
            if num_position_frequencies or include_raw_position
            else 0
        )
        self.anatomy_channels = anatomy_channels(anatomy_encoding, num_anatomy_classes)

        cond_dim = widths[0] * 4
        self.time_proj = Timesteps(widths[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(widths[0], cond_dim)
        self.class_embedding = nn.Embedding(num_class_embeds, cond_dim) if num_class_embeds else None
        cross_dim = cond_dim if region_cross_attention else None
        total_in = in_channels + self.position_channels + self.anatomy_channels
        self.conv_in = nn.Conv3d(total_in, widths[0], kernel_size=3, padding=1)

        def transformer_args(width):
            return dict(heads=width // attention_head_dim, head_dim=attention_head_dim, cross_dim=cross_dim,
                        transformer_layers=transformer_layers)  # fmt: skip

        self.down_blocks = nn.ModuleList()
        skip_channels = [widths[0]]
        previous = widths[0]
        for level, width in enumerate(widths):
            last = level == len(widths) - 1
            self.down_blocks.append(
                PatchDownLevel3D(
                    previous,
                    width,
                    layers_per_block,
                    cond_dim,
                    norm_num_groups,
                    attention_levels[level],
                    downsample=not last,
                    **transformer_args(width),
                )  # fmt: skip
            )
            skip_channels += [width] * (layers_per_block + (not last))
            previous = width
        self.mid_block = PatchMidBlock3D(
            previous, cond_dim, norm_num_groups, mid_block_attention, **transformer_args(previous)
        )
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            skips = [skip_channels.pop() for _ in range(layers_per_block + 1)]
            self.up_blocks.append(
                PatchUpLevel3D(
                    previous,
                    skips,
                    width,
                    cond_dim,
                    norm_num_groups,
                    attention_levels[level],
                    upsample=level > 0,
                    **transformer_args(width),
                )  # fmt: skip
            )
            previous = width
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, previous, eps=1e-6)
        self.conv_out = nn.Conv3d(previous, out_channels, kernel_size=3, padding=1)

    @property
    def size_multiple(self) -> int:
        """Every spatial side of the input must be a multiple of this (2 per downsampling)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def skip_channels(self) -> list[int]:
        """Channels of each encoder skip, in the order of `down_block_additional_residuals`."""
        widths, layers = list(self.config.block_out_channels), self.config.layers_per_block
        channels = [widths[0]]
        for level, width in enumerate(widths):
            channels += [width] * (layers + (level < len(widths) - 1))
        return channels

    def check_inputs(self, sample, class_labels, position, anatomy) -> None:
        """Raise a `ValueError` naming the argument when an input does not fit this model."""
        check_volume_tensor(sample, "sample", channels=self.config.in_channels)
        batch, spatial = sample.shape[0], tuple(sample.shape[2:])
        if any(side % self.size_multiple for side in spatial):
            raise ValueError(
                f"Spatial sides must be multiples of {self.size_multiple} ({len(self.config.block_out_channels) - 1} "
                f"downsamplings); got {spatial}. Pad or crop the volume, or use a window size that is."
            )
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(
                    f"This model is region-conditional: pass `class_labels` (ids < {self.config.num_class_embeds})."
                )  # noqa: E501
            labels = torch.as_tensor(class_labels).reshape(-1)
            if labels.numel() not in (1, batch) or labels.min() < 0 or labels.max() >= self.config.num_class_embeds:
                raise ValueError(
                    f"`class_labels` must hold one id in [0, {self.config.num_class_embeds}) per batch item, got "
                    f"{labels.tolist()}."
                )
        if position is not None and self.position_channels:
            check_volume_tensor(position, "position", channels=3)
            if position.shape[0] != batch or tuple(position.shape[2:]) != spatial:
                raise ValueError(
                    f"`position` {tuple(position.shape)} must be (B, 3, *spatial) of `sample` {tuple(sample.shape)}."
                )  # noqa: E501
        if anatomy is not None and self.anatomy_channels:
            check_volume_tensor(anatomy, "anatomy", channels=1, allow_integer=True)
            if anatomy.shape[0] != batch or tuple(anatomy.shape[2:]) != spatial:
                raise ValueError(
                    f"`anatomy` {tuple(anatomy.shape)} must be (B, 1, *spatial) of `sample` {tuple(sample.shape)}."
                )  # noqa: E501
            if anatomy.min() < 0 or anatomy.max() > self.config.num_anatomy_classes:
                raise ValueError(
                    f"`anatomy` labels must lie in [0, {self.config.num_anatomy_classes}] (0 is background)."
                )  # noqa: E501

    def conditioning_inputs(self, sample, position, anatomy) -> torch.Tensor:
        """The noisy sample concatenated with its position encoding and anatomy channels (the first conv's input).

        Without `position`, the sample is taken to be the whole region volume; without `anatomy`, all background.
        """
        channels = [sample]
        if self.position_channels:
            if position is None:
                grid = window_coordinates(sample.shape[2:], device=sample.device, dtype=sample.dtype)
                position = grid[None].expand(sample.shape[0], -1, -1, -1, -1)
            encoded = fourier_position_encoding(
                position.to(sample.dtype), self.config.num_position_frequencies, self.config.include_raw_position
            )
            channels.append(encoded)
        if self.anatomy_channels:
            if anatomy is None:
                anatomy = torch.zeros((sample.shape[0], 1, *sample.shape[2:]), device=sample.device, dtype=torch.long)
            encoding, classes = self.config.anatomy_encoding, self.config.num_anatomy_classes
            channels.append(encode_anatomy(anatomy.to(sample.device), encoding, classes, sample.dtype))
        return torch.cat(channels, dim=1)

    def embed_conditions(self, sample, timestep, class_labels):
        """The FiLM vector (timestep + region embedding) and the spatial transformers' context (or `None`)."""
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        timesteps = timesteps.expand(sample.shape[0]) if timesteps.numel() == 1 else timesteps
        condition = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))
        context = None
        if self.class_embedding is not None:
            labels = torch.as_tensor(class_labels, device=sample.device).reshape(-1).long()
            region = self.class_embedding(labels.expand(sample.shape[0]) if labels.numel() == 1 else labels)
            condition = condition + region
            if self.config.region_cross_attention:
                context = region[:, None, :]
        return condition, context

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        position: torch.Tensor | None = None,
        anatomy: torch.Tensor | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> PatchUNet3DOutput | tuple:
        r"""Predict the noise of a noisy CT window.

        Args:
            sample: Noisy windows `(B, in_channels, D, H, W)`, sides multiples of [`size_multiple`].
            timestep: Diffusion timestep (one, or one per batch item).
            class_labels: Region ids `(B,)` (or one for all).
            position: `(B, 3, D, H, W)` global `(D, H, W)` coordinates in `[-1, 1]` of each voxel in the whole region
                volume ([`~utils.window_coordinates`]); omitted, the window is the whole volume.
            anatomy: `(B, 1, D, H, W)` integer anatomy labels (0 background); omitted, all background.
            down_block_additional_residuals: One residual per encoder skip ([`skip_channels`]), e.g. a ControlNet's.
            mid_block_additional_residual: Residual added to the middle block's output.
            return_dict: Return a [`PatchUNet3DOutput`] rather than a tuple.
        """
        self.check_inputs(sample, class_labels, position, anatomy)
        condition, context = self.embed_conditions(sample, timestep, class_labels)
        hidden = self.conv_in(self.conditioning_inputs(sample, position, anatomy))
        skips = [hidden]
        for block in self.down_blocks:
            hidden, level_skips = block(hidden, condition, context)
            skips += level_skips
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"Got {len(down_block_additional_residuals)} down-block residuals for {len(skips)} skips."
                )
            skips = [skip + residual for skip, residual in zip(skips, down_block_additional_residuals)]
        hidden = self.mid_block(hidden, condition, context)
        if mid_block_additional_residual is not None:
            hidden = hidden + mid_block_additional_residual
        for block in self.up_blocks:
            hidden = block(hidden, skips, condition, context)
        noise = self.conv_out(F.silu(self.conv_norm_out(hidden)))
        if not return_dict:
            return (noise,)
        return PatchUNet3DOutput(sample=noise)
