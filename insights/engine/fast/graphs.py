"""CUDA graphs for the twin's repeated batches (occlusion's scores, integrated gradients' path).

On a GPU a ResNet-18 batch takes longer to launch than to compute: Python, autocast and
autograd issue hundreds of small kernels one by one. A CUDA graph records the kernels of one
call once and replays them all with a single launch. :func:`replayed` runs ``fn(*inputs)``
that way whenever it can, and plainly otherwise.

What keeps a replay the same function as the plain call:

* A graph is keyed by its inputs' shapes, strides, dtypes and device, and by everything that
  decides which kernels run: autocast (on, dtype), the TF32 flags, grad and inference mode.
* ``fn`` must take every tensor that changes between calls as an input (a tensor it closes
  over is baked into the graph by address). Inputs are copied into the graph's own tensors
  before each replay and outputs cloned after it, under a lock per graph.
* Under bf16 autocast, recording runs with autocast's weight cache off, so the casts are part
  of the graph rather than references to cached copies that die with the caller's autocast.
* Graphs live in a :class:`GraphCache` held by the twin they were recorded from: a changed
  model gets a new twin, so never replays a graph of old weights. Each cache keeps at most
  ``limit`` graphs (least recently used dropped), since each holds its own memory.
* A key whose recording fails runs plainly from then on (the reason logged, and handed to
  the caller's ``note``).
* Off on the CPU and inside another recording (:func:`unavailable`); the engine's seam also
  leaves it off when ``EngineOptions.cuda_graphs`` is.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

WARMUP = 2  # plain runs on a side stream before recording (lazy initialisation, algorithm choice)
MAX_GRAPHS = 6  # per twin: occlusion and IG in both precisions

log = logging.getLogger("insights.engine")


@dataclass
class _Recorded:
    graph: Any  # torch.cuda.CUDAGraph (or a test double with replay())
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]
    single: bool  # fn returned one tensor rather than a tuple
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: Any = None  # CUDA event after the last replay's output copies (replays on other streams wait)


class GraphCache:
    """The graphs recorded for one twin, least recently used first."""

    def __init__(self, limit: int = MAX_GRAPHS):
        self.limit = limit
        self.entries: "OrderedDict[tuple, _Recorded | None]" = OrderedDict()
        self.lock = threading.Lock()
        self.failed: dict[tuple, str] = {}  # why a key's recording failed
        self.recorded = 0  # recordings made (for tests and the benchmark)
        self.replays = 0


def unavailable(device: torch.device) -> str | None:
    """Why batches on ``device`` cannot be replayed graphs, or None when they can (callers then
    keep batch shapes equal, since each new shape is recorded anew)."""
    if device.type != "cuda":
        return "only on a GPU"
    if torch.cuda.is_current_stream_capturing():
        return "inside another CUDA graph recording"
    return None


def key_of(name: str, inputs: tuple[torch.Tensor, ...]) -> tuple:
    """What a recording depends on besides ``fn`` itself."""
    device = inputs[0].device
    return (name, str(device),
            tuple((tuple(t.shape), t.stride(), t.dtype) for t in inputs),
            torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type),
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
            torch.is_grad_enabled(), torch.is_inference_mode_enabled())


def replayed(cache: GraphCache | None, name: str, fn: Callable, *inputs: torch.Tensor,
             note: Callable[[str], Any] | None = None) -> Any:
    """``fn(*inputs)``, computed by replaying a recorded CUDA graph where one can be used.
    ``note`` (if given) hears "used" after a replay, or "declined: <why>" when ``fn`` ran plainly."""
    why = "no graph cache" if cache is None else unavailable(inputs[0].device)
    if why:
        if note is not None:
            note("declined: " + why)
        return fn(*inputs)
    key = key_of(name, inputs)
    with cache.lock:
        if key in cache.entries:
            entry = cache.entries[key]
            cache.entries.move_to_end(key)
        else:
            entry = _record(fn, inputs)
            if isinstance(entry, str):
                cache.failed[key] = entry
                log.debug("CUDA graph %r not recorded: %s", name, entry)
                entry = None
            cache.recorded += entry is not None
            cache.entries[key] = entry
            while len(cache.entries) > cache.limit:
                cache.failed.pop(cache.entries.popitem(last=False)[0], None)
    if entry is None:
        if note is not None:
            note("declined: " + cache.failed.get(key, "recording failed"))
        return fn(*inputs)
    with entry.lock:
        cuda = inputs[0].device.type == "cuda"
        if cuda and entry.done is not None:
            # The lock orders the threads; this orders their GPU work when their streams differ.
            torch.cuda.current_stream(inputs[0].device).wait_event(entry.done)
        for static, given in zip(entry.inputs, inputs):
            static.copy_(given)
        entry.graph.replay()
        out = tuple(t.clone() for t in entry.outputs)
        if cuda:
            entry.done = torch.cuda.Event()
            entry.done.record(torch.cuda.current_stream(inputs[0].device))
        cache.replays += 1
    if note is not None:
        note("used")
    return out[0] if entry.single else out


def _weight_cache_off(device: str):
    """Autocast as the caller set it, but recording the weight casts instead of caching them."""
    if not torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False)


def new_graph() -> Any:
    return torch.cuda.CUDAGraph()


def record_into(graph: Any, fn: Callable, inputs: tuple, stream: Any) -> Any:
    """Records ``fn(*inputs)`` into ``graph`` on ``stream`` and returns its outputs (tests
    replace this)."""
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        return fn(*inputs)


# One recording at a time in the process (CUDA allows one capture per process in the mode
# torch uses by default; and a recording must not see another thread's kernels).
_recording = threading.Lock()


def _record(fn: Callable, inputs: tuple[torch.Tensor, ...]) -> _Recorded | str:
    """Warms ``fn`` up on a stream of its own, then records it on copies of ``inputs``, with
    the inputs' device current; where recording fails (an operation that cannot be recorded,
    say), why. The caller's stream is current again afterwards, also after a failure."""
    device = inputs[0].device
    with torch.inference_mode(False):  # buffers that later replays may copy into in any mode
        static = tuple(t.detach().clone() for t in inputs)
    cuda = device.type == "cuda"
    with _recording, (torch.cuda.device(device) if cuda else nullcontext()):
        caller = torch.cuda.current_stream(device) if cuda else None
        try:
            with _weight_cache_off(device.type):
                stream = None
                if cuda:
                    stream = torch.cuda.Stream(device=device)
                    stream.wait_stream(caller)
                    with torch.cuda.stream(stream):
                        for _ in range(WARMUP):
                            fn(*static)
                    caller.wait_stream(stream)
                graph = new_graph()
                out = record_into(graph, fn, static, stream)
        except Exception as err:
            return f"recording failed ({type(err).__name__}: {err})"
        finally:
            if cuda:
                torch.cuda.set_stream(caller)
    single = isinstance(out, torch.Tensor)
    outputs = (out,) if single else tuple(out)
    return _Recorded(graph, static, outputs, single)
