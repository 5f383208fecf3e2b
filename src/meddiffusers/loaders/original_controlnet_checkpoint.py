"""Conversion of the 3D MedDiffusion authors' ControlNet weights to `ControlNet3DModel`."""

from __future__ import annotations

from .key_mapping import rename_key
from .original_biflownet_checkpoint import (
    _read_original_config,
    config_from_constructor_kwargs,
    config_from_state_dict,
    rename_biflownet_key,
)
from .single_file import OriginalCheckpointConverter

_CONTROL_RULES = [
    (r"^downs\.(\d+)\.5\.", r"controlnet_down_blocks.\1."),
    (r"^mid_zero_conv\.", "controlnet_mid_block."),
]

_ENCODER_ONLY = {"out_channels", "num_mid_dit_blocks"}


def rename_controlnet_key(key: str) -> str:
    """Map one original ControlNet key to its `ControlNet3DModel` name."""
    renamed = rename_key(key, _CONTROL_RULES)
    return renamed if renamed != key else rename_biflownet_key(key)


class ControlNetConverter(OriginalCheckpointConverter):
    """The authors' ControlNet weights (`{"model": state_dict}`) → `ControlNet3DModel`.

    The config comes from `original_config` (the `ControlLDM` / BiFlowNet keyword arguments, or a dict with them
    under `constructor_kwargs`) or from tensor shapes, which see the noisy latent and the condition concatenated and
    split them evenly.
    """

    def check(self, checkpoint: dict, path: str) -> None:
        """Refuse files without the ControlNet's `mid_zero_conv`."""
        state_dict = checkpoint.get("model", checkpoint)
        if not isinstance(state_dict, dict) or "mid_zero_conv.weight" not in state_dict:
            raise ValueError(f"{path!r} is not a 3D MedDiffusion ControlNet checkpoint (no `mid_zero_conv`).")

    def extract_state_dict(self, checkpoint: dict) -> dict:
        """The `model` weights (or the checkpoint itself when it is a bare state dict)."""
        return checkpoint.get("model", checkpoint)

    def config(self, checkpoint: dict, state_dict: dict, original_config) -> dict:
        """`ControlNet3DModel` arguments, with `conditioning_channels` read from the input convolution."""
        kwargs = _read_original_config(original_config)
        config = config_from_constructor_kwargs(kwargs) if kwargs is not None else config_from_state_dict(state_dict)
        hint_channels = state_dict["init_conv.weight"].shape[1] - config["in_channels"]
        if kwargs is None:  # shapes see the concatenated input: split it evenly (the authors' hint has `channels`)
            config["in_channels"] = hint_channels = state_dict["init_conv.weight"].shape[1] // 2
        config = {key: value for key, value in config.items() if key not in _ENCODER_ONLY}
        config["conditioning_channels"] = hint_channels
        return config

    def rename(self, key: str) -> str:
        """See [`rename_controlnet_key`]."""
        return rename_controlnet_key(key)

    def dropped(self, checkpoint: dict, state_dict: dict, original_config) -> list[str]:
        """Every top-level entry but `model` (none for a bare state dict)."""
        return sorted(key for key in checkpoint if key != "model") if "model" in checkpoint else []
