"""The metrics beyond deletion/insertion (insights/engine/metrics_*.py) and the mechanism that
re-runs a method for a metric: max-sensitivity equals Captum's given the same perturbations,
re-running a hook method (Grad-CAM) on the model being scored does not deadlock, progress and
cancel reach through the nested call, and bad methods are refused by name."""
from __future__ import annotations

import importlib
import itertools
import threading

import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import Saliency as CaptumSaliency
from captum.metrics import sensitivity_max as captum_sensitivity_max

import insights
from conftest import leaf
from insights import Cancelled, ParamError

sensitivity = importlib.import_module("insights.engine.metrics_sensitivity")
engine_metrics = importlib.import_module("insights.engine.metrics")

TARGETS = [3, 7]


def finishes(fn, seconds=60):
    """Runs fn in a thread and returns its result; fails (instead of hanging) after ``seconds``."""
    box = {}

    def work():
        try:
            box["out"] = fn()
        except BaseException as err:  # handed to the test below
            box["err"] = err

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (a deadlock?)"
    if "err" in box:
        raise box["err"]
    return box["out"]


def noise(shape, k, radius, seed):
    """The k perturbations the metric draws: k × N×C×H×W."""
    return torch.stack(list(itertools.islice(sensitivity.ball_noise(shape, radius, seed), k)))


# --------------------------------------------------------------------------- the method mechanism


def test_sensitivity_max_reruns_grad_cam_on_the_scored_model(small_cnn, images):
    """Grad-CAM takes the model's lock exclusively (it hooks a layer); re-run inside evaluate it
    must neither deadlock nor leave a hook behind, and the score is the largest relative change
    of the map over the same perturbations, computed here by hand."""
    cam = insights.attribute(small_cnn, images, "grad_cam", TARGETS)
    out = finishes(lambda: insights.evaluate(small_cnn, images, cam, TARGETS, "sensitivity_max",
                                             method="grad_cam", n_perturb_samples=3,
                                             perturb_radius=0.5, seed=4))
    deltas = noise(images.shape, 3, 0.5, 4)
    by_hand = []
    for i in range(2):
        moved = [float((insights.attribute(small_cnn, images[i:i + 1] + deltas[j, i:i + 1], "grad_cam",
                                           TARGETS[i]) - cam[i]).norm() / cam[i].norm()) for j in range(3)]
        by_hand.append(moved)
    assert torch.tensor(out["samples"]) == pytest.approx(torch.tensor(by_hand), rel=1e-4)
    assert out["values"] == pytest.approx([max(m) for m in by_hand], rel=1e-4)
    assert out["value"] == pytest.approx(sum(max(m) for m in by_hand) / 2, rel=1e-4)
    assert min(out["values"]) > 1e-3  # radius 0.5 moves the map: the check means something
    assert out["params"]["method"] == "grad_cam" and out["params"]["method_params"]["layer"] is None
    assert out["better"] == "lower"
    assert not any(m._forward_hooks or m._backward_hooks for m in small_cnn.modules())


def test_a_concurrent_reader_does_not_block_the_rerun(small_cnn, images):
    """Two evaluations re-running Grad-CAM from two threads both finish."""
    cam = insights.attribute(small_cnn, images, "grad_cam", TARGETS)
    results = []

    def one():
        results.append(insights.evaluate(small_cnn, images, cam, TARGETS, "sensitivity_max",
                                         method="grad_cam", n_perturb_samples=4, memory_budget=1))

    threads = [threading.Thread(target=one, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert len(results) == 2 and results[0] == results[1]


def test_a_model_in_training_mode_is_scored_in_eval_mode_and_restored(small_cnn, images):
    sal = insights.attribute(small_cnn, images, "saliency", TARGETS)
    expected = insights.evaluate(small_cnn, images, sal, TARGETS, "sensitivity_max",
                                 method="saliency", n_perturb_samples=2)
    small_cnn.train()
    got = finishes(lambda: insights.evaluate(small_cnn, images, sal, TARGETS, "sensitivity_max",
                                             method="saliency", n_perturb_samples=2))
    assert got["values"] == pytest.approx(expected["values"], rel=1e-6)
    assert small_cnn.training and small_cnn.bn1.training


def test_progress_counts_the_reruns_passes(small_cnn, images):
    seen = []
    insights.evaluate(small_cnn, images, insights.attribute(small_cnn, images, "integrated_gradients",
                                                            TARGETS, n_steps=4),
                      TARGETS, "sensitivity_max", method="integrated_gradients",
                      method_params={"n_steps": 4}, n_perturb_samples=3, memory_budget=1,
                      progress=lambda done, total: seen.append((done, total)))
    info = insights.metric_info("sensitivity_max", {"n_perturb_samples": 3}, shape=(3, 64, 64),
                                method="integrated_gradients", method_params={"n_steps": 4})
    method_cost = insights.method_info("integrated_gradients", {"n_steps": 4}, shape=(3, 64, 64))["cost"]
    assert info["needs_method"] is True
    assert info["cost"] == {"forward": 3 * method_cost["forward"], "backward": 3 * method_cost["backward"]}
    total = 2 * info["cost"]["forward"]
    assert {t for _, t in seen} == {total} and seen[-1] == (total, total)
    done = [d for d, _ in seen]
    assert done == sorted(done) and len(done) > 3  # reported batch by batch, never backwards


def test_cancel_reaches_into_the_rerun(small_cnn, images):
    cam = insights.attribute(small_cnn, images, "grad_cam", TARGETS)
    stop = threading.Event()
    calls = []

    def progress(done, total):
        calls.append(done)
        if done >= 2:
            stop.set()

    with pytest.raises(Cancelled):
        finishes(lambda: insights.evaluate(small_cnn, images, cam, TARGETS, "sensitivity_max",
                                           method="grad_cam", memory_budget=1, progress=progress,
                                           cancel=stop))
    total = insights.metric_info("sensitivity_max", method="grad_cam")["cost"]["forward"] * 2
    assert 2 <= max(calls) < total
    with pytest.raises(Cancelled):
        insights.evaluate(small_cnn, images, cam, TARGETS, "sensitivity_max", method="grad_cam",
                          cancel=lambda: True)
    assert not any(m._forward_hooks or m._backward_hooks for m in small_cnn.modules())
    # the lock was released: a writer gets the model at once
    finishes(lambda: insights.attribute(small_cnn, images, "grad_cam", TARGETS), seconds=20)


@pytest.mark.parametrize("kwargs,field,message", [
    ({}, "method", "name its method, one of saliency"),
    ({"method": "lime_v2"}, "method", "unknown method 'lime_v2'; known methods: saliency"),
    ({"method": 3}, "method", "unknown method 3"),
    ({"method": "integrated_gradients", "method_params": {"n_steps": 0}}, "n_steps", "at least 1"),
    ({"method": "saliency", "method_params": {"window": 3}}, "window", "not a parameter of saliency"),
    ({"method": "saliency", "method_params": [1]}, "method_params", "must be a dict"),
    ({"method": "saliency", "n_perturb_samples": 0}, "n_perturb_samples", "at least 1"),
    ({"method": "saliency", "perturb_radius": -1}, "perturb_radius", "at least 0"),
])
def test_bad_methods_are_refused_by_name(small_cnn, images, kwargs, field, message):
    sal = insights.attribute(small_cnn, images, "saliency", TARGETS)
    with pytest.raises(ParamError, match=message) as err:
        insights.evaluate(small_cnn, images, sal, TARGETS, "sensitivity_max", **kwargs)
    assert err.value.field == field


def test_a_metric_that_does_not_rerun_refuses_a_method(small_cnn, images):
    sal = insights.attribute(small_cnn, images, "saliency", TARGETS)
    with pytest.raises(ParamError, match="deletion does not re-run a method") as err:
        insights.evaluate(small_cnn, images, sal, TARGETS, "deletion", method="saliency")
    assert err.value.field == "method"
    with pytest.raises(ParamError, match="deletion does not re-run a method") as err:
        insights.metric_info("deletion", method="saliency")
    assert insights.metric_info("deletion")["needs_method"] is False


def test_a_map_of_another_shape_is_refused(small_cnn, images):
    cam = insights.attribute(small_cnn, images, "grad_cam", TARGETS)  # N×1×H×W
    with pytest.raises(ParamError, match="not the shape of saliency's maps") as err:
        insights.evaluate(small_cnn, images, cam, TARGETS, "sensitivity_max", method="saliency",
                          n_perturb_samples=1)
    assert err.value.field == "attribution"


# --------------------------------------------------------------------------- max-sensitivity


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_sensitivity_max_equals_captums(small_cnn, images, method):
    """Captum's sensitivity_max fed our perturbations (in its image-major row order) and its own
    explanation (Saliency, IG), against ours re-running our saliency / IG."""
    k, radius, seed = 5, 0.05, 11
    ours_params = {"n_steps": 8, "integration": "gausslegendre"} if method != "saliency" else {}
    ours_map = insights.attribute(small_cnn, images, method, TARGETS, **ours_params)
    ours = insights.evaluate(small_cnn, images, ours_map, TARGETS, "sensitivity_max", method=method,
                             method_params=ours_params, n_perturb_samples=k, perturb_radius=radius,
                             seed=seed)
    deltas = noise(images.shape, k, radius, seed).transpose(0, 1).flatten(0, 1)  # row i k + j

    def perturb(expanded):
        return expanded + deltas

    if method == "saliency":
        def explain(x, target):  # Captum hands the clean inputs as a 1-tuple
            one = isinstance(x, tuple)
            out = CaptumSaliency(small_cnn).attribute(leaf(x[0] if one else x), target=target, abs=True)
            return (out,) if one else out
    else:
        def explain(x, target):
            return CaptumIG(small_cnn).attribute(x, target=target, n_steps=8, method="gausslegendre")
    theirs = captum_sensitivity_max(explain, images, perturb_func=perturb, n_perturb_samples=k,
                                    target=torch.tensor(TARGETS))
    assert ours["values"] == pytest.approx(theirs.tolist(), rel=1e-4)
    assert min(ours["values"]) > 1e-3


def test_a_constant_map_does_not_move():
    """Saliency of a linear model is its weight, wherever the input is: sensitivity 0."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sal = insights.attribute(model, x, "saliency", [0, 1], abs=False)
    out = insights.evaluate(model, x, sal, [0, 1], "sensitivity_max", method="saliency",
                            method_params={"abs": False}, perturb_radius=1.0)
    assert out["values"] == [0.0, 0.0]


def test_a_zero_map_is_divided_by_one_like_captum():
    """A model with a dead input: saliency is 0 at x and everywhere, so 0/1 = 0."""
    class Dead(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 2) + 0 * x.sum()

    x = torch.ones(1, 1, 4, 4)
    out = insights.evaluate(Dead(), x, torch.zeros(1, 1, 4, 4), 0, "sensitivity_max",
                            method="saliency", n_perturb_samples=2)
    assert out["values"] == [0.0]


# --------------------------------------------------------------------------- ROAD


road = importlib.import_module("insights.engine.metrics_road")
SIDE, REGION = 16, 8


class RegionSum(torch.nn.Module):
    """Logit 0 is the sum of the top-left REGION×REGION block over all channels; logit 1 is 0."""

    def forward(self, x):
        s = x[:, :, :REGION, :REGION].sum(dim=(1, 2, 3))
        return torch.stack([s, torch.zeros_like(s)], 1)


def region_image():
    """Ones on the region, zeros elsewhere: filling the region from outside gives zeros."""
    x = torch.zeros(1, 3, SIDE, SIDE)
    x[:, :, :REGION, :REGION] = 1.0
    return x


def test_imputation_keeps_a_constant_image_constant():
    x = torch.full((2, 3, 20, 24), 0.7)
    missing = torch.rand(2, 1, 20, 24, generator=torch.Generator().manual_seed(0)) < 0.8
    assert torch.allclose(road.impute(x, missing), x, atol=1e-6)


def test_imputation_reproduces_a_linear_ramp_inside():
    """The weights are symmetric, so a linear function is its neighbours' mean away from the
    border: removing a block inside the image gives the ramp back."""
    i, j = torch.meshgrid(torch.arange(24.0), torch.arange(32.0), indexing="ij")
    x = torch.stack([0.3 * i - 0.2 * j + 1, 0.05 * i, -0.1 * j]).unsqueeze(0)
    missing = torch.zeros(1, 1, 24, 32, dtype=torch.bool)
    missing[..., 3:20, 5:29] = True
    out = road.impute(x.masked_fill(missing, 9.0), missing)
    assert (out - x).abs().max() < 1e-4


@pytest.mark.parametrize("shape,kind", [((33, 40), "pixels"), ((64, 64), "smooth"), ((64, 64), "most")])
def test_imputation_equals_the_exact_sparse_solve(shape, kind):
    """Against pytorch-grad-cam's NoisyLinearImputer with noise 0 (scipy's spsolve on the same
    system; test-only), including border pixels and odd sizes."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, *shape, generator=g)
    if kind == "pixels":
        missing = torch.rand(shape, generator=g) < 0.5
    else:
        smooth = engine_metrics.smooth_random_maps(1, 5, shape, seed=1)[0]
        missing = smooth > smooth.flatten().quantile(0.1 if kind == "most" else 0.6)
    exact = NoisyLinearImputer(noise=0)(x, (~missing).float())
    ours = road.impute(x.unsqueeze(0), missing.view(1, 1, *shape))[0]
    assert (ours - exact).abs().max() < 1e-4
    assert torch.equal(ours[:, ~missing], x[:, ~missing])


def test_road_morf_drops_the_region_first_and_lerf_keeps_it():
    model, x = RegionSum().eval(), region_image()
    a = region_image()  # the region ranked first
    kw = dict(steps=4, noise=0.0, score="logit", reference="none")
    morf = insights.evaluate(model, x, a, 0, "road_morf", **kw)
    assert morf["fractions"] == [0, 0.25, 0.5, 0.75]
    assert morf["scores"][0] == pytest.approx([192, 0, 0, 0], abs=1e-3)
    assert morf["area"] == pytest.approx((192 + 0) / 2 * 0.25 / 0.75, abs=1e-3)  # mean height
    lerf = insights.evaluate(model, x, a, 0, "road_lerf", **kw)
    assert lerf["scores"][0] == pytest.approx([192] * 4, abs=1e-3)  # the rest filled from the region
    assert lerf["better"] == "higher" and morf["better"] == "lower"
    # ranking the region last swaps them
    flipped = insights.evaluate(model, x, -a, 0, "road_lerf", **kw)
    assert flipped["scores"][0] == pytest.approx([192, 0, 0, 0], abs=1e-3)


def test_road_noise_is_seeded_gaussian_on_the_filled_pixels_only():
    """With the region removed (fraction 1/4, one row per step), the logit is the sum of the
    noise drawn for the region's pixels: row r's noise is the r-th draw of the seed's generator."""
    model, x = RegionSum().eval(), region_image()
    out = insights.evaluate(model, x, region_image(), 0, "road_morf", steps=4, noise=0.5, seed=9,
                            score="logit", reference="none")
    g = torch.Generator().manual_seed(9)
    draws = [torch.randn(3, SIDE, SIDE, generator=g) for _ in range(3)]  # steps 1, 2, 3
    expected = [192] + [0.5 * float(d[:, :REGION, :REGION].sum()) for d in draws]
    assert out["scores"][0] == pytest.approx(expected, abs=1e-3)
    again = insights.evaluate(model, x, region_image(), 0, "road_morf", steps=4, noise=0.5, seed=9,
                              score="logit", reference="none", memory_budget=1)
    assert again["scores"] == out["scores"]  # the same, one row per batch


def test_road_reference_progress_and_cancel(small_cnn, images):
    sal = insights.attribute(small_cnn, images, "saliency", TARGETS)
    seen = []
    out = insights.evaluate(small_cnn, images, sal, TARGETS, "road_lerf", steps=3, reference_seeds=2,
                            memory_budget=1, progress=lambda d, t: seen.append((d, t)))
    total = 2 * insights.metric_info("road_lerf", {"steps": 3, "reference_seeds": 2})["cost"]["forward"]
    assert total == 2 * (1 + 2 * 3) and seen[-1] == (total, total) and len(seen) == total
    ref = out["reference"]
    assert ref["seeds"] == [0, 1] and len(ref["areas"]) == 2 and len(ref["areas"][0]) == 2
    assert out["scores"][0][0] == pytest.approx(float(small_cnn(images).detach().softmax(-1)[0, 3]), rel=1e-5)
    stop = threading.Event()
    with pytest.raises(Cancelled):
        insights.evaluate(small_cnn, images, sal, TARGETS, "road_morf", memory_budget=1, cancel=stop,
                          progress=lambda d, t: stop.set() if d >= 3 else None)


@pytest.mark.parametrize("params,field", [({"steps": 1}, "steps"), ({"noise": -0.1}, "noise"),
                                          ({"baseline": "blur"}, "baseline"), ({"score": "rank"}, "score")])
def test_road_refuses_bad_parameters_by_name(params, field):
    with pytest.raises(ParamError) as err:
        insights.evaluate(RegionSum(), region_image(), region_image(), 0, "road_morf", **params)
    assert err.value.field == field


# --------------------------------------------------------------------------- infidelity


def gaussians(shape, k, std, seed):
    """The k perturbations infidelity draws: k × N×C×H×W."""
    return torch.stack(list(itertools.islice(sensitivity.gaussian_noise(shape, std, seed), k)))


@pytest.mark.parametrize("method,normalize,score", [
    ("saliency", True, "logit"), ("saliency", False, "probability"),
    ("integrated_gradients", False, "logit"), ("integrated_gradients", True, "probability")])
def test_infidelity_equals_captums(small_cnn, images, method, normalize, score):
    from captum.metrics import infidelity as captum_infidelity

    k, std, seed = 6, 0.1, 5
    a = insights.attribute(small_cnn, images, method, TARGETS)
    ours = insights.evaluate(small_cnn, images, a, TARGETS, "infidelity", n_perturb_samples=k,
                             noise=std, normalize=normalize, score=score, seed=seed)
    deltas = gaussians(images.shape, k, std, seed).transpose(0, 1).flatten(0, 1)  # row i k + j

    def perturb(expanded):
        return deltas, expanded - deltas

    def forward(x):
        out = small_cnn(x)
        return out.softmax(-1) if score == "probability" else out

    theirs = captum_infidelity(forward, perturb, images, a, target=torch.tensor(TARGETS),
                               n_perturb_samples=k, normalize=normalize)
    assert ours["values"] == pytest.approx(theirs.tolist(), rel=1e-4)
    assert min(ours["values"]) > 0


def test_infidelity_of_the_exact_gradient_of_a_linear_model_is_zero():
    """For a linear score, f(x) - f(x - I) is the weight times I: the gradient predicts it
    exactly, and twice the gradient only after normalising."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    grad = insights.attribute(model, x, "saliency", [0, 1], abs=False)
    kw = dict(n_perturb_samples=4, noise=0.5, score="logit")
    exact = insights.evaluate(model, x, grad, [0, 1], "infidelity", normalize=False, **kw)
    assert max(exact["values"]) < 1e-8
    doubled = insights.evaluate(model, x, 2 * grad, [0, 1], "infidelity", normalize=False, **kw)
    deltas = gaussians(x.shape, 4, 0.5, 0)
    by_hand = ((grad.unsqueeze(0) * deltas).flatten(2).sum(2) ** 2).mean(0)  # (2a·I - a·I)²
    assert doubled["values"] == pytest.approx(by_hand.tolist(), rel=1e-4)
    fitted = insights.evaluate(model, x, 2 * grad, [0, 1], "infidelity", normalize=True, **kw)
    assert max(fitted["values"]) < 1e-8 and fitted["beta"] == pytest.approx([0.5, 0.5], rel=1e-4)


def test_infidelity_takes_a_cam_map_for_every_channel(small_cnn, images):
    cam = insights.attribute(small_cnn, images, "grad_cam", TARGETS)
    kw = dict(n_perturb_samples=3, noise=0.1)
    one = insights.evaluate(small_cnn, images, cam, TARGETS, "infidelity", **kw)
    three = insights.evaluate(small_cnn, images, cam.expand(-1, 3, -1, -1), TARGETS, "infidelity", **kw)
    assert one["values"] == pytest.approx(three["values"], rel=1e-5)
    with pytest.raises(ParamError, match="has 2 channels") as err:
        insights.evaluate(small_cnn, images, cam.expand(-1, 2, -1, -1), TARGETS, "infidelity")
    assert err.value.field == "attribution"


def test_infidelity_progress_cancel_and_refusals(small_cnn, images):
    sal = insights.attribute(small_cnn, images, "saliency", TARGETS)
    seen = []
    insights.evaluate(small_cnn, images, sal, TARGETS, "infidelity", n_perturb_samples=4,
                      memory_budget=1, progress=lambda d, t: seen.append((d, t)))
    total = 2 * insights.metric_info("infidelity", {"n_perturb_samples": 4})["cost"]["forward"]
    assert total == 2 * 5 and seen == [(d, total) for d in range(1, total + 1)]
    with pytest.raises(Cancelled):
        insights.evaluate(small_cnn, images, sal, TARGETS, "infidelity", cancel=lambda: True)
    for params, field in (({"n_perturb_samples": 0}, "n_perturb_samples"), ({"noise": "loud"}, "noise"),
                          ({"normalize": "maybe"}, "normalize"), ({"method": "saliency"}, "method")):
        with pytest.raises(ParamError) as err:
            insights.evaluate(small_cnn, images, sal, TARGETS, "infidelity", **params)
        assert err.value.field == field


# --------------------------------------------------------------------------- registry-wide


@pytest.mark.parametrize("metric", ["deletion", "road_morf", "infidelity"])
def test_gradient_methods_still_work_after_a_metric(small_cnn, metric):
    """A metric's forward passes may build the model's traced twin; built in inference mode, its
    folded weights broke every later gradient through it ("Inference tensors cannot be saved for
    backward")."""
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sal = insights.attribute(small_cnn, x, "saliency", 3)
    params = {"n_perturb_samples": 2} if metric == "infidelity" else {"steps": 2, "reference": "none"}
    insights.evaluate(small_cnn, x, sal, 3, metric, **params)
    ig = insights.attribute(small_cnn, x, "integrated_gradients", 3, n_steps=4)
    assert torch.isfinite(ig).all() and ig.abs().sum() > 0


def test_the_metrics_are_listed_in_order():
    assert insights.list_metrics()[:6] == ["deletion", "insertion", "road_morf", "road_lerf",
                                           "infidelity", "sensitivity_max"]
    needs = {m: insights.metric_info(m)["needs_method"] for m in insights.list_metrics()[:6]}
    assert [m for m, n in needs.items() if n] == ["sensitivity_max"]
