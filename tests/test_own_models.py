"""Users' own models: a TorchScript module gets every method that needs no hooks, with the same
map as the module it was scripted from, and a clear refusal for the others — in the engine and
through the HTTP API."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import insights
from appkit import png, upload, wait_job
from conftest import Gray, rel_error
from insights.engine import UnsupportedModel, registry

SMALL = {"occlusion": {"sliding_window_shapes": (3, 16, 16), "strides": (3, 8, 8)},
         "feature_ablation": {"patch_size": 16}, "integrated_gradients": {"n_steps": 8},
         "gradient_shap": {"n_samples": 4}}


def scripted(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation notice
        return torch.jit.script(model)


@pytest.mark.parametrize("method", registry.ids())
def test_every_method_runs_on_torchscript_or_says_why(method, small_cnn, images):
    script = scripted(small_cnn)
    params = SMALL.get(method, {})
    if registry.get(method).exclusive:  # installs hooks
        with pytest.raises(UnsupportedModel) as refused:
            insights.attribute(script, images, method, [1, 2], **params)
        assert refused.value.field == "method"
        assert "TorchScript" in str(refused.value) and "--config" in str(refused.value)
        return
    info = {}
    ours = insights.attribute(script, images, method, [1, 2], info=info, **params)
    eager = insights.attribute(small_cnn, images, method, [1, 2], **params)
    assert ours.shape == eager.shape and torch.isfinite(ours).all() and ours.abs().max() > 0
    assert rel_error(ours, eager) < 1e-4
    if "twin" in info.get("fast_paths", {}):
        assert info["fast_paths"]["twin"].startswith("declined: ")


def test_attribute_many_refuses_a_hook_method_on_torchscript(small_cnn, images):
    script = scripted(small_cnn)
    with pytest.raises(UnsupportedModel, match="Grad-CAM needs forward hooks"):
        insights.attribute_many(script, images, ["saliency", "grad_cam"], [1, 2])
    saliency, ixg = insights.attribute_many(script, images, ["saliency", "input_x_gradient"], [1, 2])
    assert torch.allclose(saliency, insights.attribute(small_cnn, images, "saliency", [1, 2]))
    assert torch.allclose(ixg, insights.attribute(small_cnn, images, "input_x_gradient", [1, 2]))


# --------------------------------------------------------------------------- through the API


@pytest.fixture
def ts_app(tmp_path):
    from conftest import SmallCNN, seeded

    path, labels = tmp_path / "tiny_ts.pt", tmp_path / "labels.txt"
    scripted(seeded(lambda: SmallCNN(classes=5))).save(str(path))
    labels.write_text("\n".join(["apple", "banana", "cherry", "date", "elderberry"]) + "\n")
    app = insights.create_app({"INSTANCE_PATH": str(tmp_path / "instance"), "BUILTIN_MODELS": False,
                               "TORCHSCRIPT": str(path), "TORCHSCRIPT_LABELS": str(labels), "DEVICE": "cpu",
                               "INLINE_MAX_PASSES": 5, "MAX_IMAGE_PIXELS": 250_000})
    yield app
    app.extensions["insights"].jobs.shutdown()


def test_torchscript_model_explains_through_the_api(ts_app):
    client = ts_app.test_client()
    entry = client.get("/api/models").json["models"][0]
    assert entry["name"] == "tiny_ts" and entry["format"] == "torchscript"
    hooked = sorted(m for m in registry.ids() if registry.get(m).exclusive)
    assert sorted(entry["unsupported"]) == hooked and "TorchScript" in entry["unsupported"]["grad_cam"]
    listed = client.get("/api/methods?model=tiny_ts").json["methods"]
    assert {m["id"]: m["supported"] for m in listed} == {m: m not in hooked for m in registry.ids()}
    assert all((m["reason"] is None) == m["supported"] for m in listed)

    image = upload(client, png()).json["id"]
    assert client.post("/api/predict", json={"image": image, "top_k": 2}).status_code == 200
    for method in ("saliency", "integrated_gradients"):
        r = client.post("/api/explain", json={"image": image, "method": method, "target": 1,
                                              "params": {"n_steps": 4} if method == "integrated_gradients" else {}})
        assert r.status_code == 200 and r.json["result"]["method"] == method, r.json
    queued = client.post("/api/explain", json={"image": image, "method": "occlusion", "target": 1, "params": {
        "sliding_window_shapes": [3, 75, 75], "strides": [3, 75, 75]}})  # 9 windows: a job
    assert queued.status_code == 202
    assert wait_job(client, queued.json["job"]["id"])["status"] == "done"

    refused = client.post("/api/explain", json={"image": image, "method": "grad_cam", "target": 1})
    assert refused.status_code == 400 and refused.json["error"]["code"] == "unsupported_method"
    assert refused.json["error"]["field"] == "method" and "--config" in refused.json["error"]["message"]
    assert ts_app.extensions["insights"].jobs.get(queued.json["job"]["id"]).status == "done"


def test_methods_for_an_unknown_model_is_a_400(ts_app):
    r = ts_app.test_client().get("/api/methods?model=nope")
    assert r.status_code == 400 and r.json["error"]["code"] == "unknown_model"
    plain = ts_app.test_client().get("/api/methods").json["methods"]
    assert all("supported" not in m for m in plain)  # without a model: the plain descriptions


# --------------------------------------------------------------------------- defaults from the input


def defaults(info: dict) -> dict:
    return {p["name"]: p["default"] for p in info["params"]}


def test_window_defaults_follow_the_input_size():
    big, small = insights.method_info("occlusion"), insights.method_info("occlusion", shape=(1, 28, 28))
    assert defaults(big)["sliding_window_shapes"] == [3, 32, 32] and defaults(big)["strides"] == [3, 16, 16]
    assert defaults(small)["sliding_window_shapes"] == [1, 4, 4] and defaults(small)["strides"] == [1, 2, 2]
    assert small["cost"]["forward"] == 13 * 13 + 1
    assert defaults(insights.method_info("feature_ablation"))["patch_size"] == 16
    assert defaults(insights.method_info("feature_ablation", shape=(1, 28, 28)))["patch_size"] == 2


def test_default_occlusion_runs_on_a_one_channel_model():
    torch.manual_seed(0)
    model, x = Gray().eval(), torch.randn(2, 1, 28, 28)
    info = {}
    ours = insights.attribute(model, x, "occlusion", [0, 3], info=info)
    given = insights.attribute(model, x, "occlusion", [0, 3], sliding_window_shapes=(1, 4, 4), strides=(1, 2, 2))
    assert torch.equal(ours, given) and ours.abs().max() > 0 and info["cost"]["forward"] == 170
    patches = insights.attribute(model, x, "feature_ablation", [0, 3])
    assert torch.equal(patches, insights.attribute(model, x, "feature_ablation", [0, 3], patch_size=2))


def test_a_one_channel_config_model_gets_its_own_defaults_through_the_api(tmp_path):
    config = tmp_path / "gray_models.py"
    config.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "from conftest import Gray\n"
        "register('gray', lambda: Gray(), Preprocessing(resize=28, crop=28, mean=(0.5,), std=(0.5,)),\n"
        "         ['zero', 'one', 'two', 'three'])\n")
    app = insights.create_app({"INSTANCE_PATH": str(tmp_path / "instance"), "BUILTIN_MODELS": False,
                               "MODELS_CONFIG": str(config), "DEVICE": "cpu", "INLINE_MAX_PASSES": 5})
    try:
        client = app.test_client()
        listed = {m["id"]: m for m in client.get("/api/methods?model=gray").json["methods"]}
        assert defaults(listed["occlusion"])["sliding_window_shapes"] == [1, 4, 4]
        assert listed["occlusion"]["cost"]["forward"] == 170 and listed["occlusion"]["supported"] is True
        image = upload(client, png(size=(28, 28))).json["id"]
        queued = client.post("/api/explain", json={"image": image, "method": "occlusion", "target": 2})
        assert queued.status_code == 202, queued.json
        state = wait_job(client, queued.json["job"]["id"])
        assert state["status"] == "done", state
        meta = client.get(f"/api/results/{state['result_id']}").json
        assert meta["params"]["sliding_window_shapes"] == [1, 4, 4] and meta["shape"] == [1, 1, 28, 28]
    finally:
        app.extensions["insights"].jobs.shutdown()


# --------------------------------------------------------------------------- torch.export programs


def exported(model: torch.nn.Module, path, dynamic: bool = True, side: int = 64):
    """``model`` exported for 3×side×side inputs (a dynamic batch, or a fixed batch of one),
    saved and loaded back as the app loads it."""
    from insights.loaders import exported_loader

    x = torch.randn(2 if dynamic else 1, 3, side, side)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic else None
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=shapes), str(path))
    return exported_loader(str(path))()


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic batch", "batch of one"])
@pytest.mark.parametrize("method", registry.ids())
def test_every_method_runs_on_an_exported_program_or_says_why(method, dynamic, small_cnn, images, tmp_path):
    program = exported(small_cnn, tmp_path / "m.pt2", dynamic)
    assert program.fixed_batch == (None if dynamic else 1)
    params = SMALL.get(method, {})
    if registry.get(method).exclusive:
        with pytest.raises(UnsupportedModel, match="exported program"):
            insights.attribute(program, images, method, [1, 2], **params)
        return
    info = {}
    ours = insights.attribute(program, images, method, [1, 2], info=info, **params)
    eager = insights.attribute(small_cnn, images, method, [1, 2], **params)
    assert rel_error(ours, eager) < 1e-4 and ours.abs().max() > 0
    if "twin" in info.get("fast_paths", {}):
        assert info["fast_paths"]["twin"] == "declined: an opaque module (an exported program)"


def test_a_program_for_a_fixed_batch_above_one_says_how_to_re_export(small_cnn, tmp_path):
    from insights.loaders import exported_loader

    x = torch.randn(2, 3, 64, 64)
    torch.export.save(torch.export.export(small_cnn, (x,)), str(tmp_path / "two.pt2"))
    program = exported_loader(str(tmp_path / "two.pt2"))()
    assert torch.allclose(program(x), small_cnn(x), atol=1e-5)
    with pytest.raises(ValueError, match=r"batches of exactly 2; export it with a dynamic batch"):
        program(torch.randn(3, 3, 64, 64))
    with pytest.raises(ValueError, match=r"takes 3×64×64 inputs, not 3×224×224; register it in a models config"):
        program(torch.randn(2, 3, 224, 224))


def test_an_exported_program_explains_through_the_api(tmp_path, small_cnn):
    exported(small_cnn, tmp_path / "small.pt2", side=224)  # what --exported preprocesses to
    (tmp_path / "labels.txt").write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    app = insights.create_app({"INSTANCE_PATH": str(tmp_path / "instance"), "BUILTIN_MODELS": False,
                               "EXPORTED": str(tmp_path / "small.pt2"), "EXPORTED_LABELS": str(tmp_path / "labels.txt"),
                               "DEVICE": "cpu", "INLINE_MAX_PASSES": 5})
    try:
        client = app.test_client()
        entry = client.get("/api/models").json["models"][0]
        assert (entry["name"], entry["format"]) == ("small", "exported")
        assert sorted(entry["unsupported"]) == sorted(m for m in registry.ids() if registry.get(m).exclusive)
        image = upload(client, png()).json["id"]
        top = client.post("/api/predict", json={"image": image, "top_k": 3}).json["predictions"]
        assert len(top) == 3 and top[0]["label"].startswith("class ")
        ig = client.post("/api/explain", json={"image": image, "method": "integrated_gradients", "target": 4,
                                               "params": {"n_steps": 4}})
        assert ig.status_code == 200 and ig.json["result"]["shape"] == [1, 3, 224, 224]
        occ = client.post("/api/explain", json={"image": image, "method": "occlusion", "target": 4, "params": {
            "sliding_window_shapes": [3, 75, 75], "strides": [3, 75, 75]}})
        assert occ.status_code == 202 and wait_job(client, occ.json["job"]["id"])["status"] == "done"
        refused = client.post("/api/explain", json={"image": image, "method": "deeplift", "target": 4})
        assert refused.status_code == 400 and refused.json["error"]["code"] == "unsupported_method"
    finally:
        app.extensions["insights"].jobs.shutdown()


def test_deeplift_on_a_config_convnext_is_stored_with_its_warning(tmp_path):
    """ConvNeXt-Tiny (random weights) registered through a models config: DeepLift runs, and the
    stored result says how far off its sum is and which modules its rules do not cover, which is
    what the page and the share page turn into the warning."""
    config = tmp_path / "convnext.py"
    config.write_text(
        "import torch, torchvision\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torchvision.models.convnext_tiny(weights=None, num_classes=4)\n"
        "register('convnext', build, Preprocessing(resize=64, crop=64), ['a', 'b', 'c', 'd'])\n")
    app = insights.create_app({"INSTANCE_PATH": str(tmp_path / "instance"), "BUILTIN_MODELS": False,
                               "MODELS_CONFIG": str(config), "DEVICE": "cpu"})
    try:
        client = app.test_client()
        assert client.get("/api/models").json["models"][0]["unsupported"] == {}  # an nn.Module: all methods
        image = upload(client, png(size=(64, 64))).json["id"]
        r = client.post("/api/explain", json={"image": image, "method": "deeplift", "target": 1})
        assert r.status_code == 200, r.json
        completeness = r.json["result"]["completeness"]
        assert completeness["kind"] == "exact" and completeness["delta"] > completeness["threshold"] == 0.05
        assert "LayerNorm2d" in completeness["uncovered"]
    finally:
        app.extensions["insights"].jobs.shutdown()
