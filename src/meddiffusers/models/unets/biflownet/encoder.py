"""The encoder half of BiFlowNet (conditioning, DiT input stages, U-Net down path and middle block), shared by
`BiFlowNet3DModel` and `ControlNet3DModel`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ....utils.volume_tiling import merge_patches, split_into_patches
from ...attention import ResidualVolumeAttention
from ...cpu_inference import inference_conv3d
from ...embeddings import TwoLayerEmbedding, sincos_position_embedding_3d, sinusoidal_timestep_embedding
from ...normalization import ChannelLayerNorm
from ...resnet import ConditionedResnetBlock3D
from ...sampling import downsampling_conv
from .dit_3d import DiTStage
from .unet_blocks import UNetLevel3D


@dataclass
class EncoderState:
    """What the encoder half hands on: the middle block's output, the skips, each level's output (before its
    downsampler), the stem (`conv_in` output) and the DiT state `(tokens, skips, grid, condition)`."""

    hidden: torch.Tensor
    skips: list
    level_outputs: list
    stem: torch.Tensor
    dit_state: tuple


class BiFlowNetEncoderMixin:
    """Builds and runs the encoder half of BiFlowNet; the host class provides `config` and `gradient_checkpointing`."""

    def _build_encoder(self, in_channels: int):
        """Create the encoder-half modules from `self.config`; `in_channels` is what `conv_in` and the DiT see."""
        config = self.config
        channel_mults, attention_levels = list(config.channel_mults), [bool(a) for a in config.attention_levels]
        base_channels, norm_num_groups = config.base_channels, config.norm_num_groups
        dit_patch_size, sub_volume_size = config.dit_patch_size, config.sub_volume_size
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

        self.time_embedding = TwoLayerEmbedding(dim, 4 * dim, activation="gelu")
        num_classes = config.num_class_embeds
        self.class_embedding = nn.Embedding(num_classes, 4 * dim) if num_classes else None
        self.resolution_embedding = TwoLayerEmbedding(3, 4 * dim, activation="silu")

        tokens_per_side = sub_volume_size // dit_patch_size
        self.patch_embed = nn.Conv3d(in_channels, dim, kernel_size=dit_patch_size, stride=dit_patch_size)
        self.pos_embed = nn.Parameter(sincos_position_embedding_3d(dim, tokens_per_side)[None], requires_grad=False)
        dit = dict(dim=dim, heads=config.dit_num_heads, mlp_ratio=config.dit_mlp_ratio, cond_dim=cond_dim)
        self.dit_input_stages = nn.ModuleList(
            [DiTStage(**dit, patch_size=dit_patch_size) for _ in range(self.num_fusion_levels)]
        )

        kernel = config.conv_in_kernel
        self.conv_in = nn.Conv3d(in_channels, dim, kernel_size=kernel, padding=kernel // 2)
        attention = dict(heads=config.attention_heads, head_dim=config.attention_head_dim)
        self.down_blocks = nn.ModuleList()
        for index, (level_in, level_out) in enumerate(levels):
            downsamples = self.num_fusion_levels - 1 <= index < len(levels) - 1
            resampler = downsampling_conv(level_out) if downsamples else None
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
        self.mid_attention = ResidualVolumeAttention(mid, **attention, norm=ChannelLayerNorm(mid))
        self.mid_resnet_2 = ConditionedResnetBlock3D(mid, mid, cond_dim, norm_num_groups)
        return dim, cond_dim, widths, levels

    @property
    def latent_size_multiple(self) -> int:
        """Latent sides must be multiples of this (the sub-volume size and the U-Net's total downsampling)."""
        downsamplings = sum(block.resampler is not None for block in self.down_blocks)
        return max(self.config.sub_volume_size, 2**downsamplings)

    def _condition(self, timestep, class_labels, sample: torch.Tensor) -> torch.Tensor:
        """The conditioning vector `[time + class ‖ resolution]` of every batch item."""
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

    def _encode(self, sample: torch.Tensor, condition: torch.Tensor) -> EncoderState:
        """DiT input stages on the sub-volumes, then the U-Net down path (DiT features added) and middle block."""
        size = self.config.sub_volume_size
        sub_volumes, grid = split_into_patches(sample, (size, size, size))
        token_condition = condition.repeat_interleave(grid[0] * grid[1] * grid[2], dim=0)
        tokens = self.patch_embed(sub_volumes).flatten(2).transpose(1, 2) + self.pos_embed.to(sample.dtype)
        dit_skips, features_in = [], []
        for stage in self.dit_input_stages:
            tokens = self._run(stage.block, tokens, token_condition)
            dit_skips.append(tokens)
            features_in.append(self._unpatchify(stage.output(tokens, token_condition), grid))

        hidden = inference_conv3d(self.conv_in, sample)
        stem, skips, level_outputs = hidden, [], []
        for index, level in enumerate(self.down_blocks):
            if index < len(features_in):
                hidden = hidden + features_in[index]
            for resnet, attention in zip(level.resnets, level.attentions):
                hidden = self._run(attention, self._run(resnet, hidden, condition))
                skips.append(hidden)
            level_outputs.append(hidden)
            if level.resampler is not None:
                hidden = level.resampler(hidden)
        hidden = self._run(self.mid_resnet_1, hidden, condition)
        hidden = self._run(self.mid_attention, hidden)
        hidden = self._run(self.mid_resnet_2, hidden, condition)
        return EncoderState(hidden, skips, level_outputs, stem, (tokens, dit_skips, grid, token_condition))
