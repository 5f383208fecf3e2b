"""Original checkpoints are read without executing pickled code."""

import argparse

import pytest
import torch

from meddiffusers import load_original_checkpoint
from tests.conftest import FIXTURES
from tests.malicious import RunsACommand


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": RunsACommand(marker)}, path)
    with pytest.raises(ValueError, match="could execute code"):
        load_original_checkpoint(path)
    assert not marker.exists()


def test_lightning_checkpoint_config_becomes_plain_dict():
    checkpoint = load_original_checkpoint(FIXTURES / "patchvolume_8x_tiny" / "patchvolume_8x_tiny.ckpt")
    cfg = checkpoint["hyper_parameters"]["cfg"]
    assert cfg["model"]["downsample"] == [8, 8, 8]
    assert cfg["model"]["num_groups"] == 2
    assert cfg["dataset"]["patch_size"] == 16
    assert isinstance(checkpoint["state_dict"]["codebook.embeddings"], torch.Tensor)


def test_argparse_namespace_becomes_plain_dict(tmp_path):
    path = tmp_path / "train.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(model_dim=72, dim_mults=[1, 2])}, path)
    checkpoint = load_original_checkpoint(path)
    assert checkpoint["args"] == {"model_dim": 72, "dim_mults": [1, 2]}


def test_missing_truncated_and_foreign_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_original_checkpoint(tmp_path / "absent.ckpt")
    source = (FIXTURES / "patchvolume_8x_tiny" / "patchvolume_8x_tiny.ckpt").read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(source[: len(source) // 2])
    with pytest.raises(ValueError, match="truncated|not a PyTorch checkpoint"):
        load_original_checkpoint(truncated)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_original_checkpoint(text)


def test_legacy_format_is_read_with_the_same_restricted_unpickler(tmp_path):
    legacy = tmp_path / "legacy.pth"
    weights = {"state_dict": {"conv.weight": torch.arange(6.0).view(2, 3)}, "args": argparse.Namespace(depth=10)}
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)
    checkpoint = load_original_checkpoint(legacy)
    assert torch.equal(checkpoint["state_dict"]["conv.weight"], torch.arange(6.0).view(2, 3))
    assert checkpoint["args"] == {"depth": 10}

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil_legacy.pth"
    torch.save({"w": torch.zeros(1), "payload": RunsACommand(marker)}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="could execute code"):
        load_original_checkpoint(evil)
    assert not marker.exists()

    data = legacy.read_bytes()
    for size in (30, len(data) // 2):
        truncated = tmp_path / f"truncated_{size}.pth"
        truncated.write_bytes(data[:size])
        with pytest.raises(ValueError, match="truncated or corrupted"):
            load_original_checkpoint(truncated)
