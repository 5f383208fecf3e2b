"""Generating many volumes, on one process or split between the processes of `accelerate launch`.

Every volume has its own generator, seeded from the run's seed and the volume's index, so the set of volumes does not
depend on how many processes share the work, and each volume's file name carries its index.
"""

from __future__ import annotations

import torch


def volume_seeds(seed: int | None, num_volumes: int) -> list[int]:
    """One seed per volume index: `seed + index`, or fresh random seeds when `seed` is `None`.

    Without a seed the first process draws the seeds and shares them, so that processes never repeat each other.
    """
    if seed is not None:
        return [seed + index for index in range(num_volumes)]
    seeds = torch.randint(0, 2**62, (num_volumes,), dtype=torch.int64)
    state = _process_state()
    if state.num_processes > 1:
        from accelerate.utils import broadcast

        seeds = broadcast(seeds.to(state.device), from_process=0).cpu()
    return [int(value) for value in seeds]


def volume_generator(seed: int) -> torch.Generator:
    """The CPU generator of one volume."""
    return torch.Generator(device="cpu").manual_seed(seed)


def indices_of_this_process(num_volumes: int) -> list[int]:
    """The volume indices this process generates: all of them on one process, a contiguous share under
    `accelerate launch` (Accelerate's `PartialState.split_between_processes`)."""
    state = _process_state()
    with state.split_between_processes(list(range(num_volumes))) as indices:
        return list(indices)


def process_description() -> str:
    """`'process i of n'` under `accelerate launch` with several processes, else an empty string."""
    state = _process_state()
    return f"process {state.process_index} of {state.num_processes}" if state.num_processes > 1 else ""


def wait_for_all_processes() -> None:
    """A barrier between the processes of a distributed run (nothing on one process)."""
    _process_state().wait_for_everyone()


def process_device(requested: str) -> str:
    """The device of this process: `requested`, except that `cuda` means this process's own GPU under
    `accelerate launch` with several processes."""
    state = _process_state()
    if state.num_processes > 1 and requested == "cuda":
        return str(state.device)
    return requested


def _process_state():
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Processes without a GPU (or told to use the CPU) join through the CPU (gloo) backend.
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
