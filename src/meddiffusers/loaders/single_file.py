"""One loading path for original (pre-meddiffusers) checkpoints.

Models inherit [`FromOriginalCheckpointMixin`]; its `from_single_file` finds the model's converter in a table keyed
by class name (so the loaders never import the models), reads the file once without executing pickled code, builds
the model from the converted config and loads every weight with strict accounting. [`load_original_model`] does the
same and also returns a [`KeyReport`] of where each source key went.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass, field

from diffusers.utils import logging

from .key_mapping import load_converted_state_dict
from .safe_unpickle import load_original_checkpoint

logger = logging.get_logger(__name__)


@dataclass
class KeyReport:
    """Where the entries of an original checkpoint went.

    Args:
        mapped (`list[tuple[str, str]]`): `(original key, model key)` for every weight loaded.
        dropped (`list[str]`): What was deliberately not loaded: original state-dict keys (loss-only weights) first,
            then top-level checkpoint entries that were not read (optimizer and scaler states, the unused raw or EMA
            weights, training counters).
        missing (`list[str]`): Model weights that no original key provided. Loading is strict, so a model is only
            returned when this is empty.
    """

    mapped: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


class OriginalCheckpointConverter:
    """How one model's original checkpoint format becomes that model: the five steps every converter implements.

    `options` lists the loader options beyond config overrides that the converter understands, with their defaults
    (for example `{"use_ema": True}`); each step receives them as keyword arguments.
    """

    options: dict = {}

    def check(self, checkpoint: dict, path: str, **options) -> None:
        """Raise a `ValueError` (naming the right loader where possible) if `checkpoint` is not this format."""
        raise NotImplementedError

    def extract_state_dict(self, checkpoint: dict, **options) -> dict:
        """The original weights to convert."""
        raise NotImplementedError

    def config(self, checkpoint: dict, state_dict: dict, original_config, **options) -> dict:
        """The model's constructor arguments, from `original_config`, the checkpoint or the tensor shapes."""
        raise NotImplementedError

    def rename(self, key: str) -> str:
        """The model's name for the original weight `key`."""
        raise NotImplementedError

    def dropped(self, checkpoint: dict, state_dict: dict, original_config, **options) -> list[str]:
        """State-dict keys deliberately not loaded, then the checkpoint's unused top-level entries."""
        raise NotImplementedError


# Model class name -> (converter module in this package, converter class).
ORIGINAL_CHECKPOINT_CONVERTERS = {
    "VQModel3D": ("original_patch_volume", "PatchVolumeConverter"),
    "BiFlowNet3DModel": ("original_biflownet_checkpoint", "BiFlowNetConverter"),
    "ControlNet3DModel": ("original_controlnet_checkpoint", "ControlNetConverter"),
}


def converter_for(cls: type) -> OriginalCheckpointConverter:
    """The converter of `cls` or of its nearest base class listed in `ORIGINAL_CHECKPOINT_CONVERTERS`."""
    for base in cls.__mro__:
        if base.__name__ in ORIGINAL_CHECKPOINT_CONVERTERS:
            module_name, converter_name = ORIGINAL_CHECKPOINT_CONVERTERS[base.__name__]
            module = importlib.import_module(f".{module_name}", __package__)
            return getattr(module, converter_name)()
    raise ValueError(
        f"{cls.__name__} has no original-checkpoint converter; models with one: "
        f"{sorted(ORIGINAL_CHECKPOINT_CONVERTERS)}."
    )


def _check_overrides(cls: type, converter: OriginalCheckpointConverter, overrides: dict) -> None:
    parameters = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    unknown = sorted(set(overrides) - parameters)
    if unknown:
        raise ValueError(
            f"{cls.__name__}.from_single_file got unknown arguments {unknown}. It accepts `original_config`, "
            f"`torch_dtype`{''.join(f', `{name}`' for name in converter.options)} and config overrides "
            f"{sorted(parameters)}."
        )


def load_original_model(cls: type, checkpoint_path: str | os.PathLike, original_config=None, **kwargs):
    """Build a `cls` from an original checkpoint and report where each source key went.

    The file is read once, without executing pickled code. See [`FromOriginalCheckpointMixin.from_single_file`] for
    the arguments.

    Returns:
        `(model, KeyReport)`: the model in eval mode and the [`KeyReport`] of the conversion.
    """
    converter = converter_for(cls)
    torch_dtype = kwargs.pop("torch_dtype", None)
    options = {name: kwargs.pop(name, default) for name, default in converter.options.items()}
    _check_overrides(cls, converter, kwargs)
    path = os.fspath(checkpoint_path)

    checkpoint = load_original_checkpoint(path)
    converter.check(checkpoint, path, **options)
    state_dict = converter.extract_state_dict(checkpoint, **options)
    config = converter.config(checkpoint, state_dict, original_config, **options)
    config.update(kwargs)
    dropped = converter.dropped(checkpoint, state_dict, original_config, **options)
    skipped = set(dropped)
    mapped = [(key, converter.rename(key)) for key in state_dict if key not in skipped]
    converted = {target: state_dict[source] for source, target in mapped}
    if len(converted) != len(mapped):
        targets = [target for _, target in mapped]
        repeated = sorted({target for target in targets if targets.count(target) > 1})
        raise ValueError(f"Several weights of {path!r} map to the same {cls.__name__} weights {repeated[:10]}.")

    model = cls(**config)
    missing = sorted(set(model.state_dict()) - set(converted))
    load_converted_state_dict(model, converted, path, config)
    if dropped:
        logger.info(f"{cls.__name__}: loaded {len(mapped)} weights, dropped {len(dropped)} unused entries.")
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.eval(), KeyReport(mapped=mapped, dropped=dropped, missing=missing)


class FromOriginalCheckpointMixin:
    """Adds `from_single_file` (load an original 3D MedDiffusion checkpoint) to a model class."""

    @classmethod
    def from_single_file(cls, checkpoint_path: str | os.PathLike, original_config=None, **kwargs):
        """Load an original training checkpoint (`.ckpt` / `.pt`), read without executing pickled code.

        The architecture comes from `original_config` (a dict or JSON file in the original code's terms), else from
        the configuration stored in the checkpoint, else from the tensor shapes. Every weight must map to the model:
        unexpected, missing or mis-shaped weights raise a `ValueError` that lists them; weights only the training
        losses use are dropped. A checkpoint of another model is refused with an error naming the right loader.

        Args:
            checkpoint_path: Path to the original file.
            original_config: Optional original configuration (dict or path to a JSON file).
            kwargs: `torch_dtype`; the model's loader options (`BiFlowNet3DModel`: `use_ema`, default `True`, loads
                the EMA weights the original sampler uses); any other keyword overrides that config argument.

        Returns:
            The model, in eval mode. Use [`load_original_model`] to also get the [`KeyReport`].
        """
        model, _ = load_original_model(cls, checkpoint_path, original_config, **kwargs)
        return model
