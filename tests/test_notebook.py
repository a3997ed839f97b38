"""insights.show from a real notebook (nbclient + ipykernel), and the transforms it converts.

The notebook (tests/notebooks/show.ipynb) builds a small model and a dataset of scikit-image
photos and calls ``insights.show``; the test reads the iframe's address from the cell's HTML,
checks the page, its framing headers and a prediction over HTTP, then runs the cells that stop
the servers and checks that their ports are free again.
"""
from __future__ import annotations

import io
import json
import os
import re
import socket
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from insights.models import ModelSpec
from insights.notebook import FRAME_ANCESTORS, Dashboard, input_of, preprocessing_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "tests", "notebooks", "show.ipynb")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def get(url: str) -> tuple[int, dict, bytes]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, dict(resp.headers), resp.read()


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status, json.loads(resp.read())


def upload(base: str, img: Image.Image) -> str:
    """POST /api/images with a PNG of ``img`` (multipart); answers the image's id."""
    png = io.BytesIO()
    img.save(png, "PNG")
    boundary = "insights-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    status, answer = post(base + "api/images", body, f"multipart/form-data; boundary={boundary}")
    assert status == 201 or status == 200, answer
    return answer["id"]


def port_is_free(port: int) -> bool:
    """Whether a new server could listen on ``port`` (with SO_REUSEADDR, as servers do: connections
    in TIME_WAIT remain for a minute after any server closes; a listening socket does not)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def outputs_of(cell) -> tuple[str, str]:
    """(the HTML of a cell's display outputs, the text of its stream outputs)."""
    html = "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs
                   if o.output_type in ("display_data", "execute_result"))
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    return html, text


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


# --------------------------------------------------------------------------- the notebook


def test_notebook_shows_a_working_dashboard():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    with client.setup_kernel():
        for i in code[:3]:  # set-up, show(), the kernel's own probabilities
            client.execute_cell(nb.cells[i], i)
        html, printed = outputs_of(nb.cells[code[1]])
        urls = re.findall(r'<iframe src="([^"]+)"', html)
        assert len(urls) == 1, html
        url = urls[0]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
        assert f"Insights dashboard: {url}" in printed  # show() prints the address
        assert f'<a href="{url}"' in html
        kernel = last_json(outputs_of(nb.cells[code[2]])[1])
        port = kernel["port"]
        assert url.endswith(f":{port}/")

        status, headers, page = get(url)
        assert status == 200 and b"<html" in page.lower()
        csp = headers["Content-Security-Policy"]
        ancestors = re.search(r"frame-ancestors ([^;]+)", csp).group(1).split()
        # A Jupyter server on another localhost port may frame it; X-Frame-Options does not forbid it.
        assert {"http://localhost:*", "http://127.0.0.1:*", "'self'"} <= set(ancestors)
        assert "'none'" not in ancestors
        assert "X-Frame-Options" not in headers

        _, _, models = get(url + "api/models")
        listed = json.loads(models)["models"]
        assert [(m["name"], m["default"], m["num_classes"]) for m in listed] == [("model", True, 2)]
        assert listed[0]["preprocessing"] == {"resize": 72, "crop": 64, "mean": list(MEAN), "std": list(STD),
                                              "interpolation": "bilinear"}

        image = upload(url, Image.fromarray(skimage.data.chelsea()))
        status, answer = post(url + "api/predict", json.dumps({"image": image, "top_k": 2}).encode(),
                              "application/json")
        assert status == 200
        by_label = {p["label"]: p["prob"] for p in answer["predictions"]}
        assert by_label == pytest.approx({"cat": kernel["probs"][0], "coffee": kernel["probs"][1]}, abs=1e-5)

        _, _, datasets = get(url + "api/datasets")
        listed = json.loads(datasets)["datasets"]
        assert [(d["name"], d["size"]) for d in listed] == [("model-data", 2)]

        client.execute_cell(nb.cells[code[3]], code[3])  # a second show(): its own port
        ports = last_json(outputs_of(nb.cells[code[3]])[1])["ports"]
        assert ports[0] == port and ports[1] != port
        assert get(f"http://127.0.0.1:{ports[1]}/api/models")[0] == 200

        client.execute_cell(nb.cells[code[4]], code[4])  # Captum's visualizer.render()
        html, printed = outputs_of(nb.cells[code[4]])
        (captum_url,) = re.findall(r'<iframe src="([^"]+)"', html)
        assert f"Insights dashboard: {captum_url}" in printed
        _, _, listed = get(captum_url + "api/datasets")
        assert [(d["name"], d["size"], d["labelled"]) for d in json.loads(listed)["datasets"]] == [("dataset", 2, 2)]
        ports.append(int(captum_url.rsplit(":", 1)[1].strip("/")))

        assert not port_is_free(port)  # listening until stop()
        client.execute_cell(nb.cells[code[5]], code[5])  # stop() all three, one of them twice
        stopped = last_json(outputs_of(nb.cells[code[5]])[1])
        assert stopped["stopped"] == [False, False]
        before, after = stopped["threads"]
        assert after == before  # the servers', their workers' and the job runners' threads have ended
        for p in ports:
            with pytest.raises(urllib.error.URLError):
                get(f"http://127.0.0.1:{p}/api/models")
            assert port_is_free(p)


# --------------------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return Image.fromarray(skimage.data.chelsea())


@pytest.mark.parametrize("transform, expected", [
    (None, (256, 224, MEAN, STD, "bilinear")),
    (T.Compose([T.Resize(72), T.CenterCrop(64), T.ToTensor(), T.Normalize(MEAN, STD)]),
     (72, 64, MEAN, STD, "bilinear")),
    (T.Compose([T.Resize(40, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop((32, 32)),
                T.PILToTensor(), T.ConvertImageDtype(torch.float), T.Normalize((0.5,) * 3, (0.25,) * 3)]),
     (40, 32, (0.5,) * 3, (0.25,) * 3, "bicubic")),
    (T.Compose([T.Resize([48]), T.CenterCrop(48), T.ToTensor()]), (48, 48, (0.0,) * 3, (1.0,) * 3, "bilinear")),
    (v2.Compose([v2.Resize(72), v2.CenterCrop(64), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                 v2.Normalize(MEAN, STD)]), (72, 64, MEAN, STD, "bilinear")),
])
def test_torchvision_transforms_become_exact_preprocessing(transform, expected, chelsea):
    prep = preprocessing_of(transform)
    resize, crop, mean, std, interpolation = expected
    assert (prep.resize, prep.crop, prep.interpolation) == (resize, crop, interpolation)
    assert prep.mean == pytest.approx(mean) and prep.std == pytest.approx(std)
    if transform is None:
        return
    spec = ModelSpec("m", lambda: None, prep, ["a"])
    x, view = spec.prepare(chelsea)
    y = transform(chelsea)
    y = y.as_subclass(torch.Tensor) if isinstance(y, torch.Tensor) else y
    assert x.shape == (1, *y.shape) and view.size == (y.shape[2], y.shape[1])
    assert torch.allclose(x[0], y, atol=1e-5)  # the same tensor: maps line up with the view


def test_weights_transforms_are_exact(chelsea):
    from torchvision.models import ResNet18_Weights

    t = ResNet18_Weights.IMAGENET1K_V1.transforms()
    prep = preprocessing_of(t)
    assert (prep.resize, prep.crop) == (256, 224)
    x, _ = ModelSpec("m", lambda: None, prep, ["a"]).prepare(chelsea)
    assert torch.allclose(x[0], t(chelsea), atol=1e-5)


@pytest.mark.parametrize("transform", [
    T.Compose([T.Resize((40, 56)), T.ToTensor()]),  # a squash to 40×56, not the shorter side
    T.Compose([T.Resize(64), T.CenterCrop(48), T.ToTensor(), T.Lambda(lambda x: x * 2 - 1)]),
    T.Compose([T.Grayscale(), T.Resize(32), T.CenterCrop(32), T.ToTensor()]),
    lambda img: torch.from_numpy(np.asarray(img.resize((30, 20)), dtype=np.float32) / 255).permute(2, 0, 1),
])
def test_other_callables_run_as_they_are(transform, chelsea):
    assert preprocessing_of(transform) is None
    prep, custom = input_of(transform)
    assert custom is transform
    spec = ModelSpec("m", lambda: None, prep, ["a"], transform=custom)
    x, view = spec.prepare(chelsea)
    y = transform(chelsea)
    assert torch.equal(x[0], y.float())
    assert view.size == (y.shape[2], y.shape[1])  # the whole image at the output's size
    assert (prep.crop, len(prep.mean)) == (min(y.shape[1:]), y.shape[0])  # the probe found the shape


def test_custom_transform_must_return_a_tensor(chelsea):
    spec = ModelSpec("m", lambda: None, preprocessing_of(None), ["a"], transform=lambda img: np.zeros((3, 4, 4)))
    with pytest.raises(TypeError, match="its transform returned ndarray, not a tensor"):
        spec.prepare(chelsea)
    with pytest.raises(ValueError, match="must turn a PIL image into a C×H×W tensor"):
        input_of(lambda img: torch.zeros(5))


def test_show_serves_a_map_style_dataset_through_a_custom_transform(tmp_path):
    """In-process: a TensorDataset of C×H×W tensors, a transform no preprocessing can say (a squash
    to 24×16 and a shift), and ``with`` stopping the server; the dashboard's prediction for an item
    is the model's own on that transform."""
    import torchvision.transforms.functional as TF

    import insights
    from insights.datasets import to_pil

    generator = torch.Generator().manual_seed(3)
    images = torch.rand(5, 3, 20, 30, generator=generator)
    data = torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 0, 1, 1]))

    def transform(img):
        return TF.to_tensor(img.resize((24, 16))) * 2 - 1

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with insights.show(model, ["a", "b"], dataset=data, transform=transform, name="tiny",
                       instance=str(tmp_path / "inst")) as dash:
        base = dash.url
        _, _, listed = get(base + "api/datasets")
        assert [(d["name"], d["kind"], d["size"], d["labelled"]) for d in json.loads(listed)["datasets"]] == \
            [("tiny-data", "python", 5, 5)]
        _, _, models = get(base + "api/models")
        assert json.loads(models)["models"][0]["input_size"] == [3, 16, 16]  # found by the probe
        status, opened = post(base + "api/datasets/tiny-data/items/2/image", b"{}", "application/json")
        assert status == 201 and opened["true"] == {"index": 0, "label": "a"}
        _, answer = post(base + "api/predict", json.dumps({"image": opened["image"]["id"], "top_k": 2}).encode(),
                         "application/json")
        with torch.no_grad():
            probs = torch.softmax(model(transform(to_pil(images[2]).convert("RGB")).unsqueeze(0)), 1)[0]
        assert {p["index"]: p["prob"] for p in answer["predictions"]} == \
            pytest.approx(dict(enumerate(probs.tolist())), abs=1e-5)
        status, explained = post(base + "api/explain", json.dumps({"image": opened["image"]["id"],
                                                                   "method": "saliency", "target": 0}).encode(),
                                 "application/json")
        result = explained["result"]
        assert status == 200 and result["size"] == [16, 24]  # the map is the input's size (H, W)
        _, _, view = get(base + result["links"]["input"].lstrip("/"))
        assert Image.open(io.BytesIO(view)).size == (24, 16)  # and so is the view it is drawn over
        assert model.training and all(p.requires_grad for p in model.parameters())  # a copy was served
    assert not dash.running and port_is_free(dash.port)
    assert os.path.isdir(tmp_path / "inst")  # a folder of the caller's is kept


def test_show_refuses_what_it_cannot_serve():
    import insights

    with pytest.raises(TypeError, match="needs model=<a torch.nn.Module>, got str"):
        insights.show("resnet", ["a"])
    with pytest.raises(ValueError, match="needs labels="):
        insights.show(torch.nn.Linear(2, 2), None)


def test_frame_ancestors_cover_jupyter_vscode_and_colab_in_colab_only(monkeypatch):
    import types

    from insights.notebook import frame_ancestors
    from insights.security import FRAME_OPTIONS, parse_frame_ancestors

    parsed = parse_frame_ancestors(" ".join(frame_ancestors()))
    assert parsed not in FRAME_OPTIONS  # so no X-Frame-Options header is sent
    for source in ("http://localhost:*", "http://127.0.0.1:*", "vscode-webview:"):
        assert source in parsed.split()
    assert "googleusercontent" not in parsed and "colab" not in parsed  # other people's pages there
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    in_colab = parse_frame_ancestors(" ".join(frame_ancestors())).split()
    assert "https://*.googleusercontent.com" in in_colab and "https://colab.research.google.com" in in_colab


def test_colab_frames_through_its_port_proxy(monkeypatch, capsys):
    """In Colab the frame is Colab's own (serve_kernel_port_as_iframe) and the printed address is
    the proxy's (google.colab.kernel.proxyPort), as Colab documents for servers in the kernel."""
    import types

    calls = []
    output = types.ModuleType("google.colab.output")
    output.eval_js = lambda js: calls.append(("eval_js", js)) or "https://abc-4321-colab.googleusercontent.com/"
    output.serve_kernel_port_as_iframe = lambda port, path="/", height=400: calls.append(("iframe", port, path, height))
    colab = types.ModuleType("google.colab")
    colab.output = output
    google = types.ModuleType("google")
    google.colab = colab
    for name, module in (("google", google), ("google.colab", colab), ("google.colab.output", output)):
        monkeypatch.setitem(sys.modules, name, module)

    class Server:
        effective_port = 4321

    Dashboard(app=None, server=Server(), thread=None, height=500)._ipython_display_()
    assert calls == [("eval_js", "google.colab.kernel.proxyPort(4321)"), ("iframe", 4321, "/", 500)]
    assert capsys.readouterr().out == "Insights dashboard: https://abc-4321-colab.googleusercontent.com/\n"


def test_a_busy_port_is_refused_and_nothing_is_left(tmp_path):
    import insights

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        threads = threading.active_count()
        with pytest.raises(OSError):
            insights.show(torch.nn.Conv2d(3, 2, 1), ["a", "b"], port=busy.getsockname()[1],
                          instance=str(tmp_path / "inst"))
    assert threading.active_count() == threads


def test_dashboard_html_and_text(monkeypatch):
    class Server:
        effective_port = 4321

    dash = Dashboard(app=None, server=Server(), thread=None, height=500)
    html = dash._repr_html_()
    assert '<iframe src="http://127.0.0.1:4321/" width="100%" height="500"' in html
    assert repr(dash) == "Insights dashboard at http://127.0.0.1:4321/ (serving)"
    dash.running = False
    assert "<iframe" not in dash._repr_html_()


def test_show_answers_when_the_kernel_holds_more_than_1024_files(tmp_path):
    """A long-lived kernel may hold many descriptors: the server's socket then gets one above
    select()'s limit of 1024, where select() fails on every loop (seen in the full test suite).
    The server polls instead, and answers."""
    import resource

    import insights

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert max(held) > 1024
        with insights.show(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2)), ["a", "b"],
                           instance=str(tmp_path / "inst")) as dash:
            status, _headers, page = get(dash.url)
            assert status == 200 and b"Insights" in page
            _, _, models = get(dash.url + "api/models")
            assert json.loads(models)["models"][0]["num_classes"] == 2
    finally:
        for fd in held:
            os.close(fd)
        if soft < 1300:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
