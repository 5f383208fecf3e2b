"""Pieces every Accelerate training script repeats: the `Accelerator`, and the forward diffusion of a batch."""

from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed


def build_accelerator(args) -> Accelerator:
    """An `Accelerator` from the scripts' common flags (`output_dir`, `logging_dir`, `report_to`, `mixed_precision`,
    `gradient_accumulation_steps`, `seed`), with a seedable sampler so that resumed runs see the same batches."""
    accelerator = Accelerator(
        gradient_accumulation_steps=getattr(args, "gradient_accumulation_steps", 1),
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def diffuse(latents: torch.Tensor, alphas_cumprod: torch.Tensor, seed: int, micro_step: int, accelerator):
    """Noise, timesteps and noisy latents for one training micro-step.

    They come from a generator seeded by `(seed, micro_step, process)`, so a resumed run draws exactly what an
    uninterrupted one would, whatever else used the global random state in between.
    """
    generator = torch.Generator(latents.device).manual_seed(
        seed + 7919 * (micro_step * accelerator.num_processes + accelerator.process_index)
    )
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), generator=generator, device=latents.device)
    scale = alphas_cumprod[timesteps].view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return scale.sqrt() * latents + (1 - scale).sqrt() * noise, noise, timesteps
