"""Signing in from a browser (Debian chromium): a server with an access token sends the dashboard
to the sign-in page; a wrong token is refused on the form, the right one opens the dashboard, whose
own requests (a sample upload and a prediction, both writes) then work by cookie; Sign out ends it.
Screenshots go to artifacts/screenshots/ (signin.png, signin-error.png, signin-dashboard.png)."""
from __future__ import annotations

import logging
import os
import threading

import pytest
from playwright.sync_api import expect
from werkzeug.serving import make_server

from insights.app import create_app
from test_dashboard import SHOTS, browser  # noqa: F401  (the shared chromium)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CONFIG = os.path.join(ROOT, "tests", "tiny_models.py")
TOKEN = "team-token-5f2c9a0e7b1d4c38"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app with one access token and the tiny test models, on a free loopback port."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = create_app({"INSTANCE_PATH": str(tmp_path_factory.mktemp("instance")), "BUILTIN_MODELS": False,
                      "MODELS_CONFIG": TINY_CONFIG, "DEVICE": "cpu", "TOKENS": [TOKEN]})
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    app.extensions["insights"].jobs.shutdown()


def shot(page, name: str) -> None:
    os.makedirs(SHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SHOTS, name + ".png"))


def test_sign_in_through_the_form_and_use_the_dashboard(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    failed: list[str] = []  # API answers the page got that say access was refused
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status in (401, 403) else None)
    try:
        page.goto("/")
        assert page.url.startswith(server + "/signin?next=")
        expect(page.get_by_role("heading", name="Sign in to Insights")).to_be_visible()
        field = page.get_by_label("Access token")
        expect(field).to_have_attribute("type", "password")
        expect(field).to_be_focused()
        expect(page.locator(".brand-name")).to_have_text("Insights")  # the product's own top bar
        shot(page, "signin")

        field.fill(TOKEN[:-1] + "x")
        with page.expect_response(lambda r: r.url.endswith("/signin") and r.request.method == "POST") as answer:
            page.get_by_role("button", name="Sign in").click()
        assert answer.value.status == 401
        expect(page.get_by_role("alert")).to_have_text("That token is not valid on this server. Check it and try again.")
        expect(page.get_by_label("Access token")).to_have_attribute("aria-invalid", "true")
        assert context.cookies() == []
        shot(page, "signin-error")
        failed.clear()  # that 401 was the point

        page.get_by_label("Access token").fill(TOKEN)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(server + "/")
        page.wait_for_selector("body[data-ready=true]")
        expect(page.locator("#model-list")).to_contain_text("Tiny test CNN")
        expect(page.get_by_role("button", name="Sign out")).to_be_visible()

        [cookie] = context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and TOKEN not in cookie["value"]
        assert page.evaluate("document.cookie") == ""  # out of reach of scripts

        # Writes by cookie: the sample upload and the prediction carry the page's X-Requested-With.
        page.get_by_role("button", name="Chelsea the cat").click()
        expect(page.locator("#predictions button.pred")).to_have_count(5, timeout=30_000)  # the tiny model's 5
        expect(page.locator("#image-error")).to_be_hidden()
        shot(page, "signin-dashboard")
        assert failed == []

        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(server + "/signin")
        assert context.cookies() == []
        page.goto("/")
        assert page.url.startswith(server + "/signin?next=")
        assert errors == [], errors
    finally:
        context.close()
