"""`BiFlowNet3DModel`: the noise estimator of 3D MedDiffusion (intra-patch DiT flow + inter-patch 3D U-Net flow)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ....loaders.single_file import FromOriginalCheckpointMixin
from ....utils.validation import check_volume_tensor
from ...modeling_utils import PortableConfigMixin
from ...resnet import ConditionedResnetBlock3D
from ...sampling import upsampling_conv
from .dit_3d import DiTBlock3D, DiTStage
from .encoder import BiFlowNetEncoderMixin
from .unet_blocks import UNetLevel3D


@dataclass
class BiFlowNet3DOutput(BaseOutput):
    """Output of [`BiFlowNet3DModel`].

    Args:
        sample (`torch.Tensor` of shape `(B, out_channels, d, h, w)`): The predicted noise.
    """

    sample: torch.Tensor


class BiFlowNet3DModel(
    PortableConfigMixin, ModelMixin, AttentionMixin, ConfigMixin, FromOriginalCheckpointMixin, BiFlowNetEncoderMixin
):
    r"""BiFlowNet: class- and resolution-conditioned noise estimator for 3D latents (Wang et al., IEEE TMI 2025).

    Two flows share one conditioning vector `[time + class ‖ resolution]` (width `8 · base_channels`):

    - the **intra-patch flow** cuts the noisy latent into `sub_volume_size³` sub-volumes and runs DiT blocks on the
      tokens of each sub-volume (patch size `dit_patch_size`); its per-level outputs are added to the U-Net features
      at the full-resolution levels;
    - the **inter-patch flow** is a 3D U-Net over the whole latent with FiLM-conditioned resnet blocks and
      self-attention at the levels flagged in `attention_levels`.

    The resolution condition is the latent's own `(d, h, w) / vq_size`, per batch item. The defaults are the released
    8x model; the 4x model differs only by `dit_patch_size=2`.

    Parameters:
        in_channels (`int`, defaults to 8): Latent channels.
        out_channels (`int`, *optional*): Predicted channels (defaults to `in_channels`).
        base_channels (`int`, defaults to 72): Width of the first level and of the DiT tokens (divisible by 6).
        channel_mults (`tuple[int]`, defaults to `(1, 1, 2, 4, 8)`): Width multiplier of each U-Net level.
        attention_levels (`tuple[bool]`, defaults to `(False, False, False, True, True)`): U-Net levels with attention.
        num_class_embeds (`int`, *optional*, defaults to 7): Number of classes (regions); `None` for unconditional.
        attention_heads (`int`, defaults to 8), attention_head_dim (`int`, defaults to 32): U-Net attention shape.
        norm_num_groups (`int`, defaults to 24): GroupNorm groups of the resnet blocks.
        dit_patch_size (`int`, defaults to 1): Voxels per token side inside a sub-volume.
        dit_num_heads (`int`, defaults to 8): DiT attention heads.
        dit_mlp_ratio (`float`, defaults to 4.0): DiT feed-forward width ratio.
        num_mid_dit_blocks (`int`, defaults to 1): DiT blocks between the input and output fusion levels.
        sub_volume_size (`int`, defaults to 8): Side of the latent sub-volumes the DiT sees.
        vq_size (`int`, defaults to 64): Divisor of the resolution condition (the autoencoder's patch size).
        conv_in_kernel (`int`, defaults to 3): Kernel of the first convolution.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["UNetLevel3D", "DiTBlock3D", "DiTStage"]
    _keep_in_fp32_modules = ["time_embedding", "resolution_embedding"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 8,
        out_channels: int | None = None,
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
        num_mid_dit_blocks: int = 1,
        sub_volume_size: int = 8,
        vq_size: int = 64,
        conv_in_kernel: int = 3,
    ):
        super().__init__()
        attention_levels = [bool(a) for a in attention_levels]
        dim, cond_dim, widths, levels = self._build_encoder(in_channels)
        dit = dict(dim=dim, heads=dit_num_heads, mlp_ratio=dit_mlp_ratio, cond_dim=cond_dim)
        self.dit_mid_blocks = nn.ModuleList([DiTBlock3D(**dit) for _ in range(num_mid_dit_blocks)])
        self.dit_output_stages = nn.ModuleList(
            [DiTStage(**dit, patch_size=dit_patch_size, with_skip=True) for _ in range(self.num_fusion_levels)]
        )

        attention = dict(heads=attention_heads, head_dim=attention_head_dim)
        num_levels = len(levels)
        self.up_blocks = nn.ModuleList()
        for index, (level_in, level_out) in enumerate(reversed(levels)):
            upsamples = index < num_levels - 2
            resampler = upsampling_conv(level_in) if upsamples else None
            self.up_blocks.append(
                UNetLevel3D(
                    ((2 * level_out, level_out), (2 * level_out, level_in)),
                    cond_dim,
                    norm_num_groups,
                    attention_levels[num_levels - 1 - index],
                    resampler=resampler,
                    **attention,
                )
            )
        self.final_resnet = ConditionedResnetBlock3D(2 * dim, dim, None, norm_num_groups)
        self.conv_out = nn.Conv3d(dim, out_channels or in_channels, kernel_size=1)
        self.gradient_checkpointing = False

    def _dit_output_features(self, dit_state, condition: torch.Tensor) -> list[torch.Tensor]:
        """Run the DiT middle and output blocks on the input stages' tokens; one feature volume per output stage."""
        tokens, skips, grid, condition = dit_state
        features = []
        for block in self.dit_mid_blocks:
            tokens = self._run(block, tokens, condition)
        for stage in self.dit_output_stages:
            tokens = self._run(stage.block, tokens, condition, skips.pop())
            features.append(self._unpatchify(stage.output(tokens, condition), grid))
        return features

    def _check_inputs(self, sample, down_block_additional_residuals) -> None:
        check_volume_tensor(sample, "sample", channels=self.config.in_channels)
        multiple = self.latent_size_multiple
        if any(side % multiple for side in sample.shape[2:]):
            raise ValueError(
                f"Latent sides must be multiples of {multiple} (sub-volume size and U-Net downsampling); got "
                f"{tuple(sample.shape[2:])}. Choose a volume size whose latent satisfies this."
            )
        if down_block_additional_residuals is not None and len(down_block_additional_residuals) != len(
            self.down_blocks
        ):
            raise ValueError(
                f"`down_block_additional_residuals` needs {len(self.down_blocks)} tensors (one per level), "
                f"got {len(down_block_additional_residuals)}."
            )

    # ------------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> BiFlowNet3DOutput | tuple:
        """Predict the noise in `sample`.

        Args:
            sample: Noisy latents `(B, in_channels, d, h, w)`; sides multiples of `latent_size_multiple`.
            timestep: Diffusion timestep(s): a scalar or one per batch item (int or float).
            class_labels: Class (region) id per batch item (or one for all).
            down_block_additional_residuals: ControlNet residuals, one per U-Net level, added to the first skip
                connection each up level consumes (the output of the mirrored down level).
            mid_block_additional_residual: ControlNet residual added to the middle block's output.
            return_dict: Return a [`BiFlowNet3DOutput`] rather than a tuple.
        """
        self._check_inputs(sample, down_block_additional_residuals)
        condition = self._condition(timestep, class_labels, sample)
        encoded = self._encode(sample, condition)
        features_out = self._dit_output_features(encoded.dit_state, condition)
        hidden, skips, stem = encoded.hidden, encoded.skips, encoded.stem
        if mid_block_additional_residual is not None:
            hidden = hidden + mid_block_additional_residual

        num_levels = len(self.up_blocks)
        dit_fused = 0
        for index, level in enumerate(self.up_blocks):
            if num_levels - index <= len(features_out):
                hidden = hidden + features_out[dit_fused]
                dit_fused += 1
            for position, (resnet, attention) in enumerate(zip(level.resnets, level.attentions)):
                skip = skips.pop()
                if position == 0 and down_block_additional_residuals is not None:
                    skip = skip + down_block_additional_residuals[num_levels - 1 - index]
                hidden = self._run(resnet, torch.cat([hidden, skip], dim=1), condition)
                hidden = self._run(attention, hidden)
            if level.resampler is not None:
                hidden = level.resampler(hidden)

        output = self.conv_out(self.final_resnet(torch.cat([hidden, stem], dim=1))).contiguous()
        if not return_dict:
            return (output,)
        return BiFlowNet3DOutput(sample=output)
