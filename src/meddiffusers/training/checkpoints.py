"""`checkpoint-<step>` folders for the Accelerate training scripts: saving with a total limit, and resuming."""

from __future__ import annotations

import os
import shutil


def list_checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-<step>` folder names in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-")[1].isdigit()]
    return sorted(names, key=lambda d: int(d.split("-")[1]))


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None = None) -> str:
    """Save model, optimizer, scheduler, registered objects and random states of every process to
    `output_dir/checkpoint-<step>`, first removing the oldest ones so that at most `total_limit` remain."""
    if accelerator.is_main_process and total_limit is not None:
        existing = list_checkpoints(output_dir)
        for old in existing[: max(len(existing) - total_limit + 1, 0)]:
            shutil.rmtree(os.path.join(output_dir, old))
    accelerator.wait_for_everyone()
    path = os.path.join(output_dir, f"checkpoint-{step}")
    accelerator.save_state(path)
    return path


def resume_from_checkpoint(accelerator, output_dir: str, checkpoint: str | None, logger=None) -> int:
    """Load `checkpoint` (a folder, or `"latest"` in `output_dir`) and return its step; 0 when there is none."""
    if not checkpoint:
        return 0
    if checkpoint == "latest":
        existing = list_checkpoints(output_dir)
        checkpoint = os.path.join(output_dir, existing[-1]) if existing else None
    if checkpoint is None:
        if logger is not None:
            logger.info("No checkpoint to resume from; starting a new run.")
        return 0
    accelerator.load_state(checkpoint)
    step = int(os.path.basename(checkpoint.rstrip("/")).split("-")[1])
    if logger is not None:
        logger.info(f"Resumed from {checkpoint} at step {step}.")
    return step
