"""The CPU inference helpers equal the plain PyTorch computations they replace."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meddiffusers.models import cpu_inference
from meddiffusers.models.cpu_inference import (
    channel_statistics,
    inference_conv3d,
    inference_conv_transpose3d,
    inference_group_norm,
    is_channels_last,
    is_doubling_transpose,
)

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def plain_conv(conv, hidden):
    return F.conv3d(hidden, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def randomise(module, scale=0.3):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * scale)
    return module


def float64_group_norm(hidden, norm, weight=None, bias=None):
    if weight is None:
        return F.group_norm(hidden.double(), norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps)
    normed = F.group_norm(hidden.double(), norm.num_groups, eps=norm.eps)
    return normed * weight.double()[..., None, None, None] + bias.double()[..., None, None, None]


@needs_onednn
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(6, 5, 4), (33, 20, 17)])
def test_inference_conv3d_answers_channels_last_and_matches_the_plain_convolution(batch, size):
    torch.manual_seed(0)
    conv = nn.Conv3d(12, 10, kernel_size=3, padding=1)
    hidden = torch.randn(batch, 12, *size)
    with torch.no_grad():
        fast = inference_conv3d(conv, hidden)
        again = inference_conv3d(conv, hidden.contiguous(memory_format=torch.channels_last_3d))
        expected = plain_conv(conv, hidden)
    assert is_channels_last(fast)
    assert torch.equal(again, fast)  # a channels-last input is taken as it is
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_inference_conv3d_takes_one_channel_inputs_and_explicit_padding():
    torch.manual_seed(0)
    conv = nn.Conv3d(1, 8, kernel_size=3, padding=1, stride=2)
    image = torch.randn(1, 1, 9, 8, 7)
    with torch.no_grad():
        out = inference_conv3d(conv, image)
        unpadded = inference_conv3d(conv, image, padding=(0, 1, 0))
    assert is_channels_last(out)
    torch.testing.assert_close(out, plain_conv(conv, image), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unpadded, F.conv3d(image, conv.weight, conv.bias, 2, (0, 1, 0)), atol=1e-5, rtol=1e-5)


def test_inference_conv3d_keeps_the_plain_convolution_elsewhere():
    torch.manual_seed(0)
    conv = nn.Conv3d(6, 4, kernel_size=3, padding=1)
    tiny = torch.randn(2, 6, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(inference_conv3d(conv, tiny), conv(tiny))  # up to 4³ voxels the generic path is faster
        assert torch.equal(inference_conv3d(conv.double(), tiny.double()), conv(tiny.double()))
    conv.float()
    # With gradients, the autograd-aware module call is used and gradients flow.
    hidden = torch.randn(1, 6, 8, 8, 8, requires_grad=True)
    (inference_conv3d(conv, hidden) ** 2).sum().backward()
    expected = torch.autograd.grad((plain_conv(conv, hidden) ** 2).sum(), hidden)[0]
    torch.testing.assert_close(hidden.grad, expected)
    assert conv.weight.grad is not None


def test_inference_conv3d_follows_cpu_autocast():
    torch.manual_seed(0)
    conv = nn.Conv3d(6, 4, kernel_size=3, padding=1)
    hidden = torch.randn(1, 6, 8, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = inference_conv3d(conv, hidden), conv(hidden)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


@needs_onednn
@pytest.mark.parametrize(
    ("batch", "channels", "size"), [(1, 5, (6, 7, 5)), (2, 3, (9, 4, 11)), (1, 1, (5, 5, 5)), (1, 4, (1, 3, 2))]
)
def test_doubling_transpose_as_one_convolution_equals_conv_transpose3d(batch, channels, size):
    torch.manual_seed(0)
    conv = nn.ConvTranspose3d(channels, 6, kernel_size=4, stride=2, padding=1)
    hidden = torch.randn(batch, channels, *size)
    assert is_doubling_transpose(conv)
    with torch.no_grad():
        out = inference_conv_transpose3d(conv, hidden)
        expected = conv(hidden)
    assert out.shape == expected.shape == (batch, 6, *(2 * s for s in size))
    if size[0] * size[1] * size[2] > cpu_inference.GENERIC_CONV_MAX_VOXELS:
        assert is_channels_last(out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_other_transposed_convolutions_use_the_module():
    torch.manual_seed(0)
    conv = nn.ConvTranspose3d(4, 3, kernel_size=3, stride=2, padding=1, output_padding=1)
    hidden = torch.randn(1, 4, 6, 6, 6)
    assert not is_doubling_transpose(conv)
    with torch.no_grad():
        assert torch.equal(inference_conv_transpose3d(conv, hidden), conv(hidden))


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_channel_statistics_are_exact_for_a_large_mean(layout, monkeypatch):
    monkeypatch.setattr(cpu_inference, "STATISTICS_BLOCK_ROWS", 1000)  # several blocks and a ragged last one
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 17, 13, 11) * 0.01 + 50 + torch.randn(2, 3, 1, 1, 1)
    if layout == "channels_last":
        hidden = hidden.contiguous(memory_format=torch.channels_last_3d)
    mean, variance = channel_statistics(hidden)
    reference = hidden.double().flatten(2)
    assert mean.dtype == variance.dtype == torch.float64
    torch.testing.assert_close(mean, reference.mean(-1), atol=5e-6, rtol=0)
    torch.testing.assert_close(variance, reference.var(-1, correction=0), atol=1e-9, rtol=1e-4)


@pytest.mark.parametrize("mean", [0.0, 30.0])
def test_inference_group_norm_is_exact_for_channels_last_maps(mean):
    # PyTorch's channels-last CPU GroupNorm alone is off by about 2e-2 here at mean 30 (float32 E[x²] - E[x]²).
    torch.manual_seed(0)
    norm = randomise(nn.GroupNorm(6, 24))
    hidden = torch.randn(2, 24, 20, 20, 20) * 0.5 + mean + torch.randn(2, 24, 1, 1, 1)
    expected = float64_group_norm(hidden, norm).float()
    channels_last = hidden.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        out = inference_group_norm(channels_last, norm)
        plain = inference_group_norm(hidden, norm)
    assert is_channels_last(out)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)
    assert torch.equal(plain, norm(hidden))  # other layouts: PyTorch's GroupNorm
    assert torch.equal(channels_last, hidden)  # not in place unless asked
    with torch.no_grad():
        inplace = inference_group_norm(channels_last, norm, inplace=True)
    assert inplace.data_ptr() == channels_last.data_ptr()
    torch.testing.assert_close(inplace, expected, atol=2e-5, rtol=0)


def test_inference_group_norm_is_exact_for_groups_of_millions_of_voxels():
    torch.manual_seed(0)
    norm = randomise(nn.GroupNorm(1, 2))
    hidden = (torch.randn(1, 2, 112, 112, 112) + 8).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        out = inference_group_norm(hidden, norm)
    torch.testing.assert_close(out, float64_group_norm(hidden, norm).float(), atol=2e-5, rtol=0)


def test_inference_group_norm_with_a_per_sample_affine():
    torch.manual_seed(0)
    norm = nn.GroupNorm(2, 8)
    hidden = torch.randn(3, 8, 9, 7, 5) + 10
    weight, bias = torch.randn(3, 8), torch.randn(3, 8)
    expected = float64_group_norm(hidden, norm, weight, bias).float()
    with torch.no_grad():
        fast = inference_group_norm(hidden.contiguous(memory_format=torch.channels_last_3d), norm, weight, bias)
        plain = inference_group_norm(hidden, norm, weight, bias)
    torch.testing.assert_close(fast, expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(plain, expected, atol=2e-5, rtol=0)


def test_inference_group_norm_keeps_autograd_and_other_dtypes():
    torch.manual_seed(0)
    norm = randomise(nn.GroupNorm(2, 4))
    hidden = torch.randn(1, 4, 6, 6, 6).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    out = inference_group_norm(hidden, norm)
    out.square().sum().backward()
    assert hidden.grad is not None and norm.weight.grad is not None
    torch.testing.assert_close(out, float64_group_norm(hidden.detach(), norm).float(), atol=1e-5, rtol=0)
    double = hidden.detach().double().contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        assert inference_group_norm(double, norm.double()).dtype == torch.float64
