"""Volume geometry helpers: where padding goes and with what value, cropping undoes padding, resampling sizes."""

import pytest
import torch

from meddiffusers.utils import (
    center_crop_or_pad,
    crop_to_size,
    pad_to_multiple,
    pad_to_size,
    resample_to_spacing,
    size_for_spacing,
)
from meddiffusers.utils.volume_tiling import pad_to_multiple as pad_to_multiple_from_tiling


def ramp(*shape):
    return torch.arange(float(torch.Size(shape).numel())).reshape(shape)


def test_pad_to_multiple_pads_the_end_of_each_axis_with_the_value():
    volume = ramp(1, 1, 5, 8, 3)
    padded = pad_to_multiple(volume, (4, 4, 2), value=-1.0)
    assert padded.shape == (1, 1, 8, 8, 4)
    assert torch.equal(padded[..., :5, :, :3], volume)
    assert torch.equal(padded[..., 5:, :, :], torch.full((1, 1, 3, 8, 4), -1.0))
    assert torch.equal(padded[..., :, :, 3:], torch.full((1, 1, 8, 8, 1), -1.0))
    assert pad_to_multiple(volume, 1) is volume  # nothing to pad
    assert pad_to_multiple_from_tiling is pad_to_multiple  # the old import path still works


def test_pad_to_multiple_accepts_unbatched_volumes_and_an_int_multiple():
    volume = ramp(2, 3, 4, 5)  # (C, D, H, W)
    padded = pad_to_multiple(volume, 4, value=7.0)
    assert padded.shape == (2, 4, 4, 8)
    assert torch.equal(padded[:, :3, :, :5], volume)
    assert padded[:, 3].eq(7).all() and padded[..., 5:].eq(7).all()


def test_pad_to_size_only_grows_short_axes():
    volume = ramp(1, 6, 2, 9)
    padded = pad_to_size(volume, (4, 5, 9), value=0.5)
    assert padded.shape == (1, 6, 5, 9)  # D already longer: kept
    assert torch.equal(padded[:, :, :2], volume)
    assert padded[:, :, 2:].eq(0.5).all()


def test_crop_to_size_is_the_inverse_of_padding():
    volume = ramp(2, 1, 13, 16, 9)
    assert torch.equal(crop_to_size(pad_to_multiple(volume, 8), volume.shape[2:]), volume)
    assert torch.equal(crop_to_size(pad_to_size(volume, 20), (13, 16, 9)), volume)
    with pytest.raises(ValueError, match=r"`size` \(14, 16, 9\) is larger than the volume's"):
        crop_to_size(volume, (14, 16, 9))


def test_center_crop_or_pad_places_the_volume_in_the_middle():
    volume = ramp(1, 4, 5, 6)
    out = center_crop_or_pad(volume, (8, 3, 6), value=-1.0)
    assert out.shape == (1, 8, 3, 6)
    # D: 4 -> 8 pads 2 before and 2 after; H: 5 -> 3 crops 1 from each side; W unchanged.
    assert torch.equal(out[:, 2:6], volume[:, :, 1:4])
    assert out[:, :2].eq(-1).all() and out[:, 6:].eq(-1).all()


def test_center_crop_or_pad_puts_the_odd_voxel_at_the_end_and_round_trips():
    volume = ramp(1, 1, 3, 4, 4)
    padded = center_crop_or_pad(volume, (6, 4, 4), value=-1.0)
    assert torch.equal(padded[0, 0, :, 0, 0], torch.tensor([-1.0, 0.0, 16.0, 32.0, -1.0, -1.0]))
    assert torch.equal(padded[0, 0, 1:4], volume[0, 0])  # 1 before, 2 after
    assert torch.equal(center_crop_or_pad(padded, (3, 4, 4)), volume)
    cropped = center_crop_or_pad(ramp(1, 7, 2, 2), (4, 2, 2))
    assert torch.equal(cropped, ramp(1, 7, 2, 2)[:, 1:5])  # (7 - 4) // 2 = 1 voxel removed before, 2 after


def test_training_keeps_the_shared_center_crop_or_pad():
    from meddiffusers.training.latents import center_crop_or_pad as from_training

    assert from_training is center_crop_or_pad


@pytest.mark.parametrize("mode", ["trilinear", "nearest", "area"])
def test_resampling_a_constant_volume_keeps_it_constant(mode):
    volume = torch.full((1, 1, 10, 12, 8), 0.25)
    out = resample_to_spacing(volume, (2.0, 1.0, 1.5), (1.0, 1.5, 3.0), mode=mode)
    assert out.shape == (1, 1, 20, 8, 4)  # size * spacing / target spacing
    torch.testing.assert_close(out, torch.full_like(out, 0.25), atol=1e-6, rtol=0)


def test_resampling_sizes_come_from_the_spacing_ratio():
    assert size_for_spacing((10, 12, 8), (2.0, 1.0, 1.5), (1.0, 1.5, 3.0)) == (20, 8, 4)
    assert size_for_spacing((5, 5, 5), (1.0, 1.0, 1.0), (0.7, 3.0, 100.0)) == (7, 2, 1)  # rounded, at least 1
    volume = ramp(2, 6, 6, 6)  # (C, D, H, W)
    out = resample_to_spacing(volume, (1, 1, 1), (2, 3, 1))
    assert out.shape == (2, 3, 2, 6)
    assert resample_to_spacing(volume, (1, 1, 1), (1, 1, 1)) is volume


def test_resampling_halves_by_averaging_neighbours():
    volume = torch.tensor([0.0, 2.0, 4.0, 6.0]).reshape(1, 1, 4, 1, 1).expand(1, 1, 4, 2, 2)
    out = resample_to_spacing(volume, (1.0, 1.0, 1.0), (2.0, 1.0, 1.0))
    assert torch.equal(out[0, 0, :, 0, 0], torch.tensor([1.0, 5.0]))


def test_label_maps_are_resampled_with_nearest_and_keep_their_dtype():
    labels = torch.tensor([0, 1, 2, 3]).reshape(4, 1, 1).repeat(1, 2, 2)  # (D, H, W) integers
    out = resample_to_spacing(labels, (1.0, 1.0, 1.0), (0.5, 1.0, 1.0), mode="nearest")
    assert out.dtype == torch.int64
    assert torch.equal(out[:, 0, 0], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    with pytest.raises(ValueError, match="integer volume .* needs mode 'nearest'"):
        resample_to_spacing(labels, (1.0, 1.0, 1.0), (0.5, 1.0, 1.0))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: pad_to_multiple(torch.rand(4, 4), 2), r"last three axes are \(D, H, W\), got \(4, 4\)"),
        (lambda: pad_to_multiple(torch.rand(4, 4, 4), 0), "`multiple` must be a positive int"),
        (lambda: center_crop_or_pad(torch.rand(4, 4, 4), (4, 4)), "`size` must be a positive int"),
        (lambda: resample_to_spacing(torch.rand(4, 4, 4), (1, 1), (1, 1, 1)), "`spacing` must be three positive"),
        (lambda: resample_to_spacing(torch.rand(4, 4, 4), (1, 1, 1), (1, 0, 1)), "`target_spacing` must be three"),
        (lambda: resample_to_spacing(torch.rand(4, 4, 4), (1, 1, 1), (2, 2, 2), mode="cubic"), "`mode` must be one"),
    ],
)
def test_bad_arguments_get_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
