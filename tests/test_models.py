"""The model registry: built-ins, availability without loading, lazy single loads, LRU, custom models."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from insights import imaging
from insights.models import (ModelRegistry, ModelUnavailable, Preprocessing, UnknownModel, resolve_device,
                             state_dict_loader)

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "my_models.py")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache for the test."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def tiny(seed=0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_builtins_are_listed_at_once_without_loading(hub):
    start = time.perf_counter()
    reg = ModelRegistry()
    reg.register_builtins()
    infos = {n: reg.info(n) for n in reg.names()}
    assert time.perf_counter() - start < 5
    assert list(infos) == ["efficientnet_lite0", "resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0",
                           "convnext_tiny", "vit_b_16"]
    lite = infos["efficientnet_lite0"]
    assert lite["available"] and lite["default"] and lite["num_classes"] == 1000 and lite["input_size"] == [3, 224, 224]
    assert lite["preprocessing"]["mean"] == pytest.approx([127 / 255] * 3)
    assert lite["preprocessing"]["std"] == pytest.approx([128 / 255] * 3)
    r18 = infos["resnet18"]
    assert r18["available"] is False and "resnet18-f37072fd.pth" in r18["reason"]
    assert "INSIGHTS_ALLOW_DOWNLOAD" in r18["reason"]
    assert reg.loaded() == []


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
                                  "vit_b_16"])
def test_torchvision_preprocessing_and_labels_come_from_the_weights(hub, name):
    weights = torchvision.models.get_model_weights(name).DEFAULT
    t = weights.transforms()
    reg = ModelRegistry()
    reg.register_builtins()
    spec = reg.spec(name)
    p = spec.preprocessing
    assert (p.resize, p.crop) == (t.resize_size[0], t.crop_size[0])
    assert p.mean == tuple(t.mean) and p.std == tuple(t.std) and p.interpolation == t.interpolation.value
    assert spec.labels == weights.meta["categories"]


def test_weights_in_the_hub_cache_make_a_model_available(hub):
    reg = ModelRegistry()
    reg.register_builtins()
    ckpt = hub / "checkpoints"
    ckpt.mkdir(parents=True)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, ckpt / "resnet18-f37072fd.pth")
    assert reg.info("resnet18")["available"] is True
    model = reg.get("resnet18")
    assert torch.equal(model.fc.weight, state["fc.weight"]) and not model.training
    assert reg.info("resnet50")["available"] is False


def test_allow_download_makes_models_available_without_loading(hub):
    reg = ModelRegistry(allow_download=True)
    reg.register_builtins()
    assert all(reg.info(n)["available"] for n in reg.names())


def test_efficientnet_lite0_finds_the_cat():
    import skimage.data

    reg = ModelRegistry()
    reg.register_builtins()
    spec = reg.spec("efficientnet_lite0")
    x, view = imaging.preprocess(Image.fromarray(skimage.data.chelsea()), spec.preprocessing)
    with torch.inference_mode():
        top3 = reg.get("efficientnet_lite0")(x)[0].topk(3).indices.tolist()
    assert view.size == (224, 224)
    assert set(top3) <= {281, 282, 283, 284, 285}
    assert spec.labels[281] == "tabby"


def test_models_load_once_under_concurrent_first_use():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)
        return tiny()

    reg = ModelRegistry()
    reg.register("m", slow, Preprocessing(8, 8), ["a", "b", "c"])
    got = []
    threads = [threading.Thread(target=lambda: got.append(reg.get("m"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 6 and all(g is got[0] for g in got)
    assert all(not p.requires_grad for p in got[0].parameters())


def test_least_recently_used_model_is_dropped():
    loads = []
    reg = ModelRegistry(max_loaded=2)
    for name in "abc":
        reg.register(name, lambda name=name: loads.append(name) or tiny(), Preprocessing(8, 8), ["x", "y", "z"])
    reg.get("a"), reg.get("b"), reg.get("a"), reg.get("c")
    assert reg.loaded() == ["a", "c"]
    reg.get("b")
    assert loads == ["a", "b", "c", "b"] and reg.loaded() == ["c", "b"]


def test_a_failed_load_marks_the_model_unavailable():
    reg = ModelRegistry()
    reg.register("bad", lambda: "not a model", Preprocessing(8, 8), ["x"])
    with pytest.raises(ModelUnavailable, match="returned str, not a torch.nn.Module"):
        reg.get("bad")
    info = reg.info("bad")
    assert info["available"] is False and "TypeError" in info["reason"]


def test_unknown_model_names_the_known_ones():
    reg = ModelRegistry()
    reg.register("m", tiny, Preprocessing(8, 8), ["x", "y", "z"])
    with pytest.raises(UnknownModel, match="unknown model 'nope'; known models: m"):
        reg.spec("nope")


@pytest.mark.parametrize("kwargs, words", [
    ({"name": "bad name!"}, "must be non-empty"),
    ({"name": "m"}, "already registered"),
    ({"preprocessing": {"resize": 8, "crop": 16}}, "crop <= resize"),
    ({"preprocessing": {"resize": 8, "crop": 8, "std": (0, 1, 1)}}, "std values must be positive"),
    ({"labels": []}, "at least one class label"),
    ({"loader": "model.pt"}, "loader must be a function"),
])
def test_register_validates(kwargs, words):
    reg = ModelRegistry()
    reg.register("m", tiny, Preprocessing(8, 8), ["x"])
    args = {"name": "n", "loader": tiny, "preprocessing": Preprocessing(8, 8), "labels": ["x"], **kwargs}
    with pytest.raises(ValueError, match=words):
        reg.register(**args)


def test_example_config(tmp_path, monkeypatch):
    weights = tmp_path / "my_resnet18.pt"
    monkeypatch.setenv("MY_RESNET18_WEIGHTS", str(weights))
    reg = ModelRegistry()
    reg.load_config(EXAMPLE)
    assert reg.names() == ["my_resnet18", "demo_shapes"]
    info = reg.info("my_resnet18")
    assert info["available"] is False and str(weights) in info["reason"] and info["cam_layer"] == "layer4"
    demo = reg.get("demo_shapes")
    assert demo(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, weights)
    assert reg.info("my_resnet18")["available"] is True
    assert torch.equal(reg.get("my_resnet18").conv1.weight, state["conv1.weight"])


def test_state_dicts_load_without_unpickling_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": Preprocessing(8, 8)}, path)  # an arbitrary object
    reg = ModelRegistry()
    reg.register("evil", state_dict_loader(tiny, str(path)), Preprocessing(8, 8), ["x", "y", "z"])
    with pytest.raises(ModelUnavailable, match="Weights only load failed|weights_only"):
        reg.get("evil")


def test_torchscript_with_labels_file(tmp_path):
    model = tiny(3).eval()
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    labels = tmp_path / "labels.txt"
    labels.write_text("red\ngreen\nblue\n\n")
    reg = ModelRegistry()
    reg.register("other", tiny, Preprocessing(8, 8), ["x", "y", "z"])
    spec = reg.register_torchscript(str(path), str(labels))
    assert spec.name == "scripted" and spec.labels == ["red", "green", "blue"] and reg.default == "scripted"
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(reg.get("scripted")(x), model(x))
    with pytest.raises(ValueError, match="needs a labels file"):
        reg.register_torchscript(str(path), None)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="cpu, cuda or auto"):
        resolve_device("tpu")


def test_init_app_settings(tmp_path):
    from insights import create_app

    labels = tmp_path / "l.txt"
    labels.write_text("a\nb\nc\n")
    path = tmp_path / "net.pt"
    torch.jit.script(tiny()).save(str(path))
    app = create_app({"INSTANCE_PATH": str(tmp_path / "i"), "TORCHSCRIPT": str(path), "TORCHSCRIPT_LABELS": str(labels),
                      "MAX_LOADED_MODELS": 3, "DEVICE": "cpu"})
    reg = app.extensions["insights"].models
    assert reg.default == "net" and reg.max_loaded == 3 and "efficientnet_lite0" in reg.names()
    with pytest.raises(UnknownModel, match="'nope'"):
        create_app({"INSTANCE_PATH": str(tmp_path / "j"), "DEFAULT_MODEL": "nope"})
    assert np.isclose(reg.spec("net").preprocessing.mean[0], 0.485)


def test_a_model_with_its_own_transform_says_so_and_prepares_with_it():
    reg = ModelRegistry()
    squash = lambda img: torch.from_numpy(np.asarray(img.resize((16, 8)), np.float32) / 255).permute(2, 0, 1)  # noqa: E731
    reg.register("own", lambda: nn.Identity(), Preprocessing(resize=8, crop=8), ["a", "b"], transform=squash)
    reg.register("plain", lambda: nn.Identity(), Preprocessing(resize=8, crop=8), ["a", "b"])
    assert reg.info("own")["transform"] == "custom" and reg.info("plain")["transform"] is None
    x, view = reg.spec("own").prepare(Image.new("RGB", (64, 32), (255, 0, 0)))
    assert x.shape == (1, 3, 8, 16) and float(x[0, 0].min()) == 1.0 and float(x[0, 1].max()) == 0.0
    assert view.size == (16, 8)  # the whole image at the input's size
    with pytest.raises(ValueError, match="transform must be a callable"):
        reg.register("bad", lambda: nn.Identity(), Preprocessing(resize=8, crop=8), ["a"], transform=3)
