"""Scoring CPU batches with the twin's high-resolution layers in slices (insights/engine/fast/slices.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import insights
from conftest import rel_error, seeded
from insights.engine import EngineOptions
from insights.engine.fast import slices
from insights.engine.fast.slices import sliced_for, split
from insights.engine.fast.twin import twin


def head_batches(sliced) -> list[int]:
    """The batch sizes the head runs on from now on."""
    seen: list[int] = []
    sliced.head.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    return seen


def assert_same(sliced, model: nn.Module, x: torch.Tensor) -> None:
    """The sliced copy's logits for the batch ``x`` are the model's."""
    with torch.no_grad():
        assert rel_error(sliced(x.contiguous(memory_format=torch.channels_last)), model(x)) < 1e-5


def last_head_node(sliced) -> str:
    return [n for n in sliced.head.graph.nodes if n.op != "output"][-1].name


def test_resnet18_head_ends_after_the_stride_8_stage_and_slices_evenly(resnet18, monkeypatch):
    x = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    fast = twin(resnet18, x[:1])
    sliced = sliced_for(fast, x[:1])
    # layer2 (stride 8) is the last stage in the head; layer3 (stride 16) starts the tail.
    assert last_head_node(sliced) == "layer2_1_relu_1"
    assert not any(n.name.startswith("layer3") for n in sliced.head.graph.nodes)
    assert sliced.elements == 64 * 32 * 32  # the stem's output, per image
    assert sliced.rows(4) == slices.SLICE_BYTES // (64 * 32 * 32 * 4)

    monkeypatch.setattr(slices, "SLICE_BYTES", 2 * 64 * 32 * 32 * 4)  # two fp32 rows per slice
    seen = head_batches(sliced)
    assert_same(sliced, resnet18, x)
    assert seen == [2, 2, 2, 1]


def test_a_batch_that_fits_one_slice_runs_the_head_once(resnet18):
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    sliced = sliced_for(twin(resnet18, x[:1]), x[:1])
    seen = head_batches(sliced)
    with torch.no_grad():
        sliced(x.contiguous(memory_format=torch.channels_last))
    assert seen == [3]


def test_slices_shrink_for_larger_inputs(resnet18, monkeypatch):
    """The split is built at one input size; an input with 4× the pixels has 4× larger
    activations, so its slices hold a quarter of the rows."""
    x = torch.randn(1, 3, 64, 64)
    sliced = sliced_for(twin(resnet18, x), x)
    monkeypatch.setattr(slices, "SLICE_BYTES", 8 * 64 * 32 * 32 * 4)  # 8 fp32 rows at 64×64
    assert (sliced.rows(4), sliced.rows(4, 128 * 128), sliced.rows(4, 512 * 512)) == (8, 2, 1)
    big = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(9))
    seen = head_batches(sliced)
    assert_same(sliced, resnet18, big)
    assert seen == [2, 2]


def test_bf16_slices_are_sized_for_two_byte_activations(resnet18, monkeypatch):
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    sliced = sliced_for(twin(resnet18, x[:1]), x[:1])
    monkeypatch.setattr(slices, "SLICE_BYTES", 4 * 64 * 32 * 32 * 2)  # four bf16 rows
    seen = head_batches(sliced)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sliced(x.contiguous(memory_format=torch.channels_last))
    assert seen == [4, 4]


class FlatHead(nn.Module):
    """Asks the input's batch size for the final view, as EfficientNet implementations do."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=4, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        n = x.size(0)
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.relu(self.conv3(h)).reshape(n, -1))


def test_a_batch_size_read_from_the_input_is_read_from_the_tail_input(monkeypatch):
    model = seeded(FlatHead).eval()
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    sliced = sliced_for(twin(model, x[:1]), x[:1])
    assert sliced is not None
    assert last_head_node(sliced) == "relu_1"  # 16×16 (stride 4); conv3 reaches stride 16
    monkeypatch.setattr(slices, "SLICE_BYTES", 8 * 32 * 32 * 4)  # one row per slice
    assert_same(sliced, model, x)


class Squeezed(nn.Module):
    """A squeeze-and-excitation block at full resolution: its 1×1 branch must not end the head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.excite = nn.Conv2d(8, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, stride=8, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = h * torch.sigmoid(self.excite(h.mean((2, 3), keepdim=True)))
        h = torch.relu(self.conv2(h))
        return self.fc(torch.relu(self.conv3(h)).mean((2, 3)))


def test_a_squeeze_and_excitation_branch_does_not_end_the_head():
    model = seeded(Squeezed).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    sliced = sliced_for(twin(model, x[:1]), x[:1])
    assert last_head_node(sliced) == "relu_1"  # after conv2 (stride 2); conv3 reaches stride 16
    assert_same(sliced, model, x)


class TwoConvs(nn.Module):
    """A full-resolution convolution, a stride-16 one and a classifier; subclasses wire them."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=16, padding=1)
        self.fc = nn.Linear(8, 10)


class BatchMixer(TwoConvs):
    """Subtracts the batch mean after the first layer: its rows depend on each other."""

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = h - h.mean(0, keepdim=True)
        return self.fc(torch.relu(self.conv2(h)).mean((2, 3)))


def test_a_head_that_mixes_rows_of_the_batch_is_not_sliced():
    model = seeded(BatchMixer).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    fast = twin(model, x)
    assert fast is not None and split(fast.module, x) is not None  # a split exists...
    assert sliced_for(fast, x) is None  # ...but the check on distinct rows refuses it
    assert fast.sliced is False
    info = {}
    insights.attribute(model, x, "occlusion", 1, info=info, sliding_window_shapes=(3, 32, 32),
                       strides=(3, 32, 32))
    assert info["fast_paths"]["cpu_slices"] == "declined: the sliced copy mixes the rows of a batch"


def test_a_blank_sample_still_catches_a_head_that_mixes_rows():
    model = seeded(BatchMixer).eval()
    x = torch.zeros(1, 3, 64, 64)  # an all-black image: flipped and halved, it is the same row
    assert sliced_for(twin(model, x), x) is None


class Tokens(nn.Module):
    """A patchify layer, then a block that works on N×H×W×C tokens, then convolutions again."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.mix = nn.Linear(16, 16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 2, stride=2)
        self.deep = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        t = self.mix(self.patch(x).permute(0, 2, 3, 1))  # 1×16×16×16 for a 64×64 input
        h = torch.relu(self.conv(t.permute(0, 3, 1, 2)))
        h = torch.relu(self.down(h))  # stride 8
        return self.fc(torch.relu(self.deep(h)).mean((2, 3)))  # stride 16


def test_token_layouts_are_carried_through_but_not_cut_at():
    model = seeded(Tokens).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    fast = twin(model, x[:1])
    sizes = slices._image_sizes(fast.module, x[:1])
    names = {node.name: size for node, size in sizes.items()}
    assert names["patch"] == (16, 256) and names["relu_1"] == (32, 64)
    assert "mix" not in names and "permute" not in names  # N×H×W×C: C does not grow
    sliced = sliced_for(fast, x[:1])
    assert last_head_node(sliced) == "relu_1"  # past the token block, up to stride 8
    assert_same(sliced, model, x)


class UnusedInPlace(TwoConvs):
    """An in-place op whose result is not assigned (but which changes the tensor) in the tail."""

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        y.sub_(1.0)
        return self.fc(y.mean((2, 3)))


def test_in_place_statements_in_the_tail_are_kept():
    model = seeded(UnusedInPlace).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    sliced = sliced_for(twin(model, x[:1]), x[:1])
    assert sliced is not None
    assert any(n.target == "sub_" for n in sliced.tail.graph.nodes)
    assert_same(sliced, model, x)


def test_no_slicing_on_request_or_without_a_split(resnet18, monkeypatch):
    x = torch.randn(1, 3, 64, 64)
    calls = []
    monkeypatch.setattr(slices.Sliced, "forward", lambda self, b: calls.append(len(b)))
    info = {}
    insights.attribute(resnet18, x, "occlusion", 1, info=info, options=EngineOptions(cpu_slices=False),
                       sliding_window_shapes=(3, 32, 32), strides=(3, 32, 32))
    assert not calls and twin(resnet18, x).sliced is None  # not even built
    assert info["fast_paths"]["cpu_slices"] == "declined: off (EngineOptions.cpu_slices)"
    flat = seeded(lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 10))).eval()
    assert split(twin(flat, x).module, x) is None


@pytest.mark.parametrize("method, params", [
    ("occlusion", {"sliding_window_shapes": (3, 16, 16), "strides": (3, 8, 8)}),
    ("feature_ablation", {"patch_size": 16}),
])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_maps_are_the_same_with_and_without_slices(resnet18, monkeypatch, method, params, precision):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    monkeypatch.setattr(slices, "SLICE_BYTES", 3 * 64 * 32 * 32 * 4)  # 3 to 6 rows per slice
    calls = []
    forward = slices.Sliced.forward
    monkeypatch.setattr(slices.Sliced, "forward", lambda self, b: calls.append(len(b)) or forward(self, b))
    on = insights.attribute(resnet18, x, method, 208, precision=precision, **params)
    assert calls and max(calls) > 6  # the batches were larger than a slice
    calls.clear()
    off = insights.attribute(resnet18, x, method, 208, precision=precision,
                             options=EngineOptions(cpu_slices=False), **params)
    assert not calls
    assert rel_error(on, off) < (1e-5 if precision == "fp32" else 2e-2)
    assert off.abs().max() > 0
