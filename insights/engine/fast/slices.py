"""Running a twin's high-resolution layers in cache-sized slices of the batch (CPU scoring).

On a CPU, the first layers of a CNN are bound by memory traffic, not arithmetic: a ResNet-18's
stem writes 64×112×112 values per image, 51 MB in bf16 for a batch of 32, more than this
machine's 32 MB L3 cache, so the max-pool and ReLU after it read everything back from main
memory. Run a few images at a time instead and each layer's output is still in cache when the
next layer reads it. The deep layers want the opposite: their weights are large and their
activations small, so they run best on the whole batch (a 512-channel 7×7 convolution ran at
380 GFLOP/s on 4 images and 510 on 32).

:func:`sliced_for` splits the twin's graph at a point where a single tensor is alive (between
two residual blocks, say): the ``head`` holds the layers at strides up to 8 (spatial size at
least 1/64 of the input's), the ``tail`` the rest. Sizes are read off N×C×H×W feature maps,
told apart from a transformer's N×H×W×C tokens by running the graph at twice the input size
(only H and W grow). The head runs on slices of the batch sized to :data:`SLICE_BYTES` per
activation, the tail on the whole batch. Measured on this 2-core
CPU, one batch of 32, fastest of 4: ResNet-18 bf16 325 → 290 ms, fp32 614 → 542 ms; ResNet-50
bf16 859 → 723 ms; EfficientNet-Lite0 (whose 112×112 stages are wide) bf16 320 → 153 ms, fp32
558 → 335 ms; ConvNeXt-T (batch of 16) bf16 587 → 522 ms; Swin-T, whose stem is its only
high-resolution layer, unchanged. Budgets of 4 and 16 MiB were slower than 8.

Gradient passes are not sliced: autograd runs the backward of every slice after all of their
forwards, so the saved activations are out of cache again, and integrated gradients on
ResNet-18 ran slower sliced (fp32 1.79 → 2.06 s, bf16 0.97 → 1.15 s).

Slicing changes no arithmetic: each image goes through the same operations, so fp32 stays
exact. A model whose head mixes images of a batch would change, so the split is checked on a
batch of distinct rows when it is built, under a lock (one build per twin). The engine's seam asks
for it on the CPU only, unless ``EngineOptions.cpu_slices`` is off.
"""
from __future__ import annotations

import logging
import math
import threading

import torch
from torch import fx, nn

from .twin import _batch_size_of, _close

SLICE_BYTES = 8 << 20  # a quarter of this CPU's L3 for the largest activation of a slice
_MAX_STRIDE = 8  # layers whose output has at least 1/_MAX_STRIDE² of the input's pixels


class Sliced(nn.Module):
    """tail(head(x)) with ``head`` run on slices of the batch."""

    def __init__(self, head: fx.GraphModule, tail: fx.GraphModule, elements: int, pixels: int):
        super().__init__()
        self.head, self.tail = head, tail
        # The head's largest activation per image, for inputs of ``pixels`` pixels; activations
        # of other input sizes scale with their pixel count.
        self.elements, self.pixels = elements, pixels

    def rows(self, dtype_bytes: int, pixels: int | None = None) -> int:
        elements = self.elements * (pixels or self.pixels) / self.pixels
        return max(1, int(SLICE_BYTES // (elements * dtype_bytes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        size = (torch.get_autocast_dtype(kind).itemsize if torch.is_autocast_enabled(kind)
                else x.element_size())
        count = math.ceil(len(x) / self.rows(size, x.shape[-2] * x.shape[-1]))
        if count <= 1:
            return self.tail(self.head(x))
        # Slices of even size (32 rows at 5 per slice: 5, 5, 5, 5, 4, 4, 4, not 5 × 6 + 2).
        return self.tail(torch.cat([self.head(part) for part in x.tensor_split(count)]))


log = logging.getLogger("insights.engine")
_lock = threading.Lock()  # one build per twin


def sliced_for(fast, sample: torch.Tensor) -> nn.Module | None:
    """The twin's sliced copy for scoring ``sample``'s batches on the CPU, or None when the graph
    has no suitable split (the reason in ``fast.reasons["cpu_slices"]``). Built once per twin."""
    if fast.sliced is None:
        with _lock:
            if fast.sliced is None:
                built = _checked(fast.module, sample[:1])
                if isinstance(built, str):
                    fast.reasons["cpu_slices"] = built
                fast.sliced = built if isinstance(built, nn.Module) else False
    return fast.sliced or None


class _Shapes(fx.Interpreter):
    """Runs a graph and records each node's output shape (without touching the graph)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, node: fx.Node):
        out = super().run_node(node)
        if isinstance(out, torch.Tensor):
            self.shapes[node] = tuple(out.shape)
        return out


def _image_sizes(gm: fx.GraphModule, sample: torch.Tensor) -> dict[fx.Node, tuple[int, int]]:
    """Per-image (channels, pixels) of each node whose output is a batch of feature maps laid
    out N×C×H×W: 4-D, one row for one input row, and H and W (only they) grow with the input.
    A transformer's N×H×W×C tensor is not one: its last dimension stays put. Models that take
    one input size only are judged by the dimensions alone."""
    small = _Shapes(gm)
    small.run(sample)
    try:
        large = _Shapes(gm)
        large.run(sample.repeat(1, 1, 2, 2))
    except Exception:  # a model that takes one input size only
        log.debug("graph does not run at twice the input size; judging layouts by shape alone",
                  exc_info=True)
        large = None
    sizes = {}
    for node, shape in small.shapes.items():
        if len(shape) != 4 or shape[0] != 1:
            continue
        other = large.shapes.get(node) if large is not None else None
        if other is not None and not (other[:2] == shape[:2] and other[2] > shape[2]
                                      and other[3] > shape[3]):
            continue
        sizes[node] = (shape[1], shape[2] * shape[3])
    return sizes


def split(gm: fx.GraphModule, sample: torch.Tensor) -> Sliced | None:
    """The split described in the module docstring, or None where the graph has none (one
    input, 4-D activations, a split point after at least one layer and before the output)."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1 or sample.dim() != 4:
        return None
    sizes = _image_sizes(gm, sample)
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in nodes}
    pixels = sample.shape[2] * sample.shape[3]
    cut, largest, elements = None, 0, 0
    alive: set[fx.Node] = set()
    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        if _batch_size_of(node, inputs[0]):
            continue  # the tail asks its own input, which has the same batch size
        alive = {n for n in alive if last_use[n] > i} | ({node} if node.users else set())
        size = sizes.get(node)
        if size is not None:
            largest = max(largest, size[0] * size[1])
        if alive != {node} or node.op == "placeholder":
            continue  # not a split point: other values (a residual, a size) are still needed
        # The resolution is judged at split points only, i.e. on the main path (a squeeze-and-
        # excitation block's 1×1 branch does not end the head); a value in another layout (a
        # transformer block's N×H×W×C) can be carried through but not cut at.
        if size is None:
            continue
        if size[1] * _MAX_STRIDE ** 2 < pixels:
            break
        cut, elements = node, largest
    if cut is None:
        return None
    return Sliced(*_halves(gm, nodes, inputs[0], cut), elements, pixels)


def _halves(gm: fx.GraphModule, nodes: list[fx.Node], x: fx.Node, cut: fx.Node):
    """(head, tail): the graph up to and including ``cut``, and the rest taking cut's value."""
    head, tail = fx.Graph(), fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    index = nodes.index(cut)
    for node in nodes[: index + 1]:
        env[node] = head.node_copy(node, lambda n: env[n])
    head.output(env[cut])
    env = {cut: tail.placeholder("h")}
    sizes = [node for node in nodes[:index] if _batch_size_of(node, x) and any(
        order > index for order in (nodes.index(u) for u in node.users))]
    for node in sizes:  # the input's batch size, read after the cut: the tail asks h
        env[node] = tail.call_method("size", (env[cut], 0))
    for node in nodes[index + 1:]:
        env[node] = tail.node_copy(node, lambda n: env[n])
    return fx.GraphModule(gm, head), fx.GraphModule(gm, tail)


def _checked(gm: fx.GraphModule, sample: torch.Tensor) -> Sliced | str:
    """The split, if slicing a batch of distinct rows one at a time gives the whole batch's
    logits. The rows carry seeded noise, so that they differ even for a blank sample."""
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            sliced = split(gm, sample)
            if sliced is None:
                return "no point to split the graph at"
            noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(0))
            batch = torch.cat([sample, sample.flip(-1) + noise, 0.5 * sample - noise]).contiguous(
                memory_format=torch.channels_last)
            ok = _close(sliced.tail(torch.cat([sliced.head(row) for row in batch.split(1)])),
                        gm(batch))
    except Exception as err:  # a graph that cannot be split or run in slices runs whole
        log.debug("no sliced copy", exc_info=True)
        return f"slicing failed ({type(err).__name__}: {err})"
    return sliced if ok else "the sliced copy mixes the rows of a batch"
