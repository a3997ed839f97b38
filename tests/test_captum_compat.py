"""insights.captum_compat: a Captum Insights script (examples/captum_insights_port.py, written
against Captum Insights' documented API with one import changed) served and checked over HTTP:
its model, its dataset of Batch objects with their labels, predictions equal to the model's own,
and the refusals (text and tabular features, inputs that are not images)."""
from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings

import pytest
import torch
from torch import nn
from torchvision import transforms

from insights.captum_compat import AttributionVisualizer, Batch, GeneralFeature, ImageFeature, TextFeature

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "captum_insights_port.py")
sys.path.insert(0, os.path.dirname(EXAMPLE))
import captum_insights_port as example  # noqa: E402


def get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status, json.loads(resp.read())


def post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status, json.loads(resp.read())


def status_of(url: str, headers: dict | None = None) -> int:
    try:
        return get(url, headers)[0]
    except urllib.error.HTTPError as err:
        return err.code


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def quantised(x: torch.Tensor) -> torch.Tensor:
    """The image as the dashboard holds it: 8 bits per channel."""
    return (x * 255).round() / 255


def scored(base: str, dataset: str, model: str, deadline_s: float = 120) -> dict:
    """The dataset's items page once the model has scored every item."""
    end = time.monotonic() + deadline_s
    while True:
        _, page = get(f"{base}api/datasets/{dataset}/items?model={model}&per_page=200")
        if page["predictions"][model]["status"] == "done" or time.monotonic() > end:
            return page
        time.sleep(0.2)


@pytest.fixture(scope="module")
def served():
    """The example's visualizer, served on a free port; stopped after the module's tests."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the example's softmax score_func is taken as it is, no warning
        visualizer = example.build_visualizer()
    port = visualizer.serve(port=None)
    yield visualizer, port
    visualizer.stop()
    assert not listening(port)


def batches():
    inputs = torch.cat([b.inputs for b in example.formatted_data_iter()])
    labels = torch.cat([b.labels for b in example.formatted_data_iter()])
    return inputs, labels


def test_the_example_serves_its_model_and_dataset(served):
    visualizer, port = served
    base = f"http://127.0.0.1:{port}/"
    assert isinstance(port, int) and visualizer.url == base
    _, models = get(base + "api/models")
    assert [(m["name"], m["num_classes"], m["preprocessing"]["crop"], m["preprocessing"]["mean"])
            for m in models["models"]] == [("model", 4, 32, [0.5, 0.5, 0.5])]

    inputs, labels = batches()
    _, listed = get(base + "api/datasets")
    (data,) = listed["datasets"]
    counts = {example.get_classes()[i]: int((labels == i).sum()) for i in labels.unique().tolist()}
    assert (data["name"], data["kind"], data["size"], data["labelled"], data["errors"]) == \
        ("dataset", "python", 32, 32, 0)
    assert {c["label"]: c["count"] for c in data["classes"]} == counts

    page = scored(base, "dataset", "model")
    assert page["predictions"]["model"]["status"] == "done"
    items = page["items"]
    assert [it["true"]["label"] for it in items] == [example.get_classes()[i] for i in labels.tolist()]
    # The dashboard's probabilities are the model's softmax on the (8-bit) image through Normalize.
    normalize = transforms.Normalize((0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        logits = visualizer.models[0](normalize(quantised(inputs)))
    probs = torch.softmax(logits, 1)
    for it in items:
        row = probs[it["index"]]
        got = it["models"]["model"]
        assert got["predicted"]["index"] == int(row.argmax())
        assert got["prob"] == pytest.approx(float(row.max()), abs=1e-5)
        assert got["correct"] == (int(row.argmax()) == int(labels[it["index"]]))
    _, summary = get(base + "api/datasets/dataset/summary?model=model")
    accuracy = float((probs.argmax(1) == labels).float().mean())
    assert summary["models"]["model"]["accuracy"] == pytest.approx(accuracy)
    assert accuracy >= 0.75  # the example's network learnt to tell the photos apart

    # An item opened in the single-image view: its true label, a prediction, an explanation.
    status, opened = post(base + "api/datasets/dataset/items/3/image", {})
    assert status == 201 and opened["true"]["index"] == int(labels[3])
    _, predicted = post(base + "api/predict", {"image": opened["image"]["id"], "top_k": 4})
    assert {p["index"]: p["prob"] for p in predicted["predictions"]} == \
        pytest.approx(dict(enumerate(probs[3].tolist())), abs=1e-5)
    status, explained = post(base + "api/explain", {"image": opened["image"]["id"], "method": "saliency",
                                                    "target": opened["true"]["index"]})
    assert status == 200 and explained["result"]["target"] == int(labels[3])


def test_text_and_tabular_features_are_refused_by_name():
    model = nn.Linear(4, 2)
    for feature, name in ((TextFeature("Sentence", None, None, None), "TextFeature('Sentence')"),
                          (GeneralFeature("Age", ["young", "old"]), "GeneralFeature('Age')")):
        with pytest.raises(ValueError) as err:
            AttributionVisualizer(models=[model], classes=["a", "b"], features=[feature], dataset=[])
        message = str(err.value)
        assert "serves image classifiers only: features must be one ImageFeature" in message
        assert name in message and "text (TextFeature) and tabular (GeneralFeature) features" in message
    with pytest.raises(ValueError, match="features must be one ImageFeature"):
        AttributionVisualizer(model, ["a", "b"], [ImageFeature("A", None, None), ImageFeature("B", None, None)], [])


class Tiny(nn.Module):
    def __init__(self, seed: int, channels: int = 3):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(channels, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def tiny_batches(n: int = 3, channels: int = 3, side: int = 16):
    generator = torch.Generator().manual_seed(5)
    for i in range(n):
        yield Batch(torch.rand(2, channels, side, side, generator=generator), torch.tensor([i % 3, (i + 1) % 3]))


def test_several_models_and_a_custom_input_transform():
    """Two models with the same classes; an input transform that is not Normalize runs as it is on
    the image's tensor (the dashboard's prediction equals the model's own)."""
    shift = lambda x: x * 2 - 1  # noqa: E731 - a plain callable, as Captum scripts pass them
    models = [Tiny(1), Tiny(2)]
    visualizer = AttributionVisualizer(models, ["a", "b", "c"], ImageFeature("Photo", None, [shift]), tiny_batches())
    with visualizer:
        port = visualizer.serve(port=0)
        base = f"http://127.0.0.1:{port}/"
        _, listed = get(base + "api/models")
        assert [(m["name"], m["num_classes"], m["default"]) for m in listed["models"]] == \
            [("model1", 3, True), ("model2", 3, False)]
        x = quantised(visualizer.items[4][0]).unsqueeze(0)
        for name, model in zip(("model1", "model2"), models):
            page = scored(base, "dataset", name)
            got = next(it for it in page["items"] if it["index"] == 4)["models"][name]
            with torch.no_grad():
                row = torch.softmax(model(shift(x)), 1)[0]
            assert got["predicted"]["index"] == int(row.argmax())
            assert got["prob"] == pytest.approx(float(row.max()), abs=1e-5)
    assert not listening(port)


def test_bind_all_needs_a_token(capsys):
    visualizer = AttributionVisualizer(Tiny(1), ["a", "b", "c"], [ImageFeature("Photo", [lambda x: x * 0], [])],
                                       tiny_batches(1))
    with visualizer:
        port = visualizer.serve(bind_all=True)
        printed = capsys.readouterr().out
        token = re.search(r"need the access token (\S+):", printed).group(1)
        assert len(token) >= 32 and f"Authorization: Bearer {token}" in printed
        base = f"http://127.0.0.1:{port}/api/models"
        assert status_of(base) == 401
        assert status_of(base, {"Authorization": "Bearer not-the-token-at-all"}) == 401
        assert status_of(base, {"Authorization": f"Bearer {token}"}) == 200
        # serve() again replaces the server; a chosen token is used as given
        again = visualizer.serve(bind_all=True, token="a-token-of-my-own-choosing")
        assert status_of(f"http://127.0.0.1:{again}/api/models",
                         {"Authorization": "Bearer a-token-of-my-own-choosing"}) == 200
        assert again == port or not listening(port)


def test_the_dataset_is_read_as_captum_scripts_write_it():
    def endless():  # Captum's tutorial: next() on an exhausted loader inside a generator (PEP 479)
        loader = iter([Batch(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))] * 3)
        while True:
            yield next(loader)

    visualizer = AttributionVisualizer(Tiny(1), ["a", "b", "c"], [ImageFeature("P", None, None)], endless())
    assert len(visualizer.items) == 6
    with pytest.warns(UserWarning, match="read the first 5 images"):
        visualizer = AttributionVisualizer(Tiny(1), ["a", "b", "c"], [ImageFeature("P", None, None)],
                                           tiny_batches(), max_items=5)
    assert [label for _, label in visualizer.items] == [0, 1, 1, 2, 2]
    with pytest.warns(UserWarning, match="probabilities are the softmax"):
        AttributionVisualizer(Tiny(1), ["a", "b", "c"], [ImageFeature("P", None, None)], tiny_batches(),
                              score_func=torch.sigmoid)
    with pytest.warns(UserWarning, match="set the method's baselines parameter to 0.5 for the same baseline"):
        AttributionVisualizer(Tiny(1), ["a", "b", "c"], [ImageFeature("P", [lambda x: x * 0 + 0.5], None)],
                              tiny_batches(1))
    with pytest.warns(UserWarning, match="not a constant image, so set it from Python"):
        AttributionVisualizer(Tiny(1), ["a", "b", "c"], [ImageFeature("P", [lambda x: x.flip(-1)], None)],
                              tiny_batches(1))
    normalized = [Batch(torch.randn(2, 3, 8, 8) * 3, torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="must lie in 0–1 .* Move the normalisation into ImageFeature's input_transforms"):
        AttributionVisualizer(Tiny(1), ["a", "b", "c"], [ImageFeature("P", None, None)], normalized)
    with pytest.raises(ValueError, match="additional_args are not supported"):
        AttributionVisualizer(Tiny(1), ["a", "b", "c"], [ImageFeature("P", None, None)],
                              [Batch(torch.rand(1, 3, 8, 8), torch.tensor([0]), additional_args=(1,))])
    with pytest.raises(ValueError, match=r"one score per class \(1×4\)"):
        AttributionVisualizer(Tiny(1), ["a", "b", "c", "d"], [ImageFeature("P", None, None)], tiny_batches())


def test_the_example_runs_as_a_script_until_ctrl_c():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, EXAMPLE, "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        # poll, not select: in a full run this process holds more than 1024 descriptors
        waiting = select.poll()
        waiting.register(proc.stdout, select.POLLIN)
        ready = waiting.poll(180_000)  # a hung script fails the test, not the run
        assert ready, "the script printed nothing in 180 s"
        line = proc.stdout.readline()  # the script prints the address once it serves
        assert line.strip() == f"Insights dashboard: http://127.0.0.1:{port}/", line + proc.stdout.read()
        _, listed = get(f"http://127.0.0.1:{port}/api/datasets")
        assert [(d["name"], d["size"]) for d in listed["datasets"]] == [("dataset", 32)]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not listening(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_every_model_is_checked_and_left_in_its_mode():
    import warnings

    good, wide = Tiny(1), nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 7))  # 7 outputs for 3 classes
    good.train()
    with warnings.catch_warnings(record=True), pytest.raises(ValueError, match="model 1 gives \\(1, 7\\)"):
        AttributionVisualizer([good, wide], ["a", "b", "c"], [ImageFeature("Photo", [lambda x: x * 0], [])],
                              tiny_batches(1), score_func=lambda o: o)  # not a softmax: warned, still checked
    assert good.training and all(m.training for m in good.modules())
