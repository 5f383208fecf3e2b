"""`ControlNet3DModel`: the 3D MedDiffusion authors' ControlNet, a trainable copy of BiFlowNet's encoder half."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ...loaders.single_file import FromOriginalCheckpointMixin
from ...utils.validation import check_volume_tensor
from ..modeling_utils import PortableConfigMixin
from ..unets.biflownet.encoder import BiFlowNetEncoderMixin
from .controlnet_utils import controlnet_from_unet, zero_conv


@dataclass
class ControlNet3DOutput(BaseOutput):
    """Output of [`ControlNet3DModel`].

    Args:
        down_block_res_samples (`tuple[torch.Tensor]`): One residual per U-Net level (before its downsampler), for
            `BiFlowNet3DModel(..., down_block_additional_residuals=...)`.
        mid_block_res_sample (`torch.Tensor`): Residual for the middle block (`mid_block_additional_residual`).
    """

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor


class ControlNet3DModel(
    PortableConfigMixin, ModelMixin, AttentionMixin, ConfigMixin, FromOriginalCheckpointMixin, BiFlowNetEncoderMixin
):
    r"""ControlNet for [`BiFlowNet3DModel`] (the authors' `cldm` design).

    A copy of BiFlowNet's encoder half (conditioning, DiT input stages, U-Net down path and middle block) whose
    input is the noisy latent concatenated with the condition (`conditioning_channels`, e.g. the autoencoder latent of
    a sparse-view CT reconstruction). A zero-initialised 1x1x1 convolution after each level and after the middle block
    gives the residuals BiFlowNet adds to its middle output and to the first skip of each up level.

    Parameters: those of [`BiFlowNet3DModel`]'s encoder half, plus `conditioning_channels` (defaults to 8, a latent).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["UNetLevel3D", "DiTStage"]
    _keep_in_fp32_modules = ["time_embedding", "resolution_embedding"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 8,
        conditioning_channels: int = 8,
        base_channels: int = 72,
        channel_mults: Sequence[int] = (1, 1, 2, 4, 8),
        attention_levels: Sequence[bool] = (False, False, False, True, True),
        num_class_embeds: int | None = 7,
        attention_heads: int = 8,
        attention_head_dim: int = 32,
        norm_num_groups: int = 24,
        dit_patch_size: int = 1,
        dit_num_heads: int = 8,
        dit_mlp_ratio: float = 4.0,
        sub_volume_size: int = 8,
        vq_size: int = 64,
        conv_in_kernel: int = 3,
    ):
        super().__init__()
        _, _, widths, levels = self._build_encoder(in_channels + conditioning_channels)
        self.controlnet_down_blocks = nn.ModuleList([zero_conv(level_out) for _, level_out in levels])
        self.controlnet_mid_block = zero_conv(widths[-1])
        self.gradient_checkpointing = False

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        controlnet_cond: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        return_dict: bool = True,
    ) -> ControlNet3DOutput | tuple:
        """Residuals for BiFlowNet from a noisy latent and a condition of the same spatial size.

        Args:
            sample: Noisy latents `(B, in_channels, d, h, w)`.
            timestep: Diffusion timestep(s).
            class_labels: Class (region) ids.
            controlnet_cond: Condition `(B, conditioning_channels, d, h, w)` in latent space.
            conditioning_scale: Multiplies every residual.
            return_dict: Return a [`ControlNet3DOutput`] rather than a tuple.
        """
        check_volume_tensor(sample, "sample", channels=self.config.in_channels)
        check_volume_tensor(controlnet_cond, "controlnet_cond", channels=self.config.conditioning_channels)
        if controlnet_cond.shape[0] != sample.shape[0] or controlnet_cond.shape[2:] != sample.shape[2:]:
            raise ValueError(
                f"`controlnet_cond` {tuple(controlnet_cond.shape)} must match the batch and spatial size of `sample` "
                f"{tuple(sample.shape)}; encode image-space conditions with the autoencoder first."
            )
        multiple = self.latent_size_multiple
        if any(side % multiple for side in sample.shape[2:]):
            raise ValueError(f"Latent sides must be multiples of {multiple}; got {tuple(sample.shape[2:])}.")
        inputs = torch.cat([sample, controlnet_cond.to(sample.dtype)], dim=1)
        condition = self._condition(timestep, class_labels, inputs)
        encoded = self._encode(inputs, condition)
        down = tuple(
            conv(output) * conditioning_scale
            for conv, output in zip(self.controlnet_down_blocks, encoded.level_outputs)
        )
        mid = self.controlnet_mid_block(encoded.hidden) * conditioning_scale
        if not return_dict:
            return (down, mid)
        return ControlNet3DOutput(down_block_res_samples=down, mid_block_res_sample=mid)

    @classmethod
    def from_biflownet(cls, unet, conditioning_channels: int | None = None, load_weights_from_unet: bool = True):
        """A ControlNet whose encoder half starts as a copy of `unet`'s.

        Weights of the same name and shape are copied; the input layers (`conv_in`, `patch_embed`) get zero weights
        for the extra condition channels; the zero convolutions stay zero, so the ControlNet changes nothing until it
        is trained.
        """
        return controlnet_from_unet(
            cls,
            unet,
            load_weights_from_unet,
            padded_inputs=("conv_in.weight", "patch_embed.weight"),
            conditioning_channels=conditioning_channels or unet.config.in_channels,
        )
