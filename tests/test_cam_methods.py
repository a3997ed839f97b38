"""Grad-CAM and Guided Grad-CAM: parity with Captum, layer choice, hooks left behind, errors."""
import pytest
import torch
from torch import nn

import insights
from insights import ParamError

import captum.attr as captum_attr


def assert_close(ours, theirs, rel=1e-4):
    theirs = theirs.detach()
    assert ours.shape == theirs.shape
    err = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    assert scale > 0
    assert err <= rel * scale, f"max |ours - captum| = {err:.3g}, max |captum| = {scale:.3g}"


def captum_grad_cam(model, layer, x, target, relu=False):
    cam = captum_attr.LayerGradCam(model, layer).attribute(x, target, relu_attributions=relu)
    return captum_attr.LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear")


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


class SharedBlock(nn.Module):
    """Calls the same convolution twice: Grad-CAM must use its last call."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.shared(x))
        x = torch.relu(self.shared(x))
        return self.fc(self.pool(x).flatten(1))


@pytest.mark.parametrize("layer", ["layer4", "layer3", "layer2.1.conv1"])
@pytest.mark.parametrize("relu", [False, True])
def test_grad_cam_matches_captum_resnet18(resnet18, layer, relu):
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([208, 3])
    ours = insights.attribute(resnet18, x, "grad_cam", target, layer=layer, relu_attributions=relu)
    theirs = captum_grad_cam(resnet18, resnet18.get_submodule(layer), x, target, relu)
    assert ours.shape == (2, 1, 96, 96)
    assert_close(ours, theirs)
    if relu:
        assert ours.min() >= 0
    assert no_hooks_left(resnet18)


@pytest.mark.parametrize("layer", ["conv2", "bn1", None])
def test_grad_cam_matches_captum_small_cnn(small_cnn, images, layer):
    """bn1 is followed by an in-place ReLU: the kept activation must be the pre-ReLU one."""
    info = {}
    ours = insights.attribute(small_cnn, images, "grad_cam", 4, layer=layer, info=info)
    name = layer or "avgpool"  # the last module with a spatial output
    assert info["layer"] == name
    theirs = captum_grad_cam(small_cnn, small_cnn.get_submodule(name), images, 4)
    assert_close(ours, theirs)


def test_grad_cam_uses_the_last_call_of_a_shared_module():
    torch.manual_seed(2)
    model = SharedBlock().eval()
    x = torch.randn(2, 3, 16, 16)
    ours = insights.attribute(model, x, "grad_cam", 1, layer="shared")
    theirs = captum_grad_cam(model, model.shared, x, 1)
    assert_close(ours, theirs)
    # Different from the map of the first call: recompute it with a hook that keeps only that.
    calls = []
    handle = model.shared.register_forward_hook(lambda m, i, o: calls.append(o))
    with torch.enable_grad():
        logits = model(x)
    handle.remove()
    first_grad = torch.autograd.grad(logits[:, 1].sum(), calls[0])[0]
    first = (first_grad.mean((2, 3), keepdim=True) * calls[0]).sum(1, keepdim=True).detach()
    assert not torch.allclose(ours, first, atol=1e-6)


def test_default_layer_is_layer4_for_resnet18(resnet18, images):
    info = {}
    out = insights.attribute(resnet18, images, "grad_cam", 208, info=info)
    assert info["layer"] == "layer4"
    explicit = insights.attribute(resnet18, images, "grad_cam", 208, layer="layer4")
    torch.testing.assert_close(out, explicit)
    empty = insights.attribute(resnet18, images, "grad_cam", 208, layer="  ")  # empty form field
    torch.testing.assert_close(empty, explicit)


def test_unknown_layer_raises_param_error(resnet18, images):
    with pytest.raises(ParamError) as err:
        insights.attribute(resnet18, images, "grad_cam", 208, layer="layer9")
    assert err.value.field == "layer"
    assert "layer9" in str(err.value) and "layer" in str(err.value)
    assert no_hooks_left(resnet18)


def test_non_spatial_layer_raises_param_error_and_leaves_no_hooks(resnet18, images):
    with pytest.raises(ParamError) as err:
        insights.attribute(resnet18, images, "grad_cam", 208, layer="fc")
    assert err.value.field == "layer" and "spatial" in str(err.value)
    assert no_hooks_left(resnet18)


def test_layer_must_be_a_string(small_cnn, images):
    with pytest.raises(ParamError) as err:
        insights.attribute(small_cnn, images, "grad_cam", 0, layer=4)
    assert err.value.field == "layer" and "string" in str(err.value)


def test_grad_cam_describes_itself():
    meta = insights.method_info("grad_cam")
    assert meta["family"] == "cam" and meta["output"] == "cam"
    assert meta["signed"] is True
    assert insights.method_info("grad_cam", {"relu_attributions": True})["signed"] is False
    layer = next(p for p in meta["params"] if p["name"] == "layer")
    assert layer["type"] == "string" and layer["default"] is None
    assert meta["cost"] == {"forward": 1, "backward": 1}
    assert insights.method_info("guided_grad_cam")["cost"] == {"forward": 2, "backward": 2}


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_guided_grad_cam_matches_captum_resnet18(resnet18, mode):
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([208, 17])
    ours = insights.attribute(resnet18, x, "guided_grad_cam", target, interpolate_mode=mode)
    theirs = captum_attr.GuidedGradCam(resnet18, resnet18.layer4).attribute(
        x, target, interpolate_mode=mode)
    assert ours.shape == x.shape
    assert_close(ours, theirs)
    assert no_hooks_left(resnet18)
    assert all(getattr(m, "inplace", False) is True for m in resnet18.modules()
               if isinstance(m, nn.ReLU))  # in-place flags restored


def test_guided_grad_cam_matches_captum_small_cnn(small_cnn, images):
    progress = []
    ours = insights.attribute(small_cnn, images, "guided_grad_cam", 6, layer="conv3",
                              progress=lambda d, t: progress.append((d, t)))
    theirs = captum_attr.GuidedGradCam(small_cnn, small_cnn.conv3).attribute(images, 6)
    assert_close(ours, theirs)
    assert progress[-1] == (4, 4)  # two passes per image, two images
