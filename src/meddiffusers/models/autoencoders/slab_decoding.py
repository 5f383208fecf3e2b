"""Exact, memory-bounded ("slab") decoding of the Patch-Volume decoder.

The decoder's only whole-volume operations are its GroupNorm statistics and one attention at the latent resolution.
Everything else is a convolution, whose output rows along one axis depend on a few neighbouring input rows (the
halo). [`SlabDecoder`] therefore runs the latent-resolution part of the decoder (its first convolution and the
blocks up to the last attention) on the whole latent, and traces the rest of the module tree into a small graph of
convolutions, normalisations and residual additions. That graph is then evaluated slab by slab along one axis:

* each node's input rows for a slab of output rows follow from its convolution's kernel, stride, padding and
  dilation (the receptive field comes from the modules, nothing is hard-coded);
* each GroupNorm gets the statistics of its *whole* input, streamed slab by slab (per-slab means and variances
  merged in float64), before any slab that needs it is evaluated;
* within one pass the slabs come in order and hand on the halo rows the next slab needs, so no row of a pass is
  computed twice;
* a tensor is kept whole ("materialised") only where a memory plan allows it; the others are recomputed slab by slab
  from the nearest kept tensors when they are needed. With a large budget nothing is recomputed and the cost is that
  of the full decode; with a small one the high-resolution levels are recomputed once per GroupNorm that follows them.

The result equals the full decode up to float rounding (the tests check 1e-5 in float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils import logging
from torch import nn

from ..attention import VolumeAttention
from ..cpu_inference import (
    channel_statistics,
    inference_conv3d,
    inference_conv_transpose3d,
    is_channels_last,
    is_doubling_transpose,
)
from ..resnet import ResnetBlock3D
from ..sampling import Downsample3D, Upsample3D
from .patch_volume import ResampleBlock3D

logger = logging.get_logger(__name__)


@dataclass
class _Node:
    """One operation of the traced decoder tail, on a `(B, C, D, H, W)` tensor of `shape`."""

    kind: str  # "input", "conv", "conv_transpose", "norm" or "add"
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    module: nn.Module | None = None
    activation: bool = False  # SiLU after a norm
    keep: bool = False  # materialised whole


def _spatial(value, name: str) -> tuple[int, int, int]:
    if isinstance(value, str):
        raise NotImplementedError(f"Slab decoding needs integer convolution {name}, got {value!r}.")
    return tuple(value)


class SlabDecoder:
    """Exact slab-by-slab evaluation of a [`PatchVolumeDecoder`] (see the module docstring).

    Args:
        decoder: The autoencoder's `PatchVolumeDecoder` (or any `_BlockStack` decoder built from the shared blocks).
        slab_latent_size: Slab thickness in latent slices along `axis` (scaled by each level's upsampling); `None`
            picks the thickest slab whose working memory stays within half of `memory_budget`.
        memory_budget: Bytes that the kept tensors and the slabs in flight may take together (the model weights
            and the latent-resolution part are not counted).
        axis: Spatial axis of the slabs, 2, 3 or 4 (`D`, `H`, `W`); `None` picks the longest one, whose slabs have
            the smallest cross-section.
    """

    def __init__(self, decoder: nn.Module, slab_latent_size: int | None, memory_budget: float, axis: int | None):
        self.decoder = decoder
        self.slab_latent_size = slab_latent_size
        self.memory_budget = memory_budget
        self.axis = axis

    # ------------------------------------------------------------------------------------------------ tracing

    def _split_blocks(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """Blocks run on the whole latent (up to the last one with attention) and blocks traced into slabs."""
        blocks = list(self.decoder.ordered_blocks())
        with_attention = [
            i for i, block in enumerate(blocks) if any(isinstance(m, VolumeAttention) for m in block.modules())
        ]
        split = with_attention[-1] + 1 if with_attention else 0
        return blocks[:split], blocks[split:]

    def _trace(self, module: nn.Module, x: int) -> int:
        if isinstance(module, ResampleBlock3D):
            for resnet in module.resnets:
                x = self._trace(resnet, x)
            return x if module.resampler is None else self._trace(module.resampler, x)
        if isinstance(module, ResnetBlock3D):
            hidden = self._conv(self._norm(x, module.norm1), module.conv1)
            hidden = self._conv(self._norm(hidden, module.norm2), module.conv2)
            residual = x if module.conv_shortcut is None else self._conv(x, module.conv_shortcut)
            return self._add_node("add", (residual, hidden), self.nodes[hidden].shape)
        if isinstance(module, (Upsample3D, Downsample3D)):
            return self._trace(module.conv, x)
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            return self._conv(x, module)
        if isinstance(module, nn.GroupNorm):
            return self._norm(x, module, activation=False)
        raise NotImplementedError(f"Slab decoding does not know how to split a {type(module).__name__}.")

    def _add_node(self, kind, inputs, shape, module=None, activation=False) -> int:
        self.nodes.append(_Node(kind, tuple(inputs), tuple(shape), module, activation))
        return len(self.nodes) - 1

    def _norm(self, x: int, module: nn.GroupNorm, activation: bool = True) -> int:
        return self._add_node("norm", (x,), self.nodes[x].shape, module, activation)

    def _conv(self, x: int, module: nn.Module) -> int:
        if module.padding_mode != "zeros":
            raise NotImplementedError(f"Slab decoding needs zero-padded convolutions, got {module.padding_mode!r}.")
        kernel, stride = _spatial(module.kernel_size, "kernel_size"), _spatial(module.stride, "stride")
        padding, dilation = _spatial(module.padding, "padding"), _spatial(module.dilation, "dilation")
        transposed = isinstance(module, nn.ConvTranspose3d)
        sides = []
        for j, side in enumerate(self.nodes[x].shape[2:]):
            span = dilation[j] * (kernel[j] - 1)
            if transposed:
                sides.append((side - 1) * stride[j] - 2 * padding[j] + span + module.output_padding[j] + 1)
            else:
                sides.append((side + 2 * padding[j] - span - 1) // stride[j] + 1)
        if transposed and module.output_padding[self.axis - 2]:
            raise NotImplementedError("Slab decoding needs `output_padding=0` along the slab axis.")
        shape = (self.nodes[x].shape[0], module.out_channels, *sides)
        return self._add_node("conv_transpose" if transposed else "conv", (x,), shape, module)

    def _build(self, hidden_shape: tuple[int, ...], tail: list[nn.Module]) -> None:
        self.nodes: list[_Node] = [_Node("input", (), tuple(hidden_shape), keep=True)]
        x = 0
        for block in tail:
            x = self._trace(block, x)
        x = self._conv(self._norm(x, self.decoder.norm_out), self.decoder.conv_out)
        self.nodes[x].keep = True
        self.consumers = [[] for _ in self.nodes]
        for index, node in enumerate(self.nodes):
            for source in node.inputs:
                self.consumers[source].append(index)

    # ------------------------------------------------------------------------------------------------ ranges

    def _length(self, index: int) -> int:
        return self.nodes[index].shape[self.axis]

    def _input_rows(self, index: int, start: int, stop: int) -> tuple[int, int]:
        """Rows of the node's input (along the slab axis, unclipped) needed for its output rows `[start, stop)`."""
        node = self.nodes[index]
        if node.kind in ("norm", "add"):
            return start, stop
        j = self.axis - 2
        module = node.module
        k, s, p, d = module.kernel_size[j], module.stride[j], module.padding[j], module.dilation[j]
        if node.kind == "conv":
            return s * start - p, s * (stop - 1) - p + d * (k - 1) + 1
        return -((d * (k - 1) - start - p) // s), (stop - 1 + p) // s + 1

    def _required_rows(self, target: int, start: int, stop: int, available, cache=None) -> dict[int, tuple[int, int]]:
        """Rows of every node needed to compute `target` rows `[start, stop)` from the `available` (kept) nodes.

        With `cache` (the rows each node kept from the previous slab of the same pass, see `_evaluate`), only the rows
        beyond the cached ones are computed, so only their inputs are required.
        """
        rows = {target: (start, stop)}
        for index in range(target, -1, -1):
            if index not in rows or index in available:
                continue
            fresh = self._fresh_rows(index, *rows[index], cache)
            if fresh[0] == fresh[1]:
                continue
            lo, hi = self._input_rows(index, *fresh)
            for source in self.nodes[index].inputs:
                lo_c, hi_c = max(lo, 0), min(hi, self._length(source))
                if source in rows:
                    lo_c, hi_c = min(lo_c, rows[source][0]), max(hi_c, rows[source][1])
                rows[source] = (lo_c, hi_c)
        return rows

    def _fresh_rows(self, index: int, start: int, stop: int, cache) -> tuple[int, int]:
        """The part of a node's rows `[start, stop)` that its rows cached from the previous slab do not hold."""
        if cache and index in cache:
            cached_start, cached = cache[index]
            cached_stop = cached_start + cached.shape[self.axis]
            if cached_start <= start < cached_stop:
                return min(cached_stop, stop), stop
        return start, stop

    def _bytes(self, index: int, rows: int) -> int:
        shape = self.nodes[index].shape
        return shape[0] * shape[1] * rows * math.prod(shape[2:]) // shape[self.axis] * self.element_size

    # ------------------------------------------------------------------------------------------------ evaluation

    def _evaluate(
        self, target: int, start: int, stop: int, store: dict | None, available, cache=None
    ) -> torch.Tensor | int:
        """Rows `[start, stop)` of node `target`, or with `store=None` the bytes that evaluating them peaks at.

        Slabs of one pass come in increasing order, and neighbouring slabs need some of the same rows of the
        intermediate nodes (the halos). With a `cache` dict, each node keeps there the rows that the next slab can
        still use (see `_tail_starts`), so every row of a pass is computed once.
        """
        if target in available:
            return store[target].narrow(self.axis, start, stop - start) if store is not None else 0
        rows = self._required_rows(target, start, stop, available, cache)
        fresh = {i: self._fresh_rows(i, *rows[i], cache) for i in rows if i not in available}
        reads = {i for i, (lo, hi) in fresh.items() if lo < hi}
        pending = {i: sum(1 for c in self.consumers[i] if c in reads) for i in rows}
        values, live, peak = {}, 0, 0
        tails = {i: entry for i, entry in (cache or {}).items() if i not in fresh}
        tail_starts = self._tail_starts(rows, available) if cache is not None else {}
        for index in sorted(fresh):
            size = self._bytes(index, rows[index][1] - rows[index][0])
            peak = max(peak, live + size + (0 if self.nodes[index].kind in ("norm", "add") else size // 2))
            if store is not None:
                values[index] = self._assemble(index, rows, fresh, values, store, cache)
                end = rows[index][0] + values[index].shape[self.axis]
                keep_from = max(tail_starts.get(index, end), rows[index][0])
                if keep_from < end:
                    tail = values[index].narrow(self.axis, keep_from - rows[index][0], end - keep_from)
                    tails[index] = (keep_from, tail.clone())
            live += size
            if index not in reads:
                continue
            for source in self.nodes[index].inputs:
                pending[source] -= 1
                if source not in available and pending[source] == 0:
                    live -= self._bytes(source, rows[source][1] - rows[source][0])
                    values.pop(source, None)
        if store is None:
            return peak
        if cache is not None:
            cache.clear()
            cache.update(tails)
        value = values[target]
        return value.narrow(self.axis, start - rows[target][0], stop - start)

    def _assemble(self, index: int, rows, fresh, values, store, cache) -> torch.Tensor:
        """A node's rows from its first required one: those cached from the previous slabs (possibly beyond the
        required ones, computed earlier for a consumer that runs ahead) followed by the freshly computed ones."""
        (start, stop), (fresh_start, _) = rows[index], fresh[index]
        computed = self._apply(index, fresh_start, stop, values, rows, store) if fresh_start < stop else None
        if fresh_start == start:
            return computed
        cached_start, cached = cache[index]
        if computed is None:
            return cached.narrow(self.axis, start - cached_start, cached.shape[self.axis] - start + cached_start)
        reused = cached.narrow(self.axis, start - cached_start, fresh_start - start)
        return torch.cat([reused, computed], dim=self.axis)

    def _tail_starts(self, rows, available) -> dict[int, int]:
        """For each node evaluated for a slab, the first of its rows the next slab will read.

        The next slab continues every node from the last row computed now, so a node's consumer reads it from the
        first input row of the consumer's next output row on (the target's next rows need none of its present ones).
        """
        starts = {}
        for consumer, (_, stop) in rows.items():
            if consumer in available:
                continue
            first = max(self._input_rows(consumer, stop, stop + 1)[0], 0)
            for source in self.nodes[consumer].inputs:
                if source in rows and source not in available and not self._cheap(source, available):
                    starts[source] = min(starts.get(source, first), first)
        return starts

    def _cheap(self, index: int, available) -> bool:
        """Whether a node is elementwise on kept tensors: recomputing its halo rows costs less than keeping them
        and joining them to the next slab's rows."""
        node = self.nodes[index]
        return node.kind in ("norm", "add") and all(source in available for source in node.inputs)

    def _stream(self, target: int, store: dict, available):
        """Rows of `target` slab by slab, in order, every intermediate row computed once (see `_evaluate`)."""
        cache = {}
        for start, stop in self._slabs(target):
            yield start, stop, self._evaluate(target, start, stop, store, available, cache)

    def _rows_of(self, source: int, values, rows, store, lo: int, hi: int) -> torch.Tensor:
        if source in values:
            return values[source].narrow(self.axis, lo - rows[source][0], hi - lo)
        return store[source].narrow(self.axis, lo, hi - lo)

    def _apply(self, index: int, start: int, stop: int, values, rows, store) -> torch.Tensor:
        node = self.nodes[index]
        if node.kind == "add":
            residual, hidden = (self._rows_of(s, values, rows, store, start, stop) for s in node.inputs)
            return residual + hidden
        if node.kind == "norm":
            scale, shift = self.norm_affine[index]
            x = self._rows_of(node.inputs[0], values, rows, store, start, stop)
            out = torch.addcmul(shift, x, scale)
            return F.silu(out, inplace=True) if node.activation else out
        source, module, j = node.inputs[0], node.module, self.axis - 2
        lo, hi = self._input_rows(index, start, stop)
        lo_c, hi_c = max(lo, 0), min(hi, self._length(source))
        x = self._rows_of(source, values, rows, store, lo_c, hi_c)
        padding = list(module.padding)
        if node.kind == "conv":
            k, p, d = module.kernel_size[j], padding[j], module.dilation[j]
            if module.stride[j] == 1 and d * (k - 1) == 2 * p:
                # A size-preserving convolution keeps its own zero padding: output row r is the global row
                # lo_c + r, the rows [start, stop) read only slab rows or rows outside the volume, and the p rows
                # computed beyond them on a side inside the volume are dropped (cheaper than padding a copy).
                out = inference_conv3d(module, x)
                return out.narrow(self.axis, start - lo_c, stop - start)
            if (lo_c - lo, hi - hi_c) != (p, p):  # a slab inside the volume, or touching one end
                padding[j] = 0
                if lo_c > lo or hi_c < hi:
                    x = F.pad(x, [0] * (2 * (4 - self.axis)) + [lo_c - lo, hi - hi_c])
            return inference_conv3d(module, x, padding)
        if is_doubling_transpose(module):
            # Computed with its own padding, the slab's output row r is the global row 2·lo_c + r, and every row
            # [start, stop) needs only input rows inside the slab or outside the volume.
            out, offset = inference_conv_transpose3d(module, x), 2 * lo_c
        else:
            padding[j] = 0
            out = F.conv_transpose3d(
                x,
                module.weight,
                module.bias,
                module.stride,
                padding,
                module.output_padding,
                module.groups,
                module.dilation,
            )
            offset = module.stride[j] * lo_c - module.padding[j]  # global row of the first output row
        return out.narrow(self.axis, start - offset, stop - start)

    # ------------------------------------------------------------------------------------------------ statistics

    def _slabs(self, index: int) -> list[tuple[int, int]]:
        length = self._length(index)
        step = max(1, round(self.slab_size * length / self._length(0)))
        return [(start, min(start + step, length)) for start in range(0, length, step)]

    def _set_norm_statistics(self, index: int, store, available) -> None:
        node, source = self.nodes[index], self.nodes[index].inputs[0]
        module = node.module
        batch, channels = node.shape[:2]
        groups = module.num_groups
        counts, means, variances = [], [], []
        for _, _, x in self._stream(source, store, available):
            # Per slab and channel a mean and variance (float64, exact for channels-last slabs too); slabs and the
            # channels of a group are merged below (the pairwise update of Chan et al.).
            mean, variance = channel_statistics(x)
            counts.append(x[0, 0].numel())
            means.append(mean.cpu().view(batch, groups, -1))
            variances.append(variance.cpu().view(batch, groups, -1))
            del x
        means, variances = torch.stack(means), torch.stack(variances)  # (slabs, batch, groups, channels per group)
        weights = torch.tensor(counts, dtype=torch.float64).view(-1, 1, 1, 1).expand_as(means)
        mean = (weights * means).sum((0, 3)) / weights.sum((0, 3))
        deviations = (means - mean[None, :, :, None]).square()
        var = (weights * (variances + deviations)).sum((0, 3)) / weights.sum((0, 3))
        rstd = (var + module.eps).rsqrt()
        mean = mean.repeat_interleave(channels // groups, dim=1)
        rstd = rstd.repeat_interleave(channels // groups, dim=1)
        ones, zeros = torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
        weight = ones if module.weight is None else module.weight.detach().double().cpu()
        bias = zeros if module.bias is None else module.bias.detach().double().cpu()
        scale = rstd * weight
        shift = bias - mean * scale
        view = (batch, channels, 1, 1, 1)
        dtype, device = self.dtype_device
        self.norm_affine[index] = tuple(t.view(view).to(device=device, dtype=dtype) for t in (scale, shift))

    # ------------------------------------------------------------------------------------------------ planning

    def _events(self) -> list[tuple[str, int]]:
        events = []
        for index, node in enumerate(self.nodes):
            if node.kind == "norm":
                events.append(("stats", index))
            if node.keep and index:
                events.append(("keep", index))
        return events

    def _leaves(self, target: int, available) -> set[int]:
        if target in available:
            return {target}
        rows = self._required_rows(target, 0, self._length(target), available)
        return {i for i in rows if i in available}

    def _simulate(self) -> int:
        """Peak bytes of the current plan: kept tensors alive at each step plus the slab working memory."""
        kept = {i for i, node in enumerate(self.nodes) if node.keep}
        events = self._events()
        last_use = {0: 0}
        reads = []
        done = {0}
        for step, (kind, index) in enumerate(events):
            target = self.nodes[index].inputs[0] if kind == "stats" else index
            leaves = self._leaves(target, done)
            reads.append(leaves)
            for leaf in leaves:
                last_use[leaf] = step
            if kind == "keep":
                done.add(index)
                last_use.setdefault(index, step)
        final = len(self.nodes) - 1
        last_use[final] = len(events)
        created = {0: -1, **{index: step for step, (kind, index) in enumerate(events) if kind == "keep"}}
        peak = 0
        for step, (kind, index) in enumerate(events):
            alive = sum(
                self._bytes(i, self._length(i)) for i in kept if created[i] <= step <= last_use.get(i, created[i])
            )
            available = {i for i in kept if created[i] < step}
            target = self.nodes[index].inputs[0] if kind == "stats" else index
            working = max(self._evaluate(target, a, b, None, available) for a, b in self._slabs(target)[:3])
            peak = max(peak, alive + working + self._halo_cache_bytes(target, available))
        return peak

    def _halo_cache_bytes(self, target: int, available) -> int:
        """Bytes of the rows a middle slab of `target` keeps for the next one (see `_evaluate`)."""
        slabs = self._slabs(target)
        if target in available or len(slabs) < 3:
            return 0
        rows = self._required_rows(target, *slabs[1], available)
        return sum(self._bytes(i, rows[i][1] - start) for i, start in self._tail_starts(rows, available).items())

    def _plan(self) -> None:
        """Keep whole every convolution or addition output that the memory budget allows (smallest first; among equal
        sizes the latest, from which the most layers are recomputed)."""
        candidates = [i for i, n in enumerate(self.nodes[1:-1], 1) if n.kind != "norm"]
        candidates.sort(key=lambda i: (self._bytes(i, self._length(i)), -i))
        if self._simulate() > self.memory_budget:
            logger.warning(
                "Slab decoding needs about %.3g GiB with slabs of %d latent slices, above `memory_budget` (%.3g GiB); "
                "thinner slabs or a larger budget would stay within it.",
                self._simulate() / 2**30,
                self.slab_size,
                self.memory_budget / 2**30,
            )
            return
        for index in candidates:
            self.nodes[index].keep = True
            if self._simulate() > self.memory_budget:
                self.nodes[index].keep = False

    def _choose_slab_size(self) -> int:
        if self.slab_latent_size is not None:
            return min(self.slab_latent_size, self._length(0))
        size = self._length(0)
        while size > 1:
            self.slab_size = size
            if self._simulate() <= self.memory_budget / 2:
                break
            size = (size + 1) // 2
        return size

    # ------------------------------------------------------------------------------------------------ decoding

    def describe(self) -> dict:
        """The plan of the last decode: slab axis and thickness, kept tensors and the estimated peak in GiB."""
        kept = [i for i, node in enumerate(self.nodes) if node.keep]
        return {
            "axis": self.axis,
            "slab_latent_size": self.slab_size,
            "nodes": len(self.nodes),
            "kept": kept,
            "estimated_peak_gib": self._simulate() / 2**30,
        }

    def plan(self, hidden_shape: tuple[int, ...], element_size: int = 4) -> dict:
        """Trace and plan for a latent-resolution hidden state of `hidden_shape` without decoding (see `describe`)."""
        _, tail = self._split_blocks()
        sides = hidden_shape[2:]
        self.axis = self.axis if self.axis is not None else 2 + max(range(3), key=lambda j: (sides[j], -j))
        self.element_size = element_size
        self._build(hidden_shape, tail)
        self.slab_size = self._choose_slab_size()
        self._plan()
        if self.slab_latent_size is None and all(node.keep for node in self.nodes if node.kind != "norm"):
            # Everything is kept: one slab, the decoder's own forward, may fit the budget even where the slab size
            # chosen against half of it did not.
            chosen, self.slab_size = self.slab_size, self._length(0)
            if self._simulate() > self.memory_budget:
                self.slab_size = chosen
        return self.describe()

    @torch.no_grad()
    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Decode post-quantisation-convolution latents `(B, C, d, h, w)` exactly, slab by slab."""
        head, tail = self._split_blocks()
        hidden_states = inference_conv3d(self.decoder.conv_in, hidden_states)
        for block in head:
            hidden_states = block(hidden_states)
        self.plan(tuple(hidden_states.shape), hidden_states.element_size())
        if self.slab_size >= self._length(0) and all(node.keep for node in self.nodes if node.kind != "norm"):
            # The budget holds the whole decode: one slab with every tensor kept is the decoder's own forward.
            return self.decoder.inference_tail(hidden_states, tail)
        store, done = {0: hidden_states}, {0}
        self.dtype_device = (hidden_states.dtype, hidden_states.device)
        del hidden_states
        self.norm_affine = {}
        events = self._events()
        last_reader = {}
        for step, (kind, index) in enumerate(events):
            target = self.nodes[index].inputs[0] if kind == "stats" else index
            for leaf in self._leaves(target, done):
                last_reader[leaf] = step
            if kind == "keep":
                done.add(index)
        done = {0}
        for step, (kind, index) in enumerate(events):
            if kind == "stats":
                self._set_norm_statistics(index, store, done)
            else:
                shape = self.nodes[index].shape
                slabs = self._stream(index, store, done)
                out = None
                for start, stop, rows in slabs:
                    if stop - start == shape[self.axis]:  # the whole tensor at once, nothing to assemble
                        out = rows
                        break
                    if out is None:  # in the slabs' layout (channels-last on the fast CPU path)
                        layout = torch.channels_last_3d if is_channels_last(rows) else torch.contiguous_format
                        dtype, device = self.dtype_device
                        out = torch.empty(shape, dtype=dtype, device=device, memory_format=layout)
                    out.narrow(self.axis, start, stop - start).copy_(rows)
                store[index] = out
                done.add(index)
            for leaf in [leaf for leaf, last in last_reader.items() if last == step and leaf in store]:
                if leaf != len(self.nodes) - 1:
                    del store[leaf]
        return store[len(self.nodes) - 1].contiguous()
