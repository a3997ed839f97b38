"""Hostile uploads through POST /api/images: truncated and lying files, random bytes, huge canvases
declared in tiny files, decompression bombs, extreme shapes, formats we do not take, requests
without the picture. Every refusal is a 4xx with the JSON error shape and a meaningful code,
writes nothing, and the server goes on serving; what is accepted is stored reduced to
UPLOAD_MAX_SIDE with its colours. Every file is made here, in code."""
from __future__ import annotations

import functools
import io
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from appkit import TINY_CONFIG, png, snapshot
from insights import create_app

FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
LIMITS = {"MAX_CONTENT_LENGTH": 200_000, "MAX_IMAGE_PIXELS": 250_000, "MAX_ASPECT_RATIO": 16,
          "UPLOAD_MAX_SIDE": 64, "RATE_LIMIT_PER_MIN": None}


@pytest.fixture
def app(tmp_path):
    """The test app with small limits: 200 kB bodies, 250 000 pixels, uploads reduced to 64 px."""
    app = create_app({"INSTANCE_PATH": str(tmp_path / "instance"), "BUILTIN_MODELS": False,
                      "MODELS_CONFIG": TINY_CONFIG, "DEVICE": "cpu", **LIMITS})
    yield app
    app.extensions["insights"].jobs.shutdown()


@pytest.fixture
def client(app):
    return app.test_client()


# --------------------------------------------------------------------------- files made in code


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


@functools.lru_cache(maxsize=None)
def noisy(fmt: str) -> bytes:
    """A 64×48 picture of noise (every byte of the data matters) in ``fmt``."""
    pixels = np.random.default_rng(7).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), fmt)


def chunk(kind: bytes, body: bytes) -> bytes:
    """A PNG chunk with its CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_file(width: int, height: int, depth: int = 8, colour: int = 0, data: bytes = b"\0",
             before_data: bytes = b"") -> bytes:
    """A PNG with any header: ``data`` is the raw (filtered) scanlines, compressed here."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + before_data + chunk(b"IDAT", zlib.compress(data, 9))
            + chunk(b"IEND", b""))


def png_of_zeros(width: int, height: int, depth: int = 8) -> bytes:
    """A valid PNG of ``width``×``height`` black pixels, compressed row block by row block."""
    row = b"\0" * (1 + (width * depth + 7) // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row * 500) for _ in range(height // 500)) + z.compress(row * (height % 500)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def gif_file(width: int, height: int, frame: int = 1) -> bytes:
    """A GIF whose logical screen is ``width``×``height``, holding one ``frame``×``frame`` frame."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, frame, frame, 0) + b"\x02\x02D\x01\x00"
    return screen + frame + b";"


def bmp_header(width: int, height: int, bpp: int = 24, compression: int = 0) -> bytes:
    """A BMP file header and info header with no pixel data after them."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bpp, compression, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + 16, 0, 0, 14 + len(info)) + info + b"\0" * 16


def tiff_file(width: int, height: int, compression: int = 1, data: bytes = b"\0" * 16,
              offset: int | None = None) -> bytes:
    """A little-endian 8-bit grayscale TIFF with one strip holding ``data``."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, compression), (262, 3, 1),
            (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, len(data))]
    ifd_size = 2 + 12 * len(tags) + 4
    strip = 8 + ifd_size if offset is None else offset
    tags[5] = (273, 4, strip)
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, kind, 1, v) for t, kind, v in tags)
    return b"II*\0" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + data


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small baseline JPEG whose frame header claims ``width``×``height``."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 120, 30)), "JPEG"))
    at = data.index(b"\xff\xc0")
    data[at + 5: at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_canvas(width: int, height: int) -> bytes:
    """A WebP extended header (VP8X) announcing a canvas, with no image in it."""
    body = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little") + \
        (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def flat(size: tuple[int, int], fmt: str) -> bytes:
    """A grey picture of ``size`` in ``fmt``."""
    return encode(Image.new("RGB", size, (120, 120, 120)), fmt)


# --------------------------------------------------------------------------- the refusals


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], bytes]  # the file, or the raw body when content_type is set
    filename: str | None = "x.png"
    status: int = 400
    code: str = "bad_image"
    words: tuple[str, ...] = ()  # the message holds one of these
    field: str = "image"  # the multipart field the file goes in
    content_type: str | None = None  # set: the body is sent raw with this type

    def send(self, client):
        if self.content_type is not None:
            return client.post("/api/images", data=self.make(), content_type=self.content_type)
        return client.post("/api/images", data={self.field: (io.BytesIO(self.make()), self.filename)},
                           content_type="multipart/form-data")


NOT_AN_IMAGE = "not an image in a supported format"
DAMAGED = "damaged or truncated"
TOO_MANY = "(MAX_IMAGE_PIXELS)"
TOO_WIDE = "(MAX_ASPECT_RATIO)"


def cuts(n: int) -> list[int]:
    return [1, 4, 8, 16, 30, n // 4, n // 2, 3 * n // 4, n - 64]


def refusals() -> list[Case]:
    cases: list[Case] = []
    add = cases.append

    # Truncated files of every format: the header cut short, or the pixel data.
    for fmt, ext in FORMATS.items():
        for keep in cuts(len(noisy(fmt))):
            add(Case(f"truncated-{fmt}-{keep}", lambda fmt=fmt, keep=keep: noisy(fmt)[:keep], "x" + ext,
                     words=(NOT_AN_IMAGE, DAMAGED)))

    # The extension says one format, the content is another.
    for fmt in FORMATS:
        for other, ext in FORMATS.items():
            if other != fmt:
                add(Case(f"{fmt}-named-{ext}", lambda fmt=fmt: noisy(fmt), "x" + ext,
                         words=(f"does not match its content ({fmt})",)))
    for ext in [".svg", ".exe", ".html", ".heic", ".ico", ".pdf", ".txt", ".png.exe", ".jp2", ".avif"]:
        add(Case(f"extension-{ext}", lambda: noisy("PNG"), "x" + ext, words=("unsupported file extension",)))

    # Nothing at all.
    for name in ["x.png", "x.jpg", "x.gif", "noextension"]:
        add(Case(f"empty-{name}", lambda: b"", name, words=("the file is empty",)))

    # Random bytes, bare or behind a format's magic number.
    for seed in range(12):
        length = int(np.random.default_rng(seed).integers(1, 5000))
        name = ["x.png", "x.jpg", "x.webp", "random"][seed % 4]
        add(Case(f"random-{seed}-{name}", lambda seed=seed, length=length:
                 np.random.default_rng(seed).bytes(length), name, words=(NOT_AN_IMAGE,)))
    magic = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff\xe0", "GIF": b"GIF89a", "BMP": b"BM",
             "TIFF": b"II*\0", "WEBP": b"RIFF\x10\0\0\0WEBPVP8 "}
    for fmt, head in magic.items():
        for seed in (1, 2):
            # A GIF's size is the four bytes after its magic: random ones declare billions of pixels.
            outcome = (413, "too_large", ("too large to decode safely",)) if fmt == "GIF" else \
                (400, "bad_image", (NOT_AN_IMAGE, DAMAGED))
            add(Case(f"magic-{fmt}-random-{seed}", lambda head=head, seed=seed:
                     head + np.random.default_rng(seed).bytes(600), "x" + FORMATS[fmt], *outcome))

    # Huge canvases declared in files of a few hundred bytes.
    for w, h in [(100_000, 100_000), (65_535, 65_535), (20_000, 20_000), (1_000, 1_000)]:
        add(Case(f"png-ihdr-{w}x{h}", lambda w=w, h=h: png_file(w, h), "x.png", 413, "too_large",
                 (TOO_MANY, "too large to decode safely")))
    for w, h in [(65_535, 65_535), (10_000, 10_000), (1_000, 1_000)]:
        add(Case(f"gif-screen-{w}x{h}", lambda w=w, h=h: gif_file(w, h), "x.gif", 413, "too_large",
                 (TOO_MANY, "too large to decode safely")))
    for w, h in [(100_000, 100_000), (30_000, 30_000), (1_000, 1_000), (30_000, -30_000)]:
        add(Case(f"bmp-header-{w}x{h}", lambda w=w, h=h: bmp_header(w, h), "x.bmp", 413, "too_large",
                 (TOO_MANY, "too large to decode safely")))
    for w, h in [(65_500, 65_500), (10_000, 10_000)]:
        add(Case(f"jpeg-sof-{w}x{h}", lambda w=w, h=h: jpeg_with_size(w, h), "x.jpg", 413, "too_large",
                 (TOO_MANY, "too large to decode safely")))
    for w, h in [(100_000, 100_000), (2_000, 2_000)]:
        add(Case(f"tiff-ifd-{w}x{h}", lambda w=w, h=h: tiff_file(w, h), "x.tif", 413, "too_large",
                 (TOO_MANY, "too large to decode safely")))
    add(Case("webp-vp8x-16383x16383", lambda: webp_canvas(16_383, 16_383), "x.webp", 413, "too_large",
             ("too large to decode safely",)))
    add(Case("webp-vp8x-1000x1000-no-image", lambda: webp_canvas(1_000, 1_000), "x.webp", words=(NOT_AN_IMAGE,)))

    # Decompression bombs: valid files whose pixels would take far more than their bytes.
    add(Case("bomb-png-10000x10000", lambda: png_of_zeros(10_000, 10_000), "x.png", 413, "too_large", (TOO_MANY,)))
    add(Case("bomb-png-1bit-30000x30000", lambda: png_of_zeros(30_000, 30_000, 1), "x.png", 413, "too_large",
             ("too large to decode safely", TOO_MANY)))
    add(Case("bomb-gif-3000x3000", lambda: encode(Image.new("P", (3000, 3000)), "GIF"), "x.gif", 413, "too_large",
             (TOO_MANY,)))
    add(Case("bomb-tiff-deflate", lambda: encode(Image.new("L", (6000, 6000)), "TIFF",
                                                 compression="tiff_adobe_deflate"), "x.tif", 413, "too_large", (TOO_MANY,)))
    add(Case("bomb-webp-2000x2000", lambda: encode(Image.new("RGB", (2000, 2000)), "WEBP", lossless=True), "x.webp",
             413, "too_large", (TOO_MANY,)))
    add(Case("bomb-jpeg-2000x2000", lambda: flat((2000, 2000), "JPEG"), "x.jpg", 413, "too_large", (TOO_MANY,)))
    text_bomb = chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"\0" * 50_000_000, 9))
    add(Case("bomb-png-ztxt-50MB", lambda: png_file(1, 1, before_data=text_bomb), "x.png", words=(NOT_AN_IMAGE,)))
    icc_bomb = chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * 50_000_000, 9))
    add(Case("bomb-png-iccp-50MB", lambda: png_file(1, 1, before_data=icc_bomb), "x.png", words=(NOT_AN_IMAGE,)))

    # Extreme aspect ratios in every format (all within the pixel limit).
    for fmt, ext in FORMATS.items():
        for w, h in [(10_000, 1), (1, 10_000), (17, 1), (1_000, 50)]:
            add(Case(f"aspect-{fmt}-{w}x{h}", lambda fmt=fmt, w=w, h=h: flat((w, h), fmt), "x" + ext,
                     words=(TOO_WIDE,)))
    for fmt, make in [("PNG", lambda: png_file(40_000, 1)), ("GIF", lambda: gif_file(40_000, 1)),
                      ("BMP", lambda: bmp_header(40_000, 1)), ("TIFF", lambda: tiff_file(1, 40_000))]:
        add(Case(f"aspect-header-only-{fmt}", make, "x" + FORMATS[fmt], words=(TOO_WIDE,)))

    # Formats Pillow reads but we do not take, with no extension and behind a .png name.
    others = {"PPM": "RGB", "PCX": "RGB", "TGA": "RGB", "ICO": "RGB", "SGI": "RGB", "QOI": "RGB", "XBM": "1",
              "PDF": "RGB", "MSP": "1", "DIB": "RGB", "EPS": "RGB", "PALM": "1", "DDS": "RGB", "ICNS": "RGB"}
    for fmt, mode in others.items():
        for name in ["upload", "x.png"]:
            add(Case(f"format-{fmt}-{name}", lambda fmt=fmt, mode=mode: encode(Image.new(mode, (32, 32)), fmt),
                     name, words=(NOT_AN_IMAGE,)))

    # Broken structures.
    bad_crc = bytearray(png_file(8, 8, data=b"\0" * 9 * 8))
    bad_crc[29] ^= 0xFF  # IHDR's CRC
    add(Case("png-bad-ihdr-crc", lambda: bytes(bad_crc), "x.png", words=(NOT_AN_IMAGE, DAMAGED)))
    add(Case("png-bit-depth-3", lambda: png_file(8, 8, depth=3), "x.png", words=(NOT_AN_IMAGE, DAMAGED)))
    add(Case("png-colour-type-5", lambda: png_file(8, 8, colour=5), "x.png", words=(NOT_AN_IMAGE, DAMAGED)))
    add(Case("png-width-0", lambda: png_file(0, 8), "x.png", words=(NOT_AN_IMAGE, DAMAGED, "no pixels")))
    add(Case("png-idat-too-short", lambda: png_file(64, 64, data=b"\0" * 100), "x.png", words=(DAMAGED,)))
    add(Case("png-16bit-gray-idat-too-short", lambda: png_file(64, 64, depth=16, data=b"\0" * (129 * 10 + 50)),
             "x.png", words=(DAMAGED,)))
    add(Case("png-16bit-rgb-truncated", lambda: png16_rgb()[:400], "x.png", words=(DAMAGED, NOT_AN_IMAGE)))
    add(Case("bmp-bpp-0", lambda: bmp_header(8, 8, bpp=0) + b"\0" * 256, "x.bmp", words=(NOT_AN_IMAGE, DAMAGED)))
    add(Case("bmp-bpp-7", lambda: bmp_header(8, 8, bpp=7) + b"\0" * 256, "x.bmp", words=(NOT_AN_IMAGE, DAMAGED)))
    add(Case("bmp-compression-99", lambda: bmp_header(8, 8, compression=99) + b"\0" * 256, "x.bmp",
             words=(NOT_AN_IMAGE, DAMAGED)))
    add(Case("bmp-no-pixels", lambda: bmp_header(64, 64), "x.bmp", words=(DAMAGED,)))
    add(Case("gif-screen-and-frame-0x0", lambda: gif_file(0, 0, frame=0), "x.gif",
             words=(NOT_AN_IMAGE, DAMAGED, "no pixels")))
    add(Case("jpeg-soi-eoi", lambda: b"\xff\xd8\xff\xd9", "x.jpg", words=(NOT_AN_IMAGE, DAMAGED)))
    add(Case("jpeg-no-scan", lambda: jpeg_with_size(16, 16)[:-300] + b"\xff\xd9", "x.jpg",
             words=(NOT_AN_IMAGE, DAMAGED)))
    add(Case("tiff-compression-12345", lambda: tiff_file(4, 4, compression=12345), "x.tif",
             words=(NOT_AN_IMAGE, DAMAGED)))
    add(Case("tiff-strip-beyond-eof", lambda: tiff_file(4, 4, offset=10_000), "x.tif", words=(NOT_AN_IMAGE, DAMAGED)))
    add(Case("webp-riff-size-lies", lambda: b"RIFF\xff\xff\xff\x7fWEBP" + noisy("WEBP")[12:200], "x.webp",
             words=(NOT_AN_IMAGE, DAMAGED)))

    # Requests without the picture where the API wants it.
    where = "multipart/form-data in the field 'image'"
    for field in ["file", "img", "images", "Image"]:
        add(Case(f"field-{field}", lambda: png(), code="bad_request", field=field, words=(where,)))
    for kind, body in [("application/json", b'{"image": "x"}'), ("image/png", png()), ("text/plain", b"hello"),
                       ("application/x-www-form-urlencoded", b"image=abc"), ("application/octet-stream", png()),
                       ("multipart/form-data", png()), ("multipart/form-data; boundary=zz", b"--zz\r\nbroken"),
                       ("multipart/form-data; boundary=zz", b"")]:
        add(Case(f"content-type-{kind}-{len(body)}", lambda body=body: body, code="bad_request",
                 content_type=kind, words=(where,)))
    add(Case("body-over-the-limit", lambda: np.random.default_rng(3).bytes(300_000), "x.png", 413, "too_large",
             ("MAX_CONTENT_LENGTH",)))
    for name in ["../../etc/passwd", "..\\..\\x.png", "CON.png", "a" * 3000 + ".png", "x.png\u202egpj.exe"]:
        add(Case(f"filename-{name[:20]}", lambda: np.random.default_rng(5).bytes(300), name,
                 words=(NOT_AN_IMAGE, "unsupported file extension")))
    return cases


REFUSALS = refusals()


def check_refusal(client, case: Case, instance: str) -> None:
    before = snapshot(instance)
    r = case.send(client)
    assert 400 <= r.status_code < 500 and r.status_code == case.status, (case.id, r.status_code, r.data[:300])
    assert r.is_json and set(r.json) == {"error"}, case.id
    error = r.json["error"]
    assert set(error) >= {"code", "message", "field"} and error["code"] == case.code, (case.id, error)
    assert error["field"] == "image", (case.id, error)
    assert any(w in error["message"] for w in case.words), (case.id, error["message"])
    assert snapshot(instance) == before, f"{case.id} wrote to the instance folder"


def test_there_are_at_least_200_hostile_uploads():
    assert len(REFUSALS) >= 200
    assert len({c.id for c in REFUSALS}) == len(REFUSALS)


@pytest.mark.parametrize("case", REFUSALS, ids=[c.id for c in REFUSALS])
def test_hostile_upload_is_refused_and_writes_nothing(app, client, case):
    check_refusal(client, case, app.instance_path)
    assert client.get("/api/models").status_code == 200  # still serving


def test_one_server_refuses_them_all_in_a_row_and_then_takes_a_picture(app, client):
    for case in REFUSALS:
        check_refusal(client, case, app.instance_path)
    r = client.post("/api/images", data={"image": (io.BytesIO(png()), "ok.png")}, content_type="multipart/form-data")
    assert r.status_code == 201 and (r.json["width"], r.json["height"]) == (48, 40)
    assert client.post("/api/predict", json={"image": r.json["id"], "model": "tiny"}).status_code == 200


# --------------------------------------------------------------------------- what is taken, and how


def stored(client, r) -> Image.Image:
    """The stored picture of an accepted upload, checked against the answer's size."""
    assert r.status_code == 201, r.data[:300]
    got = client.get(r.json["url"])
    assert got.status_code == 200
    img = Image.open(io.BytesIO(got.data))
    assert img.size == (r.json["width"], r.json["height"])
    return img.convert("RGB")


def near(pixel, colour, tolerance: int = 2) -> bool:
    return max(abs(a - b) for a, b in zip(pixel, colour)) <= tolerance


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (80, 60), c) for c in [(220, 20, 20), (20, 220, 20), (20, 20, 220)]]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def png16_rgb() -> bytes:
    """A 48-bit RGB PNG (Pillow cannot write one): R full, G half, B none."""
    row = b"\0" + struct.pack(">HHH", 65535, 32768, 0) * 300
    return png_file(300, 200, depth=16, colour=2, data=row * 200)


def palette_with_transparency() -> bytes:
    p = Image.new("P", (300, 200), 1)
    p.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    p.paste(0, (0, 0, 150, 200))  # left half: index 0, transparent
    return encode(p, "PNG", transparency=0)


def exif_rotated() -> bytes:
    base = Image.new("RGB", (400, 200), (230, 10, 10))
    base.paste((10, 10, 230), (0, 0, 200, 200))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90° clockwise to show
    return encode(base, "JPEG", exif=exif, quality=95)


ACCEPTED = [
    # id, file, name, stored size, [(point, colour, tolerance)]
    ("png-16bit-gray", lambda: encode(Image.fromarray(np.full((200, 300), 257 * 100, np.uint16)), "PNG"), "x.png",
     (64, 43), [((32, 21), (100, 100, 100), 1)]),
    ("png-16bit-rgb", png16_rgb, "x.png", (64, 43), [((32, 21), (255, 128, 0), 1)]),
    ("gif-animated", lambda: animated("GIF"), "x.gif", (64, 48), [((32, 24), (220, 20, 20), 12)]),
    ("png-animated", lambda: animated("PNG"), "x.png", (64, 48), [((32, 24), (220, 20, 20), 1)]),
    ("webp-animated", lambda: animated("WEBP"), "x.webp", (64, 48), [((32, 24), (220, 20, 20), 12)]),
    ("jpeg-cmyk", lambda: encode(Image.new("CMYK", (300, 200), (0, 255, 255, 0)), "JPEG"), "x.jpg", (64, 43),
     [((32, 21), (255, 0, 0), 12)]),
    ("png-palette-transparent", palette_with_transparency, "x.png", (64, 43),
     [((10, 21), (255, 255, 255), 1), ((54, 21), (200, 30, 30), 1)]),
    ("jpeg-exif-rotated", exif_rotated, "x.jpg", (32, 64),
     [((16, 10), (10, 10, 230), 20), ((16, 54), (230, 10, 10), 20)]),
    ("png-gray-alpha", lambda: encode(Image.new("LA", (300, 200), (0, 128)), "PNG"), "x.png", (64, 43),
     [((32, 21), (127, 127, 127), 1)]),
    ("tiff-float", lambda: encode(Image.fromarray(np.full((150, 200), 0.5, np.float32)), "TIFF"), "x.tif", (64, 48),
     [((32, 24), (128, 128, 128), 1)]),
    ("png-largest-canvas", lambda: encode(Image.new("RGB", (600, 400), (10, 150, 90)), "PNG"), "x.png", (64, 43),
     [((32, 21), (10, 150, 90), 1)]),
    ("jpeg-widest-accepted", lambda: flat((1600, 100), "JPEG"), "x.jpg", (64, 4), [((32, 2), (120, 120, 120), 3)]),
    ("jpeg-multi-picture", lambda: encode(Image.new("RGB", (300, 200), (200, 30, 30)), "MPO", save_all=True,
                                          append_images=[Image.new("RGB", (300, 200), (30, 200, 30))]),
     "x.jpg", (64, 43), [((32, 21), (200, 30, 30), 8)]),
    # A stream that ends cleanly after whole rows: Pillow's decoder takes it as the end of the
    # image and leaves the rows it did not get black. Odd, but not dangerous: stored as decoded.
    ("png-16bit-stream-ends-early", lambda: png_file(64, 64, depth=16, data=(b"\0" + b"\xff\xff" * 64) * 10),
     "x.png", (64, 64), [((32, 5), (255, 255, 255), 0), ((32, 40), (0, 0, 0), 0)]),
    ("png-trailing-garbage", lambda: png() + b"garbage" * 50, "x.png", (48, 40), [((5, 5), (200, 30, 30), 0)]),
]


@pytest.mark.parametrize("name, make, filename, size, colours", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_accepted_uploads_are_stored_reduced_with_their_colours(app, client, name, make, filename, size, colours):
    before = snapshot(app.instance_path)
    r = client.post("/api/images", data={"image": (io.BytesIO(make()), filename)}, content_type="multipart/form-data")
    img = stored(client, r)
    assert img.size == size
    for point, colour, tolerance in colours:
        assert near(img.getpixel(point), colour, tolerance), (point, img.getpixel(point), colour)
    written = set(snapshot(app.instance_path)) - set(before)
    assert len([p for p in written if p.startswith("images")]) == 1, written  # the picture, once


def test_a_jpeg_upload_is_stored_as_a_jpeg_and_a_png_as_a_png(client):
    jpeg = client.post("/api/images", data={"image": (io.BytesIO(flat((600, 400), "JPEG")), "x.jpg")},
                       content_type="multipart/form-data")
    assert client.get(jpeg.json["url"]).mimetype == "image/jpeg"
    deep = client.post("/api/images", data={"image": (io.BytesIO(png16_rgb()), "x.png")},
                       content_type="multipart/form-data")
    assert client.get(deep.json["url"]).mimetype == "image/png"
