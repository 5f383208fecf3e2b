"""Conversion of original 3D MedDiffusion Patch-Volume checkpoints (Lightning `patchvolumeAE`) to `VQModel3D`."""

from __future__ import annotations

import json
import math
import os
import re

from diffusers.utils import logging

from .key_mapping import rename_key
from .single_file import OriginalCheckpointConverter

logger = logging.get_logger(__name__)

# Weights that only the training losses use; they have no place in the inference model.
LOSS_ONLY_PREFIXES = ("volume_discriminator.", "perceptual_loss.", "image_discriminator.")

# (original pattern, meddiffusers replacement), applied in order to every key.
_KEY_RULES = [
    (r"^(encoder|decoder)\.conv_first\.", r"\1.conv_in."),
    (r"^encoder\.conv_blocks\.(\d+)\.down\.", r"encoder.down_blocks.\1.resampler.conv."),
    (r"^decoder\.conv_blocks\.(\d+)\.up\.conv_trans\.", r"decoder.up_blocks.\1.resampler.conv."),
    (r"^encoder\.conv_blocks\.(\d+)\.res1\.", r"encoder.down_blocks.\1.resnets.0."),
    (r"^encoder\.conv_blocks\.(\d+)\.res2\.", r"encoder.down_blocks.\1.resnets.1."),
    (r"^decoder\.conv_blocks\.(\d+)\.res1\.", r"decoder.up_blocks.\1.resnets.0."),
    (r"^decoder\.conv_blocks\.(\d+)\.res2\.", r"decoder.up_blocks.\1.resnets.1."),
    (r"\.resConv\.", r".conv_shortcut."),
    (r"^(encoder|decoder)\.mid_block\.res1\.", r"\1.mid_block.resnet_1."),
    (r"^(encoder|decoder)\.mid_block\.res2\.", r"\1.mid_block.resnet_2."),
    (r"^(encoder|decoder)\.mid_block\.attn\.norm\.", r"\1.mid_block.attention.norm."),
    (r"^(encoder|decoder)\.mid_block\.attn\.(to_qkv|to_out)\.", r"\1.mid_block.attention.attention.\2."),
    (r"^(encoder|decoder)\.final_block\.0\.", r"\1.norm_out."),
    (r"^(encoder|decoder)\.final_block\.2\.", r"\1.conv_out."),
    (r"^pre_vq_conv\.", "quant_conv."),
    (r"^post_vq_conv\.", "post_quant_conv."),
    (r"^codebook\.embeddings$", "quantize.embedding"),
    (r"^codebook\.N$", "quantize.cluster_size"),
    (r"^codebook\.z_avg$", "quantize.embedding_avg"),
]


def rename_patch_volume_key(key: str) -> str:
    """Map one original `patchvolumeAE` state-dict key to its `VQModel3D` name."""
    return rename_key(key, _KEY_RULES)


def convert_patch_volume_state_dict(state_dict: dict) -> tuple[dict, list[str]]:
    """Rename an original autoencoder state dict; returns the converted dict and the loss-only keys dropped."""
    converted, dropped = {}, []
    for key, value in state_dict.items():
        if key.startswith(LOSS_ONLY_PREFIXES):
            dropped.append(key)
        else:
            converted[rename_patch_volume_key(key)] = value
    return converted, dropped


def _read_original_config(original_config) -> dict | None:
    if original_config is None:
        return None
    if isinstance(original_config, str | os.PathLike):
        with open(original_config, encoding="utf-8") as handle:
            original_config = json.load(handle)
    if "cfg" in original_config:
        original_config = original_config["cfg"]
    if "model" not in original_config:
        raise ValueError(
            "`original_config` must hold the original `cfg` sections: {'model': {...}, 'dataset': {...}}."
        )
    return original_config


def config_from_original(cfg: dict) -> dict:
    """Translate the original `cfg` (`model` and `dataset` sections) into `VQModel3D` arguments."""
    model = cfg["model"]
    dataset = cfg.get("dataset") or {}
    factors = set(model.get("downsample", [8, 8, 8]))
    if len(factors) != 1:
        raise ValueError(f"Anisotropic compression {model['downsample']} is not supported by VQModel3D.")
    levels = int(math.log2(factors.pop()))
    config = {
        "in_channels": int(dataset.get("image_channels", 1)),
        "out_channels": int(dataset.get("image_channels", 1)),
        "block_out_channels": [int(model["n_hiddens"]) * 2**level for level in range(levels)],
        "latent_channels": int(model["embedding_dim"]),
        "num_vq_embeddings": int(model["n_codes"]),
        "norm_num_groups": int(model.get("num_groups", 24)),
        "patch_size": int(dataset.get("patch_size", 64)),
    }
    if model.get("norm_type", "group") != "group":
        raise ValueError(f"Only GroupNorm autoencoders are supported, the checkpoint uses {model['norm_type']!r}.")
    return config


def config_from_state_dict(state_dict: dict) -> dict:
    """Infer `VQModel3D` arguments from the original tensor shapes (GroupNorm groups default to the released 24)."""
    levels = sorted(
        {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.down\.", k))}
    )
    widths = [state_dict[f"encoder.conv_blocks.{level}.res2.conv1.weight"].shape[0] for level in levels]
    logger.warning(
        "The checkpoint stores no hyper-parameters; inferring the architecture from tensor shapes and assuming "
        "norm_num_groups=24 and patch_size=64 (the released models). Pass `original_config` if that is wrong."
    )
    return {
        "in_channels": state_dict["encoder.conv_first.weight"].shape[1],
        "out_channels": state_dict["decoder.final_block.2.weight"].shape[0],
        "block_out_channels": widths,
        "latent_channels": state_dict["pre_vq_conv.weight"].shape[0],
        "num_vq_embeddings": state_dict["codebook.embeddings"].shape[0],
    }


def _stored_cfg(checkpoint: dict) -> dict | None:
    stored = (checkpoint.get("hyper_parameters") or {}).get("cfg")
    return stored if isinstance(stored, dict) and "model" in stored else None


class PatchVolumeConverter(OriginalCheckpointConverter):
    """Original Patch-Volume checkpoints (PyTorch-Lightning `.ckpt` of `patchvolumeAE`) → `VQModel3D`.

    The config comes from `original_config` (the original `cfg`: `{"model": {...}, "dataset": {...}}`), else from
    the checkpoint's `hyper_parameters`, else from tensor shapes. Loss-only weights (discriminators, perceptual
    network) are dropped, as are the Lightning training entries (optimizer states, loops, callbacks, ...).
    """

    def check(self, checkpoint: dict, path: str) -> None:
        """Refuse files that hold no Patch-Volume encoder, pointing BiFlowNet / ControlNet files to their loader."""
        state_dict = checkpoint.get("state_dict", checkpoint)
        if not isinstance(state_dict, dict) or "encoder.conv_first.weight" not in state_dict:
            hint = ""
            if "ema" in checkpoint or "model" in checkpoint:
                hint = (
                    " It looks like a BiFlowNet or ControlNet training file; load it with that model's "
                    "from_single_file."
                )
            raise ValueError(f"{path!r} is not a 3D MedDiffusion Patch-Volume autoencoder checkpoint." + hint)

    def extract_state_dict(self, checkpoint: dict) -> dict:
        """The Lightning module's `state_dict` (or the checkpoint itself when it is a bare state dict)."""
        return checkpoint.get("state_dict", checkpoint)

    def config(self, checkpoint: dict, state_dict: dict, original_config) -> dict:
        """`VQModel3D` arguments from `original_config`, the stored hyper-parameters or the tensor shapes."""
        cfg = _read_original_config(original_config)
        if cfg is None:
            cfg = _stored_cfg(checkpoint)
        return config_from_original(cfg) if cfg is not None else config_from_state_dict(state_dict)

    def rename(self, key: str) -> str:
        """See [`rename_patch_volume_key`]."""
        return rename_patch_volume_key(key)

    def dropped(self, checkpoint: dict, state_dict: dict, original_config) -> list[str]:
        """Loss-only weights, then every Lightning entry other than the weights and the config that was read."""
        weights = [key for key in state_dict if key.startswith(LOSS_ONLY_PREFIXES)]
        if "state_dict" not in checkpoint:
            return weights
        used = {"state_dict"}
        if original_config is None and _stored_cfg(checkpoint) is not None:
            used.add("hyper_parameters")
        return weights + sorted(key for key in checkpoint if key not in used)
