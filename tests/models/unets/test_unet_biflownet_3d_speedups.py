"""BiFlowNet's CPU fast paths equal the plain computations they replace."""

import pytest
import torch
import torch.nn.functional as F

from meddiffusers.models.attention import PaddedHeadAttnProcessor, TokenAttention, VolumeAttnProcessor
from meddiffusers.models.resnet import ConditionedResnetBlock3D
from meddiffusers.models.unets.biflownet import dit_3d
from meddiffusers.models.unets.biflownet.dit_3d import DiTBlock3D, DiTOutputLayer3D


def plain_conv(conv, hidden):
    return F.conv3d(hidden, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


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


def test_conditioned_resnet_block_in_place_inference_equals_the_autograd_path_and_keeps_its_input():
    torch.manual_seed(0)
    block = randomise(ConditionedResnetBlock3D(4, 4, 8, 2)).eval()
    hidden, condition = torch.randn(1, 4, 6, 5, 7), torch.randn(1, 8)
    kept = hidden.clone()
    with torch.no_grad():
        inference = block(hidden, condition)
    assert torch.equal(hidden, kept)
    tracked = block(hidden.requires_grad_(), condition)
    tracked.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    torch.testing.assert_close(inference, tracked.detach(), atol=1e-5, rtol=1e-5)


def test_dit_inference_runs_groups_of_sub_volumes_with_the_same_result(monkeypatch):
    torch.manual_seed(0)
    block = randomise(DiTBlock3D(12, 2, 2.0, 16, with_skip=True)).eval()
    output = randomise(DiTOutputLayer3D(12, 1, 12, 16)).eval()
    tokens, skip, condition = torch.randn(5, 10, 12), torch.randn(5, 10, 12), torch.randn(5, 16)
    with torch.no_grad():
        whole_block, whole_output = block(tokens, condition, skip), output(tokens, condition)
    calls = []
    block.attention.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    monkeypatch.setattr(dit_3d, "INFERENCE_TOKENS_PER_GROUP", 20)  # two sub-volumes of 10 tokens per group
    with torch.no_grad():
        grouped_block, grouped_output = block(tokens, condition, skip), output(tokens, condition)
    assert calls == [2, 2, 1]
    torch.testing.assert_close(grouped_block, whole_block, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grouped_output, whole_output, atol=1e-6, rtol=1e-6)
    # With autograd the sub-volumes stay together (one call) and gradients reach the inputs.
    calls.clear()
    tracked = block(tokens.requires_grad_(), condition, skip)
    tracked.sum().backward()
    assert calls == [5] and tokens.grad is not None
    torch.testing.assert_close(tracked.detach(), whole_block, atol=1e-6, rtol=1e-6)
