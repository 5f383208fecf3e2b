"""Behaviour shared by every meddiffusers model class."""

from __future__ import annotations

import json


class PortableConfigMixin:
    """Saved configs hold the architecture only, never `_name_or_path` (the folder a model was loaded from).

    diffusers records the source folder of `from_pretrained(path)` in the config, so re-saving a model would write
    a path of the machine that made it. Put this mixin before `ConfigMixin` in the bases of a model class.
    """

    def to_json_string(self) -> str:
        """The config as JSON, without `_name_or_path`."""
        config = json.loads(super().to_json_string())
        config.pop("_name_or_path", None)
        return json.dumps(config, indent=2, sort_keys=True) + "\n"
