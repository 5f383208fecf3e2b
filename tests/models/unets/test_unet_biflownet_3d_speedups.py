"""BiFlowNet's CPU fast paths equal the plain computations they replace."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meddiffusers.models.attention import PaddedHeadAttnProcessor, TokenAttention, VolumeAttnProcessor
from meddiffusers.models.resnet import ConditionedResnetBlock3D, inference_conv3d, owned_group_norm
from meddiffusers.models.unets.biflownet.dit_3d import DiTBlock3D

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def plain_conv(conv, hidden):
    return F.conv3d(hidden, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@needs_onednn
@pytest.mark.parametrize("batch", [1, 3])
def test_inference_conv3d_runs_onednn_channels_last_and_matches_the_generic_path(batch):
    torch.manual_seed(0)
    conv = nn.Conv3d(12, 10, kernel_size=3, padding=1)
    hidden = torch.randn(batch, 12, 6, 5, 4)
    with torch.no_grad():
        fast = inference_conv3d(conv, hidden)
        again = inference_conv3d(conv, hidden.contiguous(memory_format=torch.channels_last_3d))
        generic = plain_conv(conv, hidden)
    assert fast.is_contiguous(memory_format=torch.channels_last_3d) and not fast.is_contiguous()
    assert torch.equal(again, fast)  # a channels-last input is taken as it is
    torch.testing.assert_close(fast, generic, atol=1e-5, rtol=1e-5)
    # Above 32³ voxels the map goes back to NCDHW (where GroupNorm is exact), still through oneDNN.
    large = torch.randn(batch, 12, 33, 32, 32).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        out = inference_conv3d(conv, large)
    assert out.is_contiguous()
    torch.testing.assert_close(out, plain_conv(conv, large), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mean", [0.0, 30.0])
def test_owned_group_norm_is_exact_for_channels_last_groups_with_a_large_mean(mean):
    # PyTorch's channels-last CPU GroupNorm alone is off by about 2e-2 here at mean 30 (float32 E[x²] - E[x]²).
    torch.manual_seed(0)
    norm = randomise(nn.GroupNorm(6, 24))
    hidden = torch.randn(1, 24, 20, 20, 20) * 0.5 + mean + torch.randn(1, 24, 1, 1, 1)
    expected = F.group_norm(hidden.double(), 6, norm.weight.double(), norm.bias.double(), norm.eps).float()
    with torch.no_grad():
        out = owned_group_norm(hidden.contiguous(memory_format=torch.channels_last_3d), norm)
        plain = owned_group_norm(hidden.clone(), norm)
    # With autograd on (frozen weights, an input that needs no grad) the input is centred too.
    bare = owned_group_norm(hidden.contiguous(memory_format=torch.channels_last_3d), norm, affine=False)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(bare, F.group_norm(hidden.double(), 6, eps=norm.eps).float(), atol=2e-5, rtol=0)
    assert torch.equal(plain, norm(hidden))  # other layouts: the plain GroupNorm, input untouched


def test_inference_conv3d_keeps_the_plain_convolution_elsewhere():
    torch.manual_seed(0)
    conv = nn.Conv3d(6, 4, kernel_size=3, padding=1)
    tiny, batched = torch.randn(1, 6, 4, 4, 4), torch.randn(2, 6, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(inference_conv3d(conv, tiny), conv(tiny))  # up to 4³ voxels the generic path is faster
        assert torch.equal(inference_conv3d(conv, batched), conv(batched))
    # With gradients, the autograd-aware module call is used and gradients flow.
    hidden = torch.randn(1, 6, 4, 4, 4, requires_grad=True)
    (inference_conv3d(conv, hidden) ** 2).sum().backward()
    expected = torch.autograd.grad((plain_conv(conv, hidden) ** 2).sum(), hidden)[0]
    torch.testing.assert_close(hidden.grad, expected)


def test_padded_head_processor_equals_plain_sdpa():
    torch.manual_seed(0)
    query, key, value = (torch.randn(3, 2, 20, 9) for _ in range(3))
    padded = PaddedHeadAttnProcessor()(None, query, key, value)
    assert padded.shape == (3, 2, 20, 9)
    torch.testing.assert_close(padded, F.scaled_dot_product_attention(query, key, value), atol=1e-6, rtol=1e-6)
    # Head dims that are already multiples of 16 go straight through.
    query, key, value = (torch.randn(1, 2, 5, 16) for _ in range(3))
    assert torch.equal(
        PaddedHeadAttnProcessor()(None, query, key, value), F.scaled_dot_product_attention(query, key, value)
    )


def test_token_attention_defaults_to_padding_and_matches_the_plain_processor():
    torch.manual_seed(0)
    attention = TokenAttention(18, 2)
    assert isinstance(attention.get_processor(), PaddedHeadAttnProcessor)
    tokens = torch.randn(2, 7, 18)
    with torch.no_grad():
        padded = attention(tokens)
        attention.set_processor(VolumeAttnProcessor())
        plain = attention(tokens)
    torch.testing.assert_close(padded, plain, atol=1e-6, rtol=1e-6)


def randomise(module):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    return module


@pytest.mark.parametrize("mean", [0.0, 20.0])
@pytest.mark.parametrize("cond_dim", [8, None])
def test_conditioned_resnet_block_equals_step_by_step_film(cond_dim, mean):
    torch.manual_seed(0)
    block = randomise(ConditionedResnetBlock3D(6, 4, cond_dim, 2)).eval()
    hidden, condition = torch.randn(2, 6, 5, 6, 4) + mean, torch.randn(2, 8)
    with torch.no_grad():
        out = block(hidden, condition if cond_dim else None)
        expected = block.norm1(plain_conv(block.conv1, hidden))
        if cond_dim:
            scale, shift = block.time_emb_proj(F.silu(condition)).chunk(2, dim=1)
            expected = expected * (scale[..., None, None, None] + 1) + shift[..., None, None, None]
        expected = F.silu(block.norm2(plain_conv(block.conv2, F.silu(expected))))
        expected = expected + block.conv_shortcut(hidden)
        single = block(hidden[:1], condition[:1] if cond_dim else None)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, expected[:1], atol=1e-5, rtol=1e-5)


def test_dit_block_equals_unfused_adaln_computation():
    torch.manual_seed(0)
    block = randomise(DiTBlock3D(12, 2, 2.0, 16, with_skip=True)).eval()
    tokens, skip, condition = torch.randn(3, 10, 12), torch.randn(3, 10, 12), torch.randn(3, 16)
    with torch.no_grad():
        out = block(tokens, condition, skip)
        x = block.skip_proj(torch.cat([tokens, skip], dim=-1))
        mods = [m[:, None] for m in block.adaln.linear(F.silu(condition)).chunk(6, dim=1)]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        block.attention.set_processor(VolumeAttnProcessor())
        x = x + gate_msa * block.attention(block.norm1(x) * (1 + scale_msa) + shift_msa)
        expected = x + gate_mlp * block.ff(block.norm2(x) * (1 + scale_mlp) + shift_mlp)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_inference_conv3d_follows_cpu_autocast():
    torch.manual_seed(0)
    conv = nn.Conv3d(6, 4, kernel_size=3, padding=1)
    hidden = torch.randn(1, 6, 4, 4, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = inference_conv3d(conv, hidden), conv(hidden)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
