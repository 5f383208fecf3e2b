"""`load_vq_model`: one entry point that loads a `VQModel3D` from whatever a user points it at."""

from __future__ import annotations

import json
import os

from .vq_model_3d import VQModel3D

ORIGINAL_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
# Keyword arguments of `from_pretrained` that also steer the look-up of a Hub repository's files.
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")


def _vq_component(model_index: dict, where: str) -> str:
    """Name of the pipeline component that is a `VQModel3D` (the subfolder holding it)."""
    names = [name for name, value in model_index.items() if isinstance(value, list) and value[-1:] == ["VQModel3D"]]
    if len(names) != 1:
        components = sorted(name for name, value in model_index.items() if isinstance(value, list))
        raise ValueError(
            f"{where} is a pipeline without exactly one VQModel3D component (components: {components}); pass "
            "`subfolder=` to name the folder of the autoencoder."
        )
    return names[0]


def _hub_file(repo_id: str, filename: str, kwargs: dict) -> str | None:
    """Local path of `filename` in a Hub repo (downloaded or from the local cache), `None` when the repo lacks it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id, filename, **{key: kwargs[key] for key in HUB_KWARGS if key in kwargs})
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _looks_like_a_path(source: str) -> bool:
    return (
        source.startswith((".", "~", os.sep))
        or source.endswith(ORIGINAL_CHECKPOINT_SUFFIXES)
        or source.count("/") > 1
        or (os.altsep is not None and os.altsep in source)
    )


def load_vq_model(source: str | os.PathLike, subfolder: str | None = None, **kwargs) -> VQModel3D:
    """Load a [`VQModel3D`] from an original checkpoint, a saved model or pipeline folder, or a Hub repository.

    `source` may be:

    - an original 3D MedDiffusion Patch-Volume checkpoint (`.ckpt`, `.pt`): read without executing pickled code by
      [`VQModel3D.from_single_file`] (`kwargs`: `original_config`, config overrides, `torch_dtype`);
    - a folder saved by `save_pretrained` (it holds `config.json`);
    - a pipeline folder (it holds `model_index.json`): the autoencoder is loaded from its `VQModel3D` component's
      subfolder (`vqvae` in meddiffusers pipelines);
    - a Hub repository id of either kind, loaded with `from_pretrained` (offline, from the local Hub cache, when
      `HF_HUB_OFFLINE=1`).

    Args:
        source: File, folder or Hub repository id.
        subfolder: Folder of the autoencoder inside `source`, when it is neither the root nor found from
            `model_index.json`.
        kwargs: Passed to `from_pretrained` (`torch_dtype`, `variant`, `cache_dir`, `revision`, ...) or to
            `from_single_file`.

    Returns:
        The loaded model.

    Raises:
        FileNotFoundError: `source` is neither an existing file or folder nor a Hub repository with a `config.json`
            or `model_index.json`.
        ValueError: `source` is a file that is not an original checkpoint, or a pipeline without one `VQModel3D`.

    Example:

    ```py
    >>> from meddiffusers.models.autoencoders import load_vq_model
    >>> vqvae = load_vq_model("path/to/PatchVolume_8x_s2.ckpt")  # or a model folder, a pipeline folder, a repo id
    ```
    """
    path = os.path.expanduser(os.fspath(source))
    if os.path.isfile(path):
        if not path.endswith(ORIGINAL_CHECKPOINT_SUFFIXES):
            raise ValueError(
                f"{path!r} is a file but not an original checkpoint ({', '.join(ORIGINAL_CHECKPOINT_SUFFIXES)}); pass "
                "the folder that holds a saved model's config.json instead."
            )
        return VQModel3D.from_single_file(path, **kwargs)
    if os.path.isdir(path):
        if subfolder is None and not os.path.isfile(os.path.join(path, "config.json")):
            index_file = os.path.join(path, "model_index.json")
            if not os.path.isfile(index_file):
                raise FileNotFoundError(
                    f"{path!r} holds neither a saved model (config.json) nor a pipeline (model_index.json)."
                )
            with open(index_file, encoding="utf-8") as handle:
                subfolder = _vq_component(json.load(handle), repr(path))
        folder = path if subfolder is None else os.path.join(path, subfolder)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"No saved VQModel3D (config.json) in {folder!r}.")
        return VQModel3D.from_pretrained(path, subfolder=subfolder, **kwargs)
    if _looks_like_a_path(path):
        raise FileNotFoundError(f"No such file or folder: {path!r}.")
    return _load_from_hub(path, subfolder, kwargs)


def _load_from_hub(repo_id: str, subfolder: str | None, kwargs: dict) -> VQModel3D:
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        if subfolder is None and _hub_file(repo_id, "config.json", kwargs) is None:
            index_file = _hub_file(repo_id, "model_index.json", kwargs)
            if index_file is None:
                raise FileNotFoundError(
                    f"{repo_id!r} is not a local file or folder, and no Hub repository of that name with a "
                    "config.json or model_index.json was found (offline: none in the local Hub cache)."
                )
            with open(index_file, encoding="utf-8") as handle:
                subfolder = _vq_component(json.load(handle), f"Hub repository {repo_id!r}")
    except (HFValidationError, RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local file or folder nor a Hub repository ({type(error).__name__})."
        ) from error
    return VQModel3D.from_pretrained(repo_id, subfolder=subfolder, **kwargs)
