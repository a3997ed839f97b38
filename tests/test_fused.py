"""The fused copy of a twin for bf16 scoring on a GPU (insights/engine/fast/fused.py).

On the CPU the fused modules compute with ordinary operations, so these tests check the graph
rewrite itself: which convolutions are fused, and that the function is unchanged. The cuDNN
calls that replace them on a GPU are checked by the GPU benchmark run (README, "GPU")."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import insights
from conftest import rel_error, seeded
from insights.engine.fast.fused import ConvAddReLU, ConvReLU, fused_copy, fused_for
from insights.engine.fast.twin import twin


def kinds(gm: nn.Module) -> tuple[int, int]:
    return (sum(type(m) is ConvReLU for m in gm.modules()),
            sum(type(m) is ConvAddReLU for m in gm.modules()))


@pytest.mark.parametrize("name, plain, with_add", [("resnet18", 9, 8), ("resnet50", 33, 16)])
def test_resnets_fuse_every_conv_relu_and_residual_and_compute_the_same_logits(name, plain, with_add):
    model = seeded(lambda: torchvision.models.get_model(name, weights=None))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fast = twin(model, x)
    gm, count = fused_copy(fast.module, torch.float32)
    assert count == plain + with_add
    # The stem's convolution, ReLU and max-pool run as ConvReLU → max-pool again.
    assert kinds(gm) == (plain, with_add)
    assert not any(type(m) is nn.ReLU for m in gm.modules())
    with torch.no_grad():
        assert rel_error(gm(x), model(x)) < 1e-5
    assert all(p.dtype == torch.float32 for p in gm.buffers())


class SharedConv(nn.Module):
    """conv1's output is read twice (ReLU and a skip): it must stay a plain convolution."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding="same")  # string padding: left alone
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        a = self.conv1(x)
        b = self.relu(self.conv2(self.relu(a)) + a)
        return self.fc(b.mean((2, 3)))


def test_convolutions_with_other_readers_or_string_padding_stay_as_they_are(images):
    model = seeded(SharedConv)
    fast = twin(model, images)
    gm, count = fused_copy(fast.module, torch.float32)
    assert count == 0 and kinds(gm) == (0, 0)
    with torch.no_grad():
        assert rel_error(gm(images), model(images)) < 1e-6


def test_fused_modules_store_weights_once_in_the_fused_dtype(small_cnn, images):
    fast = twin(small_cnn, images)
    gm, count = fused_copy(fast.module)  # bf16 by default
    assert count == 2  # conv1 → relu1, and conv3 → relu2
    fused = [m for m in gm.modules() if isinstance(m, ConvReLU)]
    assert all(m.weight.dtype == torch.bfloat16 and m.bias.dtype == torch.bfloat16 for m in fused)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):  # how it runs: under bf16 autocast
            got = gm(images).float()
        want = small_cnn(images)
    assert rel_error(got, want) < 3e-2  # bf16 rounding, not a different function
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.999


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_no_fused_copy_off_the_gpu_or_in_fp32(small_cnn, images, precision):
    fast = twin(small_cnn, images)
    info = {}
    insights.attribute(small_cnn, images, "occlusion", 1, precision=precision, info=info,
                       sliding_window_shapes=(3, 16, 16), strides=(3, 16, 16))
    assert info["fast_paths"]["cuda_fused"] == "declined: only for bf16 on a GPU"
    assert fast.fused is None  # never built here


def test_a_graph_with_nothing_to_fuse_says_why(images):
    model = seeded(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(10)))
    model(images)
    fast = twin(model.eval(), images)
    assert fused_for(fast, images) is None and fast.fused is False
    assert fast.reasons["cuda_fused"] == "no convolution followed by a ReLU to fuse"


class InPlaceBetween(nn.Module):
    """An in-place ReLU on the convolution's input runs between the convolution and its ReLU:
    a fused call at the ReLU's position would read the changed input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        h = x * 2  # the in-place ReLU changes this copy, not the caller's input
        y = self.conv(h)
        z = self.act(h)
        return self.fc((self.relu(y) + z).mean((2, 3)))


class Doubled(nn.Module):
    """relu(conv(x) + conv(x)) with one convolution node read twice by the add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(torch.relu(y + y).mean((2, 3)))


class InputSkip(nn.Module):
    """relu(conv(x) + x): under autocast the residual x stays fp32, so the sum is fp32."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x) + x).mean((2, 3)))


@pytest.mark.parametrize("build, fused", [(InPlaceBetween, 0), (Doubled, 0), (InputSkip, 1)])
def test_rewrite_keeps_the_function_where_reads_move_or_dtypes_differ(images, build, fused):
    model = seeded(build)
    fast = twin(model, images)
    assert fast is not None
    gm, count = fused_copy(fast.module)
    assert count == fused
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(images)
        got = gm(images)
    assert got.dtype == want.dtype
    assert rel_error(got.float(), want.float()) < 2e-2


def test_input_skip_keeps_the_fp32_sum(images):
    model = seeded(InputSkip)
    gm, _ = fused_copy(twin(model, images).module)
    block = next(m for m in gm.modules() if isinstance(m, ConvAddReLU))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(images, images)
        want = torch.relu(model.conv(images) + images)
    assert out.dtype == torch.float32
    assert rel_error(out, want.float()) < 1e-2
