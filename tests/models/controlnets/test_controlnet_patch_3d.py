"""PatchControlNet3DModel: residual shapes, zero-initialised identity, from_unet, save/load, checkpointing, checks."""

import pytest
import torch

from meddiffusers import PatchControlNet3DModel, window_coordinates
from meddiffusers.models.controlnets import controlnet_3d, controlnet_utils
from tests.models.unets.test_unet_patch_3d import tiny as tiny_unet  # spatial transformers with weights


def perturb(controlnet):
    """Give the zero-initialised layers weights, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.startswith("controlnet_") and ("down_blocks" in name or "mid_block" in name or "conv_out" in name):
                parameter.normal_(0, 0.1)
    return controlnet


def inputs(batch=2, side=8, anatomy=False):
    """Noisy windows of a 16³ volume with their global coordinates, regions, timesteps and a condition."""
    torch.manual_seed(2)
    corner = [(slice(0, side), slice(8, 8 + side), slice(4, 4 + side))] * batch
    position = torch.stack([window_coordinates((16, 16, 16), part) for part in corner])
    kwargs = dict(class_labels=torch.tensor([0, 2][:batch]), position=position)
    if anatomy:
        kwargs["anatomy"] = torch.randint(0, 4, (batch, 1, side, side, side))
    return torch.randn(batch, 1, side, side, side), torch.tensor([10, 700][:batch]), kwargs


def controlled(unet, controlnet, sample, t, kwargs, condition, scale=1.0):
    """The U-Net's noise prediction with the ControlNet's residuals."""
    down, mid = controlnet(
        sample, t, controlnet_cond=condition, conditioning_scale=scale, return_dict=False, **kwargs
    )  # fmt: skip
    return unet(sample, t, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kwargs).sample


def test_residuals_match_the_unet_skips():
    unet = tiny_unet(layers_per_block=2)
    controlnet = PatchControlNet3DModel.from_unet(unet, conditioning_channels=2)
    sample, t, kwargs = inputs()
    output = controlnet(sample, t, controlnet_cond=torch.rand(2, 2, 8, 8, 8), **kwargs)
    assert [r.shape[1] for r in output.down_block_res_samples] == unet.skip_channels
    assert [r.shape[2] for r in output.down_block_res_samples] == [8, 8, 8, 4, 4, 4]
    assert output.mid_block_res_sample.shape == (2, 16, 4, 4, 4)
    assert controlnet.skip_channels == unet.skip_channels and controlnet.size_multiple == unet.size_multiple


@pytest.mark.parametrize("anatomy", [False, True])
def test_a_new_controlnet_changes_nothing_and_one_step_changes_the_output(anatomy):
    options = dict(anatomy_encoding="one_hot", num_anatomy_classes=3) if anatomy else {}
    unet = tiny_unet(**options)
    controlnet = PatchControlNet3DModel.from_unet(unet)
    sample, t, kwargs = inputs(anatomy=anatomy)
    condition = torch.rand(2, 1, 8, 8, 8) * 2 - 1
    with torch.no_grad():
        plain = unet(sample, t, **kwargs).sample
        with_controlnet = controlled(unet, controlnet, sample, t, kwargs, condition)
    torch.testing.assert_close(with_controlnet, plain, atol=0, rtol=0)

    unet.requires_grad_(False)
    optimizer = torch.optim.SGD(controlnet.parameters(), lr=1.0)
    loss = controlled(unet, controlnet.train(), sample, t, kwargs, condition).square().mean()
    loss.backward()
    assert controlnet.controlnet_mid_block.weight.grad.abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        trained = controlled(unet, controlnet.eval(), sample, t, kwargs, condition)
    assert (trained - plain).abs().max() > 1e-4


def test_from_unet_copies_the_encoder_and_zero_initialises_the_new_layers():
    unet = tiny_unet(anatomy_encoding="label_map")
    controlnet = PatchControlNet3DModel.from_unet(unet, conditioning_channels=3)
    assert controlnet.config.conditioning_channels == 3
    assert controlnet.config.anatomy_encoding == "label_map" and list(controlnet.config.block_out_channels) == [8, 16]
    for name in ["conv_in.weight", "class_embedding.weight", "time_embedding.linear_1.weight",
                 "down_blocks.1.attentions.0.proj_out.weight", "mid_block.resnets.1.conv2.weight"]:  # fmt: skip
        torch.testing.assert_close(controlnet.get_parameter(name), unet.get_parameter(name), atol=0, rtol=0)
    assert not any(name.startswith(("up_blocks", "conv_out", "conv_norm_out")) for name in controlnet.state_dict())
    zeros = [controlnet.controlnet_mid_block.weight, controlnet.controlnet_cond_embedding.conv_out.weight]
    zeros += [conv.weight for conv in controlnet.controlnet_down_blocks]
    assert all(torch.count_nonzero(weight) == 0 for weight in zeros)
    fresh = PatchControlNet3DModel.from_unet(unet, load_weights_from_unet=False)
    assert not torch.equal(fresh.conv_in.weight, unet.conv_in.weight)
    # The MedDiffusion ControlNet uses the same shared helpers.
    assert controlnet_3d.zero_conv is controlnet_utils.zero_conv


def test_save_pretrained_round_trip_gives_identical_outputs(tmp_path):
    controlnet = perturb(PatchControlNet3DModel.from_unet(tiny_unet())).eval()
    controlnet.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert "_name_or_path" not in (tmp_path / "config.json").read_text()
    reloaded = PatchControlNet3DModel.from_pretrained(tmp_path).eval()
    sample, t, kwargs = inputs()
    condition = torch.rand(2, 1, 8, 8, 8)
    with torch.no_grad():
        before = controlnet(sample, t, controlnet_cond=condition, **kwargs)
        after = reloaded(sample, t, controlnet_cond=condition, **kwargs)
        half = reloaded(sample, t, controlnet_cond=condition, conditioning_scale=0.5, **kwargs)
    assert before.mid_block_res_sample.abs().max() > 0
    for old, new in zip((*before.down_block_res_samples, before.mid_block_res_sample),
                        (*after.down_block_res_samples, after.mid_block_res_sample)):  # fmt: skip
        torch.testing.assert_close(new, old, atol=0, rtol=0)
    torch.testing.assert_close(half.mid_block_res_sample, before.mid_block_res_sample * 0.5)


def test_gradient_checkpointing_gives_the_same_gradients():
    unet = tiny_unet()
    sample, t, kwargs = inputs()
    condition = torch.rand(2, 1, 8, 8, 8)

    def gradients(checkpointing):
        torch.manual_seed(3)  # the condition encoder's first convolutions are not copied from the U-Net
        controlnet = perturb(PatchControlNet3DModel.from_unet(unet)).train()
        if checkpointing:
            controlnet.enable_gradient_checkpointing()
        output = controlnet(sample, t, controlnet_cond=condition, **kwargs)
        sum(r.square().mean() for r in (*output.down_block_res_samples, output.mid_block_res_sample)).backward()
        return {name: p.grad.clone() for name, p in controlnet.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and "down_blocks.0.resnets.0.conv1.weight" in plain
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5)


def test_bad_inputs_raise_value_errors():
    controlnet = PatchControlNet3DModel.from_unet(tiny_unet(), conditioning_channels=2)
    sample, t, kwargs = inputs()
    with pytest.raises(ValueError, match="Pass `controlnet_cond`"):
        controlnet(sample, t, **kwargs)
    with pytest.raises(ValueError, match="2 channel"):
        controlnet(sample, t, controlnet_cond=torch.zeros(2, 1, 8, 8, 8), **kwargs)
    with pytest.raises(ValueError, match="must match the batch and spatial size"):
        controlnet(sample, t, controlnet_cond=torch.zeros(2, 2, 8, 8, 16), **kwargs)
    with pytest.raises(ValueError, match="must match the batch and spatial size"):
        controlnet(sample, t, controlnet_cond=torch.zeros(1, 2, 8, 8, 8), **kwargs)
    with pytest.raises(ValueError, match="5 dimensions"):
        controlnet(sample, t, controlnet_cond=torch.zeros(2, 8, 8, 8), **kwargs)
    with pytest.raises(ValueError, match="class_labels"):
        controlnet(sample, t, controlnet_cond=torch.zeros(2, 2, 8, 8, 8), position=kwargs["position"])
    with pytest.raises(ValueError, match="multiples of 2"):
        controlnet(torch.zeros(2, 1, 8, 8, 7), t, controlnet_cond=torch.zeros(2, 2, 8, 8, 7), class_labels=[0, 1])
    with pytest.raises(ValueError, match="must be a PatchUNet3DModel"):
        PatchControlNet3DModel.from_unet(controlnet)
