"""The human pages: the dashboard shell, the share page of a stored result, and its 404."""
from __future__ import annotations

import hashlib
import os
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from insights.app import create_app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def app(tmp_path):
    return create_app({"INSTANCE_PATH": str(tmp_path / "instance"), "TESTING": True})


@pytest.fixture
def client(app):
    return app.test_client()


def store_result(app, *, method="saliency", target=281, label="tabby", params=None) -> dict:
    """Stores a result the way the API does (metadata, input view, map, array) and returns it."""
    rng = np.random.default_rng(0)
    view = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    attr = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    rid = hashlib.sha256(f"{method}{target}{params}".encode()).hexdigest()
    image_id = hashlib.sha256(b"image").hexdigest()
    links = {name: f"/api/results/{rid}/{file}" for name, file in
             [("input", "input.png"), ("map", "map.png"), ("overlay", "overlay.png"), ("npy", "attribution.npy")]}
    meta = {"id": rid, "model": "efficientnet_lite0", "method": method, "params": params or {"abs": True, "seed": 0},
            "target": target, "target_label": label, "image": {"id": image_id, "width": 32, "height": 32},
            "elapsed_s": 0.25, "created": "2026-11-27T10:00:00Z", "output": "pixel", "signed": False, "layer": None,
            "predictions": [{"index": target, "label": label, "prob": 0.62}], "range": {"min": 0.0, "max": 1.0},
            "encoding": {"zero": 0, "scale": 1.0}, "size": [32, 32], "links": {**links, "share": f"/r/{rid}"}}
    gray = Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), "L")
    import io

    buf = io.BytesIO()
    gray.save(buf, "PNG")
    return app.extensions["insights"].store.put_result(meta, view, attr, buf.getvalue())


class Controls(HTMLParser):
    """Collects form controls, label targets and ids of a page."""

    def __init__(self):
        super().__init__()
        self.controls, self.label_for, self.ids, self.meta = [], set(), set(), {}
        self._button = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "label" and a.get("for"):
            self.label_for.add(a["for"])
        if tag == "meta" and (a.get("property") or a.get("name")):
            self.meta[a.get("property") or a["name"]] = a.get("content")
        if tag in ("input", "select", "textarea") or a.get("role") in ("button", "combobox", "radiogroup", "tablist"):
            self.controls.append((tag, a, ""))
        if tag == "button":
            self._button = [a, ""]

    def handle_data(self, data):
        if self._button is not None:
            self._button[1] += data

    def handle_endtag(self, tag):
        if tag == "button" and self._button is not None:
            self.controls.append(("button", self._button[0], self._button[1].strip()))
            self._button = None


def parse(html: str) -> Controls:
    p = Controls()
    p.feed(html)
    return p


def test_dashboard_renders_with_every_control_labelled(client):
    res = client.get("/")
    assert res.status_code == 200
    assert res.mimetype == "text/html"
    page = parse(res.get_data(as_text=True))
    for needed in ("dropzone", "file-input", "model-list", "predictions", "class-search", "method-list",
                   "param-form", "run", "overlay", "compare-run", "image-error", "toast"):
        assert needed in page.ids, needed
    unlabelled = []
    for tag, attrs, text in page.controls:
        named = (attrs.get("aria-label") or attrs.get("aria-labelledby") or attrs.get("id") in page.label_for
                 or (tag == "button" and text))
        if not named:
            unlabelled.append((tag, attrs))
    assert unlabelled == []
    assert 'type="module"' in res.get_data(as_text=True)


def test_share_page_renders_result_with_opengraph_tags(app, client):
    app.config["PUBLIC_URL"] = "https://insights.example.com"  # previews get absolute links from it only
    meta = store_result(app)
    res = client.get(f"/r/{meta['id']}")
    assert res.status_code == 200
    html = res.get_data(as_text=True)
    page = parse(html)
    card = f"https://insights.example.com/api/results/{meta['id']}/card.png"
    assert page.meta["og:image"] == page.meta["twitter:image"] == card
    assert (page.meta["og:image:width"], page.meta["og:image:height"]) == ("1200", "630")
    assert page.meta["twitter:card"] == "summary_large_image"
    assert page.meta["og:url"] == f"https://insights.example.com/r/{meta['id']}"
    assert page.meta["og:title"] == "tabby — Saliency on efficientnet_lite0"
    assert "tabby" in page.meta["og:description"] and "62.0%" in page.meta["og:description"]
    assert "the Saliency attribution map." in page.meta["og:description"]
    card_png = client.get(card.replace("https://insights.example.com", ""))
    assert card_png.status_code == 200 and card_png.data[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r'id="fact-model">efficientnet_lite0<', html)
    assert re.search(r'id="fact-method">saliency<', html)
    assert re.search(r'id="fact-class">tabby \(#281\)<', html)
    assert "<code>abs</code>" in html and "<code>seed</code>" in html
    assert f'data-result="{meta["id"]}"' in html
    assert f'href="/api/results/{meta["id"]}/attribution.npy"' in html
    assert ">Open the dashboard</a>" in html  # a read-only mirror leaves it out (tests/test_auth.py)


def test_share_page_shows_list_params_and_escapes_labels(app, client):
    meta = store_result(app, method="occlusion", label="<b>cat</b>", params={"strides": [3, 8, 8], "layer": None, "abs": True})
    html = client.get(f"/r/{meta['id']}").get_data(as_text=True)
    assert "<td>3×8×8</td>" in html
    assert "<td>auto</td>" in html and "<td>true</td>" in html
    assert "<b>cat</b>" not in html and "&lt;b&gt;cat&lt;/b&gt;" in html
    assert parse(html).meta["og:title"].startswith("<b>cat</b> — Occlusion")  # unescaped by the parser


def test_share_page_leaves_out_noise_settings_while_the_tunnel_is_off(app, client):
    off = store_result(app, params={"abs": True, "nt_type": "none", "nt_samples": 10, "stdevs": 0.3, "seed": 0})
    html = client.get(f"/r/{off['id']}").get_data(as_text=True)
    assert "<code>abs</code>" in html and "<code>nt_type</code>" in html
    assert "<code>nt_samples</code>" not in html and "<code>stdevs</code>" not in html
    on = store_result(app, params={"abs": True, "nt_type": "smoothgrad", "nt_samples": 10, "stdevs": 0.3, "seed": 0})
    html = client.get(f"/r/{on['id']}").get_data(as_text=True)
    assert "<code>nt_samples</code>" in html and "<code>stdevs</code>" in html and "<code>seed</code>" in html


@pytest.mark.parametrize("rid", ["0" * 64, "not-an-id", "abc"])
def test_unknown_result_is_a_friendly_404(client, rid):
    res = client.get(f"/r/{rid}")
    assert res.status_code == 404
    assert res.mimetype == "text/html"
    html = res.get_data(as_text=True)
    assert "Nothing here" in html and f"/r/{rid}" in html
    assert 'href="/"' in html
    assert "og:image" not in html


def test_api_404_stays_json(client):
    res = client.get("/api/results/" + "0" * 64)
    assert res.status_code == 404
    assert res.get_json()["error"]["code"] == "not_found"


JS = os.path.join(ROOT, "static", "js")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(JS) if f.endswith(".js")))
def test_static_modules_are_served_as_javascript_and_imports_resolve(client, name):
    res = client.get(f"/static/js/{name}")
    assert res.status_code == 200
    assert "javascript" in res.mimetype
    source = res.get_data(as_text=True)
    for target in re.findall(r'from\s+"(\./[^"]+)"', source):
        assert os.path.isfile(os.path.join(JS, target)), f"{name} imports missing {target}"
        exported = re.findall(r"export (?:async )?(?:function|const|class) ([\w$]+)", open(os.path.join(JS, target)).read())
        imported = re.search(r'import\s*\{([^}]*)\}\s*from\s*"' + re.escape(target) + '"', source).group(1)
        for symbol in (s.strip() for s in imported.split(",") if s.strip()):
            assert symbol in exported, f"{name} imports {symbol} that {target} does not export"


@pytest.mark.parametrize("path", ["/", "share"])
def test_pages_embed_the_overlay_specification(app, client, path):
    import json

    from insights import overlay

    if path == "share":
        path = f"/r/{store_result(app)['id']}"
    html = client.get(path).get_data(as_text=True)
    found = re.search(r'<script type="application/json" id="overlay-spec">(.*?)</script>', html, re.S)
    assert found and json.loads(found.group(1)) == overlay.describe()
