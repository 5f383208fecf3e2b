"""GEM3DUNetModel: parity with the original GEM-3D U-Nets, identity-initialised temporal layers, non-square latents,
any frame count, saving, gradient checkpointing and input checks."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from meddiffusers import GEM3DUNetModel
from meddiffusers.loaders.original_gem3d_checkpoint import load_gem3d_unet
from tests.conftest import FIXTURES

GEM3D = FIXTURES / "gem3d_tiny"
CONFIGS = json.loads((GEM3D / "config.json").read_text())["checkpoints"]
TOL = dict(atol=1e-4, rtol=1e-4)
TINY = dict(
    in_channels=6,
    out_channels=2,
    block_out_channels=(32, 32),
    layers_per_block=1,
    attention_levels=(False, True),
    attention_head_dim=16,
)


@pytest.fixture(scope="module")
def tensors():
    return load_file(GEM3D / "inputs_outputs.safetensors")


@pytest.fixture(scope="module")
def stage1():
    return load_gem3d_unet(GEM3D / "stage1.ckpt", CONFIGS["stage1.ckpt"]["yaml_equivalent"])[0]


@pytest.fixture(scope="module")
def stage2():
    return load_gem3d_unet(GEM3D / "stage2.ckpt", CONFIGS["stage2.ckpt"]["yaml_equivalent"])[0]


def perturbed(model, seed=0, std=0.05):
    """`model` with every parameter moved by N(0, std²), so identity / zero initialisations matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return model.eval()


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return perturbed(GEM3DUNetModel(**{**TINY, **overrides}), seed)


def as_clip(frames):
    """`(F, C, h, w)` frames of one clip (the original's `(b f)` batch) -> `(1, C, F, h, w)`."""
    return frames.transpose(0, 1)[None]


def test_stage1_matches_the_original_2d_unet(stage1, tensors):
    with torch.no_grad():
        eps = stage1(tensors["s1_unet_input"][:, :, None], tensors["s1_t"]).sample[:, :, 0]
    torch.testing.assert_close(eps, tensors["s1_eps"], **TOL)


def test_stage1_ema_weights_match_the_original_ema_scope(tensors):
    model = GEM3DUNetModel.from_single_file(
        GEM3D / "stage1.ckpt", CONFIGS["stage1.ckpt"]["yaml_equivalent"], use_ema=True
    )
    with torch.no_grad():
        eps = model(tensors["s1_unet_input"][:, :, None], tensors["s1_t"]).sample[:, :, 0]
    torch.testing.assert_close(eps, tensors["s1_eps_ema"], **TOL)
    assert (eps - tensors["s1_eps"]).abs().max() > 1e-2  # the EMA weights really are other weights


def test_stage1_frames_are_independent(stage1, tensors):
    """The 2-D model on a 2-frame clip gives each frame what it gives that frame alone."""
    clip = tensors["s1_unet_input"].transpose(0, 1)[None]  # the two fixture samples as two frames of one clip
    with torch.no_grad():
        eps = stage1(clip, tensors["s1_t"][:1]).sample[0, :, 0]
        alone = stage1(tensors["s1_unet_input"][:1, :, None], tensors["s1_t"][:1]).sample[0, :, 0]
    torch.testing.assert_close(eps, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(alone, tensors["s1_eps"][0], **TOL)


def test_pseudo3d_matches_the_original_stage2_unet_and_its_intermediates(stage2, tensors):
    sample = as_clip(torch.cat([tensors["p3d_x_t"], tensors["p3d_c_mask"], tensors["p3d_c_informed"]], dim=1))
    seen = {}

    def keep(name):
        return lambda module, args, output: seen.__setitem__(name, output)

    hooks = [
        stage2.time_embedding.register_forward_hook(keep("time_embed")),
        stage2.conv_in.register_forward_hook(keep("input_block0_conv2d")),
        stage2.conv_in_temporal.register_forward_hook(keep("input_block0")),
        stage2.mid_block.attention.register_forward_hook(keep("middle_attention")),
        stage2.mid_block.register_forward_hook(keep("middle_block")),
        stage2.conv_out.register_forward_hook(keep("out_2d")),
    ]
    with torch.no_grad():
        eps = stage2(sample, tensors["p3d_t"][0]).sample
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(eps[0].transpose(0, 1), tensors["p3d_eps"], **TOL)
    for name in ("input_block0_conv2d", "input_block0", "middle_attention", "middle_block", "out_2d"):
        torch.testing.assert_close(seen[name], tensors[f"p3d_dbg_{name}"], **TOL, msg=name)
    # One embedding per clip, shared by its 16 frames.
    torch.testing.assert_close(seen["time_embed"].expand(16, -1), tensors["p3d_dbg_time_embed"], **TOL)


def test_stage2_spatial_weights_are_the_stage1_weights(stage1, stage2):
    """As in the original training, stage 2 starts from the stage-1 (non-EMA) U-Net and trains only the new layers."""
    spatial = {key: value for key, value in stage2.state_dict().items() if "temporal" not in key}
    assert spatial.keys() == stage1.state_dict().keys()
    for key, value in stage1.state_dict().items():
        assert torch.equal(spatial[key], value), key


def test_fresh_stage2_model_equals_its_stage1_initialisation(stage1, stage2, tensors):
    fresh = GEM3DUNetModel.from_stage1(stage1).eval()
    assert fresh.config.temporal_layers and not stage1.config.temporal_layers
    sample = torch.cat([tensors["p3d_x_t"], tensors["p3d_c_mask"], tensors["p3d_c_informed"]], dim=1)
    with torch.no_grad():
        clip = fresh(as_clip(sample), 537).sample
        per_frame = stage1(sample[:, :, None], torch.full((16,), 537)).sample[:, :, 0]
        trained = stage2(as_clip(sample), 537).sample
    torch.testing.assert_close(clip[0].transpose(0, 1), per_frame, atol=1e-6, rtol=0)
    # A trained stage-2 model does differ from its initialisation (the temporal layers act).
    assert (trained[0].transpose(0, 1) - per_frame).abs().max() > 1e-2
    # New layers: Dirac frame convolutions with zero bias, zero temporal-attention output.
    conv = fresh.conv_in_temporal.temporal_conv
    assert torch.equal(conv.weight[:, :, 1], torch.eye(32)) and not conv.weight[:, :, [0, 2]].any()
    assert not conv.bias.any() and not fresh.mid_block.attention.temporal_attention.to_out[0].weight.any()


def public(config):
    return {key: value for key, value in config.items() if not key.startswith("_")}


def transposed_weights(model):
    """A copy of `model` whose spatial kernels are transposed (h <-> w): it must compute `model` on transposed maps."""
    copy = GEM3DUNetModel(**public(model.config))
    state = {
        key: value.transpose(-1, -2) if value.ndim == 4 and value.shape[-1] > 1 else value
        for key, value in model.state_dict().items()
    }
    copy.load_state_dict(state)
    return copy.eval()


@pytest.mark.parametrize("num_frames", [16, 5])
def test_non_square_latents_are_consistent_with_the_transposed_computation(stage2, num_frames):
    """The original swaps h and w when it undoes its frame rearrangement (and crashes when h != w). Every layer here
    is per-frame 2-D or per-pixel 1-D, so transposing the latents and the kernels must transpose the output."""
    torch.manual_seed(0)
    sample = torch.randn(2, 12, num_frames, 8, 4)
    with torch.no_grad():
        eps = stage2(sample, torch.tensor([537, 20])).sample
        eps_t = transposed_weights(stage2)(sample.transpose(-1, -2), torch.tensor([537, 20])).sample
    assert eps.shape == (2, 4, num_frames, 8, 4)
    torch.testing.assert_close(eps_t.transpose(-1, -2), eps, atol=1e-5, rtol=1e-5)


def test_non_square_stage1_matches_a_per_frame_2d_reference(stage1):
    torch.manual_seed(1)
    sample = torch.randn(1, 12, 3, 4, 8)
    with torch.no_grad():
        eps = stage1(sample, 300).sample
        frames = [stage1(sample[:, :, f : f + 1], 300).sample for f in range(3)]
    torch.testing.assert_close(eps, torch.cat(frames, dim=2), atol=1e-6, rtol=0)


def test_clips_of_any_length_do_not_interact(stage2):
    """Two clips of 5 frames in one batch give what each gives alone; the frames of a clip do interact."""
    torch.manual_seed(2)
    sample = torch.randn(2, 12, 5, 8, 8)
    t = torch.tensor([900, 100])
    with torch.no_grad():
        both = stage2(sample, t).sample
        first = stage2(sample[:1], t[:1]).sample
        second = stage2(sample[1:], 100).sample
        changed = sample.clone()
        changed[0, :, 4] += 1.0
        moved = stage2(changed[:1], t[:1]).sample
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-6, rtol=0)
    # Changing the last frame changes the neighbouring frames (temporal layers), not only itself.
    assert (moved[0, :, 3] - first[0, :, 3]).abs().max() > 1e-3


def test_timestep_forms_agree():
    model = tiny(temporal_layers=True)
    sample = torch.randn(2, 6, 3, 4, 4)
    with torch.no_grad():
        reference = model(sample, torch.tensor([7, 7])).sample
        for timestep in (7, torch.tensor(7), torch.tensor([7])):
            torch.testing.assert_close(model(sample, timestep).sample, reference, atol=0, rtol=0)
        (as_tuple,) = model(sample, 7, return_dict=False)
    assert torch.equal(as_tuple, reference)


def test_save_and_load_round_trip(tmp_path, stage2, tensors):
    stage2.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert "_name_or_path" not in json.loads((tmp_path / "config.json").read_text())
    loaded = GEM3DUNetModel.from_pretrained(tmp_path).eval()
    assert public(loaded.config) == public(stage2.config)
    sample = as_clip(torch.cat([tensors["p3d_x_t"], tensors["p3d_c_mask"], tensors["p3d_c_informed"]], dim=1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 537).sample[0].transpose(0, 1), tensors["p3d_eps"], **TOL)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny(temporal_layers=True).train()
    sample = torch.randn(1, 6, 4, 4, 4)

    def gradients():
        model.zero_grad()
        model(sample, 500).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    model.enable_gradient_checkpointing()
    assert model.mid_block.gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert any(grad.abs().max() > 0 for name, grad in plain.items() if "temporal" in name)


def test_attention_processors_are_diffusers_ones():
    model = tiny(temporal_layers=True)
    processors = model.attn_processors
    assert len(processors) == 2 * 4  # spatial + temporal in 1 down, 1 mid and 2 up attention blocks
    assert any(name.startswith("mid_block.attention.temporal_attention") for name in processors)


@pytest.mark.parametrize(
    "sample, timestep, message",
    [
        (torch.zeros(1, 6, 4, 4), 1, r"\(B, C, F, h, w\)"),
        (torch.zeros(1, 5, 2, 4, 4), 1, "channels"),
        (torch.zeros(1, 6, 2, 4, 3), 1, "multiples of 2"),
        (torch.zeros(2, 6, 2, 4, 4), torch.tensor([1, 2, 3]), "timestep"),
        (torch.zeros(1, 6, 0, 4, 4), 1, "no frames"),
    ],
)
def test_bad_inputs_raise_clear_errors(sample, timestep, message):
    with pytest.raises(ValueError, match=message):
        tiny()(sample, timestep)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="attention_levels"):
        GEM3DUNetModel(**{**TINY, "attention_levels": (True,)})
    with pytest.raises(ValueError, match="divisible"):
        GEM3DUNetModel(**{**TINY, "attention_head_dim": 12})
    with pytest.raises(ValueError, match="odd"):
        GEM3DUNetModel(**{**TINY, "temporal_kernel_size": 2})


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="torch.compile takes ~20 s on a shared CPU")
def test_compiles_without_graph_breaks():
    model = tiny(temporal_layers=True)
    sample = torch.randn(1, 6, 3, 8, 4)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(sample, 10).sample, model(sample, 10).sample, atol=1e-6, rtol=0)
