"""Make diffusers' pipeline loader treat `meddiffusers` like `diffusers` or `transformers`.

With the library registered, `save_pretrained` records components as `["meddiffusers", "ClassName"]` and
`from_pretrained` (local folder or Hub repo id) imports them from the top-level `meddiffusers` package.
"""

from diffusers.pipelines import pipeline_loading_utils, pipeline_utils

_LOADABLE = {
    "ModelMixin": ["save_pretrained", "from_pretrained"],
    "SchedulerMixin": ["save_pretrained", "from_pretrained"],
    "DiffusionPipeline": ["save_pretrained", "from_pretrained"],
}


def register_with_diffusers() -> None:
    """Add `meddiffusers` to diffusers' table of loadable libraries (idempotent)."""
    for table in (pipeline_loading_utils.LOADABLE_CLASSES, pipeline_utils.LOADABLE_CLASSES):
        table.setdefault("meddiffusers", dict(_LOADABLE))
    for name, methods in _LOADABLE.items():
        pipeline_loading_utils.ALL_IMPORTABLE_CLASSES.setdefault(name, methods)
