"""The extractor interface, the seeded random extractor and the 2.5D (MAISI) slicing."""

import importlib.util

import pytest
import torch
from torch import nn

from meddiffusers.evaluation import (
    MAISI_CHANNEL_MEANS,
    Planes25DFeatureExtractor,
    RandomFeatureExtractor,
    build_feature_extractor,
    frechet_distance,
    maisi_frechet_distance,
)


def volumes(shape=(2, 1, 10, 12, 14), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_random_extractor_is_seeded_and_never_comparable():
    x = volumes()
    a, b, c = RandomFeatureExtractor(0), RandomFeatureExtractor(0), RandomFeatureExtractor(1)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert not torch.allclose(a(x), c(x))
    assert a(x).shape == (2, 128)
    described = a.describe()
    assert described["comparable"] is False and described["weights_sha256"] is None
    assert described["name"] == "random-seed0"
    assert "not comparable" in described["input_convention"]
    assert build_feature_extractor("random:1").name == "random-seed1"


def test_prepare_resamples_then_centre_crops_or_pads_with_background():
    extractor = RandomFeatureExtractor(0, input_size=(4, 6, 6), input_spacing=(2.0, 1.0, 1.0))
    x = torch.arange(8 * 4 * 4, dtype=torch.float32).view(1, 1, 8, 4, 4) / 200
    prepared = extractor.prepare(x, spacing=(1.0, 1.0, 1.0))
    assert prepared.shape == (1, 1, 4, 6, 6)
    assert (prepared[..., 0, :] == -1).all() and (prepared[..., -1, :] == -1).all()  # padded H borders
    torch.testing.assert_close(prepared[..., 1:5, 1:5], torch.nn.functional.avg_pool3d(x, (2, 1, 1)))


def test_feature_spec_errors_name_the_valid_forms():
    with pytest.raises(ValueError, match=r"random\[:SEED\], medicalnet"):
        build_feature_extractor("inception")
    with pytest.raises(ValueError, match="must be an integer"):
        build_feature_extractor("random:x")
    with pytest.raises(ValueError, match="maisi25d:<torchvision backbone>:PATH"):
        build_feature_extractor("maisi25d:resnet50")


class SliceMean(nn.Module):
    """A 2D 'backbone' whose features are easy to predict: per-channel mean and the slice's first row sum."""

    def forward(self, x):
        return torch.stack([x.mean(dim=(2, 3))[:, 0], x[:, 0, 0, :].sum(1), x[:, 0, :, 0].sum(1)], dim=1)


def test_plane_features_follow_maisis_slicing_and_normalisation():
    x = volumes((1, 1, 5, 6, 7))
    extractor = Planes25DFeatureExtractor(SliceMean(), feature_size=3)
    planes = extractor.plane_features(x)
    assert [planes[p][0].shape[0] for p in ("xy", "yz", "zx")] == [5, 6, 7]  # slices along D, H, W
    scaled = (x[0, 0] - x.min()) / (x.max() - x.min() + 1e-10) - MAISI_CHANNEL_MEANS[0]
    # xy slice k is the (x, y) = (H, W) image at D = k; yz slice i is (y, z) = (W, D) at H = i; zx: (x, z) at W = j
    xy, yz, zx = scaled[2], scaled[:, 3, :].T, scaled[:, :, 4].T
    for plane, image, index in (("xy", xy, 2), ("yz", yz, 3), ("zx", zx, 4)):
        expected = torch.stack([image.mean(), image[0, :].sum(), image[:, 0].sum()])
        torch.testing.assert_close(planes[plane][0][index], expected)
    pooled = extractor(x)
    assert pooled.shape == (1, 9)
    torch.testing.assert_close(pooled[0, :3], planes["xy"][0].mean(0))


def test_center_slices_ratio_keeps_the_middle_slices():
    extractor = Planes25DFeatureExtractor(SliceMean(), feature_size=3, center_slices_ratio=0.4)
    planes = extractor.plane_features(volumes((1, 1, 10, 20, 5)))
    assert [planes[p][0].shape[0] for p in ("xy", "yz", "zx")] == [4, 8, 2]  # int(0.3 n) .. int(0.7 n)


def test_maisi_fid_is_the_mean_of_the_three_plane_distances():
    extractor = Planes25DFeatureExtractor(SliceMean(), feature_size=3)
    real = extractor.plane_features(volumes((2, 1, 8, 8, 8), seed=1))
    fake = extractor.plane_features(volumes((2, 1, 8, 8, 8), seed=2) * 0.5)
    values = maisi_frechet_distance(real, fake)
    for plane in ("xy", "yz", "zx"):
        expected = frechet_distance(torch.cat(real[plane]), torch.cat(fake[plane]))
        assert values[f"fid_{plane}"] == pytest.approx(expected)
    assert values["fid"] == pytest.approx((values["fid_xy"] + values["fid_yz"] + values["fid_zx"]) / 3)
    assert not extractor.comparable  # no weight file


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_maisi_extractor_without_torchvision_says_how_to_install_it(tmp_path):
    with pytest.raises(ValueError, match=r"needs torchvision.*meddiffusers\[evaluation\]"):
        build_feature_extractor(f"maisi25d:resnet50:{tmp_path / 'w.pth'}")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs torchvision")
def test_maisi_extractor_loads_a_torchvision_resnet_from_a_local_file(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    path = tmp_path / "resnet18.safetensors"
    save_file(torchvision.models.resnet18(weights=None).state_dict(), path)
    extractor = build_feature_extractor(f"maisi25d:resnet18:{path}")
    assert extractor.comparable and extractor.slice_feature_size == 512
    assert extractor(volumes((1, 1, 8, 16, 16))).shape == (1, 3 * 512)


class TinyResNet(nn.Module):
    """Stands in for a torchvision ResNet: a body, a global pool and an `fc` head."""

    def __init__(self, weights=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv1(x))).flatten(1))


class TinySqueeze(nn.Module):
    """Stands in for a torchvision model with a `features` part and a classifier."""

    def __init__(self, weights=None):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU())
        self.classifier = nn.Linear(5, 10)


def test_torchvision_backbones_load_from_a_local_file_without_their_head(tmp_path, monkeypatch):
    import sys
    import types

    from safetensors.torch import save_file

    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(tinyresnet=TinyResNet, tinysqueeze=TinySqueeze)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    x = volumes((1, 1, 6, 8, 8))

    resnet = TinyResNet()
    save_file({f"module.{k}": v for k, v in resnet.state_dict().items()}, tmp_path / "r.safetensors")
    extractor = build_feature_extractor(f"maisi25d:tinyresnet:{tmp_path / 'r.safetensors'}")
    assert extractor.name == "maisi25d-tinyresnet" and extractor.comparable and extractor.slice_feature_size == 4
    slices = extractor._normalise(x[0].permute(1, 0, 2, 3))  # xy plane
    with torch.no_grad():
        expected = resnet.pool(torch.relu(resnet.conv1(slices))).flatten(1)  # the head is dropped
    torch.testing.assert_close(extractor.plane_features(x)["xy"][0], expected)

    squeeze = TinySqueeze()
    torch.save(squeeze.state_dict(), tmp_path / "s.pth")
    extractor = build_feature_extractor(f"maisi25d:tinysqueeze:{tmp_path / 's.pth'}")
    with torch.no_grad():
        expected = squeeze.features(slices).mean(dim=(2, 3))  # the feature map, spatially averaged
    torch.testing.assert_close(extractor.plane_features(x)["xy"][0], expected)

    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not fit torchvision's tinyresnet"):
        build_feature_extractor(f"maisi25d:tinyresnet:{tmp_path / 'wrong.pth'}")
    with pytest.raises(ValueError, match="torchvision has no model 'vit_huge'"):
        build_feature_extractor(f"maisi25d:vit_huge:{tmp_path / 's.pth'}")
