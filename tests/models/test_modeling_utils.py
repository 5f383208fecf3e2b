"""Saved model configs describe the architecture only, not the folder a model was loaded from."""

import json

import pytest

from meddiffusers import BiFlowNet3DModel, ControlNet3DModel, VQModel3D

TINY_BIFLOWNET = dict(
    in_channels=2,
    base_channels=6,
    channel_mults=(1, 1, 2),
    attention_levels=(0, 0, 1),
    num_class_embeds=2,
    attention_heads=2,
    norm_num_groups=2,
    dit_num_heads=2,
)

MODELS = {
    "VQModel3D": lambda: VQModel3D(
        block_out_channels=(4,), latent_channels=2, num_vq_embeddings=4, norm_num_groups=2, patch_size=4
    ),
    "BiFlowNet3DModel": lambda: BiFlowNet3DModel(**TINY_BIFLOWNET),
    "ControlNet3DModel": lambda: ControlNet3DModel(**TINY_BIFLOWNET, conditioning_channels=1),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_resaved_config_has_no_source_folder(name, tmp_path):
    model = MODELS[name]()
    model.save_pretrained(tmp_path / "first")
    reloaded = type(model).from_pretrained(tmp_path / "first")
    assert str(reloaded.config["_name_or_path"]) == str(tmp_path / "first")  # diffusers keeps it in memory ...
    reloaded.save_pretrained(tmp_path / "second")
    saved = json.loads((tmp_path / "second" / "config.json").read_text())
    assert "_name_or_path" not in saved  # ... but it is not written
    assert str(tmp_path) not in (tmp_path / "second" / "config.json").read_text()
    assert saved["_class_name"] == name
    expected = {key: value for key, value in json.loads(model.to_json_string()).items() if not key.startswith("_")}
    assert {key: value for key, value in saved.items() if not key.startswith("_")} == expected
