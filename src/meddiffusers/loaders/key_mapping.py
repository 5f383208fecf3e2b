"""Renaming original state-dict keys and loading them with strict accounting."""

from __future__ import annotations

import os
import re

from torch import nn


def rename_key(key: str, rules) -> str:
    """Apply `(regex, replacement)` rules to `key`, in order."""
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def load_converted_state_dict(model: nn.Module, converted: dict, source, config: dict) -> nn.Module:
    """Load `converted` into `model`, refusing unexpected, missing or mis-shaped weights with one clear error."""
    expected = model.state_dict()
    unexpected = sorted(set(converted) - set(expected))
    missing = sorted(set(expected) - set(converted))
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in converted.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if unexpected or missing or mismatched:
        raise ValueError(
            f"Checkpoint {os.fspath(source)!r} does not match the {type(model).__name__} config {config}: "
            f"unexpected keys {unexpected[:10]}, missing keys {missing[:10]}, shape mismatches {mismatched[:10]}."
        )
    model.load_state_dict(converted, strict=True)
    return model
