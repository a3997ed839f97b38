"""The model twin (insights/engine/fast/twin.py): folded batch norms, the affine stem, and when the
engine must fall back to the model itself."""
from __future__ import annotations

import enum

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import insights
from conftest import SmallCNN, rel_error, seeded
from insights.engine.context import Context
from insights.engine import seam
from insights.engine.fast.twin import twin


def test_resnet_twin_folds_every_batch_norm_and_computes_the_same_logits(resnet18, images):
    fast = twin(resnet18, images)
    assert fast is not None
    assert sum(isinstance(m, nn.BatchNorm2d) for m in resnet18.modules()) == 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.module.modules())
    with torch.no_grad():
        want = resnet18(images)
        assert rel_error(fast.module(images), want) < 1e-5
        assert rel_error(fast.rest(fast.stem(images)), want) < 1e-5
    assert fast.stem.weight.shape == (64, 3, 7, 7)
    assert twin(resnet18, images) is fast  # cached


def test_twin_leaves_the_model_untouched(small_cnn, images):
    before = {k: v.clone() for k, v in small_cnn.state_dict().items()}
    fast = twin(small_cnn, images)
    assert fast is not None and fast.stem is not None
    assert small_cnn.relu1.inplace  # the rest's out-of-place copy is its own module
    assert isinstance(small_cnn.bn1, nn.BatchNorm2d)
    for k, v in small_cnn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_twin_follows_new_weights(small_cnn, images):
    old = twin(small_cnn, images)
    other = seeded(SmallCNN, seed=5)
    small_cnn.load_state_dict(other.state_dict())
    new = twin(small_cnn, images)
    assert new is not old
    with torch.no_grad():
        assert rel_error(new.module(images), other(images)) < 1e-5
        assert rel_error(old.module(images), other(images)) > 0.01


class ConvFc(nn.Module):
    """One convolution and a classifier; subclasses wire them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)


class Branchy(ConvFc):
    """Control flow on tensor values: torch.fx cannot trace it."""

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > 0:
            x = x * 2
        return self.fc(x.mean((2, 3)))


class InplaceOnStem(ConvFc):
    """A ReLU that changes the stem's output in place."""

    def forward(self, x):
        return self.fc(self.conv(x).relu_().mean((2, 3)))


class SamePadConv(nn.Conv2d):
    """A Conv2d subclass that pads in its own forward, like EfficientNet ports do."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride)


class PaddedStem(nn.Module):
    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.stem = SamePadConv(3, 6, 3, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU6(inplace=True)
        self.fc = nn.Linear(6, 10)
        self.offset = offset

    def forward(self, x):
        batch = x.size(0)
        x = self.act(self.bn(self.stem(x)))
        return self.fc(x.mean((2, 3)).reshape(batch, -1))


class SquaredConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) ** 2


class SquaredStem(PaddedStem):
    """A stem that is a Conv2d subclass but not affine; ``bn=False`` leaves nothing to fold."""

    def __init__(self, bn: bool = True):
        super().__init__()
        self.stem = SquaredConv(3, 6, 3, stride=2, padding=1)
        if not bn:
            self.bn = nn.Identity()


def test_models_the_twin_cannot_copy_run_as_they_are(small_cnn, images):
    hooked = seeded(SmallCNN)
    hooked.conv2.register_forward_hook(lambda m, i, o: None)
    training = seeded(SmallCNN).train()
    scripted = torch.jit.script(seeded(SmallCNN))
    for model in (seeded(Branchy), hooked, training, scripted, seeded(SmallCNN).double()):
        sample = images.double() if next(model.parameters()).dtype == torch.float64 else images
        assert twin(model, sample) is None
    assert twin(small_cnn, images.double()) is None  # fp64 inputs keep the model's own arithmetic


def test_an_in_place_method_on_the_stem_keeps_the_twin_but_not_the_split(images):
    fast = twin(seeded(InplaceOnStem), images)
    assert fast is not None and fast.stem is None


def test_a_padding_conv_subclass_is_a_stem_and_its_batch_norm_folds(images):
    model = seeded(PaddedStem)
    fast = twin(model, images)
    assert isinstance(fast.stem, SamePadConv)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.module.modules())
    with torch.no_grad():
        assert rel_error(fast.rest(fast.stem(images)), model(images)) < 1e-5



def test_a_conv_subclass_that_is_not_affine_is_neither_a_stem_nor_folded(images):
    model = seeded(lambda: SquaredStem(bn=False))
    fast = twin(model, images)
    assert fast is not None and fast.stem is None  # fails the affinity check
    # Folding a batch norm into it would change the function: the check against the model's
    # own logits drops the twin, and attributions run on the model itself.
    model = seeded(SquaredStem)
    assert twin(model, images) is None
    ours = insights.attribute(model, images, "integrated_gradients", [3, 7], n_steps=8)
    assert ours.abs().sum() > 0


def test_integrated_gradients_through_the_stem_equals_the_step_by_step_sum(images):
    model = seeded(PaddedStem)
    fast = twin(model, images)
    base = torch.full_like(images, 0.25)
    p = insights.engine.registry.get("integrated_gradients").validate({"n_steps": 16, "baselines": 0.25})
    ctx = Context(model=model, inputs=images, target=torch.tensor([3, 7]))
    alpha = torch.linspace(0.05, 0.95, 16)
    weight = torch.full((16,), 1 / 16)
    hoisted = seam.through_stem(ctx, fast, None, base, images, alpha, weight, ctx.target) * (images - base)
    expected = torch.zeros_like(images)
    for a, w in zip(alpha, weight):
        point = (base + a * (images - base)).requires_grad_(True)
        out = model(point).gather(1, ctx.target.view(-1, 1)).sum()
        expected += w * torch.autograd.grad(out, point)[0]
    expected *= images - base
    assert rel_error(hoisted, expected) < 1e-5
    assert expected.abs().max() > 0
    full = insights.attribute(model, images, "integrated_gradients", [3, 7], **p)
    completeness = full.sum((1, 2, 3))
    with torch.no_grad():
        delta = (model(images) - model(base)).gather(1, ctx.target.view(-1, 1)).squeeze(1)
    assert torch.allclose(completeness, delta, rtol=0.05, atol=1e-3)


class PassThroughInplace(nn.Module):
    """An in-place activation behind a pass-through module: rest() cannot take a leaf."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.keep = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.act(self.keep(self.conv(x))).mean((2, 3)))


def test_a_stem_whose_output_is_changed_in_place_later_is_not_split(images):
    model = seeded(PassThroughInplace)
    fast = twin(model, images)
    assert fast is not None and fast.stem is None
    ours = insights.attribute(model, images, "integrated_gradients", [3, 7], n_steps=8)
    delta = (model(images) - model(torch.zeros_like(images))).detach()[[0, 1], [3, 7]]
    assert torch.allclose(ours.sum((1, 2, 3)), delta, rtol=0.05, atol=1e-3)


def test_the_twin_is_built_in_fp32_even_inside_a_bf16_call(images):
    model = seeded(PaddedStem)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = twin(model, images)
    assert fast is not None and fast.stem is not None
    fp32 = insights.attribute(model, images, "integrated_gradients", [3, 7], n_steps=8)
    bf16 = insights.attribute(model, images, "integrated_gradients", [3, 7], n_steps=8,
                              precision="bf16")
    corr = torch.corrcoef(torch.stack([fp32.flatten(), bf16.flatten()]).double())[0, 1]
    assert corr > 0.99 and not torch.equal(fp32, bf16)  # close, and really computed in bf16


class StemPool(nn.Module):
    """ResNet's stem: convolution, batch norm, in-place ReLU, then max-pool."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def call_order(fast) -> list[str]:
    """The class names of the twin's modules in the order its graph calls them."""
    return [type(fast.module.get_submodule(n.target)).__name__
            for n in fast.module.graph.nodes if n.op == "call_module"]


def test_relu_then_max_pool_becomes_max_pool_then_relu_with_equal_values_and_gradients(images):
    model = seeded(StemPool)
    fast = twin(model, images)
    order = call_order(fast)
    assert order[:3] == ["Conv2d", "MaxPool2d", "ReLU"]
    assert isinstance(model.pool, nn.MaxPool2d) and model.relu.inplace  # the model is as it was

    def grad(net):
        x = images.clone().requires_grad_(True)
        out = net(x)[:, 3].sum()
        return out.detach(), torch.autograd.grad(out, x)[0]

    (want, want_grad), (got, got_grad) = grad(model), grad(fast.module)
    assert rel_error(got, want) < 1e-5
    assert rel_error(got_grad, want_grad) < 1e-5 and want_grad.abs().max() > 0


def _ig_without_twin(model, images, **params):
    handle = model.register_forward_hook(lambda *args: None)  # hooks turn the twin off
    try:
        return insights.attribute(model, images, "integrated_gradients", [3, 7], **params)
    finally:
        handle.remove()


@pytest.mark.parametrize("change", ["data", "module", "attribute"])
def test_the_twin_follows_changes_that_leave_weight_versions_alone(small_cnn, images, change):
    insights.attribute(small_cnn, images, "integrated_gradients", [3, 7], n_steps=4)
    first = twin(small_cnn, images)
    if change == "data":
        small_cnn.conv2.weight.data.mul_(2)  # does not bump the tensor's version
    elif change == "module":
        small_cnn.relu2 = nn.Tanh()
    else:
        small_cnn.conv3.stride = (1, 1)
    ours = insights.attribute(small_cnn, images, "integrated_gradients", [3, 7], n_steps=4)
    assert twin(small_cnn, images) is not first
    assert rel_error(ours, _ig_without_twin(small_cnn, images, n_steps=4)) < 1e-4


class Mode(enum.IntEnum):
    PLAIN = 0
    SCALED = 1


class Switch(nn.Module):
    """Branches on attributes whose types subclass plain ones (an IntEnum, a numpy float)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)
        self.mode = Mode.PLAIN
        self.gain = np.float64(1.0)

    def forward(self, x):
        x = self.conv(x) * float(self.gain)
        if self.mode == Mode.SCALED:
            x = x * 3
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("change", ["mode", "gain"])
def test_attributes_of_plain_subclass_types_are_part_of_the_twin_key(images, change):
    model = seeded(Switch)
    first = twin(model, images)
    assert first is not None
    if change == "mode":
        model.mode = Mode.SCALED
    else:
        model.gain = np.float64(2.5)
    again = twin(model, images)
    assert again is not first
    with torch.no_grad():
        assert rel_error(again.module(images), model(images)) < 1e-5


def test_no_twin_while_any_module_is_in_training_mode(small_cnn, images):
    assert twin(small_cnn, images) is not None
    small_cnn.bn1.train()  # e.g. Monte Carlo dropout: the model is meant to behave differently
    assert twin(small_cnn, images) is None
    small_cnn.bn1.eval()
    assert twin(small_cnn, images) is not None


class ReluFeedsTwo(nn.Module):
    """An in-place ReLU whose input is also read elsewhere: that reader sees the ReLU'd tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv(x)
        pooled = self.pool(self.relu(y))
        return self.fc(torch.cat([pooled.mean((2, 3)), y.mean((2, 3))], 1))


def test_relu_and_pool_stay_in_order_when_the_relu_input_has_other_readers(images):
    model = seeded(ReluFeedsTwo)
    fast = twin(model, images)
    order = call_order(fast)
    assert order[:3] == ["Conv2d", "ReLU", "MaxPool2d"]
    with torch.no_grad():
        assert rel_error(fast.module(images), model(images)) < 1e-5


@pytest.mark.parametrize("fused", [False, True])
def test_checksums_repeat_and_move_with_in_place_edits(fused):
    from insights.engine.fast.twin import checksums

    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(4, 3, 3, generator=gen), torch.randn(7, generator=gen)]
    first = checksums(tensors, fused)
    assert checksums(tensors, fused) == first
    for edit in (lambda t: t.neg_(), lambda t: t.mul_(1.001), lambda t: t.zero_(),
                 lambda t: t.add_(1e-3), lambda t: t.fill_(0.5)):
        copy_ = [t.clone() for t in tensors]
        edit(copy_[1])
        assert checksums(copy_, fused) != first
    # Equal L1 norms before and after, and equal L1 norms after adding 0.25: the L2 norm differs.
    pair = [torch.tensor([1.0, -1.0])]
    assert checksums(pair, fused) != checksums([torch.tensor([1.5, -0.5])], fused)
