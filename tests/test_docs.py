"""The quicktour's code runs as written, against the demo model bundled in the package."""

import re
from pathlib import Path

import nibabel as nib

ROOT = Path(__file__).resolve().parents[1]
QUICKTOUR = ROOT / "docs" / "source" / "en" / "quicktour.md"


def test_quicktour_code_runs_as_written(tmp_path, monkeypatch):
    code = "\n".join(re.findall(r"```python\n(.*?)```", QUICKTOUR.read_text(), flags=re.S))
    assert "demo_model_path()" in code  # the page itself names the model: nothing is substituted
    # The page runs from a clone's root; run it in an empty folder that sees the same examples/.
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(QUICKTOUR), "exec"), namespace)
    assert namespace["output"].regions == ["MRBrainT1"]
    assert [Path(path).name for path in namespace["paths"]] == ["MRBrainT1_0.nii.gz"]
    image = nib.load(tmp_path / "generated" / "MRBrainT1_0.nii.gz")
    assert image.shape == (64, 64, 32) and image.header.get_zooms() == (4.0, 4.0, 8.0)
    assert tuple(namespace["fast"].volumes.shape) == (1, 1, 32, 64, 64)
    assert tuple(namespace["latents"].shape) == (1, 4, 16, 32, 32)  # 62 slices padded to 64, 4x downsampling
