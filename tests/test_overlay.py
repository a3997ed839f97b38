"""The overlay specification: options, colour tables, normalisation and every mode × sign, plus
the colour-table endpoint. The canvas is held to the same pictures by tests/browser."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from appkit import app, client, extra_methods  # noqa: F401
from insights import imaging, overlay

MODES = [m[0] for m in overlay.MODES]
SIGNS = [s[0] for s in overlay.SIGNS]
OFFERED = [c["value"] for c in overlay.describe()["colormaps"] if c["value"] != "auto"]


def opts(mode="heat_map", sign="all", cmap=None, alpha=0.5, outlier=0.0) -> overlay.Options:
    return overlay.Options(mode, sign, cmap or overlay.AUTO_COLORMAP[sign], alpha, outlier)


def overlay_px(mode, sign, cmap=None, alpha=0.5, m=None):
    view = Image.new("RGB", (4, 2), (200, 100, 50))
    m = np.array([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]) if m is None else m
    return np.asarray(overlay.render(view, m, opts(mode, sign, cmap, alpha))).astype(int)


def signed_result(seed=0, size=(12, 10)) -> tuple[Image.Image, bytes, dict]:
    """An input view and a signed map stored the way the app stores them."""
    rng = np.random.default_rng(seed)
    view = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8), "RGB")
    png, enc = imaging.encode_map(rng.normal(size=size) ** 3, signed=True)
    return view, png, enc


# --------------------------------------------------------------------------- options


def test_options_defaults_follow_the_page():
    assert overlay.options({}, signed=True) == overlay.Options("blended_heat_map", "all", "RdWhGn", 0.5, 2.0)
    unsigned = overlay.options({"sign": "auto", "cmap": "auto"}, signed=False)
    assert (unsigned.sign, unsigned.cmap) == ("positive", "Greens")
    given = overlay.options({"mode": "heat_map", "sign": "negative", "cmap": "viridis", "alpha": "0.25",
                             "outlier": "10"}, signed=True)
    assert given == overlay.Options("heat_map", "negative", "viridis", 0.25, 10.0)


@pytest.mark.parametrize("args, field, words", [
    ({"mode": "sketch"}, "mode", "one of"),
    ({"sign": "up"}, "sign", "one of"),
    ({"cmap": "NoSuchMap"}, "cmap", "unknown matplotlib colormap"),
    ({"alpha": "2"}, "alpha", "between 0.0 and 1.0"),
    ({"alpha": "nan"}, "alpha", "between 0.0 and 1.0"),
    ({"alpha": "x"}, "alpha", "must be a number"),
    ({"outlier": "60"}, "outlier", "between 0.0 and 50.0"),
])
def test_options_refuse_bad_values(args, field, words):
    with pytest.raises(overlay.OptionError, match=words) as err:
        overlay.options(args, signed=True)
    assert err.value.field == field and err.value.status == 400 and err.value.code == "bad_param"


def test_magnitude_modes_accept_sign_all():
    assert overlay.options({"mode": "masked_image", "sign": "all"}, signed=True).sign == "all"


# --------------------------------------------------------------------------- colour tables


@pytest.mark.parametrize("name", OFFERED + sorted(set(overlay.AUTO_COLORMAP.values())))
def test_lut_is_matplotlibs_colormap(name):
    table = overlay.lut(name)
    assert table.shape == (256, 3) and table.dtype == np.uint8 and not table.flags.writeable
    reference = overlay.colormap(name)(np.linspace(0, 1, 256))[:, :3]
    assert np.array_equal(table, np.round(reference * 255).astype(np.uint8))
    png = Image.open(io.BytesIO(overlay.lut_png(name)))
    assert png.mode == "RGB" and png.size == (256, 1) and np.array_equal(np.asarray(png)[0], table)


def test_rdwhgn_is_captums_red_white_green():
    table = overlay.lut("RdWhGn").astype(int)
    assert table[0].tolist() == [255, 0, 0] and table[255].tolist() == [0, 128, 0]
    assert np.abs(table[128] - 255).max() <= 1


def test_describe_offers_only_what_renders():
    spec = overlay.describe()
    assert [m["value"] for m in spec["modes"]] == MODES and [s["value"] for s in spec["signs"]] == SIGNS
    assert set(overlay.AUTO_COLORMAP.values()) | set(OFFERED) == set(spec["luts"])
    for name, url in spec["luts"].items():
        overlay.lut(name)
        assert url == f"/api/colormaps/{name}.png?v={overlay.fingerprint()}"
    assert overlay.options({k: v for k, v in spec["defaults"].items()}, signed=True).mode == "blended_heat_map"


def test_a_new_matplotlib_gives_new_table_urls(monkeypatch):
    import matplotlib

    before = overlay.fingerprint()
    overlay.fingerprint.cache_clear()
    monkeypatch.setattr(matplotlib, "__version__", matplotlib.__version__ + ".post1")
    try:
        assert overlay.fingerprint() != before
        assert all(url.endswith(overlay.fingerprint()) for url in overlay.describe()["luts"].values())
    finally:
        overlay.fingerprint.cache_clear()


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("outlier", [0, 2, 10])
def test_normalize_matches_captum(sign, outlier):
    from captum.attr._utils.visualization import _normalize_attr

    m = np.random.default_rng(3).normal(size=(12, 10)) ** 3
    ours = overlay.normalize(m, sign, outlier)
    theirs = _normalize_attr(m, sign, outlier)
    assert np.allclose(ours, theirs)


def test_cumulative_threshold_clips_the_top_mass():
    values = np.array([1.0] * 98 + [100.0, 100.0])
    assert overlay.cumulative_threshold(values, 30) == 1.0  # 30 % of 298 lies within the 1s
    assert overlay.cumulative_threshold(values, 40) == 100.0
    assert overlay.cumulative_threshold(values, 100) == 100.0


def test_levels_render_as_the_decoded_map():
    """The encoding's scale cancels: rendering the levels is rendering the decoded floats."""
    view, png, enc = signed_result()
    for sign in SIGNS:
        a = overlay.render(view, overlay.levels(png, enc["zero"]), opts("heat_map", sign, outlier=2))
        b = overlay.render(view, imaging.decode_map(png, enc), opts("heat_map", sign, outlier=2))
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b)).max() <= 1


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sign", SIGNS)
def test_every_mode_and_sign_renders(mode, sign):
    view, png, enc = signed_result()
    out = overlay.render_result(imaging.png_bytes(view), png, enc, opts(mode, sign, outlier=2))
    assert out.mode == "RGB" and out.size == view.size
    px = np.asarray(out).astype(int)
    if mode == "original_image":
        assert np.array_equal(px, np.asarray(view))
    else:
        assert px.std() > 5  # a picture, not a flat colour


@pytest.mark.parametrize("mode", overlay.MAGNITUDE_MODES)
def test_magnitude_modes_show_all_as_absolute_value(mode):
    view, png, enc = signed_result()
    m = overlay.levels(png, enc["zero"])
    every = overlay.render(view, m, opts(mode, "all", outlier=2))
    magnitude = overlay.render(view, m, opts(mode, "absolute_value", outlier=2))
    assert np.array_equal(np.asarray(every), np.asarray(magnitude))
    positive = overlay.render(view, m, opts(mode, "positive", outlier=2))
    assert not np.array_equal(np.asarray(every), np.asarray(positive))


def test_heat_colours_are_matplotlibs_lookup():
    m = np.linspace(-1, 1, 40).reshape(4, 10)
    view = Image.new("RGB", (10, 4))
    for sign, cmap in [("all", "RdWhGn"), ("positive", "viridis"), ("negative", "magma")]:
        px = np.asarray(overlay.render(view, m, opts("heat_map", sign, cmap)))
        n = overlay.normalize(m, sign, 0)
        u = (n + 1) / 2 if sign == "all" else n
        expected = np.round(overlay.colormap(cmap)(u)[..., :3] * 255)
        assert np.array_equal(px, expected.astype(np.uint8)), sign


def test_heat_map_default_colormaps():
    px = overlay_px("heat_map", "all")  # red-white-green: +1 green, 0 white
    assert px[0, 0].tolist() == [0, 128, 0] and np.abs(px[0, 3] - 255).max() <= 1
    neg = overlay_px("heat_map", "all", m=-np.ones((2, 4)))
    assert neg[0, 0].tolist() == [255, 0, 0]
    blues = overlay_px("heat_map", "absolute_value")
    assert blues[0, 0].tolist() == [8, 48, 107] and blues[0, 3].tolist() == [247, 251, 255]


def test_masked_and_alpha_scaling_and_original():
    masked = overlay_px("masked_image", "positive")
    assert masked[0, 0].tolist() == [200, 100, 50] and masked[0, 3].tolist() == [0, 0, 0]
    alpha = overlay_px("alpha_scaling", "absolute_value")
    assert alpha[0, 0].tolist() == [200, 100, 50] and alpha[0, 3].tolist() == [255, 255, 255]
    assert overlay_px("original_image", "all", m=np.zeros((2, 4)))[1, 2].tolist() == [200, 100, 50]
    negative = overlay_px("alpha_scaling", "all", m=-np.array([[1.0, 1.0, 0.0, 0.0]] * 2))  # all: |v|
    assert negative[0, 0].tolist() == [200, 100, 50] and negative[0, 3].tolist() == [255, 255, 255]


def test_blended_heat_map_weights_heat_by_alpha():
    px = overlay_px("blended_heat_map", "positive", cmap="gray", alpha=0.25)
    grey = (200 + 100 + 50) / 3
    assert np.abs(px[0, 0] - (0.25 * 255 + 0.75 * grey)).max() <= 1  # map 1 → white heat
    assert np.abs(px[0, 3] - 0.75 * grey).max() <= 1  # map 0 → black heat


def test_overlay_resizes_a_smaller_map_to_the_view():
    view = Image.new("RGB", (8, 8), (0, 0, 0))
    m = np.array([[1.0, 0.0], [1.0, 0.0]])
    px = np.asarray(overlay.render(view, m, opts("heat_map", "positive", "gray")))
    assert px.shape == (8, 8, 3) and px[4, 0, 0] == 255 and px[4, 7, 0] == 0


def test_resample_is_bilinear_between_pixel_centres():
    m = np.array([[0.0, 4.0]])
    assert overlay.resample(m, 1, 4).tolist() == [[0.0, 1.0, 3.0, 4.0]]
    assert overlay.resample(m, 1, 2) is m


# --------------------------------------------------------------------------- the colour-table endpoint


@pytest.mark.parametrize("name", ["viridis", "RdWhGn", "Blues"])
def test_colormap_endpoint_serves_the_table_immutable(client, name):
    r = client.get(f"/api/colormaps/{name}.png")
    assert r.status_code == 200 and r.mimetype == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.data)).convert("RGB"))[0], overlay.lut(name))
    assert set(r.headers["Cache-Control"].split(", ")) == {"public", "max-age=31536000", "immutable"}
    again = client.get(f"/api/colormaps/{name}.png", headers={"If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304 and again.data == b""


def test_colormap_endpoint_unknown_name_is_404(client):
    r = client.get("/api/colormaps/NoSuchMap.png")
    assert r.status_code == 404 and r.json["error"]["code"] == "not_found" and r.json["error"]["field"] == "cmap"
