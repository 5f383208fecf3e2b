"""ControlNet3DModel: parity with the authors' ControlNet, from_biflownet, save/load and input checks."""

import pytest
import torch
from safetensors.torch import load_file

from meddiffusers import BiFlowNet3DModel, ControlNet3DModel
from tests.conftest import FIXTURES

CONTROL = FIXTURES / "controlnet_tiny"
UNET = FIXTURES / "biflownet_tiny"
ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def models():
    controlnet = ControlNet3DModel.from_single_file(
        CONTROL / "controlnet_tiny.pt", original_config=CONTROL / "config.json"
    )
    unet = BiFlowNet3DModel.from_single_file(UNET / "biflownet_tiny.pt", original_config=UNET / "config.json")
    return controlnet, unet, load_file(CONTROL / "inputs_outputs.safetensors")


def test_reproduces_the_authors_controlnet(models):
    controlnet, unet, ref = models
    with torch.no_grad():
        out = controlnet(ref["x"], ref["t"], ref["y"], controlnet_cond=ref["hint"])
        eps = unet(ref["x"], ref["t"], ref["y"], out.down_block_res_samples, out.mid_block_res_sample).sample
        half = controlnet(ref["x"], ref["t"], ref["y"], controlnet_cond=ref["hint"], conditioning_scale=0.5)
        eps_half = unet(ref["x"], ref["t"], ref["y"], half.down_block_res_samples, half.mid_block_res_sample).sample
    for index, residual in enumerate(out.down_block_res_samples):
        torch.testing.assert_close(residual, ref[f"control_{index}"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.mid_block_res_sample, ref["control_4"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(eps, ref["eps"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(eps_half, ref["eps_control_scale_0p5"], atol=ATOL, rtol=RTOL)


def test_from_biflownet_copies_the_encoder_and_starts_inert(models):
    _, unet, ref = models
    controlnet = ControlNet3DModel.from_biflownet(unet, conditioning_channels=1)
    assert controlnet.config.conditioning_channels == 1 and controlnet.conv_in.weight.shape[1] == 5
    torch.testing.assert_close(controlnet.conv_in.weight[:, :4], unet.conv_in.weight)
    assert torch.count_nonzero(controlnet.conv_in.weight[:, 4:]) == 0
    torch.testing.assert_close(
        controlnet.down_blocks[2].resnets[0].conv1.weight, unet.down_blocks[2].resnets[0].conv1.weight
    )
    hint = torch.rand(2, 1, 8, 16, 16)
    with torch.no_grad():
        out = controlnet(ref["x"], ref["t"], ref["y"], controlnet_cond=hint)
        eps = unet(ref["x"], ref["t"], ref["y"], out.down_block_res_samples, out.mid_block_res_sample).sample
    torch.testing.assert_close(eps, ref["eps_plain_biflownet"], atol=ATOL, rtol=RTOL)


def test_save_pretrained_round_trip(models, tmp_path):
    controlnet, _, ref = models
    controlnet.save_pretrained(tmp_path)
    reloaded = ControlNet3DModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        mid = reloaded(ref["x"], ref["t"], ref["y"], controlnet_cond=ref["hint"]).mid_block_res_sample
    torch.testing.assert_close(mid, ref["control_4"], atol=ATOL, rtol=RTOL)


def test_bad_inputs_and_files(models):
    controlnet, _, ref = models
    with pytest.raises(ValueError, match="4 channel"):
        controlnet(ref["x"], ref["t"], ref["y"], controlnet_cond=torch.zeros(2, 1, 8, 16, 16))
    with pytest.raises(ValueError, match="must match the batch and spatial size"):
        controlnet(ref["x"], ref["t"], ref["y"], controlnet_cond=torch.zeros(2, 4, 8, 8, 16))
    with pytest.raises(ValueError, match="not a 3D MedDiffusion ControlNet"):
        ControlNet3DModel.from_single_file(UNET / "biflownet_tiny.pt")
    with pytest.raises(ValueError, match="ControlNet, not a BiFlowNet"):
        BiFlowNet3DModel.from_single_file(CONTROL / "controlnet_tiny.pt")
