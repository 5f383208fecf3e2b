"""Conversion of original 3D MedDiffusion BiFlowNet training files (`.pt`) to `BiFlowNet3DModel`."""

from __future__ import annotations

import json
import os
import re

from diffusers.utils import logging

from .key_mapping import rename_key
from .single_file import OriginalCheckpointConverter

logger = logging.get_logger(__name__)

_DIT_RULES = [
    (r"\.attn\.qkv\.", ".attention.to_qkv."),
    (r"\.attn\.proj\.", ".attention.to_out."),
    (r"\.mlp\.fc1\.", ".ff.linear_1."),
    (r"\.mlp\.fc2\.", ".ff.linear_2."),
    (r"\.adaLN_modulation\.1\.", ".adaln.linear."),
    (r"\.skip_linear\.", ".skip_proj."),
    (r"^(dit_\w+_stages\.\d+\.output)\.linear\.", r"\1.proj_out."),
]

_RESNET_RULES = [
    (r"\.mlp\.1\.", ".time_emb_proj."),
    (r"\.block1\.proj\.", ".conv1."),
    (r"\.block1\.norm\.", ".norm1."),
    (r"\.block2\.proj\.", ".conv2."),
    (r"\.block2\.norm\.", ".norm2."),
    (r"\.res_conv\.", ".conv_shortcut."),
]

_ATTENTION_RULES = [
    (r"\.fn\.norm\.gamma$", ".norm.weight"),
    (r"\.fn\.fn\.(to_qkv|to_out)\.", r".attention.\1."),
]

_KEY_RULES = [
    (r"^init_conv\.", "conv_in."),
    (r"^time_mlp\.1\.", "time_embedding.linear_1."),
    (r"^time_mlp\.3\.", "time_embedding.linear_2."),
    (r"^cond_emb\.", "class_embedding."),
    (r"^res_mlp\.0\.", "resolution_embedding.linear_1."),
    (r"^res_mlp\.2\.", "resolution_embedding.linear_2."),
    (r"^x_embedder\.proj\.", "patch_embed."),
    (r"^IntraPatchFlow_input\.(\d+)\.0\.", r"dit_input_stages.\1.block."),
    (r"^IntraPatchFlow_input\.(\d+)\.1\.", r"dit_input_stages.\1.output."),
    (r"^IntraPatchFlow_mid\.(\d+)\.", r"dit_mid_blocks.\1."),
    (r"^IntraPatchFlow_output\.(\d+)\.0\.", r"dit_output_stages.\1.block."),
    (r"^IntraPatchFlow_output\.(\d+)\.1\.", r"dit_output_stages.\1.output."),
    (r"^downs\.(\d+)\.0\.", r"down_blocks.\1.resnets.0."),
    (r"^downs\.(\d+)\.2\.", r"down_blocks.\1.resnets.1."),
    (r"^downs\.(\d+)\.1\.", r"down_blocks.\1.attentions.0."),
    (r"^downs\.(\d+)\.3\.", r"down_blocks.\1.attentions.1."),
    (r"^downs\.(\d+)\.4\.", r"down_blocks.\1.resampler."),
    (r"^ups\.(\d+)\.0\.", r"up_blocks.\1.resnets.0."),
    (r"^ups\.(\d+)\.2\.", r"up_blocks.\1.resnets.1."),
    (r"^ups\.(\d+)\.1\.", r"up_blocks.\1.attentions.0."),
    (r"^ups\.(\d+)\.3\.", r"up_blocks.\1.attentions.1."),
    (r"^ups\.(\d+)\.4\.", r"up_blocks.\1.resampler."),
    (r"^mid_block1\.", "mid_resnet_1."),
    (r"^mid_block2\.", "mid_resnet_2."),
    (r"^mid_spatial_attn\.", "mid_attention."),
    (r"^final_conv\.0\.", "final_resnet."),
    (r"^final_conv\.1\.", "conv_out."),
    *_DIT_RULES,
    *_RESNET_RULES,
    *_ATTENTION_RULES,
]


def rename_biflownet_key(key: str) -> str:
    """Map one original `BiFlowNet` state-dict key to its `BiFlowNet3DModel` name."""
    return rename_key(key, _KEY_RULES)


def convert_biflownet_state_dict(state_dict: dict) -> dict:
    """Rename every key of an original BiFlowNet (or ControlNet encoder) state dict."""
    return {rename_biflownet_key(key): value for key, value in state_dict.items()}


def config_from_constructor_kwargs(kwargs: dict) -> dict:
    """Translate the original `BiFlowNet(...)` keyword arguments into `BiFlowNet3DModel` arguments."""
    if kwargs.get("learn_sigma"):
        raise ValueError(
            "Checkpoints with learn_sigma=True are not supported (the released models predict noise only)."
        )
    if kwargs.get("res_condition") is False:
        raise ValueError("Checkpoints with res_condition=False are not supported (the released models use it).")
    dim = int(kwargs["dim"])
    if kwargs.get("init_dim") not in (None, dim):
        raise ValueError(f"init_dim={kwargs['init_dim']} differs from dim={dim}; only init_dim=None is supported.")
    config = {
        "in_channels": int(kwargs.get("channels", 8)),
        "base_channels": dim,
        "channel_mults": list(kwargs.get("dim_mults", (1, 1, 2, 4, 8))),
        "attention_levels": [bool(a) for a in kwargs.get("use_sparse_linear_attn", (0, 0, 0, 1, 1))],
        "num_class_embeds": kwargs.get("cond_classes"),
        "attention_heads": int(kwargs.get("attn_heads", 8)),
        "norm_num_groups": int(kwargs.get("resnet_groups", 24)),
        "dit_patch_size": int(kwargs.get("patch_size", 2)),
        "dit_num_heads": int(kwargs.get("DiT_num_heads", 8)),
        "dit_mlp_ratio": float(kwargs.get("mlp_ratio", 4)),
        "num_mid_dit_blocks": int(kwargs.get("num_mid_DiT", 1)),
        "sub_volume_size": int(list(kwargs.get("sub_volume_size", (8, 8, 8)))[0]),
        "vq_size": int(kwargs.get("vq_size", 64)),
        "conv_in_kernel": int(kwargs.get("init_kernel_size", 3)),
    }
    return config


def config_from_training_args(args: dict) -> dict:
    """Translate the training script's `args` (argparse fields) into `BiFlowNet3DModel` arguments.

    The script never sets the attention heads or GroupNorm groups, so they are the released 8 and 24.
    """
    return config_from_constructor_kwargs(
        {
            "dim": args["model_dim"],
            "channels": args.get("volume_channels", 8),
            "dim_mults": args.get("dim_mults", (1, 1, 2, 4, 8)),
            "use_sparse_linear_attn": args.get("use_attn", (0, 0, 0, 1, 1)),
            "cond_classes": args.get("num_classes", 7),
            "patch_size": args.get("patch_size", 1),
            "num_mid_DiT": args.get("num_dit", 1),
            "vq_size": args.get("vq_size", 64),
        }
    )


def config_from_state_dict(state_dict: dict) -> dict:
    """Infer `BiFlowNet3DModel` arguments from tensor shapes (heads and groups default to the released 8 / 24)."""
    dim = state_dict["init_conv.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"downs\.(\d+)\.0\.", k))})
    mults = [state_dict[f"downs.{k}.0.block1.proj.weight"].shape[0] // dim for k in levels]
    logger.warning(
        "The checkpoint stores no configuration; inferring it from tensor shapes with 8 attention heads, 8 DiT heads "
        "and 24 GroupNorm groups (the released models). Pass `original_config` if that is wrong."
    )
    return config_from_constructor_kwargs(
        {
            "dim": dim,
            "channels": state_dict["init_conv.weight"].shape[1],
            "dim_mults": mults,
            "use_sparse_linear_attn": [int(f"downs.{k}.1.fn.norm.gamma" in state_dict) for k in levels],
            "cond_classes": state_dict["cond_emb.weight"].shape[0] if "cond_emb.weight" in state_dict else None,
            "patch_size": state_dict["x_embedder.proj.weight"].shape[-1],
            "num_mid_DiT": len({k.split(".")[1] for k in state_dict if k.startswith("IntraPatchFlow_mid.")}),
        }
    )


def _read_original_config(original_config) -> dict | None:
    if original_config is None:
        return None
    if isinstance(original_config, str | os.PathLike):
        with open(original_config, encoding="utf-8") as handle:
            original_config = json.load(handle)
    return original_config.get("constructor_kwargs", original_config)


def _has_training_args(checkpoint: dict) -> bool:
    return isinstance(checkpoint.get("args"), dict) and "model_dim" in checkpoint["args"]


class BiFlowNetConverter(OriginalCheckpointConverter):
    """Original BiFlowNet training files (`.pt` with `model`, `ema`, `args`, `opt`, `scaler`) → `BiFlowNet3DModel`.

    `use_ema` (default `True`) picks the EMA weights the original sampler uses rather than the raw ones. The config
    comes from `original_config` (the `BiFlowNet(...)` keyword arguments, or a dict with them under
    `constructor_kwargs`), else from the stored training `args`, else from tensor shapes.
    """

    options = {"use_ema": True}

    def check(self, checkpoint: dict, path: str, use_ema: bool = True) -> None:
        """Refuse autoencoder and ControlNet files, and files without BiFlowNet weights under `ema` / `model`."""
        if "state_dict" in checkpoint and "encoder.conv_first.weight" in (checkpoint.get("state_dict") or {}):
            raise ValueError(
                f"{path!r} is a Patch-Volume autoencoder checkpoint; load it with VQModel3D.from_single_file."
            )
        if isinstance(checkpoint.get("model"), dict) and "mid_zero_conv.weight" in checkpoint["model"]:
            raise ValueError(
                f"{path!r} is a ControlNet, not a BiFlowNet checkpoint; load it with "
                "ControlNet3DModel.from_single_file."
            )
        key = "ema" if use_ema else "model"
        state_dict = checkpoint.get(key)
        if not isinstance(state_dict, dict) or "init_conv.weight" not in state_dict:
            raise ValueError(
                f"{path!r} has no BiFlowNet weights under {key!r} (found keys {sorted(checkpoint)[:8]}); is it a "
                "3D MedDiffusion BiFlowNet training file?"
            )
        if any(k.startswith("mid_zero_conv") or re.match(r"downs\.\d+\.5\.", k) for k in state_dict):
            raise ValueError(f"{path!r} is a ControlNet, not a BiFlowNet checkpoint.")

    def extract_state_dict(self, checkpoint: dict, use_ema: bool = True) -> dict:
        """The `ema` (default) or `model` weights."""
        return checkpoint["ema" if use_ema else "model"]

    def config(self, checkpoint: dict, state_dict: dict, original_config, use_ema: bool = True) -> dict:
        """`BiFlowNet3DModel` arguments from `original_config`, the training `args` or the tensor shapes."""
        kwargs = _read_original_config(original_config)
        if kwargs is not None:
            return config_from_constructor_kwargs(kwargs)
        if _has_training_args(checkpoint):
            return config_from_training_args(checkpoint["args"])
        return config_from_state_dict(state_dict)

    def rename(self, key: str) -> str:
        """See [`rename_biflownet_key`]."""
        return rename_biflownet_key(key)

    def dropped(self, checkpoint: dict, state_dict: dict, original_config, use_ema: bool = True) -> list[str]:
        """Every top-level entry but the weights loaded and the `args` the config was read from."""
        used = {"ema" if use_ema else "model"}
        if original_config is None and _has_training_args(checkpoint):
            used.add("args")
        return sorted(key for key in checkpoint if key not in used)
