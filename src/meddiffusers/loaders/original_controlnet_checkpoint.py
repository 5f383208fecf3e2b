"""Conversion of the 3D MedDiffusion authors' ControlNet weights to `ControlNet3DModel`."""

from __future__ import annotations

import os

from .key_mapping import load_converted_state_dict, rename_key
from .original_biflownet_checkpoint import (
    _read_original_config,
    config_from_constructor_kwargs,
    config_from_state_dict,
    rename_biflownet_key,
)
from .safe_unpickle import load_original_checkpoint

_CONTROL_RULES = [
    (r"^downs\.(\d+)\.5\.", r"controlnet_down_blocks.\1."),
    (r"^mid_zero_conv\.", "controlnet_mid_block."),
]

_ENCODER_ONLY = {"out_channels", "num_mid_dit_blocks"}


def rename_controlnet_key(key: str) -> str:
    """Map one original ControlNet key to its `ControlNet3DModel` name."""
    renamed = rename_key(key, _CONTROL_RULES)
    return renamed if renamed != key else rename_biflownet_key(key)


def load_controlnet_checkpoint(cls, checkpoint_path, original_config=None, torch_dtype=None, **overrides):
    """Build a `cls` (ControlNet3DModel) from the authors' ControlNet file (see `from_single_file`)."""
    checkpoint = load_original_checkpoint(checkpoint_path)
    state_dict = checkpoint.get("model", checkpoint)
    if not isinstance(state_dict, dict) or "mid_zero_conv.weight" not in state_dict:
        raise ValueError(
            f"{os.fspath(checkpoint_path)!r} is not a 3D MedDiffusion ControlNet checkpoint (no `mid_zero_conv`)."
        )
    kwargs = _read_original_config(original_config)
    config = config_from_constructor_kwargs(kwargs) if kwargs is not None else config_from_state_dict(state_dict)
    hint_channels = state_dict["init_conv.weight"].shape[1] - config["in_channels"]
    if kwargs is None:  # shapes see the concatenated input: split it evenly (the authors' hint has `channels`)
        config["in_channels"] = hint_channels = state_dict["init_conv.weight"].shape[1] // 2
    config = {key: value for key, value in config.items() if key not in _ENCODER_ONLY}
    config["conditioning_channels"] = hint_channels
    config.update(overrides)
    converted = {rename_controlnet_key(key): value for key, value in state_dict.items()}
    model = load_converted_state_dict(cls(**config), converted, checkpoint_path, config)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.eval()
