"""What every ControlNet of this package shares: zero convolutions, and starting as a copy of the U-Net it controls."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def zero_conv(channels: int) -> nn.Conv3d:
    """A 1x1x1 convolution initialised to zero, so a new ControlNet starts by changing nothing."""
    conv = nn.Conv3d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def copy_encoder_weights(unet: nn.Module, controlnet: nn.Module, padded_inputs: Iterable[str] = ()) -> None:
    """Load `unet`'s weights into the `controlnet` parameters and buffers of the same name.

    Tensors of the same shape are copied. A tensor named in `padded_inputs` (an input convolution that also takes
    the condition channels) gets `unet`'s weights in its first input channels and zeros in the others, so the extra
    channels start without effect. Everything else (zero convolutions, condition layers) keeps its initialisation.
    """
    padded_inputs = set(padded_inputs)
    source, target = unet.state_dict(), controlnet.state_dict()
    for key, value in target.items():
        if key not in source:
            continue
        weight = source[key]
        if weight.shape == value.shape:
            target[key] = weight.clone()
        elif key in padded_inputs:
            padded = torch.zeros_like(value)
            padded[:, : weight.shape[1]] = weight
            target[key] = padded
    controlnet.load_state_dict(target)


def controlnet_from_unet(cls, unet, load_weights_from_unet: bool = True, padded_inputs: Iterable[str] = (), **kwargs):
    """A `cls` ControlNet with `unet`'s architecture: every config value of `unet` that `cls` takes, then `kwargs`.

    With `load_weights_from_unet`, its encoder starts as a copy of `unet`'s ([`copy_encoder_weights`]).
    """
    keep = set(cls._get_init_keys(cls)) - {"self", *kwargs}
    controlnet = cls(**{key: value for key, value in dict(unet.config).items() if key in keep}, **kwargs)
    if load_weights_from_unet:
        copy_encoder_weights(unet, controlnet, padded_inputs)
    return controlnet
