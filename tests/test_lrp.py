"""LRP (insights/engine/families/lrp.py): equal to Captum's LRP where Captum handles the model
(VGG-11 without batch norm, a small conv net; epsilon and gamma rules), equal to the textbook
rules written out by hand on a network with a skip connection, conservation on a bias-free
ResNet-18, batch-norm folding, refusals that name the layer, and the model left as it was."""
from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import insights
from conftest import rel_error, seeded
from insights.engine import Cancelled, UnsupportedModel
from insights.engine.families.lrp import fold_batch_norm

TARGETS = [1, 5]


def captum_lrp(model: nn.Module, x: torch.Tensor, target, rules: dict | None = None) -> torch.Tensor:
    """Captum's LRP on a copy of ``model`` (Captum sets attributes on the modules), with
    ``rules`` {module type: rule factory} set on the copy's layers (else Captum's defaults)."""
    from captum.attr import LRP

    twin = copy.deepcopy(model)
    for module in twin.modules():
        for kind, make in (rules or {}).items():
            if type(module) is kind:
                module.rule = make()
    return LRP(twin).attribute(x.clone().requires_grad_(True), target=target).detach()


def captum_rules(rule: str, epsilon: float = 1e-9) -> dict:
    """The Captum rules that ``rule`` assigns: epsilon on every layer with a rule, gamma on
    convolutions and linear layers, or gamma on convolutions only (composite)."""
    from captum.attr._utils.lrp_rules import EpsilonRule, GammaRule

    eps = lambda: EpsilonRule(epsilon=epsilon)  # noqa: E731
    rules = {kind: eps for kind in (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d,
                                    nn.AdaptiveAvgPool2d, nn.BatchNorm2d)}
    if rule in ("gamma", "composite"):
        rules[nn.Conv2d] = GammaRule
    if rule == "gamma":
        rules[nn.Linear] = GammaRule
    return rules


class SmallNet(nn.Module):
    """Layers Captum's LRP has rules for, with no module used twice and flatten as a function
    (Captum refuses nn.Flatten): convolutions, ReLU, Tanh, a batch norm after an activation,
    max, average and adaptive pooling, dropout and two linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, stride=2)
        self.tanh = nn.Tanh()
        self.pool2 = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(3)
        self.fc1 = nn.Linear(12 * 9, 16)
        self.relu2 = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = self.bn(self.pool1(self.relu1(self.conv1(x))))
        x = self.gap(self.pool2(self.tanh(self.conv2(x))))
        return self.fc2(self.drop(self.relu2(self.fc1(torch.flatten(x, 1)))))


@pytest.fixture(scope="module")
def vgg11() -> nn.Module:
    return seeded(lambda: torchvision.models.vgg11(weights=None), seed=3)


@pytest.fixture
def small_net() -> nn.Module:
    return seeded(SmallNet, seed=5)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))


@pytest.fixture
def small(images) -> torch.Tensor:
    """32×32 inputs, enough for a ResNet-18 (its last stage is 1×1 there)."""
    return images[:, :, :32, :32].contiguous()


# --------------------------------------------------------------------------- Captum parity


@pytest.mark.parametrize("params,rule,epsilon", [({}, "epsilon", 1e-9),
                                                 ({"epsilon": 0.5}, "epsilon", 0.5),
                                                 ({"rule": "gamma"}, "gamma", 1e-9)])
def test_vgg11_equals_captum(vgg11, images, params, rule, epsilon):
    ours = insights.attribute(vgg11, images, "lrp", TARGETS, **params)
    theirs = captum_lrp(vgg11, images, TARGETS, captum_rules(rule, epsilon) if params else None)
    assert rel_error(ours, theirs) < 1e-4
    if rule == "gamma":  # gamma is not gradient × input
        ixg = insights.attribute(vgg11, images, "input_x_gradient", TARGETS)
        assert rel_error(ixg, theirs) > 0.1


@pytest.mark.parametrize("params,rule,epsilon", [({}, "epsilon", 1e-9),
                                                 ({"epsilon": 1.0}, "epsilon", 1.0),
                                                 ({"rule": "gamma", "gamma": 0.7}, "gamma", 1e-9),
                                                 ({"rule": "composite"}, "composite", 1e-9)])
def test_small_net_equals_captum(small_net, images, params, rule, epsilon):
    from captum.attr._utils.lrp_rules import GammaRule

    rules = captum_rules(rule, epsilon)
    if "gamma" in params:
        rules[nn.Conv2d] = rules[nn.Linear] = lambda: GammaRule(gamma=params["gamma"])
    ours = insights.attribute(small_net, images, "lrp", TARGETS, **params)
    assert rel_error(ours, captum_lrp(small_net, images, TARGETS, rules)) < 1e-4


def test_folded_batch_norm_agrees_with_captums_unfolded_rule_under_epsilon(images):
    # Under the epsilon rule (small epsilon) folding changes nothing: Captum's rule on the
    # convolution and then on the batch norm gives the same map as ours on their fold.
    model = seeded(lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4)))
    info: dict = {}
    ours = insights.attribute(model, images, "lrp", [0, 3], info=info)
    assert info["lrp"]["folded_batch_norms"] == 1
    flat = nn.Sequential(model[0], model[1], model[2], model[3])  # Captum refuses nn.Flatten

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fc = flat, model[5]

        def forward(self, x):
            return self.fc(torch.flatten(self.body(x), 1))

    assert rel_error(ours, captum_lrp(Head(), images, [0, 3])) < 1e-4


# --------------------------------------------------------------------------- the rules by hand


class SkipMLP(nn.Module):
    """h = relu(fc1 x); o = relu(fc2 h) + h; out = fc3 o: a residual addition in forward()."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc3(F.relu(self.fc2(h)) + h)


def textbook_lrp(model: SkipMLP, x: np.ndarray, target: int, gamma: float, eps: float) -> np.ndarray:
    """LRP of one row written out in float64: R_j = a_j Σ_k w'_jk R_k / (z'_k + eps·sign z'_k)
    with w' = w + gamma·max(w, 0) and z'_k = Σ_j a_j w'_jk + b_k; the sum o = u + h splits
    R_o into u/o·R_o and h/o·R_o."""
    def params(fc):
        w = fc.weight.detach().double().numpy().T  # in × out
        return w, fc.bias.detach().double().numpy()

    def rule(a, fc, r_out):
        w, b = params(fc)
        w = w + gamma * np.maximum(w, 0)
        z = a @ w + b
        s = r_out / (z + eps * np.where(z >= 0, 1.0, -1.0))
        return a * (w @ s)

    (w1, b1), (w2, b2), (w3, b3) = params(model.fc1), params(model.fc2), params(model.fc3)
    h = np.maximum(x @ w1 + b1, 0)
    u = np.maximum(h @ w2 + b2, 0)
    o = u + h
    out = o @ w3 + b3
    r_out = np.zeros(3)
    r_out[target] = out[target]
    r_o = rule(o, model.fc3, r_out)
    share = np.divide(r_o, o, out=np.zeros_like(o), where=o != 0)  # R_o is 0 where o is
    r_u, r_skip = u * share, h * share
    r_h = rule(h, model.fc2, r_u) + r_skip
    return rule(x, model.fc1, r_h)


class AsImage(nn.Module):
    """SkipMLP on 1×6×1×1 "images", so the engine's N×C×H×W checks accept it."""

    def __init__(self, mlp: SkipMLP):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x.flatten(1))


@pytest.mark.parametrize("rule,gamma,eps", [("epsilon", 0.25, 1e-9), ("epsilon", 0.25, 0.3),
                                            ("gamma", 0.25, 1e-9), ("gamma", 1.5, 0.1)])
def test_residual_network_follows_the_rules_written_by_hand(rule, gamma, eps):
    mlp = seeded(SkipMLP, seed=2)
    x = torch.randn(4, 6, 1, 1, generator=torch.Generator().manual_seed(4))
    ours = insights.attribute(AsImage(mlp), x, "lrp", 2, rule=rule, gamma=gamma, epsilon=eps)
    g = gamma if rule == "gamma" else 0.0
    for row in range(4):
        expected = textbook_lrp(mlp, x[row].flatten().double().numpy(), 2, g, eps)
        np.testing.assert_allclose(ours[row].flatten().double().numpy(), expected, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- ResNets


def bias_free_resnet18() -> nn.Module:
    """A seeded ResNet-18 whose layers have no additive terms (batch-norm means and shifts and
    the classifier's bias are zero), so no relevance is absorbed by biases."""
    model = seeded(lambda: torchvision.models.resnet18(weights=None, num_classes=10), seed=1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.zero_()
            nn.init.zeros_(module.bias)
    nn.init.zeros_(model.fc.bias)
    return model


# In float64 with epsilon 1e-12 nothing is absorbed; what is left is the float32 rounding of
# the map the engine returns: on random weights the gamma rule's relevances cancel (their
# absolute values sum to ~1e5 times the logit), so its sums carry 1e-5 (gamma) to 3e-4
# (composite) of the logit; the epsilon rule's carry 2e-7.
@pytest.mark.parametrize("rule,tolerance", [("epsilon", 1e-5), ("gamma", 1e-4), ("composite", 1e-3)])
def test_resnet_relevance_is_conserved_without_biases(small, rule, tolerance):
    model, x = bias_free_resnet18().double(), small.double()
    info: dict = {}
    maps = insights.attribute(model, x, "lrp", TARGETS, rule=rule, epsilon=1e-12, info=info)
    with torch.no_grad():
        logit = model(x)[[0, 1], TARGETS]
    totals = maps.flatten(1).double().sum(1)
    assert ((totals - logit).abs() / logit.abs()).max() < tolerance, (totals, logit)
    assert info["lrp"] == {"rule": rule, "folded_batch_norms": 20, "plain_gradient": []}


def test_biases_absorb_relevance_beyond_the_conservation_tolerance(resnet18, small):
    # The conservation test can fail: with the batch norms' shifts and the classifier's bias
    # left in, part of the logit goes to the biases and the sums miss it by far more.
    maps = insights.attribute(resnet18, small, "lrp", TARGETS)
    with torch.no_grad():
        logit = resnet18(small)[[0, 1], TARGETS]
    assert ((maps.flatten(1).sum(1) - logit).abs() / logit.abs()).max() > 1e-2


def folded_copy(model: nn.Module) -> nn.Module:
    """A copy of a ResNet with every batch norm folded into the convolution before it (the
    convolution gets the folded weight and bias, the batch norm becomes an identity)."""
    twin = copy.deepcopy(model)
    pairs = [(twin, "conv1", "bn1")]
    for module in twin.modules():
        if isinstance(module, torchvision.models.resnet.BasicBlock):
            pairs += [(module, "conv1", "bn1"), (module, "conv2", "bn2")]
            if module.downsample is not None:
                pairs.append((module.downsample, "0", "1"))
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        weight, bias = fold_batch_norm(conv.weight, conv.bias, bn)
        new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                        conv.padding, bias=True, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
            new.bias.copy_(bias)
        setattr(parent, conv_name, new)
        setattr(parent, bn_name, nn.Identity())
    return twin


@pytest.mark.parametrize("bias", [False, True])
def test_fold_batch_norm_equals_the_unfolded_layers(bias):
    conv, bn = seeded(lambda: nn.Conv2d(4, 6, 3, padding=1, bias=bias)), seeded(lambda: nn.BatchNorm2d(6))
    a = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(0))
    weight, folded_bias = fold_batch_norm(conv.weight, conv.bias, bn)
    with torch.no_grad():
        torch.testing.assert_close(F.conv2d(a, weight, folded_bias, padding=1), bn(conv(a)),
                                   rtol=1e-5, atol=1e-5)


# The gamma rule divides by sums of mixed-sign terms that come near zero: with epsilon 1e-9,
# the rounding differences between the two networks' forward passes (1e-7) grow to 5e-3 of
# the map; epsilon 0.01 keeps them at 2e-4.
@pytest.mark.parametrize("params,tolerance", [({}, 1e-4), ({"rule": "gamma", "epsilon": 0.01}, 1e-3)])
def test_resnet_with_batch_norm_equals_the_folded_network(resnet18, small, params, tolerance):
    folded = folded_copy(resnet18)
    with torch.no_grad():
        torch.testing.assert_close(folded(small), resnet18(small), rtol=1e-4, atol=1e-4)
    info: dict = {}
    ours = insights.attribute(resnet18, small, "lrp", TARGETS, info=info, **params)
    assert info["lrp"]["folded_batch_norms"] == 20
    assert rel_error(ours, insights.attribute(folded, small, "lrp", TARGETS, **params)) < tolerance


# --------------------------------------------------------------------------- refusals


class WithGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.GELU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class Scaled(nn.Module):
    """A custom layer with a weight of its own."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


class Passthrough(nn.Module):
    """A parameter-free custom module (an identity); raises once armed."""

    armed = False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("armed")
        return x


def test_a_layer_without_a_rule_is_named(images):
    from insights.errors import describe

    with pytest.raises(UnsupportedModel) as refused:
        insights.attribute(seeded(WithGelu), images, "lrp", 0)
    assert str(refused.value).startswith("LRP has no rule for layer 'features.3' (GELU);")
    answer = describe(refused.value)  # what the HTTP API answers
    assert (answer.status, answer.code, answer.field) == (400, "unsupported_method", "method")

    with pytest.raises(UnsupportedModel, match=r"layer 'scaled' \(Scaled\)"):
        insights.attribute(with_scaled(), images, "lrp", 0)


def with_scaled() -> nn.Module:
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 3, 1))
    model.add_module("scaled", Scaled())
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    return model


def test_parameter_free_custom_modules_run_with_their_gradient_and_are_named(small_net, images):
    wrapped = nn.Sequential(Passthrough(), small_net)
    info: dict = {}
    ours = insights.attribute(wrapped, images, "lrp", TARGETS, info=info)
    assert info["lrp"]["plain_gradient"] == ["Passthrough"]
    assert torch.equal(ours, insights.attribute(small_net, images, "lrp", TARGETS))


def test_torchscript_is_refused_like_other_hook_methods(small_net, images):
    with pytest.raises(UnsupportedModel, match="TorchScript"):
        insights.attribute(torch.jit.trace(small_net, images), images, "lrp", 0)


# --------------------------------------------------------------------------- the model after


def state(model: nn.Module, x: torch.Tensor) -> tuple:
    with torch.no_grad():
        out = model(x)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                for m in model.modules())
    return ({k: v.clone() for k, v in model.state_dict().items()}, out, hooks,
            [getattr(m, "inplace", None) for m in model.modules()],
            [m.training for m in model.modules()], [p.grad for p in model.parameters()])


def assert_same(before: tuple, after: tuple) -> None:
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert torch.equal(before[1], after[1])
    assert before[2:] == after[2:] and after[2] == 0 and all(g is None for g in after[5])


def test_model_is_unchanged_after_a_call_and_after_errors(small_cnn, images):
    model = nn.Sequential(Passthrough(), small_cnn)  # conv → batch norm → in-place ReLU inside
    before = state(model, images)
    insights.attribute(model, images, "lrp", TARGETS, rule="gamma")
    assert_same(before, state(model, images))

    model[0].armed = True  # fails in the forward pass, with every hook installed
    with pytest.raises(RuntimeError, match="armed"):
        insights.attribute(model, images, "lrp", TARGETS, rule="composite")
    model[0].armed = False
    assert_same(before, state(model, images))

    stop = threading.Event()  # cancelled after the first of two batches
    with pytest.raises(Cancelled):
        insights.attribute(model, images, "lrp", TARGETS, memory_budget=1, cancel=stop,
                           progress=lambda done, total: stop.set())
    assert_same(before, state(model, images))


# --------------------------------------------------------------------------- the call


def test_maps_are_deterministic_batched_and_described(small_net, images):
    first = insights.attribute(small_net, images, "lrp", TARGETS, rule="gamma")
    assert first.shape == images.shape and first.dtype == torch.float32
    assert torch.equal(first, insights.attribute(small_net, images, "lrp", TARGETS, rule="gamma"))
    assert (first < 0).any() and (first > 0).any()
    seen = []
    batched = insights.attribute(small_net, images, "lrp", TARGETS)
    alone = insights.attribute(small_net, images, "lrp", TARGETS, memory_budget=1,  # one per batch
                               progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]
    assert rel_error(alone, batched) < 1e-5
    info = insights.method_info("lrp")
    assert info["signed"] and info["family"] == "gradient" and info["cost"] == {"forward": 1, "backward": 1}
    assert {p["name"]: p["default"] for p in info["params"]}.items() >= {
        "rule": "epsilon", "epsilon": 1e-9, "gamma": 0.25}.items()
