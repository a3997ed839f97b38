"""attribute_many: several methods on one image share their common passes and give the same maps."""
from __future__ import annotations

import pytest
import torch

import insights
from insights.engine import Cancelled, ParamError, UnknownMethod

from test_engine import assert_unchanged, snapshot

REQUESTS = [
    "saliency",
    ("saliency", {"abs": False}),
    "input_x_gradient",
    ("grad_cam", {"relu_attributions": True}),
    "guided_grad_cam",
    "guided_backprop",
    ("integrated_gradients", {"n_steps": 4}),  # cannot share: runs on its own
    ("saliency", {"nt_type": "smoothgrad", "nt_samples": 2}),  # noisy: runs on its own
]


def split(request):
    return (request, {}) if isinstance(request, str) else request


@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
def test_maps_equal_one_by_one_with_fewer_passes(request, model_name, images):
    model = request.getfixturevalue(model_name)
    x = images[:, :, :48, :48].contiguous()
    before = snapshot(model, x)
    info = {}
    maps = insights.attribute_many(model, x, REQUESTS, [1, 4], info=info)
    assert_unchanged(model, x, before)
    assert len(maps) == len(REQUESTS)
    for req, got in zip(REQUESTS, maps):
        method, params = split(req)
        alone = insights.attribute(model, x, method, [1, 4], **params)
        assert got.shape == alone.shape
        assert torch.allclose(got, alone, rtol=1e-5, atol=1e-7 * float(alone.abs().max())), method
        assert float(alone.abs().max()) > 0
    # One plain pass (saliency ×2, input × gradient, both Grad-CAM halves), one guided pass
    # (guided backprop and Guided Grad-CAM), and the two methods that run alone (4 + 2 steps).
    assert info["passes"]["shared"] == {"forward": 2 + 4 + 2, "backward": 2 + 4 + 2}
    assert info["passes"]["separate"] == {"forward": 1 + 1 + 1 + 1 + 2 + 1 + 4 + 2,
                                          "backward": 1 + 1 + 1 + 1 + 2 + 1 + 4 + 2}
    assert [m["shared"] for m in info["methods"]] == [True] * 6 + [False, False]
    assert info["methods"][3]["layer"] == info["methods"][4]["layer"]


def test_two_layers_come_from_one_pass(resnet18, images):
    info = {}
    maps = insights.attribute_many(resnet18, images, [("grad_cam", {"layer": "layer3"}),
                                                      ("grad_cam", {"layer": "layer4"})], 0, info=info)
    assert info["passes"]["shared"] == {"forward": 1, "backward": 1}
    assert [m["layer"] for m in info["methods"]] == ["layer3", "layer4"]
    for layer, got in zip(["layer3", "layer4"], maps):
        assert torch.equal(got, insights.attribute(resnet18, images, "grad_cam", 0, layer=layer))


def test_progress_reaches_the_shared_total_and_cancel_stops(small_cnn, images):
    seen = []
    insights.attribute_many(small_cnn, images, ["saliency", ("integrated_gradients", {"n_steps": 3})], 2,
                            progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (2 * (1 + 3), 2 * (1 + 3))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    before = snapshot(small_cnn, images)
    with pytest.raises(Cancelled):
        insights.attribute_many(small_cnn, images, ["saliency", "guided_backprop"], 2, cancel=lambda: True)
    assert_unchanged(small_cnn, images, before)


def test_bad_requests_name_the_problem(small_cnn, images):
    with pytest.raises(UnknownMethod, match="nope"):
        insights.attribute_many(small_cnn, images, ["saliency", "nope"], 0)
    with pytest.raises(ParamError, match="n_steps"):
        insights.attribute_many(small_cnn, images, [("integrated_gradients", {"n_steps": 0})], 0)
    with pytest.raises(ParamError, match="methods"):
        insights.attribute_many(small_cnn, images, [], 0)
    with pytest.raises(ParamError, match="target"):
        insights.attribute_many(small_cnn, images, ["saliency"], 99)
