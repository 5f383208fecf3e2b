"""The quicktour's code runs as written (against a tiny pipeline)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKTOUR = ROOT / "docs" / "source" / "en" / "quicktour.md"


def test_quicktour_code_runs(tmp_path, monkeypatch):
    from meddiffusers import MedDiffusionPipeline
    from tests.pipelines.test_meddiffusion import build_pipeline

    model = tmp_path / "pipeline"
    regions = [
        {"name": "CTLowerLimb", "class_id": 2, "aliases": ["CTLegs"], "volume_size": [32, 64, 64]},
        {"name": "MRBrainT1", "class_id": 3, "aliases": ["MRBrain"], "volume_size": [32, 64, 64]},
    ]
    MedDiffusionPipeline(**build_pipeline().components, regions=regions).save_pretrained(model)
    code = "\n".join(re.findall(r"```python\n(.*?)```", QUICKTOUR.read_text(), flags=re.S))
    code = code.replace('"path/to/meddiffusion-pipeline"', repr(str(model)))
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(QUICKTOUR), "exec"), namespace)
    assert len(namespace["paths"]) == 1 and Path(namespace["paths"][0]).is_file()
    assert tuple(namespace["latents"].shape) == (1, 4, 16, 32, 32)
