"""The small demonstration pipeline that ships inside the package (`meddiffusers generate`'s default model)."""

import os

DEMO_MODEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meddiffusion-demo")


def demo_model_path() -> str:
    """Folder of the bundled demo `MedDiffusionPipeline` (a demonstration of the recipe, not a clinical model)."""
    if not os.path.isfile(os.path.join(DEMO_MODEL_PATH, "model_index.json")):
        raise FileNotFoundError(
            f"The bundled demo model is missing from {DEMO_MODEL_PATH}; reinstall meddiffusers or pass --model."
        )
    return DEMO_MODEL_PATH
