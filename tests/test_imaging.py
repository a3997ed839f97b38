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


# --------------------------------------------------------------------------- bounded memory: aspect, reduction, depth


def header_only(img: Image.Image, fmt: str = "PNG", keep: int = 60) -> bytes:
    """The first ``keep`` bytes of the file: its header (size, mode) and no usable pixels."""
    return encode(img, fmt)[:keep]


@pytest.mark.parametrize("size, words", [((40000, 1), "40000×1, an aspect ratio of 40,000:1"),
                                         ((1, 10000), "1×10000, an aspect ratio of 10,000:1"),
                                         ((1700, 100), "1700×100, an aspect ratio of 17:1")])
def test_extreme_aspect_ratios_are_refused_from_the_header(size, words):
    # Only the header is there: a decoder that got as far as the pixels would call it truncated.
    with pytest.raises(imaging.ImageError) as info:
        imaging.decode(header_only(Image.new("RGB", size)), "wide.png", max_pixels=10**9, max_aspect=16)
    assert info.value.code == "bad_image" and info.value.status == 400
    assert words in info.value.message and "limit of 16:1 (MAX_ASPECT_RATIO)" in info.value.message


def test_the_aspect_limit_is_a_setting():
    img = imaging.decode(encode(rgb(1600, 100)), "a.png", max_aspect=16)
    assert img.size == (1600, 100)
    with pytest.raises(imaging.ImageError, match="16:1, more than the limit of 8:1"):
        imaging.decode(encode(rgb(1600, 100)), "a.png", max_aspect=8)


def test_huge_canvas_in_a_tiny_file_is_refused_before_decoding():
    data = header_only(Image.new("L", (9000, 9000)))  # 81 MP declared in 60 bytes
    with pytest.raises(imaging.ImageError) as info:
        imaging.decode(data, "bomb.png", max_pixels=40_000_000)
    assert info.value.code == "too_large" and "9000×9000 = 81000000 pixels" in info.value.message


def test_source_format_is_recorded(tmp_path):
    for fmt, name in [("PNG", "a.png"), ("JPEG", "a.jpg"), ("GIF", "a.gif"), ("BMP", "a.bmp"),
                      ("TIFF", "a.tif"), ("WEBP", "a.webp")]:
        img = imaging.decode(encode(rgb(64, 48), fmt), name)
        assert img.info == {"source_format": fmt}
    big = imaging.decode(encode(rgb(300, 200), "JPEG"), None, max_side=100)
    assert big.size == (100, 67) and big.info == {"source_format": "JPEG"}  # reduced, still recorded


def quadrants(w: int, h: int, mode: str = "RGB") -> Image.Image:
    """Four flat quadrants: red, green / blue, white."""
    img = Image.new("RGB", (w, h), (255, 0, 0))
    img.paste((0, 255, 0), (w // 2, 0, w, h // 2))
    img.paste((0, 0, 255), (0, h // 2, w // 2, h))
    img.paste((255, 255, 255), (w // 2, h // 2, w, h))
    return img.convert(mode) if mode != "RGB" else img


def quadrant_colours(img: Image.Image) -> list[tuple[int, ...]]:
    w, h = img.size
    return [img.getpixel((x, y)) for x, y in [(w // 4, h // 4), (3 * w // 4, h // 4),
                                              (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4)]]


@pytest.mark.parametrize("fmt, name", [("PNG", "a.png"), ("JPEG", "a.jpg"), ("BMP", "a.bmp"),
                                       ("GIF", "a.gif"), ("TIFF", "a.tif"), ("WEBP", "a.webp")])
def test_large_images_are_reduced_to_the_longest_side(fmt, name):
    img = imaging.decode(encode(quadrants(1000, 600), fmt), name, max_side=256)
    assert img.size == (256, 154) and img.mode == "RGB"
    want = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    tolerance = 40 if fmt in ("JPEG", "WEBP") else 1  # lossy formats smear colours a little
    for got, expected in zip(quadrant_colours(img), want):
        assert max(abs(a - b) for a, b in zip(got, expected)) <= tolerance, (got, expected)


def test_a_multi_picture_jpeg_is_a_jpeg():
    # MPO: what some cameras and phones write for stereo or depth photos, named .jpg.
    first, second = Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (300, 200), (30, 200, 30))
    img = imaging.decode(encode(first, "MPO", save_all=True, append_images=[second]), "photo.jpg", max_side=100)
    assert img.size == (100, 67) and img.info == {"source_format": "JPEG"}
    assert max(abs(a - b) for a, b in zip(img.getpixel((50, 33)), (200, 30, 30))) <= 8


def test_a_jpeg_is_decoded_at_a_reduced_scale(monkeypatch):
    from PIL import JpegImagePlugin

    decoded = []
    load = JpegImagePlugin.JpegImageFile.load
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", lambda self: decoded.append(self.size) or load(self))
    img = imaging.decode(encode(quadrants(4000, 3000), "JPEG"), "a.jpg", max_side=512)
    # 1/4 scale (1000×750) is the smallest that keeps the longer side at 512 or more; the
    # 48 MB canvas is never made.
    assert decoded[0] == (1000, 750) and img.size == (512, 384)
    assert max(abs(a - b) for a, b in zip(quadrant_colours(img)[0], (255, 0, 0))) <= 8


def whole(img: Image.Image, factor: int, size: tuple[int, int]) -> np.ndarray:
    """The same reduction made on the whole image converted at once (what the bands avoid)."""
    full = imaging.to_rgb(img).reduce(factor)
    return np.asarray(full.resize(size, Image.Resampling.LANCZOS), dtype=int)


@pytest.mark.parametrize("make", [
    lambda: Image.fromarray((np.add.outer(np.arange(300), np.arange(200)).T * 100).astype(np.uint16)),  # I;16
    lambda: Image.fromarray(np.add.outer(np.arange(200), np.arange(300)).astype(np.float32) / 500),  # F, 0–1
    lambda: Image.fromarray(np.add.outer(np.arange(200), np.arange(300)).astype(np.int32) * 200),  # I, up to 99800
    lambda: quadrants(300, 200, "P"),
    lambda: quadrants(300, 200, "CMYK"),
    lambda: quadrants(300, 200, "RGBA"),
], ids=["I;16", "F", "I", "P", "CMYK", "RGBA"])
def test_reduction_by_bands_matches_converting_the_whole_image(make, monkeypatch):
    # Bands of 4096 pixels (13 rows of 300, rounded to whole 4×4 blocks): no band, and so no
    # float copy, is larger, and the last band is a partial one.
    sizes = []
    to_8bit = imaging._to_8bit
    monkeypatch.setattr(imaging, "BAND_PIXELS", 4096)
    monkeypatch.setattr(imaging, "_to_8bit", lambda band, scale: sizes.append(band.size) or to_8bit(band, scale))
    img = make()
    out = imaging.to_rgb(img, max_side=64)
    assert out.size == (64, 43) and out.mode == "RGB"
    assert max(w * h for w, h in sizes) <= 4096 and sum(h for _w, h in sizes) == 200
    assert np.abs(np.asarray(out, dtype=int) - whole(img, 4, (64, 43))).max() <= 1


def test_a_16_bit_picture_of_16_megapixels_is_reduced_exactly(monkeypatch):
    # The case: a small file of a large 16-bit canvas (it used to take a float64 copy).
    a = (np.add.outer(np.arange(4000), np.arange(4000)) * 8).astype(np.uint16)
    data = encode(Image.fromarray(a))
    assert len(data) < 200_000
    img = imaging.decode(data, "deep.png", max_side=2048)
    assert img.size == (2048, 2048) and img.info == {"source_format": "PNG"}
    expected = Image.fromarray(np.round(a / 257).astype(np.uint8)).resize((2048, 2048), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(img)[..., 0].astype(int) - np.asarray(expected, dtype=int)).max() <= 1


@pytest.mark.parametrize("values, mode, expected", [
    ([0.0, 0.5, 1.0, np.nan], "F", [0, 128, 255, 0]),  # floats up to 1 are × 255, NaN → 0
    ([0.0, 100.0, 255.0, np.nan], "F", [0, 100, 255, 0]),  # up to 255: kept
    ([0, 1000, 70000, -5], "I", [0, 4, 255, 0]),  # beyond 65535: the largest is 255
    ([0, 257 * 10, 65535, 300], "I", [0, 10, 255, 1]),  # 16-bit samples in 32 bits: / 257
])
def test_deep_samples_are_scaled_as_before(values, mode, expected):
    arr = np.array([values], dtype=np.float32 if mode == "F" else np.int32)
    img = imaging.to_rgb(Image.fromarray(arr, mode))
    assert np.asarray(img)[0, :, 0].tolist() == expected


def test_exif_orientation_survives_reduction():
    base = Image.new("RGB", (2000, 1000), (255, 0, 0))
    base.paste((0, 0, 255), (0, 0, 1000, 1000))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    img = imaging.decode(encode(base, "JPEG", exif=exif, quality=95), "a.jpg", max_side=300)
    assert img.size == (150, 300)
    assert img.getpixel((75, 20))[2] > 200 and img.getpixel((75, 280))[0] > 200  # blue on top, red below


def test_to_rgb_leaves_the_callers_image_alone():
    mine = rgb(40, 30)
    out = imaging.to_rgb(mine, max_side=20)
    assert out is not mine and mine.size == (40, 30) and out.size == (20, 15)
    assert imaging.to_rgb(mine) is not mine


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_resizes_crops_and_normalises():
    img = Image.new("RGB", (100, 50), (51, 102, 153))
    img.paste((0, 0, 0), (0, 0, 10, 50))  # a black strip that the centre crop must cut away
    prep = Preprocessing(resize=20, crop=16, mean=(0.2, 0.4, 0.6), std=(0.5, 0.5, 0.5))
    x, view = imaging.preprocess(img, prep)
    assert tuple(x.shape) == (1, 3, 16, 16) and view.size == (16, 16)
    assert torch.allclose(x[0, :, 8, 8], torch.tensor([0.0, 0.0, 0.0]), atol=1e-6)
    assert np.asarray(view)[8, 8].tolist() == [51, 102, 153]


def resized_sizes(monkeypatch) -> list[tuple[int, int]]:
    """Records the size of every image preprocess() resizes to."""
    from torchvision.transforms import functional as F

    sizes = []
    resize = F.resize

    def recorded(img, *args, **kwargs):
        out = resize(img, *args, **kwargs)
        sizes.append(out.size)
        return out

    monkeypatch.setattr(F, "resize", recorded)
    return sizes


def test_preprocess_of_the_longest_accepted_upload_stays_small(monkeypatch):
    sizes = resized_sizes(monkeypatch)
    img = imaging.decode(encode(rgb(25296, 1581)), "wide.png", max_pixels=40_000_000)  # 16:1, 40 MP
    assert img.size == (2048, 128)
    x, view = imaging.preprocess(img, Preprocessing(resize=256, crop=224))
    assert tuple(x.shape) == (1, 3, 224, 224) and view.size == (224, 224)
    assert sizes == [(4096, 256)]  # 16 × 256 by 256: 4 MB, however large the file was


def test_preprocess_cuts_the_centre_of_an_image_longer_than_any_upload(monkeypatch):
    # A 40000×1 image stored before MAX_ASPECT_RATIO existed: resizing its shorter side to 256
    # would make 10 million × 256 pixels. Only its centre reaches the crop, and only that is resized.
    sizes = resized_sizes(monkeypatch)
    line = Image.new("RGB", (40000, 1), (0, 0, 0))
    line.paste((200, 100, 50), (19000, 0, 21000, 1))
    x, view = imaging.preprocess(line, Preprocessing(resize=256, crop=224, mean=(0, 0, 0), std=(1, 1, 1)))
    assert tuple(x.shape) == (1, 3, 224, 224) and sizes == [(8192, 256)]  # (16 × 1 + 16) × 256
    assert np.asarray(view)[112, 112].tolist() == [200, 100, 50]


def test_preprocess_leaves_images_within_the_span_as_they_were():
    from torchvision.transforms import functional as F

    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 600, 3), dtype=np.uint8))  # 15:1
    prep = Preprocessing(resize=32, crop=24)
    x, _view = imaging.preprocess(img, prep)
    direct = F.normalize(F.to_tensor(F.center_crop(F.resize(img, 32, antialias=True), [24, 24])), prep.mean, prep.std)
    assert torch.equal(x[0], direct)


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


def test_torchvision_is_imported_by_create_app_not_by_import_or_the_first_prediction(tmp_path):
    """Found in review: preprocess imported torchvision on the first prediction (1.4 s of a 0.02 s
    predict on the tiny model). Importing it at module level would nearly double ``import insights``
    (1.3 → 2.5 s), so create_app warms it instead. A fresh process: conftest imports torchvision."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys\n"
        "import insights\n"
        "assert 'torchvision' not in sys.modules, 'import insights pulled torchvision in'\n"
        "from insights.app import create_app\n"
        f"config = {{'BUILTIN_MODELS': False, 'DEVICE': 'cpu', 'INSTANCE_PATH': {str(tmp_path)!r}, "
        f"'MODELS_CONFIG': {os.path.join(root, 'tests', 'tiny_models.py')!r}}}\n"
        "app = create_app(config)\n"
        "assert 'torchvision.transforms.functional' in sys.modules, 'create_app left torchvision out'\n"
        "app.extensions['insights'].jobs.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSIGHTS_")}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
