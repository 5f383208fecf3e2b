"""Shared helpers of the benchmark scripts: timing, peak memory, one subprocess per measurement."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch


def synchronize(device: str) -> None:
    """Wait for queued GPU work so that wall-clock timings are honest."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak_memory(device: str) -> None:
    """Start a fresh peak-memory window (GPU only; on CPU the process's own peak is used)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float:
    """Peak GPU memory allocated by PyTorch, or the process's peak resident memory on CPU, in GiB."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(function, device: str) -> tuple[float, object]:
    """Run `function()` once and return (seconds, result)."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def run_worker(script: str, arguments: list[str]) -> dict | str:
    """Run `script --worker ARGS` in a fresh process; its last stdout line is a JSON row, else return the failure."""
    result = subprocess.run([sys.executable, script, "--worker", *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        if result.returncode < 0:
            return f"killed by signal {-result.returncode} (out of memory?)"
        return (result.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(result.stdout.strip().splitlines()[-1])
