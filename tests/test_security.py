"""Deploy settings and what every response carries (insights/security.py): PUBLIC_URL instead of the
Host header, TRUSTED_HOSTS, PROXY_HOPS, the security headers and the page under them, request ids,
500s that say nothing but the id, and weights read with weights_only=True."""
from __future__ import annotations

import json
import logging
import os
import re
from html.parser import HTMLParser

import pytest
import torch
import torchvision

from appkit import TINY_CONFIG, app, client, extra_methods, image_id, png, upload, wait_job  # noqa: F401
from insights import create_app, models
from insights.app import env_settings
from insights.engine import registry
from insights.engine.method import Method
from insights.engine.params import Cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORGED = "evil.example"
HEX_ID = re.compile(r"[0-9a-f]{32}")


def make_app(tmp_path, **settings):
    return create_app({"INSTANCE_PATH": str(tmp_path / "instance"), "BUILTIN_MODELS": False,
                       "MODELS_CONFIG": TINY_CONFIG, "DEVICE": "cpu", "INLINE_MAX_PASSES": 5, **settings})


@pytest.fixture
def make(tmp_path, extra_methods):
    """Builds apps with their own settings and shuts their workers down afterwards."""
    made = []

    def build(**settings):
        made.append(make_app(tmp_path, **settings))
        return made[-1]

    yield build
    for a in made:
        a.extensions["insights"].jobs.shutdown()


def explain_fixed(client, image: str) -> dict:
    r = client.post("/api/explain", json={"image": image, "method": "fixed_map_test", "target": 0})
    assert r.status_code == 200, r.json
    return r.json["result"]


class Head(HTMLParser):
    """The <meta> and <link> tags of a page, and every <script>, tag attribute and style of it."""

    def __init__(self, html: str):
        super().__init__()
        self.meta, self.links, self.scripts, self.attrs, self.styles = {}, {}, [], [], 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attrs += [(tag, k) for k in a]
        if tag == "meta":
            self.meta[a.get("property") or a.get("name")] = a.get("content")
        elif tag == "link":
            self.links[a.get("rel")] = a.get("href")
        elif tag == "script":
            self.scripts.append(a)
        elif tag == "style":
            self.styles += 1


# --------------------------------------------------------------------------- PUBLIC_URL


def test_a_forged_host_goes_into_no_link_of_the_share_page(client, image_id):
    result = explain_fixed(client, image_id)
    r = client.get(result["links"]["share"], headers={"Host": FORGED})
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert FORGED not in html
    head = Head(html)
    # Without PUBLIC_URL there is no absolute address to give: the preview has no image or URL.
    assert "og:image" not in head.meta and "og:url" not in head.meta and "twitter:image" not in head.meta
    assert head.meta["og:title"] and head.meta["twitter:card"] == "summary"
    assert head.links["canonical"] == f"/r/{result['id']}"
    assert "insights-public-url" not in head.meta


@pytest.mark.parametrize("public", ["https://insights.example.com", "https://insights.example.com/"])
def test_public_url_makes_the_preview_and_the_share_links(make, public):
    client = make(PUBLIC_URL=public).test_client()
    result = explain_fixed(client, upload(client, png()).json["id"])
    r = client.get(f"/r/{result['id']}", headers={"Host": FORGED})
    html = r.get_data(as_text=True)
    assert FORGED not in html
    head = Head(html)
    base = "https://insights.example.com"
    assert head.meta["og:image"] == head.meta["twitter:image"] == f"{base}/api/results/{result['id']}/card.png"
    assert head.meta["og:url"] == head.links["canonical"] == f"{base}/r/{result['id']}"
    assert head.meta["twitter:card"] == "summary_large_image"
    # The dashboard's share button builds its links from the same address.
    assert Head(client.get("/").get_data(as_text=True)).meta["insights-public-url"] == base


def test_public_url_under_a_path_keeps_it(make):
    client = make(PUBLIC_URL="https://example.com/tools/insights/").test_client()
    result = explain_fixed(client, upload(client, png()).json["id"])
    head = Head(client.get(f"/r/{result['id']}").get_data(as_text=True))
    assert head.meta["og:url"] == f"https://example.com/tools/insights/r/{result['id']}"


@pytest.mark.parametrize("bad", ["insights.example.com", "ftp://x.example", "https://", "https://x.example/?a=1",
                                 "https://x.example/#top", 'https://x.example/"><script>'])
def test_a_public_url_that_is_not_an_address_is_refused_at_start(tmp_path, bad):
    with pytest.raises(ValueError, match="PUBLIC_URL"):
        make_app(tmp_path, PUBLIC_URL=bad)


# --------------------------------------------------------------------------- TRUSTED_HOSTS


@pytest.mark.parametrize("raw, hosts", [
    ("insights.example.com", ["insights.example.com"]),
    ("insights.example.com, .corp.example ,localhost", ["insights.example.com", ".corp.example", "localhost"]),
    ('["insights.example.com", "localhost"]', ["insights.example.com", "localhost"]),
])
def test_trusted_hosts_from_the_environment_become_a_list(tmp_path, monkeypatch, raw, hosts):
    monkeypatch.setenv("INSIGHTS_TRUSTED_HOSTS", raw)
    app = make_app(tmp_path, **env_settings())
    assert app.config["TRUSTED_HOSTS"] == hosts
    app.extensions["insights"].jobs.shutdown()


@pytest.mark.parametrize("path", ["/", "/api", "/api/models", "/healthz", "/static/css/app.css"])
def test_a_host_outside_trusted_hosts_is_a_400(make, path):
    client = make(TRUSTED_HOSTS="insights.example.com,.corp.example").test_client()
    for host in ("insights.example.com", "insights.example.com:8443", "gpu.corp.example"):
        assert client.get(path, headers={"Host": host}).status_code == 200, host
    for host in (FORGED, "insights.example.com.evil.example", "localhost"):
        r = client.get(path, headers={"Host": host})
        assert r.status_code == 400, host
        assert r.headers["X-Content-Type-Options"] == "nosniff" and HEX_ID.fullmatch(r.headers["X-Request-Id"])
        if path.startswith("/api"):
            assert r.json["error"]["code"] == "bad_request"


def test_a_write_from_an_untrusted_host_is_refused_before_it_writes(make):
    app = make(TRUSTED_HOSTS=["insights.example.com"])
    r = upload(app.test_client(), png())  # the test client's Host is localhost
    assert r.status_code == 400
    assert not os.listdir(os.path.join(app.instance_path, "images")) or \
        not any(files for _d, _s, files in os.walk(os.path.join(app.instance_path, "images")))


# --------------------------------------------------------------------------- PROXY_HOPS


FORWARDED = {"X-Forwarded-For": "198.51.100.9, 203.0.113.7", "X-Forwarded-Proto": "https",
             "X-Forwarded-Host": "insights.example.com", "X-Forwarded-Prefix": "/tools"}


def whoami(app):
    """A view that says what the app makes of the request (added for the test)."""
    from flask import request, url_for

    def view():
        return {"remote_addr": request.remote_addr, "secure": request.is_secure, "host": request.host,
                "url": url_for("pages.share", result_id="x", _external=True)}

    app.add_url_rule("/_whoami", "whoami", view)
    return app.test_client()


def test_without_proxy_hops_forwarded_headers_count_for_nothing(make):
    client = whoami(make())
    assert client.get("/_whoami", headers=FORWARDED).json == {
        "remote_addr": "127.0.0.1", "secure": False, "host": "localhost", "url": "http://localhost/r/x"}


def test_with_one_proxy_hop_its_forwarded_headers_are_used(make):
    client = whoami(make(PROXY_HOPS=1))
    # One proxy: only the address it appended counts, not what the client claimed before it.
    assert client.get("/_whoami", headers=FORWARDED).json == {
        "remote_addr": "203.0.113.7", "secure": True, "host": "insights.example.com",
        "url": "https://insights.example.com/tools/r/x"}


def test_trusted_hosts_judge_the_host_the_proxy_forwarded(make):
    client = whoami(make(PROXY_HOPS=1, TRUSTED_HOSTS=["insights.example.com"]))
    assert client.get("/_whoami", headers=FORWARDED).status_code == 200
    assert client.get("/_whoami", headers={**FORWARDED, "X-Forwarded-Host": FORGED}).status_code == 400


@pytest.mark.parametrize("prefix", ["http://localhost:99999", "//evil.example", "/a//b", "/tools\\x", "tools",
                                    "/a b", '/"><script>'])
def test_a_forwarded_prefix_that_is_not_a_path_is_ignored(make, prefix):
    """Found in review (header fuzz through waitress, PROXY_HOPS 1): a proxy that does not set
    X-Forwarded-Prefix passes the client's on, and ProxyFix takes it: "http://localhost:99999"
    made the sign-in redirect's Location unbuildable (a 500 from waitress, outside the app's error
    handling) and "//evil.example" went into every link the app made. Such a prefix is ignored now."""
    app = make(PROXY_HOPS=1, TOKENS=["alpha-a1b2c3d4e5f6a7b8"])
    client = whoami(app)
    r = client.get("/_whoami", headers={**FORWARDED, "X-Forwarded-Prefix": prefix,
                                        "Authorization": "Bearer alpha-a1b2c3d4e5f6a7b8"})
    assert r.json["url"] == "https://insights.example.com/r/x"
    page = client.get("/", headers={**FORWARDED, "X-Forwarded-Prefix": prefix})
    assert page.status_code == 303 and page.headers["Location"].startswith("/signin?next=")
    good = client.get("/_whoami", headers={**FORWARDED, "X-Forwarded-Prefix": "/team/insights-2",
                                           "Authorization": "Bearer alpha-a1b2c3d4e5f6a7b8"})
    assert good.json["url"] == "https://insights.example.com/team/insights-2/r/x"


@pytest.mark.parametrize("bad", [-1, "two", True])
def test_proxy_hops_must_be_a_count(tmp_path, bad):
    with pytest.raises(ValueError, match="PROXY_HOPS"):
        make_app(tmp_path, PROXY_HOPS=bad)


# --------------------------------------------------------------------------- headers


def assert_security_headers(r, frame_options="SAMEORIGIN"):
    csp = dict(d.strip().split(" ", 1) for d in r.headers["Content-Security-Policy"].split(";"))
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'" and csp["default-src"] == "'self'"
    assert csp["object-src"] == "'none'" and csp["base-uri"] == "'none'"
    assert csp["frame-ancestors"] == "'self'" if frame_options else True
    assert "unsafe" not in r.headers["Content-Security-Policy"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers.get("X-Frame-Options") == frame_options
    assert r.headers["Referrer-Policy"] in ("same-origin", "no-referrer")
    assert HEX_ID.fullmatch(r.headers["X-Request-Id"])
    assert "Werkzeug" not in r.headers.get("Server", "") and "Python" not in r.headers.get("Server", "")


@pytest.fixture
def broken_store(app, monkeypatch):
    """The store fails with a message naming a server path (what a 500 must not show)."""
    def boom(*_args, **_kwargs):
        raise OSError(2, "No such file or directory", "/srv/insights/secret/index.sqlite3")

    monkeypatch.setattr(app.extensions["insights"].store, "result", boom)


@pytest.mark.parametrize("path, status", [
    ("/", 200), ("/api", 200), ("/api/models", 200), ("/static/css/app.css", 200), ("/static/js/dashboard.js", 200),
    ("/favicon.ico", 404), ("/nothing/here", 404), ("/api/nothing", 404), ("/r/" + "0" * 64, 404),
    ("/healthz", 200), ("/metrics", 200),
])
def test_every_response_carries_the_security_headers(client, path, status):
    r = client.get(path)
    assert r.status_code == status
    assert_security_headers(r)


@pytest.mark.parametrize("path", ["/api/results/" + "0" * 64, "/r/" + "0" * 64])
def test_a_500_carries_the_security_headers_too(client, broken_store, path):
    r = client.get(path)
    assert r.status_code == 500
    assert_security_headers(r)


def test_share_urls_are_never_sent_as_a_referrer(client, image_id):
    result = explain_fixed(client, image_id)
    for path in (result["links"]["share"], result["links"]["overlay"], result["links"]["npy"]):
        assert client.get(path).headers["Referrer-Policy"] == "no-referrer", path
    assert client.get("/").headers["Referrer-Policy"] == "same-origin"


@pytest.mark.parametrize("setting, ancestors, frame_options", [
    ("'none'", "'none'", "DENY"),
    ("'self'", "'self'", "SAMEORIGIN"),
    ("'self' http://127.0.0.1:8888", "'self' http://127.0.0.1:8888", None),  # a notebook on another port
    (["'self'", "https://notebooks.example"], "'self' https://notebooks.example", None),
])
def test_frame_ancestors_come_from_the_setting(make, setting, ancestors, frame_options):
    r = make(FRAME_ANCESTORS=setting).test_client().get("/")
    assert f"frame-ancestors {ancestors}" in r.headers["Content-Security-Policy"]
    assert r.headers.get("X-Frame-Options") == frame_options


@pytest.mark.parametrize("bad", ["'self'; script-src *", "'self'\r\nSet-Cookie: a=b", "", "a,b"])
def test_frame_ancestors_that_would_change_the_policy_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="FRAME_ANCESTORS"):
        make_app(tmp_path, FRAME_ANCESTORS=bad)


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "templates"))))
def test_templates_have_no_inline_script_or_style(name):
    """Everything the CSP would block: inline scripts, event-handler attributes, style attributes
    and <style> elements. A JSON data block (<script type="application/json">) never runs."""
    with open(os.path.join(ROOT, "templates", name), encoding="utf-8") as f:
        text = f.read()
    head = Head(re.sub(r"{{.*?}}", "x", re.sub(r"{%.*?%}", "", text, flags=re.S), flags=re.S))
    for script in head.scripts:
        assert script.get("src") or script.get("type") == "application/json", (name, script)
    assert not [a for a in head.attrs if a[1].startswith("on") or a[1] == "style"], name
    assert head.styles == 0, name
    assert "javascript:" not in text


def test_the_rendered_pages_keep_to_the_policy(client, image_id):
    result = explain_fixed(client, image_id)
    for path in ("/", result["links"]["share"], "/r/" + "0" * 64, "/no/such/page"):
        head = Head(client.get(path).get_data(as_text=True))
        assert all(s.get("src") or s.get("type") == "application/json" for s in head.scripts), path
        assert not [a for a in head.attrs if a[1].startswith("on") or a[1] == "style"], path


# --------------------------------------------------------------------------- request ids


@pytest.mark.parametrize("offered, kept", [
    ("3f2b1c9e-7a4d-4b8e-9c1f-2d3e4f5a6b7c", True), ("req.42:edge_1", True),
    ("x" * 65, False), ("has space", False), ("a\u00e9b", False), ("-leading-dash", False), ("", False),
])
def test_a_sane_incoming_request_id_is_echoed_else_a_new_one(client, offered, kept):
    r = client.get("/api", headers={"X-Request-Id": offered})
    assert (r.headers["X-Request-Id"] == offered) is kept
    if not kept:
        assert HEX_ID.fullmatch(r.headers["X-Request-Id"])


def test_each_request_gets_its_own_id(client):
    ids = {client.get("/healthz").headers["X-Request-Id"] for _ in range(5)}
    assert len(ids) == 5


# --------------------------------------------------------------------------- 500s


def internal_records(caplog):
    return [r for r in caplog.records if r.name == "insights.errors"]


def test_an_api_500_answers_the_request_id_and_logs_the_detail(client, broken_store, caplog):
    caplog.set_level(logging.ERROR)
    r = client.get("/api/results/" + "0" * 64, headers={"X-Request-Id": "edge-7f3a"})
    assert r.status_code == 500
    assert r.headers["X-Request-Id"] == "edge-7f3a"
    assert r.json == {"error": {"code": "internal", "message": "internal error; request id edge-7f3a", "field": None}}
    assert "/srv" not in r.get_data(as_text=True) and "OSError" not in r.get_data(as_text=True)
    [record] = internal_records(caplog)
    assert record.request_id == "edge-7f3a" and "edge-7f3a" in record.getMessage()
    assert "/srv/insights/secret/index.sqlite3" in caplog.text  # the traceback is in the log


def test_a_page_500_answers_the_request_id_and_logs_the_detail(client, broken_store, caplog):
    caplog.set_level(logging.ERROR)
    r = client.get("/r/" + "0" * 64)
    assert r.status_code == 500 and r.mimetype == "text/plain"
    rid = r.headers["X-Request-Id"]
    body = r.get_data(as_text=True)
    assert body == f"internal error; request id {rid}\n"
    [record] = internal_records(caplog)
    assert record.request_id == rid and record.exc_info[0] is FileNotFoundError


class Boom(Method):
    """Test method that fails the way a bug would: an exception whose text names a server path."""

    id = "boom_test"
    label = "Boom (test)"
    family = "test"
    params = ()

    def cost(self, p, facts):
        return Cost(int(os.environ.get("BOOM_PASSES", "1")), 0)

    def run(self, ctx, p):
        raise RuntimeError("cannot open /srv/insights/models/secret.pt")


@pytest.fixture
def boom(monkeypatch):
    monkeypatch.setitem(registry._methods, Boom.id, Boom())


def test_an_inline_failure_answers_the_requests_own_id(client, image_id, boom, caplog):
    caplog.set_level(logging.ERROR)
    r = client.post("/api/explain", json={"image": image_id, "method": "boom_test", "target": 0},
                    headers={"X-Request-Id": "inline-1"})
    assert r.status_code == 500
    assert r.json["error"]["message"] == "internal error; request id inline-1"
    assert "/srv" not in r.get_data(as_text=True)
    # The worker logged the traceback under its own id; the request's id points to it.
    first, second = internal_records(caplog)
    assert first.exc_info and "secret.pt" in caplog.text
    assert second.request_id == "inline-1" and first.request_id in second.getMessage()


def test_a_job_failure_is_generic_and_logged_under_its_id(client, image_id, boom, caplog, monkeypatch):
    caplog.set_level(logging.ERROR)
    monkeypatch.setenv("BOOM_PASSES", "50")  # over INLINE_MAX_PASSES: a job
    r = client.post("/api/explain", json={"image": image_id, "method": "boom_test", "target": 0})
    assert r.status_code == 202
    state = wait_job(client, r.json["job"]["id"])
    assert state["status"] == "failed" and state["error"]["code"] == "internal"
    rid = re.fullmatch(r"internal error; request id ([0-9a-f]{32})", state["error"]["message"]).group(1)
    [record] = internal_records(caplog)
    assert record.request_id == rid and record.exc_info[0] is RuntimeError and "secret.pt" in caplog.text


# --------------------------------------------------------------------------- weights_only


PWNED = []


def _pwned():
    PWNED.append("code ran")
    return {}


class Evil:
    """Pickles as a call to _pwned: what a crafted checkpoint in the hub cache would do."""

    def __reduce__(self):
        return (_pwned, ())


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache, and every torch.load call recorded with its keyword arguments."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    os.makedirs(tmp_path / "hub" / "checkpoints")
    calls, real = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return tmp_path / "hub" / "checkpoints", calls


def resnet18_spec():
    return models._torchvision_spec("resnet18", "ResNet-18", "layer4", allow_download=lambda: False)


def test_torchvision_weights_are_read_from_the_hub_cache_as_tensors_only(hub):
    folder, calls = hub
    spec = resnet18_spec()
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    with torch.random.fork_rng():
        torch.manual_seed(3)
        saved = torchvision.models.resnet18().state_dict()
    torch.save(saved, folder / os.path.basename(weights.url))
    assert spec.unavailable_reason() is None
    model = spec.loader()
    assert calls and all(c.get("weights_only") is True for c in calls)
    torch.testing.assert_close(model.state_dict(), saved)


def test_a_checkpoint_that_would_run_code_is_refused(hub):
    folder, calls = hub
    PWNED.clear()
    torch.save({"fc.weight": Evil()}, folder / os.path.basename(torchvision.models.ResNet18_Weights.DEFAULT.url))
    with pytest.raises(Exception, match="(?i)weights only|unpickl"):
        resnet18_spec().loader()
    assert PWNED == [] and calls[0]["weights_only"] is True


def test_the_packaged_efficientnet_lite0_weights_load_as_tensors_only(hub):
    _folder, calls = hub
    if models._lite0_check():
        pytest.skip(models._lite0_check())
    model = models._efficientnet_lite0()
    assert [c.get("weights_only") for c in calls] == [True]
    assert sum(p.numel() for p in model.parameters()) > 4_000_000
