"""VQModel3D.from_single_file: configuration sources, key accounting and wrong-file errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from meddiffusers import VQModel3D, load_original_checkpoint
from meddiffusers.loaders.original_patch_volume import convert_patch_volume_state_dict
from tests.conftest import FIXTURES

FIXTURE = FIXTURES / "patchvolume_4x_tiny"
CKPT = FIXTURE / "patchvolume_4x_tiny.ckpt"


def decoded(model):
    ref = load_file(FIXTURE / "inputs_outputs.safetensors")
    with torch.no_grad():
        return model.decode(ref["latent_prequant"]).sample, ref["decoded_joint"]


def test_config_read_from_stored_hyper_parameters():
    model = VQModel3D.from_single_file(CKPT)
    assert list(model.config.block_out_channels) == [8, 16]
    assert model.config.norm_num_groups == 4
    assert model.patch_size == (16, 16, 16)
    assert model.downsample_factor == 4
    assert not model.training


def test_original_config_from_json_file(tmp_path):
    checkpoint = load_original_checkpoint(CKPT)
    del checkpoint["hyper_parameters"]
    stripped = tmp_path / "no_hparams.ckpt"
    torch.save(checkpoint, stripped)
    model = VQModel3D.from_single_file(stripped, original_config=FIXTURE / "config.json")
    actual, expected = decoded(model)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_config_inferred_from_shapes_when_nothing_else_is_given(tmp_path):
    checkpoint = load_original_checkpoint(CKPT)
    del checkpoint["hyper_parameters"]
    stripped = tmp_path / "no_hparams.ckpt"
    torch.save(checkpoint, stripped)
    # Group count cannot be read from shapes; it is the only override needed for this tiny model.
    model = VQModel3D.from_single_file(stripped, norm_num_groups=4, patch_size=16)
    assert list(model.config.block_out_channels) == [8, 16]
    actual, expected = decoded(model)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_loss_only_weights_are_dropped_and_everything_else_is_mapped():
    state_dict = load_original_checkpoint(CKPT)["state_dict"]
    converted, dropped = convert_patch_volume_state_dict(state_dict)
    assert dropped and all(key.startswith("volume_discriminator.") for key in dropped)
    assert set(converted) == set(VQModel3D.from_single_file(CKPT).state_dict())


def test_unknown_weight_is_an_error(tmp_path):
    checkpoint = load_original_checkpoint(CKPT)
    checkpoint["state_dict"]["encoder.extra_layer.weight"] = torch.zeros(3)
    path = tmp_path / "extra.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="unexpected keys.*extra_layer"):
        VQModel3D.from_single_file(path)


def test_mismatched_config_is_an_error(tmp_path):
    config = json.loads((FIXTURE / "config.json").read_text())
    config["cfg"]["model"]["n_codes"] = 128
    path = tmp_path / "wrong.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape mismatches"):
        VQModel3D.from_single_file(CKPT, original_config=path)


def test_non_autoencoder_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "biflownet.pt"
    torch.save({"model": {"init_conv.weight": torch.zeros(1)}, "ema": {"init_conv.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="not a 3D MedDiffusion Patch-Volume autoencoder.*BiFlowNet"):
        VQModel3D.from_single_file(path)
