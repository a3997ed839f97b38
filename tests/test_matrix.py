"""Model × method matrix (issue 12, part 5), through the Python API: every registered method on
torchvision architectures with random seeded weights at 1×3×64×64. Each cell is either a finite,
non-zero map of the method's output shape (with its completeness checked where the method records
an exact delta), or an ``InsightsError`` a caller can act on (ParamError / UnsupportedModel, the
API's 4xx) with a message — never any other exception.

The TorchScript, exported and 1-channel config models are covered (engine and HTTP API) in
tests/test_own_models.py."""
from __future__ import annotations

import pytest
import torch
import torchvision.models as tv
from torch import nn

import insights
from conftest import logits, seeded
from insights.engine import ParamError, UnsupportedModel, registry

SIZE = 64
TARGET = 1


def fan_in(model: nn.Module) -> nn.Module:
    """torchvision's fan_out init makes each depthwise conv shrink the signal (~30× a stage on
    EfficientNet): with random weights the output no longer depends on the input (f(x) - f(0) ~ 1e-8
    on MobileNetV3 and EfficientNet) and every delta is noise. Fan-in keeps the signal alive."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in")
    return model


def _vit_b_16() -> nn.Module:
    model = tv.vit_b_16(image_size=SIZE, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-inits the head: every map is 0
    return model


ARCHS = {
    "resnet18": lambda: tv.resnet18(num_classes=10),
    "densenet121": lambda: tv.densenet121(num_classes=10),
    "mobilenet_v3_small": lambda: fan_in(tv.mobilenet_v3_small(num_classes=10)),
    "efficientnet_b0": lambda: fan_in(tv.efficientnet_b0(num_classes=10)),
    "convnext_tiny": lambda: tv.convnext_tiny(num_classes=10),
    "swin_t": lambda: tv.swin_t(num_classes=10),
    "vit_b_16": _vit_b_16,
    "regnet_y_400mf": lambda: tv.regnet_y_400mf(num_classes=10),
}

CHEAP = {"integrated_gradients": {"n_steps": 4}, "gradient_shap": {"n_samples": 2},
         "occlusion": {"sliding_window_shapes": (3, 32, 32), "strides": (3, 32, 32)},
         "feature_ablation": {"patch_size": 32}}

# Cells whose exact completeness is known not to hold: the delta must be recorded (the page warns)
# but may be large. DeepLift's rescale rule does not cover LayerNorm (ConvNeXt, Swin, ViT) or
# attention (ViT); DenseNet applies a functional F.relu in forward() that no module rule sees (with
# that ReLU as a module its delta is 3e-5; 0.099 as built); MobileNetV3 (0.41) and EfficientNet
# (0.58) have squeeze-excitation gates (input × scale(input), and MobileNetV3's nn.Hardsigmoid is in
# neither of rules.py's lists). IG's delta is checked separately below with enough steps: at 4 steps
# it is a quadrature error, not a property of the model.
KNOWN_INCOMPLETE = {("convnext_tiny", "deeplift"), ("swin_t", "deeplift"), ("vit_b_16", "deeplift"),
                    ("densenet121", "deeplift"), ("mobilenet_v3_small", "deeplift"),
                    ("efficientnet_b0", "deeplift")}
COMPLETE_THRESHOLD = 0.05

CELLS = [(arch, method) for arch in ARCHS for method in registry.ids()]  # arch-major: one model at a time


@pytest.fixture(scope="module")
def model_cache():
    return {}


def build(cache: dict, arch: str) -> nn.Module:
    if arch not in cache:
        cache.clear()  # keep one model alive at a time (ViT-B alone is 350 MB)
        cache[arch] = seeded(ARCHS[arch]).eval()
    return cache[arch]


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def check_delta(arch: str, method: str, info: dict, model: nn.Module, x: torch.Tensor) -> None:
    if "delta" not in info:
        return
    assert isinstance(info["delta"], float) and info["delta"] >= 0, info
    assert info["delta_kind"] in ("exact", "expected")
    if (info["delta_kind"] != "exact" or method == "integrated_gradients"
            or (arch, method) in KNOWN_INCOMPLETE):
        return  # recorded, so the page shows it (and warns above the threshold)
    gap = abs(float(logits(model, x, [TARGET]) - logits(model, torch.zeros_like(x), [TARGET])))
    assert gap > 1e-4, f"{arch}: the score barely depends on the input ({gap}); the delta means nothing"
    assert info["delta"] < COMPLETE_THRESHOLD, (arch, method, info["delta"], info.get("uncovered"))


@pytest.mark.parametrize("arch,method", CELLS, ids=[f"{a}-{m}" for a, m in CELLS])
def test_cell_is_a_map_or_a_documented_refusal(arch, method, model_cache, image):
    model = build(model_cache, arch)
    info: dict = {}
    try:
        out = insights.attribute(model, image, method, TARGET, info=info, **CHEAP.get(method, {}))
    except (ParamError, UnsupportedModel) as refused:  # anything else fails the cell
        assert str(refused), f"{arch}/{method}: refused without a message"
        return
    channels = 1 if insights.method_info(method)["output"] == "cam" else 3
    assert out.shape == (1, channels, SIZE, SIZE), out.shape
    assert torch.isfinite(out).all(), f"{arch}/{method}: non-finite map"
    if method == "guided_grad_cam" and out.abs().max() == 0:
        # guided backprop × ReLU(Grad-CAM): legitimately zero only where Grad-CAM has no positive part
        cam = insights.attribute(model, image, "grad_cam", TARGET)
        assert cam.clamp(min=0).max() == 0, f"{arch}: Guided Grad-CAM is zero where Grad-CAM is not"
    else:
        assert out.abs().max() > 0, f"{arch}/{method}: all-zero map"
    check_delta(arch, method, info, model, image)


# IG is exact only in the limit: with 64 steps it converges on every architecture but ConvNeXt,
# whose LayerNorm jumps on the path from an all-zero baseline (delta 1.0 at 4 and at 64 steps).
IG_CONVERGES = [a for a in ARCHS if a != "convnext_tiny"]


@pytest.mark.parametrize("arch", IG_CONVERGES)
def test_integrated_gradients_converges_on_the_architectures_it_should(arch, model_cache, image):
    model = build(model_cache, arch)
    info: dict = {}
    insights.attribute(model, image, "integrated_gradients", TARGET, info=info, n_steps=64)
    assert info["delta_kind"] == "exact" and info["delta"] < COMPLETE_THRESHOLD, info["delta"]


UNNAMED = pytest.mark.xfail(strict=True, raises=AssertionError,
                            reason="engine gap: DeepLift's delta is above the threshold but "
                                   "info['uncovered'] is [] (functional ops and SE gates are not named)")


@pytest.mark.parametrize("arch", [pytest.param(a, marks=UNNAMED) if a in
                                  ("densenet121", "mobilenet_v3_small", "efficientnet_b0") else a
                                  for a in ARCHS])
def test_deeplift_names_a_cause_when_its_delta_is_too_large(arch, model_cache, image):
    model = build(model_cache, arch)
    info: dict = {}
    insights.attribute(model, image, "deeplift", TARGET, info=info)
    if info["delta"] >= COMPLETE_THRESHOLD:
        assert info["uncovered"], (arch, info["delta"])
