"""Where GEM-3D's windows lie in a volume: which slices each window covers, anchors and writes back.

GEM-3D generates a volume of `S` slices in windows of `window_length` consecutive slices, starting at the slice
`start_slice` that the informed slice belongs to, first towards the end of the volume ("up"), then towards its start
("down"). Consecutive windows share `overlap` slices: the shared slices of a new window are *anchored* to the latents
the previous window generated for them, so the volume stays continuous.

Two geometries are planned here, as pure functions of the sizes (no tensors):

- `"reference"`: the schedule of the original inference scripts (`inference_*_ic.py`), reproduced exactly, including
  its quirks: the last window of each direction is pinned to the end of the volume but still receives the previous
  window's edge latent as anchor (which then lands on another slice), the downward pass overwrites the upward one,
  some slices are never written (they stay zero) and some windows contribute nothing.
- `"exact"`: one first window containing `start_slice`, then windows up and down whose overlap with the slices
  already generated is real: every anchor sits on the slice it was generated for, and every slice of the volume is
  generated exactly once. A window pinned to the volume end simply anchors more than `overlap` slices.
"""

from __future__ import annotations

from dataclasses import dataclass

GEOMETRIES = ("exact", "reference")


@dataclass(frozen=True)
class Window:
    """One window of the schedule, in the order the windows are sampled.

    Args:
        index: Position in sampling order (0 = first window sampled).
        direction: `"up"` (towards the last slice) or `"down"` (towards slice 0).
        step: Index of the window within its direction.
        start: First slice covered (the window covers slices `[start, start + window_length)`).
        stop: One past the last slice covered.
        informed_from: `None` when the window is conditioned on the given informed slice, else `(window, frame)`:
            the sampled latent of that frame of that earlier window is the informed slice.
        anchor_frames: `(first, stop)` frames of this window that are anchored, or `None` without anchor.
        anchor_source: `(window, first_frame)`: the anchor latents are frames `first_frame ...` of that earlier
            window's samples (as many as `anchor_frames` spans), or `None`.
        writes: `(slice_start, slice_stop, frame_start)`: result slices `[slice_start, slice_stop)` receive frames
            `frame_start ...` of this window, or `None` when the window writes nothing.
    """

    index: int
    direction: str
    step: int
    start: int
    stop: int
    informed_from: tuple[int, int] | None
    anchor_frames: tuple[int, int] | None
    anchor_source: tuple[int, int] | None
    writes: tuple[int, int, int] | None

    @property
    def anchor_reverse(self) -> bool:
        """Whether the anchor sits at the window's end (downward windows): the original's `previous_reverse`."""
        return self.direction == "down"

    def anchor_target_slices(self) -> range:
        """The volume slices the anchored frames of this window lie on."""
        if self.anchor_frames is None:
            return range(0)
        return range(self.start + self.anchor_frames[0], self.start + self.anchor_frames[1])


def _check(num_slices: int, start_slice: int, window_length: int, overlap: int, geometry: str) -> None:
    if geometry not in GEOMETRIES:
        raise ValueError(f"`geometry` must be one of {GEOMETRIES}, got {geometry!r}.")
    if window_length < 2:
        raise ValueError(f"`window_length` must be at least 2, got {window_length}.")
    if not 0 <= overlap < window_length:
        raise ValueError(f"`overlap` must be in [0, window_length={window_length}), got {overlap}.")
    if geometry == "reference" and overlap < 1:
        raise ValueError("`geometry='reference'` needs `overlap >= 1` (the original uses 1).")
    if geometry == "reference" and window_length < 2 * overlap:
        raise ValueError(
            f"`geometry='reference'` needs `window_length >= 2 * overlap`, got {window_length}, {overlap}."
        )
    if num_slices < window_length:
        raise ValueError(
            f"The volume has {num_slices} slices, fewer than one window of {window_length}: GEM-3D generates whole "
            f"windows. Pad the mask to at least {window_length} slices or pass a smaller `window_length`."
        )
    if not 0 <= start_slice < num_slices:
        raise ValueError(f"`start_slice` must be in [0, {num_slices}), got {start_slice}.")


def _iterations(length: int, step: int) -> int:
    # The original's iteration count, Python floor semantics included (negative lengths give 0).
    return length // step + 1 if length % step != 0 else length // step


def reference_windows(num_slices: int, start_slice: int, window_length: int = 16, overlap: int = 1) -> list[Window]:
    """The window schedule of the original GEM-3D inference scripts (see the module docstring)."""
    _check(num_slices, start_slice, window_length, overlap, "reference")
    S, p, L, h = num_slices, start_slice, window_length, overlap
    windows: list[Window] = []

    n_up = _iterations(S - p - h, L - h)
    first_up = len(windows)
    for i in range(n_up):
        last = i == n_up - 1
        start = S - L if last else p + i * (L - h)
        if last:
            writes = (S - L + h, S, h)
        elif i == 0:
            writes = (p, p + L, 0)
        else:
            writes = (start + h, start + L, h)
        previous = first_up + i - 1
        windows.append(
            Window(
                index=len(windows),
                direction="up",
                step=i,
                start=start,
                stop=start + L,
                informed_from=None if i == 0 else (previous, L - h),
                anchor_frames=None if i == 0 else (0, h),
                anchor_source=None if i == 0 else (previous, L - h),
                writes=writes,
            )
        )

    n_down = _iterations(p - h, L - h)
    first_down = len(windows)
    for i in range(n_down):
        last = i == n_down - 1
        start = 0 if last else p + 1 - L - i * (L - h)
        if last:
            writes = (0, L - h, 0)
        elif i == 0:
            writes = (p + 1 - L, p + 1, 0)
        else:
            writes = (start, start + L - h, 0)
        previous = first_down + i - 1
        windows.append(
            Window(
                index=len(windows),
                direction="down",
                step=i,
                start=start,
                stop=start + L,
                informed_from=None if i == 0 else (previous, 0),
                anchor_frames=None if i == 0 else (L - h, L),
                anchor_source=None if i == 0 else (previous, 0),
                writes=writes,
            )
        )
    return windows


def exact_windows(num_slices: int, start_slice: int, window_length: int = 16, overlap: int = 1) -> list[Window]:
    """Windows with true overlaps: every slice generated once, every anchor on its own slice."""
    _check(num_slices, start_slice, window_length, overlap, "exact")
    S, L = num_slices, window_length
    first_start = min(start_slice, S - L)
    windows = [Window(0, "up", 0, first_start, first_start + L, None, None, None, (first_start, first_start + L, 0))]

    previous, generated_stop = windows[0], first_start + L
    while generated_stop < S:
        start = min(generated_stop - overlap, S - L)
        shared = generated_stop - start
        windows.append(
            Window(
                index=len(windows),
                direction="up",
                step=previous.step + 1,
                start=start,
                stop=start + L,
                informed_from=(previous.index, generated_stop - 1 - previous.start),
                anchor_frames=(0, shared) if shared else None,
                anchor_source=(previous.index, start - previous.start) if shared else None,
                writes=(generated_stop, start + L, shared),
            )
        )
        previous, generated_stop = windows[-1], start + L

    previous, generated_start, step = windows[0], first_start, 0
    while generated_start > 0:
        stop = max(generated_start + overlap, L)
        start = stop - L
        shared = stop - generated_start
        windows.append(
            Window(
                index=len(windows),
                direction="down",
                step=step,
                start=start,
                stop=stop,
                informed_from=(previous.index, generated_start - previous.start),
                anchor_frames=(L - shared, L) if shared else None,
                anchor_source=(previous.index, generated_start - previous.start) if shared else None,
                writes=(start, generated_start, 0),
            )
        )
        previous, generated_start, step = windows[-1], start, step + 1
    return windows


def plan_windows(
    num_slices: int, start_slice: int, window_length: int = 16, overlap: int = 1, geometry: str = "exact"
) -> list[Window]:
    """The windows GEM-3D samples for a volume of `num_slices` slices, in sampling order.

    Args:
        num_slices: Number of slices `S` of the volume (at least `window_length`).
        start_slice: Slice the informed slice belongs to, in `[0, S)`.
        window_length: Slices per window (16 for the released model).
        overlap: Slices shared by consecutive windows (1 in the original).
        geometry: `"exact"` (default) or `"reference"` (the original scripts' schedule, see the module docstring).

    Returns:
        The list of [`Window`]s.

    Raises:
        ValueError: For a volume shorter than one window, a start slice outside it, or a bad overlap.
    """
    if geometry == "reference":
        return reference_windows(num_slices, start_slice, window_length, overlap)
    _check(num_slices, start_slice, window_length, overlap, geometry)
    return exact_windows(num_slices, start_slice, window_length, overlap)


def final_provenance(windows: list[Window], num_slices: int) -> list[tuple[int, int] | None]:
    """For each slice, the `(window, frame)` whose sample ends up in the volume, or `None` if never written."""
    provenance: list[tuple[int, int] | None] = [None] * num_slices
    for window in windows:
        if window.writes is None:
            continue
        slice_start, slice_stop, frame_start = window.writes
        for offset, index in enumerate(range(slice_start, slice_stop)):
            provenance[index] = (window.index, frame_start + offset)
    return provenance


def write_history(windows: list[Window], num_slices: int) -> dict[int, list[tuple[int, int]]]:
    """Every `(window, frame)` written to each slice, in order, for the slices written more than once."""
    history: dict[int, list[tuple[int, int]]] = {index: [] for index in range(num_slices)}
    for window in windows:
        if window.writes is None:
            continue
        slice_start, slice_stop, frame_start = window.writes
        for offset, index in enumerate(range(slice_start, slice_stop)):
            history[index].append((window.index, frame_start + offset))
    return {index: writes for index, writes in history.items() if len(writes) > 1}


def never_written_slices(windows: list[Window], num_slices: int) -> list[int]:
    """Slices no window writes (they stay zero in the latent volume; only the reference geometry has them)."""
    return [index for index, source in enumerate(final_provenance(windows, num_slices)) if source is None]


def anchor_content_slices(windows: list[Window]) -> dict[int, range]:
    """For each anchored window, the slices its anchor latents were generated for (compare with its targets)."""
    content = {}
    for window in windows:
        if window.anchor_frames is None:
            continue
        source, first_frame = window.anchor_source
        count = window.anchor_frames[1] - window.anchor_frames[0]
        content[window.index] = range(windows[source].start + first_frame, windows[source].start + first_frame + count)
    return content
