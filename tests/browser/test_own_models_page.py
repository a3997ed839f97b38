"""A TorchScript model in the page: the methods it cannot run are greyed out with the reason, and
the others explain as usual."""
from __future__ import annotations

import logging
import os
import threading
import warnings

import pytest
import torch
from playwright.sync_api import expect
from werkzeug.serving import make_server

from insights.app import create_app
from test_dashboard import SHOTS, browser  # noqa: F401  (the shared chromium)

HOOKED = ["deeplift", "guided_backprop", "deconvolution", "grad_cam", "guided_grad_cam"]


@pytest.fixture(scope="module")
def ts_server(tmp_path_factory):
    """The app serving only a scripted SmallCNN (five classes), on a free loopback port."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from conftest import SmallCNN, seeded

    folder = tmp_path_factory.mktemp("ts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(seeded(lambda: SmallCNN(classes=5))).save(str(folder / "scripted.pt"))
    (folder / "labels.txt").write_text("apple\nbanana\ncherry\ndate\nelderberry\n")
    (folder / "gray.py").write_text(  # and a 1-channel 28×28 model from a config file
        f"import sys\nsys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})\n"
        "from conftest import Gray\n"
        "register('gray', lambda: Gray(), Preprocessing(resize=28, crop=28, mean=(0.5,), std=(0.5,)),\n"
        "         ['zero', 'one', 'two', 'three'])\n")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = create_app({"INSTANCE_PATH": str(folder / "instance"), "BUILTIN_MODELS": False,
                      "MODELS_CONFIG": str(folder / "gray.py"), "TORCHSCRIPT": str(folder / "scripted.pt"),
                      "TORCHSCRIPT_LABELS": str(folder / "labels.txt")})
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    app.extensions["insights"].jobs.shutdown()


@pytest.fixture
def page(browser, ts_server):  # noqa: F811
    """The dashboard of the TorchScript server in a fresh context; fails on any script error."""
    context = browser.new_context(viewport={"width": 1440, "height": 1100}, base_url=ts_server)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert errors == []


def test_torchscript_model_greys_out_hook_methods_and_explains_with_the_others(page):
    for method in HOOKED:
        expect(page.locator(f"#method-{method}")).to_be_disabled()
    expect(page.locator("#method-saliency")).to_be_enabled()
    expect(page.locator("#method-saliency")).to_be_checked()
    option = page.locator(".method", has=page.locator("#method-grad_cam"))
    expect(option).to_contain_text("TorchScript")
    expect(option).to_contain_text("--config")
    expect(page.locator("#cmp-method-grad_cam")).to_be_disabled()
    expect(page.locator("#cmp-method-grad_cam")).not_to_be_checked()
    expect(page.locator("#cmp-method-saliency")).to_be_checked()
    page.get_by_role("button", name="Chelsea the cat").click()
    page.wait_for_function("() => document.querySelectorAll('#predictions button.pred').length >= 5", timeout=30_000)
    expect(page.locator("#run")).to_be_enabled()
    page.locator("#run").click()
    expect(page.locator("#result-meta")).to_contain_text("saliency", timeout=30_000)
    expect(page.locator("#overlay")).to_be_visible()
    os.makedirs(SHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SHOTS, "12-torchscript-model.png"), full_page=True)
    page.locator("#method-list").screenshot(path=os.path.join(SHOTS, "12-torchscript-methods.png"))


def test_the_form_offers_each_models_own_window_defaults(page):
    page.locator("label[for=method-occlusion]").click()
    window = page.locator("#param-occlusion-sliding_window_shapes")
    expect(window).to_have_value("3, 32, 32")  # the TorchScript model: 3×224×224
    page.locator("label[for=model-gray]").click()
    expect(window).to_have_value("1, 4, 4")  # the gray model: 1×28×28
    expect(page.locator("#param-occlusion-strides")).to_have_value("1, 2, 2")
    expect(page.locator("#method-grad_cam")).to_be_enabled()  # an nn.Module takes hooks
    page.locator("label[for=model-scripted]").click()
    expect(window).to_have_value("3, 32, 32")
    expect(page.locator("#method-grad_cam")).to_be_disabled()
