"""One original-checkpoint loading path: the converter table, key reports, options and single reads."""

import pytest
import torch

from meddiffusers import (
    BiFlowNet3DModel,
    ControlNet3DModel,
    FromOriginalCheckpointMixin,
    KeyReport,
    VQModel3D,
    load_original_checkpoint,
    load_original_model,
)
from meddiffusers.loaders.single_file import converter_for
from tests.conftest import FIXTURES

VQVAE = FIXTURES / "patchvolume_4x_tiny" / "patchvolume_4x_tiny.ckpt"
VQVAE_CONFIG = FIXTURES / "patchvolume_4x_tiny" / "config.json"
UNET = FIXTURES / "biflownet_tiny" / "biflownet_tiny.pt"
UNET_CONFIG = FIXTURES / "biflownet_tiny" / "config.json"
CONTROLNET = FIXTURES / "controlnet_tiny" / "controlnet_tiny.pt"
CONTROLNET_CONFIG = FIXTURES / "controlnet_tiny" / "config.json"
LIGHTNING_ENTRIES = [
    "callbacks",
    "epoch",
    "global_step",
    "hparams_name",
    "loops",
    "lr_schedulers",
    "optimizer_states",
    "pytorch-lightning_version",
]


def assert_weights_come_from_the_mapped_keys(model, report, state_dict):
    loaded = model.state_dict()
    assert report.missing == [] and sorted(loaded) == sorted(target for _, target in report.mapped)
    for source, target in report.mapped:
        assert torch.equal(loaded[target], state_dict[source]), f"{source} -> {target}"


def test_every_model_shares_the_one_from_single_file():
    for model_class in (VQModel3D, BiFlowNet3DModel, ControlNet3DModel):
        assert issubclass(model_class, FromOriginalCheckpointMixin)
        assert model_class.from_single_file.__func__ is FromOriginalCheckpointMixin.from_single_file.__func__


def test_autoencoder_report_maps_every_inference_weight_and_drops_losses_and_training_state():
    model, report = load_original_model(VQModel3D, VQVAE)
    state_dict = load_original_checkpoint(VQVAE)["state_dict"]
    assert isinstance(report, KeyReport)
    loss_only = [key for key in state_dict if key.startswith("volume_discriminator.")]
    assert len(loss_only) == 18 and len(report.mapped) == len(state_dict) - 18 == 169
    assert report.dropped == loss_only + LIGHTNING_ENTRIES  # `hyper_parameters` gave the config, so it was used
    mapped = dict(report.mapped)
    assert mapped["encoder.conv_first.weight"] == "encoder.conv_in.weight"
    assert mapped["codebook.embeddings"] == "quantize.embedding"
    assert mapped["decoder.mid_block.attn.to_qkv.weight"] == "decoder.mid_block.attention.attention.to_qkv.weight"
    assert_weights_come_from_the_mapped_keys(model, report, state_dict)

    _, with_config = load_original_model(VQModel3D, VQVAE, original_config=VQVAE_CONFIG)
    assert with_config.dropped == loss_only + sorted([*LIGHTNING_ENTRIES, "hyper_parameters"])


@pytest.mark.parametrize(
    "use_ema, original_config, dropped",
    [
        (True, UNET_CONFIG, ["args", "epoch", "model", "opt", "scaler"]),
        (False, UNET_CONFIG, ["args", "ema", "epoch", "opt", "scaler"]),
        (True, None, ["epoch", "model", "opt", "scaler"]),  # the config came from `args`
    ],
)
def test_biflownet_report_maps_the_chosen_weights_and_drops_the_rest(use_ema, original_config, dropped):
    overrides = {} if original_config else dict(attention_heads=2, norm_num_groups=2, dit_num_heads=2)
    model, report = load_original_model(
        BiFlowNet3DModel, UNET, original_config=original_config, use_ema=use_ema, **overrides
    )
    state_dict = load_original_checkpoint(UNET)["ema" if use_ema else "model"]
    assert report.dropped == dropped and len(report.mapped) == len(state_dict) == 340
    mapped = dict(report.mapped)
    assert mapped["init_conv.weight"] == "conv_in.weight"
    assert mapped["IntraPatchFlow_input.0.0.attn.qkv.weight"] == "dit_input_stages.0.block.attention.to_qkv.weight"
    assert mapped["mid_spatial_attn.fn.norm.gamma"] == "mid_attention.norm.weight"
    assert mapped["downs.1.4.weight"] == "down_blocks.1.resampler.weight"
    assert mapped["ups.0.4.weight"] == "up_blocks.0.resampler.weight"
    assert_weights_come_from_the_mapped_keys(model, report, state_dict)


def test_controlnet_report_maps_the_zero_convolutions():
    model, report = load_original_model(ControlNet3DModel, CONTROLNET, original_config=CONTROLNET_CONFIG)
    state_dict = load_original_checkpoint(CONTROLNET)["model"]
    assert report.dropped == [] and len(report.mapped) == len(state_dict) == 180
    mapped = dict(report.mapped)
    assert mapped["mid_zero_conv.weight"] == "controlnet_mid_block.weight"
    assert mapped["downs.1.5.bias"] == "controlnet_down_blocks.1.bias"
    assert_weights_come_from_the_mapped_keys(model, report, state_dict)


def test_from_single_file_reads_the_file_once(monkeypatch):
    reads = []
    original_load = torch.load

    def counting_load(path, *args, **kwargs):
        reads.append(str(path))
        return original_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    BiFlowNet3DModel.from_single_file(UNET, original_config=UNET_CONFIG)
    assert reads == [str(UNET)]


def test_options_dtype_and_overrides(tmp_path):
    model = VQModel3D.from_single_file(VQVAE, torch_dtype=torch.float16, patch_size=32)
    assert model.dtype == torch.float16 and model.config.patch_size == 32 and not model.training
    with pytest.raises(ValueError, match=r"unknown arguments \['use_ema'\].*`torch_dtype`"):
        VQModel3D.from_single_file(VQVAE, use_ema=False)
    with pytest.raises(ValueError, match=r"unknown arguments \['num_layers'\].*`use_ema`"):
        BiFlowNet3DModel.from_single_file(UNET, num_layers=3)


def test_converter_table_is_keyed_by_class_name_and_follows_subclasses():
    class MyAutoencoder(VQModel3D):
        pass

    assert type(converter_for(MyAutoencoder)).__name__ == "PatchVolumeConverter"
    assert type(converter_for(ControlNet3DModel)).__name__ == "ControlNetConverter"
    model = MyAutoencoder.from_single_file(VQVAE)
    assert type(model) is MyAutoencoder

    class Unrelated(FromOriginalCheckpointMixin):
        pass

    with pytest.raises(ValueError, match="Unrelated has no original-checkpoint converter.*VQModel3D"):
        Unrelated.from_single_file(VQVAE)


def test_repeated_target_keys_are_an_error(tmp_path, monkeypatch):
    from meddiffusers.loaders import original_controlnet_checkpoint

    monkeypatch.setattr(
        original_controlnet_checkpoint.ControlNetConverter,
        "rename",
        lambda self, key: "controlnet_mid_block.weight" if key.startswith("mid_zero_conv") else key,
    )
    with pytest.raises(
        ValueError, match=r"map to the same ControlNet3DModel weights \['controlnet_mid_block.weight'\]"
    ):
        ControlNet3DModel.from_single_file(CONTROLNET, original_config=CONTROLNET_CONFIG)
