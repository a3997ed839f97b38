"""Pure image helpers: decode and validate uploads, preprocess for a model, and encode attribution
maps as 8-bit PNGs (overlays of those maps: :mod:`insights.overlay`).

Nothing here keeps state; every function takes what it needs and returns a new value.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

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


def decode(data: bytes, filename: str | None = None, max_pixels: int = 40_000_000) -> Image.Image:
    """Validates an uploaded file and returns it as an RGB image (EXIF orientation applied,
    transparency composited on white, 16-bit and CMYK converted). Raises :class:`ImageError`."""
    if not data:
        raise ImageError("the file is empty")
    ext = os.path.splitext(filename or "")[1].lower()
    if ext and ext not in EXTENSIONS:
        raise ImageError(f"unsupported file extension {ext!r}; accepted: {', '.join(sorted(EXTENSIONS))}")
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
    if ext and EXTENSIONS[ext] != img.format:
        raise ImageError(f"the file extension {ext!r} does not match its content ({img.format})")
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError("the image has no pixels")
    if width * height > max_pixels:
        raise ImageError(f"the image has {width}×{height} = {width * height} pixels, more than the "
                         f"limit of {max_pixels} (MAX_IMAGE_PIXELS)", code="too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.seek(0)  # the first frame of an animation
            img.load()
    except Exception as err:
        raise ImageError(f"the image data is damaged or truncated ({err})") from None
    try:
        return to_rgb(img)
    except Exception as err:
        raise ImageError(f"the image could not be converted to RGB ({err})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image → 8-bit RGB, upright, with transparency composited on white."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        elif arr.size and np.nanmax(arr) > 255:  # 32-bit integers holding 16-bit samples
            arr = arr / 257.0 if np.nanmax(arr) <= 65535 else arr * (255.0 / np.nanmax(arr))
        img = Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    elif mode not in ("RGB", "RGBA"):
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
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


def preprocess(img: Image.Image, prep) -> tuple[torch.Tensor, Image.Image]:
    """Resize the shorter side, centre-crop and normalise (``prep`` is a models.Preprocessing).
    Returns the 1×C×H×W tensor and the cropped RGB view the model sees."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

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
