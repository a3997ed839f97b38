"""Progressive occlusion: windows scored coarse to fine, partial maps on the way, the same final map."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from insights import engine
from insights.engine import Cancelled
from insights.engine.progressive import axis_levels, coarse_to_fine


def test_positions_along_an_axis_come_in_halving_spacings_with_the_border_first():
    # 13 positions (a 32-pixel window every 16 over 224): every 4th and the last, then every 2nd, then the rest.
    assert axis_levels(13).tolist() == [0, 2, 1, 2, 0, 2, 1, 2, 0, 2, 1, 2, 0]
    # 21 positions (Captum's tutorial: 45 every 9): every 8th and the last first.
    assert [i for i, s in enumerate(axis_levels(21).tolist()) if s == 0] == [0, 8, 16, 20]
    assert axis_levels(1).tolist() == [0] and axis_levels(3).tolist() == [0, 0, 0]


def test_the_order_visits_every_window_once_stage_by_stage():
    order, sizes = coarse_to_fine([1, 13, 13])
    assert sorted(order.tolist()) == list(range(169)) and sizes == [16, 33, 120]
    first = {(int(w) // 13, int(w) % 13) for w in order[:16]}
    assert first == {(h, w) for h in (0, 4, 8, 12) for w in (0, 4, 8, 12)}


class Linear(nn.Module):
    """Class 0's score is a smooth weighting of the image (a ramp): its occlusion map is known."""

    def __init__(self, size: int = 48):
        super().__init__()
        ramp = torch.linspace(-1, 1, size)
        self.weight = nn.Parameter((ramp.view(-1, 1) + 2 * ramp.view(1, -1)).expand(3, -1, -1).clone())

    def forward(self, x):
        score = (x * self.weight).flatten(1).sum(1, keepdim=True)
        return torch.cat([score, -score], 1)


def run(model, x, method="occlusion", target=0, **params):
    seen = []
    out = engine.attribute(model, x, method, target, partial=lambda m, f, kind: seen.append((m.clone(), f)), **params)
    return out, seen


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.sum(1).flatten(), b.sum(1).flatten()]))[0, 1])


def test_partial_maps_cover_the_image_and_the_final_map_is_unchanged():
    model = Linear().eval()
    x = torch.rand(1, 3, 48, 48)
    params = {"sliding_window_shapes": (3, 6, 6), "strides": (3, 2, 2)}
    plain = engine.attribute(model, x, "occlusion", 0, **params)
    final, seen = run(model, x, **params)
    assert torch.equal(final, plain)  # only the order of the passes changed
    assert seen, "no partial map was published"
    first, fraction = seen[0]
    assert first.shape == final.shape and torch.isfinite(first).all()
    assert 0 < fraction < 0.15  # the first stage: 9 of 484 windows (the clean pass counts too)
    assert (first.sum(1) != 0).float().mean() > 0.99  # every pixel has a value already
    assert corr(first, final) > 0.9
    assert all(a[1] < b[1] for a, b in zip(seen, seen[1:]))  # later maps come later in the work


def test_feature_ablation_on_patches_is_progressive_too(small_cnn, images):
    plain = engine.attribute(small_cnn, images, "feature_ablation", 1, patch_size=4)
    final, seen = run(small_cnn, images, "feature_ablation", 1, patch_size=4)
    assert torch.equal(final, plain) and seen
    assert seen[0][0].shape == final.shape


def test_without_a_taker_no_partial_map_is_made(monkeypatch):
    from insights.engine import progressive

    monkeypatch.setattr(progressive, "partial_map", lambda *a: pytest.fail("partial map made"))
    engine.attribute(Linear().eval(), torch.rand(1, 3, 48, 48), "occlusion", 0,
                     sliding_window_shapes=(3, 6, 6), strides=(3, 2, 2))


def test_cancelling_after_a_partial_map_stops_the_call():
    stop = threading.Event()
    seen = []

    def take(m, f, kind):
        seen.append(f)
        stop.set()

    with pytest.raises(Cancelled):
        engine.attribute(Linear().eval(), torch.rand(1, 3, 48, 48), "occlusion", 0, partial=take, cancel=stop,
                         memory_budget=1, sliding_window_shapes=(3, 6, 6), strides=(3, 2, 2))
    assert len(seen) == 1 and seen[0] < 0.5


# --------------------------------------------------------------------------- through the job API


from appkit import app, client, extra_methods, image_id, wait_job  # noqa: E402,F401


def test_an_occlusion_job_shows_its_partial_map_and_stores_the_unchanged_final_one(client, app, image_id, monkeypatch):
    import base64
    import io

    import numpy as np
    from PIL import Image

    from insights import imaging

    from appkit import distributed
    from insights import jobs

    published = []  # what the job showed (in-process, or on the Celery worker in distributed mode)
    classes = [jobs.Job]
    if distributed():  # insights.worker imports only with a broker
        from insights import worker

        classes.append(worker.WorkerJob)
    for cls in classes:
        def recording(self, partial, _real=cls.publish):
            published.append(partial)
            return _real(self, partial)
        monkeypatch.setattr(cls, "publish", recording)
    r = client.post("/api/explain", json={"image": image_id, "method": "occlusion", "target": 2})
    assert r.status_code == 202, r.json
    assert r.json["job"]["partial"] is None  # nothing scored yet
    final = wait_job(client, r.json["job"]["id"])
    assert final["status"] == "done" and final["partial"] is None  # the result replaced it
    assert published
    partial = published[0]
    # The tiny model's 32×32 input: 15×15 window positions, 25 of them in the first stage.
    assert partial["kind"] == "refining" and 0 < partial["fraction"] < 1
    head, data = partial["map"].split(",", 1)
    assert head == "data:image/png;base64"
    png = base64.b64decode(data)
    assert Image.open(io.BytesIO(png)).size == (32, 32)
    view = Image.open(io.BytesIO(base64.b64decode(partial["input"].split(",", 1)[1])))
    assert view.format == "JPEG" and view.size == (32, 32)
    approx = imaging.decode_map(png, partial["encoding"])
    service = app.extensions["insights"]
    rid = final["result_id"]
    x, _view = service.models.spec("tiny").prepare(service.store.load_image(image_id))
    plain = engine.attribute(service.models.get("tiny"), x, "occlusion", 2)
    stored = service.store.attribution(rid)
    assert np.allclose(stored, plain.numpy(), rtol=1e-3, atol=1e-6 * float(plain.abs().max()))
    assert np.corrcoef(approx.flatten(), plain.sum(1)[0].numpy().flatten())[0, 1] > 0.5


# --------------------------------------------------------------------------- previews of path methods


@pytest.mark.parametrize("method, knob, full, cheap", [("integrated_gradients", "n_steps", 50, 5),
                                                      ("gradient_shap", "n_samples", 40, 4)])
def test_a_path_method_shows_a_cheap_preview_first_and_returns_the_requested_map(small_cnn, images, method,
                                                                                 knob, full, cheap):
    seen, info, ticks = [], {}, []
    plain = engine.attribute(small_cnn, images, method, 1, **{knob: full})
    out = engine.attribute(small_cnn, images, method, 1, info=info, progress=lambda d, t: ticks.append((d, t)),
                           partial=lambda m, f, kind: seen.append((m.clone(), f, kind)), **{knob: full})
    assert torch.equal(out, plain)
    assert len(seen) == 1 and seen[0][2] == "preview"
    preview, fraction, _ = seen[0]
    assert torch.equal(preview, engine.attribute(small_cnn, images, method, 1, **{knob: cheap}))
    assert info["preview"] == {"params": {knob: cheap}, "passes": cheap, "share": round(cheap / (cheap + full), 4)}
    assert info["preview"]["share"] <= 0.15 and fraction == pytest.approx(cheap / (cheap + full), abs=0.02)
    assert ticks[-1] == (2 * (cheap + full), 2 * (cheap + full))  # the preview counts in the progress
    assert corr(preview, out) > 0.8


def test_few_steps_or_a_noise_tunnel_have_no_preview(small_cnn, images):
    for params in ({"n_steps": 10}, {"n_steps": 50, "nt_type": "smoothgrad", "nt_samples": 2}):
        seen = []
        engine.attribute(small_cnn, images, "integrated_gradients", 1, partial=lambda *a: seen.append(a), **params)
        assert seen == []


def test_an_event_stream_sends_each_partial_maps_images_once():
    from insights.service import EventStream

    class Slot:
        released = False

        def release(self):
            self.released = True

    first = {"seq": 1, "kind": "refining", "fraction": 0.1, "map": "data:1", "input": "data:in", "encoding": {}}
    second = {**first, "seq": 2, "fraction": 0.5, "map": "data:2"}
    states = [{"status": "running", "done": d, "version": d, "partial": p}
              for d, p in ((1, None), (2, first), (3, first), (4, second), (5, second))]
    slot = Slot()
    sent = [s["partial"] for s in EventStream((s for s in states), slot)]
    assert sent[0] is None and sent[1] == first and sent[3] == second
    assert sent[2] == {"seq": 1, "kind": "refining", "fraction": 0.1}
    assert sent[4] == {"seq": 2, "kind": "refining", "fraction": 0.5}
    assert slot.released
