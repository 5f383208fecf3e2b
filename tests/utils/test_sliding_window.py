"""sliding_window_inference: pointwise predictors are reproduced exactly, weights sum to one, windows are where the
predictor is told they are, and bad arguments get clear errors."""

import pytest
import torch
import torch.nn.functional as F

from meddiffusers.utils import sliding_window_inference, window_locations, window_starts, window_weights

MODES = ["constant", "gaussian"]
POINTWISE = {"identity": lambda x: x, "affine": lambda x: x * 2 + 1, "tanh": torch.tanh}


def volume(*spatial, batch=2, channels=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, *spatial, generator=generator) * 2 - 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("predictor", POINTWISE.values(), ids=POINTWISE.keys())
def test_pointwise_predictors_give_the_untiled_result(mode, predictor):
    inputs = volume(13, 20, 17)
    output = sliding_window_inference(inputs, (6, 8, 5), predictor, overlap=0.25, mode=mode)
    torch.testing.assert_close(output, predictor(inputs), atol=1e-6, rtol=0)


def test_side_by_side_constant_windows_are_exact():
    inputs = volume(8, 12, 16)
    output = sliding_window_inference(inputs, 4, lambda x: x * 3, overlap=0.0, mode="constant")
    assert torch.equal(output, inputs * 3)


@pytest.mark.parametrize("mode", MODES)
def test_output_scale_matches_upsampling_the_whole_volume(mode):
    inputs = volume(6, 10, 7, channels=1)

    def upsample_to_three_channels(x):
        return F.interpolate(x, scale_factor=(2, 4, 4), mode="nearest").repeat(1, 3, 1, 1, 1)

    output = sliding_window_inference(
        inputs, (4, 4, 4), upsample_to_three_channels, overlap=0.5, mode=mode, output_scale=(2, 4, 4)
    )
    assert output.shape == (2, 3, 12, 40, 28)
    torch.testing.assert_close(output, upsample_to_three_channels(inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("last_window", ["flush", "truncate"])
def test_weights_sum_to_one_at_every_voxel(mode, last_window):
    inputs = volume(11, 9, 14, batch=1, channels=1)

    def ones(x):
        return torch.ones(x.shape[0], 1, *(2 * side for side in x.shape[2:]))

    output = sliding_window_inference(inputs, 5, ones, overlap=0.4, mode=mode, output_scale=2, last_window=last_window)
    torch.testing.assert_close(output, torch.ones(1, 1, 22, 18, 28), atol=1e-6, rtol=0)


def test_gaussian_blend_favours_the_window_whose_centre_is_closer():
    # Two windows of 8 on an axis of 12 (starts 0 and 4); each predicts its own start offset everywhere.
    inputs = torch.zeros(1, 1, 1, 1, 12)

    def start_offset(windows, locations):
        return torch.stack([torch.full_like(w, float(loc[4].start)) for w, loc in zip(windows, locations)])

    out = sliding_window_inference(inputs, 8, start_offset, overlap=0.5, mode="gaussian", with_coordinates=True)
    constant = sliding_window_inference(inputs, 8, start_offset, overlap=0.5, with_coordinates=True)
    weights = window_weights((1, 1, 8), "gaussian")[0, 0]
    # Voxel 5 is position 5 of the first window and position 1 of the second.
    expected = (weights[5] * 0 + weights[1] * 4) / (weights[5] + weights[1])
    torch.testing.assert_close(out[0, 0, 0, 0, 5], expected)
    assert out[0, 0, 0, 0, 5] < 2 < out[0, 0, 0, 0, 6]  # nearer the first window's centre, then the second's
    torch.testing.assert_close(constant[0, 0, 0, 0, 4:8], torch.full((4,), 2.0))  # plain average in the overlap
    assert torch.equal(out[0, 0, 0, 0, :4], torch.zeros(4)) and torch.equal(out[0, 0, 0, 0, 8:], torch.full((4,), 4.0))


def test_gaussian_weights_are_separable_and_clamped_away_from_zero():
    weights = window_weights((4, 6, 32), "gaussian", sigma_scale=0.125)

    def profile(side):  # sigma = 0.125 * side, centred between the two middle voxels for even sides
        return torch.exp(-0.5 * ((torch.arange(side) - (side - 1) / 2) / (0.125 * side)) ** 2)

    expected = profile(4)[:, None, None] * profile(6)[None, :, None] * profile(32)[None, None, :]
    torch.testing.assert_close(weights, expected.clamp(min=1e-3), atol=1e-6, rtol=1e-5)
    assert weights.min() == pytest.approx(1e-3)
    assert torch.equal(window_weights(3, "constant"), torch.ones(3, 3, 3))


def test_coordinates_passed_to_the_predictor_match_the_window_contents():
    inputs = volume(10, 7, 9, batch=2, channels=1)
    seen = []

    def check(windows, locations):
        assert len(locations) == windows.shape[0]
        for window, location in zip(windows, locations):
            assert torch.equal(window[None], inputs[location])
            seen.append((location[0].start, *(s.start for s in location[2:])))
        return windows

    output = sliding_window_inference(inputs, (4, 7, 6), check, overlap=0.25, batch_size=3, with_coordinates=True)
    assert torch.equal(output, inputs)
    # D: starts 0, 3, 6 (flush); H: one window (7 = the side); W: 0, 3 (flush).
    assert seen == [(b, d, 0, w) for b in (0, 1) for d in (0, 3, 6) for w in (0, 3)]


@pytest.mark.parametrize("batch_size", [2, 5, 64])
def test_batch_size_does_not_change_the_result(batch_size):
    inputs = volume(12, 12, 12)
    calls = []

    def shifted_tanh(x):
        calls.append(x.shape[0])
        return torch.tanh(x + x.mean(dim=(2, 3, 4), keepdim=True))  # depends on the window, not only the voxel

    one = sliding_window_inference(inputs, 6, shifted_tanh, overlap=0.5, mode="gaussian", batch_size=1)
    assert set(calls) == {1} and len(calls) == 2 * 27
    calls.clear()
    many = sliding_window_inference(inputs, 6, shifted_tanh, overlap=0.5, mode="gaussian", batch_size=batch_size)
    assert max(calls) == min(batch_size, 54) and sum(calls) == 54
    torch.testing.assert_close(one, many, atol=1e-6, rtol=0)


def test_windows_larger_than_the_volume_are_clipped_to_one_window():
    inputs = volume(5, 6, 7)
    calls = []

    def record(x):
        calls.append(tuple(x.shape[2:]))
        return x - 1

    output = sliding_window_inference(inputs, 64, record, overlap=0.25, mode="gaussian")
    assert calls == [(5, 6, 7), (5, 6, 7)]  # one window per batch item
    torch.testing.assert_close(output, inputs - 1, atol=1e-6, rtol=0)


def test_a_single_window_returns_the_predictor_output():
    inputs = volume(4, 4, 4, batch=1)
    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 3, 3, padding=1)
    with torch.no_grad():
        output = sliding_window_inference(inputs, 4, net, mode="gaussian")
        torch.testing.assert_close(output, net(inputs), atol=1e-6, rtol=0)


def test_window_starts_cover_the_axis_with_the_requested_overlap():
    assert window_starts(16, 8, 0.25) == [0, 6, 8]  # 2 shared voxels at least, the last flush with the end
    assert window_starts(12, 6, 2 / 6) == [0, 4, 6]  # exactly 2 voxels despite float rounding
    assert window_starts(12, 8, 0.0) == [0, 4]
    assert window_starts(12, 8, 0.0, last_window="truncate") == [0, 8]
    assert window_starts(5, 8, 0.5) == [0]
    assert window_locations((12, 4, 4), 8, 0.0, last_window="truncate") == [
        (slice(0, 8), slice(0, 4), slice(0, 4)),
        (slice(8, 12), slice(0, 4), slice(0, 4)),
    ]


def test_truncated_side_by_side_windows_are_decoded_independently():
    inputs = volume(12, 4, 4, batch=1, channels=1)
    sizes = []

    def window_mean(x):
        sizes.append(x.shape[2])
        return x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x)

    output = sliding_window_inference(inputs, 8, window_mean, overlap=0.0, last_window="truncate", batch_size=4)
    assert sizes == [8, 4]  # windows of different sizes go to separate calls
    assert torch.equal(output[..., :8, :, :], inputs[..., :8, :, :].mean().expand(1, 1, 8, 4, 4))
    assert torch.equal(output[..., 8:, :, :], inputs[..., 8:, :, :].mean().expand(1, 1, 4, 4, 4))


def test_output_device_and_dtype_follow_the_arguments():
    inputs = volume(6, 6, 6).double()
    output = sliding_window_inference(inputs, 4, lambda x: x.half(), device="cpu")
    assert output.dtype == torch.float16 and output.device.type == "cpu"
    torch.testing.assert_close(output, inputs.half())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(inputs=torch.rand(1, 4, 4, 4)), r"`inputs` must be a \(B, C, D, H, W\) tensor, got \(1, 4, 4, 4\)"),
        (dict(inputs=torch.rand(1, 1, 0, 4, 4)), "`inputs` is empty"),
        (dict(window_size=0), "`window_size` must be a positive int"),
        (dict(window_size=(4, 4)), "`window_size` must be a positive int"),
        (dict(overlap=1.0), r"`overlap` must be .* in \[0, 1\).*got 1.0"),
        (dict(overlap=-0.1), r"`overlap` must be"),
        (dict(mode="linear"), r"`mode` must be one of \('constant', 'gaussian'\), got 'linear'"),
        (dict(mode="gaussian", sigma_scale=0), r"`sigma_scale` must be .* > 0"),
        (dict(batch_size=0), "`batch_size` must be a positive int"),
        (dict(output_scale=0), "`output_scale` must be a positive int"),
        (dict(predictor="net"), "`predictor` must be callable"),
        (dict(last_window="pad"), r"`last_window` must be one of \('flush', 'truncate'\)"),
        (dict(predictor=lambda x: x[:, :, :2]), r"expected batch and spatial sizes \(1, 4, 4, 4\).*\(1, 1, 2, 4, 4\)"),
        (dict(predictor=lambda x: x, output_scale=2), r"Set `output_scale`"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, message):
    arguments = dict(inputs=torch.rand(1, 1, 8, 8, 8), window_size=4, predictor=lambda x: x)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sliding_window_inference(**arguments)
