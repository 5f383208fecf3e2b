"""VolumeAttention: SDPA by default, swappable processors, and diffusers' xformers switch."""

import pytest
import torch

from meddiffusers import BiFlowNet3DModel, VolumeAttention, VolumeAttnProcessor, VQModel3D


def reference_attention(attn, hidden_states):
    """Plain softmax attention with the documented layout (heads are the outer factor of the features)."""
    batch, channels, *spatial = hidden_states.shape
    tokens = hidden_states.flatten(2).transpose(1, 2)
    q, k, v = attn.to_qkv(tokens).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, -1, attn.heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    weights = (q @ k.transpose(-1, -2) * attn.head_dim**-0.5).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, -1, attn.heads * attn.head_dim)
    return attn.to_out(out.transpose(1, 2).reshape(batch, -1, *spatial))


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
        lambda: BiFlowNet3DModel(
            in_channels=2,
            base_channels=6,
            channel_mults=(1, 1, 2),
            attention_levels=(0, 0, 1),
            num_class_embeds=2,
            attention_heads=2,
            norm_num_groups=2,
            dit_num_heads=2,
        ),
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
