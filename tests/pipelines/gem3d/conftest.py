"""Shared pieces of the GEM-3D pipeline tests: the parity fixture, recorded-draw replay, stand-in models."""

import json

import pytest
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from safetensors.torch import load_file

import meddiffusers.pipelines.gem3d.pipeline_gem3d_volume as pipeline_module
from meddiffusers.models.unets.unet_gem3d import GEM3DUNetOutput
from tests.conftest import FIXTURES

GEM3D = FIXTURES / "gem3d_tiny"
CONFIG = json.loads((GEM3D / "config.json").read_text())


@pytest.fixture(autouse=True)
def one_thread():
    """These tiny models run far faster on one thread than on several contended ones (numbers are unaffected
    beyond the fixture's 1-vs-2-thread differences, <= 2.1e-6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference():
    """Every tensor of the `gem3d_tiny` fixture."""
    return load_file(GEM3D / "inputs_outputs.safetensors")


def frames_last(tensor):
    """`(F, C, h, w)` frame-major tensor (the original's `(b z)` batch) to the pipeline's `(1, C, F, h, w)`."""
    return tensor.permute(1, 0, 2, 3)[None]


class Replay:
    """Stands in for `randn_tensor`: returns the recorded draws in order, checking each requested shape."""

    def __init__(self, draws, shapes=None):
        self.draws, self.shapes, self.calls = list(draws), shapes, []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        index = len(self.calls)
        self.calls.append(tuple(shape))
        assert index < len(self.draws), f"draw {index} of shape {shape} was not recorded"
        if self.shapes is not None:
            assert tuple(shape) == tuple(self.shapes[index]), (index, shape, self.shapes[index])
        draw = self.draws[index]
        assert draw.numel() == torch.Size(shape).numel(), (index, shape, draw.shape)
        return draw.reshape(shape).to(dtype=dtype or torch.float32)


@pytest.fixture
def replay(monkeypatch):
    """`replay(draws, shapes=None)` patches the pipeline's `randn_tensor` with a [`Replay`] and returns it."""

    def install(draws, shapes=None):
        recorder = Replay(draws, shapes)
        monkeypatch.setattr(pipeline_module, "randn_tensor", recorder)
        return recorder

    return install


class RecordedUNet(ModelMixin, ConfigMixin):
    """A volume U-Net stand-in that returns recorded noise predictions in call order and records its inputs."""

    @register_to_config
    def __init__(self, in_channels: int = 12, out_channels: int = 4):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.outputs, self.inputs, self.timesteps = [], [], []

    def forward(self, sample, timestep, return_dict=True):
        self.inputs.append(sample.clone())
        self.timesteps.append(int(timestep))
        output = self.outputs[len(self.inputs) - 1]
        return GEM3DUNetOutput(sample=output) if return_dict else (output,)


class RecordedSliceUNet(ModelMixin, ConfigMixin):
    """A slice-generator stand-in with the `UNet2DConditionModel` call signature."""

    @register_to_config
    def __init__(self, in_channels: int = 4, out_channels: int = 4, cross_attention_dim: int = 128):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.outputs, self.inputs, self.contexts, self.timesteps = [], [], [], []

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        self.inputs.append(sample.clone())
        self.contexts.append(encoder_hidden_states.clone())
        self.timesteps.append(int(timestep))
        return UNet2DConditionOutput(sample=self.outputs[len(self.inputs) - 1])


class OracleUNet(ModelMixin, ConfigMixin):
    """The exact noise prediction for data that is one known latent volume `target` `(B, 4, S, h, w)`.

    The window's slices are found from its mask channels, which hold the slice index; the output is
    `(x - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar)` of a variance-preserving schedule.
    """

    @register_to_config
    def __init__(self, in_channels: int = 12, out_channels: int = 4):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.target = self.alphas_cumprod = None

    def forward(self, sample, timestep, return_dict=True):
        x, mask = sample[:, :4], sample[:, 4:8]
        slices = mask[0, 0, :, 0, 0].round().long()
        x0 = self.target[:, :, slices]
        alpha = self.alphas_cumprod[int(timestep)]
        return GEM3DUNetOutput(sample=(x - alpha.sqrt() * x0) / (1 - alpha).sqrt())


@pytest.fixture(scope="session")
def stage2_pipeline():
    """`GEM3DVolumePipeline.from_single_file(stage2.ckpt, slice.ckpt)` built once (read-only use in the tests)."""
    from meddiffusers.pipelines.gem3d import GEM3DVolumePipeline

    pipe = GEM3DVolumePipeline.from_single_file(
        GEM3D / "stage2.ckpt",
        slice_checkpoint=GEM3D / "slice.ckpt",
        original_config=CONFIG["checkpoints"]["stage2.ckpt"]["yaml_equivalent"],
        slice_original_config=CONFIG["checkpoints"]["slice.ckpt"]["yaml_equivalent"],
    )
    assert pipe.config.resolution == 16  # latent image_size 8 of the config, times the tiny VAE's factor 2
    pipe.set_progress_bar_config(disable=True)
    return pipe


def recover_eps(x_before, pred_x0, a_t):
    """The noise prediction behind a recorded DDIM step: `(x - sqrt(a_t) x0) / sqrt(1 - a_t)`, per step."""
    a_t = a_t.double().view(-1, *[1] * (x_before.ndim - 1))
    return ((x_before.double() - a_t.sqrt() * pred_x0.double()) / (1 - a_t).sqrt()).float()


__all__ = ["CONFIG", "GEM3D", "OracleUNet", "RecordedSliceUNet", "RecordedUNet", "frames_last", "recover_eps"]
