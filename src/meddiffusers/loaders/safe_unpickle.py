"""Load original `.pt` / `.ckpt` training files without executing any pickled code.

The released 3D MedDiffusion files are pickles that, besides tensors, hold an `argparse.Namespace` (BiFlowNet) or an
omegaconf `DictConfig` (PyTorch-Lightning hyper-parameters). They are read with `torch.load(weights_only=True)`:
PyTorch's restricted unpickler only builds tensors and plain containers. The few configuration classes those files
name are mapped to inert stand-ins that record their pickled state and are then turned into plain dicts and lists, so
neither omegaconf nor the original code is needed, and any other global (such as `os.system`) is refused. Files in
the legacy (pre-1.6, non-zip) `torch.save` format are read by the same restricted unpickler.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from typing import Any

import torch


class _PickledState:
    """Inert stand-in for a configuration object: it only stores the state the pickle hands it."""

    def __setstate__(self, state):
        self.pickled_state = state


class _OmegaConfDict(_PickledState):
    pass


class _OmegaConfList(_PickledState):
    pass


class _OmegaConfNode(_PickledState):
    pass


class _OmegaConfMetadata(_PickledState):
    pass


class _Namespace(_PickledState):
    pass


class _TypingAny:
    pass


_ALLOWED_GLOBALS = [
    (_OmegaConfDict, "omegaconf.dictconfig.DictConfig"),
    (_OmegaConfList, "omegaconf.listconfig.ListConfig"),
    (_OmegaConfNode, "omegaconf.nodes.AnyNode"),
    (_OmegaConfNode, "omegaconf.nodes.StringNode"),
    (_OmegaConfNode, "omegaconf.nodes.IntegerNode"),
    (_OmegaConfNode, "omegaconf.nodes.FloatNode"),
    (_OmegaConfNode, "omegaconf.nodes.BooleanNode"),
    (_OmegaConfMetadata, "omegaconf.base.Metadata"),
    (_OmegaConfMetadata, "omegaconf.base.ContainerMetadata"),
    (_TypingAny, "typing.Any"),
    (_Namespace, "argparse.Namespace"),
    collections.defaultdict,
    collections.OrderedDict,
    dict,
    list,
    int,
]


def _to_plain(obj: Any) -> Any:
    """Turn stand-ins and containers into plain Python dicts, lists and scalars."""
    if isinstance(obj, _OmegaConfDict):
        content = obj.pickled_state.get("_content") or {}
        return {key: _to_plain(value) for key, value in content.items()}
    if isinstance(obj, _OmegaConfList):
        content = obj.pickled_state.get("_content") or []
        return [_to_plain(value) for value in content]
    if isinstance(obj, _OmegaConfNode):
        return _to_plain(obj.pickled_state.get("_val"))
    if isinstance(obj, _Namespace):
        return {key: _to_plain(value) for key, value in obj.pickled_state.items()}
    if isinstance(obj, _PickledState):
        return None
    if isinstance(obj, dict) and not isinstance(obj, torch.Tensor):
        plain = {key: _to_plain(value) for key, value in obj.items()}
        return collections.OrderedDict(plain) if isinstance(obj, collections.OrderedDict) else plain
    if isinstance(obj, list | tuple):
        return type(obj)(_to_plain(value) for value in obj)
    return obj


def load_original_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read an original-format PyTorch / PyTorch-Lightning checkpoint safely.

    Args:
        path: Path to a `.pt`, `.pth` or `.ckpt` file written by `torch.save` (zip format, or the legacy format).

    Returns:
        The checkpoint as a dict of tensors and plain Python values (configuration objects become dicts).

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: If the file is not a readable PyTorch checkpoint, or if its pickle refers to anything other than
            tensors, plain containers and the known configuration classes (a file that would run code when unpickled).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path!r}.")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            legacy = handle.read(1) == b"\x80"  # a pickle (protocol >= 2), as the legacy format starts
        if not legacy:
            raise ValueError(
                f"{path!r} is not a PyTorch checkpoint written by `torch.save` (neither its zip format nor the legacy "
                "one: the file is truncated or of another kind). Re-save it with PyTorch or check the download."
            )
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():  # a damaged pickle, not a refused global
            raise ValueError(f"Could not read checkpoint {path!r} (truncated or corrupted?): {error}") from None
        raise ValueError(
            f"Refusing to load {path!r}: its pickle asks for objects that are neither tensors nor the plain "
            f"configuration types original checkpoints contain, so loading it could execute code. Details: {error}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, struct.error) as error:
        raise ValueError(f"Could not read checkpoint {path!r} (truncated or corrupted?): {error}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"Expected {path!r} to hold a dict of weights, found {type(checkpoint).__name__}.")
    return _to_plain(checkpoint)
