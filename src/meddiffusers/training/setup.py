"""Pieces every Accelerate training script repeats: the common flags, the `Accelerator`, the learning-rate schedule,
and the forward diffusion of a batch."""

from __future__ import annotations

import argparse
import logging
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed


def add_training_arguments(parser, learning_rate: float = 1e-4, use_ema: bool = False, checkpointing_steps: int = 500):
    """Add the flags the diffusion training scripts share to an `argparse` parser: the loss, the optimisation
    (accumulation, learning rate and its schedule, steps, gradient clipping, precision), the EMA (`--use_ema` /
    `--no-use_ema`, default `use_ema`), checkpoints and resuming, validation frequency, logging and the Hub."""
    p = parser
    p.add_argument("--loss_type", choices=["l1", "l2"], default="l1")
    p.add_argument("--num_train_timesteps", type=int, default=1000)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=learning_rate)
    p.add_argument("--lr_scheduler", default="constant", help="constant, linear, cosine, constant_with_warmup, ...")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    p.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=use_ema,
        help="Keep an EMA of the weights (saved as the final model).",
    )
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpointing_steps", type=int, default=checkpointing_steps)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder or "latest".')
    p.add_argument("--validation_steps", type=int, default=0, help="Save validation volumes every N steps (0: off).")
    p.add_argument("--validation_inference_steps", type=int, default=50)
    p.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none.")
    p.add_argument("--logging_dir", default="logs")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    return parser


def build_lr_scheduler(args, optimizer, accelerator):
    """The `--lr_scheduler` schedule with `--lr_warmup_steps` over `--max_train_steps` (counted per process, as the
    prepared scheduler steps once per process)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )


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


def step_generator(seed: int, micro_step: int, accelerator, device="cpu", stream: int = 0) -> torch.Generator:
    """A generator seeded by `(seed, micro_step, process, stream)`: one independent random stream per training
    micro-step and process (and per use, `stream` < 7919), so a resumed run draws exactly what an uninterrupted one
    would, whatever else used the global random state in between. Stream 0 is [`diffuse`]'s."""
    return torch.Generator(device).manual_seed(
        seed + 7919 * (micro_step * accelerator.num_processes + accelerator.process_index) + stream
    )


def diffuse(latents: torch.Tensor, alphas_cumprod: torch.Tensor, seed: int, micro_step: int, accelerator):
    """Noise, timesteps and noisy latents for one training micro-step.

    They come from a generator seeded by `(seed, micro_step, process)` ([`step_generator`]), so a resumed run draws
    exactly what an uninterrupted one would, whatever else used the global random state in between.
    """
    generator = step_generator(seed, micro_step, accelerator, latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), generator=generator, device=latents.device)
    scale = alphas_cumprod[timesteps].view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return scale.sqrt() * latents + (1 - scale).sqrt() * noise, noise, timesteps
