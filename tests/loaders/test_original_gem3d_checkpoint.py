"""Original GEM-3D checkpoints -> AutoencoderKL, GEM3DUNetModel, UNet2DConditionModel and the DDIM schedule."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file

from meddiffusers import GEM3DUNetModel, load_gem3d_components, slice_position_embedding
from meddiffusers.loaders.original_gem3d_checkpoint import (
    convert_gem3d_slice_unet,
    ema_key,
    gem3d_unet_config_from_original,
    load_gem3d_unet,
    split_legacy_qkv,
)
from tests.conftest import FIXTURES
from tests.malicious import RunsACommand

GEM3D = FIXTURES / "gem3d_tiny"
STAGE1, STAGE2, SLICE = (GEM3D / name for name in ("stage1.ckpt", "stage2.ckpt", "slice.ckpt"))
CONFIGS = json.loads((GEM3D / "config.json").read_text())["checkpoints"]
YAML = {name: entry["yaml_equivalent"] for name, entry in CONFIGS.items()}
TOL = dict(atol=1e-4, rtol=1e-4)
LIGHTNING_ENTRIES = [
    "callbacks",
    "epoch",
    "global_step",
    "lr_schedulers",
    "optimizer_states",
    "pytorch-lightning_version",
]


@pytest.fixture(scope="module")
def tensors():
    return load_file(GEM3D / "inputs_outputs.safetensors")


@pytest.fixture(scope="module")
def components():
    return load_gem3d_components(STAGE2, SLICE, YAML["stage2.ckpt"], YAML["slice.ckpt"])


def raw_state_dict(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_components_have_the_interface_types(components):
    assert isinstance(components["vae"], AutoencoderKL)
    assert isinstance(components["unet"], GEM3DUNetModel) and components["unet"].config.temporal_layers
    assert isinstance(components["slice_unet"], UNet2DConditionModel)
    assert components["vae"].config.scaling_factor == 0.18215
    assert components["unet"].config.attention_head_dim == 8
    assert components["slice_unet"].config.cross_attention_dim == 128


def test_vae_encode_matches_the_original_posterior(components, tensors):
    vae = components["vae"]
    with torch.no_grad():
        posterior = vae.encode(tensors["vae_x_rgb"]).latent_dist
        gray = vae.encode(tensors["vae_x_gray3"]).latent_dist
    torch.testing.assert_close(posterior.parameters, tensors["vae_rgb_moments"], **TOL)
    torch.testing.assert_close(posterior.mean, tensors["vae_rgb_mean"], **TOL)
    torch.testing.assert_close(posterior.logvar, tensors["vae_rgb_logvar"], **TOL)
    torch.testing.assert_close(posterior.std, tensors["vae_rgb_std"], **TOL)
    torch.testing.assert_close(gray.mean, tensors["vae_gray3_mean"], **TOL)
    torch.testing.assert_close(gray.logvar, tensors["vae_gray3_logvar"], **TOL)
    # The original `get_first_stage_encoding`: scaling_factor * (mean + std * noise) with the recorded noise.
    z = vae.config.scaling_factor * (gray.mean + gray.std * tensors["vae_gray3_sample_noise"])
    torch.testing.assert_close(z, tensors["vae_gray3_z_scaled"], **TOL)
    assert torch.equal(tensors["vae_x_gray3"], tensors["vae_x_gray"].repeat(1, 3, 1, 1))


def test_vae_decode_matches_decode_and_decode_first_stage(components, tensors):
    vae = components["vae"]
    with torch.no_grad():
        decoded = vae.decode(tensors["vae_dec_z"]).sample
        first_stage = vae.decode(tensors["vae_dec_z"] / vae.config.scaling_factor).sample
    torch.testing.assert_close(decoded, tensors["vae_dec_out"], **TOL)
    torch.testing.assert_close(first_stage, tensors["vae_decode_first_stage_out"], **TOL)


def test_volume_unet_of_the_components_matches_stage2(components, tensors):
    frames = torch.cat([tensors["p3d_x_t"], tensors["p3d_c_mask"], tensors["p3d_c_informed"]], dim=1)
    with torch.no_grad():
        eps = components["unet"](frames.transpose(0, 1)[None], tensors["p3d_t"][:1]).sample
    torch.testing.assert_close(eps[0].transpose(0, 1), tensors["p3d_eps"], **TOL)


@pytest.mark.parametrize("use_ema, expected", [(False, "slice_eps"), (True, "slice_eps_ema")])
def test_slice_unet_matches_the_original_with_one_position_token(tensors, use_ema, expected):
    slice_unet, _ = convert_gem3d_slice_unet(raw_state_dict(SLICE), YAML["slice.ckpt"], use_ema=use_ema)
    context = slice_position_embedding(tensors["slice_pos"], dim=128)
    torch.testing.assert_close(context, tensors["slice_pos_embedding"], atol=1e-6, rtol=0)
    with torch.no_grad():
        eps = slice_unet(tensors["slice_x_t"], tensors["slice_t"], encoder_hidden_states=context[:, None]).sample
        timestep_encoding = slice_unet.time_proj(tensors["slice_t"])
    torch.testing.assert_close(eps, tensors[expected], **TOL)
    torch.testing.assert_close(timestep_encoding, tensors["slice_timestep_embedding_of_t"], atol=1e-6, rtol=0)


def test_scheduler_config_reproduces_the_stored_schedule(components, tensors):
    config = components["scheduler_config"]
    assert config["beta_schedule"] == "scaled_linear" and config["num_train_timesteps"] == 1000
    assert (config["beta_start"], config["beta_end"]) == (0.00085, 0.012)
    scheduler = DDIMScheduler(**config)
    torch.testing.assert_close(scheduler.betas, tensors["sched_betas"], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(scheduler.alphas_cumprod, tensors["sched_alphas_cumprod"], atol=1e-7, rtol=1e-6)
    # The original 200-step inference visits arange(0, 1000, 5) + 1, from the top; DDIM's last "previous" alpha
    # is alphas_cumprod[0] (set_alpha_to_one=False).
    scheduler.set_timesteps(200)
    assert torch.equal(scheduler.timesteps, tensors["ddim200_timesteps"].flip(0))
    assert scheduler.final_alpha_cumprod == scheduler.alphas_cumprod[0]
    stored = raw_state_dict(STAGE2)
    for name in ("sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped"):
        assert torch.equal(stored[name], tensors[f"sched_{name}"]), name


def test_a_checkpoint_with_another_schedule_is_refused(tmp_path):
    checkpoint = torch.load(STAGE1, map_location="cpu", weights_only=True)
    betas = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)  # the DDPM linear schedule: not GEM-3D's
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    checkpoint["state_dict"]["betas"] = betas.float()
    checkpoint["state_dict"]["alphas_cumprod"] = alphas_cumprod.float()
    path = tmp_path / "other_schedule.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"is not the scaled-linear schedule 0.0001..0.02 with 1000 steps"):
        load_gem3d_components(path)
    # With the YAML's 0.00085..0.012 only the two replaced buffers disagree.
    with pytest.raises(ValueError, match=r"\(\['betas', 'alphas_cumprod'\]\) is not the scaled-linear schedule"):
        load_gem3d_components(path, original_config=YAML["stage1.ckpt"])


def test_unet_report_maps_every_weight_and_drops_the_rest(components):
    report = components["report"]["unet"]
    model = components["unet"].state_dict()
    assert report.missing == [] and sorted(target for _, target in report.mapped) == sorted(model)
    source = raw_state_dict(STAGE2)
    heads = 32 // 8
    for origin, target in report.mapped:
        key, _, part = origin.partition("#")
        expected = source[key]
        if part:  # one third of a fused legacy qkv convolution
            expected = split_legacy_qkv(expected, heads)["qkv".index(part)]
        elif expected.ndim == 3 and "proj_out" in key:
            expected = expected[..., 0]
        assert torch.equal(model[target], expected), f"{origin} -> {target}"
    dropped = set(report.dropped)
    assert {"betas", "logvar", *LIGHTNING_ENTRIES} <= dropped
    assert all(key in dropped for key in source if key.startswith(("first_stage_model.", "cond_stage_model.")))
    assert not any(key.startswith("model.diffusion_model.") for key in dropped)


def test_vae_and_slice_reports_cover_every_weight(components):
    vae_report = components["report"]["vae"]
    source = raw_state_dict(STAGE2)
    assert sorted(origin for origin, _ in vae_report.mapped) == sorted(
        k for k in source if k.startswith("first_stage_model.")
    )
    assert sorted(target for _, target in vae_report.mapped) == sorted(components["vae"].state_dict())
    slice_report = components["report"]["slice_unet"]
    slice_source = raw_state_dict(SLICE)
    assert sorted(origin for origin, _ in slice_report.mapped) == sorted(
        k for k in slice_source if k.startswith("model.diffusion_model.")
    )
    assert sorted(target for _, target in slice_report.mapped) == sorted(components["slice_unet"].state_dict())
    assert {ema_key("model.diffusion_model.out.2.weight"), "model_ema.decay", *LIGHTNING_ENTRIES} <= set(
        slice_report.dropped
    )


def test_ema_report_names_the_lit_ema_keys():
    model, report = load_gem3d_unet(STAGE1, YAML["stage1.ckpt"], use_ema=True)
    source = raw_state_dict(STAGE1)
    assert all(origin.startswith("model_ema.diffusion_model") for origin, _ in report.mapped)
    assert torch.equal(model.state_dict()["conv_out.weight"], source["model_ema.diffusion_modelout2weight"])
    assert "model.diffusion_model.out.2.weight" in report.dropped


def test_architecture_inferred_from_shapes(components, tensors):
    """Without the YAML everything but the channels per head is read from the shapes (32 per head is assumed)."""
    model = GEM3DUNetModel.from_single_file(STAGE1)
    expected = gem3d_unet_config_from_original(YAML["stage1.ckpt"])
    assert {key: model.config[key] for key in expected} == {**expected, "attention_head_dim": 32}
    stage2 = GEM3DUNetModel.from_single_file(STAGE2, attention_head_dim=8)
    assert stage2.config.temporal_layers
    frames = torch.cat([tensors["p3d_x_t"], tensors["p3d_c_mask"], tensors["p3d_c_informed"]], dim=1)
    with torch.no_grad():
        eps = stage2(frames.transpose(0, 1)[None], 537).sample
    torch.testing.assert_close(eps[0].transpose(0, 1), tensors["p3d_eps"], **TOL)
    # Components without any config: the schedule and the VAE are inferred too.
    inferred = load_gem3d_components(STAGE2)
    assert (
        inferred["scheduler_config"]
        == load_gem3d_components(STAGE2, original_config=YAML["stage2.ckpt"])["scheduler_config"]
    )
    with torch.no_grad():
        decoded = inferred["vae"].decode(tensors["vae_dec_z"]).sample
    torch.testing.assert_close(decoded, tensors["vae_dec_out"], **TOL)
    assert inferred["slice_unet"] is None and inferred["report"]["slice_unet"] is None


def test_original_config_from_a_yaml_file(tmp_path, tensors):
    import yaml

    path = tmp_path / "gem3d_stage1.yaml"
    path.write_text(yaml.safe_dump(YAML["stage1.ckpt"]))
    model = GEM3DUNetModel.from_single_file(STAGE1, original_config=path, torch_dtype=torch.float64)
    assert model.dtype == torch.float64 and model.config.attention_head_dim == 8
    with torch.no_grad():
        eps = model(tensors["s1_unet_input"][:, :, None].double(), tensors["s1_t"]).sample[:, :, 0]
    torch.testing.assert_close(eps.float(), tensors["s1_eps"], **TOL)


def test_split_legacy_qkv_follows_the_per_head_row_order():
    heads, head_dim, channels = 2, 3, 4
    weight = torch.arange(3 * heads * head_dim, dtype=torch.float32)[:, None, None].expand(-1, channels, 1)
    query, key, value = split_legacy_qkv(weight, heads)
    # Head h owns rows [3dh, 3dh+d) = q, [3dh+d, 3dh+2d) = k, [3dh+2d, 3dh+3d) = v.
    assert query[:, 0].tolist() == [0, 1, 2, 9, 10, 11]
    assert key[:, 0].tolist() == [3, 4, 5, 12, 13, 14]
    assert value[:, 0].tolist() == [6, 7, 8, 15, 16, 17]
    assert query.shape == (heads * head_dim, channels)


def test_missing_ema_weights_are_an_error():
    with pytest.raises(ValueError, match="use_ema=False"):
        GEM3DUNetModel.from_single_file(STAGE2, YAML["stage2.ckpt"], use_ema=True)


def test_wrong_kinds_of_file_are_refused_with_the_right_hint(tmp_path):
    with pytest.raises(ValueError, match="informed-slice model"):
        GEM3DUNetModel.from_single_file(SLICE)
    with pytest.raises(ValueError, match="not a GEM-3D informed-slice checkpoint"):
        load_gem3d_components(STAGE2, slice_checkpoint=STAGE1)
    with pytest.raises(ValueError, match="not a GEM-3D / latent-diffusion checkpoint"):
        load_gem3d_components(FIXTURES / "patchvolume_4x_tiny" / "patchvolume_4x_tiny.ckpt")
    with pytest.raises(FileNotFoundError):
        load_gem3d_components(tmp_path / "absent.ckpt")
    with pytest.raises(ValueError, match="unknown arguments"):
        GEM3DUNetModel.from_single_file(STAGE2, not_an_argument=1)


def test_weights_that_do_not_fit_are_listed(tmp_path):
    checkpoint = torch.load(STAGE2, map_location="cpu", weights_only=True)
    checkpoint["state_dict"]["model.diffusion_model.middle_block.1.extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['mid_block.attention.extra.weight'\]"):
        load_gem3d_components(path, original_config=YAML["stage2.ckpt"])
    checkpoint["state_dict"]["something_else"] = torch.zeros(1)
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="something_else"):
        load_gem3d_components(path)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(STAGE2.read_bytes()[: STAGE2.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_gem3d_components(path)


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    checkpoint = torch.load(STAGE2, map_location="cpu", weights_only=True)
    checkpoint["callbacks"] = {"payload": RunsACommand(marker)}
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="could execute code"):
        load_gem3d_components(path)
    with pytest.raises(ValueError, match="could execute code"):
        GEM3DUNetModel.from_single_file(path)
    assert not marker.exists()


def test_slice_architecture_inferred_from_shapes():
    """Without the YAML the slice U-Net is rebuilt from the shapes, assuming 32 channels per head (1 head here)."""
    state_dict = raw_state_dict(SLICE)
    inferred, _ = convert_gem3d_slice_unet(state_dict)
    configured, _ = convert_gem3d_slice_unet(state_dict, YAML["slice.ckpt"])
    differing = {key for key in configured.config if inferred.config[key] != configured.config[key]}
    assert differing == {"attention_head_dim", "sample_size"}  # sample_size: informative, 64 when unknown
    assert list(inferred.config.attention_head_dim) == [1, 1] and list(configured.config.attention_head_dim) == [2, 2]
    assert list(configured.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D"]
