"""Shared pipeline mechanics."""

import logging

import torch

from meddiffusers import DiffPIRPipeline, PatchSlidingWindowPipeline, VQModel3D
from meddiffusers.demo import patch_demo_model_path
from meddiffusers.pipelines.pipeline_utils_3d import (
    LARGE_DECODE_LATENT_VOXELS,
    decode_large_latents_in_slabs,
    planned_decode,
)
from tests.conftest import FIXTURES


def test_from_pipe_reuses_the_components_without_the_spurious_cast_warning():
    source = PatchSlidingWindowPipeline.from_pretrained(patch_demo_model_path())
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        pipe = DiffPIRPipeline.from_pipe(source)
    finally:
        diffusers_logger.removeHandler(handler)
    assert pipe.unet is source.unet  # the same modules, nothing copied or cast
    assert not [r for r in records if "should be kept in float32" in r.getMessage()]
    model_logger = logging.getLogger("diffusers.models.modeling_utils")
    filters_before = list(model_logger.filters)
    DiffPIRPipeline.from_pipe(source)
    assert model_logger.filters == filters_before  # ours is removed again: other warnings of that logger still show


def test_latents_above_the_default_threshold_are_decoded_in_slabs_equal_to_the_full_decode(monkeypatch):
    vqvae = VQModel3D.from_single_file(FIXTURES / "patchvolume_4x_tiny" / "patchvolume_4x_tiny.ckpt")
    calls = []
    slab_decode = vqvae.slab_decode
    monkeypatch.setattr(vqvae, "slab_decode", lambda *a, **k: calls.append(1) or slab_decode(*a, **k))
    channels = vqvae.config.latent_channels
    latents = torch.rand(1, channels, 17, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert latents.shape[2:].numel() > LARGE_DECODE_LATENT_VOXELS
    assert planned_decode(vqvae, latents) == "exact slabs" and planned_decode(vqvae, latents[:, :, :16]) == "full"
    with torch.no_grad():
        full = vqvae.decode(latents, output_size=(66, 64, 61)).sample
        assert calls == []
        slabs = decode_large_latents_in_slabs(vqvae, latents, output_size=(66, 64, 61))
    assert calls == [1] and not vqvae.use_slab_decoding
    assert slabs.shape == full.shape == (1, 1, 66, 64, 61)
    torch.testing.assert_close(slabs, full, atol=1e-5, rtol=0)
    vqvae.enable_tiling()
    assert planned_decode(vqvae, latents) == "blended tiles"
