"""MedicalNet 3D ResNets: the original key names load, safely, with their sha256 recorded."""

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from meddiffusers.evaluation import (
    MedicalNetFeatureExtractor,
    MedicalNetResNet3D,
    build_feature_extractor,
    load_weight_file,
)
from tests.malicious import RunsACommand

BN = ("weight", "bias", "running_mean", "running_var")


def original_keys(depth):
    """The state-dict names and shapes of Tencent/MedicalNet's `resnet<depth>` (models/resnet.py), written out
    independently of the implementation: stem, layers of BasicBlocks (10/18/34) or Bottlenecks (50), shortcut B
    (`downsample.0` conv + `downsample.1` BN) for 10/50 and the parameter-free shortcut A for 18/34, and the
    `conv_seg` segmentation head."""
    blocks = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
    bottleneck, shortcut_b = depth == 50, depth in (10, 50)
    expansion = 4 if bottleneck else 1
    keys = {"conv1.weight": (64, 1, 7, 7, 7), **{f"bn1.{p}": (64,) for p in BN}}
    in_planes = 64
    for layer, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for index in range(count):
            prefix = f"layer{layer}.{index}"
            if bottleneck:
                shapes = [(planes, in_planes, 1, 1, 1), (planes, planes, 3, 3, 3), (planes * 4, planes, 1, 1, 1)]
            else:
                shapes = [(planes, in_planes, 3, 3, 3), (planes, planes, 3, 3, 3)]
            for number, shape in enumerate(shapes, start=1):
                keys[f"{prefix}.conv{number}.weight"] = shape
                keys.update({f"{prefix}.bn{number}.{p}": (shape[0],) for p in BN})
            changes = index == 0 and (layer == 2 or in_planes != planes * expansion)
            if changes and shortcut_b:
                keys[f"{prefix}.downsample.0.weight"] = (planes * expansion, in_planes, 1, 1, 1)
                keys.update({f"{prefix}.downsample.1.{p}": (planes * expansion,) for p in BN})
            in_planes = planes * expansion
    return keys


def original_checkpoint(depth, seed=0):
    """A MedicalNet-style training checkpoint: DataParallel `module.` names, a `conv_seg` head, no
    `num_batches_tracked` counters (PyTorch 0.4 files), random values."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in original_keys(depth).items():
        value = torch.randn(shape, generator=generator) * 0.05
        if key.endswith("running_var"):
            value = value.abs() + 0.5
        state[f"module.{key}"] = value
    state["module.conv_seg.0.weight"] = torch.zeros(512 * (4 if depth == 50 else 1), 32, 2, 2, 2)
    state["module.conv_seg.4.weight"] = torch.zeros(2, 32, 1, 1, 1)
    return {"epoch": 200, "state_dict": state}


@pytest.mark.parametrize("depth", [10, 18, 34, 50])
def test_layout_has_exactly_the_original_key_names(depth):
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = MedicalNetResNet3D(depth)
    names = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert names == original_keys(depth)


def test_original_checkpoint_loads_and_gives_the_pooled_layer4_features(tmp_path):
    depth = 10
    checkpoint = original_checkpoint(depth)
    path = tmp_path / f"resnet_{depth}.pth"
    torch.save(checkpoint, path)
    extractor = MedicalNetFeatureExtractor.from_weights(path, depth=depth)
    assert extractor.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert extractor.comparable and extractor.name == f"medicalnet-resnet{depth}"
    loaded = extractor.network.state_dict()
    for key, value in checkpoint["state_dict"].items():
        if "conv_seg" not in key:
            torch.testing.assert_close(loaded[key.removeprefix("module.")], value)
    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    features = extractor(x)
    assert features.shape == (2, 512)
    # HA-GAN's convention: the [-1, 1] volume as it is, network, global average of layer4
    with torch.no_grad():
        torch.testing.assert_close(features, extractor.network(x).mean(dim=(2, 3, 4)))
    # MedicalNet's training convention: per-volume z-score first
    zscore = build_feature_extractor(f"medicalnet10-zscore:{path}")
    mean, std = x.flatten(1).mean(1), x.flatten(1).std(1)
    normalised = (x - mean.view(-1, 1, 1, 1, 1)) / (std.view(-1, 1, 1, 1, 1) + 1e-5)
    with torch.no_grad():
        torch.testing.assert_close(zscore(x), extractor.network(normalised).mean(dim=(2, 3, 4)))
    assert "z-scored" in zscore.describe()["input_convention"]
    assert "as they are (HA-GAN)" in extractor.describe()["input_convention"]


def test_shortcut_a_subsamples_and_appends_zero_channels():
    with torch.device("meta"):
        shortcut = MedicalNetResNet3D(18).layer2[0].downsample
    x = torch.arange(2 * 64 * 4 * 4 * 4, dtype=torch.float32).view(2, 64, 4, 4, 4)
    out = shortcut.to("cpu")(x)
    assert out.shape == (2, 128, 2, 2, 2)
    torch.testing.assert_close(out[:, :64], x[:, :, ::2, ::2, ::2])
    assert not out[:, 64:].any()


def test_legacy_and_safetensors_files_load_the_same_weights(tmp_path):
    checkpoint = original_checkpoint(10, seed=3)
    legacy = tmp_path / "resnet_10_legacy.pth"
    torch.save(checkpoint, legacy, _use_new_zipfile_serialization=False)
    safetensors = tmp_path / "resnet_10.safetensors"
    save_file(checkpoint["state_dict"], safetensors)
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    a = build_feature_extractor(f"medicalnet10:{legacy}")
    b = build_feature_extractor(f"medicalnet10:{safetensors}")
    torch.testing.assert_close(a(x), b(x))
    assert a.weights_sha256 != b.weights_sha256


def test_wrong_depth_or_hash_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet_10.pth"
    torch.save(original_checkpoint(10), path)
    with pytest.raises(ValueError, match=r"do not fit MedicalNet ResNet-18 .*unexpected .*downsample"):
        MedicalNetFeatureExtractor.from_weights(path, depth=18)
    with pytest.raises(ValueError, match="not the expected 00"):
        MedicalNetFeatureExtractor.from_weights(path, depth=10, expected_sha256="00" * 32)
    with pytest.raises(ValueError, match="medicalnet<depth>:PATH"):
        build_feature_extractor(f"medicalnet101:{path}")


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_weight_file_is_refused_and_nothing_runs(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "resnet_50.pth"
    torch.save(
        {"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": RunsACommand(marker)},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(ValueError, match="could execute code"):
        load_weight_file(path)
    with pytest.raises(ValueError, match="could execute code"):
        build_feature_extractor(f"medicalnet50:{path}")
    assert not marker.exists()
