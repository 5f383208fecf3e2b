"""VQModel3D: parity with the original Patch-Volume autoencoder, save/load, tiling, padding and input checks."""

import pytest
import torch
from safetensors.torch import load_file

from meddiffusers import VQModel3D
from tests.conftest import FIXTURES

PARITY = ["patchvolume_8x_tiny", "patchvolume_4x_tiny"]
ATOL = RTOL = 1e-4  # the fixtures' stated tolerance for single forward passes


def load_fixture(name):
    folder = FIXTURES / name
    return VQModel3D.from_single_file(folder / f"{name}.ckpt"), load_file(folder / "inputs_outputs.safetensors")


def reproduce(model, ref):
    """Every tensor the fixtures record, computed through the public VQModel3D API."""
    x = ref["input_volume"]
    latent_patch = model.latent_patch_size[0]
    with torch.no_grad():
        latents = model.encode(x, patch_batch_size=3).latents
        quantized = model.quantize_latents(latents)
        return {
            "latent_prequant": latents,
            "latent_quantized": quantized.quantized,
            "code_indices": quantized.indices,
            "latent_normalized": model.normalize_latents(latents),
            "latent_denormalized": model.denormalize_latents(ref["latent_normalized"]),
            "decoded_joint": model.decode(ref["latent_prequant"]).sample,
            "decoded_joint_from_indices": model.decode_indices(ref["code_indices"]).sample,
            "decoded_patchwise": model.sliding_decode(ref["latent_prequant"], tile_latent_size=latent_patch),
            "forward_val_reconstruction": model(x).sample,
            "stage1_forward_reconstruction": model(ref["stage1_input_patch"]).sample,
            "codebook_embeddings": model.quantize.embedding,
        }


def assert_matches_fixture(model, ref):
    for name, value in reproduce(model, ref).items():
        expected = ref[name]
        if name == "code_indices":
            assert torch.equal(value, expected), "nearest-code indices must match exactly"
        else:
            torch.testing.assert_close(value, expected, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", PARITY)
def test_single_file_reproduces_original_outputs(name):
    model, ref = load_fixture(name)
    assert_matches_fixture(model, ref)


@pytest.mark.parametrize("name", PARITY)
def test_patch_wise_encoding_differs_from_whole_volume_encoding(name):
    model, ref = load_fixture(name)
    with torch.no_grad():
        whole = model.quant_conv(model.encoder(ref["input_volume"]))
    torch.testing.assert_close(whole, ref["latent_prequant_whole_volume_encode"], atol=ATOL, rtol=RTOL)
    assert not torch.allclose(whole, ref["latent_prequant"], atol=1e-3)


@pytest.mark.parametrize("name", PARITY)
def test_save_pretrained_round_trip_keeps_parity(name, tmp_path):
    model, ref = load_fixture(name)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    reloaded = VQModel3D.from_pretrained(tmp_path)
    assert reloaded.config.block_out_channels == list(model.config.block_out_channels)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    assert_matches_fixture(reloaded.eval(), ref)


def test_fp16_variant_round_trip(tmp_path):
    model, ref = load_fixture("patchvolume_8x_tiny")
    model.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    reloaded = VQModel3D.from_pretrained(tmp_path, variant="fp16", dtype=torch.float32)
    with torch.no_grad():
        recon = reloaded.decode(ref["latent_prequant"]).sample
    assert recon.dtype == torch.float32
    torch.testing.assert_close(recon, ref["decoded_joint"], atol=5e-2, rtol=5e-2)


def tiny_model(**overrides):
    config = dict(block_out_channels=(4, 8), latent_channels=4, num_vq_embeddings=32, norm_num_groups=2, patch_size=8)
    config.update(overrides)
    torch.manual_seed(0)
    return VQModel3D(**config).eval()


def test_patch_batch_size_does_not_change_latents():
    model = tiny_model()
    x = torch.rand(2, 1, 16, 24, 8) * 2 - 1
    with torch.no_grad():
        one_at_a_time = model.encode(x, patch_batch_size=1).latents
        all_at_once = model.encode(x, patch_batch_size=64).latents
    assert one_at_a_time.shape == (2, 4, 4, 6, 2)
    torch.testing.assert_close(one_at_a_time, all_at_once, atol=1e-5, rtol=1e-5)


def test_batch_items_are_encoded_independently():
    model = tiny_model()
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        batched = model.encode(x).latents
        single = model.encode(x[1:]).latents
    torch.testing.assert_close(batched[1:], single, atol=1e-5, rtol=1e-5)


def test_sides_not_multiple_of_patch_are_padded_and_cropped_back():
    model = tiny_model()
    x = torch.rand(1, 1, 13, 16, 9) * 2 - 1
    with torch.no_grad():
        encoded = model.encode(x)
        assert encoded.latents.shape[2:] == (4, 4, 4)  # padded to (16, 16, 16), compression 4
        assert encoded.input_size == (13, 16, 9)
        padded = torch.nn.functional.pad(x, (0, 7, 0, 0, 0, 3), value=-1.0)
        torch.testing.assert_close(encoded.latents, model.encode(padded).latents)
        recon = model(x).sample
        decoded = model.decode(encoded.latents, output_size=encoded.input_size).sample
    assert recon.shape == x.shape
    assert decoded.shape == x.shape


def test_tiled_decode_with_one_tile_equals_full_decode():
    model = tiny_model()
    latents = torch.randn(1, 4, 6, 6, 6)
    with torch.no_grad():
        full = model.decode(latents).sample
        model.enable_tiling(tile_latent_size=6, tile_latent_overlap=2)
        tiled = model.decode(latents).sample
    torch.testing.assert_close(full, tiled)


def test_tiled_decode_is_close_to_full_decode():
    model, ref = load_fixture("patchvolume_8x_tiny")
    torch.manual_seed(0)
    x = torch.rand(1, 1, 64, 64, 96) * 2 - 1
    with torch.no_grad():
        latents = model.encode(x).latents
        full = model.decode(latents).sample
        model.enable_tiling(tile_latent_size=8, tile_latent_overlap=2)
        tiled = model.decode(latents).sample
        gaussian = model.tiled_decode(latents, mode="gaussian")
        sliding = model.sliding_decode(latents, tile_latent_size=8)
    assert tiled.shape == full.shape == gaussian.shape == x.shape
    tiled_error = (tiled - full).abs()
    gaussian_error = (gaussian - full).abs()
    sliding_error = (sliding - full).abs()
    print(
        f"tiled vs full decode: max abs {tiled_error.max():.4f}, mean abs {tiled_error.mean():.4f} (constant blend, "
        f"the default); gaussian blend: max abs {gaussian_error.max():.4f}, mean abs {gaussian_error.mean():.4f}; "
        f"non-overlapping sliding decode: max abs {sliding_error.max():.4f}, mean abs {sliding_error.mean():.4f}"
    )
    # Blending overlapping tiles must beat the original's seam-prone sliding decode.
    assert tiled_error.mean() < 0.75 * sliding_error.mean()
    assert gaussian_error.mean() < 0.75 * sliding_error.mean()
    assert torch.isfinite(tiled).all()


def test_tiled_decode_of_a_batch_equals_decoding_each_item():
    model = tiny_model()
    latents = torch.randn(2, 4, 6, 4, 10)
    model.enable_tiling(tile_latent_size=4, tile_latent_overlap=1, mode="gaussian")
    with torch.no_grad():
        batched = model.decode(latents).sample
        single = torch.cat([model.decode(item[None]).sample for item in latents])
    assert batched.shape == (2, 1, 24, 16, 40)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_sliding_decode_decodes_each_tile_independently_including_the_remainder():
    model = tiny_model()
    latents = torch.randn(1, 4, 4, 4, 6)
    with torch.no_grad():
        sliding = model.sliding_decode(latents, tile_latent_size=4)
        first = model.decode(latents[..., :4]).sample
        remainder = model.decode(latents[..., 4:]).sample
    assert torch.equal(sliding, torch.cat([first, remainder], dim=-1))


def test_tiling_arguments_are_checked():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"`mode` must be one of \('constant', 'gaussian'\), got 'linear'"):
        model.enable_tiling(mode="linear")
    with pytest.raises(ValueError, match=r"`tile_latent_overlap` must be an int in \[0, 4\)"):
        model.tiled_decode(torch.randn(1, 4, 8, 8, 8), tile_latent_size=4, tile_latent_overlap=5)
    assert not model.use_tiling


def test_slicing_matches_batched_decode():
    model = tiny_model()
    latents = torch.randn(3, 4, 4, 4, 4)
    with torch.no_grad():
        batched = model.decode(latents).sample
        model.enable_slicing()
        sliced = model.decode(latents).sample
    torch.testing.assert_close(batched, sliced, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_matches_plain_backward():
    model = tiny_model().train()
    model.quantize.decay = None  # freeze the EMA codebook so that both passes see the same codes
    x = torch.rand(1, 1, 8, 8, 16) * 2 - 1

    def loss_and_grads():
        model.zero_grad()
        output = model(x)
        loss = (output.sample - x).abs().mean() + output.commit_loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    model.enable_gradient_checkpointing()
    assert model.encoder.gradient_checkpointing and model.decoder.gradient_checkpointing
    checkpointed_loss, checkpointed_grads = loss_and_grads()
    torch.testing.assert_close(plain_loss, checkpointed_loss)
    assert plain_grads.keys() == checkpointed_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(plain_grads[name], checkpointed_grads[name], atol=1e-6, rtol=1e-5)


def test_straight_through_quantisation_passes_gradients_to_encoder():
    model = tiny_model().train()
    model(torch.rand(1, 1, 8, 8, 8)).sample.sum().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.rand(1, 8, 8, 8), "5 dimensions"),
        (torch.rand(1, 2, 8, 8, 8), "1 channel"),
        (torch.full((1, 1, 8, 8, 8), float("nan")), "NaN"),
        (torch.rand(1, 1, 0, 8, 8), "empty"),
        (torch.randint(0, 3, (1, 1, 8, 8, 8)), "floating-point"),
        ([[1.0]], "torch.Tensor"),
    ],
)
def test_bad_volumes_get_clear_errors(tensor, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().encode(tensor)


def test_bad_latents_and_indices_get_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="4 channel"):
        model.decode(torch.randn(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode_indices(torch.full((1, 2, 2, 2), 32))
    with pytest.raises(ValueError, match="tile_latent_overlap"):
        model.enable_tiling(tile_latent_size=4, tile_latent_overlap=4)


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="divisible by `norm_num_groups`"):
        VQModel3D(block_out_channels=(6, 12), norm_num_groups=4)
    with pytest.raises(ValueError, match="multiple of the compression factor"):
        VQModel3D(block_out_channels=(4, 8, 16), norm_num_groups=2, patch_size=12)


def test_loads_by_hub_repo_id_from_local_cache(tmp_path):
    from tests.hub_cache import populate_hub_cache

    model, ref = load_fixture("patchvolume_8x_tiny")
    model.save_pretrained(tmp_path / "export" / "vqvae")
    populate_hub_cache(tmp_path / "export", "meddiffusers-test/tiny-vqvae", tmp_path / "hub")
    reloaded = VQModel3D.from_pretrained("meddiffusers-test/tiny-vqvae", subfolder="vqvae", cache_dir=tmp_path / "hub")
    with torch.no_grad():
        decoded = reloaded.decode(ref["latent_prequant"]).sample
    torch.testing.assert_close(decoded, ref["decoded_joint"], atol=ATOL, rtol=RTOL)


def test_codebook_ema_training_initialises_updates_and_restarts():
    model = tiny_model(num_vq_embeddings=16).train()
    model.quantize.cluster_size.zero_()  # a fresh codebook
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = model.encode(x).latents
        model.quantize(latents)
    vectors = latents.movedim(1, -1).reshape(-1, 4)
    # Data-dependent init: every code is (close to) an encoder output of the batch.
    distances = torch.cdist(model.quantize.embedding, vectors).min(dim=1).values
    assert distances.max() < 0.05
    assert model.quantize.cluster_size.sum() > 0
    before = model.quantize.embedding.clone()
    with torch.no_grad():
        model.quantize(latents + 0.1)
    assert not torch.equal(before, model.quantize.embedding)
    model.eval()
    frozen = model.quantize.embedding.clone()
    with torch.no_grad():
        model.quantize(latents)
    assert torch.equal(frozen, model.quantize.embedding)  # no updates outside training
