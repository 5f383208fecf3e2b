"""Models sorted by role: shared blocks at the models root, old import paths still working, weights names unchanged."""

import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import meddiffusers
from meddiffusers.models import attention, embeddings, normalization, resnet, sampling
from meddiffusers.models.controlnets import controlnet_3d
from meddiffusers.models.unets.biflownet import dit_3d, encoder, unet_biflownet_3d, unet_blocks

DEMO = Path(meddiffusers.__file__).parent / "demo" / "meddiffusion-demo"

OLD_PATHS = {
    "meddiffusers.models.biflownet": {
        "BiFlowNet3DModel": unet_biflownet_3d,
        "BiFlowNet3DOutput": unet_biflownet_3d,
    },
    "meddiffusers.models.biflownet.modeling_biflownet_3d": {
        "BiFlowNet3DModel": unet_biflownet_3d,
        "BiFlowNet3DOutput": unet_biflownet_3d,
    },
    "meddiffusers.models.biflownet.encoder": {"BiFlowNetEncoderMixin": encoder, "EncoderState": encoder},
    "meddiffusers.models.biflownet.unet_blocks": {
        "ConditionedResnetBlock3D": resnet,
        "ChannelLayerNorm": normalization,
        "UNetLevel3D": unet_blocks,
    },
    "meddiffusers.models.biflownet.embeddings": {
        "TwoLayerEmbedding": embeddings,
        "sincos_position_embedding_3d": embeddings,
        "sinusoidal_timestep_embedding": embeddings,
    },
    "meddiffusers.models.biflownet.dit_3d": {
        "DiTBlock3D": dit_3d,
        "DiTStage": dit_3d,
        "DiTOutputLayer3D": dit_3d,
        "TokenAttention": attention,
        "modulate": dit_3d,
    },
    "meddiffusers.models.controlnet_3d": {
        "ControlNet3DModel": controlnet_3d,
        "ControlNet3DOutput": controlnet_3d,
        "zero_conv": controlnet_3d,
    },
    "meddiffusers.models.attention_3d": {
        "VolumeAttention": attention,
        "VolumeAttnProcessor": attention,
        "VolumeXFormersAttnProcessor": attention,
    },
    "meddiffusers.models.resnet_3d": {"ResnetBlock3D": resnet, "Downsample3D": sampling, "Upsample3D": sampling},
}


@pytest.mark.parametrize("old_path", sorted(OLD_PATHS))
def test_old_import_paths_re_export_the_same_objects(old_path):
    module = importlib.import_module(old_path)
    assert "lives in" in module.__doc__ or "live in" in module.__doc__
    for name, new_module in OLD_PATHS[old_path].items():
        assert getattr(module, name) is getattr(new_module, name), f"{old_path}.{name}"


def test_top_level_exports_are_the_moved_classes():
    assert meddiffusers.BiFlowNet3DModel is unet_biflownet_3d.BiFlowNet3DModel
    assert meddiffusers.ControlNet3DModel is controlnet_3d.ControlNet3DModel
    assert meddiffusers.ResidualVolumeAttention is attention.ResidualVolumeAttention
    assert meddiffusers.VolumeAttention is attention.VolumeAttention


def test_old_pre_norm_attention_name_builds_the_residual_block_with_channel_layernorm():
    from meddiffusers.models.biflownet.unet_blocks import PreNormVolumeAttention

    block = PreNormVolumeAttention(4, heads=2, head_dim=2)
    assert isinstance(block, attention.ResidualVolumeAttention)
    assert isinstance(block.norm, normalization.ChannelLayerNorm)
    assert sorted(block.state_dict()) == [
        "attention.to_out.bias",
        "attention.to_out.weight",
        "attention.to_qkv.weight",
        "norm.weight",
    ]


@pytest.mark.parametrize("component", ["unet", "vqvae"])
def test_shipped_demo_weights_load_with_unchanged_key_names(component):
    folder = DEMO / component
    config = json.loads((folder / "config.json").read_text())
    model_class = getattr(meddiffusers, config["_class_name"])
    stored = load_file(folder / "diffusion_pytorch_model.safetensors")
    model = model_class.from_pretrained(folder)
    state_dict = model.state_dict()
    assert set(state_dict) == set(stored)
    key = next(iter(sorted(stored)))
    torch.testing.assert_close(state_dict[key].float(), stored[key].float(), atol=0, rtol=0)
