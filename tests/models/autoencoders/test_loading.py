"""load_vq_model: one call loads a VQModel3D from an original checkpoint, a model folder, a pipeline folder or a Hub
repository id (offline, from a populated local Hub cache), and missing sources get a FileNotFoundError naming them."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from meddiffusers import VQModel3D
from meddiffusers.demo import DEMO_MODEL_PATH
from meddiffusers.models.autoencoders import load_vq_model
from tests.conftest import FIXTURES
from tests.hub_cache import populate_hub_cache

FIXTURE = FIXTURES / "patchvolume_4x_tiny"


def assert_same_weights(model, expected):
    assert isinstance(model, VQModel3D)
    assert model.config.block_out_channels == list(expected.config.block_out_channels)
    state, reference = model.state_dict(), expected.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


@pytest.fixture
def original():
    return VQModel3D.from_single_file(FIXTURE / "patchvolume_4x_tiny.ckpt")


@pytest.fixture(scope="module")
def demo_vqvae():
    return VQModel3D.from_pretrained(DEMO_MODEL_PATH, subfolder="vqvae")


def test_original_checkpoint_reproduces_the_fixture_decode():
    model = load_vq_model(FIXTURE / "patchvolume_4x_tiny.ckpt")
    ref = load_file(FIXTURE / "inputs_outputs.safetensors")
    with torch.no_grad():
        decoded = model.decode(ref["latent_prequant"]).sample
    torch.testing.assert_close(decoded, ref["decoded_joint"], atol=1e-4, rtol=1e-4)


def test_saved_model_folder(original, tmp_path):
    original.save_pretrained(tmp_path / "vq")
    assert_same_weights(load_vq_model(tmp_path / "vq"), original)
    assert_same_weights(load_vq_model(str(tmp_path), subfolder="vq"), original)


def test_pipeline_folder_loads_its_vqvae_component(demo_vqvae):
    assert_same_weights(load_vq_model(DEMO_MODEL_PATH), demo_vqvae)


def test_pipeline_folder_with_a_renamed_component(demo_vqvae, tmp_path):
    pipeline = tmp_path / "pipeline"
    shutil.copytree(DEMO_MODEL_PATH, pipeline)
    (pipeline / "vqvae").rename(pipeline / "autoencoder")
    index = (pipeline / "model_index.json").read_text().replace('"vqvae":', '"autoencoder":')
    (pipeline / "model_index.json").write_text(index)
    assert_same_weights(load_vq_model(pipeline), demo_vqvae)


def test_hub_pipeline_repo_from_the_local_cache(demo_vqvae, tmp_path):
    populate_hub_cache(DEMO_MODEL_PATH, "meddiffusers-test/demo-pipeline", tmp_path / "hub")
    model = load_vq_model("meddiffusers-test/demo-pipeline", cache_dir=tmp_path / "hub")
    assert_same_weights(model, demo_vqvae)


def test_hub_model_repo_from_the_local_cache(original, tmp_path):
    original.save_pretrained(tmp_path / "export")
    populate_hub_cache(tmp_path / "export", "meddiffusers-test/tiny-vq", tmp_path / "hub")
    model = load_vq_model("meddiffusers-test/tiny-vq", cache_dir=tmp_path / "hub", torch_dtype=torch.float16)
    assert model.dtype == torch.float16
    assert_same_weights(model, original.to(torch.float16))


def test_missing_sources_get_a_file_not_found_error_naming_them(tmp_path):
    missing = tmp_path / "nowhere" / "PatchVolume_8x_s2.ckpt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_vq_model(missing)
    with pytest.raises(FileNotFoundError, match="neither a saved model .* nor a pipeline"):
        load_vq_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="No saved VQModel3D .*autoencoder"):
        load_vq_model(DEMO_MODEL_PATH, subfolder="autoencoder")
    with pytest.raises(FileNotFoundError, match="meddiffusers-test/not-cached"):
        load_vq_model("meddiffusers-test/not-cached", cache_dir=tmp_path / "empty-hub")


def test_a_file_that_is_not_a_checkpoint_is_rejected(tmp_path):
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="not an original checkpoint"):
        load_vq_model(weights)
