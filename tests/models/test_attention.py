"""Attention layers: SDPA by default, one processor interface for voxel and token attention, diffusers' switches,
and the residual block both models build on."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meddiffusers import (
    BiFlowNet3DModel,
    ControlNet3DModel,
    ResidualVolumeAttention,
    VolumeAttention,
    VolumeAttnProcessor,
    VQModel3D,
)
from meddiffusers.models.attention import PaddedHeadAttnProcessor, TokenAttention
from meddiffusers.models.normalization import ChannelLayerNorm


def reference_attention(attn, hidden_states):
    """Plain softmax attention with the documented layout (heads are the outer factor of the features)."""
    batch, channels, *spatial = hidden_states.shape
    tokens = hidden_states.flatten(2).transpose(1, 2)
    q, k, v = attn.to_qkv(tokens).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, -1, attn.heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    weights = (q @ k.transpose(-1, -2) * attn.head_dim**-0.5).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, -1, attn.heads * attn.head_dim)
    return attn.to_out(out.transpose(1, 2).reshape(batch, -1, *spatial))


TINY_BIFLOWNET = dict(
    in_channels=2,
    base_channels=6,
    channel_mults=(1, 1, 2),
    attention_levels=(0, 0, 1),
    num_class_embeds=2,
    attention_heads=2,
    norm_num_groups=2,
    dit_num_heads=2,
)


def test_sdpa_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    attn = VolumeAttention(channels=6, heads=2, head_dim=4)
    x = torch.randn(2, 6, 3, 4, 5)
    torch.testing.assert_close(attn(x), reference_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_processors_can_be_swapped():
    calls = []

    class CountingProcessor(VolumeAttnProcessor):
        def __call__(self, attn, query, key, value):
            calls.append(query.shape)
            return super().__call__(attn, query, key, value)

    attn = VolumeAttention(channels=4, heads=2, head_dim=2)
    attn.set_processor(CountingProcessor())
    attn(torch.randn(1, 4, 2, 2, 2))
    assert calls == [torch.Size([1, 2, 8, 2])] and isinstance(attn.get_processor(), CountingProcessor)


@pytest.mark.parametrize(
    "model",
    [
        lambda: VQModel3D(
            block_out_channels=(4,), latent_channels=2, num_vq_embeddings=4, norm_num_groups=2, patch_size=4
        ),
        lambda: BiFlowNet3DModel(**TINY_BIFLOWNET),
        lambda: ControlNet3DModel(**{**TINY_BIFLOWNET, "conditioning_channels": 1}),
    ],
)
def test_diffusers_xformers_switch_reaches_every_attention_layer(model):
    model = model()
    try:
        import xformers  # noqa: F401

        pytest.skip("xformers is installed; this checks the clear error raised without it")
    except ImportError:
        pass
    with pytest.raises((ModuleNotFoundError, ValueError), match="xformers"):
        model.enable_xformers_memory_efficient_attention()
    model.disable_xformers_memory_efficient_attention()
    assert all(
        isinstance(m.get_processor(), VolumeAttnProcessor) for m in model.modules() if isinstance(m, VolumeAttention)
    )
    assert all(
        isinstance(p, PaddedHeadAttnProcessor if "dit_" in name else VolumeAttnProcessor)
        for name, p in model.attn_processors.items()
    )


def reference_token_attention(attn, tokens):
    """Softmax attention over tokens: `to_qkv` gives [q ‖ k ‖ v], each with the heads as the outer factor."""
    batch, length, dim = tokens.shape
    q, k, v = attn.to_qkv(tokens).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, length, attn.heads, -1).transpose(1, 2) for t in (q, k, v))
    weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return attn.to_out((weights @ v).transpose(1, 2).reshape(batch, length, dim))


def test_token_attention_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    attn = TokenAttention(dim=12, heads=3)
    tokens = torch.randn(2, 7, 12)
    torch.testing.assert_close(attn(tokens), reference_token_attention(attn, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "norm, reference_norm, norm_keys",
    [
        (
            lambda: nn.GroupNorm(2, 4, eps=1e-6),
            lambda m, x: F.group_norm(x, 2, m.weight, m.bias, 1e-6),
            ["bias", "weight"],
        ),
        (
            lambda: ChannelLayerNorm(4),
            lambda m, x: (
                (x - x.mean(1, keepdim=True)) / (x.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt() * m.weight
            ),
            ["weight"],
        ),
    ],
    ids=["groupnorm-autoencoder", "channel-layernorm-biflownet"],
)
def test_residual_attention_keeps_the_old_key_names_and_computes_x_plus_attention_of_norm(
    norm, reference_norm, norm_keys
):
    torch.manual_seed(0)
    block = ResidualVolumeAttention(4, heads=2, head_dim=3, norm=norm())
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_()
    assert sorted(block.state_dict()) == sorted(
        [f"norm.{key}" for key in norm_keys]
        + ["attention.to_qkv.weight", "attention.to_out.weight", "attention.to_out.bias"]
    )
    x = torch.randn(2, 4, 2, 3, 2)
    expected = x + reference_attention(block.attention, reference_norm(block.norm, x))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_models_use_the_residual_block_for_every_voxel_attention():
    vqvae = VQModel3D(block_out_channels=(4,), latent_channels=2, num_vq_embeddings=4, norm_num_groups=2, patch_size=4)
    unet = BiFlowNet3DModel(**TINY_BIFLOWNET)
    assert isinstance(vqvae.encoder.mid_block.attention, ResidualVolumeAttention)
    assert isinstance(vqvae.encoder.mid_block.attention.norm, nn.GroupNorm)
    assert isinstance(unet.mid_attention.norm, ChannelLayerNorm)
    assert isinstance(unet.down_blocks[2].attentions[0], ResidualVolumeAttention)
    assert "mid_attention.attention.to_qkv.weight" in unet.state_dict()
    assert "encoder.mid_block.attention.attention.to_qkv.weight" in vqvae.state_dict()


def test_one_processor_reaches_voxel_and_token_attention_and_sdpa_restores_the_output():
    torch.manual_seed(0)
    model = BiFlowNet3DModel(**TINY_BIFLOWNET).eval()
    sample, timestep, labels = torch.randn(1, 2, 8, 8, 8), torch.tensor([10]), torch.tensor([1])
    with torch.no_grad():
        before = model(sample, timestep, labels).sample

    names = model.attn_processors
    voxel = [n for n in names if "attentions" in n or n.startswith("mid_attention")]
    token = [n for n in names if n.startswith("dit_")]
    # The deepest level has attention after both resnets, down and up, plus the middle block; every DiT block too.
    assert len(voxel) == 5 and len(token) == len(model.dit_input_stages) + len(model.dit_mid_blocks) + len(
        model.dit_output_stages
    )
    assert set(names) == set(voxel) | set(token)

    calls = []

    class RecordingProcessor(VolumeAttnProcessor):
        def __call__(self, attn, query, key, value):
            calls.append((type(attn).__name__, tuple(query.shape)))
            return torch.zeros_like(query)

    model.set_attn_processor(RecordingProcessor())
    with torch.no_grad():
        silenced = model(sample, timestep, labels).sample
    kinds = {kind for kind, _ in calls}
    assert kinds == {"VolumeAttention", "TokenAttention"} and len(calls) == len(names)
    assert ("TokenAttention", (1, 2, 512, 3)) in calls  # one 8^3 sub-volume, 2 heads of width 6 / 2
    assert not torch.allclose(silenced, before)

    model.set_attn_processor(dict(names))  # the model's own processors again: the same output, bit for bit
    with torch.no_grad():
        after = model(sample, timestep, labels).sample
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    # Plain SDPA everywhere (the DiT default pads the head width for speed): equal up to float32 rounding.
    model.set_attn_processor({name: VolumeAttnProcessor() for name in names})
    with torch.no_grad():
        plain = model(sample, timestep, labels).sample
    torch.testing.assert_close(plain, before, atol=1e-5, rtol=0)


def test_switching_xformers_off_returns_each_layer_to_its_own_default_processor():
    model = BiFlowNet3DModel(**TINY_BIFLOWNET).eval()
    defaults = {name: type(processor) for name, processor in model.attn_processors.items()}
    assert set(defaults.values()) == {VolumeAttnProcessor, PaddedHeadAttnProcessor}
    model.disable_xformers_memory_efficient_attention()
    assert {name: type(processor) for name, processor in model.attn_processors.items()} == defaults
