"""Exact slab decoding of VQModel3D: equal to the full decode for any slab, axis, side and memory budget; the switch,
the pipelines' automatic choice, the blended-tiling alternative, and the lean (same-result) inference path."""

import pytest
import torch
from torch import nn

from meddiffusers import MedDiffusionDDIMScheduler, MedDiffusionPipeline, VQModel3D
from meddiffusers.models.autoencoders.slab_decoding import SlabDecoder
from tests.conftest import FIXTURES

TINY = dict(
    block_out_channels=(8, 16),
    latent_channels=4,
    num_vq_embeddings=32,
    norm_num_groups=4,
    attention_heads=2,
    attention_head_dim=4,
    patch_size=8,
)
STREAM_ALL = 1e-6  # GiB: nothing but the input and the output is kept whole, every layer is recomputed by slabs
KEEP_ALL = 4.0


def tiny_model(seed=0, **overrides) -> VQModel3D:
    torch.manual_seed(seed)
    model = VQModel3D(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # move GroupNorm affines and biases off their defaults so that every term counts
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def middle_budget(model, hidden_shape, slab_latent_size) -> float:
    """A budget (GiB) halfway between keeping nothing and keeping everything whole."""
    low, high = (
        SlabDecoder(model.decoder, slab_latent_size, budget * 2**30, None).plan(hidden_shape)["estimated_peak_gib"]
        for budget in (STREAM_ALL, KEEP_ALL)
    )
    return (low + high) / 2


def decode_both(model, latents, **slab_options):
    with torch.no_grad():
        full = model.decode(latents).sample
    model.enable_slab_decoding(**slab_options)
    try:
        sliced = model.decode(latents).sample
    finally:
        model.disable_slab_decoding()
    return full, sliced


@pytest.mark.parametrize(
    "latent_shape, slab_latent_size, axis, memory_budget",
    [
        ((4, 4, 4), 2, 0, STREAM_ALL),  # cubic, slabs dividing the side
        ((3, 5, 4), 1, None, STREAM_ALL),  # non-cubic, one latent slice per slab, longest axis (H)
        ((3, 5, 4), 3, 1, STREAM_ALL),  # odd sides, a slab size that does not divide the side (5 = 3 + 2)
        ((3, 4, 5), 2, 2, STREAM_ALL),  # slabs along W, the last one shorter
        ((5, 3, 4), 2, 0, KEEP_ALL),  # a budget that keeps every intermediate whole
        ((4, 5, 3), None, None, KEEP_ALL),  # automatic slab size and axis
        ((5, 4, 3), 1, 0, "middle"),  # a budget in between: some tensors kept, the rest recomputed
    ],
)
def test_slab_decode_equals_full_decode(model, latent_shape, slab_latent_size, axis, memory_budget):
    if memory_budget == "middle":
        memory_budget = middle_budget(model, (1, 16, *latent_shape), slab_latent_size)
    latents = torch.randn(1, 4, *latent_shape, generator=torch.Generator().manual_seed(1))
    full, sliced = decode_both(
        model, latents, slab_latent_size=slab_latent_size, memory_budget=memory_budget, axis=axis
    )
    assert sliced.shape == full.shape == (1, 1, *(4 * side for side in latent_shape))
    assert full.abs().max() > 0.5
    torch.testing.assert_close(sliced, full, atol=1e-5, rtol=0)


def test_slab_decode_of_a_batch_with_output_size_and_indices(model):
    latents = torch.randn(2, 4, 3, 4, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model.decode(latents, output_size=(10, 15, 11)).sample
        indices = model.quantize.nearest_indices(latents)
        from_indices = model.decode_indices(indices).sample
    model.enable_slab_decoding(slab_latent_size=2, memory_budget=STREAM_ALL)
    sliced = model.decode(latents, output_size=(10, 15, 11)).sample
    sliced_indices = model.decode_indices(indices).sample
    model.disable_slab_decoding()
    assert sliced.shape == (2, 1, 10, 15, 11)
    torch.testing.assert_close(sliced, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(sliced_indices, from_indices, atol=1e-5, rtol=0)


def test_receptive_field_comes_from_the_modules():
    # A 5-wide last convolution and a dilated one inside a resnet: the halos must follow their kernels.
    model = tiny_model(seed=3)
    torch.manual_seed(3)
    model.decoder.conv_out = nn.Conv3d(8, 1, kernel_size=5, padding=2)
    resnet = model.decoder.up_blocks[-1].resnets[0]
    resnet.conv2 = nn.Conv3d(8, 8, kernel_size=3, padding=2, dilation=2)
    latents = torch.randn(1, 4, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    full, sliced = decode_both(model, latents, slab_latent_size=1, memory_budget=STREAM_ALL, axis=0)
    torch.testing.assert_close(sliced, full, atol=1e-5, rtol=0)
    decoder = SlabDecoder(model.decoder, 1, STREAM_ALL * 2**30, 2)
    decoder.plan((1, 16, 4, 3, 3))
    conv_out = len(decoder.nodes) - 1
    assert decoder._input_rows(conv_out, 8, 12) == (6, 14)  # kernel 5, padding 2
    dilated = next(i for i, n in enumerate(decoder.nodes) if n.module is resnet.conv2)
    assert decoder._input_rows(dilated, 8, 12) == (6, 14)  # kernel 3, dilation 2, padding 2
    upsample = next(i for i, n in enumerate(decoder.nodes) if n.kind == "conv_transpose")
    assert decoder._input_rows(upsample, 8, 12) == (3, 7)  # kernel 4, stride 2, padding 1


def test_each_intermediate_row_is_computed_once_per_pass(model, monkeypatch):
    # Neighbouring slabs share halo rows; they are handed from one slab to the next instead of being recomputed.
    computed, passes = [], []
    original_apply, original_stream = SlabDecoder._apply, SlabDecoder._stream

    def apply(self, index, start, stop, *args):
        computed.append((len(passes) - 1, index, start, stop))
        return original_apply(self, index, start, stop, *args)

    def stream(self, target, store, available):
        passes.append(target)
        yield from original_stream(self, target, store, available)

    monkeypatch.setattr(SlabDecoder, "_apply", apply)
    monkeypatch.setattr(SlabDecoder, "_stream", stream)
    latents = torch.randn(1, 4, 6, 3, 4, generator=torch.Generator().manual_seed(9))
    full, sliced = decode_both(model, latents, slab_latent_size=1, memory_budget=STREAM_ALL, axis=0)
    torch.testing.assert_close(sliced, full, atol=1e-5, rtol=0)
    decoder = SlabDecoder(model.decoder, 1, STREAM_ALL * 2**30, 2)
    decoder.plan((1, 16, 6, 3, 4))
    assert len(passes) > 1
    kept = {i for i, node in enumerate(decoder.nodes) if node.keep}
    for number, target in enumerate(passes):
        done = sorted((index, start, stop) for n, index, start, stop in computed if n == number)
        nodes = {index for index, _, _ in done}
        assert target in nodes or target == 0
        for index in nodes:
            spans = [(start, stop) for i, start, stop in done if i == index]
            covered = sum(stop - start for start, stop in spans)
            rows = set().union(*(range(start, stop) for start, stop in spans))
            assert len(rows) <= decoder._length(index)
            if decoder._cheap(index, kept):  # elementwise on kept tensors: its halo rows may be recomputed
                continue
            assert covered == len(rows), f"pass {number}: rows of node {index} computed twice"


def test_memory_plan_follows_the_budget(model):
    shape = (1, 16, 6, 6, 6)
    tight = SlabDecoder(model.decoder, 1, STREAM_ALL * 2**30, None).plan(shape)
    roomy = SlabDecoder(model.decoder, 1, KEEP_ALL * 2**30, None).plan(shape)
    budget = middle_budget(model, shape, 1)
    middle = SlabDecoder(model.decoder, 1, budget * 2**30, None).plan(shape)
    decoder = SlabDecoder(model.decoder, 1, KEEP_ALL * 2**30, None)
    decoder.plan(shape)
    outputs = [i for i, node in enumerate(decoder.nodes) if node.kind != "norm"]
    assert tight["kept"] == [0, len(decoder.nodes) - 1]
    assert roomy["kept"] == outputs  # every convolution and residual output
    assert len(tight["kept"]) < len(middle["kept"]) < len(roomy["kept"])
    assert middle["estimated_peak_gib"] <= budget < roomy["estimated_peak_gib"]
    assert tight["slab_latent_size"] == 1 and tight["axis"] == 2


def test_a_budget_that_holds_the_whole_decode_runs_the_decoders_forward(model, monkeypatch):
    # Slab sizes are first chosen against half the budget (room for kept tensors). When the plan then keeps every
    # tensor and one slab fits the whole budget, the decode is the decoder's own forward.
    shape = (1, 16, 6, 6, 6)
    whole = SlabDecoder(model.decoder, None, KEEP_ALL * 2**30, None).plan(shape)
    assert whole["slab_latent_size"] == 6
    budget = whole["estimated_peak_gib"] * 1.5
    decoder = SlabDecoder(model.decoder, None, budget * 2**30, None)
    plan = decoder.plan(shape)
    assert plan["slab_latent_size"] == 6 and plan["estimated_peak_gib"] <= budget
    assert decoder._choose_slab_size() < 6  # what half the budget alone would have chosen
    explicit = SlabDecoder(model.decoder, 3, budget * 2**30, None).plan(shape)  # an explicit thickness stays
    assert explicit["slab_latent_size"] == 3
    latents = torch.randn(1, 4, 6, 6, 6, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        full = model.decode(latents).sample
    tails = []
    forward = model.decoder.inference_tail
    monkeypatch.setattr(model.decoder, "inference_tail", lambda *args: tails.append(len(args)) or forward(*args))
    model.enable_slab_decoding(memory_budget=budget)
    try:
        with torch.no_grad():
            sliced = model.decode(latents).sample
    finally:
        model.disable_slab_decoding()
    assert tails and torch.equal(sliced, full)


def test_enable_disable_round_trip_and_modes_exclude_each_other(model, monkeypatch):
    assert not model.use_slab_decoding
    calls = []
    original = model.slab_decode
    monkeypatch.setattr(model, "slab_decode", lambda *a, **k: calls.append(1) or original(*a, **k))
    latents = torch.randn(1, 4, 3, 3, 3, generator=torch.Generator().manual_seed(5))
    model.enable_tiling(tile_latent_size=2, tile_latent_overlap=1)
    model.enable_slab_decoding(slab_latent_size=2, memory_budget=1.5, axis=2)
    assert model.use_slab_decoding and not model.use_tiling
    assert (model.slab_latent_size, model.slab_memory_budget, model.slab_axis) == (2, 1.5, 2)
    model.decode(latents)
    assert calls == [1] and model.slab_plan["axis"] == 4 and model.slab_plan["slab_latent_size"] == 2
    model.disable_slab_decoding()
    with torch.no_grad():
        full = model.decode(latents).sample
    assert calls == [1] and not model.use_slab_decoding
    model.enable_slab_decoding()
    model.enable_tiling(tile_latent_size=2, tile_latent_overlap=1)
    assert model.use_tiling and not model.use_slab_decoding
    with torch.no_grad():
        tiled = model.decode(latents).sample
        expected = model.tiled_decode(latents)
    model.disable_tiling()
    assert calls == [1]
    torch.testing.assert_close(tiled, expected)  # the blended tiling is still there, and approximate
    assert (tiled - full).abs().max() > 1e-3


@pytest.mark.parametrize(
    "options",
    [
        {"slab_latent_size": 0},
        {"slab_latent_size": 2.5},
        {"slab_latent_size": True},
        {"memory_budget": 0},
        {"memory_budget": "4GB"},
        {"axis": 3},
    ],
)
def test_slab_options_are_checked(options):
    model = tiny_model()
    with pytest.raises(ValueError, match=next(iter(options))):
        model.enable_slab_decoding(**options)
    assert not model.use_slab_decoding


def test_pipeline_decodes_large_latents_by_slabs_and_respects_an_explicit_choice(monkeypatch):
    vqvae = VQModel3D.from_single_file(FIXTURES / "patchvolume_4x_tiny" / "patchvolume_4x_tiny.ckpt")
    pipe = MedDiffusionPipeline(vqvae=vqvae, unet=None, scheduler=MedDiffusionDDIMScheduler())
    seen = []
    for name in ("slab_decode", "tiled_decode"):
        original = getattr(vqvae, name)
        monkeypatch.setattr(vqvae, name, lambda *a, _o=original, _n=name, **k: seen.append(_n) or _o(*a, **k))
    latents = torch.rand(1, vqvae.config.latent_channels, 4, 6, 5, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        full = vqvae.decode(vqvae.denormalize_latents(latents)).sample
    pipe.register_to_config(tiled_decode_threshold=4 * 6 * 5)  # not larger than the threshold: full decode
    with torch.no_grad():
        assert torch.equal(pipe.decode_latents(latents), full) and seen == []
        pipe.register_to_config(tiled_decode_threshold=4 * 6 * 5 - 1)  # larger: exact slab decoding, then switched off
        torch.testing.assert_close(pipe.decode_latents(latents), full, atol=1e-5, rtol=0)
        assert seen == ["slab_decode"] and not vqvae.use_slab_decoding
        vqvae.enable_tiling(tile_latent_size=4, tile_latent_overlap=1)  # an explicit choice wins
        pipe.decode_latents(latents)
    vqvae.disable_tiling()
    assert seen == ["slab_decode", "tiled_decode"]


def test_lean_inference_path_changes_no_result():
    # Without autograd, the encoder and decoder free activations early and run channels-last with exact GroupNorm
    # statistics: outputs equal the autograd path's up to float32 rounding.
    model = tiny_model(seed=7)
    volume = torch.rand(1, 1, 16, 16, 8, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        lean_latents = model.encode(volume).latents
        lean_volume = model.decode(lean_latents).sample
    latents = model.encode(volume).latents
    decoded = model.decode(latents.detach()).sample
    assert latents.requires_grad and decoded.requires_grad
    torch.testing.assert_close(lean_latents, latents.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(lean_volume, decoded.detach(), atol=1e-5, rtol=0)
