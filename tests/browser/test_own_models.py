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
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = create_app({"INSTANCE_PATH": str(folder / "instance"), "BUILTIN_MODELS": False,
                      "TORCHSCRIPT": str(folder / "scripted.pt"), "TORCHSCRIPT_LABELS": str(folder / "labels.txt")})
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    app.extensions["insights"].jobs.shutdown()


def test_torchscript_model_greys_out_hook_methods_and_explains_with_the_others(browser, ts_server):  # noqa: F811
    context = browser.new_context(viewport={"width": 1440, "height": 1100}, base_url=ts_server)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto("/")
        page.wait_for_selector("body[data-ready=true]")
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
        page.wait_for_function("document.querySelectorAll('#predictions button.pred').length >= 5",
                               timeout=30_000)
        expect(page.locator("#run")).to_be_enabled()
        page.locator("#run").click()
        expect(page.locator("#result-meta")).to_contain_text("saliency", timeout=30_000)
        expect(page.locator("#overlay")).to_be_visible()
        os.makedirs(SHOTS, exist_ok=True)
        page.screenshot(path=os.path.join(SHOTS, "12-torchscript-model.png"), full_page=True)
        page.locator("#method-list").screenshot(path=os.path.join(SHOTS, "12-torchscript-methods.png"))
        assert errors == []
    finally:
        context.close()
