"""Pure image helpers: decode and validate uploads, preprocess for a model, encode attribution
maps as 8-bit PNGs, and render overlays in the modes of Captum's ``visualize_image_attr``.

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

MODES = ("original_image", "heat_map", "blended_heat_map", "masked_image", "alpha_scaling")
SIGNS = ("all", "positive", "negative", "absolute_value")


class ImageError(ValueError):
    """An upload that is not a usable image; ``code`` is ``bad_image`` or ``too_large``."""

    def __init__(self, message: str, code: str = "bad_image", field: str = "image"):
        super().__init__(message)
        self.message = message
        self.code = code
        self.field = field


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


# --------------------------------------------------------------------------- overlays


def cumulative_threshold(values: np.ndarray, percentile: float) -> float:
    """The smallest value v of ``values`` (≥ 0) such that the sorted values up to v hold at least
    ``percentile`` % of the total sum; values above it are the outliers that get clipped."""
    flat = np.sort(values.ravel())
    if flat.size == 0:
        return 0.0
    sums = np.cumsum(flat)
    index = int(np.searchsorted(sums, sums[-1] * 0.01 * percentile, side="left"))
    return float(flat[min(index, flat.size - 1)])


def normalize_map(m: np.ndarray, sign: str, outlier: float = 2.0) -> np.ndarray:
    """The 2-D map kept to ``sign`` and scaled to [-1, 1] (all) or [0, 1] (other signs) by the
    value below which ``100 - outlier`` % of the attribution mass lies."""
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {', '.join(SIGNS)}")
    if sign == "positive":
        m = np.maximum(m, 0)
    elif sign == "negative":
        m = np.minimum(m, 0)
    elif sign == "absolute_value":
        m = np.abs(m)
    threshold = cumulative_threshold(np.abs(m), 100.0 - outlier)
    if sign == "negative":
        threshold = -threshold
    if threshold == 0:
        return np.zeros_like(m, dtype=np.float64)
    return np.clip(m / threshold, -1, 1)


def colormap(name: str | None, sign: str):
    """A matplotlib colormap (the per-sign default when ``name`` is empty) and its value range."""
    import matplotlib
    from matplotlib.colors import LinearSegmentedColormap

    vmin, vmax = (-1.0, 1.0) if sign == "all" else (0.0, 1.0)
    if not name:
        if sign == "all":
            return LinearSegmentedColormap.from_list("RdWhGn", ["red", "white", "green"]), vmin, vmax
        name = {"positive": "Greens", "negative": "Reds", "absolute_value": "Blues"}[sign]
    try:
        return matplotlib.colormaps[name], vmin, vmax
    except KeyError:
        raise ValueError(f"unknown colormap {name!r}") from None


def colormap_names() -> list[str]:
    import matplotlib

    return sorted(matplotlib.colormaps)


def render_overlay(view: Image.Image, attr: Any, mode: str = "blended_heat_map", sign: str = "all",
                   cmap: str | None = None, alpha: float = 0.5, outlier: float = 2.0) -> Image.Image:
    """Renders a channel-summed map over the image the model saw, as an RGB image of its size.

    ``heat_map`` colours the normalised map; ``blended_heat_map`` lays it with opacity ``alpha``
    over the grey image; ``masked_image`` multiplies the image by the map; ``alpha_scaling`` uses
    the map as the image's opacity over white; ``original_image`` is the view itself."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    if mode in ("masked_image", "alpha_scaling") and sign == "all":
        raise ValueError(f"mode {mode} cannot show positive and negative values together; choose another sign")
    if not 0 <= alpha <= 1:
        raise ValueError("alpha must be between 0 and 1")
    if not 0 <= outlier <= 50:
        raise ValueError("outlier must be between 0 and 50")
    rgb = np.asarray(view.convert("RGB"), dtype=np.float64) / 255.0
    if mode == "original_image":
        return view.convert("RGB")
    m = channel_sum(attr)
    if m.shape != rgb.shape[:2]:
        m = np.asarray(Image.fromarray(m.astype(np.float32), "F").resize((rgb.shape[1], rgb.shape[0]),
                                                                          Image.BILINEAR), dtype=np.float64)
    norm = normalize_map(m, sign, outlier)
    if mode in ("heat_map", "blended_heat_map"):
        cm, vmin, vmax = colormap(cmap, sign)
        heat = cm(np.clip((norm - vmin) / (vmax - vmin), 0, 1))[..., :3]
        if mode == "heat_map":
            out = heat
        else:
            grey = rgb.mean(axis=2, keepdims=True).repeat(3, axis=2)
            out = alpha * heat + (1 - alpha) * grey
    elif mode == "masked_image":
        out = rgb * norm[..., None]
    else:  # alpha_scaling: the map is the opacity of each pixel, shown over white
        out = rgb * norm[..., None] + (1 - norm[..., None])
    return Image.fromarray(np.clip(np.round(out * 255), 0, 255).astype(np.uint8), "RGB")
