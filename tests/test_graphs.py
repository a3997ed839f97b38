"""CUDA graph replay of the twin's batches (insights/engine/fast/graphs.py).

This machine has no GPU, so the recording itself is replaced by a stand-in with a CUDA graph's
contract: recording runs ``fn`` once on the graph's own input tensors and keeps its outputs;
a replay runs the *recorded* ``fn`` again on those same input tensors and writes into those
same output tensors. A method that let a per-call tensor into ``fn`` other than as an input
(which a real graph would bake in by address) gets the first call's values back on replay,
and its maps go wrong here. The real recording is exercised by the GPU benchmark run
(README, "GPU")."""
from __future__ import annotations

import pytest
import torch

import insights
from conftest import rel_error
from insights.engine import EngineOptions
from insights.engine.budget import MAX_CHUNK_CPU
from insights.engine.fast import graphs
from insights.engine.fast.twin import twin

NO_GRAPHS = EngineOptions(cuda_graphs=False)


class StandInGraph:
    def __init__(self):
        self.fn = self.inputs = self.outputs = None
        self.replays = 0

    def replay(self):
        out = self.fn(*self.inputs)
        for static, new in zip(self.outputs, (out,) if isinstance(out, torch.Tensor) else out):
            static.copy_(new)
        self.replays += 1


RECORDED_ROWS: list[int] = []  # the batch size of each recording (rows of its first input)


def stand_in_record(graph, fn, inputs, stream):
    assert stream is None  # CPU tensors here: no CUDA stream
    RECORDED_ROWS.append(inputs[0].shape[0])
    out = fn(*inputs)
    graph.fn, graph.inputs = fn, inputs
    graph.outputs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    return out


@pytest.fixture
def recording(monkeypatch):
    """Graph replay switched on for CPU tensors, with the stand-in recorder."""
    monkeypatch.setattr(graphs, "unavailable", lambda device: None)
    monkeypatch.setattr(graphs, "new_graph", StandInGraph)
    monkeypatch.setattr(graphs, "record_into", stand_in_record)
    RECORDED_ROWS.clear()


OCCLUSION = dict(sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_occlusion_from_replayed_graphs_equals_the_plain_map(recording, small_cnn, images, precision):
    first, second = images[:1], images[1:]
    for x, target in ((first, 3), (second, 7), (first, 3)):  # replays see each call's inputs
        info = {}
        got = insights.attribute(small_cnn, x, "occlusion", target, precision=precision,
                                 info=info, **OCCLUSION)
        want = insights.attribute(small_cnn, x, "occlusion", target, precision=precision,
                                  options=NO_GRAPHS, **OCCLUSION)
        assert torch.equal(got, want)
        assert got.abs().max() > 0
        assert info["fast_paths"]["cuda_graphs"] == "used"
    cache = twin(small_cnn, images).graphs
    # Two batch shapes, each recorded once: the clean row, and the 49 windows in even
    # batches under the CPU's cap of 32 (25, then 24 padded to 25 with a repeated row).
    assert MAX_CHUNK_CPU == 32
    assert cache.recorded == 2
    assert sorted(RECORDED_ROWS) == [1, 25]


def test_batches_are_padded_to_the_budgets_chunk_not_to_the_clean_pass(recording, small_cnn, images):
    """Eight images with a budget of three rows per batch: the clean pass (8 rows) is not a chunk,
    so no batch is padded past the budget's chunk."""
    from insights.engine.probe import probe

    x = images[:1].repeat(8, 1, 1, 1) + 0.1 * torch.arange(8.0).view(8, 1, 1, 1)
    budget = int(probe(small_cnn, x)["activation_bytes"] * 3.5)  # room for 3 rows per batch
    params = dict(sliding_window_shapes=(3, 32, 32), strides=(3, 32, 32))  # 1 window + clean
    info = {}
    got = insights.attribute(small_cnn, x, "occlusion", 4, memory_budget=budget, info=info, **params)
    want = insights.attribute(small_cnn, x, "occlusion", 4, memory_budget=budget, options=NO_GRAPHS,
                              **params)
    assert torch.equal(got, want) and info["fast_paths"]["cuda_graphs"] == "used"
    assert sorted(RECORDED_ROWS) == [3, 8]  # the 8-row clean pass, and chunks of 3, 3, 2→3


def test_a_decline_for_one_batch_shape_is_not_hidden_by_later_replays(recording, small_cnn, images, monkeypatch):
    """Recording fails for the clean pass's shape only: the call's note says declined, whatever
    the later batches did, and the map is still the plain one."""
    real = graphs.record_into

    def fail_for_one_row(graph, fn, inputs, stream):
        if inputs[0].shape[0] == 1:
            raise RuntimeError("capture failed")
        return real(graph, fn, inputs, stream)

    monkeypatch.setattr(graphs, "record_into", fail_for_one_row)
    info = {}
    got = insights.attribute(small_cnn, images[:1], "occlusion", 3, info=info, **OCCLUSION)
    want = insights.attribute(small_cnn, images[:1], "occlusion", 3, options=NO_GRAPHS, **OCCLUSION)
    assert torch.equal(got, want)
    assert info["fast_paths"]["cuda_graphs"].startswith("declined: ")
    assert "capture failed" in info["fast_paths"]["cuda_graphs"]
    assert RECORDED_ROWS == [25]  # the window batches were still recorded and replayed


def test_integrated_gradients_through_the_stem_from_replayed_graphs(recording, small_cnn, images):
    fast = twin(small_cnn, images)
    assert fast.stem is not None
    for x, target, base in ((images[:1], 3, 0.0), (images[1:], 5, 0.5), (images, [1, 2], -0.2)):
        info = {}
        got = insights.attribute(small_cnn, x, "integrated_gradients", target, n_steps=12,
                                 baselines=base, info=info)
        want = insights.attribute(small_cnn, x, "integrated_gradients", target, n_steps=12,
                                  baselines=base, options=NO_GRAPHS)
        assert rel_error(got, want) < 1e-6
        assert info["fast_paths"]["stem"] == info["fast_paths"]["cuda_graphs"] == "used"
    assert fast.graphs.replays > fast.graphs.recorded > 0  # recorded once per shape, then replayed


def test_integrated_gradients_without_a_stem_from_replayed_graphs(recording, images):
    from conftest import seeded
    from test_twin import InplaceOnStem  # a twin without the stem split

    model = seeded(InplaceOnStem)
    fast = twin(model, images)
    assert fast is not None and fast.stem is None
    for x, target in ((images[:1], 3), (images[1:], 6)):
        info = {}
        got = insights.attribute(model, x, "integrated_gradients", target, n_steps=8, info=info)
        want = insights.attribute(model, x, "integrated_gradients", target, n_steps=8,
                                  options=NO_GRAPHS)
        assert rel_error(got, want) < 1e-6
        assert info["fast_paths"]["stem"].startswith("declined: ")
        assert info["fast_paths"]["cuda_graphs"] == "used"


def test_replay_copies_inputs_and_hands_out_fresh_outputs(recording):
    cache = graphs.GraphCache()
    weight = torch.tensor([2.0, 3.0])
    fn = lambda x: x * weight  # noqa: E731
    a = graphs.replayed(cache, "mul", fn, torch.tensor([1.0, 1.0]))
    b = graphs.replayed(cache, "mul", fn, torch.tensor([5.0, -1.0]))
    assert a.tolist() == [2.0, 3.0] and b.tolist() == [10.0, -3.0]
    b += 100  # the caller's copy, not the graph's output
    assert graphs.replayed(cache, "mul", fn, torch.tensor([0.5, 0.0])).tolist() == [1.0, 0.0]
    assert cache.recorded == 1 and cache.replays == 3


def test_a_new_shape_or_precision_records_a_new_graph_and_old_ones_are_dropped(recording):
    cache = graphs.GraphCache(limit=2)
    fn = lambda x: x + 1  # noqa: E731
    graphs.replayed(cache, "add", fn, torch.zeros(2))
    graphs.replayed(cache, "add", fn, torch.zeros(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        graphs.replayed(cache, "add", fn, torch.zeros(3))
    assert cache.recorded == 3
    assert len(cache.entries) == 2  # the least recently used (shape 2) went
    assert all(k[2][0][0] == (3,) for k in cache.entries)
    assert graphs.replayed(cache, "add", fn, torch.full((2,), 4.0)).tolist() == [5.0, 5.0]
    assert cache.recorded == 4


def test_a_call_that_cannot_be_recorded_runs_plainly(recording, monkeypatch):
    def refuse(graph, fn, inputs, stream):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "record_into", refuse)
    cache = graphs.GraphCache()
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    assert graphs.replayed(cache, "f", fn, torch.ones(2)).tolist() == [2.0, 2.0]
    assert graphs.replayed(cache, "f", fn, torch.ones(2)).tolist() == [2.0, 2.0]
    assert cache.recorded == 0 and list(cache.entries.values()) == [None]
    assert len(calls) == 2  # one plain call each (no second recording attempt)


def test_off_on_the_cpu(small_cnn, images):
    info = {}
    insights.attribute(small_cnn, images, "occlusion", 1, info=info, **OCCLUSION)
    assert twin(small_cnn, images).graphs.recorded == 0  # this machine has no GPU
    assert info["fast_paths"]["cuda_graphs"] == "declined: only on a GPU"


def test_off_when_the_options_say_so(recording, small_cnn, images):
    info = {}
    insights.attribute(small_cnn, images, "occlusion", 1, info=info, options=NO_GRAPHS, **OCCLUSION)
    assert twin(small_cnn, images).graphs.recorded == 0
    assert info["fast_paths"]["cuda_graphs"] == "declined: off (EngineOptions.cuda_graphs)"


def test_a_failed_recording_says_why(recording, monkeypatch, small_cnn, images):
    def refuse(graph, fn, inputs, stream):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "record_into", refuse)
    info = {}
    got = insights.attribute(small_cnn, images, "occlusion", 1, info=info, **OCCLUSION)
    assert info["fast_paths"]["cuda_graphs"].startswith("declined: recording failed (RuntimeError")
    assert torch.equal(got, insights.attribute(small_cnn, images, "occlusion", 1, options=NO_GRAPHS,
                                               **OCCLUSION))
