"""BiFlowNet3DModel: parity with the original BiFlowNet, loading, batching, checkpointing and ControlNet hooks."""

import pytest
import torch
from safetensors.torch import load_file

from meddiffusers import BiFlowNet3DModel, load_original_checkpoint
from meddiffusers.loaders.original_biflownet_checkpoint import convert_biflownet_state_dict
from tests.conftest import FIXTURES

PARITY = ["biflownet_tiny", "biflownet_ps2_tiny"]
ATOL = RTOL = 1e-4


def load_fixture(name, **kwargs):
    folder = FIXTURES / name
    model = BiFlowNet3DModel.from_single_file(folder / f"{name}.pt", original_config=folder / "config.json", **kwargs)
    return model, load_file(folder / "inputs_outputs.safetensors")


def assert_reproduces(model, ref):
    with torch.no_grad():
        eps = model(ref["x"], ref["t"], class_labels=ref["y"]).sample
        eps_aniso = model(ref["x_aniso"], ref["t_aniso"], class_labels=ref["y_aniso"]).sample
    torch.testing.assert_close(eps, ref["eps"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(eps_aniso, ref["eps_aniso"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", PARITY)
def test_single_file_reproduces_original_noise_predictions(name):
    model, ref = load_fixture(name)
    assert not model.training
    assert_reproduces(model, ref)


@pytest.mark.parametrize("name", PARITY)
def test_save_pretrained_round_trip_keeps_parity(name, tmp_path):
    model, ref = load_fixture(name)
    model.save_pretrained(tmp_path)
    reloaded = BiFlowNet3DModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.dit_patch_size == model.config.dit_patch_size
    assert_reproduces(reloaded, ref)


def test_config_from_training_args_and_ema_choice():
    folder = FIXTURES / "biflownet_tiny"
    # The training `args` lack the heads and groups (the released 8 / 8 / 24); the tiny model passes them.
    model = BiFlowNet3DModel.from_single_file(
        folder / "biflownet_tiny.pt", attention_heads=2, norm_num_groups=2, dit_num_heads=2
    )
    assert list(model.config.channel_mults) == [1, 1, 2, 4] and model.config.in_channels == 4
    ref = load_file(folder / "inputs_outputs.safetensors")
    assert_reproduces(model, ref)
    raw, _ = load_fixture("biflownet_tiny", use_ema=False)
    with torch.no_grad():
        assert not torch.allclose(raw(ref["x"], ref["t"], ref["y"]).sample, ref["eps"], atol=1e-3)


def test_batch_equals_single_calls_with_different_labels():
    model, ref = load_fixture("biflownet_tiny")
    with torch.no_grad():
        batch = model(ref["x"], ref["t"], ref["y"]).sample
        first = model(ref["x"][:1], ref["t"][0], ref["y"][:1]).sample
        second = model(ref["x"][1:], int(ref["t"][1]), int(ref["y"][1])).sample
    torch.testing.assert_close(batch, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_matches_plain_backward():
    torch.manual_seed(0)
    model = BiFlowNet3DModel(
        in_channels=2,
        base_channels=6,
        channel_mults=(1, 1, 2),
        attention_levels=(0, 0, 1),
        num_class_embeds=3,
        attention_heads=2,
        norm_num_groups=2,
        dit_num_heads=2,
    ).train()
    x = torch.randn(2, 2, 8, 8, 16)

    def loss_and_grads():
        model.zero_grad()
        model(x, torch.tensor([10, 900]), torch.tensor([0, 2])).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = loss_and_grads()
    model.enable_gradient_checkpointing()
    checkpointed = loss_and_grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5)


def test_controlnet_residuals():
    model, ref = load_fixture("biflownet_tiny")
    x, t, y = ref["x"][:1], ref["t"][:1], ref["y"][:1]
    with torch.no_grad():
        plain = model(x, t, y).sample
        widths = [6, 6, 12, 24]
        sizes = [(8, 16, 16), (8, 16, 16), (4, 8, 8), (2, 4, 4)]
        zeros = [torch.zeros(1, c, *s) for c, s in zip(widths, sizes)]
        same = model(x, t, y, zeros, torch.zeros(1, 24, 2, 4, 4)).sample
        torch.testing.assert_close(same, plain)
        changed = model(x, t, y, mid_block_additional_residual=torch.ones(1, 24, 2, 4, 4)).sample
        assert not torch.allclose(changed, plain)
        with pytest.raises(ValueError, match="one per level"):
            model(x, t, y, zeros[:2])


def test_bad_inputs_get_clear_errors():
    model, ref = load_fixture("biflownet_tiny")
    x = ref["x"][:1]
    with pytest.raises(ValueError, match="5 dimensions"):
        model(x[0], 1, 0)
    with pytest.raises(ValueError, match="4 channel"):
        model(torch.randn(1, 3, 8, 16, 16), 1, 0)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.randn(1, 4, 12, 16, 16), 1, 0)
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full_like(x, float("nan")), 1, 0)
    with pytest.raises(ValueError, match="class_labels` is required"):
        model(x, 1)
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        model(x, 1, 7)
    with pytest.raises(ValueError, match="timestep"):
        model(x, torch.tensor([1, 2, 3]), 0)


def test_wrong_files_and_mismatched_configs_are_rejected(tmp_path):
    folder = FIXTURES / "biflownet_tiny"
    with pytest.raises(ValueError, match="Patch-Volume autoencoder checkpoint"):
        BiFlowNet3DModel.from_single_file(FIXTURES / "patchvolume_8x_tiny" / "patchvolume_8x_tiny.ckpt")
    with pytest.raises(ValueError, match="shape mismatches"):
        BiFlowNet3DModel.from_single_file(
            folder / "biflownet_tiny.pt", original_config=folder / "config.json", base_channels=12
        )
    checkpoint = load_original_checkpoint(folder / "biflownet_tiny.pt")
    checkpoint["ema"]["extra.weight"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="unexpected keys.*extra"):
        BiFlowNet3DModel.from_single_file(tmp_path / "extra.pt", original_config=folder / "config.json")


def test_every_original_key_maps_to_the_model():
    model, _ = load_fixture("biflownet_tiny")
    state_dict = load_original_checkpoint(FIXTURES / "biflownet_tiny" / "biflownet_tiny.pt")["ema"]
    assert set(convert_biflownet_state_dict(state_dict)) == set(model.state_dict())


def test_released_configs_have_the_published_sizes():
    with torch.device("meta"):
        eight = BiFlowNet3DModel()
        four = BiFlowNet3DModel(dit_patch_size=2)
    assert sum(p.numel() for p in eight.parameters()) == 157_654_880
    assert sum(p.numel() for p in four.parameters()) == 157_773_824


def test_controlnet_residuals_reproduce_the_authors_controlled_biflownet():
    """The recorded ControlNet outputs, injected through the hooks, give the original ControlledBiFlowNet's output."""
    model, _ = load_fixture("biflownet_tiny")
    ref = load_file(FIXTURES / "controlnet_tiny" / "inputs_outputs.safetensors")
    controls = [ref[f"control_{i}"] for i in range(5)]
    with torch.no_grad():
        plain = model(ref["x"], ref["t"], ref["y"]).sample
        full = model(ref["x"], ref["t"], ref["y"], controls[:4], controls[4]).sample
        half = model(ref["x"], ref["t"], ref["y"], [c * 0.5 for c in controls[:4]], controls[4] * 0.5).sample
    torch.testing.assert_close(plain, ref["eps_plain_biflownet"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(full, ref["eps"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(half, ref["eps_control_scale_0p5"], atol=ATOL, rtol=RTOL)
