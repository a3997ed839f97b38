"""The engine as a whole (insights.engine): every registered method leaves the model as it
found it (also when it fails midway), concurrent calls do not disturb each other, and the
public API validates its arguments and reports progress."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import insights
from insights.engine import registry
from insights.engine.method import Facts, Method
from insights.engine.params import Cost, Param
from insights.engine.probe import probe

from conftest import SmallCNN, seeded

# Small parameters so every method runs in a moment on 32×32 inputs; others keep defaults.
FAST = {
    "integrated_gradients": {"n_steps": 4},
    "gradient_shap": {"n_samples": 3},
    "occlusion": {"sliding_window_shapes": [3, 16, 16], "strides": [3, 16, 16]},
    "feature_ablation": {"patch_size": 16},
}
GRADIENT_IDS = ["saliency", "input_x_gradient", "integrated_gradients", "gradient_shap",
                "deeplift", "guided_backprop", "deconvolution"]
TARGETS = [3, 7]


def fast(method: str) -> dict:
    return dict(FAST.get(method, {}))


_TRIPS: dict[int, list[int]] = {}  # tripwire id -> [calls, fail_at]


def tripwire(x: torch.Tensor, key: int) -> torch.Tensor:
    """Counts a call of tripwire ``key`` and raises on its armed call. torch.fx.wrap keeps it a
    call in traced copies of the model (the engine's fast twin), so the copy trips too."""
    state = _TRIPS[key]
    state[0] += 1
    if state[0] == state[1]:
        raise RuntimeError("tripwire")
    return x


torch.fx.wrap("tripwire")


class Tripwire(nn.Module):
    """Identity that raises on its ``fail_at``-th call once armed (a model failing midway)."""

    def __init__(self):
        super().__init__()
        self.key = len(_TRIPS)
        _TRIPS[self.key] = [0, 0]

    def forward(self, x):
        return tripwire(x, self.key)

    @property
    def calls(self) -> int:
        return _TRIPS[self.key][0]

    def arm(self, fail_at: int) -> None:
        _TRIPS[self.key][:] = [0, fail_at]


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = SmallCNN()
        self.trip = Tripwire()

    def forward(self, x):
        return self.trip(self.net(x))


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


def snapshot(model: nn.Module, x: torch.Tensor) -> dict:
    """Everything a method could leave behind, and the model's eval-mode output."""
    modules = list(model.modules())
    modes = [m.training for m in modules]
    state = {
        "modes": modes,
        "inplace": [getattr(m, "inplace", None) for m in modules],
        "hooks": [sum(len(getattr(m, d, {})) for d in HOOK_DICTS) for m in modules],
        "grads": [p.grad for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
    }
    model.eval()
    with torch.no_grad():
        state["output"] = model(x)
    for m, mode in zip(modules, modes):
        m.training = mode
    return state


def assert_unchanged(model: nn.Module, x: torch.Tensor, before: dict) -> None:
    after = snapshot(model, x)
    assert after["hooks"] == [0] * len(after["hooks"])
    assert after["modes"] == before["modes"]
    assert after["inplace"] == before["inplace"]
    assert all(g is None for g in after["grads"])
    assert after["requires_grad"] == before["requires_grad"]
    assert before["tensors"].keys() == after["tensors"].keys()
    assert all(torch.equal(before["tensors"][k], after["tensors"][k]) for k in before["tensors"])
    assert torch.equal(after["output"], before["output"])
    from torch.nn.modules import module as nn_module
    assert not nn_module._global_forward_hooks and not nn_module._global_backward_hooks


@pytest.fixture
def wrapped() -> Wrapped:
    model = seeded(Wrapped, seed=7)
    model.train()  # a mixed-mode model: the engine must restore each module's own flag
    model.net.bn1.eval()
    return model


@pytest.fixture
def small(images) -> torch.Tensor:
    return images[:, :, :32, :32].contiguous()


# --------------------------------------------------------------------------- leaks


@pytest.mark.parametrize("method", insights.methods())
def test_method_leaves_the_model_as_it_found_it(wrapped, small, method):
    before = snapshot(wrapped, small)
    seen = []
    out = insights.attribute(wrapped, small, method, TARGETS,
                             progress=lambda d, t: seen.append((d, t)), **fast(method))
    assert torch.isfinite(out).all() and out.abs().max() > 0
    assert seen and seen[-1][0] == seen[-1][1] == seen[0][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert_unchanged(wrapped, small, before)


@pytest.mark.parametrize("method", insights.methods())
def test_cancelled_method_leaves_the_model_as_it_found_it(wrapped, small, method):
    before = snapshot(wrapped, small)
    stop = threading.Event()
    with pytest.raises(insights.Cancelled):
        insights.attribute(wrapped, small, method, TARGETS, cancel=stop,
                           progress=lambda d, t: stop.set(), **fast(method))
    assert_unchanged(wrapped, small, before)


@pytest.mark.parametrize("fail_at", [1, 2])
@pytest.mark.parametrize("method", insights.methods())
def test_failing_model_leaves_the_model_as_it_found_it(wrapped, small, method, fail_at):
    # A first call runs the probe's forward pass and builds the model's twin, so that the
    # armed calls are the method's own.
    insights.attribute(wrapped, small, method, TARGETS, memory_budget=1, **fast(method))
    before = snapshot(wrapped, small)
    wrapped.trip.arm(fail_at)
    with pytest.raises(RuntimeError, match="tripwire"):
        # memory_budget=1: one image per batch, so the second forward is a second batch
        insights.attribute(wrapped, small, method, TARGETS, memory_budget=1, **fast(method))
    wrapped.trip.arm(0)
    assert_unchanged(wrapped, small, before)


# --------------------------------------------------------------------------- threads


@pytest.mark.parametrize("pair", [("guided_backprop", "saliency"),
                                  ("deeplift", "integrated_gradients"),
                                  ("saliency", "integrated_gradients"),
                                  ("guided_backprop", "guided_backprop")])
def test_concurrent_calls_get_what_they_get_alone(small_cnn, images, pair):
    # Many one-image batches (memory_budget=1) so that the two calls really interleave.
    params = {m: dict(fast(m), memory_budget=1, n_steps=8) if m == "integrated_gradients"
              else dict(fast(m), memory_budget=1) for m in pair}
    alone = [insights.attribute(small_cnn, images, m, TARGETS, **params[m]) for m in pair]
    barrier = threading.Barrier(len(pair))
    results: list = [None] * len(pair)

    def work(i: int, method: str) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = insights.attribute(small_cnn, images, method, TARGETS, **params[method])
        except BaseException as err:  # surfaced by the assertion below
            results[i] = err

    threads = [threading.Thread(target=work, args=(i, m)) for i, m in enumerate(pair)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for got, expected in zip(results, alone):
        assert isinstance(got, torch.Tensor), got
        assert torch.equal(got, expected)


# --------------------------------------------------------------------------- API


def test_methods_lists_the_gradient_family_in_order():
    ids = insights.methods()
    assert [m for m in ids if m in GRADIENT_IDS] == GRADIENT_IDS
    assert len(set(ids)) == len(ids)
    assert ids == registry.ids()


@pytest.mark.parametrize("method", insights.methods())
def test_method_info_describes_the_method(method):
    info = insights.method_info(method, fast(method), shape=(3, 32, 32))
    assert info["id"] == method
    assert info["label"] and len(info["description"]) > 40
    assert isinstance(info["signed"], bool) and info["output"] in ("pixel", "cam")
    assert info["family"] in ("gradient", "perturbation", "cam")
    for param in info["params"]:
        assert {"name", "type", "default", "help"} <= param.keys() and param["help"]
        if param["type"] == "choice":
            assert param["default"] in param["choices"]
    cost = info["cost"]
    assert set(cost) == {"forward", "backward"} and cost["forward"] >= 1 and cost["backward"] >= 0


def test_gradient_method_info_schema():
    info = insights.method_info("integrated_gradients", {"n_steps": 16})
    params = {p["name"]: p for p in info["params"]}
    assert params["n_steps"] == {"name": "n_steps", "type": "int", "default": 50, "min": 1,
                                 "max": 1024, "help": params["n_steps"]["help"]}
    assert params["integration"]["choices"][-1] == "gausslegendre"
    assert params["nt_type"]["choices"] == ["none", "smoothgrad", "smoothgrad_sq", "vargrad"]
    assert info["cost"] == {"forward": 16, "backward": 16}
    assert insights.method_info("saliency")["signed"] is False
    assert insights.method_info("saliency", {"abs": "false"})["signed"] is True


def test_unknown_method_names_it(small_cnn, images):
    with pytest.raises(insights.UnknownMethod) as err:
        insights.attribute(small_cnn, images, "lime_juice", 0)
    assert err.value.field == "method" and "lime_juice" in str(err.value)
    assert "saliency" in str(err.value)
    with pytest.raises(insights.UnknownMethod):
        insights.method_info("lime_juice")


@pytest.mark.parametrize("params,field,words", [
    ({"n_steps": 0}, "n_steps", "at least 1"),
    ({"n_steps": 2000}, "n_steps", "at most 1024"),
    ({"n_steps": "many"}, "n_steps", "integer"),
    ({"integration": "simpson"}, "integration", "gausslegendre"),
    ({"nt_type": "smoothgrad", "nt_samples": 0}, "nt_samples", "at least 1"),
    ({"stdevs": -1}, "stdevs", "at least"),
    ({"steps": 4}, "steps", "not a parameter of integrated_gradients"),
    ({"baselines": "zero"}, "baselines", "number"),
])
def test_bad_parameters_name_the_field(small_cnn, images, params, field, words):
    with pytest.raises(insights.ParamError) as err:
        insights.attribute(small_cnn, images, "integrated_gradients", 0, **params)
    assert err.value.field == field
    assert words in str(err.value) and str(err.value).startswith(field)


@pytest.mark.parametrize("target,words", [(10, "class index 10 is out of range 0..9"),
                                          (-1, "class index -1"),
                                          ([1, 2, 3], "one class index or one per row (2)")])
def test_bad_targets_name_the_field(small_cnn, images, target, words):
    with pytest.raises(insights.ParamError) as err:
        insights.attribute(small_cnn, images, "saliency", target)
    assert err.value.field == "target" and words in str(err.value)


def test_bad_inputs_name_the_field(small_cnn, images):
    for bad in (images[0], images.to(torch.int64), images.numpy()):
        with pytest.raises(insights.ParamError) as err:
            insights.attribute(small_cnn, bad, "saliency", 0)
        assert err.value.field == "inputs"


@pytest.mark.parametrize("method", GRADIENT_IDS)
def test_progress_is_monotone_and_ends_at_the_cost(small_cnn, images, method):
    seen = []
    params = dict(fast(method), nt_type="smoothgrad", nt_samples=2) \
        if method != "gradient_shap" else fast(method)
    insights.attribute(small_cnn, images, method, TARGETS, memory_budget=1,
                       progress=lambda d, t: seen.append((d, t)), **params)
    total = insights.method_info(method, params)["cost"]["forward"] * images.shape[0]
    assert len(seen) > 1
    assert all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (total, total)


def test_cancel_before_start_raises_cancelled_without_running(images):
    model = seeded(Wrapped)
    probe(model, images)
    stop = threading.Event()
    stop.set()
    model.trip.arm(0)
    with pytest.raises(insights.Cancelled):
        insights.attribute(model, images, "integrated_gradients", 0, cancel=stop, n_steps=4)
    assert model.trip.calls == 0
    with pytest.raises(insights.Cancelled):
        insights.attribute(model, images, "deeplift", 0, cancel=lambda: True)
    assert model.trip.calls == 0



@pytest.mark.parametrize("method", insights.methods())
def test_batchable_methods_give_each_row_the_map_it_gets_alone(method, small_cnn, images):
    """A method that calls itself batchable maps a row the same alone as in a batch."""
    m = registry.get(method)
    if not m.batchable(m.validate({})):
        assert method == "gradient_shap"
        return
    both = insights.attribute(small_cnn, images, method, [1, 2])
    alone = insights.attribute(small_cnn, images[1:], method, 2)
    torch.testing.assert_close(both[1:], alone, rtol=1e-4, atol=1e-5)


def test_noise_drawn_for_the_whole_batch_is_not_batchable():
    assert not registry.get("saliency").batchable(registry.get("saliency").validate({"nt_type": "smoothgrad"}))
    assert registry.get("saliency").batchable(registry.get("saliency").validate({}))


class PerChannel(Method):
    """Test method: one forward pass per channel of a layer (the way Score-CAM costs)."""

    id = "per_channel_test"
    label = "Per channel (test)"
    family = "test"
    params = (Param("layer", "string", None, "Layer."),)

    def cost(self, p, facts):
        shape = facts.layer_shape(p["layer"])
        return Cost(shape[0] if shape else 1, 0)

    def run(self, ctx, p):
        for _ in range(self.cost(p, Facts(tuple(ctx.inputs.shape[1:]), ctx.model, ctx.inputs[:1])).forward):
            ctx.advance(ctx.inputs.shape[0])
        return torch.zeros_like(ctx.inputs)


def test_cost_can_depend_on_a_layer_of_the_model(small_cnn, images, monkeypatch):
    monkeypatch.setitem(registry._methods, PerChannel.id, PerChannel())
    facts = Facts((3, 64, 64), small_cnn, images[:1])
    assert facts.layer_shape("conv2") == (12, 64, 64)
    assert facts.layer_shape() == (16, 4, 4)  # the last spatial layer (avgpool), where Grad-CAM looks
    assert facts.layer_shape("no_such_layer") is None
    assert Facts((3, 64, 64)).layer_shape("conv2") is None  # only the shape is known
    assert insights.method_info(PerChannel.id, {"layer": "conv2"})["cost"] == {"forward": 1, "backward": 0}
    assert insights.method_info(PerChannel.id, {"layer": "conv2"}, (3, 64, 64), small_cnn)["cost"] == \
        {"forward": 12, "backward": 0}  # told the model, the description counts its layer too
    seen, info = [], {}
    insights.attribute(small_cnn, images, PerChannel.id, [1, 2], layer="conv2", info=info,
                       progress=lambda done, total: seen.append((done, total)))
    assert info["cost"] == {"forward": 12, "backward": 0}
    assert seen[-1] == (24, 24) and {total for _, total in seen} == {24}
