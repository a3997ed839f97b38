"""Pure image helpers: decode and validate uploads, preprocess for a model, and encode attribution
maps as 8-bit PNGs (overlays of those maps: :mod:`insights.overlay`).

Nothing here keeps state; every function takes what it needs and returns a new value.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from .engine.errors import shown

# Image formats we accept, and the file extensions that may carry each.
FORMATS = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "WEBP": (".webp",),
    "GIF": (".gif",),
    "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"),
}
EXTENSIONS = {ext: fmt for fmt, exts in FORMATS.items() for ext in exts}

class ImageError(ValueError):
    """An upload that is not a usable image; ``code`` is ``bad_image`` or ``too_large``."""

    def __init__(self, message: str, code: str = "bad_image", field: str = "image"):
        super().__init__(message)
        self.message = message
        self.code = code
        self.field = field
        self.status = 413 if code == "too_large" else 400  # the HTTP answer (insights.errors)


# --------------------------------------------------------------------------- decoding

DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits a sample
BAND_PIXELS = 1 << 20  # pixels converted at a time: a band's float copy is at most 8 MB
# EXIF orientation → the transposition that shows the picture upright (as ImageOps.exif_transpose).
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def decode(data: bytes, filename: str | None = None, max_pixels: int = 40_000_000,
           max_aspect: float = 16, max_side: int = 2048) -> Image.Image:
    """Validates an uploaded file and returns it as an RGB image at most ``max_side`` pixels on
    its longer side (EXIF orientation applied, transparency composited on white, 16-bit and CMYK
    converted), with ``info["source_format"]`` naming the file's format ("JPEG", "PNG", ...).

    Size, pixel count and aspect ratio are checked from the header, before any pixel is decoded.
    A JPEG is decoded at a reduced scale (``Image.draft``); other formats are decoded whole and
    reduced band by band (:func:`to_rgb`), so no full-size copy is made beyond the decoded file.
    Raises :class:`ImageError`."""
    if not data:
        raise ImageError("the file is empty")
    ext = os.path.splitext(filename or "")[1].lower()
    if ext and ext not in EXTENSIONS:
        raise ImageError(f"unsupported file extension {shown(ext)}; accepted: {', '.join(sorted(EXTENSIONS))}")
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; Pillow's own bomb check stays active for
            # files beyond twice its global limit (DecompressionBombError, caught here).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError as err:
        raise ImageError(f"the image is too large to decode safely ({err})", code="too_large") from None
    except Exception:
        raise ImageError("the file is not an image in a supported format "
                         f"({', '.join(f.lower() for f in FORMATS)})") from None
    # A multi-picture JPEG (MPO: stereo and depth photos from some cameras and phones) is a
    # JPEG whose first picture is the photo.
    source_format = "JPEG" if img.format == "MPO" else img.format
    if ext and EXTENSIONS[ext] != source_format:
        raise ImageError(f"the file extension {shown(ext)} does not match its content ({source_format})")
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError("the image has no pixels")
    if width * height > max_pixels:
        raise ImageError(f"the image has {width}×{height} = {width * height} pixels, more than the "
                         f"limit of {max_pixels} (MAX_IMAGE_PIXELS)", code="too_large")
    longer, shorter = max(width, height), min(width, height)
    if longer > max_aspect * shorter:
        ratio = longer / shorter
        raise ImageError(f"the image is {width}×{height}, an aspect ratio of "
                         f"{f'{ratio:,.0f}' if ratio >= 100 else f'{ratio:.3g}'}:1, "
                         f"more than the limit of {max_aspect:g}:1 (MAX_ASPECT_RATIO)")
    if source_format == "JPEG" and longer > max_side:
        # The decoder scales by 1/2, 1/4 or 1/8 as it goes, keeping the longer side >= max_side.
        img.draft(None, (math.ceil(width * max_side / longer), math.ceil(height * max_side / longer)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.seek(0)  # the first frame of an animation
            img.load()
    except Exception as err:
        raise ImageError(f"the image data is damaged or truncated ({err})") from None
    try:
        out = to_rgb(img, max_side)
    except Exception as err:
        raise ImageError(f"the image could not be converted to RGB ({err})") from None
    out.info = {"source_format": source_format}  # metadata (EXIF, profiles) is not carried over
    return out


def to_rgb(img: Image.Image, max_side: int | None = None) -> Image.Image:
    """Any Pillow image → 8-bit RGB, upright, with transparency composited on white; with
    ``max_side``, reduced so that its longer side is at most that many pixels.

    The conversion runs on bands of rows, and each band is reduced by a whole factor (the mean
    of each f×f block) as soon as it is converted, so a large or 16-bit image never has a
    full-size converted (or float) copy; a final Lanczos resize takes it the rest of the way."""
    orientation = ORIENTATIONS.get(img.getexif().get(0x0112, 1))
    width, height = img.size
    factor = max(1, max(width, height) // max_side) if max_side else 1
    scale = _deep_scale(img, width) if img.mode in DEEP_MODES else None
    gray = img.mode in DEEP_MODES + ("1", "L")
    rows = max(1, BAND_PIXELS // width // factor) * factor  # a whole number of blocks
    if factor == 1 and (rows >= height or img.mode in ("L", "RGB")):
        out = _to_8bit(img, scale)  # a small image, or one that needs no conversion
    else:
        out = Image.new("L" if gray else "RGB", (math.ceil(width / factor), math.ceil(height / factor)))
        for top in range(0, height, rows):
            band = _to_8bit(img.crop((0, top, width, min(height, top + rows))), scale)
            out.paste(band.reduce(factor) if factor > 1 else band, (0, top // factor))
    if max_side and max(width, height) > max_side:
        shrink = max_side / max(width, height)  # of the image as given: a block's rounding is not kept
        out = out.resize((max(1, round(width * shrink)), max(1, round(height * shrink))),
                         Image.Resampling.LANCZOS)
    if out.mode != "RGB":
        out = out.convert("RGB")
    elif out is img:
        out = img.copy()  # a plain image of our own, whatever the caller does with theirs
    return out.transpose(orientation) if orientation is not None else out


def _deep_scale(img: Image.Image, width: int) -> float:
    """The factor that takes a 16- or 32-bit image's samples to 0–255: 1/257 for 16-bit
    samples; for 32-bit integers or floats it depends on the largest sample (NaN ignored),
    found band by band: floats up to 1 are × 255, values up to 255 kept, up to 65535 / 257,
    larger ones scaled so that the largest is 255."""
    if img.mode.startswith("I;16"):
        return 1 / 257
    rows = max(1, BAND_PIXELS // width)
    top = np.nan
    for y in range(0, img.height, rows):
        band = np.asarray(img.crop((0, y, width, min(img.height, y + rows))))
        top = np.fmax(top, np.fmax.reduce(band, axis=None))  # NaN only when every sample is NaN
    if img.mode == "F" and top <= 1.0:
        return 255.0
    if top > 255:
        return 1 / 257 if top <= 65535 else 255.0 / top
    return 1.0


def _to_8bit(img: Image.Image, scale: float | None) -> Image.Image:
    """A band of any mode → "L" (deep and 1-bit gray) or "RGB", transparency on white."""
    mode = img.mode
    if mode in DEEP_MODES:
        arr = np.asarray(img).astype(np.float64) * scale
        return Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8), "L")
    if mode == "1":
        return img.convert("L")
    if mode in ("L", "RGB"):
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    elif mode != "RGBA":
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img).convert("RGB")
    return img


def image_id(img: Image.Image) -> str:
    """SHA-256 of the RGB pixels and size: the same picture always has the same id."""
    h = hashlib.sha256(f"{img.width}x{img.height}:".encode())
    h.update(np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8)).tobytes())
    return h.hexdigest()


def png_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


# --------------------------------------------------------------------------- preprocessing


PREPROCESS_SPAN = 16  # longer sides beyond 16× the shorter (+16 px) are cut before resizing


def centre_span(img: Image.Image, span: int) -> Image.Image:
    """The image, or its centre where the longer side is more than ``span`` times the shorter
    (plus 16 pixels). Only the centre of a long image survives a centre crop, and cutting it out
    first keeps resizing the shorter side from making a huge intermediate: a 40000×1 picture
    would become 10 million × 256 pixels (10 GB). Uploads are never that long (MAX_ASPECT_RATIO)."""
    width, height = img.size
    keep = span * min(width, height) + 16
    if width > keep:
        left = (width - keep) // 2
        return img.crop((left, 0, left + keep, height))
    if height > keep:
        top = (height - keep) // 2
        return img.crop((0, top, width, top + keep))
    return img


def warm() -> None:
    """Imports torchvision's transforms, which :func:`preprocess` needs: importing torchvision
    takes 1.2–2.5 s, which ``import insights`` does not pay (it would nearly double), so the
    app pays it at start-up (``create_app``) instead of its first prediction."""
    import torchvision.transforms.functional  # noqa: F401


def preprocess(img: Image.Image, prep) -> tuple[torch.Tensor, Image.Image]:
    """Resize the shorter side, centre-crop and normalise (``prep`` is a models.Preprocessing).
    Returns the 1×C×H×W tensor and the cropped RGB view the model sees."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    img = centre_span(img, PREPROCESS_SPAN)
    view = F.center_crop(F.resize(img, prep.resize, interpolation=InterpolationMode(prep.interpolation),
                                  antialias=True), [prep.crop, prep.crop])
    x = F.to_tensor(view)
    if x.shape[0] != len(prep.mean):
        x = x[: len(prep.mean)] if x.shape[0] > len(prep.mean) else x.expand(len(prep.mean), -1, -1)
    x = F.normalize(x, prep.mean, prep.std)
    return x.unsqueeze(0), view


# --------------------------------------------------------------------------- map encoding


def channel_sum(attr: Any) -> np.ndarray:
    """An attribution of one image (C×H×W, 1×C×H×W or H×W) summed over channels → H×W float64."""
    a = attr.detach().cpu().numpy() if isinstance(attr, torch.Tensor) else np.asarray(attr)
    a = a.astype(np.float64)
    if a.ndim == 4:
        a = a[0]
    if a.ndim == 3:
        a = a.sum(axis=0)
    if a.ndim != 2:
        raise ValueError(f"expected an H×W, C×H×W or 1×C×H×W map; got shape {a.shape}")
    return np.nan_to_num(a)


def encode_map(attr: Any, signed: bool) -> tuple[bytes, dict]:
    """The channel-summed map as an 8-bit grayscale PNG. Signed maps put zero at 128 and
    ``scale`` = max |v| at 1 and 255; unsigned maps put zero at 0 and ``scale`` = max at 255.
    Returns the PNG and ``{"zero", "scale", "min", "max"}``."""
    m = channel_sum(attr)
    lo, hi = (float(m.min()), float(m.max())) if m.size else (0.0, 0.0)
    if signed:
        scale = float(np.abs(m).max()) if m.size else 0.0
        pixels = 128 + np.round(m / scale * 127) if scale > 0 else np.full(m.shape, 128.0)
        zero = 128
    else:
        scale = max(hi, 0.0)
        pixels = np.round(np.clip(m, 0, None) / scale * 255) if scale > 0 else np.zeros(m.shape)
        zero = 0
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
    return png_bytes(img), {"zero": zero, "scale": scale, "min": lo, "max": hi}


def decode_map(png: bytes, encoding: dict) -> np.ndarray:
    """Inverse of :func:`encode_map` (up to 8-bit rounding): PNG + encoding → H×W float array."""
    p = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    if encoding["zero"] == 128:
        return (p - 128) / 127 * encoding["scale"]
    return p / 255 * encoding["scale"]
