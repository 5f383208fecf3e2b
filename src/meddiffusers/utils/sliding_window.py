"""Sliding-window inference: run a callable over overlapping 3D windows of a volume and blend what it returns.

One function, [`sliding_window_inference`], serves every windowed computation of the library (tiled autoencoder
decoding, patch-wise denoising of volumes too large for one forward pass). Its vocabulary follows MONAI's function of
the same name (`overlap` as a fraction of the window, `mode="constant" | "gaussian"`, `sigma_scale`), with
`window_size` for MONAI's `roi_size` and `batch_size` for its `sw_batch_size`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .validation import as_triple

BLEND_MODES = ("constant", "gaussian")
LAST_WINDOW_MODES = ("flush", "truncate")
# Gaussian weights are clamped to this fraction of their peak, so that no output voxel divides by (almost) zero.
MIN_GAUSSIAN_WEIGHT = 1e-3


def _as_float_triple(value, name: str, valid: Callable[[float], bool], expectation: str) -> tuple[float, ...]:
    """`value` (a number or three numbers) as three floats that each satisfy `valid`, else a `ValueError`."""
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    triple = (value,) * 3 if is_number(value) else tuple(value) if isinstance(value, Sequence) else (value,)
    if len(triple) != 3 or not all(is_number(v) and valid(v) for v in triple):
        raise ValueError(f"`{name}` must be a number or three numbers (D, H, W) {expectation}, got {value!r}.")
    return tuple(float(v) for v in triple)


def window_starts(length: int, window: int, overlap: float, last_window: str = "flush") -> list[int]:
    """Start offsets of windows of `window` voxels covering an axis of `length` voxels.

    Neighbouring windows share at least `overlap * window` voxels (rounded up) and the first window starts at 0. With
    `last_window="flush"` the last window is moved back to end exactly at `length` (all windows keep their size);
    with `"truncate"` the windows keep their stride and the last one is cut at `length`. A window at least as long as
    the axis gives the single start 0.

    Args:
        length: Number of voxels on the axis.
        window: Window side on this axis.
        overlap: Fraction in `[0, 1)` of the window shared with the next window.
        last_window: `"flush"` or `"truncate"`.

    Returns:
        The sorted, distinct start offsets.
    """
    if last_window not in LAST_WINDOW_MODES:
        raise ValueError(f"`last_window` must be one of {LAST_WINDOW_MODES}, got {last_window!r}.")
    if window >= length:
        return [0]
    # `round` guards against float noise: an overlap of 2 / 6 must give 2 shared voxels, not 3.
    shared = math.ceil(round(overlap * window, 6))
    stride = max(window - shared, 1)
    starts = [0]
    while starts[-1] + window < length:
        starts.append(starts[-1] + stride)
    if last_window == "flush":
        starts[-1] = length - window
    return starts


def window_locations(
    spatial_size: Sequence[int],
    window_size: int | Sequence[int],
    overlap: float | Sequence[float] = 0.25,
    last_window: str = "flush",
) -> list[tuple[slice, slice, slice]]:
    """Spatial slices `(D, H, W)` of every window [`sliding_window_inference`] visits, in row-major order (W fastest).

    Windows larger than the volume are clipped to it.

    Args:
        spatial_size: The volume's `(D, H, W)`.
        window_size: Window side (an int for a cube) or `(D, H, W)` sides.
        overlap: Fraction of the window (one for all axes or one per axis) shared by neighbouring windows.
        last_window: `"flush"` (the last window of an axis ends at the border) or `"truncate"` (it is cut there).
    """
    window = [min(w, s) for w, s in zip(as_triple(window_size, "window_size"), spatial_size)]
    fractions = _as_float_triple(overlap, "overlap", lambda v: 0 <= v < 1, "in [0, 1) (a fraction of the window)")
    starts = [window_starts(s, w, o, last_window) for s, w, o in zip(spatial_size, window, fractions)]
    ends = [[min(start + w, s) for start in axis] for axis, w, s in zip(starts, window, spatial_size)]
    return [
        (slice(d, d_end), slice(h, h_end), slice(w, w_end))
        for d, d_end in zip(starts[0], ends[0])
        for h, h_end in zip(starts[1], ends[1])
        for w, w_end in zip(starts[2], ends[2])
    ]


def window_weights(
    window_size: int | Sequence[int],
    mode: str = "constant",
    sigma_scale: float | Sequence[float] = 0.125,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The `(D, H, W)` weight of every voxel of one window's prediction.

    `"constant"` gives ones. `"gaussian"` gives a separable Gaussian centred on the window, with standard deviation
    `sigma_scale * side` on each axis and a value of 1 at the centre, clamped below at `MIN_GAUSSIAN_WEIGHT` (1e-3),
    so that window centres dominate and borders, where a window's prediction lacks context, count little.

    Args:
        window_size: Side (an int for a cube) or sides `(D, H, W)` of the (output) window.
        mode: `"constant"` or `"gaussian"`.
        sigma_scale: Gaussian standard deviation as a fraction of each side (one or three numbers > 0).
        device: Device of the returned tensor.
        dtype: Its dtype.
    """
    if mode not in BLEND_MODES:
        raise ValueError(f"`mode` must be one of {BLEND_MODES}, got {mode!r}.")
    sides = as_triple(window_size, "window_size")
    if mode == "constant":
        return torch.ones(sides, device=device, dtype=dtype)
    scales = _as_float_triple(sigma_scale, "sigma_scale", lambda v: 0 < v < math.inf, "> 0 (a fraction of the side)")
    profiles = []
    for side, scale in zip(sides, scales):  # float64 on the CPU (not every accelerator has float64), then moved
        position = torch.arange(side, dtype=torch.float64) - (side - 1) / 2
        profiles.append(torch.exp(-0.5 * (position / (scale * side)) ** 2))
    weights = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    return weights.clamp(min=MIN_GAUSSIAN_WEIGHT).to(device=device, dtype=dtype)


def sliding_window_inference(
    inputs: torch.Tensor,
    window_size: int | Sequence[int],
    predictor: Callable[..., torch.Tensor],
    overlap: float | Sequence[float] = 0.25,
    mode: str = "constant",
    sigma_scale: float | Sequence[float] = 0.125,
    batch_size: int = 1,
    output_scale: int | Sequence[int] = 1,
    with_coordinates: bool = False,
    last_window: str = "flush",
    device: torch.device | str | None = None,
    sw_device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Apply `predictor` to overlapping 3D windows of `inputs` and blend the predictions into one volume.

    The windows tile the spatial axes of each batch item on a regular grid ([`window_locations`]): the first window
    of an axis starts at 0, the last ends flush with the axis, and neighbours share at least `overlap` of a window.
    Each prediction is multiplied by a weight map ([`window_weights`]: constant, or a Gaussian favouring the window's
    centre); the result at every voxel is the sum of the weighted predictions covering it divided by the sum of their
    weights. A pointwise predictor therefore gives exactly what it gives on the whole volume, whatever the windows.

    Windows of all batch items are gathered `batch_size` at a time into one `predictor` call, as a `(n, C, *window)`
    tensor (`n <= batch_size`; one window size per call). The predictor may change the channel count and scale the
    window: it must return `(n, C_out, *(window * output_scale))`, e.g. a decoder mapping latent windows to image
    windows with `output_scale=8`.

    Args:
        inputs: `(B, C, D, H, W)` volume(s).
        window_size: Window side (an int for a cube) or `(D, H, W)` sides, in input voxels (MONAI's `roi_size`).
            Sides larger than the volume are clipped to it, so a large window gives a single window.
        predictor: Callable taking the `(n, C, *window)` windows (and, with `with_coordinates`, their locations)
            and returning their predictions.
        overlap: Fraction in `[0, 1)` of a window shared with its neighbour (rounded up to whole voxels), one for all
            axes or one per axis. 0 gives side-by-side windows when the sides divide the volume.
        mode: Blending weights of each window: `"constant"` (plain average) or `"gaussian"`.
        sigma_scale: For `"gaussian"`: standard deviation as a fraction of the (output) window side, one or three.
        batch_size: Windows per predictor call (MONAI's `sw_batch_size`); it changes speed and memory, not results.
        output_scale: Ratio of the predictor's output window to its input window, per axis (int or triple).
        with_coordinates: Call `predictor(windows, locations)`, where `locations[i]` is the index tuple
            `(slice(b, b + 1), slice(None), slice_d, slice_h, slice_w)` such that `inputs[locations[i]]` is window
            `i`, in input coordinates (its batch item and global position).
        last_window: `"flush"` (default): the last window of each axis is moved back to end at the border, so all
            windows have `window_size`. `"truncate"`: it keeps the stride and is cut at the border (a smaller window;
            with `overlap=0` the windows then never overlap).
        device: Device on which the output is accumulated (defaults to `inputs.device`); keep a large output on the
            CPU with `device="cpu"`.
        sw_device: Device on which the windows are passed to the predictor (defaults to `inputs.device`).
        progress: Show a progress bar over the predictor calls.

    Returns:
        The blended `(B, C_out, D * sd, H * sh, W * sw)` prediction, with `(sd, sh, sw) = output_scale`, in the
        predictor's dtype.

    Example:

    ```py
    >>> import torch
    >>> from meddiffusers.utils import sliding_window_inference
    >>> volume = torch.rand(1, 1, 40, 64, 64)
    >>> out = sliding_window_inference(volume, 32, torch.tanh, overlap=0.25, mode="gaussian")
    >>> torch.allclose(out, torch.tanh(volume), atol=1e-6)
    True
    ```
    """
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 5:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"`inputs` must be a (B, C, D, H, W) tensor, got {shape}.")
    if inputs.numel() == 0:
        raise ValueError(f"`inputs` is empty (shape {tuple(inputs.shape)}).")
    if not callable(predictor):
        raise ValueError(f"`predictor` must be callable, got {type(predictor).__name__}.")
    if mode not in BLEND_MODES:
        raise ValueError(f"`mode` must be one of {BLEND_MODES}, got {mode!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int (windows per predictor call), got {batch_size!r}.")
    scale = as_triple(output_scale, "output_scale")
    locations = window_locations(inputs.shape[2:], window_size, overlap, last_window)
    output_size = tuple(n * k for n, k in zip(inputs.shape[2:], scale))
    device = inputs.device if device is None else torch.device(device)
    sw_device = inputs.device if sw_device is None else torch.device(sw_device)

    def sides(spatial) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in spatial)

    def output_slices(spatial) -> tuple[slice, ...]:
        return tuple(slice(s.start * k, s.stop * k) for s, k in zip(spatial, scale))

    # One weight map per window size (only "truncate" makes several); this also checks `sigma_scale` up front.
    weights = {}
    for spatial in locations:
        size = tuple(n * k for n, k in zip(sides(spatial), scale))
        if size not in weights:
            weights[size] = window_weights(size, mode, sigma_scale, dtype=torch.float64)

    # Calls of at most `batch_size` windows, of one size each, over the windows of every batch item.
    calls: list[list[tuple[int, tuple[slice, ...]]]] = []
    for job in ((b, spatial) for b in range(inputs.shape[0]) for spatial in locations):
        if calls and len(calls[-1]) < batch_size and sides(calls[-1][0][1]) == sides(job[1]):
            calls[-1].append(job)
        else:
            calls.append([job])
    if progress:
        from tqdm.auto import tqdm

        calls = tqdm(calls, desc="windows", unit="call")
    output = weight_sum = None
    for chunk in calls:
        indices = [(slice(b, b + 1), slice(None), *spatial) for b, spatial in chunk]
        windows = torch.cat([inputs[index] for index in indices]).to(sw_device)
        predictions = predictor(windows, indices) if with_coordinates else predictor(windows)
        window = sides(chunk[0][1])
        output_window = tuple(n * k for n, k in zip(window, scale))
        _check_predictions(predictions, (len(chunk), *output_window), window, scale)
        if output is None:
            result_dtype = predictions.dtype if predictions.is_floating_point() else torch.float32
            accumulate = torch.promote_types(result_dtype, torch.float32)
            output_shape = (inputs.shape[0], predictions.shape[1], *output_size)
            output = torch.zeros(output_shape, device=device, dtype=accumulate)
            weights = {size: map_.to(device, accumulate) for size, map_ in weights.items()}
            # The same weights for every batch item: their per-voxel sum is one spatial map.
            weight_sum = torch.zeros(output_size, device=device, dtype=accumulate)
            for spatial in locations:
                weight_sum[output_slices(spatial)] += weights[tuple(n * k for n, k in zip(sides(spatial), scale))]
        predictions = predictions.to(device, accumulate)
        for prediction, (b, spatial) in zip(predictions, chunk):
            output[(b, slice(None), *output_slices(spatial))] += prediction * weights[output_window]
    return output.div_(weight_sum).to(result_dtype)


def _check_predictions(predictions, expected: tuple, window: tuple, scale: tuple) -> None:
    """Raise `ValueError` unless the predictor returned `(n, C_out, *window * output_scale)`."""
    if isinstance(predictions, torch.Tensor) and predictions.ndim == 5:
        if (predictions.shape[0], *predictions.shape[2:]) == expected:
            return
        got = tuple(predictions.shape)
    else:
        got = tuple(predictions.shape) if isinstance(predictions, torch.Tensor) else type(predictions).__name__
    raise ValueError(
        f"`predictor` must return a (n, C_out, *window * output_scale) tensor: expected batch and spatial sizes "
        f"{expected} for {expected[0]} window(s) of {window} with `output_scale` {scale}, got {got}. Set "
        "`output_scale` to the predictor's spatial scaling."
    )
