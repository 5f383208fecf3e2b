"""`VQModel3D`: the Patch-Volume vector-quantised autoencoder of 3D MedDiffusion."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ...loaders.single_file import FromOriginalCheckpointMixin
from ...utils.sliding_window import BLEND_MODES, sliding_window_inference
from ...utils.validation import as_triple, check_volume_tensor
from ...utils.volume import pad_to_multiple
from ...utils.volume_tiling import merge_patches, split_into_patches
from ..modeling_utils import PortableConfigMixin
from .patch_volume import PatchVolumeDecoder, PatchVolumeEncoder
from .slab_decoding import SlabDecoder
from .vector_quantizer_3d import VectorQuantizer3D, VectorQuantizer3DOutput


@dataclass
class VQModel3DEncoderOutput(BaseOutput):
    """Output of [`VQModel3D.encode`].

    Args:
        latents (`torch.Tensor` of shape `(B, latent_channels, d, h, w)`):
            Continuous latents before quantisation, assembled from the independently encoded patches.
        input_size (`tuple[int, int, int]`):
            Spatial size `(D, H, W)` of the encoded volume before padding; pass it to `decode(output_size=...)` to
            crop the reconstruction back.
    """

    latents: torch.Tensor
    input_size: tuple[int, int, int]


class VQModel3D(
    PortableConfigMixin, ModelMixin, AttentionMixin, AutoencoderMixin, ConfigMixin, FromOriginalCheckpointMixin
):
    r"""Patch-Volume autoencoder: patch-wise encoding, nearest-code quantisation and a whole-volume joint decoder.

    Encoding cuts the volume into non-overlapping `patch_size` cubes, encodes each independently and assembles their
    latents on the patch grid, so encoding memory does not grow with the volume. Decoding quantises the latent to its
    nearest codebook vectors and decodes the whole latent at once, so the reconstruction has no patch seams. With
    [`~VQModel3D.enable_slab_decoding`], the same decode runs slab by slab in bounded memory with the same result;
    with [`~VQModel3D.enable_tiling`], large latents are decoded as overlapping, blended tiles (faster, approximate).

    Volumes whose sides are not multiples of `patch_size` are padded at the end of each axis with `pad_value` (the
    background of the model's `[-1, 1]` intensity space) and `forward` crops the reconstruction back to the input
    size. The released 3D MedDiffusion autoencoders are `block_out_channels=(48, 96, 192)` (8x) and `(48, 96)` (4x).

    Parameters:
        in_channels (`int`, defaults to 1): Image channels.
        out_channels (`int`, defaults to 1): Reconstructed image channels.
        block_out_channels (`tuple[int]`, defaults to `(48, 96, 192)`):
            Width of each downsampling level; the compression factor per axis is `2 ** len(block_out_channels)`.
        latent_channels (`int`, defaults to 8): Channels of the latent and size of each codebook vector.
        num_vq_embeddings (`int`, defaults to 8192): Codebook size.
        norm_num_groups (`int`, defaults to 24): Groups of every GroupNorm.
        norm_eps (`float`, defaults to 1e-6): Epsilon of every GroupNorm.
        attention_heads (`int`, defaults to 4): Heads of the middle-block attention.
        attention_head_dim (`int`, defaults to 32): Features per attention head.
        patch_size (`int` or `tuple[int, int, int]`, defaults to 64): Side of the cubes encoded independently.
        pad_value (`float`, defaults to -1.0): Value used to pad sides that are not multiples of `patch_size`.
        commitment_cost (`float`, defaults to 0.25): Weight of the commitment loss.
        codebook_decay (`float`, defaults to 0.99): EMA decay of the codebook statistics in training mode.
        codebook_restart_threshold (`float`, defaults to 1.0): Codes whose EMA usage falls below this restart at
            random encoder outputs during training (0 disables restarts).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ResnetBlock3D", "MidBlock3D"]
    _skip_layerwise_casting_patterns = ["quantize"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        block_out_channels: tuple[int, ...] = (48, 96, 192),
        latent_channels: int = 8,
        num_vq_embeddings: int = 8192,
        norm_num_groups: int = 24,
        norm_eps: float = 1e-6,
        attention_heads: int = 4,
        attention_head_dim: int = 32,
        patch_size: int | tuple[int, int, int] = 64,
        pad_value: float = -1.0,
        commitment_cost: float = 0.25,
        codebook_decay: float = 0.99,
        codebook_restart_threshold: float = 1.0,
    ):
        super().__init__()
        block_out_channels = tuple(block_out_channels)
        if not block_out_channels:
            raise ValueError("`block_out_channels` needs at least one level (one halving of each side).")
        bad_widths = [width for width in block_out_channels if width % norm_num_groups]
        if bad_widths:
            raise ValueError(
                f"Every width in `block_out_channels` must be divisible by `norm_num_groups`={norm_num_groups}; "
                f"{bad_widths} are not."
            )
        self.patch_size = as_triple(patch_size, "patch_size")
        factor = self.downsample_factor
        if any(side % factor for side in self.patch_size):
            raise ValueError(
                f"`patch_size` {self.patch_size} must be a multiple of the compression factor {factor} "
                f"(2 ** len(block_out_channels))."
            )
        blocks = dict(
            block_out_channels=block_out_channels,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_heads=attention_heads,
            attention_head_dim=attention_head_dim,
        )
        self.encoder = PatchVolumeEncoder(in_channels, latent_channels, **blocks)
        self.quant_conv = nn.Conv3d(latent_channels, latent_channels, kernel_size=1)
        self.quantize = VectorQuantizer3D(
            num_vq_embeddings, latent_channels, commitment_cost, codebook_decay, codebook_restart_threshold
        )
        self.post_quant_conv = nn.Conv3d(latent_channels, latent_channels, kernel_size=1)
        self.decoder = PatchVolumeDecoder(latent_channels, out_channels, **blocks)

        self.use_slicing = False
        self.use_tiling = False
        self.tile_latent_size = (16, 16, 16)
        self.tile_latent_overlap = 4
        self.tile_blend_mode = "constant"
        self.patch_batch_size = 4
        self.use_slab_decoding = False
        self.slab_latent_size = None
        self.slab_memory_budget = 4.0
        self.slab_axis = None

    @property
    def downsample_factor(self) -> int:
        """Compression factor of each spatial axis (8 for the released 8x model, 4 for the 4x one)."""
        return 2 ** len(self.config.block_out_channels)

    @property
    def latent_patch_size(self) -> tuple[int, int, int]:
        """Latent size of one encoded patch."""
        return tuple(side // self.downsample_factor for side in self.patch_size)

    # ----------------------------------------------------------------------------------------------- encoding

    def encode(
        self, sample: torch.Tensor, return_dict: bool = True, patch_batch_size: int | None = None
    ) -> VQModel3DEncoderOutput | tuple:
        """Encode `(B, in_channels, D, H, W)` volumes patch by patch into continuous (pre-quantisation) latents.

        Args:
            sample: Volumes in the model's `[-1, 1]` intensity space.
            return_dict: Return a [`VQModel3DEncoderOutput`] rather than a tuple.
            patch_batch_size: Patches encoded per encoder call (bounds memory; defaults to `self.patch_batch_size`).

        Returns:
            Latents of shape `(B, latent_channels, ceil(D / p) * p / f, ...)` with `p` the patch size and `f` the
            compression factor, and the input's spatial size.
        """
        check_volume_tensor(sample, "sample", channels=self.config.in_channels)
        input_size = tuple(sample.shape[2:])
        padded = pad_to_multiple(sample, self.patch_size, self.config.pad_value)
        patches, grid = split_into_patches(padded, self.patch_size)
        chunk = patch_batch_size or self.patch_batch_size or patches.shape[0]
        latents = torch.cat([self.quant_conv(self.encoder(part)) for part in patches.split(chunk)])
        latents = merge_patches(latents, grid)
        if not return_dict:
            return (latents, input_size)
        return VQModel3DEncoderOutput(latents=latents, input_size=input_size)

    # ----------------------------------------------------------------------------------------------- quantisation

    def quantize_latents(self, latents: torch.Tensor, return_dict: bool = True) -> VectorQuantizer3DOutput | tuple:
        """Replace every latent vector by its nearest codebook vector (squared L2, the lowest index wins ties).

        Returns the straight-through quantised latents, the code indices `(B, d, h, w)` and the commitment loss.
        """
        check_volume_tensor(latents, "latents", channels=self.config.latent_channels)
        output = self.quantize(latents)
        return output if return_dict else output.to_tuple()

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Map latents to the diffusion model's space: the codebook's global min/max go to -1/1 (no clipping)."""
        low, high = self._codebook_range()
        return (latents - low) / (high - low) * 2 - 1

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of [`~VQModel3D.normalize_latents`]: diffusion-space latents back to the codebook's range."""
        low, high = self._codebook_range()
        return (latents + 1) / 2 * (high - low) + low

    def _codebook_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        codebook = self.quantize.embedding
        return codebook.min(), codebook.max()

    # ----------------------------------------------------------------------------------------------- decoding

    def enable_tiling(
        self,
        tile_latent_size: int | tuple[int, int, int] = 16,
        tile_latent_overlap: int = 4,
        mode: str = "constant",
    ) -> None:
        """Decode latents larger than a tile as overlapping, blended tiles, bounding peak memory.

        The tiles are decoded one at a time by [`~meddiffusers.utils.sliding_window_inference`] and blended with its
        weights: `"constant"` (the default) averages the overlapping tiles; `"gaussian"` lets each tile's centre
        dominate its borders. On the tiny parity models the plain average is as close to the full decode as the
        Gaussian blend, or closer (the test suite prints the differences).

        Args:
            tile_latent_size: Latent size of one tile (16 gives 128-voxel tiles with the 8x model).
            tile_latent_overlap: Latent voxels shared by neighbouring tiles (at least; the last tile of each axis
                ends flush with the latent).
            mode: Blending of the overlaps, `"constant"` or `"gaussian"`.
        """
        self.tile_latent_size = as_triple(tile_latent_size, "tile_latent_size")
        self.tile_latent_overlap = self._check_tile_overlap(tile_latent_overlap, self.tile_latent_size)
        if mode not in BLEND_MODES:
            raise ValueError(f"`mode` must be one of {BLEND_MODES}, got {mode!r}.")
        self.tile_blend_mode = mode
        self.use_tiling = True
        self.use_slab_decoding = False

    def enable_slab_decoding(
        self, slab_latent_size: int | None = None, memory_budget: float = 4.0, axis: int | None = None
    ) -> None:
        """Decode exactly in bounded memory: slab by slab along one axis, with whole-volume GroupNorm statistics.

        The result equals the full decode up to float rounding (see [`~VQModel3D.slab_decode`]); peak memory follows
        `memory_budget` instead of the volume. Switches blended tiling off.

        Args:
            slab_latent_size: Slab thickness in latent slices (8 output slices each with the 8x model); `None`
                picks the thickest slab whose working memory fits in half of the budget.
            memory_budget: GiB that the decoder's activations may take (kept tensors plus slabs in flight; the
                weights and the latent-resolution blocks are not counted). Tensors that do not fit are recomputed
                slab by slab, which costs time, never accuracy.
            axis: Slab axis, 0, 1 or 2 for `D`, `H`, `W`; `None` picks the longest side (the thinnest slabs).
        """
        if slab_latent_size is not None and (
            isinstance(slab_latent_size, bool) or not isinstance(slab_latent_size, int) or slab_latent_size < 1
        ):
            raise ValueError(f"`slab_latent_size` must be a positive int or None, got {slab_latent_size!r}.")
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or memory_budget <= 0:
            raise ValueError(f"`memory_budget` must be a positive number of GiB, got {memory_budget!r}.")
        if axis is not None and axis not in (0, 1, 2):
            raise ValueError(f"`axis` must be 0, 1, 2 (D, H, W) or None, got {axis!r}.")
        self.slab_latent_size = slab_latent_size
        self.slab_memory_budget = float(memory_budget)
        self.slab_axis = axis
        self.use_slab_decoding = True
        self.use_tiling = False

    def disable_slab_decoding(self) -> None:
        """Go back to decoding the whole latent at once (or to blended tiles, if tiling is enabled later)."""
        self.use_slab_decoding = False

    @staticmethod
    def _check_tile_overlap(overlap, tile: tuple[int, int, int]) -> int:
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < min(tile):
            raise ValueError(
                f"`tile_latent_overlap` must be an int in [0, {min(tile)}) (below the tile side), got {overlap!r}."
            )
        return overlap

    def decode(
        self,
        latents: torch.Tensor,
        force_not_quantize: bool = False,
        return_dict: bool = True,
        output_size: tuple[int, int, int] | None = None,
    ) -> DecoderOutput | tuple:
        """Quantise latents to their nearest codes and decode them with the joint decoder.

        Args:
            latents: `(B, latent_channels, d, h, w)` continuous latents (already denormalised).
            force_not_quantize: Decode the latents as given, skipping the nearest-code step.
            return_dict: Return a `DecoderOutput` rather than a tuple.
            output_size: Crop the reconstruction to this `(D, H, W)` (the encoder output's `input_size`).

        Returns:
            The reconstruction `(B, out_channels, f * d, f * h, f * w)` (or cropped to `output_size`).
        """
        check_volume_tensor(latents, "latents", channels=self.config.latent_channels)
        if self.use_slicing and latents.shape[0] > 1:
            sample = torch.cat([self._decode(part, force_not_quantize) for part in latents.split(1)])
        else:
            sample = self._decode(latents, force_not_quantize)
        if output_size is not None:
            depth, height, width = output_size
            sample = sample[:, :, :depth, :height, :width]
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    def decode_indices(self, indices: torch.LongTensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Decode integer code indices of shape `(B, d, h, w)` with the joint decoder."""
        if not isinstance(indices, torch.Tensor) or indices.ndim != 4 or indices.is_floating_point():
            raise ValueError("`indices` must be an integer tensor of shape (B, d, h, w).")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.config.num_vq_embeddings):
            raise ValueError(f"`indices` must lie in [0, {self.config.num_vq_embeddings}).")
        codes = self.quantize.lookup(indices).to(self.post_quant_conv.weight.dtype)
        return self.decode(codes, force_not_quantize=True, return_dict=return_dict)

    def _decode(self, latents: torch.Tensor, force_not_quantize: bool) -> torch.Tensor:
        if self.use_slab_decoding:
            return self.slab_decode(latents, force_not_quantize=force_not_quantize)
        if self.use_tiling and any(s > t for s, t in zip(latents.shape[2:], self.tile_latent_size)):
            return self.tiled_decode(latents, force_not_quantize=force_not_quantize)
        return self._decode_block(latents, force_not_quantize)

    def _decode_block(self, latents: torch.Tensor, force_not_quantize: bool) -> torch.Tensor:
        if not force_not_quantize:
            latents = self.quantize.lookup(self.quantize.nearest_indices(latents)).to(latents.dtype)
        return self.decoder(self.post_quant_conv(latents))

    def slab_decode(self, latents: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Decode `latents` exactly, slab by slab, with the settings of [`~VQModel3D.enable_slab_decoding`].

        Quantisation, the first convolution and the latent-resolution attention run on the whole latent (it is
        small); the remaining layers run on slabs with halos taken from each convolution's kernel, stride and padding,
        and every GroupNorm normalises with the statistics of its whole input (float64 sums). Runs without autograd.

        Returns:
            The `(B, out_channels, f * d, f * h, f * w)` reconstruction, equal to the full decode's.
        """
        check_volume_tensor(latents, "latents", channels=self.config.latent_channels)
        with torch.no_grad():
            if not force_not_quantize:
                latents = self.quantize.lookup(self.quantize.nearest_indices(latents)).to(latents.dtype)
            hidden_states = self.post_quant_conv(latents)
            del latents
            axis = None if self.slab_axis is None else self.slab_axis + 2
            slabs = SlabDecoder(self.decoder, self.slab_latent_size, self.slab_memory_budget * 2**30, axis)
            sample = slabs(hidden_states)
        self.slab_plan = slabs.describe()
        return sample

    def tiled_decode(
        self,
        latents: torch.Tensor,
        force_not_quantize: bool = False,
        tile_latent_size: int | tuple[int, int, int] | None = None,
        tile_latent_overlap: int | None = None,
        mode: str | None = None,
    ) -> torch.Tensor:
        """Decode overlapping latent tiles one at a time and blend them (see [`~VQModel3D.enable_tiling`]).

        Peak memory is that of one tile's decode plus the output volume. Tiles see less context than the whole
        latent (GroupNorm statistics and the middle-block attention are per tile), so the result is close to, not
        identical with, the full decode. Arguments left as `None` take the values set by `enable_tiling`.

        Returns:
            The `(B, out_channels, f * d, f * h, f * w)` reconstruction.
        """
        tile = self.tile_latent_size if tile_latent_size is None else as_triple(tile_latent_size, "tile_latent_size")
        overlap = self.tile_latent_overlap if tile_latent_overlap is None else tile_latent_overlap
        overlap = self._check_tile_overlap(overlap, tile)
        return sliding_window_inference(
            latents,
            window_size=tile,
            predictor=lambda window: self._decode_block(window, force_not_quantize),
            overlap=tuple(overlap / side for side in tile),
            mode=self.tile_blend_mode if mode is None else mode,
            output_scale=self.downsample_factor,
        )

    def sliding_decode(
        self, latents: torch.Tensor, tile_latent_size: int | tuple[int, int, int] = 32, force_not_quantize=False
    ) -> torch.Tensor:
        """The original code's large-volume decode: non-overlapping latent tiles decoded independently and placed
        side by side (seams are expected). Kept for parity with 3D MedDiffusion; prefer `enable_tiling()`.

        Where a side is not a multiple of the tile (the original code drops such remainders), the last tile of that
        axis is the smaller remainder.
        """
        check_volume_tensor(latents, "latents", channels=self.config.latent_channels)
        return sliding_window_inference(
            latents,
            window_size=as_triple(tile_latent_size, "tile_latent_size"),
            predictor=lambda window: self._decode_block(window, force_not_quantize),
            overlap=0.0,
            mode="constant",
            output_scale=self.downsample_factor,
            last_window="truncate",
        )

    # ----------------------------------------------------------------------------------------------- round trip

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Encode patch-wise, quantise (straight-through, so it trains) and decode jointly, cropped to the input.

        Returns a `DecoderOutput` with the reconstruction and the commitment loss.
        """
        encoded = self.encode(sample)
        quantized = self.quantize(encoded.latents)
        reconstruction = self.decoder(self.post_quant_conv(quantized.quantized))
        depth, height, width = encoded.input_size
        reconstruction = reconstruction[:, :, :depth, :height, :width]
        if not return_dict:
            return (reconstruction, quantized.commit_loss)
        return DecoderOutput(sample=reconstruction, commit_loss=quantized.commit_loss)
