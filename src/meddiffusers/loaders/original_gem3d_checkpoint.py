"""Conversion of the original GEM-3D checkpoints (PyTorch-Lightning `LatentDiffusion` `.ckpt` files).

One GEM-3D volume checkpoint (stage 1 or stage 2) holds the volume U-Net (`model.diffusion_model.*`, optionally its
LitEma shadow `model_ema.*`), the frozen LDM KL-f8 autoencoder (`first_stage_model.*`, stored again as
`cond_stage_model.*`) and the 13 noise-schedule buffers; the informed-slice checkpoint holds a 2-D cross-attention
U-Net and the same autoencoder. [`load_gem3d_components`] reads a file once, without executing pickled code, and
returns:

- the volume U-Net as [`GEM3DUNetModel`] (the original fused, per-head-ordered `qkv` convolutions are split into
  diffusers `Attention` `to_q` / `to_k` / `to_v` weights here),
- the autoencoder as diffusers' `AutoencoderKL`, converted by diffusers' own LDM converter,
- the slice model as diffusers' `UNet2DConditionModel` (diffusers' LDM U-Net converter),
- the DDIM scheduler config, after checking that the stored schedule buffers are the ones diffusers computes.
"""

from __future__ import annotations

import inspect
import os
import re

import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from diffusers.utils import logging

from .key_mapping import load_converted_state_dict
from .safe_unpickle import load_original_checkpoint
from .single_file import KeyReport, OriginalCheckpointConverter

logger = logging.get_logger(__name__)

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
# `logvar` is the (unused at inference) learned-variance table of LatentDiffusion, saved with the schedule buffers.
TRAINING_BUFFERS = ("logvar", "lvlb_weights", "model_ema.decay", "model_ema.num_updates")
# A released GEM-3D config uses 32 channels per attention head; the tensor shapes do not record it.
DEFAULT_HEAD_CHANNELS = 32
VAE_SCALING_FACTOR = 0.18215


# ---------------------------------------------------------------------------------------------------------------
# Reading the checkpoint and the original config
# ---------------------------------------------------------------------------------------------------------------


def read_original_config(original_config) -> dict | None:
    """The original project config as `{"model": {"target": ..., "params": {...}}}`, or `None`.

    Args:
        original_config: `None`, a parsed dict (`{"model": {...}}`, or the fixture's `{"yaml_equivalent": ...}`
            entry), or the path of the original YAML file (read with `yaml.safe_load`).
    """
    if original_config is None:
        return None
    if isinstance(original_config, str | os.PathLike):
        with open(original_config, encoding="utf-8") as handle:
            original_config = yaml.safe_load(handle)
    if isinstance(original_config, dict) and "yaml_equivalent" in original_config:
        original_config = original_config["yaml_equivalent"]
    if not isinstance(original_config, dict) or not isinstance(original_config.get("model"), dict):
        raise ValueError("`original_config` must be the original GEM-3D YAML (or its dict) with a `model:` section.")
    if "params" not in original_config["model"]:
        raise ValueError("The `model:` section of `original_config` has no `params`.")
    return original_config


def lightning_state_dict(checkpoint: dict, path: str) -> dict:
    """The `state_dict` of a Lightning `LatentDiffusion` checkpoint (or the checkpoint itself if it is one)."""
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, dict) or not any(key.startswith(UNET_PREFIX) for key in state_dict):
        raise ValueError(
            f"{path!r} is not a GEM-3D / latent-diffusion checkpoint: it has no `{UNET_PREFIX}*` weights."
        )
    return state_dict


def is_slice_checkpoint(state_dict: dict) -> bool:
    """Whether a latent-diffusion state dict is the informed-slice model (a cross-attention U-Net)."""
    return any(key.startswith(UNET_PREFIX) and ".transformer_blocks." in key for key in state_dict)


def ema_key(unet_key: str) -> str:
    """LitEma's name for the U-Net weight `model.diffusion_model.<key>`: `model_ema.` + the name without dots."""
    return EMA_PREFIX + unet_key[len("model.") :].replace(".", "")


def _unet_weights(state_dict: dict, use_ema: bool, path: str) -> dict:
    """`{original key: tensor}` of the U-Net: `model.diffusion_model.*`, or the matching `model_ema.*` shadows."""
    keys = [key for key in state_dict if key.startswith(UNET_PREFIX)]
    if not use_ema:
        return {key: state_dict[key] for key in keys}
    missing = [ema_key(key) for key in keys if ema_key(key) not in state_dict]
    if missing:
        raise ValueError(
            f"`use_ema=True` but {path!r} has no EMA weights for {len(missing)} U-Net weights (e.g. {missing[:3]}); "
            "it was trained with `use_ema: False` (as stage 2). Load it with `use_ema=False`."
        )
    return {ema_key(key): state_dict[ema_key(key)] for key in keys}


def _unused_entries(checkpoint: dict, state_dict: dict, used: set[str]) -> list[str]:
    """State-dict keys outside `used`, then the Lightning top-level entries other than `state_dict`."""
    dropped = [key for key in state_dict if key not in used]
    if "state_dict" in checkpoint:
        dropped += sorted(key for key in checkpoint if key != "state_dict")
    return dropped


def _check_known_keys(state_dict: dict, path: str) -> None:
    known_prefixes = (UNET_PREFIX, EMA_PREFIX, VAE_PREFIX, COND_STAGE_PREFIX)
    unknown = [
        key
        for key in state_dict
        if not key.startswith(known_prefixes) and key not in SCHEDULE_BUFFERS and key not in TRAINING_BUFFERS
    ]
    if unknown:
        raise ValueError(f"{path!r} has entries a GEM-3D LatentDiffusion checkpoint does not: {unknown[:10]}.")


# ---------------------------------------------------------------------------------------------------------------
# Noise schedule
# ---------------------------------------------------------------------------------------------------------------


def _expected_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """LatentDiffusion's schedule buffers (`v_posterior = 0`) from `betas`, in float64."""
    betas = betas.double()
    alphas = 1.0 - betas
    acp = torch.cumprod(alphas, 0)
    acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
    posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
    return {
        "betas": betas,
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": acp.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - acp).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - acp).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / acp).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / acp - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * acp_prev.sqrt() / (1.0 - acp),
        "posterior_mean_coef2": (1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp),
    }


def scheduler_config_from_checkpoint(state_dict: dict, original_config=None, path: str = "checkpoint") -> dict:
    """The `DDIMScheduler` config of a GEM-3D checkpoint, checked against its 12 stored schedule buffers.

    `beta_start` / `beta_end` / the step count come from `original_config` (`linear_start`, `linear_end`,
    `timesteps`) or from the stored `betas`. The schedule must be the latent-diffusion "linear" one (diffusers'
    `scaled_linear`): every stored buffer is compared with the same quantity computed from the betas diffusers'
    `DDIMScheduler` builds (relative tolerance 1e-4, far below the gap to any other schedule); a mismatch raises.
    The sampling defaults reproduce the original DDIM sampler: timesteps `arange(0, T, T // n) + 1`
    (`timestep_spacing="leading"`, `steps_offset=1`), `alphas_cumprod[0]` as the last "previous" alpha
    (`set_alpha_to_one=False`), no clipping, epsilon prediction.
    """
    missing = [name for name in SCHEDULE_BUFFERS if name not in state_dict]
    if missing:
        raise ValueError(f"{path!r} lacks the LatentDiffusion schedule buffers {missing}.")
    stored_betas = state_dict["betas"]
    params = (read_original_config(original_config) or {"model": {"params": {}}})["model"]["params"]
    if params.get("parameterization", "eps") != "eps":
        raise ValueError(f"Only epsilon-prediction GEM-3D models are supported, got {params['parameterization']!r}.")
    if params.get("beta_schedule", "linear") != "linear":
        raise ValueError(f"Only the latent-diffusion 'linear' schedule is supported, got {params['beta_schedule']!r}.")
    config = {
        "num_train_timesteps": int(params.get("timesteps", stored_betas.numel())),
        "beta_start": float(params.get("linear_start", float(f"{float(stored_betas[0]):.6g}"))),
        "beta_end": float(params.get("linear_end", float(f"{float(stored_betas[-1]):.6g}"))),
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }
    scheduler = DDIMScheduler(**config)
    expected = _expected_buffers(scheduler.betas)
    wrong = []
    for name in SCHEDULE_BUFFERS:
        stored = state_dict[name].double()
        if stored.shape != expected[name].shape or not torch.allclose(stored, expected[name], rtol=1e-4, atol=1e-8):
            wrong.append(name)
    if wrong:
        raise ValueError(
            f"The noise schedule stored in {path!r} ({wrong}) is not the scaled-linear schedule "
            f"{config['beta_start']}..{config['beta_end']} with {config['num_train_timesteps']} steps that diffusers' "
            "DDIMScheduler computes; this checkpoint needs another scheduler."
        )
    return config


# ---------------------------------------------------------------------------------------------------------------
# Volume U-Net (GEM3DUNetModel)
# ---------------------------------------------------------------------------------------------------------------


def gem3d_unet_config_from_original(original_config: dict) -> dict:
    """[`GEM3DUNetModel`] arguments from the original `unet_config` (`openaimodel[_pseudo3D].UNetModel`)."""
    unet = original_config["model"]["params"]["unet_config"]
    params = unet["params"]
    target = unet.get("target", "")
    unsupported = {
        "use_spatial_transformer": False,
        "use_scale_shift_norm": False,
        "resblock_updown": False,
        "conv_resample": True,
        "dims": 2,
        "use_new_attention_order": False,
        "num_classes": None,
    }
    for name, supported in unsupported.items():
        if params.get(name, supported) != supported:
            raise ValueError(f"GEM3DUNetModel supports only {name}={supported!r}, the config has {params[name]!r}.")
    widths = [int(params["model_channels"]) * int(mult) for mult in params["channel_mult"]]
    head_channels = int(params.get("num_head_channels", -1))
    if head_channels == -1:
        heads = int(params["num_heads"])
        if len({width // heads for width in widths}) != 1:
            raise ValueError("GEM3DUNetModel needs the same channels per head at every level (`num_head_channels`).")
        head_channels = widths[0] // heads
    resolutions = [int(r) for r in params["attention_resolutions"]]
    return {
        "in_channels": int(params["in_channels"]),
        "out_channels": int(params["out_channels"]),
        "block_out_channels": widths,
        "layers_per_block": int(params["num_res_blocks"]),
        "attention_levels": [2**level in resolutions for level in range(len(widths))],
        "attention_head_dim": head_channels,
        "temporal_layers": "pseudo3D" in target,
    }


def gem3d_unet_config_from_state_dict(unet_state_dict: dict) -> dict:
    """[`GEM3DUNetModel`] arguments inferred from the shapes of the original U-Net weights (prefix stripped).

    The channels per attention head are not recorded in the weights; the released value (32) is assumed, with a
    warning. Pass `original_config` (or `attention_head_dim=...`) if that is wrong.
    """
    sd = unet_state_dict
    blocks = sorted({int(m.group(1)) for key in sd if (m := re.match(r"input_blocks\.(\d+)\.", key))})
    downsamplers = [n for n in blocks if f"input_blocks.{n}.0.op.weight" in sd]
    levels = len(downsamplers) + 1
    layers = (len(blocks) - 1 - len(downsamplers)) // levels
    widths, attention = [], []
    for level in range(levels):
        first = 1 + level * (layers + 1)
        widths.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
        attention.append(f"input_blocks.{first}.1.qkv.weight" in sd)
    logger.warning(
        "No original config given: GEM-3D U-Net architecture inferred from the tensor shapes, assuming "
        f"{DEFAULT_HEAD_CHANNELS} channels per attention head (the released models). Pass `original_config` if that "
        "is wrong."
    )
    return {
        "in_channels": sd["input_blocks.0.0.weight"].shape[1],
        "out_channels": sd["out.2.weight"].shape[0],
        "block_out_channels": widths,
        "layers_per_block": layers,
        "attention_levels": attention,
        "attention_head_dim": DEFAULT_HEAD_CHANNELS,
        "temporal_layers": any("_tem." in key or key.startswith("out_tem.") for key in sd),
    }


_RESNET_RULES = [
    (r"^in_layers\.0\.", "norm1."),
    (r"^in_layers\.2\.", "conv1."),
    (r"^in_layers_tem\.", "temporal_conv1."),
    (r"^emb_layers\.1\.", "time_emb_proj."),
    (r"^out_layers\.0\.", "norm2."),
    (r"^out_layers\.3\.", "conv2."),
    (r"^out_layers_tem\.", "temporal_conv2."),
    (r"^skip_connection\.", "conv_shortcut."),
]
_ATTENTION_RULES = [
    (r"^norm\.", "norm."),
    (r"^qkv\.(weight|bias)#([qkv])$", r"attention.to_\2.\1"),
    (r"^qkv_tem\.(weight|bias)#([qkv])$", r"temporal_attention.to_\2.\1"),
    (r"^proj_out\.", "attention.to_out.0."),
    (r"^proj_out_tem\.", "temporal_attention.to_out.0."),
]


def _rename_inner(rest: str, rules) -> str:
    for pattern, replacement in rules:
        if re.match(pattern, rest):
            return re.sub(pattern, replacement, rest)
    return rest


class GEM3DUNetKeyMap:
    """Original `openaimodel` U-Net key (prefix stripped) -> [`GEM3DUNetModel`] key, for one architecture."""

    def __init__(self, config: dict):
        self.layers = int(config["layers_per_block"])
        self.levels = len(config["block_out_channels"])
        self.attention = list(config["attention_levels"])

    def __call__(self, key: str) -> str:
        fixed = {
            "time_embed.0.": "time_embedding.linear_1.",
            "time_embed.2.": "time_embedding.linear_2.",
            "input_blocks.0.0.": "conv_in.",
            "input_blocks.0.1.": "conv_in_temporal.",
            "out.0.": "conv_norm_out.",
            "out.2.": "conv_out.",
            "out_tem.": "conv_out_temporal.",
        }
        for old, new in fixed.items():
            if key.startswith(old):
                return new + key[len(old) :]
        if m := re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)$", key):
            index, part, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
            level, j = divmod(index, self.layers + 1)
            block = f"down_blocks.{level}."
            if j == self.layers:  # the level's downsampler
                return block + _rename_inner(
                    rest, [(r"^op\.", "downsampler.conv."), (r"^op_tem\.", "downsampler_temporal.")]
                )
            if part == 0:
                return block + f"resnets.{j}." + _rename_inner(rest, _RESNET_RULES)
            return block + f"attentions.{j}." + _rename_inner(rest, _ATTENTION_RULES)
        if m := re.match(r"middle_block\.(\d+)\.(.*)$", key):
            part, rest = int(m.group(1)), m.group(2)
            if part == 1:
                return "mid_block.attention." + _rename_inner(rest, _ATTENTION_RULES)
            return f"mid_block.resnets.{part // 2}." + _rename_inner(rest, _RESNET_RULES)
        if m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)$", key):
            index, part, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            up, j = divmod(index, self.layers + 1)
            block = f"up_blocks.{up}."
            if part == 0:
                return block + f"resnets.{j}." + _rename_inner(rest, _RESNET_RULES)
            if part == 1 and self.attention[self.levels - 1 - up]:
                return block + f"attentions.{j}." + _rename_inner(rest, _ATTENTION_RULES)
            return block + _rename_inner(
                rest, [(r"^conv\.", "upsampler.conv."), (r"^conv_tem\.", "upsampler_temporal.")]
            )
        return key


def split_legacy_qkv(weight: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused `qkv` 1x1 convolution weight `(3C, C, 1)` (or bias `(3C,)`) in the legacy per-head order.

    `QKVAttentionLegacy` groups the `3C` output rows per head: head `h` owns rows `[3dh, 3dh+d)` (queries),
    `[3dh+d, 3dh+2d)` (keys) and `[3dh+2d, 3dh+3d)` (values), `d = C / heads`. Returns the query, key and value
    weights as linear-layer weights `(C, C)` (or biases `(C,)`) with heads as the outer factor, diffusers' order.
    """
    rows = weight.shape[0]
    grouped = weight.reshape(heads, 3, rows // (3 * heads), *weight.shape[1:])
    parts = [grouped[:, i].reshape(rows // 3, *weight.shape[1:]) for i in range(3)]
    if weight.ndim == 3:
        parts = [part[..., 0] for part in parts]
    return tuple(part.contiguous() for part in parts)


class GEM3DUNetConverter(OriginalCheckpointConverter):
    """Original GEM-3D volume checkpoints (stage-1 `openaimodel` / stage-2 `openaimodel_pseudo3D` U-Net) ->
    [`GEM3DUNetModel`].

    Option `use_ema` (default `False`, what the original inference scripts sample with): load the LitEma shadow
    weights `model_ema.*` instead of `model.diffusion_model.*`. The fused legacy `qkv` / `qkv_tem` weights are
    split into three report entries each, named `<original key>#q`, `#k` and `#v`; every other key maps 1:1.
    """

    options = {"use_ema": False}

    def check(self, checkpoint: dict, path: str, use_ema: bool = False) -> None:
        """Refuse files without a GEM-3D volume U-Net, pointing slice-model files to [`load_gem3d_components`]."""
        self._path = path
        state_dict = lightning_state_dict(checkpoint, path)
        if is_slice_checkpoint(state_dict):
            raise ValueError(
                f"{path!r} is the GEM-3D informed-slice model (a cross-attention 2-D U-Net), not a volume U-Net: load "
                "it with `load_gem3d_components(volume_checkpoint, slice_checkpoint=...)`."
            )
        if f"{UNET_PREFIX}input_blocks.0.0.weight" not in state_dict:
            raise ValueError(f"{path!r} has no GEM-3D U-Net input convolution `{UNET_PREFIX}input_blocks.0.0.weight`.")
        _check_known_keys(state_dict, path)

    def extract_state_dict(self, checkpoint: dict, use_ema: bool = False) -> dict:
        """The chosen U-Net weights under their file names (the fused `qkv` are split later, by [`split`])."""
        path = getattr(self, "_path", "checkpoint")
        state_dict = lightning_state_dict(checkpoint, path)
        weights = _unet_weights(state_dict, use_ema, path)
        self._names = {}  # file key -> U-Net key (prefix stripped, dotted)
        for key in state_dict:
            if key.startswith(UNET_PREFIX):
                self._names[ema_key(key) if use_ema else key] = key[len(UNET_PREFIX) :]
        self._fused = {name for name in weights if re.search(r"(^|\.)qkv(_tem)?\.", self._names[name])}
        return weights

    def config(self, checkpoint: dict, state_dict: dict, original_config, use_ema: bool = False) -> dict:
        """Arguments from `original_config`, else inferred from the tensor shapes."""
        cfg = read_original_config(original_config)
        if cfg is not None:
            config = gem3d_unet_config_from_original(cfg)
        else:
            stripped = {self._names[key]: value for key, value in state_dict.items() if key in self._names}
            config = gem3d_unet_config_from_state_dict(stripped)
        self._key_map = GEM3DUNetKeyMap(config)
        return config

    def split(self, state_dict: dict, attention_head_dim: int) -> dict:
        """`state_dict` with every fused `qkv` entry replaced by its `#q`, `#k`, `#v` parts."""
        split = {}
        for key, value in state_dict.items():
            if key not in self._fused:
                # 1x1 Conv1d output projections become linear layers.
                is_projection = re.search(r"(^|\.)proj_out(_tem)?\.weight$", self._names[key]) and value.ndim == 3
                split[key] = value[..., 0] if is_projection else value
                continue
            heads = value.shape[0] // 3 // attention_head_dim
            if heads * attention_head_dim * 3 != value.shape[0]:
                raise ValueError(
                    f"{key}: {value.shape[0] // 3} channels are not divisible by "
                    f"attention_head_dim={attention_head_dim}."
                )
            for name, part in zip("qkv", split_legacy_qkv(value, heads)):
                split[f"{key}#{name}"] = part
                self._names[f"{key}#{name}"] = f"{self._names[key]}#{name}"
        return split

    def rename(self, key: str) -> str:
        """The [`GEM3DUNetModel`] name of a file key (or of a `#q`/`#k`/`#v` part of a fused `qkv`)."""
        name = self._names[key]
        renamed = self._key_map(name)
        if "#" in renamed:
            raise ValueError(f"Unexpected attention weight {key!r} in the GEM-3D checkpoint.")
        return renamed

    def dropped(self, checkpoint: dict, state_dict: dict, original_config, use_ema: bool = False) -> list[str]:
        """Everything but the chosen U-Net weights: the other weight set, VAE, schedule, Lightning entries."""
        full = lightning_state_dict(checkpoint, "checkpoint")
        return _unused_entries(checkpoint, full, set(state_dict))


def _build_unet(checkpoint: dict, path: str, original_config, use_ema: bool, overrides: dict):
    """Convert and strictly load the volume U-Net of an already-read checkpoint (see [`load_gem3d_unet`])."""
    from ..models.unets.unet_gem3d import GEM3DUNetModel

    converter = GEM3DUNetConverter()
    converter.check(checkpoint, path, use_ema=use_ema)
    weights = converter.extract_state_dict(checkpoint, use_ema=use_ema)
    config = converter.config(checkpoint, weights, original_config, use_ema=use_ema)
    config.update(overrides)
    converter._key_map = GEM3DUNetKeyMap(config)
    dropped = converter.dropped(checkpoint, weights, original_config, use_ema=use_ema)
    weights = converter.split(weights, int(config["attention_head_dim"]))
    mapped = [(key, converter.rename(key)) for key in weights]
    converted = {target: weights[source] for source, target in mapped}
    model = GEM3DUNetModel(**config)
    load_converted_state_dict(model, converted, path, config)
    return model.eval(), KeyReport(mapped=mapped, dropped=dropped, missing=[])


def load_gem3d_unet(checkpoint_path: str | os.PathLike, original_config=None, use_ema: bool = False, **kwargs):
    """Load the volume U-Net of an original GEM-3D checkpoint as a [`GEM3DUNetModel`], with its [`KeyReport`].

    Args:
        checkpoint_path: Stage-1 or stage-2 Lightning `.ckpt` (read without executing pickled code).
        original_config: Original YAML path or `{"model": {...}}` dict; `None` infers the architecture from the
            tensor shapes (assuming 32 channels per head).
        use_ema: Load the `model_ema.*` shadow weights (stage 1 only; stage 2 is trained without EMA).
        kwargs: `torch_dtype`, or overrides of [`GEM3DUNetModel`] config arguments.

    Raises:
        ValueError: For a file that is not a GEM-3D volume checkpoint (another model, the slice model, a truncated
            file, a pickle that would execute code), EMA weights requested but absent, or weights that do not match
            the architecture (unexpected / missing / mis-shaped keys are listed).
        FileNotFoundError: If the file does not exist.
    """
    from ..models.unets.unet_gem3d import GEM3DUNetModel

    torch_dtype = kwargs.pop("torch_dtype", None)
    unknown = sorted(set(kwargs) - (set(inspect.signature(GEM3DUNetModel.__init__).parameters) - {"self"}))
    if unknown:
        raise ValueError(f"GEM3DUNetModel.from_single_file got unknown arguments {unknown}.")
    path = os.fspath(checkpoint_path)
    model, report = _build_unet(load_original_checkpoint(path), path, original_config, use_ema, kwargs)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model, report


# ---------------------------------------------------------------------------------------------------------------
# Autoencoder and informed-slice U-Net (diffusers models, diffusers' own LDM converters)
# ---------------------------------------------------------------------------------------------------------------


def _report_by_storage(source: dict, converted: dict, model: torch.nn.Module, path: str, what: str) -> KeyReport:
    """Match diffusers-converted tensors to their source keys (the converters only rename and reshape, so each
    converted tensor shares its source's storage) and refuse any source weight that found no place."""
    by_storage = {}
    for key, value in source.items():
        by_storage.setdefault((value.untyped_storage().data_ptr(), value.storage_offset()), key)
    mapped = []
    for target, value in converted.items():
        origin = by_storage.get((value.untyped_storage().data_ptr(), value.storage_offset()))
        if origin is not None:
            mapped.append((origin, target))
    unused = sorted(set(source) - {origin for origin, _ in mapped})
    if unused:
        raise ValueError(f"{path!r}: {what} weights that the converted model has no place for: {unused[:10]}.")
    missing = sorted(set(model.state_dict()) - set(converted))
    return KeyReport(mapped=mapped, dropped=[], missing=missing)


def _vae_original_config(vae_state_dict: dict) -> dict:
    """An original-config stand-in (`first_stage_config.params.ddconfig`) inferred from the VAE tensor shapes."""
    sd = vae_state_dict
    prefix = VAE_PREFIX
    levels = sorted({int(m.group(1)) for key in sd if (m := re.match(rf"{prefix}encoder\.down\.(\d+)\.", key))})
    ch = sd[f"{prefix}encoder.conv_in.weight"].shape[0]
    blocks = {int(m.group(1)) for key in sd if (m := re.match(rf"{prefix}encoder\.down\.0\.block\.(\d+)\.", key))}
    if any(".attn." in key for key in sd if key.startswith(f"{prefix}encoder.down.")):
        raise ValueError("The autoencoder has attention inside its down blocks, which diffusers' AutoencoderKL lacks.")
    ddconfig = {
        "ch": ch,
        "ch_mult": [sd[f"{prefix}encoder.down.{level}.block.0.conv1.weight"].shape[0] // ch for level in levels],
        "num_res_blocks": len(blocks),
        "in_channels": sd[f"{prefix}encoder.conv_in.weight"].shape[1],
        "out_ch": sd[f"{prefix}decoder.conv_out.weight"].shape[0],
        "z_channels": sd[f"{prefix}decoder.conv_in.weight"].shape[1],
        "resolution": 256,
        "attn_resolutions": [],
    }
    return {
        "model": {
            "params": {"scale_factor": VAE_SCALING_FACTOR, "first_stage_config": {"params": {"ddconfig": ddconfig}}}
        }
    }


def convert_gem3d_vae(state_dict: dict, original_config=None, path: str = "checkpoint"):
    """The frozen KL-f8 autoencoder (`first_stage_model.*`) as diffusers' `AutoencoderKL`, with its [`KeyReport`].

    The config comes from diffusers' `create_vae_diffusers_config_from_ldm` (on `original_config`, or on a stand-in
    inferred from the shapes), the weights from diffusers' `convert_ldm_vae_checkpoint`; loading is strict.
    `scaling_factor` is the config's `scale_factor` (0.18215).
    """
    vae_weights = {key: value for key, value in state_dict.items() if key.startswith(VAE_PREFIX)}
    if not vae_weights:
        raise ValueError(f"{path!r} holds no autoencoder weights (`{VAE_PREFIX}*`).")
    cfg = read_original_config(original_config) or _vae_original_config(vae_weights)
    if cfg["model"]["params"].get("first_stage_config", {}).get("params", {}).get("ddconfig") is None:
        cfg = {"model": {"params": {**cfg["model"]["params"], **_vae_original_config(vae_weights)["model"]["params"]}}}
    ddconfig = cfg["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    if ddconfig.get("attn_resolutions"):
        raise ValueError("Autoencoders with attention in their down/up blocks are not supported by AutoencoderKL.")
    config = create_vae_diffusers_config_from_ldm(cfg, vae_weights)
    config["sample_size"] = int(ddconfig.get("resolution", 256))
    converted = convert_ldm_vae_checkpoint(vae_weights, config)
    vae = AutoencoderKL(**config)
    report = _report_by_storage(vae_weights, converted, vae, path, "autoencoder")
    load_converted_state_dict(vae, converted, path, config)
    return vae.eval(), report


def _slice_original_config(unet_state_dict: dict, vae_state_dict: dict) -> dict:
    """An original-config stand-in for the slice U-Net, inferred from shapes (32 channels per head assumed)."""
    sd = {key[len(UNET_PREFIX) :]: value for key, value in unet_state_dict.items()}
    blocks = sorted({int(m.group(1)) for key in sd if (m := re.match(r"input_blocks\.(\d+)\.", key))})
    downsamplers = [n for n in blocks if f"input_blocks.{n}.0.op.weight" in sd]
    levels = len(downsamplers) + 1
    layers = (len(blocks) - 1 - len(downsamplers)) // levels
    mc = sd["time_embed.0.weight"].shape[1]
    firsts = [1 + level * (layers + 1) for level in range(levels)]
    depth = len({m.group(1) for key in sd if (m := re.match(r"middle_block\.1\.transformer_blocks\.(\d+)\.", key))})
    logger.warning(
        "No original config given for the slice model: architecture inferred from the tensor shapes, assuming "
        f"{DEFAULT_HEAD_CHANNELS} channels per attention head."
    )
    unet = {
        "in_channels": sd["input_blocks.0.0.weight"].shape[1],
        "out_channels": sd["out.2.weight"].shape[0],
        "model_channels": mc,
        "channel_mult": [sd[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0] // mc for n in firsts],
        "num_res_blocks": layers,
        "attention_resolutions": [
            2**level for level, n in enumerate(firsts) if f"input_blocks.{n}.1.norm.weight" in sd
        ],
        "num_head_channels": DEFAULT_HEAD_CHANNELS,
        "use_spatial_transformer": True,
        "transformer_depth": depth,
        "context_dim": sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        "image_size": 64,
    }
    vae = _vae_original_config(vae_state_dict)["model"]["params"]
    return {"model": {"params": {"unet_config": {"params": unet}, **vae}}}


def convert_gem3d_slice_unet(state_dict: dict, original_config=None, use_ema: bool = False, path: str = "checkpoint"):
    """The informed-slice generator as diffusers' `UNet2DConditionModel`, with its [`KeyReport`].

    The original is the latent-diffusion `openaimodel.UNetModel` with `SpatialTransformer`s (one context token of
    width `context_dim`: the slice-position embedding, see [`~models.embeddings.slice_position_embedding`]).
    diffusers' `create_unet_diffusers_config_from_ldm` and `convert_ldm_unet_checkpoint` do the conversion; the
    head count is set from `num_head_channels` (diffusers' helper only reads `num_heads`). With `use_ema` the
    `model_ema.*` shadows are loaded (every U-Net weight must have one).
    """
    unet_weights = _unet_weights(state_dict, use_ema, path)
    dotted = {key: state_dict[key] for key in state_dict if key.startswith(UNET_PREFIX)}
    cfg = read_original_config(original_config)
    if cfg is None:
        cfg = _slice_original_config(dotted, {k: v for k, v in state_dict.items() if k.startswith(VAE_PREFIX)})
    params = cfg["model"]["params"]["unet_config"]["params"]
    if not params.get("use_spatial_transformer", False):
        raise ValueError(
            "The slice model config has `use_spatial_transformer: False`; it is not a GEM-3D slice model."
        )
    if params.get("use_linear_in_transformer", False) or params.get("use_scale_shift_norm", False):
        raise ValueError("GEM-3D slice models use convolutional transformer projections and no scale-shift norm.")
    image_size = int(params.get("image_size", 64))
    config = create_unet_diffusers_config_from_ldm(cfg, dotted)
    config["sample_size"] = image_size
    widths = config["block_out_channels"]
    head_channels = int(params.get("num_head_channels", -1))
    heads = [w // head_channels for w in widths] if head_channels != -1 else [int(params["num_heads"])] * len(widths)
    config["attention_head_dim"] = heads
    # Pass the chosen weights under the dotted names diffusers' converter expects.
    chosen = {key: unet_weights[ema_key(key) if use_ema else key] for key in dotted}
    converted = convert_ldm_unet_checkpoint(chosen, config)
    model = UNet2DConditionModel(**config)
    report = _report_by_storage(chosen, converted, model, path, "slice U-Net")
    if use_ema:
        report.mapped = [(ema_key(source), target) for source, target in report.mapped]
    load_converted_state_dict(model, converted, path, config)
    return model.eval(), report


# ---------------------------------------------------------------------------------------------------------------
# Everything a GEM-3D pipeline needs
# ---------------------------------------------------------------------------------------------------------------


def load_gem3d_components(
    volume_checkpoint: str | os.PathLike,
    slice_checkpoint: str | os.PathLike | None = None,
    original_config=None,
    slice_original_config=None,
    use_ema: bool = False,
    slice_use_ema: bool = False,
) -> dict:
    """Read the original GEM-3D checkpoints (once each, without executing pickled code) and convert their parts.

    Args:
        volume_checkpoint: The stage-2 (pseudo-3D, what whole-volume inference uses) or stage-1 `.ckpt`.
        slice_checkpoint: The informed-slice generator `.ckpt`, or `None`.
        original_config: The volume model's original YAML (path) or `{"model": {...}}` dict; `None` infers the
            architecture from the tensor shapes (assuming 32 channels per attention head).
        slice_original_config: The same for the slice model.
        use_ema: Load the volume U-Net's `model_ema.*` weights (the original inference does not).
        slice_use_ema: Load the slice U-Net's `model_ema.*` weights (the original inference does not).

    Returns:
        `dict` with `vae` (`AutoencoderKL`, `scaling_factor` 0.18215, from the volume file), `unet`
        ([`GEM3DUNetModel`]), `slice_unet` (`UNet2DConditionModel` or `None`), `scheduler_config` (`DDIMScheduler`
        arguments, see [`scheduler_config_from_checkpoint`]) and `report`: `{"unet": KeyReport, "vae": KeyReport,
        "slice_unet": KeyReport | None}` (every weight loaded is listed in `mapped`, deliberately unused entries in
        the U-Net reports' `dropped`; loading is strict, so `missing` is empty).

    Raises:
        ValueError: For files that are not GEM-3D checkpoints of the expected kind, truncated files, pickles that
            would execute code, weights that do not fit the architecture, or a schedule diffusers' DDIM scheduler
            does not reproduce.
    """
    path = os.fspath(volume_checkpoint)
    checkpoint = load_original_checkpoint(path)
    unet, unet_report = _build_unet(checkpoint, path, original_config, use_ema, {})
    state_dict = lightning_state_dict(checkpoint, path)
    vae, vae_report = convert_gem3d_vae(state_dict, original_config, path)
    scheduler_config = scheduler_config_from_checkpoint(state_dict, original_config, path)

    slice_unet, slice_report = None, None
    if slice_checkpoint is not None:
        slice_path = os.fspath(slice_checkpoint)
        slice_ckpt = load_original_checkpoint(slice_path)
        slice_state = lightning_state_dict(slice_ckpt, slice_path)
        if not is_slice_checkpoint(slice_state):
            raise ValueError(
                f"{slice_path!r} is not a GEM-3D informed-slice checkpoint (its U-Net has no cross-attention "
                "transformer); pass the slice model as `slice_checkpoint` and the volume model as `volume_checkpoint`."
            )
        _check_known_keys(slice_state, slice_path)
        slice_unet, slice_report = convert_gem3d_slice_unet(
            slice_state, slice_original_config, slice_use_ema, slice_path
        )
        slice_schedule = scheduler_config_from_checkpoint(slice_state, slice_original_config, slice_path)
        if slice_schedule != scheduler_config:
            raise ValueError(
                f"The slice model's noise schedule {slice_schedule} differs from the volume model's "
                f"{scheduler_config}."
            )
        used = {source for source, _ in slice_report.mapped}
        slice_report.dropped = _unused_entries(slice_ckpt, slice_state, used)
    return {
        "vae": vae,
        "unet": unet,
        "slice_unet": slice_unet,
        "scheduler_config": scheduler_config,
        "report": {"unet": unet_report, "vae": vae_report, "slice_unet": slice_report},
    }
