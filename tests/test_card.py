"""The link-preview card of a result (GET /api/results/<id>/card.png, insights/card.py)."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from appkit import app, client, extra_methods, image_id  # noqa: F401
from insights import card


def result_of(client, image_id, method="saliency") -> dict:
    r = client.post("/api/explain", json={"image": image_id, "method": method, "target": 3})
    assert r.status_code == 200, r.json
    return r.json["result"]


def region(img: Image.Image, left: int) -> np.ndarray:
    top = (card.HEIGHT - card.SIDE) // 2 + 30
    return np.asarray(img.crop((left, top, left + card.SIDE, top + card.SIDE)).convert("RGB"), dtype=np.float64)


def test_the_card_shows_the_input_and_the_overlay_side_by_side_with_the_words(client, app, image_id):
    meta = result_of(client, image_id)
    r = client.get(meta["links"]["share"].replace("/r/", "/api/results/") + "/card.png")
    assert r.status_code == 200 and r.mimetype == "image/png" and r.headers["ETag"]
    img = Image.open(io.BytesIO(r.data))
    assert img.size == (1200, 630)
    view = Image.open(io.BytesIO(client.get(meta["links"]["input"]).data)).convert("RGB")
    heat = Image.open(io.BytesIO(client.get(meta["links"]["overlay"]).data)).convert("RGB")
    big = lambda im: np.asarray(im.resize((card.SIDE, card.SIDE), Image.Resampling.LANCZOS), dtype=np.float64)  # noqa: E731
    assert np.abs(region(img, 56) - big(view)).mean() < 1.0
    assert np.abs(region(img, 56 + card.SIDE + card.GAP) - big(heat)).mean() < 1.0
    # The words: light text on the dark background in the column beside the pictures.
    text = np.asarray(img.crop((56 + 2 * card.SIDE + card.GAP + 36, 150, 1200, 480)).convert("RGB"))
    assert (text.min(axis=2) > 200).sum() > 500  # the class, method and model in near-white ink
    assert (np.abs(text.astype(int) - card.ACCENT).sum(axis=2) < 30).sum() > 50  # the probability in the accent


def test_the_card_is_made_once_and_kept_with_the_result(client, app, image_id):
    meta = result_of(client, image_id)
    store = app.extensions["insights"].store
    before = store.total_bytes()
    first = client.get(f"/api/results/{meta['id']}/card.png").data
    path = os.path.join(store.result_dir(meta["id"]), "card.png")
    assert open(path, "rb").read() == first and store.total_bytes() == before + len(first)
    mtime = os.stat(path).st_mtime_ns
    again = client.get(f"/api/results/{meta['id']}/card.png", headers={"If-None-Match": '"nothing"'})
    assert again.data == first and os.stat(path).st_mtime_ns == mtime
    assert client.get(f"/api/results/{meta['id']}/card.png", headers={"If-None-Match": again.headers["ETag"]}).status_code == 304
    assert store.delete_result(meta["id"]) and not os.path.exists(path)
    assert client.get(f"/api/results/{meta['id']}/card.png").status_code == 404


def test_a_store_without_room_serves_the_card_without_keeping_it(client, app, image_id):
    meta = result_of(client, image_id)
    store = app.extensions["insights"].store
    store.max_bytes = store.total_bytes() + 100  # no room for a card, and nothing else to evict
    r = client.get(f"/api/results/{meta['id']}/card.png")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.data)).size == (1200, 630)
    assert not os.path.exists(os.path.join(store.result_dir(meta["id"]), "card.png"))
    assert store.result(meta["id"]) is not None  # the result itself stays


def test_a_long_class_name_is_wrapped_and_shortened_to_fit():
    draw = __import__("PIL.ImageDraw", fromlist=["Draw"]).Draw(Image.new("RGB", (10, 10)))
    font = card._font(34, bold=True)
    lines = card._wrap(draw, "Great Pyrenees mountain dog of the high valleys of the Pyrenees", font, 272, 3)
    assert 1 < len(lines) <= 3 and all(draw.textlength(line, font=font) <= 272 for line in lines)
    assert lines[-1].endswith("…")


def test_concurrent_requests_render_a_card_once_and_a_revalidation_renders_nothing(client, app, image_id,
                                                                                   monkeypatch):
    import threading
    import time

    meta = result_of(client, image_id)
    url = f"/api/results/{meta['id']}/card.png"
    real, calls = card.render, []

    def slow(*args):
        calls.append(1)
        time.sleep(0.2)
        return real(*args)

    monkeypatch.setattr(card, "render", slow)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(app.test_client().get(url))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and [a.status_code for a in answers] == [200] * 4
    assert len({a.data for a in answers}) == 1
    monkeypatch.setattr(card, "render", lambda *a: pytest.fail("rendered for a revalidation"))
    app.extensions["insights"]._cards.clear()
    os.remove(os.path.join(app.extensions["insights"].store.result_dir(meta["id"]), "card.png"))
    again = client.get(url, headers={"If-None-Match": answers[0].headers["ETag"]})
    assert again.status_code == 304 and again.data == b""
