"""Gradient methods (insights/engine/families/gradient.py): parity with Captum, axioms, noise tunnel."""
from __future__ import annotations

import pytest
import torch
from captum.attr import InputXGradient as CaptumInputXGradient
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import Saliency as CaptumSaliency
from torch import nn

import insights
from conftest import leaf, logits, rel_error, seeded
from insights.engine.families.gradient import INTEGRATION_RULES, integration_weights

TARGETS = [3, 7]
MODELS = ["small_cnn", "resnet18"]


@pytest.fixture(params=MODELS)
def model(request):
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------- parity with Captum


def test_saliency_matches_captum(model, images):
    ours = insights.attribute(model, images, "saliency", TARGETS)
    theirs = CaptumSaliency(model).attribute(leaf(images), target=TARGETS, abs=True)
    assert rel_error(ours, theirs) <= 1e-4
    signed = insights.attribute(model, images, "saliency", TARGETS, abs=False)
    theirs = CaptumSaliency(model).attribute(leaf(images), target=TARGETS, abs=False)
    assert rel_error(signed, theirs) <= 1e-4
    assert signed.min() < 0


def test_input_x_gradient_matches_captum(model, images):
    ours = insights.attribute(model, images, "input_x_gradient", TARGETS)
    theirs = CaptumInputXGradient(model).attribute(leaf(images), target=TARGETS)
    assert rel_error(ours, theirs) <= 1e-4


@pytest.mark.parametrize("rule", INTEGRATION_RULES)
def test_integrated_gradients_matches_captum(model, images, rule):
    baseline = 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    ours = insights.attribute(model, images, "integrated_gradients", TARGETS, n_steps=4,
                              integration=rule, baselines=baseline)
    theirs = CaptumIG(model).attribute(images, baselines=baseline, target=TARGETS, n_steps=4,
                                       method=rule)
    assert rel_error(ours, theirs) <= 1e-4


def test_integration_weights_are_captums():
    from captum.attr._utils.approximation_methods import approximation_parameters

    for rule in INTEGRATION_RULES:
        sizes_fn, alphas_fn = approximation_parameters(rule)
        sizes, alphas = integration_weights(rule, 7)
        assert sizes == pytest.approx(sizes_fn(7), abs=1e-12)
        assert alphas == pytest.approx(alphas_fn(7), abs=1e-12)
        # Captum's trapezoid halves the end weights of n equal steps, so it sums to 1 - 1/n.
        assert sum(sizes) == pytest.approx(6 / 7 if rule == "riemann_trapezoid" else 1.0)
    with pytest.raises(insights.ParamError) as err:
        integration_weights("riemann_left", 1)
    assert err.value.field == "n_steps"
    with pytest.raises(insights.ParamError) as err:
        integration_weights("simpson", 4)
    assert err.value.field == "integration"


# --------------------------------------------------------------------------- IG behaviour


def test_integrated_gradients_completeness_at_256_steps(small_cnn, images):
    baseline = 0.5 * torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    attr = insights.attribute(small_cnn, images, "integrated_gradients", TARGETS, n_steps=256,
                              baselines=baseline)
    delta = logits(small_cnn, images, TARGETS) - logits(small_cnn, baseline, TARGETS)
    error = (attr.sum((1, 2, 3)) - delta).abs() / delta.abs()
    assert delta.abs().min() > 1e-2  # the check means something
    assert error.max() < 0.01


def test_integrated_gradients_is_exact_on_a_linear_model():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    attr = insights.attribute(lin, x, "integrated_gradients", 1, n_steps=3, baselines=0.5)
    expected = (x - 0.5) * lin[1].weight[1].detach().view(1, 3, 4, 4)
    assert torch.allclose(attr, expected, atol=1e-6)


def test_integrated_gradients_progress_counts_steps_and_ignores_chunking(small_cnn, images):
    seen = []
    whole = insights.attribute(small_cnn, images, "integrated_gradients", TARGETS, n_steps=5,
                               progress=lambda d, t: seen.append((d, t)))
    tiny = insights.attribute(small_cnn, images, "integrated_gradients", TARGETS, n_steps=5,
                              memory_budget=1)
    assert seen[-1] == (10, 10)
    assert torch.allclose(whole, tiny, atol=1e-6 * float(whole.abs().max()))


def test_riemann_rules_need_two_steps(small_cnn, images):
    with pytest.raises(insights.ParamError) as err:
        insights.attribute(small_cnn, images, "integrated_gradients", 0, n_steps=1,
                           integration="riemann_left")
    assert err.value.field == "n_steps"
    one = insights.attribute(small_cnn, images, "integrated_gradients", 0, n_steps=1)
    grad = insights.attribute(small_cnn, images * 0.5, "saliency", 0, abs=False)
    assert torch.allclose(one, grad * images, atol=1e-6)  # one Gauss point: the midpoint


def test_baseline_tensor_of_wrong_shape_names_the_field(small_cnn, images):
    with pytest.raises(insights.ParamError) as err:
        insights.attribute(small_cnn, images, "integrated_gradients", 0, n_steps=2,
                           baselines=torch.zeros(5, 3, 64, 64))
    assert err.value.field == "baselines"


def test_cost_counts_steps_and_noise_samples():
    info = insights.method_info("integrated_gradients", {"n_steps": 8})
    assert info["cost"] == {"forward": 8, "backward": 8}
    info = insights.method_info("integrated_gradients", {"n_steps": 8, "nt_type": "smoothgrad",
                                                         "nt_samples": 5})
    assert info["cost"] == {"forward": 40, "backward": 40}
    assert insights.method_info("gradient_shap", {"n_samples": 7})["cost"]["forward"] == 7
    assert insights.method_info("integrated_gradients")["signed"] is True
    assert insights.method_info("integrated_gradients", {"nt_type": "smoothgrad_sq"})["signed"] is False


# --------------------------------------------------------------------------- noise tunnel


@pytest.mark.parametrize("method,params", [("saliency", {"abs": False}),
                                           ("input_x_gradient", {}),
                                           ("integrated_gradients", {"n_steps": 3})])
def test_smoothgrad_without_noise_is_the_plain_method(small_cnn, images, method, params):
    plain = insights.attribute(small_cnn, images, method, TARGETS, **params)
    smooth = insights.attribute(small_cnn, images, method, TARGETS, nt_type="smoothgrad",
                                nt_samples=3, stdevs=0.0, **params)
    square = insights.attribute(small_cnn, images, method, TARGETS, nt_type="smoothgrad_sq",
                                nt_samples=3, stdevs=0.0, **params)
    var = insights.attribute(small_cnn, images, method, TARGETS, nt_type="vargrad",
                             nt_samples=3, stdevs=0.0, **params)
    scale = float(plain.abs().max())
    assert torch.allclose(smooth, plain, atol=1e-6 * scale)
    assert torch.allclose(square, plain ** 2, atol=1e-6 * scale ** 2)
    assert var.abs().max() <= 1e-6 * scale ** 2


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_is_reproducible_with_a_seed(small_cnn, images, nt_type):
    args = dict(n_steps=2, nt_type=nt_type, nt_samples=3, stdevs=0.5)
    first = insights.attribute(small_cnn, images, "integrated_gradients", TARGETS, seed=11, **args)
    again = insights.attribute(small_cnn, images, "integrated_gradients", TARGETS, seed=11, **args)
    other = insights.attribute(small_cnn, images, "integrated_gradients", TARGETS, seed=12, **args)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_noise_tunnel_tiles_per_image_baselines(small_cnn, images):
    baseline = torch.stack([torch.full((3, 64, 64), 0.3), torch.full((3, 64, 64), -0.2)])
    plain = insights.attribute(small_cnn, images, "integrated_gradients", TARGETS, n_steps=3,
                               baselines=baseline)
    smooth = insights.attribute(small_cnn, images, "integrated_gradients", TARGETS, n_steps=3,
                                baselines=baseline, nt_type="smoothgrad", nt_samples=2, stdevs=0.0)
    assert torch.allclose(smooth, plain, atol=1e-6 * float(plain.abs().max()))


def one_shot_tunnel(model, x, method, targets, nt_type, k, stdevs, seed, **params):
    """The noise tunnel as it was before it ran in chunks: all k noisy copies drawn at once and
    explained in one call, then aggregated."""
    noise = torch.randn((k,) + tuple(x.shape), generator=torch.Generator().manual_seed(seed))
    noisy = (x.unsqueeze(0) + noise * stdevs).reshape((-1,) + tuple(x.shape[1:]))
    maps = insights.attribute(model, noisy, method, torch.tensor(targets).repeat(k), **params)
    maps = maps.reshape((k, x.shape[0]) + tuple(maps.shape[1:]))
    if nt_type == "smoothgrad":
        return maps.mean(0)
    squares = (maps * maps).mean(0)
    return squares if nt_type == "smoothgrad_sq" else (squares - maps.mean(0) ** 2).clamp_min(0)


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize("method,params,size", [("saliency", {"abs": False}, 64),
                                                ("integrated_gradients", {"n_steps": 2}, 64),
                                                ("input_x_gradient", {}, 9)])  # 2×3×9×9: 486 numbers a copy
def test_noise_tunnel_in_chunks_gives_the_one_shot_map(method, params, size, nt_type, monkeypatch):
    # A smooth model: with max pooling, batches of other sizes round differently and can flip
    # which input of a near tie gets the gradient, a change of the map that is not the tunnel's.
    model = seeded(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(8, 8, 3),
                                         nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10)))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    args = dict(nt_type=nt_type, nt_samples=21, stdevs=0.4, seed=9, **params)
    reference = one_shot_tunnel(model, x, method, TARGETS, nt_type, 21, 0.4, 9, **params)
    cls = type(insights.engine.registry.get(method))
    rows = []
    plain = cls.compute
    monkeypatch.setattr(cls, "compute", lambda self, ctx, x, t, p: rows.append(len(x)) or plain(self, ctx, x, t, p))
    default = insights.attribute(model, x, method, TARGETS, **args)
    chunks_default = list(rows)
    rows.clear()
    tiny = insights.attribute(model, x, method, TARGETS, memory_budget=1, **args)
    if size == 64:  # copies of both images, as many as a CPU gradient batch (10 rows) or the budget holds
        assert chunks_default == [10, 10, 10, 10, 2] and rows == [2] * 21
    else:  # 8 copies a draw (16 blocks of 243 numbers), the last 5 copies on their own
        assert chunks_default == rows == [16, 16, 10]
    scale = float(reference.abs().max())
    torch.testing.assert_close(tiny, default, rtol=0, atol=1e-6 * scale)
    # The one-shot tunnel averaged in float32 (VarGrad: the difference of two close float32 means);
    # the chunked one sums in float64.
    torch.testing.assert_close(default, reference, rtol=1e-3, atol=1e-5 * scale)


def test_noise_draws_hold_whole_blocks_of_16_numbers():
    from insights.engine.families.gradient import noise_chunks, noise_draws

    assert noise_draws(3, 3 * 64 * 64) == [(0, 1), (1, 2), (2, 3)]
    assert noise_draws(21, 2 * 243) == [(0, 8), (8, 16), (16, 21)]  # 8 copies of 486 numbers: 3888 = 243 × 16
    assert noise_draws(17, 3) == [(0, 17)]  # the one left over (3 numbers) joins the group before
    assert noise_draws(2, 3) == [(0, 2)]
    assert list(noise_chunks([(0, 8), (8, 16), (16, 21)], 10)) == [[(0, 8)], [(8, 16)], [(16, 21)]]
    assert list(noise_chunks([(0, 1), (1, 2), (2, 3)], 2)) == [[(0, 1), (1, 2)], [(2, 3)]]


def test_noise_tunnel_reports_progress_per_chunk_and_stops_when_cancelled(small_cnn, images):
    args = dict(nt_type="smoothgrad", nt_samples=6, stdevs=0.3, memory_budget=1)
    seen = []
    insights.attribute(small_cnn, images, "saliency", TARGETS, progress=lambda d, t: seen.append((d, t)), **args)
    assert seen == [(i, 12) for i in range(1, 13)]  # a row at a time under a budget of one row
    seen.clear()
    with pytest.raises(insights.engine.Cancelled):
        insights.attribute(small_cnn, images, "saliency", TARGETS, progress=lambda d, t: seen.append(d),
                           cancel=lambda: len(seen) >= 3, **args)
    assert seen == [1, 2, 3]  # stopped in the second chunk of copies, not after all 12 rows


# --------------------------------------------------------------------------- gradient SHAP


def test_gradient_shap_has_no_noise_tunnel_parameters():
    names = [p["name"] for p in insights.method_info("gradient_shap")["params"]]
    assert names == ["n_samples", "stdevs", "baselines", "seed"]
    with pytest.raises(insights.ParamError) as err:
        insights.method_info("gradient_shap", {"nt_type": "smoothgrad"})
    assert err.value.field == "nt_type"


def test_gradient_shap_is_exact_on_a_linear_model():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    attr = insights.attribute(lin, x, "gradient_shap", 0, n_samples=5, baselines=-0.25)
    expected = (x + 0.25) * lin[1].weight[0].detach().view(1, 3, 4, 4)
    assert torch.allclose(attr, expected, atol=1e-6)


def test_gradient_shap_draws_from_the_baseline_distribution():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    dist = torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 1.0)])
    attr = insights.attribute(lin, x, "gradient_shap", 0, n_samples=400, baselines=dist, seed=3)
    w = lin[1].weight[0].detach().view(1, 3, 4, 4)
    # Each sample uses one of the two baselines; the mean baseline drawn is near 0.
    mean_baseline = x - attr / w
    assert torch.allclose(mean_baseline, mean_baseline.flatten()[0].expand_as(mean_baseline), atol=1e-4)
    assert abs(float(mean_baseline.flatten()[0])) < 0.15
    assert float(mean_baseline.flatten()[0]) not in (-1.0, 1.0)


def test_gradient_shap_noise_is_seeded_and_chunk_independent(small_cnn, images):
    args = dict(n_samples=4, stdevs=0.3, baselines=0.0)
    first = insights.attribute(small_cnn, images, "gradient_shap", TARGETS, seed=5, **args)
    again = insights.attribute(small_cnn, images, "gradient_shap", TARGETS, seed=5, **args,
                               memory_budget=1)
    other = insights.attribute(small_cnn, images, "gradient_shap", TARGETS, seed=6, **args)
    assert torch.allclose(first, again, atol=1e-6 * float(first.abs().max()))
    assert not torch.allclose(first, other)
    noiseless = insights.attribute(small_cnn, images, "gradient_shap", TARGETS, seed=5,
                                   n_samples=4, stdevs=0.0)
    assert not torch.allclose(first, noiseless)


def test_gradient_shap_approaches_integrated_gradients(small_cnn, images):
    # With one baseline and no noise, gradient SHAP is IG with random (Monte Carlo) steps.
    shap = insights.attribute(small_cnn, images, "gradient_shap", TARGETS, n_samples=300,
                              baselines=0.2, seed=1)
    ig = insights.attribute(small_cnn, images, "integrated_gradients", TARGETS, n_steps=64,
                            baselines=0.2)
    assert rel_error(shap.sum((1, 2, 3)), ig.sum((1, 2, 3))) < 0.1
    corr = torch.corrcoef(torch.stack([shap.flatten(), ig.flatten()]))[0, 1]
    assert corr > 0.95


def test_integrated_gradients_bf16_fast_mode_is_close_to_fp32_but_not_the_same(small_cnn, images):
    exact = insights.attribute(small_cnn, images, "integrated_gradients", 3, n_steps=16)
    fast = insights.attribute(small_cnn, images, "integrated_gradients", 3, n_steps=16, precision="bf16")
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    assert not torch.equal(fast, exact)  # the passes really ran in bfloat16
    corr = torch.corrcoef(torch.stack([fast.flatten(), exact.flatten()]))[0, 1]
    assert corr > 0.99
    # Completeness still holds approximately: the map sums near the score difference.
    with torch.no_grad():
        delta = small_cnn(images)[:, 3] - small_cnn(torch.zeros_like(images))[:, 3]
    assert torch.allclose(fast.sum(dim=(1, 2, 3)), delta, rtol=0.05, atol=0.05 * float(delta.abs().max()))
