"""Intensity conventions: parsing, the mapping to [-1, 1], and what is recorded."""

import pytest
import torch

from meddiffusers.evaluation import IntensityConvention


def test_conventions_parse_and_map_to_model_space():
    hu = IntensityConvention.parse("hu:-1000:1000")
    assert hu == IntensityConvention.parse("ct-wide") == IntensityConvention("hu", -1000.0, 1000.0)
    values = torch.tensor([-2000.0, -1000.0, 0.0, 500.0, 3000.0]).view(1, 1, 1, 1, 5)
    torch.testing.assert_close(hu.to_model_space(values).flatten(), torch.tensor([-1.0, -1.0, 0.0, 0.5, 1.0]))
    assert IntensityConvention.parse("ct-soft-tissue") == IntensityConvention("hu", -160.0, 240.0)
    percentile = IntensityConvention.parse("percentile")
    assert (percentile.low, percentile.high) == (0.5, 99.5)
    ramp = torch.linspace(0, 100, 1001).view(1, 1, 1, 1, -1)
    scaled = IntensityConvention.parse("percentile:10:90").to_model_space(ramp)
    assert float(scaled.min()) == -1.0 and float(scaled.max()) == 1.0
    assert float(scaled.flatten()[500]) == pytest.approx(0.0, abs=1e-6)
    model = IntensityConvention.parse("model")
    torch.testing.assert_close(model.to_model_space(values), values)


def test_conventions_are_recorded_in_words():
    record = IntensityConvention.parse("ct-lung").to_dict()
    assert record == {
        "kind": "hu",
        "low": -1350.0,
        "high": 150.0,
        "description": "HU window [-1350, 150] clipped and mapped linearly to [-1, 1]",
    }


@pytest.mark.parametrize("text", ["hu:0", "ct-elbow", "zscore", "percentile:90:10", "hu:100:-100"])
def test_bad_conventions_are_refused(text):
    with pytest.raises(ValueError, match="intensity|percentile|max_hu|Percentiles"):
        IntensityConvention.parse(text)
