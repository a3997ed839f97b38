"""The share page lists a result's stored quality measurements: the newest of each metric, as a
line readable without the page script, and as JSON the script draws its cards from."""
from __future__ import annotations

import json
import re

import pytest

from insights.app import create_app


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A Grad-CAM of the coffee sample with two box checks and a small deletion stored."""
    app = create_app({"INSTANCE_PATH": str(tmp_path_factory.mktemp("instance")), "INLINE_TIMEOUT_S": 120,
                      "INLINE_MAX_PASSES": 1000})
    client = app.test_client()
    image = client.post("/api/samples/coffee").get_json()["id"]
    meta = client.post("/api/explain", json={"model": "efficientnet_lite0", "image": image, "method": "grad_cam",
                                              "target": 967}).get_json()["result"]
    answers = {}
    for metric, params in (("pointing", {"box": [0, 0, 224, 112]}), ("pointing", {"box": [50, 60, 150, 200]}),
                           ("deletion", {"steps": 4, "reference_seeds": 2})):
        r = client.post(f"/api/results/{meta['id']}/quality", json={"metric": metric, "params": params})
        assert r.status_code == 200, r.get_json()
        answers[metric] = r.get_json()["quality"]  # the newest of each
    yield client, meta["id"], answers
    app.extensions["insights"].jobs.shutdown()


def test_the_share_page_embeds_the_newest_measurement_of_each_metric(measured):
    client, rid, answers = measured
    html = client.get(f"/r/{rid}").get_data(as_text=True)
    data = json.loads(re.search(r'<script type="application/json" id="quality-data">(.*?)</script>', html, re.S).group(1))
    assert sorted(q["metric"] for q in data) == ["deletion", "pointing"]
    point = next(q for q in data if q["metric"] == "pointing")
    assert point["params"]["box"] == [50, 60, 150, 200]  # the newer box, not the first
    assert point == answers["pointing"]


def test_the_share_page_words_each_measurement_without_the_script(measured):
    client, rid, answers = measured
    html = client.get(f"/r/{rid}").get_data(as_text=True)
    items = re.findall(r"<li>(.*?)</li>", re.search(r'id="share-quality-list">(.*?)</ul>', html, re.S).group(1))
    d = answers["deletion"]["answer"]
    p = answers["pointing"]["answer"]
    assert f"Deletion: area {d['areas'][0]:.3g} vs random {d['reference']['mean'][0]:.3g} ± " \
           f"{d['reference']['std'][0]:.3g} (lower is better)" in [i.replace("&#43;", "+") for i in items]
    where = "inside" if p["hits"][0] else "outside"
    assert any(i.startswith(f"Pointing: {100 * p['energies'][0]:.1f}% of the positive attribution in the box "
                            f"(a uniform map: {100 * p['chance']:.1f}%), the peak {where}") for i in items), items


def test_a_result_without_measurements_has_no_quality_section(measured):
    client, rid, _ = measured
    image = client.post("/api/samples/coffee").get_json()["id"]
    other = client.post("/api/explain", json={"model": "efficientnet_lite0", "image": image, "method": "saliency",
                                               "target": 967}).get_json()["result"]["id"]
    assert other != rid
    html = client.get(f"/r/{other}").get_data(as_text=True)
    assert 'id="share-quality"' not in html and 'id="quality-data"' not in html
