"""Completeness (summation to delta) reported by integrated gradients, DeepLift and gradient
SHAP in the call's ``info``: ``delta`` = max over rows of |sum(map) - (f(x) - f(base))| /
|f(x) - f(base)|, f the target logit; ``delta_kind`` "exact" or "expected" (gradient SHAP)."""
from __future__ import annotations

import warnings

import torch
from captum.attr import DeepLift as CaptumDeepLift
from torch import nn

import insights
from insights.tasks import COMPLETENESS_THRESHOLD, completeness

from appkit import app, client, extra_methods, image_id  # noqa: F401
from conftest import logits, seeded

TARGETS = [3, 7]


class NormedCNN(nn.Module):
    """A small CNN with a LayerNorm over the channels: DeepLift's rules do not cover it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm([8, 16, 16])
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.conv2(self.relu(self.norm(self.conv1(x)))))


def run(model, x, method, **params):
    info: dict = {}
    out = insights.attribute(model, x, method, TARGETS, info=info, **params)
    return out, info


def test_ig_with_enough_steps_and_deeplift_are_complete(small_cnn, images):
    for method, params in [("integrated_gradients", {"n_steps": 300}), ("deeplift", {})]:
        _, info = run(small_cnn, images, method, **params)
        assert info["delta_kind"] == "exact"
        assert len(info["deltas"]) == 2 and info["delta"] == max(info["deltas"])
        assert info["delta"] < 1e-3, (method, info["delta"])


def test_delta_is_the_relative_gap_to_the_score_difference(small_cnn, images):
    out, info = run(small_cnn, images, "integrated_gradients", n_steps=1)
    diff = logits(small_cnn, images, TARGETS) - logits(small_cnn, torch.zeros_like(images), TARGETS)
    expected = ((out.sum((1, 2, 3)) - diff).abs() / diff.abs()).double()
    torch.testing.assert_close(torch.tensor(info["deltas"], dtype=torch.float64), expected,
                               rtol=1e-4, atol=1e-6)
    assert info["delta"] > 1e-2  # one step is far from the integral


def test_deeplift_delta_agrees_with_captum(small_cnn, images):
    _, info = run(small_cnn, images, "deeplift")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, theirs = CaptumDeepLift(small_cnn).attribute(images.clone(), target=TARGETS,
                                                        return_convergence_delta=True)
    diff = logits(small_cnn, images, TARGETS) - logits(small_cnn, torch.zeros_like(images), TARGETS)
    ours_abs = torch.tensor(info["deltas"], dtype=torch.float64) * diff.abs().double()
    torch.testing.assert_close(ours_abs, theirs.abs().double(), rtol=0, atol=1e-4)


def test_deeplift_reports_a_large_delta_where_its_rules_do_not_cover_the_model():
    model = seeded(NormedCNN)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    _, info = run(model, x, "deeplift")
    assert info["delta_kind"] == "exact" and info["delta"] > 0.05
    assert info["uncovered"] == ["LayerNorm"]
    assert completeness(info, 1)["uncovered"] == ["LayerNorm"]


def test_gradient_shap_delta_is_expected_and_measured_from_the_mean_baseline(small_cnn, images):
    dist = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 0.1
    out, info = run(small_cnn, images, "gradient_shap", baselines=dist, n_samples=8)
    assert info["delta_kind"] == "expected"
    mean = dist.mean(0, keepdim=True).expand_as(images)
    diff = logits(small_cnn, images, TARGETS) - logits(small_cnn, mean, TARGETS)
    expected = ((out.sum((1, 2, 3)) - diff).abs() / diff.abs()).max().item()
    assert abs(info["delta"] - expected) < 1e-4 * max(1.0, expected)


def test_no_delta_with_a_noise_tunnel_or_for_methods_without_the_property(small_cnn, images):
    _, info = run(small_cnn, images, "integrated_gradients", n_steps=4, nt_type="smoothgrad", nt_samples=2)
    assert "delta" not in info
    _, info = run(small_cnn, images, "saliency")
    assert "delta" not in info


def test_result_metadata_carries_the_completeness(client, image_id):
    def explain(method, **params):
        r = client.post("/api/explain", json={"model": "tiny", "image": image_id, "method": method,
                                              "target": 2, "params": params})
        assert r.status_code == 200, r.json
        meta = r.json["result"]
        assert client.get(f"/api/results/{meta['id']}").json["completeness"] == meta["completeness"]
        return meta["completeness"]

    deeplift = explain("deeplift")
    assert deeplift["kind"] == "exact" and deeplift["threshold"] == COMPLETENESS_THRESHOLD
    assert 0 <= deeplift["delta"] < 1e-3 and deeplift["uncovered"] == []
    assert explain("gradient_shap", n_samples=4)["kind"] == "expected"
    assert explain("integrated_gradients", n_steps=1)["delta"] > 0
    assert explain("saliency") is None


def test_each_batched_row_gets_its_own_delta():
    details = {"deltas": [0.001, 0.3], "delta": 0.3, "delta_kind": "exact"}
    assert completeness(details, 0)["delta"] == 0.001 and completeness(details, 1)["delta"] == 0.3
    assert completeness({"cost": {}}, 0) is None
