"""The seam between the methods and the fast paths (insights/engine/seam.py): every fast path
gives the plain path's maps (the model itself, plain autograd) within the tolerances the other
tests use, and a fast path that does not run says why."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import insights
from conftest import rel_error, seeded
from insights.engine import EngineOptions, seam
from insights.engine.context import Context
from insights.engine.fast.twin import twin
from test_twin import InplaceOnStem

PLAIN = EngineOptions(twin=False)
OCCLUSION = dict(sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8))


def test_path_gradients_through_the_stem_equal_the_plain_reference(small_cnn, images):
    ctx = Context(model=small_cnn, inputs=images, target=torch.tensor([3, 7]), total=10 ** 6)
    base = torch.full_like(images, 0.3)
    alphas, weights = [0.1, 0.5, 0.9], [0.2, 0.5, 0.3]
    fast = seam.path_gradients(ctx, base, images, alphas, weights, ctx.target)
    assert ctx.info["fast_paths"]["twin"] == ctx.info["fast_paths"]["stem"] == "used"
    plain = seam.plain_path_gradients(ctx, base, images, alphas, weights, ctx.target)
    assert rel_error(fast, plain) < 1e-5 and plain.abs().max() > 0


def test_scores_of_the_fast_scorer_equal_the_plain_reference(resnet18):
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([1, 2, 3, 4, 5])
    ctx = Context(model=resnet18, inputs=x[:1], target=target[:1])
    with seam.scorer(ctx) as score:
        fast = score(x, target)
    assert ctx.info["fast_paths"]["twin"] == ctx.info["fast_paths"]["cpu_slices"] == "used"
    with seam.plain_scorer(ctx) as score:
        plain = score(x, target)
    assert fast.dtype == torch.float32 and fast.shape == (5,)
    assert rel_error(fast, plain) < 1e-5


@pytest.mark.parametrize("build, stem", [(None, "used"), (InplaceOnStem, "declined")])
def test_integrated_gradients_fast_and_plain(small_cnn, images, build, stem):
    model = small_cnn if build is None else seeded(build)
    info, plain_info = {}, {}
    fast = insights.attribute(model, images, "integrated_gradients", [3, 7], n_steps=8, info=info)
    plain = insights.attribute(model, images, "integrated_gradients", [3, 7], n_steps=8,
                               options=PLAIN, info=plain_info)
    assert rel_error(fast, plain) < 1e-4 and plain.abs().max() > 0
    assert info["fast_paths"]["twin"] == "used"
    assert info["fast_paths"]["stem"].split(":")[0] == stem
    assert plain_info["fast_paths"]["twin"] == "declined: off (EngineOptions.twin)"
    assert plain_info["fast_paths"]["stem"] == "declined: no twin"


@pytest.mark.parametrize("method, params", [("occlusion", OCCLUSION),
                                            ("feature_ablation", {"patch_size": 16})])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_perturbation_fast_and_plain(resnet18, method, params, precision):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    info = {}
    fast = insights.attribute(resnet18, x, method, [208, 3], precision=precision, info=info, **params)
    plain = insights.attribute(resnet18, x, method, [208, 3], precision=precision, options=PLAIN, **params)
    assert info["fast_paths"]["twin"] == info["fast_paths"]["cpu_slices"] == "used"
    if precision == "fp32":  # the tolerance of the parity tests with Captum
        assert rel_error(fast, plain) < 1e-4
    else:  # the bf16 tolerance of test_perturbation_methods
        assert torch.corrcoef(torch.stack([fast.flatten(), plain.flatten()]))[0, 1] >= 0.99
    assert plain.abs().max() > 0


def test_feature_ablation_with_a_mask_fast_and_plain(small_cnn, images):
    mask = torch.arange(8).repeat_interleave(8).view(1, 1, 1, 64).expand(1, 1, 64, 64)
    fast = insights.attribute(small_cnn, images, "feature_ablation", [1, 2], feature_mask=mask)
    plain = insights.attribute(small_cnn, images, "feature_ablation", [1, 2], feature_mask=mask,
                               options=PLAIN)
    assert rel_error(fast, plain) < 1e-5 and plain.abs().max() > 0


def test_a_declined_fast_path_says_why_in_info_and_the_log(small_cnn, images, caplog):
    hooked = seeded(type(small_cnn))
    hooked.conv2.register_forward_hook(lambda m, i, o: None)
    info = {}
    with caplog.at_level(logging.DEBUG, logger="insights.engine"):
        insights.attribute(hooked, images, "occlusion", 1, info=info, **OCCLUSION)
    assert info["fast_paths"] == {"twin": "declined: the model has hooks",
                                  "cuda_graphs": "declined: no twin",
                                  "cuda_fused": "declined: no twin",
                                  "cpu_slices": "declined: no twin"}
    assert "fast path twin declined: the model has hooks" in caplog.text


def test_a_model_tracing_cannot_follow_gives_the_tracer_s_reason(images):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            h = self.conv(x)
            if h.mean() > 0:  # control flow on a value: torch.fx cannot trace it
                h = h * 2
            return self.fc(h.mean((2, 3)))

    info = {}
    insights.attribute(seeded(DataDependent), images, "integrated_gradients", 1, n_steps=4, info=info)
    assert info["fast_paths"]["twin"].startswith("declined: tracing failed (TraceError")


def test_the_twin_is_reused_until_a_weight_changes_and_then_follows_it(small_cnn, images):
    first = insights.attribute(small_cnn, images, "occlusion", [1, 2], **OCCLUSION)
    fast = twin(small_cnn, images)
    again = insights.attribute(small_cnn, images, "occlusion", [1, 2], **OCCLUSION)
    assert twin(small_cnn, images) is fast and torch.equal(first, again)
    with torch.no_grad():
        small_cnn.fc.weight.mul_(-1)
    flipped = insights.attribute(small_cnn, images, "occlusion", [1, 2], **OCCLUSION)
    assert twin(small_cnn, images) is not fast
    plain = insights.attribute(small_cnn, images, "occlusion", [1, 2], options=PLAIN, **OCCLUSION)
    assert rel_error(flipped, plain) < 1e-5 and rel_error(flipped, first) > 0.1


def test_logits_run_on_the_twin_and_equal_the_models_forward(small_cnn, images):
    info = {}
    fast = insights.engine.logits(small_cnn, images, info=info)
    with torch.no_grad():
        plain = small_cnn(images)
    assert info["twin"] == "twin" and rel_error(fast, plain) < 1e-5 and fast.dtype == torch.float32
    info = {}
    off = insights.engine.logits(small_cnn, images, options=PLAIN, info=info)
    assert info["twin"] == "off (EngineOptions.twin)" and torch.equal(off, plain)
    scripted = torch.jit.trace(small_cnn, images[:1])
    info = {}
    assert rel_error(insights.engine.logits(scripted, images, info=info), plain) < 1e-5
    assert info["twin"] == "a TorchScript module"  # the model itself ran
