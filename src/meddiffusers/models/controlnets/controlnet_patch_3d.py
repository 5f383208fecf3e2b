"""`PatchControlNet3DModel`: a ControlNet for MedDiff-FM's patch U-Net ([`PatchUNet3DModel`]).

A trainable copy of the U-Net's encoder half sees the same inputs as the U-Net (noisy window, global position
encoding, anatomy, timestep and region) plus a condition volume of the window (a thick-slice CT for super-resolution,
a lesion mask for lesion generation, ...). A small convolutional encoder maps the condition, at full resolution, to
the first level's width and adds it to the output of the first convolution (the diffusers ControlNet design); a
zero-initialised 1x1x1 convolution per encoder skip and one after the middle block give the residuals the U-Net adds
to its skips and to its middle block's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ...utils.validation import check_volume_tensor
from ..modeling_utils import PortableConfigMixin
from ..unets.unet_patch_3d import PatchUNet3DModel
from .controlnet_utils import controlnet_from_unet, zero_conv

# Modules of `PatchUNet3DModel` that make its encoder half; the ControlNet keeps their names, so weights copy by name.
ENCODER_MODULES = ("time_proj", "time_embedding", "class_embedding", "conv_in", "down_blocks", "mid_block")


@dataclass
class PatchControlNet3DOutput(BaseOutput):
    """Output of [`PatchControlNet3DModel`].

    Args:
        down_block_res_samples (`tuple[torch.Tensor]`): One residual per encoder skip of the U-Net, in the order of
            [`PatchUNet3DModel.skip_channels`], for `down_block_additional_residuals`.
        mid_block_res_sample (`torch.Tensor`): Residual for the middle block's output
            (`mid_block_additional_residual`).
    """

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor


class PatchConditioningEmbedding3D(nn.Module):
    """Full-resolution condition encoder: 3x3x3 convolutions with SiLU from `in_channels` through `hidden_channels`
    to `out_channels`; the last convolution starts at zero, so a new encoder adds nothing."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: Sequence[int] = (16, 16)):
        super().__init__()
        widths = [in_channels, *hidden_channels]
        self.blocks = nn.ModuleList(
            nn.Conv3d(width, following, kernel_size=3, padding=1) for width, following in zip(widths, widths[1:])
        )
        self.conv_out = nn.Conv3d(widths[-1], out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        """The condition's features, `(B, out_channels, D, H, W)`."""
        for conv in self.blocks:
            condition = F.silu(conv(condition))
        return self.conv_out(condition)


class PatchControlNet3DModel(PortableConfigMixin, ModelMixin, AttentionMixin, ConfigMixin):
    r"""ControlNet for [`PatchUNet3DModel`]: residuals for the U-Net's skips and middle block from a condition volume.

    The encoder half (first convolution over the noisy window, position encoding and anatomy; timestep and region
    embedding; down levels; middle block) is built exactly as the U-Net's and takes the same inputs; input checks,
    conditioning inputs and embeddings are the U-Net's own methods. The condition `(B, conditioning_channels, D, H,
    W)`, at the window's resolution, goes through a [`PatchConditioningEmbedding3D`] whose output is added to the
    first convolution's. Zero-initialised 1x1x1 convolutions give one residual per skip ([`skip_channels`]) and one
    for the middle block, so a ControlNet made with [`from_unet`] changes nothing until it is trained.

    Parameters: those of [`PatchUNet3DModel`] that shape its encoder half, plus
        conditioning_channels: Channels of the condition volume (1 for a thick-slice CT or a lesion mask).
        conditioning_embedding_channels: Widths of the condition encoder's hidden convolutions.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["PatchDownLevel3D", "PatchMidBlock3D"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        conditioning_channels: int = 1,
        conditioning_embedding_channels: Sequence[int] = (16, 16),
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
        arguments = dict(locals())
        unet_keys = set(PatchUNet3DModel._get_init_keys(PatchUNet3DModel)) - {"self"}
        # The U-Net's constructor is the one definition of the architecture; its decoder half is dropped here.
        unet = PatchUNet3DModel(**{key: value for key, value in arguments.items() if key in unet_keys})
        for name in ENCODER_MODULES:
            setattr(self, name, getattr(unet, name))
        self.position_channels, self.anatomy_channels = unet.position_channels, unet.anatomy_channels
        widths = list(block_out_channels)
        self.controlnet_cond_embedding = PatchConditioningEmbedding3D(
            conditioning_channels, widths[0], conditioning_embedding_channels
        )
        self.controlnet_down_blocks = nn.ModuleList(zero_conv(channels) for channels in self.skip_channels)
        self.controlnet_mid_block = zero_conv(widths[-1])

    # The encoder half's geometry, checks and inputs are the U-Net's (same config keys, same module names).
    size_multiple = PatchUNet3DModel.size_multiple
    skip_channels = PatchUNet3DModel.skip_channels
    check_inputs = PatchUNet3DModel.check_inputs
    conditioning_inputs = PatchUNet3DModel.conditioning_inputs
    embed_conditions = PatchUNet3DModel.embed_conditions

    def check_condition(self, sample: torch.Tensor, controlnet_cond) -> None:
        """Raise a `ValueError` unless `controlnet_cond` is `(B, conditioning_channels, *spatial)` of `sample`."""
        if controlnet_cond is None:
            raise ValueError(
                f"Pass `controlnet_cond`, the condition volume (B, {self.config.conditioning_channels}, D, H, W) of "
                "the window."
            )
        check_volume_tensor(controlnet_cond, "controlnet_cond", channels=self.config.conditioning_channels)
        if controlnet_cond.shape[0] != sample.shape[0] or controlnet_cond.shape[2:] != sample.shape[2:]:
            raise ValueError(
                f"`controlnet_cond` {tuple(controlnet_cond.shape)} must match the batch and spatial size of `sample` "
                f"{tuple(sample.shape)}: crop the condition to the window (the pipeline does this per window)."
            )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        position: torch.Tensor | None = None,
        anatomy: torch.Tensor | None = None,
        controlnet_cond: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        return_dict: bool = True,
    ) -> PatchControlNet3DOutput | tuple:
        r"""Residuals for [`PatchUNet3DModel`] from a noisy window and its condition.

        Args:
            sample: Noisy windows `(B, in_channels, D, H, W)`, sides multiples of [`size_multiple`].
            timestep: Diffusion timestep (one, or one per batch item).
            class_labels: Region ids `(B,)` (or one for all).
            position: `(B, 3, D, H, W)` global coordinates of each voxel in the whole volume, as for the U-Net.
            anatomy: `(B, 1, D, H, W)` integer anatomy labels, for anatomy-conditioned models.
            controlnet_cond: The window's condition `(B, conditioning_channels, D, H, W)` in model space.
            conditioning_scale: Multiplies every residual.
            return_dict: Return a [`PatchControlNet3DOutput`] rather than a tuple `(down, mid)`.
        """
        self.check_inputs(sample, class_labels, position, anatomy)
        self.check_condition(sample, controlnet_cond)
        condition, context = self.embed_conditions(sample, timestep, class_labels)
        hidden = self.conv_in(self.conditioning_inputs(sample, position, anatomy))
        hidden = hidden + self.controlnet_cond_embedding(controlnet_cond.to(hidden.dtype))
        skips = [hidden]
        for block in self.down_blocks:
            hidden, level_skips = block(hidden, condition, context)
            skips += level_skips
        hidden = self.mid_block(hidden, condition, context)
        down = tuple(conv(skip) * conditioning_scale for conv, skip in zip(self.controlnet_down_blocks, skips))
        mid = self.controlnet_mid_block(hidden) * conditioning_scale
        if not return_dict:
            return (down, mid)
        return PatchControlNet3DOutput(down_block_res_samples=down, mid_block_res_sample=mid)

    @classmethod
    def from_unet(
        cls,
        unet: PatchUNet3DModel,
        conditioning_channels: int = 1,
        load_weights_from_unet: bool = True,
        **kwargs,
    ) -> PatchControlNet3DModel:
        """A ControlNet with `unet`'s encoder architecture whose weights start as a copy of `unet`'s encoder.

        The condition encoder's last convolution and the zero convolutions start at zero, so the controlled U-Net
        predicts exactly what it does alone until the ControlNet is trained.

        Args:
            unet: The (frozen) patch U-Net to control.
            conditioning_channels: Channels of the condition volume.
            load_weights_from_unet: Copy `unet`'s encoder weights (otherwise a fresh initialisation).
            kwargs: Other config values, e.g. `conditioning_embedding_channels`.
        """
        if not isinstance(unet, PatchUNet3DModel):
            raise ValueError(f"`unet` must be a PatchUNet3DModel, got {type(unet).__name__}.")
        return controlnet_from_unet(
            cls, unet, load_weights_from_unet, conditioning_channels=conditioning_channels, **kwargs
        )
