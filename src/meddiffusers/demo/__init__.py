"""The small demonstration pipelines that ship inside the package (demonstrations of the recipes, not clinical models).

- `meddiffusion-demo`: a `MedDiffusionPipeline` (`meddiffusers generate`'s default model);
- `meddiff-fm-demo`: a `PatchSlidingWindowPipeline` (`meddiffusers generate --model meddiff-fm-demo`).
"""

import os

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))
DEMO_MODEL_PATH = os.path.join(DEMO_DIR, "meddiffusion-demo")
PATCH_DEMO_MODEL_PATH = os.path.join(DEMO_DIR, "meddiff-fm-demo")
# Names the command line accepts for `--model` when no local folder has that name.
BUNDLED_MODELS = {"meddiffusion-demo": DEMO_MODEL_PATH, "meddiff-fm-demo": PATCH_DEMO_MODEL_PATH}


def _checked(path: str) -> str:
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"The bundled demo model is missing from {path}; reinstall meddiffusers or pass --model."
        )
    return path


def demo_model_path() -> str:
    """Folder of the bundled demo `MedDiffusionPipeline` (a demonstration of the recipe, not a clinical model)."""
    return _checked(DEMO_MODEL_PATH)


def patch_demo_model_path() -> str:
    """Folder of the bundled demo MedDiff-FM `PatchSlidingWindowPipeline` (a demonstration, not a clinical model)."""
    return _checked(PATCH_DEMO_MODEL_PATH)
