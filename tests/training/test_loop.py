"""`start_run`: EMA registration, resume and the progress bar the training scripts share."""

import argparse

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from meddiffusers.training.checkpoints import save_checkpoint
from meddiffusers.training.loop import start_run


def _args(output_dir, resume=None):
    return argparse.Namespace(output_dir=str(output_dir), resume_from_checkpoint=resume, max_train_steps=7)


def test_start_run_registers_the_ema_and_resumes_it_with_the_step(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 1))
    ema = EMAModel(model.parameters())
    step, progress = start_run(accelerator, _args(tmp_path), "test", ema)
    assert (step, progress.n, progress.total, progress.desc) == (0, 0, 7, "steps")
    assert accelerator._custom_objects == [ema]
    ema.shadow_params[0].fill_(3.0)
    ema.optimization_step = 5
    save_checkpoint(accelerator, str(tmp_path), 4)
    progress.close()

    resumed = Accelerator(cpu=True)
    model = resumed.prepare(torch.nn.Linear(2, 1))
    fresh = EMAModel(model.parameters())
    step, progress = start_run(resumed, _args(tmp_path, "latest"), "test", fresh, desc=None)
    assert (step, progress.n, progress.total, progress.desc) == (4, 4, 7, "")
    assert fresh.optimization_step == 5 and torch.all(fresh.shadow_params[0] == 3.0)
    progress.close()


def test_start_run_without_checkpoint_or_ema_starts_at_zero(tmp_path):
    accelerator = Accelerator(cpu=True)
    step, progress = start_run(accelerator, _args(tmp_path, "latest"), "test")
    assert (step, progress.initial, accelerator._custom_objects) == (0, 0, [])
    progress.close()
