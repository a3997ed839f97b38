"""Modified-backward methods (insights/engine/families/rules.py): DeepLift, guided backpropagation and
deconvolution — parity with Captum, summation-to-delta, per-call rules on re-used modules."""
from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import Deconvolution as CaptumDeconvolution
from captum.attr import DeepLift as CaptumDeepLift
from captum.attr import GuidedBackprop as CaptumGuidedBackprop
from torch import nn

import insights
from insights.engine.context import Context
from insights.engine.families.rules import guided_gradient

from conftest import logits, rel_error, seeded

TARGETS = [3, 7]




def assert_sums_to_delta(model, x, attr, baseline, target, tol=1e-3):
    delta = logits(model, x, target) - logits(model, baseline, target)
    assert delta.abs().min() > 1e-3  # the check means something
    assert ((attr.sum((1, 2, 3)) - delta).abs() / delta.abs()).max() < tol


def captum(cls, model, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns that it sets hooks
        return cls(model).attribute(x.clone(), **kwargs)


@pytest.fixture(params=["small_cnn", "resnet18"])
def model(request):
    return request.getfixturevalue(request.param)


class Activations(nn.Module):
    """Every supported nonlinearity once, plus ReLU straight into an overlapping MaxPool2d."""

    def __init__(self):
        super().__init__()
        acts = [nn.ReLU6(), nn.ELU(), nn.LeakyReLU(0.1), nn.Sigmoid(), nn.Tanh(), nn.SiLU(),
                nn.GELU(), nn.Hardtanh(-0.5, 0.5), nn.Hardswish(), nn.Softplus()]
        layers: list[nn.Module] = []
        for act in acts:
            layers += [nn.Conv2d(4 if layers else 3, 4, 3, padding=1), act]
        self.body = nn.Sequential(*layers, nn.ReLU(), nn.MaxPool2d(3, 2, padding=1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
        for conv in self.body[0:-2:2]:  # keep the signal alive through twenty layers
            nn.init.normal_(conv.weight, std=2.0 / (conv.in_channels * 9) ** 0.5)

    def forward(self, x):
        return self.head(self.body(x))


class Reused(nn.Module):
    """One ReLU module called twice (like torchvision's BasicBlock)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x) + x)
        return self.fc(x.mean((2, 3)))


class Separate(Reused):
    """The same network with a separate ReLU module per call."""

    def __init__(self):
        super().__init__()
        self.relu_b = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu_b(self.conv2(x) + x)
        return self.fc(x.mean((2, 3)))


# --------------------------------------------------------------------------- DeepLift


@pytest.mark.parametrize("baseline", ["float", "tensor"])
def test_deeplift_matches_captum_on_small_cnn(small_cnn, images, baseline):
    base = 0.1 if baseline == "float" else \
        0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    ours = insights.attribute(small_cnn, images, "deeplift", TARGETS, baselines=base)
    theirs = captum(CaptumDeepLift, small_cnn, images, target=TARGETS, baselines=base)
    assert rel_error(ours, theirs) <= 1e-4
    assert_sums_to_delta(small_cnn, images, ours, torch.as_tensor(base).expand_as(images), TARGETS)


def test_deeplift_on_resnet18_sums_to_delta_where_captum_raises(resnet18, images):
    baseline = torch.full_like(images, -0.2)
    attr = insights.attribute(resnet18, images, "deeplift", TARGETS, baselines=baseline)
    assert_sums_to_delta(resnet18, images, attr, baseline, TARGETS)
    # Captum keeps per-module state, so the ReLU each BasicBlock calls twice breaks it.
    with pytest.raises(RuntimeError, match="used more than once"):
        captum(CaptumDeepLift, resnet18, images, target=TARGETS, baselines=baseline)


def test_deeplift_sums_to_delta_for_every_supported_nonlinearity(images):
    model = seeded(Activations, seed=3)
    x = images[:, :, :16, :16]
    attr = insights.attribute(model, x, "deeplift", [1, 4], baselines=0.25)
    assert_sums_to_delta(model, x, attr, torch.full_like(x, 0.25), [1, 4], tol=1e-4)
    grad = insights.attribute(model, x, "input_x_gradient", [1, 4])
    assert rel_error(attr, grad) > 0.05  # the rules changed the backward pass


def test_deeplift_sums_to_delta_with_overlapping_pool_windows(images):
    def build():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3, 2, padding=1),
                             nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    model, x, base = seeded(build, seed=6), images[:, :, :16, :16], torch.full((2, 3, 16, 16), 0.1)
    ours = insights.attribute(model, x, "deeplift", [1, 2], baselines=base)
    assert_sums_to_delta(model, x, ours, base, [1, 2], tol=1e-4)
    # Captum 0.9 routes with max_unpool2d, which keeps one of the values sent to a position.
    theirs = captum(CaptumDeepLift, model, x, target=[1, 2], baselines=base)
    delta = logits(model, x, [1, 2]) - logits(model, base, [1, 2])
    assert ((theirs.detach().sum((1, 2, 3)) - delta).abs() / delta.abs()).max() > 0.01


def gate_then_linear(gate: nn.Module, weights: list[float]) -> nn.Module:
    """Flatten a 1×1×2×2 input, apply ``gate`` elementwise, then one bias-free linear unit."""
    lin = nn.Linear(len(weights), 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([weights]))
    return nn.Sequential(nn.Flatten(), gate, lin)


def test_deeplift_rescale_rule_on_a_relu_has_the_known_answer():
    model = gate_then_linear(nn.ReLU(), [1.0, -2.0, 3.0, 0.5])
    x = torch.tensor([2.0, 1.0, -1.0, 0.3]).view(1, 1, 2, 2)
    attr = insights.attribute(model, x, "deeplift", 0, baselines=torch.tensor([0.0, 3.0, 1.0, 0.3]).view(1, 1, 2, 2))
    # w_i (relu(x_i) - relu(b_i)); the unchanged last pixel gets nothing.
    assert torch.allclose(attr.flatten(), torch.tensor([2.0, 4.0, -3.0, 0.0]))


def test_deeplift_maxpool_rule_has_the_known_answer():
    model = nn.Sequential(nn.MaxPool2d(2), nn.Flatten())
    x = torch.tensor([1.0, 3.0, 2.0, 0.0]).view(1, 1, 2, 2)
    base = torch.tensor([2.5, 0.0, 0.5, 0.0]).view(1, 1, 2, 2)
    attr = insights.attribute(model, x, "deeplift", 0, baselines=base)
    # y - y_ref = 3 - 2.5: max(y, y_ref) - y_ref = 0.5 goes to the input's arg-max (pixel 1),
    # y - max = 0 to the baseline's arg-max (pixel 0).
    assert torch.allclose(attr.flatten(), torch.tensor([0.0, 0.5, 0.0, 0.0]))


def test_deeplift_treats_each_call_of_a_reused_module_separately(images):
    reused, separate = seeded(Reused, seed=4), seeded(Separate, seed=4)
    x = images[:, :, :12, :12]
    a = insights.attribute(reused, x, "deeplift", [0, 2], baselines=0.1)
    b = insights.attribute(separate, x, "deeplift", [0, 2], baselines=0.1)
    assert torch.allclose(a, b, atol=1e-6 * float(b.abs().max()))
    assert_sums_to_delta(reused, x, a, torch.full_like(x, 0.1), [0, 2], tol=1e-4)
    assert reused.relu.inplace is True


def test_deeplift_chunks_and_counts_two_passes_per_image(small_cnn, images):
    seen = []
    whole = insights.attribute(small_cnn, images, "deeplift", TARGETS)
    split = insights.attribute(small_cnn, images, "deeplift", TARGETS, memory_budget=1,
                               progress=lambda d, t: seen.append((d, t)))
    assert seen == [(2, 4), (4, 4)]
    assert torch.allclose(whole, split, atol=1e-6 * float(whole.abs().max()))
    assert insights.method_info("deeplift")["cost"] == {"forward": 2, "backward": 2}


def test_deeplift_noise_tunnel(small_cnn, images):
    plain = insights.attribute(small_cnn, images, "deeplift", TARGETS, baselines=0.1)
    smooth = insights.attribute(small_cnn, images, "deeplift", TARGETS, baselines=0.1,
                                nt_type="smoothgrad", nt_samples=2, stdevs=0.0)
    assert torch.allclose(smooth, plain, atol=1e-6 * float(plain.abs().max()))
    noisy = [insights.attribute(small_cnn, images, "deeplift", TARGETS, nt_type="vargrad",
                                nt_samples=2, stdevs=0.3, seed=s) for s in (1, 1, 2)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.allclose(noisy[0], noisy[2])
    assert noisy[0].min() >= 0


# --------------------------------------------------------------------------- ReLU gates


@pytest.mark.parametrize("method,cls", [("guided_backprop", CaptumGuidedBackprop),
                                        ("deconvolution", CaptumDeconvolution)])
def test_gates_match_captum(model, images, method, cls):
    ours = insights.attribute(model, images, method, TARGETS)
    theirs = captum(cls, model, images, target=TARGETS)
    assert rel_error(ours, theirs) <= 1e-4
    grad = insights.attribute(model, images, "saliency", TARGETS, abs=False)
    assert rel_error(ours, grad) > 0.05


def test_relu6_is_a_gate():
    model = gate_then_linear(nn.ReLU6(), [1.0, -2.0, 3.0, 4.0])
    x = torch.tensor([2.0, 1.0, -1.0, 7.0]).view(1, 1, 2, 2)
    guided = insights.attribute(model, x, "guided_backprop", 0)
    deconv = insights.attribute(model, x, "deconvolution", 0)
    assert guided.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]  # positive and inside (0, 6)
    assert deconv.flatten().tolist() == [1.0, 0.0, 3.0, 4.0]  # positive, whatever the input


@pytest.mark.parametrize("method", ["guided_backprop", "deconvolution"])
def test_gates_treat_each_call_of_a_reused_module_separately(images, method):
    reused, separate = seeded(Reused, seed=5), seeded(Separate, seed=5)
    x = images[:, :, :12, :12]
    a = insights.attribute(reused, x, method, [1, 3])
    b = insights.attribute(separate, x, method, [1, 3])
    assert torch.equal(a, b)


def test_guided_gradient_is_reusable(small_cnn, images):
    target = torch.tensor(TARGETS)
    ctx = Context(model=small_cnn, inputs=images, target=target, total=2)
    ours = guided_gradient(ctx, images, target)
    assert ctx.done == 2
    assert torch.equal(ours, insights.attribute(small_cnn, images, "guided_backprop", TARGETS))
    assert not small_cnn.relu1._forward_hooks and small_cnn.relu1.inplace is True
    with pytest.raises(insights.ParamError) as err:
        guided_gradient(ctx, images, target, rule="lrp")
    assert err.value.field == "rule"


def test_gates_noise_tunnel(small_cnn, images):
    plain = insights.attribute(small_cnn, images, "guided_backprop", TARGETS)
    sq = insights.attribute(small_cnn, images, "guided_backprop", TARGETS,
                            nt_type="smoothgrad_sq", nt_samples=2, stdevs=0.0)
    assert torch.allclose(sq, plain ** 2, atol=1e-6 * float(plain.abs().max()) ** 2)
    info = insights.method_info("guided_backprop", {"nt_type": "vargrad"})
    assert info["signed"] is False and info["cost"] == {"forward": 10, "backward": 10}


@pytest.mark.parametrize("method", ["deeplift", "guided_backprop", "deconvolution"])
def test_rule_methods_take_the_model_exclusively_and_are_signed(method):
    from insights.engine import registry

    assert registry.get(method).exclusive is True
    info = insights.method_info(method)
    assert info["signed"] is True and info["family"] == "gradient" and info["output"] == "pixel"
