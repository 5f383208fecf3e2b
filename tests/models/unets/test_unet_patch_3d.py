"""PatchUNet3DModel: conditioning inputs, batching, saving, checkpointing, attention processors and input checks."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from meddiffusers import PatchUNet3DModel, window_coordinates
from meddiffusers.models.unets.unet_patch_3d import anatomy_channels, encode_anatomy

TINY = dict(
    block_out_channels=(8, 16),
    attention_levels=(False, True),
    attention_head_dim=8,
    norm_num_groups=4,
    num_position_frequencies=2,
)


def tiny(**overrides):
    torch.manual_seed(0)
    model = PatchUNet3DModel(**{**TINY, **overrides}).eval()
    # Spatial transformers start as the identity (zero output projection): give them weights so they matter.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "proj_out" in name:
                parameter.normal_(0, 0.2)
    return model


def test_predicts_one_value_per_voxel_for_any_side_multiple_of_the_downsampling():
    model = tiny()
    for shape in [(1, 1, 8, 8, 8), (2, 1, 4, 10, 6)]:
        out = model(torch.randn(shape), 500, class_labels=torch.zeros(shape[0], dtype=torch.long)).sample
        assert out.shape == shape and torch.isfinite(out).all()


def test_batch_items_do_not_interact():
    model = tiny(anatomy_encoding="one_hot", num_anatomy_classes=3)
    sample = torch.randn(3, 1, 8, 8, 8)
    labels, t = torch.tensor([0, 1, 2]), torch.tensor([10, 500, 990])
    anatomy = torch.randint(0, 4, (3, 1, 8, 8, 8))
    position = torch.rand(3, 3, 8, 8, 8) * 2 - 1
    with torch.no_grad():
        batched = model(sample, t, class_labels=labels, position=position, anatomy=anatomy).sample
        for i in range(3):
            single = model(sample[i : i + 1], t[i], labels[i : i + 1], position[i : i + 1], anatomy[i : i + 1]).sample
            torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=1e-5)


def test_without_position_the_window_is_the_whole_volume():
    model = tiny()
    sample = torch.randn(1, 1, 8, 8, 8)
    whole = window_coordinates((8, 8, 8))[None]
    corner = window_coordinates((16, 16, 16), (slice(0, 8), slice(0, 8), slice(8, 16)))[None]
    with torch.no_grad():
        default = model(sample, 100, class_labels=[1]).sample
        explicit = model(sample, 100, class_labels=[1], position=whole).sample
        elsewhere = model(sample, 100, class_labels=[1], position=corner).sample
    torch.testing.assert_close(default, explicit, atol=0, rtol=0)
    assert (default - elsewhere).abs().max() > 1e-3


def test_region_and_anatomy_change_the_prediction():
    model = tiny(anatomy_encoding="label_map", num_anatomy_classes=4)
    sample = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        chest = model(sample, 300, class_labels=[1]).sample
        abdomen = model(sample, 300, class_labels=[2]).sample
        organs = model(sample, 300, class_labels=[1], anatomy=torch.full((1, 1, 8, 8, 8), 3)).sample
    assert (chest - abdomen).abs().max() > 1e-3 and (chest - organs).abs().max() > 1e-3


def test_anatomy_encodings():
    labels = torch.tensor([0, 1, 2, 5]).reshape(1, 1, 1, 1, 4)
    label_map = encode_anatomy(labels, "label_map", 5, torch.float32)
    torch.testing.assert_close(label_map.flatten(), torch.tensor([-1.0, -0.6, -0.2, 1.0]))
    one_hot = encode_anatomy(labels, "one_hot", 5, torch.float32)
    assert one_hot.shape == (1, 5, 1, 1, 4) and one_hot[0, :, 0, 0, 0].sum() == 0  # background: no channel
    assert one_hot[0, :, 0, 0, 3].tolist() == [0, 0, 0, 0, 1]
    bits = encode_anatomy(labels, "binary_bits", 5, torch.float32)
    assert bits.shape[1] == anatomy_channels("binary_bits", 5) == 3
    assert bits[0, :, 0, 0, 3].tolist() == [1, 0, 1] and bits[0, :, 0, 0, 2].tolist() == [0, 1, 0]
    assert anatomy_channels("one_hot", 118) == 118 and anatomy_channels("binary_bits", 118) == 7


def test_save_and_load_round_trip(tmp_path):
    model = tiny(anatomy_encoding="binary_bits", num_anatomy_classes=118, region_cross_attention=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    reloaded = PatchUNet3DModel.from_pretrained(tmp_path).eval()
    sample, anatomy = torch.randn(1, 1, 8, 8, 8), torch.randint(0, 119, (1, 1, 8, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            model(sample, 7, [0], anatomy=anatomy).sample, reloaded(sample, 7, [0], anatomy=anatomy).sample
        )


def test_gradient_checkpointing_gives_the_same_gradients():
    sample = torch.randn(2, 1, 8, 8, 8)

    def gradients(checkpointing):
        model = tiny().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(sample, torch.tensor([3, 900]), class_labels=[0, 1]).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5)


def test_attention_processors_are_swappable():
    model = tiny()
    assert model.attn_processors and all(isinstance(p, AttnProcessor2_0) for p in model.attn_processors.values())
    sample = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        sdpa = model(sample, 50, [0]).sample
        model.set_attn_processor(AttnProcessor())
        classic = model(sample, 50, [0]).sample
    torch.testing.assert_close(sdpa, classic, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sample=torch.randn(1, 1, 7, 8, 8)), "multiples of 2"),
        (dict(sample=torch.randn(1, 2, 8, 8, 8)), "1 channel"),
        (dict(sample=torch.full((1, 1, 8, 8, 8), float("nan"))), "NaN"),
        (dict(class_labels=None), "region-conditional"),
        (dict(class_labels=[3]), "class_labels"),
        (dict(position=torch.zeros(1, 3, 4, 4, 4)), "position"),
        (dict(anatomy=torch.full((1, 1, 8, 8, 8), 9)), "anatomy"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, message):
    model = tiny(anatomy_encoding="label_map", num_anatomy_classes=4)
    inputs = dict(sample=torch.randn(1, 1, 8, 8, 8), timestep=5, class_labels=[0]) | kwargs
    with pytest.raises(ValueError, match=message):
        model(**inputs)


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(attention_levels=(False,)), "attention_levels"),
        (dict(block_out_channels=(8, 12)), "not divisible"),
        (dict(anatomy_encoding="rgb"), "anatomy_encoding"),
        (dict(num_class_embeds=None, region_cross_attention=True), "regions"),
    ],
)
def test_bad_configs_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        PatchUNet3DModel(**{**TINY, **config})
