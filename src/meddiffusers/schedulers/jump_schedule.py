"""RePaint's resampling ("jump") schedule: the order in which the sampler visits the respaced time indices."""

from __future__ import annotations

from collections.abc import Sequence


def _countdowns(num_inference_steps: int, length: int, repeats: int) -> dict[int, int]:
    """How many more times the sampler jumps back up from each multiple of `length` below the top segment."""
    return dict.fromkeys(range(0, num_inference_steps - length, length), repeats - 1)


def repaint_jump_schedule(
    num_inference_steps: int,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    n_sample: int = 1,
    jump2_length: int = 1,
    jump2_n_sample: int = 1,
    jump3_length: int = 1,
    jump3_n_sample: int = 1,
    start_resampling: int = 100_000_000,
) -> list[int]:
    """The time indices RePaint visits, ending with `-1`: `get_schedule_jump` of andreas128/RePaint.

    Indices count respaced steps (`num_inference_steps - 1` is the noisiest). Between consecutive entries `(a, b)`,
    `b = a - 1` is a reverse step at `a` and `b = a + 1` undoes one step by forward noising. From the top the schedule
    walks down one index at a time; then, in this order at each index `t`:

    - `n_sample > 1`: go up and down by one `n_sample - 1` times (not in the top two steps);
    - at a multiple of `jump3_length`, `jump2_length` or `jump_length` (below the top segment), jump back up by that
      many steps, `jump*_n_sample - 1` times per index. A jump resets the counters of the finer jumps, so each
      coarse segment is resampled with its own fine jumps;
    - `start_resampling`: resampling and jumps only at or below this index (jumps end there).

    With the paper's settings (250 steps, jump_length 10, jump_n_sample 10) this has 4571 entries: 2410 model calls
    and 2160 undos.

    Args:
        num_inference_steps: Respaced steps (`t_T`).
        jump_length: Steps of each jump back up.
        jump_n_sample: Times each segment is sampled (1: no jumps).
        n_sample: Times each single step is resampled.
        jump2_length / jump2_n_sample, jump3_length / jump3_n_sample: The finer jump levels.
        start_resampling: Highest index where resampling starts.

    Returns:
        The visited indices, from `num_inference_steps - 1` down to `0`, then `-1`.
    """
    for name, value, low in (
        ("num_inference_steps", num_inference_steps, 1),
        ("jump_length", jump_length, 1),
        ("jump_n_sample", jump_n_sample, 1),
        ("n_sample", n_sample, 1),
        ("jump2_length", jump2_length, 1),
        ("jump2_n_sample", jump2_n_sample, 1),
        ("jump3_length", jump3_length, 1),
        ("jump3_n_sample", jump3_n_sample, 1),
        ("start_resampling", start_resampling, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")

    jumps = _countdowns(num_inference_steps, jump_length, jump_n_sample)
    jumps2 = _countdowns(num_inference_steps, jump2_length, jump2_n_sample)
    jumps3 = _countdowns(num_inference_steps, jump3_length, jump3_n_sample)
    t = num_inference_steps
    times = []

    def climb(steps: int) -> None:
        nonlocal t
        for _ in range(steps):
            t += 1
            times.append(t)

    while t >= 1:
        t -= 1
        times.append(t)
        if t + 1 < num_inference_steps - 1 and t <= start_resampling:
            for _ in range(n_sample - 1):
                climb(1)
                t -= 1
                times.append(t)
        if jumps3.get(t, 0) > 0 and t <= start_resampling - jump3_length:
            jumps3[t] -= 1
            climb(jump3_length)
        if jumps2.get(t, 0) > 0 and t <= start_resampling - jump2_length:
            jumps2[t] -= 1
            climb(jump2_length)
            jumps3 = _countdowns(num_inference_steps, jump3_length, jump3_n_sample)
        if jumps.get(t, 0) > 0 and t <= start_resampling - jump_length:
            jumps[t] -= 1
            climb(jump_length)
            jumps2 = _countdowns(num_inference_steps, jump2_length, jump2_n_sample)
            jumps3 = _countdowns(num_inference_steps, jump3_length, jump3_n_sample)
    times.append(-1)
    return times


def check_jump_schedule(schedule: Sequence[int], num_inference_steps: int) -> list[int]:
    """`schedule` as a list of ints, or a `ValueError` saying why a sampler cannot walk it.

    A valid schedule starts at `num_inference_steps - 1` with a reverse step, moves by exactly one index per entry,
    stays within `[-1, num_inference_steps - 1]` and ends with its only `-1`.
    """
    times = [int(t) for t in schedule]
    top = num_inference_steps - 1
    if len(times) < 2 or times[0] != top or times[1] != top - 1:
        raise ValueError(
            f"`jump_schedule` must start with {top}, {top - 1} (num_inference_steps={num_inference_steps}); got "
            f"{times[:2]}. Build it with `repaint_jump_schedule(num_inference_steps, ...)`."
        )
    if times[-1] != -1 or -1 in times[:-1]:
        raise ValueError("`jump_schedule` must end with -1, its only negative entry.")
    bad = next((i for i, (a, b) in enumerate(zip(times[:-1], times[1:])) if abs(a - b) != 1 or b > top), None)
    if bad is not None:
        raise ValueError(
            f"`jump_schedule` must move by one index per entry within [-1, {top}]; entries {bad} and {bad + 1} are "
            f"{times[bad]}, {times[bad + 1]}."
        )
    return times
