"""Image helpers: decoding and validation, conversion to RGB, preprocessing, map codec (overlays: test_overlay.py)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from insights import imaging
from insights.models import Preprocessing


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def rgb(w=8, h=6, color=(10, 200, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), color)


# --------------------------------------------------------------------------- decoding


NOISY_JPEG = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")


@pytest.mark.parametrize("data, name, code, words", [
    (b"", "a.png", "bad_image", "empty"),
    (b"GIF89a but not really", "a.gif", "bad_image", "not an image"),
    (NOISY_JPEG[: len(NOISY_JPEG) // 2], "a.jpg", "bad_image", "truncated"),
    (encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))[:400],
     "a.png", "bad_image", "truncated"),
    (encode(rgb(), "PNG"), "a.jpeg", "bad_image", "does not match its content (PNG)"),
    (encode(rgb(), "JPEG"), "a.png", "bad_image", "does not match its content (JPEG)"),
    (encode(rgb(), "PNG"), "a.svg", "bad_image", "unsupported file extension '.svg'"),
    (encode(rgb(100, 100)), "a.png", "too_large", "100×100 = 10000 pixels"),
], ids=["empty", "not-an-image", "truncated-jpeg", "truncated-png", "png-as-jpeg", "jpeg-as-png", "svg", "pixels"])
def test_decode_refuses_bad_files(data, name, code, words):
    with pytest.raises(imaging.ImageError) as info:
        imaging.decode(data, name, max_pixels=9999)
    assert info.value.code == code and info.value.field == "image"
    assert words in info.value.message


def test_decode_without_extension_trusts_content():
    img = imaging.decode(encode(rgb(), "BMP"), None)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (10, 200, 30)


def test_decode_bomb_beyond_pillows_own_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(imaging.ImageError) as info:
        imaging.decode(encode(rgb(30, 30)), "a.png", max_pixels=10**9)
    assert info.value.code == "too_large" and "too large to decode safely" in info.value.message


@pytest.mark.parametrize("make, expected", [
    (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),  # cyan 0, magenta+yellow → red
    (lambda: Image.new("L", (4, 4), 77), (77, 77, 77)),
    (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
    (lambda: Image.fromarray(np.full((4, 4), 257 * 100, np.uint16)), (100, 100, 100)),  # I;16
    (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),  # transparent → white
    (lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127)),  # half black over white
    (lambda: Image.new("LA", (4, 4), (0, 255)), (0, 0, 0)),
])
def test_conversions_to_rgb(make, expected):
    img = imaging.decode(encode(make(), "TIFF" if make().mode == "CMYK" else "PNG"), None)
    assert img.mode == "RGB"
    assert np.abs(np.asarray(img).astype(int) - expected).max() <= 1


def test_palette_with_transparency_composites_on_white():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.info["transparency"] = 1
    img = imaging.decode(encode(p, "PNG", transparency=1), "p.png")
    assert img.getpixel((0, 0)) == (255, 255, 255)
    p2 = Image.new("P", (4, 4), 1)
    p2.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    assert imaging.decode(encode(p2, "GIF"), "p.gif").getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied():
    base = Image.new("RGB", (40, 20), (255, 0, 0))
    base.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    img = imaging.decode(encode(base, "JPEG", exif=exif, quality=95), "a.jpg")
    assert img.size == (20, 40)
    top = np.asarray(img)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top


def test_image_id_depends_on_pixels_and_size_only():
    a = imaging.decode(encode(rgb(), "PNG"), "a.png")
    b = imaging.decode(encode(rgb(), "BMP"), "b.bmp")
    assert imaging.image_id(a) == imaging.image_id(b)
    assert imaging.image_id(a) != imaging.image_id(rgb(6, 8))
    assert imaging.image_id(a) != imaging.image_id(rgb(color=(10, 200, 31)))


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_resizes_crops_and_normalises():
    img = Image.new("RGB", (100, 50), (51, 102, 153))
    img.paste((0, 0, 0), (0, 0, 10, 50))  # a black strip that the centre crop must cut away
    prep = Preprocessing(resize=20, crop=16, mean=(0.2, 0.4, 0.6), std=(0.5, 0.5, 0.5))
    x, view = imaging.preprocess(img, prep)
    assert tuple(x.shape) == (1, 3, 16, 16) and view.size == (16, 16)
    assert torch.allclose(x[0, :, 8, 8], torch.tensor([0.0, 0.0, 0.0]), atol=1e-6)
    assert np.asarray(view)[8, 8].tolist() == [51, 102, 153]


# --------------------------------------------------------------------------- map codec


def test_encode_unsigned_map():
    attr = np.zeros((3, 2, 4))
    attr[0, 0, 0], attr[1, 0, 1], attr[2, 1, 3] = 3.0, 1.5, -1.0
    png, enc = imaging.encode_map(attr, signed=False)
    assert enc["zero"] == 0 and enc["scale"] == 3.0 and (enc["min"], enc["max"]) == (-1.0, 3.0)
    px = np.asarray(Image.open(io.BytesIO(png)))
    assert px.tolist() == [[255, 128, 0, 0], [0, 0, 0, 0]]  # 1.5 → 127.5 rounds to 128; −1 clips to 0


def test_encode_signed_map_and_roundtrip():
    m = np.array([[2.0, -1.0], [0.0, -2.0]])
    png, enc = imaging.encode_map(torch.tensor(m)[None, None], signed=True)
    assert enc == {"zero": 128, "scale": 2.0, "min": -2.0, "max": 2.0}
    assert np.asarray(Image.open(io.BytesIO(png))).tolist() == [[255, 64], [128, 1]]
    back = imaging.decode_map(png, enc)
    assert np.abs(back - m).max() <= 2.0 / 127


def test_encode_all_zero_map():
    _png, enc = imaging.encode_map(np.zeros((1, 4, 4)), signed=True)
    assert enc["scale"] == 0 and imaging.decode_map(_png, enc).tolist() == np.zeros((4, 4)).tolist()
