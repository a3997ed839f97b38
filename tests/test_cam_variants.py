"""Grad-CAM++, XGrad-CAM, LayerCAM, Eigen-CAM and Score-CAM: parity with the `grad-cam` package
(test-only oracle) after its post-processing, Score-CAM's passes, progress and cancel, Eigen-CAM's
sign, and the CAM variants sharing one forward and backward pass in attribute_many."""
import threading

import numpy as np
import pytest
import torch
from torch import nn

import insights
from insights import ParamError
from insights.engine.probe import probe

from pytorch_grad_cam import EigenCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

ORACLES = {"grad_cam_plus_plus": GradCAMPlusPlus, "xgrad_cam": XGradCAM, "layer_cam": LayerCAM,
           "eigen_cam": EigenCAM, "score_cam": ScoreCAM}
GRADIENT_CAMS = ["grad_cam", "grad_cam_plus_plus", "xgrad_cam", "layer_cam"]


def oracle(method, model, layer, x, targets, sign=1.0):
    """grad-cam's map (N×H×W, rectified and min-max scaled per image); ``sign`` = -1 flips the
    layer map before its ReLU (Eigen-CAM's principal direction has no sign of its own)."""
    base = ORACLES[method]

    class Flipped(base):
        def get_cam_image(self, *args, **kwargs):
            return sign * super().get_cam_image(*args, **kwargs)

    cam = Flipped(model, [model.get_submodule(layer)])
    try:
        return cam(x, [ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        cam.activations_and_grads.release()


def post(ours):
    """grad-cam's post-processing on our N×1×H×W map: ReLU, min-max scaling per image, resize
    (here to the same size), and its final min-max scaling."""
    cam = np.maximum(ours[:, 0].numpy(), 0)
    return scale_cam_image(scale_cam_image(cam, (cam.shape[2], cam.shape[1])))


def correlations(ours, theirs):
    """Per image: Pearson correlation, or 1.0 where both maps are flat (all negative before the
    ReLU), or 0.0 where only one is."""
    out = []
    for a, b in zip(post(ours), theirs):
        flat_a, flat_b = np.ptp(a) == 0, np.ptp(b) == 0
        out.append(float(flat_a and flat_b) if flat_a or flat_b else float(np.corrcoef(a.ravel(), b.ravel())[0, 1]))
    return out


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


def count_rows(model):
    """A forward pre-hook counting the rows each model call gets; returns (calls, handle)."""
    calls = []
    handle = model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    return calls, handle


CASES = [  # model fixture, layer, input side
    ("resnet18", "layer4", 128),
    ("resnet18", "layer3", 128),
    ("small_cnn", "conv3", 64),
    ("small_cnn", "conv2", 64),
]


@pytest.mark.parametrize("method", ["grad_cam_plus_plus", "xgrad_cam", "layer_cam", "eigen_cam"])
@pytest.mark.parametrize("model_name,layer,side", CASES)
@pytest.mark.parametrize("targets", [[208, 3], [1, 7]])
def test_matches_grad_cam_package(request, method, model_name, layer, side, targets):
    # relu_attributions: grad-cam rectifies at the layer's resolution, before resizing; our
    # default keeps the sign, and rectifying after the resize differs a little at zero crossings.
    model = request.getfixturevalue(model_name)
    targets = [t % 10 for t in targets] if model_name == "small_cnn" else targets
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(side + targets[0]))
    ours = insights.attribute(model, x, method, targets, layer=layer, relu_attributions=True)
    assert ours.shape == (2, 1, side, side) and ours.min() >= 0
    best = correlations(ours, oracle(method, model, layer, x, targets))
    if method == "eigen_cam":  # up to sign
        flipped = correlations(ours, oracle(method, model, layer, x, targets, sign=-1.0))
        best = [max(a, b) for a, b in zip(best, flipped)]
    assert min(best) >= 0.999, best
    assert ours.abs().amax(dim=(1, 2, 3)).min() > 0 or method == "xgrad_cam"
    assert no_hooks_left(model)


@pytest.mark.parametrize("model_name,layer,side,rows", [("resnet18", "layer4", 96, 1),
                                                        ("small_cnn", "conv3", 64, 2),
                                                        ("small_cnn", "avgpool", 64, 2)])
def test_score_cam_matches_grad_cam_package(request, model_name, layer, side, rows):
    model = request.getfixturevalue(model_name)
    targets = [5, 2][:rows]
    x = torch.randn(rows, 3, side, side, generator=torch.Generator().manual_seed(4))
    ours = insights.attribute(model, x, "score_cam", targets, layer=layer, relu_attributions=True)
    assert min(correlations(ours, oracle("score_cam", model, layer, x, targets))) >= 0.999
    assert no_hooks_left(model)


def test_signed_maps_keep_their_negative_part(resnet18):
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    # (Grad-CAM++ and LayerCAM at layer4 are never negative: non-negative weights and
    # activations after a ReLU.)
    for method in ["xgrad_cam", "eigen_cam"]:
        signed = insights.attribute(resnet18, x, method, [208, 3])
        rectified = insights.attribute(resnet18, x, method, [208, 3], relu_attributions=True)
        assert signed.min() < 0 and rectified.min() >= 0
        # Bilinear weights are convex, so rectifying before resizing (at the layer) gives at
        # least the rectified resized map, and the same where every neighbour is positive.
        gap = rectified - torch.relu(signed)
        assert gap.min() >= -1e-5 * signed.abs().max()
        assert (gap.abs() <= 1e-5 * signed.abs().max()).float().mean() > 0.3


class Known(nn.Module):
    """The layer ``feat`` outputs its input: rank-one activations a ⊗ f plus nothing else."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.feat(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_eigen_cam_is_the_principal_projection_oriented_with_the_mean(direction):
    f = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    a = direction * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    ours = insights.attribute(Known().eval(), a * f, "eigen_cam", 0, layer="feat")
    # The projection on a/|a| of the centred activations is (f - mean f) |a| up to sign; the
    # sign makes the map follow the channel mean, direction × 2 f.
    expected = direction * (f - f.mean()) * a.norm()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_score_cam_makes_one_forward_per_channel_in_budget_sized_batches(small_cnn, images):
    assert insights.method_info("score_cam", {"layer": "conv3"}, (3, 64, 64), small_cnn)["cost"] == \
        {"forward": 17, "backward": 0}  # conv3 has 16 channels, plus the pass that reads them
    rows, handle = count_rows(small_cnn)
    seen = []
    try:
        tight = insights.attribute(small_cnn, images, "score_cam", [1, 2], layer="conv3", memory_budget=1,
                                   progress=lambda done, total: seen.append((done, total)))
        assert rows == [1] * 34  # one image per batch: 2 reading passes, 2 × 16 masked inputs
        rows.clear()
        roomy = insights.attribute(small_cnn, images, "score_cam", [1, 2], layer="conv3")
        assert sum(rows) == 34 and len(rows) < 34
    finally:
        handle.remove()
    torch.testing.assert_close(tight, roomy, rtol=1e-5, atol=1e-6)
    assert {total for _, total in seen} == {34}
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) == 34
    assert seen[-1] == (34, 34)


def test_score_cam_stops_when_cancelled(small_cnn, images):
    stop = threading.Event()
    probe(small_cnn, images)  # the model's one-off probe pass, before counting
    rows, handle = count_rows(small_cnn)
    try:
        with pytest.raises(insights.Cancelled):
            insights.attribute(small_cnn, images, "score_cam", 1, layer="conv3", memory_budget=1,
                               cancel=stop, progress=lambda done, total: done >= 4 and stop.set())
    finally:
        handle.remove()
    assert sum(rows) == 4  # two reading passes and two masked inputs, then nothing
    assert no_hooks_left(small_cnn)


def test_cam_variants_share_one_forward_and_backward(resnet18):
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(7))
    asked = GRADIENT_CAMS + [("eigen_cam", {}), ("layer_cam", {"relu_attributions": True})]
    alone = [insights.attribute(resnet18, x, m, [208, 3]) for m in GRADIENT_CAMS + ["eigen_cam"]]
    alone.append(insights.attribute(resnet18, x, "layer_cam", [208, 3], relu_attributions=True))
    rows, handle = count_rows(resnet18)
    info = {}
    try:
        maps = insights.attribute_many(resnet18, x, asked, [208, 3], info=info)
    finally:
        handle.remove()
    assert rows == [2]  # one forward pass for both images, one backward from it
    assert info["passes"] == {"shared": {"forward": 1, "backward": 1},
                              "separate": {"forward": 6, "backward": 5}}
    assert all(details["shared"] and details["layer"] == "layer4" for details in info["methods"])
    for together, single in zip(maps, alone):
        torch.testing.assert_close(together, single, rtol=1e-5, atol=1e-6)


def test_eigen_cam_takes_activations_without_a_backward_pass(resnet18):
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(8))
    eigen3 = insights.attribute(resnet18, x, "eigen_cam", 0, layer="layer3")
    grad4 = insights.attribute(resnet18, x, "grad_cam", [208, 3])
    rows, handle = count_rows(resnet18)
    alone, mixed = {}, {}
    try:
        only = insights.attribute_many(resnet18, x, [("eigen_cam", {"layer": "layer3"})], 0, info=alone)
        assert rows == [2]
        rows.clear()
        both = insights.attribute_many(resnet18, x, [("eigen_cam", {"layer": "layer3"}), "grad_cam"],
                                       [208, 3], info=mixed)
        assert rows == [2]  # layer3's activation comes from Grad-CAM's pass at layer4
    finally:
        handle.remove()
    assert alone["passes"] == {"shared": {"forward": 1, "backward": 0},
                               "separate": {"forward": 1, "backward": 0}}
    assert mixed["passes"]["shared"] == {"forward": 1, "backward": 1}
    torch.testing.assert_close(only[0], eigen3, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[0], eigen3, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[1], grad4, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", list(ORACLES))
def test_describes_itself(resnet18, method):
    meta = insights.method_info(method)
    assert meta["family"] == "cam" and meta["output"] == "cam" and meta["signed"] is True
    assert insights.method_info(method, {"relu_attributions": True})["signed"] is False
    assert [p["name"] for p in meta["params"]] == ["layer", "relu_attributions"]
    expected = {"score_cam": {"forward": 513, "backward": 0}, "eigen_cam": {"forward": 1, "backward": 0}}
    assert insights.method_info(method, model=resnet18)["cost"] == \
        expected.get(method, {"forward": 1, "backward": 1})


@pytest.mark.parametrize("method", list(ORACLES))
def test_layer_defaults_and_errors(resnet18, images, method):
    info = {}
    insights.attribute(resnet18, images[:1], method, 208, info=info)
    assert info["layer"] == "layer4"
    with pytest.raises(ParamError) as err:
        insights.attribute(resnet18, images[:1], method, 208, layer="fc")
    assert err.value.field == "layer" and "spatial" in str(err.value)
    with pytest.raises(ParamError) as err:
        insights.attribute(resnet18, images[:1], method, 208, layer="layer9")
    assert err.value.field == "layer" and "layer9" in str(err.value)
    assert no_hooks_left(resnet18)


def test_benchmark_times_ours_against_grad_cam(capsys):
    from insights import bench_cam

    assert bench_cam.main(["--side", "64", "--repeat", "1", "--methods", "xgrad_cam", "eigen_cam"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["method", "grad-cam", "ms", "ours", "ms", "ratio", "corr"]
    rows = {line.split()[0]: line.split() for line in out[2:]}
    assert set(rows) == {"xgrad_cam", "eigen_cam", "together:"}
    for name in ("xgrad_cam", "eigen_cam"):
        theirs, ours, ratio, corr = (float(v.replace(",", "")) for v in rows[name][1:])
        assert corr >= 0.999 and ratio == pytest.approx(theirs / ours, rel=0.05)
    assert rows["together:"][-1] == "-"


def test_benchmark_table_format():
    from insights.bench_cam import format_rows

    table = format_rows([{"method": "score_cam", "theirs_ms": 14644.3, "ours_ms": 11670.7, "corr": 0.9999996},
                         {"method": "together: a, b", "theirs_ms": 800.0, "ours_ms": 200.0, "corr": None}])
    lines = table.splitlines()
    assert lines[1].split() == ["score_cam", "14,644.3", "11,670.7", "1.25", "1.000000"]
    assert lines[2].split()[-3:] == ["200.0", "4.00", "-"]
