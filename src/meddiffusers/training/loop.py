"""Pieces of the training loop the Accelerate scripts share: the start of a run (EMA, trackers, resume, progress
bar), resumable batches, one optimisation step, what follows it (EMA, logging, checkpoints), a copy of the model
with its EMA weights, and the final save."""

from __future__ import annotations

import math
import os

import torch
from tqdm.auto import tqdm

from .checkpoints import resume_from_checkpoint, save_checkpoint


def start_run(accelerator, args, project_name: str, ema=None, logger=None, desc: str | None = "steps"):
    """Begin (or resume) a run after `accelerator.prepare`: move the `EMAModel` `ema` to the device and register it
    for checkpointing, start the trackers as `project_name` with `args` as their config (main process), resume from
    `args.resume_from_checkpoint` in `args.output_dir`, and open the progress bar over `args.max_train_steps`.
    Returns `(global_step, progress)`, `global_step` the resumed step (0 for a new run)."""
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if accelerator.is_main_process:
        accelerator.init_trackers(project_name, config={k: str(v) for k, v in vars(args).items()})
    global_step = resume_from_checkpoint(accelerator, args.output_dir, args.resume_from_checkpoint, logger)
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process, desc=desc
    )
    return global_step, progress


def resumable_batches(accelerator, loader, start_step: int, gradient_accumulation_steps: int, max_train_steps: int):
    """Yield `(micro_step, batch)` for a run of `max_train_steps` optimiser steps that has done `start_step`.

    Epochs run in order with `loader.set_epoch(epoch)` (so a seedable sampler shuffles each epoch alike, resumed or
    not); a resumed run starts in the epoch and at the batch where `start_step` ended, skipping the batches before
    it without loading them. An epoch of `len(loader)` batches makes `ceil(len(loader) / gradient_accumulation_steps)`
    steps (Accelerate ends an accumulation at the end of the loader). `micro_step` is the batch's position in the
    whole run, `epoch * len(loader) + index`, the same in a resumed run as in an uninterrupted one: seed the
    micro-step's random draws with it ([`~training.setup.step_generator`]). Stop iterating after the last step.
    """
    steps_per_epoch = max(math.ceil(len(loader) / gradient_accumulation_steps), 1)
    first_epoch = start_step // steps_per_epoch
    resume_batches = (start_step % steps_per_epoch) * gradient_accumulation_steps
    for epoch in range(first_epoch, math.ceil(max_train_steps / steps_per_epoch)):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        skipped = resume_batches if epoch == first_epoch else 0
        epoch_loader = accelerator.skip_first_batches(loader, skipped) if skipped else loader
        for index, batch in enumerate(epoch_loader, start=skipped):
            yield epoch * len(loader) + index, batch


def optimization_step(accelerator, model, loss, optimizer, lr_scheduler=None, max_grad_norm: float | None = None):
    """Backward pass, then (inside `accelerator.accumulate`) the optimiser and learning-rate steps; the gradient norm
    is clipped to `max_grad_norm` when the gradients are synchronised (the last micro-step of an accumulation)."""
    accelerator.backward(loss)
    if max_grad_norm and accelerator.sync_gradients:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    optimizer.zero_grad()


def log_step(accelerator, progress, step: int, loss: torch.Tensor, lr_scheduler=None) -> dict:
    """Advance the progress bar by one step and log the loss (and learning rate) to it and the trackers."""
    logs = {"loss": loss.detach().item()}
    if lr_scheduler is not None:
        logs["lr"] = lr_scheduler.get_last_lr()[0]
    progress.update(1)
    progress.set_postfix(**logs)
    accelerator.log(logs, step=step)
    return logs


def model_with_ema_weights(accelerator, model, ema=None):
    """An eval-mode copy of the (unwrapped) `model`, with the weights of the `EMAModel` `ema` where given: what a
    validation pipeline samples with and the final pipeline saves, leaving the training model untouched."""
    trained = accelerator.unwrap_model(model)
    copy = type(trained).from_config(trained.config)
    copy.load_state_dict(trained.state_dict())
    if ema is not None:
        ema.copy_to(copy.parameters())
    return copy.eval()


def finish_step(accelerator, args, model, ema, progress, step: int, loss, lr_scheduler=None) -> int:
    """What follows an optimiser step (a synchronised micro-step): the EMA update, logging, and a checkpoint every
    `args.checkpointing_steps` and at `args.max_train_steps` (keeping `args.checkpoints_total_limit`). Returns the
    new step count, `step + 1`."""
    if ema is not None:
        ema.step(model.parameters())
    step += 1
    log_step(accelerator, progress, step, loss, lr_scheduler)
    if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
        save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit)
    return step


def save_final_pipeline(pipeline, folder: str, args, logger) -> None:
    """Save the trained pipeline to `folder`, and push it to the Hub with `--push_to_hub` (as `--hub_model_id`, by
    default the name of `--output_dir`)."""
    pipeline.save_pretrained(folder)
    logger.info(f"Saved the pipeline to {folder}")
    if args.push_to_hub:
        pipeline.push_to_hub(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)))
