"""`BiFlowNet3DModel`: the noise estimator of 3D MedDiffusion (intra-patch DiT flow + inter-patch 3D U-Net flow)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ...utils.validation import check_volume_tensor
from ...utils.volume_tiling import merge_patches, split_into_patches
from .dit_3d import DiTBlock3D, DiTStage
from .embeddings import TwoLayerEmbedding, sincos_position_embedding_3d, sinusoidal_timestep_embedding
from .unet_blocks import ConditionedResnetBlock3D, PreNormVolumeAttention, UNetLevel3D


@dataclass
class BiFlowNet3DOutput(BaseOutput):
    """Output of [`BiFlowNet3DModel`].

    Args:
        sample (`torch.Tensor` of shape `(B, out_channels, d, h, w)`): The predicted noise.
    """

    sample: torch.Tensor


class BiFlowNet3DModel(ModelMixin, ConfigMixin):
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
        channel_mults, attention_levels = list(channel_mults), [bool(a) for a in attention_levels]
        if len(attention_levels) != len(channel_mults):
            raise ValueError(
                f"`attention_levels` needs one flag per level: {len(channel_mults)} levels, got {attention_levels}."
            )
        if sub_volume_size % dit_patch_size:
            raise ValueError(f"`sub_volume_size` {sub_volume_size} must be a multiple of `dit_patch_size`.")
        dim = base_channels
        cond_dim = 8 * dim
        widths = [dim] + [dim * mult for mult in channel_mults]
        bad = [w for w in widths if w % norm_num_groups]
        if bad:
            raise ValueError(f"U-Net widths {bad} are not divisible by `norm_num_groups`={norm_num_groups}.")
        levels = list(zip(widths[:-1], widths[1:]))
        # DiT features join the leading full-resolution levels, i.e. those that keep the base width.
        self.num_fusion_levels = 0
        while self.num_fusion_levels < len(levels) and widths[self.num_fusion_levels + 1] == dim:
            self.num_fusion_levels += 1
        if self.num_fusion_levels < 1:
            raise ValueError("The first level must keep the base width (channel_mults[0] == 1) for the DiT fusion.")

        # Conditioning
        self.time_embedding = TwoLayerEmbedding(dim, 4 * dim, activation="gelu")
        self.class_embedding = nn.Embedding(num_class_embeds, 4 * dim) if num_class_embeds else None
        self.resolution_embedding = TwoLayerEmbedding(3, 4 * dim, activation="silu")

        # Intra-patch flow (DiT on sub-volumes)
        tokens_per_side = sub_volume_size // dit_patch_size
        self.patch_embed = nn.Conv3d(in_channels, dim, kernel_size=dit_patch_size, stride=dit_patch_size)
        self.pos_embed = nn.Parameter(sincos_position_embedding_3d(dim, tokens_per_side)[None], requires_grad=False)
        dit = dict(dim=dim, heads=dit_num_heads, mlp_ratio=dit_mlp_ratio, cond_dim=cond_dim)
        self.dit_input_stages = nn.ModuleList(
            [DiTStage(**dit, patch_size=dit_patch_size) for _ in range(self.num_fusion_levels)]
        )
        self.dit_mid_blocks = nn.ModuleList([DiTBlock3D(**dit) for _ in range(num_mid_dit_blocks)])
        self.dit_output_stages = nn.ModuleList(
            [DiTStage(**dit, patch_size=dit_patch_size, with_skip=True) for _ in range(self.num_fusion_levels)]
        )

        # Inter-patch flow (3D U-Net)
        self.conv_in = nn.Conv3d(in_channels, dim, kernel_size=conv_in_kernel, padding=conv_in_kernel // 2)
        attention = dict(heads=attention_heads, head_dim=attention_head_dim)
        num_levels = len(levels)
        self.down_blocks = nn.ModuleList()
        for index, (level_in, level_out) in enumerate(levels):
            downsamples = self.num_fusion_levels - 1 <= index < num_levels - 1
            resampler = nn.Conv3d(level_out, level_out, 4, stride=2, padding=1) if downsamples else None
            self.down_blocks.append(
                UNetLevel3D(
                    ((level_in, level_out), (level_out, level_out)),
                    cond_dim,
                    norm_num_groups,
                    attention_levels[index],
                    resampler=resampler,
                    **attention,
                )
            )
        mid = widths[-1]
        self.mid_resnet_1 = ConditionedResnetBlock3D(mid, mid, cond_dim, norm_num_groups)
        self.mid_attention = PreNormVolumeAttention(mid, **attention)
        self.mid_resnet_2 = ConditionedResnetBlock3D(mid, mid, cond_dim, norm_num_groups)
        self.up_blocks = nn.ModuleList()
        for index, (level_in, level_out) in enumerate(reversed(levels)):
            upsamples = index < num_levels - 2
            resampler = nn.ConvTranspose3d(level_in, level_in, 4, stride=2, padding=1) if upsamples else None
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

    @property
    def latent_size_multiple(self) -> int:
        """Latent sides must be multiples of this (the sub-volume size and the U-Net's total downsampling)."""
        downsamplings = sum(block.resampler is not None for block in self.down_blocks)
        return max(self.config.sub_volume_size, 2**downsamplings)

    # ------------------------------------------------------------------------------------------------ pieces

    def _condition(self, timestep, class_labels, sample: torch.Tensor) -> torch.Tensor:
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device)
        timestep = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.reshape(-1)
        if timestep.shape[0] != batch:
            raise ValueError(f"`timestep` must be a scalar or hold {batch} values, got shape {tuple(timestep.shape)}.")
        embedding = self.time_embedding(sinusoidal_timestep_embedding(timestep, self.config.base_channels))
        if self.class_embedding is not None:
            labels = self._check_class_labels(class_labels, batch, sample.device)
            embedding = embedding + self.class_embedding(labels)
        resolution = torch.tensor(sample.shape[2:], device=sample.device, dtype=torch.float32) / self.config.vq_size
        resolution = self.resolution_embedding(resolution.expand(batch, 3))
        return torch.cat([embedding, resolution], dim=1).to(sample.dtype)

    def _check_class_labels(self, class_labels, batch: int, device) -> torch.Tensor:
        if class_labels is None:
            raise ValueError("`class_labels` is required: this model is class-conditional (one label per volume).")
        labels = torch.as_tensor(class_labels, device=device).reshape(-1)
        if labels.is_floating_point():
            raise ValueError(f"`class_labels` must be integers, got dtype {labels.dtype}.")
        labels = labels.expand(batch) if labels.numel() == 1 else labels
        if labels.shape[0] != batch:
            raise ValueError(f"`class_labels` must hold 1 or {batch} labels, got {labels.numel()}.")
        if labels.min() < 0 or labels.max() >= self.config.num_class_embeds:
            raise ValueError(f"`class_labels` must lie in [0, {self.config.num_class_embeds}), got {labels.tolist()}.")
        return labels.long()

    def _unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Output-layer tokens of every sub-volume → a `(B, base_channels, d, h, w)` feature volume."""
        patch, dim = self.config.dit_patch_size, self.config.base_channels
        side = self.config.sub_volume_size // patch
        cubes = tokens.reshape(-1, side, side, side, patch, patch, patch, dim)
        cubes = cubes.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(-1, dim, side * patch, side * patch, side * patch)
        return merge_patches(cubes, grid)

    def _run(self, module, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)

    def _intra_patch_flow(self, sample: torch.Tensor, condition: torch.Tensor):
        """DiT features to add to the U-Net: one per input fusion level and one per output fusion level."""
        size = self.config.sub_volume_size
        sub_volumes, grid = split_into_patches(sample, (size, size, size))
        condition = condition.repeat_interleave(grid[0] * grid[1] * grid[2], dim=0)
        tokens = self.patch_embed(sub_volumes).flatten(2).transpose(1, 2) + self.pos_embed.to(sample.dtype)
        skips, features_in, features_out = [], [], []
        for stage in self.dit_input_stages:
            tokens = self._run(stage.block, tokens, condition)
            skips.append(tokens)
            features_in.append(self._unpatchify(stage.output(tokens, condition), grid))
        for block in self.dit_mid_blocks:
            tokens = self._run(block, tokens, condition)
        for stage in self.dit_output_stages:
            tokens = self._run(stage.block, tokens, condition, skips.pop())
            features_out.append(self._unpatchify(stage.output(tokens, condition), grid))
        return features_in, features_out

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
        features_in, features_out = self._intra_patch_flow(sample, condition)

        hidden = self.conv_in(sample)
        stem = hidden
        skips = []
        for index, level in enumerate(self.down_blocks):
            if index < len(features_in):
                hidden = hidden + features_in[index]
            for resnet, attention in zip(level.resnets, level.attentions):
                hidden = self._run(attention, self._run(resnet, hidden, condition))
                skips.append(hidden)
            if level.resampler is not None:
                hidden = level.resampler(hidden)

        hidden = self._run(self.mid_resnet_1, hidden, condition)
        hidden = self._run(self.mid_attention, hidden)
        hidden = self._run(self.mid_resnet_2, hidden, condition)
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

        output = self.conv_out(self.final_resnet(torch.cat([hidden, stem], dim=1)))
        if not return_dict:
            return (output,)
        return BiFlowNet3DOutput(sample=output)

    @classmethod
    def from_single_file(
        cls,
        checkpoint_path: str | os.PathLike,
        original_config: dict | str | os.PathLike | None = None,
        use_ema: bool = True,
        **kwargs,
    ) -> BiFlowNet3DModel:
        """Load an original 3D MedDiffusion BiFlowNet training file (`.pt` with `model`, `ema` and `args`).

        The file is read without executing pickled code. The architecture comes from `original_config` (a dict or
        JSON file with the original `BiFlowNet(...)` keyword arguments, or a dict with them under
        `constructor_kwargs`), else from the checkpoint's `args`, else from tensor shapes. Every weight must map;
        unmatched or mis-shaped weights raise a `ValueError` that lists them.

        Args:
            checkpoint_path: Path to the `.pt` file.
            original_config: Optional original configuration.
            use_ema: Load the EMA weights (what the original sampler uses) rather than the raw training weights.
            kwargs: Config overrides, and `torch_dtype`.
        """
        from ...loaders.original_biflownet_checkpoint import load_biflownet_checkpoint

        return load_biflownet_checkpoint(cls, checkpoint_path, original_config, use_ema=use_ema, **kwargs)
