"""``insights explain``: a folder of real photos (scikit-image's cat and coffee) in ImageFolder layout,
explained with efficientnet_lite0 and Saliency into the store, results.csv and a report that opens
from disk; share ids a server on the same instance serves; a re-run that computes nothing; Ctrl-C;
and every kind of bad input refused with one line and nothing written."""
from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

import insights
from insights import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--model", "efficientnet_lite0", "--method", "saliency", "--device", "cpu"]
CAT = {"Egyptian cat", "tabby"}  # efficientnet_lite0's top classes for Chelsea


def run(argv: list[str]) -> tuple[int, str]:
    """``insights ARGV`` in this process: its exit status and what it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, err.getvalue()


def rows_of(out: str) -> dict[str, dict]:
    with open(os.path.join(out, "results.csv"), newline="") as f:
        return {row["item"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module", autouse=True)
def clean_env():
    """No INSIGHTS_* setting of this machine reaches the command (a test sets its own)."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("INSIGHTS_")}
    yield
    os.environ.update(saved)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    """An ImageFolder: class folders named by WordNet id and by label; a mirrored coffee cup is
    filed as a cat (mislabelled), and one "JPEG" is not an image."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    for folder in ("n02124075", "espresso"):
        (root / folder).mkdir()
    Image.fromarray(data.chelsea()).save(root / "n02124075" / "chelsea.png")
    Image.fromarray(data.coffee()[:, ::-1]).save(root / "n02124075" / "not_a_cat.jpg", quality=92)  # mirrored
    Image.fromarray(data.coffee()).save(root / "espresso" / "coffee.jpg", quality=92)
    (root / "espresso" / "broken.jpg").write_bytes(b"these bytes are not a picture")
    return str(root)


@pytest.fixture(scope="module")
def first(photos, tmp_path_factory) -> dict:
    """The first run over the folder, on a fresh instance."""
    base = tmp_path_factory.mktemp("run")
    out, instance = str(base / "report"), str(base / "instance")
    rc, err = run(["explain", photos, *MODEL, "--out", out, "--instance", instance])
    return {"rc": rc, "err": err, "out": out, "instance": instance, "base": base}


@pytest.fixture(scope="module")
def served(first):
    """The app a server on the same instance would run."""
    return insights.create_app({"INSTANCE_PATH": first["instance"], "DEVICE": "cpu"})


def test_a_folder_is_explained_into_the_csv(first):
    assert first["rc"] == 0, first["err"]
    last = first["err"].strip().splitlines()[-1]
    assert re.fullmatch(r"insights explain: 4 of 4 items in [\d.]+ s: 3 computed, 0 cached, 1 failed; "
                        r"report .*index\.html, table .*results\.csv", last), last
    assert "explaining: 100%" in first["err"] and "4/4" in first["err"]  # the tqdm bar
    rows = rows_of(first["out"])
    assert list(rows) == ["espresso/broken.jpg", "espresso/coffee.jpg", "n02124075/chelsea.png",
                          "n02124075/not_a_cat.jpg"]
    cat, coffee = rows["n02124075/chelsea.png"], rows["espresso/coffee.jpg"]
    filed_as_cat = rows["n02124075/not_a_cat.jpg"]
    assert cat["true_label"] == "Egyptian cat" and cat["true_index"] == "285"
    assert cat["prediction"] in CAT and cat["correct"] == ("true" if cat["prediction"] == "Egyptian cat" else "false")
    assert coffee["true_label"] == "espresso" and coffee["prediction"] == "espresso" and coffee["correct"] == "true"
    assert float(coffee["probability"]) > 0.5
    assert filed_as_cat["true_label"] == "Egyptian cat" and filed_as_cat["prediction"] == "espresso"
    assert filed_as_cat["correct"] == "false"
    for row in (cat, coffee, filed_as_cat):
        # --target predicted (the default): each map explains the model's own top class.
        assert row["target"] == row["predicted_index"] and row["target_label"] == row["prediction"]
        assert row["method"] == "saliency" and row["cached"] == "false" and row["error"] == ""
        assert re.fullmatch(r"[0-9a-f]{64}", row["share_id"]) and row["share_url"] == ""
    broken = rows["espresso/broken.jpg"]
    assert "espresso/broken.jpg" in broken["error"] and "not an image" in broken["error"]
    assert broken["share_id"] == "" and broken["prediction"] == "" and broken["true_label"] == "espresso"


def test_share_ids_are_stored_and_served_from_the_same_instance(first, served):
    client = served.test_client()
    for key, row in rows_of(first["out"]).items():
        if not row["share_id"]:
            continue
        meta = served.extensions["insights"].store.result(row["share_id"])
        assert meta["model"] == "efficientnet_lite0" and meta["method"] == "saliency"
        assert meta["target"] == int(row["target"])
        page = client.get(f"/r/{row['share_id']}")
        assert page.status_code == 200 and "saliency" in page.get_data(as_text=True).lower(), key


def test_the_report_opens_from_disk(first, served):
    out = first["out"]
    with open(os.path.join(out, "index.html")) as f:
        page = f.read()
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert refs, "the report links nothing"
    for ref in refs:
        assert "://" not in ref and not ref.startswith("/"), ref  # nothing outside OUT
        assert os.path.isfile(os.path.join(out, ref)), ref
    assert "<script" not in page.lower() and "<style>" in page
    rows = rows_of(out)
    store = served.extensions["insights"].store
    shown = [r for r in rows.values() if r["share_id"]]
    assert sorted(os.listdir(os.path.join(out, "images"))) == sorted(
        f"{r['share_id']}-{kind}.png" for r in shown for kind in ("input", "overlay"))
    for row in shown:
        rid = row["share_id"]
        with open(os.path.join(out, "images", f"{rid}-input.png"), "rb") as f:
            assert f.read() == store.result_file(rid, "input.png")  # the crop the model saw
        with Image.open(os.path.join(out, "images", f"{rid}-overlay.png")) as o, \
                Image.open(os.path.join(out, "images", f"{rid}-input.png")) as i:
            assert o.size == i.size and o.mode == "RGB"
        assert rid[:16] in page
    # The verdicts, the counts and the unreadable item's message are on the page.
    assert page.count('class="card incorrect"') == 1 + (rows["n02124075/chelsea.png"]["correct"] == "false")
    assert page.count('class="card error"') == 1 and "not an image" in page
    assert ">4</strong><span>explained" in page


def test_a_second_run_computes_nothing(first, photos):
    results = os.path.join(first["instance"], "results")
    before = {d: os.stat(os.path.join(results, d, "meta.json")).st_mtime_ns for d in os.listdir(results)
              if not d.startswith(".")}
    rc, err = run(["explain", photos, *MODEL, "--out", first["out"], "--instance", first["instance"]])
    assert rc == 0, err
    assert ": 0 computed, 3 cached, 1 failed;" in err.strip().splitlines()[-1]
    after = {d: os.stat(os.path.join(results, d, "meta.json")).st_mtime_ns for d in os.listdir(results)
             if not d.startswith(".")}
    assert after == before and len(before) == 3
    rows = rows_of(first["out"])
    assert [r["cached"] for r in rows.values() if r["share_id"]] == ["true"] * 3


def test_a_configured_dataset_by_name_and_the_true_target(first, photos):
    out = str(first["base"] / "by-name")
    rc, err = run(["explain", "shelf", *MODEL, "--target", "true", "--dataset", f"shelf={photos}", "--out", out,
                   "--instance", first["instance"]])
    assert rc == 0, err
    rows = rows_of(out)
    filed_as_cat = rows["n02124075/not_a_cat.jpg"]
    assert filed_as_cat["target"] == "285" and filed_as_cat["target_label"] == "Egyptian cat"
    assert filed_as_cat["prediction"] == "espresso"  # the map explains the label, not the prediction
    with open(os.path.join(out, "index.html")) as f:
        page = f.read()
    assert "<h1>shelf<small>" in page and "<dt>explains</dt><dd>Egyptian cat" in page


def test_one_image_with_public_links(first, photos, monkeypatch):
    monkeypatch.setenv("INSIGHTS_PUBLIC_URL", "https://insights.example.org")
    out = str(first["base"] / "one")
    rc, err = run(["explain", os.path.join(photos, "espresso", "coffee.jpg"), *MODEL, "--out", out,
                   "--instance", first["instance"]])
    assert rc == 0, err
    assert ": 0 computed, 1 cached, 0 failed;" in err
    [row] = rows_of(out).values()
    assert row["item"] == "coffee.jpg" and row["true_label"] == "" and row["correct"] == ""
    assert row["share_url"] == f"https://insights.example.org/r/{row['share_id']}"
    with open(os.path.join(out, "index.html")) as f:
        page = f.read()
    assert f'href="{row["share_url"]}"' in page and 'class="card unlabelled"' in page


def test_ctrl_c_keeps_what_finished(first, photos, monkeypatch):
    """Interrupted after the first chunk (BATCH_MAX 1: one item a chunk), the report holds that
    item, says it stopped, and the command exits 130."""
    from insights import batch

    real, calls = batch.explain_items, []

    def interrupted(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "explain_items", interrupted)
    monkeypatch.setenv("INSIGHTS_BATCH_MAX", "1")
    out = str(first["base"] / "stopped")
    rc, err = run(["explain", photos, *MODEL, "--out", out, "--instance", first["instance"]])
    assert rc == 130
    assert "stopped (Ctrl-C) after 1 of 4 items" in err and "run it again to go on" in err
    assert calls == [[0], [1]]
    assert list(rows_of(out)) == ["espresso/broken.jpg"]
    with open(os.path.join(out, "index.html")) as f:
        assert "Stopped before the end: 1 of 4 items" in f.read()


@pytest.mark.parametrize("chunk_s, sizes", [(1e-9, [1, 1, 1, 1]), (60.0, [1, 3])])
def test_chunks_are_sized_by_the_time_an_item_takes(first, photos, monkeypatch, chunk_s, sizes):
    """One item first, to time it; then as many as fit CHUNK_S (at most BATCH_MAX): an item that
    takes longer than CHUNK_S goes alone, so a Ctrl-C never loses more than about that much work."""
    from insights import batch

    real, seen = batch.explain_items, []

    def counted(*args, **kwargs):
        seen.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "explain_items", counted)
    monkeypatch.setattr(cli, "CHUNK_S", chunk_s)
    rc, err = run(["explain", photos, *MODEL, "--out", str(first["base"] / "chunks"), "--instance",
                   first["instance"]])
    assert rc == 0, err
    assert seen == sizes and ": 0 computed, 3 cached, 1 failed;" in err


@pytest.mark.parametrize("argv, message", [
    (["{photos}/nowhere", *MODEL], "{photos}/nowhere does not exist (nor is it a dataset given with --dataset)"),
    (["nowhere", *MODEL, "--dataset", "shelf={photos}"], "nowhere does not exist and is no configured dataset "
                                                          "(datasets: shelf)"),
    (["{photos}", "--model", "nope", "--method", "saliency"], "unknown model 'nope'; models: "),
    (["{photos}", "--model", "efficientnet_lite0", "--method", "nope"], "unknown method 'nope'; known methods: "),
    (["{photos}", *MODEL, "--params", "{n_steps: 3}"], "--params is not valid JSON"),
    (["{photos}", *MODEL, "--params", "[1, 2]"], "--params must be a JSON object"),
    (["{photos}", *MODEL, "--params", '{"nt_samples": 0}'], "nt_samples: must be at least 1, got 0"),
    (["{photos}", *MODEL, "--params", '{"n_steps": 8}'], "n_steps: is not a parameter of saliency; known: abs"),
    (["{photos}/espresso/coffee.jpg", *MODEL, "--target", "true"], "--target true needs labelled items"),
    (["{photos}", *MODEL, "--target", "1000"], "--target 1000 is out of range: the model has classes 0–999"),
    (["{photos}", *MODEL, "--target", "cat"], "--target must be predicted, true or a class index, got 'cat'"),
])
def test_bad_input_is_refused_with_one_line_and_nothing_written(photos, tmp_path, argv, message):
    out = tmp_path / "report"
    argv = [a.replace("{photos}", photos) for a in argv]
    rc, err = run(["explain", *argv, "--out", str(out), "--instance", str(tmp_path / "instance")])
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("insights explain: "), err
    assert message.replace("{photos}", photos) in lines[0]
    assert not out.exists()
    if "unknown model" in message:
        assert "efficientnet_lite0" in lines[0]
    if "unknown method" in message:
        assert "saliency" in lines[0] and "grad_cam" in lines[0]


def test_an_out_that_is_a_file_is_refused(photos, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("mine")
    rc, err = run(["explain", photos, *MODEL, "--out", str(out), "--instance", str(tmp_path / "instance")])
    assert rc == 2 and err.strip() == f"insights explain: --out {out} is a file; give a folder (it is made if missing)"
    assert out.read_text() == "mine" and not (tmp_path / "instance").exists()


def test_python_dash_m_insights(first, photos):
    out = first["base"] / "module"
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSIGHTS_")}
    proc = subprocess.run([sys.executable, "-m", "insights", "explain", os.path.join(photos, "n02124075"), *MODEL,
                           "--out", str(out), "--instance", first["instance"]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert ": 0 computed, 2 cached, 0 failed;" in proc.stderr
    rows = rows_of(str(out))
    assert set(rows) == {"chelsea.png", "not_a_cat.jpg"} and rows["chelsea.png"]["prediction"] in CAT


def test_serve_takes_datasets_and_app_py_is_the_same_command():
    args = cli.parse_args(["--dataset", "shelf=/data/shelf", "--dataset", "/data/other"])
    assert cli.model_config(args) == {"DATASETS": ["shelf=/data/shelf", "/data/other"]}
    assert cli.model_config(cli.parse_args([])) == {}  # INSIGHTS_DATASETS stays in charge
    spec = __import__("importlib.util").util.spec_from_file_location("root_app", os.path.join(ROOT, "app.py"))
    module = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main is cli.serve and module.parse_args is cli.parse_args


def test_no_command_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "usage: " in err and "{serve,explain}" not in err and "COMMAND" in err
