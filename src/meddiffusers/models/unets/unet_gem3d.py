"""`GEM3DUNetModel`: the volume denoiser of GEM-3D (Zhu et al., "Generative Enhancement for 3D Medical Images").

GEM-3D generates a volume as overlapping clips of consecutive 2-D latent slices. Stage 1 is the latent-diffusion 2-D
U-Net applied to every slice on its own; stage 2 makes it pseudo-3D by inserting layers along the slice (frame) axis:
a 1-D convolution over the frames after every spatial convolution and a temporal self-attention after every spatial
one. The new layers start as the identity (Dirac convolutions, zero attention output), so a fresh stage-2 model equals
the stage-1 model it is initialised from. The input is the channel concatenation `[x_t | mask latents |
informed-slice latent]` of the original (12 channels). Architecture, conversion of the original checkpoints and the
fixes against the original are described in `docs/source/en/api/models/gem3d_unet.md`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.utils import BaseOutput
from einops import rearrange
from torch import nn

from ..modeling_utils import PortableConfigMixin


@dataclass
class GEM3DUNetOutput(BaseOutput):
    """Output of [`GEM3DUNetModel`].

    Args:
        sample (`torch.Tensor`): The noise prediction, `(B, out_channels, F, h, w)`.
    """

    sample: torch.Tensor


class TemporalConv(nn.Module):
    """A 1-D convolution over the frame axis of `(B*F, C, h, w)` features (frames contiguous per clip).

    Initialised as the identity (Dirac kernel, zero bias), so inserting it leaves a trained 2-D model unchanged.
    There is no residual connection, as in the original `PseudoConv3d`.

    Args:
        channels: Feature channels (input and output).
        kernel_size: Taps along the frame axis (odd; zero padding keeps the frame count).
    """

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.temporal_conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)
        nn.init.dirac_(self.temporal_conv.weight)
        nn.init.zeros_(self.temporal_conv.bias)

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        height, width = hidden_states.shape[-2:]
        hidden_states = rearrange(hidden_states, "(b f) c h w -> (b h w) c f", f=num_frames)
        hidden_states = self.temporal_conv(hidden_states)
        return rearrange(hidden_states, "(b h w) c f -> (b f) c h w", h=height, w=width)


def _temporal(layer: TemporalConv | None, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
    return hidden_states if layer is None else layer(hidden_states, num_frames)


class GEM3DResnetBlock(ResnetBlock2D):
    """diffusers' `ResnetBlock2D` (GroupNorm-SiLU-conv, timestep added, GroupNorm-SiLU-conv, skip) with optional
    frame convolutions right after each of its two convolutions (inside the residual branch).

    Args:
        in_channels: Input channels.
        out_channels: Output channels (a 1x1 `conv_shortcut` when they differ).
        temb_channels: Width of the timestep embedding.
        temporal: Add the two [`TemporalConv`] layers (`temporal_conv1`, `temporal_conv2`).
        groups: GroupNorm groups.
        eps: GroupNorm epsilon.
        temporal_kernel_size: Taps of the frame convolutions.
    """

    def __init__(self, in_channels, out_channels, temb_channels, temporal, groups, eps, temporal_kernel_size=3):
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels, groups=groups, eps=eps
        )
        self.temporal_conv1 = TemporalConv(out_channels, temporal_kernel_size) if temporal else None
        self.temporal_conv2 = TemporalConv(out_channels, temporal_kernel_size) if temporal else None

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        hidden_states = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
        hidden_states = _temporal(self.temporal_conv1, hidden_states, num_frames)
        hidden_states = hidden_states + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        hidden_states = self.dropout(self.nonlinearity(self.norm2(hidden_states)))
        hidden_states = _temporal(self.temporal_conv2, self.conv2(hidden_states), num_frames)
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return input_tensor + hidden_states


class GEM3DAttentionBlock(nn.Module):
    """Spatial self-attention over the `h*w` positions of each frame, then (optionally) temporal self-attention over
    the frames of each position, both residual and both normalised by the same GroupNorm (`norm`).

    Both attentions are diffusers `Attention` layers (SDPA processor by default, reachable by `set_attn_processor`);
    the temporal one's output projection starts at zero, so a fresh temporal attention is the identity.

    Args:
        channels: Feature channels.
        attention_head_dim: Channels per head (heads = channels / attention_head_dim).
        temporal: Add the temporal attention.
        groups: GroupNorm groups.
        eps: GroupNorm epsilon.
    """

    def __init__(self, channels, attention_head_dim, temporal, groups, eps):
        super().__init__()
        if channels % attention_head_dim:
            raise ValueError(f"{channels} channels are not divisible by attention_head_dim={attention_head_dim}.")
        heads = channels // attention_head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.attention = Attention(channels, heads=heads, dim_head=attention_head_dim, bias=True, out_bias=True)
        self.temporal_attention = None
        if temporal:
            self.temporal_attention = Attention(
                channels, heads=heads, dim_head=attention_head_dim, bias=True, out_bias=True
            )
            nn.init.zeros_(self.temporal_attention.to_out[0].weight)
            nn.init.zeros_(self.temporal_attention.to_out[0].bias)

    def forward(self, hidden_states: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        _, channels, height, width = hidden_states.shape
        tokens = self.norm(hidden_states).flatten(2).transpose(1, 2)
        attended = self.attention(tokens).transpose(1, 2).reshape(hidden_states.shape)
        hidden_states = hidden_states + attended
        if self.temporal_attention is None:
            return hidden_states
        # The original inverts this rearrangement with h and w swapped (wrong for h != w); here both use (h, w).
        frames = rearrange(hidden_states, "(b f) c h w -> (b h w) c f", f=num_frames)
        tokens = self.norm(frames).transpose(1, 2)
        frames = frames + self.temporal_attention(tokens).transpose(1, 2)
        return rearrange(frames, "(b h w) c f -> (b f) c h w", h=height, w=width)


class GEM3DDownBlock(nn.Module):
    """One encoder level: residual blocks (each followed by attention where enabled), then a stride-2 convolution
    (and its frame convolution) unless it is the deepest level. Returns the features and the skips it produces."""

    def __init__(self, in_channels, out_channels, num_layers, temb_channels, attention, attention_head_dim, temporal,
                 groups, eps, kernel_size, downsample):  # fmt: skip
        super().__init__()
        self.resnets = nn.ModuleList(
            GEM3DResnetBlock(
                in_channels if i == 0 else out_channels,
                out_channels,
                temb_channels,
                temporal,
                groups,
                eps,
                kernel_size,
            )  # fmt: skip
            for i in range(num_layers)
        )
        self.attentions = nn.ModuleList(
            GEM3DAttentionBlock(out_channels, attention_head_dim, temporal, groups, eps)
            for _ in range(num_layers if attention else 0)
        )
        self.downsampler = Downsample2D(out_channels, use_conv=True, padding=1, name="op") if downsample else None
        self.downsampler_temporal = TemporalConv(out_channels, kernel_size) if downsample and temporal else None
        self.gradient_checkpointing = False

    def forward(self, hidden, temb, num_frames):
        skips = []
        for i, resnet in enumerate(self.resnets):
            hidden = _run(self, resnet, hidden, temb, num_frames)
            if self.attentions:
                hidden = _run(self, self.attentions[i], hidden, num_frames)
            skips.append(hidden)
        if self.downsampler is not None:
            hidden = _temporal(self.downsampler_temporal, self.downsampler(hidden), num_frames)
            skips.append(hidden)
        return hidden, skips


class GEM3DMidBlock(nn.Module):
    """`resnet -> attention -> resnet` at the deepest resolution."""

    def __init__(self, channels, temb_channels, attention_head_dim, temporal, groups, eps, kernel_size):
        super().__init__()
        self.resnets = nn.ModuleList(
            GEM3DResnetBlock(channels, channels, temb_channels, temporal, groups, eps, kernel_size) for _ in range(2)
        )
        self.attention = GEM3DAttentionBlock(channels, attention_head_dim, temporal, groups, eps)
        self.gradient_checkpointing = False

    def forward(self, hidden, temb, num_frames):
        hidden = _run(self, self.resnets[0], hidden, temb, num_frames)
        hidden = _run(self, self.attention, hidden, num_frames)
        return _run(self, self.resnets[1], hidden, temb, num_frames)


class GEM3DUpBlock(nn.Module):
    """One decoder level: residual blocks on the features concatenated with the matching skips (one more block than
    the encoder level), attention where enabled, then nearest 2x upsampling + convolution (and its frame convolution)
    unless it is the shallowest level."""

    def __init__(self, in_channels, skip_channels, out_channels, temb_channels, attention, attention_head_dim,
                 temporal, groups, eps, kernel_size, upsample):  # fmt: skip
        super().__init__()
        widths = [in_channels] + [out_channels] * (len(skip_channels) - 1)
        self.resnets = nn.ModuleList(
            GEM3DResnetBlock(width + skip, out_channels, temb_channels, temporal, groups, eps, kernel_size)
            for width, skip in zip(widths, skip_channels)
        )
        self.attentions = nn.ModuleList(
            GEM3DAttentionBlock(out_channels, attention_head_dim, temporal, groups, eps)
            for _ in range(len(skip_channels) if attention else 0)
        )
        self.upsampler = Upsample2D(out_channels, use_conv=True) if upsample else None
        self.upsampler_temporal = TemporalConv(out_channels, kernel_size) if upsample and temporal else None
        self.gradient_checkpointing = False

    def forward(self, hidden, skips, temb, num_frames):
        for i, resnet in enumerate(self.resnets):
            hidden = _run(self, resnet, torch.cat([hidden, skips.pop()], dim=1), temb, num_frames)
            if self.attentions:
                hidden = _run(self, self.attentions[i], hidden, num_frames)
        if self.upsampler is not None:
            hidden = _temporal(self.upsampler_temporal, self.upsampler(hidden), num_frames)
        return hidden


def _run(owner: nn.Module, block: nn.Module, *args):
    """`block(*args)`, through activation checkpointing while `owner` trains with gradient checkpointing on."""
    if owner.gradient_checkpointing and torch.is_grad_enabled():
        return owner._gradient_checkpointing_func(block, *args)
    return block(*args)


class GEM3DUNetModel(PortableConfigMixin, ModelMixin, AttentionMixin, ConfigMixin):
    r"""GEM-3D's volume U-Net: the 2-D latent-diffusion U-Net (stage 1) or its pseudo-3D extension (stage 2).

    Every frame of a `(B, C, F, h, w)` clip goes through the same 2-D U-Net (diffusers residual blocks, multi-head
    self-attention at the levels in `attention_levels` and in the middle block, nearest upsampling). With
    `temporal_layers=True` each spatial convolution (input, residual, down/upsampling and output convolutions) is
    followed by a [`TemporalConv`] over the frames and each attention block adds a temporal attention that shares its
    GroupNorm; both start as the identity. All frames of a clip share its timestep.

    Parameters:
        in_channels: Input channels: `[x_t | mask latents | informed-slice latent]` = 12 in GEM-3D.
        out_channels: Channels of the noise prediction (the latent channels).
        block_out_channels: Width of each level (`model_channels * channel_mult` of the original).
        layers_per_block: Residual blocks per encoder level (the decoder has one more).
        attention_levels: Whether each level has attention blocks (the original `attention_resolutions`: level `l`
            has attention when `2**l` is listed).
        attention_head_dim: Channels per attention head (the original `num_head_channels`).
        num_frames: Frames per clip the model was trained with (16); informative: any frame count is accepted.
        temporal_layers: `False` for the stage-1 2-D model (frames independent), `True` for the stage-2 model.
        temporal_kernel_size: Taps of the frame convolutions.
        norm_num_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["GEM3DDownBlock", "GEM3DUpBlock", "GEM3DMidBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 12,
        out_channels: int = 4,
        block_out_channels: Sequence[int] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        attention_levels: Sequence[bool] = (False, True, True, True),
        attention_head_dim: int = 32,
        num_frames: int = 16,
        temporal_layers: bool = True,
        temporal_kernel_size: int = 3,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        widths = list(block_out_channels)
        if len(attention_levels) != len(widths):
            raise ValueError(
                f"`attention_levels` needs one entry per level ({len(widths)}), got {list(attention_levels)}."
            )
        if temporal_kernel_size % 2 != 1:
            raise ValueError(f"`temporal_kernel_size` must be odd, got {temporal_kernel_size}.")
        temb = widths[0] * 4
        common = dict(groups=norm_num_groups, eps=norm_eps, kernel_size=temporal_kernel_size)

        self.time_proj = Timesteps(widths[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(widths[0], temb)
        self.conv_in = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1)
        self.conv_in_temporal = TemporalConv(widths[0], temporal_kernel_size) if temporal_layers else None

        skip_channels = [widths[0]]
        self.down_blocks = nn.ModuleList()
        for level, width in enumerate(widths):
            last = level == len(widths) - 1
            previous = widths[max(level - 1, 0)]
            self.down_blocks.append(
                GEM3DDownBlock(
                    previous,
                    width,
                    layers_per_block,
                    temb,
                    attention_levels[level],
                    attention_head_dim,
                    temporal_layers,
                    downsample=not last,
                    **common,
                )  # fmt: skip
            )
            skip_channels += [width] * (layers_per_block + (0 if last else 1))
        self.mid_block = GEM3DMidBlock(widths[-1], temb, attention_head_dim, temporal_layers, **common)

        self.up_blocks = nn.ModuleList()
        hidden = widths[-1]
        for level in reversed(range(len(widths))):
            skips = [skip_channels.pop() for _ in range(layers_per_block + 1)]
            self.up_blocks.append(
                GEM3DUpBlock(
                    hidden,
                    skips,
                    widths[level],
                    temb,
                    attention_levels[level],
                    attention_head_dim,
                    temporal_layers,
                    upsample=level > 0,
                    **common,
                )  # fmt: skip
            )
            hidden = widths[level]

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, widths[0], eps=norm_eps)
        self.conv_out = nn.Conv2d(widths[0], out_channels, kernel_size=3, padding=1)
        self.conv_out_temporal = TemporalConv(out_channels, temporal_kernel_size) if temporal_layers else None

    @property
    def size_multiple(self) -> int:
        """Latent heights and widths must be multiples of this (one halving per level but the last)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @classmethod
    def from_stage1(cls, model: GEM3DUNetModel) -> GEM3DUNetModel:
        """A stage-2 (pseudo-3D) model initialised from a stage-1 model, as GEM-3D's stage-2 training starts.

        The 2-D weights are copied; the new temporal layers are the identity, so the result computes exactly what
        `model` computes, frame by frame.

        Args:
            model: A [`GEM3DUNetModel`] with `temporal_layers=False` (a stage-2 model is accepted too: its 2-D
                weights are taken and its temporal layers reset).
        """
        config = {key: value for key, value in model.config.items() if not key.startswith("_")}
        stage2 = cls(**{**config, "temporal_layers": True})
        spatial = {key: value for key, value in model.state_dict().items() if "temporal" not in key}
        missing, unexpected = stage2.load_state_dict(spatial, strict=False)
        if unexpected or any("temporal" not in key for key in missing):
            raise ValueError(f"Could not copy the 2-D weights: unexpected {unexpected}, missing {missing}.")
        stage2 = stage2.to(model.device)
        return stage2 if model.dtype == stage2.dtype else stage2.to(model.dtype)

    @classmethod
    def from_single_file(
        cls, checkpoint_path: str | os.PathLike, original_config=None, use_ema: bool = False, **kwargs
    ) -> GEM3DUNetModel:
        """Load the U-Net of an original GEM-3D Lightning checkpoint (stage 1 or stage 2 `.ckpt`).

        The file is read without executing pickled code. See
        [`~loaders.original_gem3d_checkpoint.load_gem3d_unet`] for the arguments and errors.

        Args:
            checkpoint_path: The original `.ckpt`.
            original_config: The original YAML (path) or its parsed `{"model": {...}}` dict; `None` infers the
                architecture from the tensor shapes.
            use_ema: Load the `model_ema.*` weights instead of `model.diffusion_model.*` (what inference uses).
            kwargs: `torch_dtype`, or overrides of config arguments.
        """
        from ...loaders.original_gem3d_checkpoint import load_gem3d_unet

        model, _ = load_gem3d_unet(checkpoint_path, original_config=original_config, use_ema=use_ema, **kwargs)
        return model

    def check_inputs(self, sample: torch.Tensor, timestep) -> None:
        """Raise a `ValueError` for a sample that is not `(B, in_channels, F, h, w)` with admissible sides."""
        if not isinstance(sample, torch.Tensor) or sample.ndim != 5:
            shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"`sample` must be a (B, C, F, h, w) tensor, got {shape}.")
        if sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`sample` has {sample.shape[1]} channels, the model takes {self.config.in_channels} "
                "([x_t | mask latents | informed-slice latent])."
            )
        if sample.shape[2] < 1:
            raise ValueError("`sample` has no frames.")
        height, width = sample.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(
                f"Latent height and width must be multiples of {self.size_multiple}, got {height}x{width}."
            )
        timesteps = torch.as_tensor(timestep)
        if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.numel() not in (1, sample.shape[0])):
            raise ValueError(
                f"`timestep` must be a number or a (B,) tensor with B={sample.shape[0]}, got shape "
                f"{tuple(timesteps.shape)}."
            )

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True
    ) -> GEM3DUNetOutput | tuple:
        r"""Predict the noise of every frame of a batch of clips.

        Args:
            sample: `(B, in_channels, F, h, w)`: noisy latents, mask latents and the informed-slice latent repeated
                over the frames, concatenated along channels; `h`, `w` multiples of [`size_multiple`].
            timestep: Diffusion timestep, one for all clips or one per clip `(B,)` (shared by a clip's frames).
            return_dict: Return a [`GEM3DUNetOutput`] rather than a tuple.
        """
        self.check_inputs(sample, timestep)
        batch, _, num_frames = sample.shape[:3]
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
        temb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))
        temb = temb.repeat_interleave(num_frames, dim=0)

        hidden = rearrange(sample, "b c f h w -> (b f) c h w")
        hidden = _temporal(self.conv_in_temporal, self.conv_in(hidden), num_frames)
        skips = [hidden]
        for block in self.down_blocks:
            hidden, level_skips = block(hidden, temb, num_frames)
            skips += level_skips
        hidden = self.mid_block(hidden, temb, num_frames)
        for block in self.up_blocks:
            hidden = block(hidden, skips, temb, num_frames)
        noise = self.conv_out(F.silu(self.conv_norm_out(hidden)))
        noise = _temporal(self.conv_out_temporal, noise, num_frames)
        noise = rearrange(noise, "(b f) c h w -> b c f h w", b=batch)
        if not return_dict:
            return (noise,)
        return GEM3DUNetOutput(sample=noise)
