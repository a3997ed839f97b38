"""The overlay specification: display modes, signs, colour maps, opacity and outlier clipping,
defined once for the server (``overlay.png``) and the browser canvas (``static/js/render.js``).

Both sides render from the same stored data: the 8-bit map (``map.png``) and its zero point.
The map's levels are ``pixel - zero``; the scale of the encoding cancels in the normalisation,
so the picture depends on the PNG alone and both sides do exact integer sums. The rules:

1. A map of another size than the input is resampled to the input's size (bilinear, pixel
   centres, edges clamped); the overlay always has the input's size.
2. The sign keeps ``v`` (all), ``max(v, 0)`` (positive), ``max(-v, 0)`` (negative) or ``|v|``;
   ``masked_image`` and ``alpha_scaling`` need a magnitude, so with sign ``all`` they use ``|v|``.
3. ``t`` is Captum's outlier threshold: the smallest kept magnitude at which the sorted
   magnitudes hold ``100 - outlier`` % of their sum; ``n = clip(v / t, -1, 1)`` (0 when t = 0).
4. Heat colours come from a 256-entry table of the matplotlib colour map (``lut``), entry
   ``min(255, floor(u * 256))`` with ``u = (n + 1) / 2`` for sign all and ``u = n`` otherwise,
   which is matplotlib's own lookup.
5. On 0–255 values: heat_map = heat; blended_heat_map = alpha·heat + (1 − alpha)·grey with
   grey = (r + g + b) / 3; masked_image = rgb·m; alpha_scaling = rgb·m + 255·(1 − m) (over
   white) with m = |n|; original_image = rgb. Rounded half to even, clamped to 0–255.
"""
from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
from PIL import Image

from .engine.errors import shown

# The page's controls in order: (value, label, title) for modes, (value, label) for signs.
MODES = (
    ("original_image", "Image", "Original image"),
    ("heat_map", "Heat", "Heat map"),
    ("blended_heat_map", "Blend", "Heat map blended over the grayscale image"),
    ("masked_image", "Mask", "Image masked by the map's magnitude"),
    ("alpha_scaling", "Alpha", "Image with opacity scaled by the map's magnitude"),
)
SIGNS = (("all", "All"), ("positive", "Positive"), ("negative", "Negative"), ("absolute_value", "Absolute"))
# The colour maps the page offers (any matplotlib name is accepted by overlay.png).
COLORMAPS = (
    ("viridis", "Viridis"), ("inferno", "Inferno"), ("magma", "Magma"), ("turbo", "Turbo"), ("jet", "Jet"),
    ("RdBu_r", "Red–Blue (diverging)"), ("Greens", "Greens"), ("Reds", "Reds"), ("Blues", "Blues"),
    ("gray", "Gray"),
)
# Captum's visualize_image_attr picks its colour map from the sign when none is given.
AUTO_COLORMAP = {"all": "RdWhGn", "positive": "Greens", "negative": "Reds", "absolute_value": "Blues"}
DEFAULTS = {"mode": "blended_heat_map", "sign": "auto", "cmap": "auto", "alpha": 0.5, "outlier": 2.0}
RANGES = {"alpha": (0.0, 1.0, 0.05), "outlier": (0.0, 50.0, 0.5)}  # low, high, the page's step
MODE_NAMES = tuple(m[0] for m in MODES)
SIGN_NAMES = tuple(s[0] for s in SIGNS)
MAGNITUDE_MODES = ("masked_image", "alpha_scaling")
VERSION = 2  # of the rules above; part of overlay.png's ETag, so a change is never served from cache


class OptionError(ValueError):
    """A bad overlay option; ``field`` names it (a 400 ``bad_param`` over HTTP)."""

    status = 400
    code = "bad_param"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = f"{field}: {message}"


@dataclass(frozen=True)
class Options:
    """One view of a map, every choice resolved (no "auto")."""

    mode: str
    sign: str
    cmap: str
    alpha: float
    outlier: float

    def as_dict(self) -> dict:
        return asdict(self)


def auto_sign(signed: bool) -> str:
    """The sign a view shows until someone picks one."""
    return "all" if signed else "positive"


def _number(value, field: str) -> float:
    lo, hi, _step = RANGES[field]
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise OptionError(field, f"must be a number, got {shown(value)}") from None
    if not lo <= x <= hi:  # also refuses NaN
        raise OptionError(field, f"must be between {lo} and {hi}, got {shown(value)}")
    return x


def options(args: Mapping, signed: bool) -> Options:
    """Parses and checks overlay options (query arguments); absent or "auto" values take the
    defaults the page uses. Raises :class:`OptionError`."""
    mode = args.get("mode") or DEFAULTS["mode"]
    if mode not in MODE_NAMES:
        raise OptionError("mode", f"must be one of {', '.join(MODE_NAMES)}; got {shown(mode)}")
    sign = args.get("sign") or "auto"
    sign = auto_sign(signed) if sign == "auto" else sign
    if sign not in SIGN_NAMES:
        raise OptionError("sign", f"must be one of {', '.join(SIGN_NAMES)}; got {shown(sign)}")
    cmap = args.get("cmap") or "auto"
    cmap = AUTO_COLORMAP[sign] if cmap == "auto" else cmap
    try:
        colormap(cmap)
    except KeyError:
        raise OptionError("cmap", f"unknown matplotlib colormap {shown(cmap)}") from None
    alpha = _number(args.get("alpha", DEFAULTS["alpha"]), "alpha")
    outlier = _number(args.get("outlier", DEFAULTS["outlier"]), "outlier")
    return Options(mode, sign, cmap, alpha, outlier)


# --------------------------------------------------------------------------- colour tables


def colormap(name: str):
    """The matplotlib colour map of that name (RdWhGn is Captum's red–white–green); KeyError if unknown."""
    import matplotlib
    from matplotlib.colors import LinearSegmentedColormap

    if name == "RdWhGn":
        return LinearSegmentedColormap.from_list("RdWhGn", ["red", "white", "green"])
    return matplotlib.colormaps[name]


@functools.lru_cache(maxsize=64)
def lut(name: str) -> np.ndarray:
    """The colour map as a read-only 256×3 uint8 table (matplotlib's entries, rounded)."""
    table = colormap(name).resampled(256)(np.arange(256))[:, :3]
    out = np.round(table * 255).astype(np.uint8)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=64)
def lut_png(name: str) -> bytes:
    """The table as a 256×1 RGB PNG, what the browser loads."""
    buf = io.BytesIO()
    Image.fromarray(lut(name)[None], "RGB").save(buf, format="PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def fingerprint() -> str:
    """Changes when the rules (``VERSION``) or matplotlib (whose colour tables we serve) change:
    part of every colour table's URL and of overlay.png's ETag, so that a browser never keeps an
    old table or picture next to a new one."""
    import matplotlib

    return hashlib.sha256(f"{VERSION}:{matplotlib.__version__}".encode()).hexdigest()[:12]


def describe() -> dict:
    """The specification as the page reads it: choices, defaults, ranges and table URLs."""
    names = [c[0] for c in COLORMAPS] + sorted(set(AUTO_COLORMAP.values()))
    return {
        "modes": [{"value": v, "label": label, "title": title} for v, label, title in MODES],
        "signs": [{"value": v, "label": label} for v, label in SIGNS],
        "colormaps": [{"value": "auto", "label": "Auto (Captum default)"}]
                     + [{"value": v, "label": label} for v, label in COLORMAPS],
        "auto_colormap": AUTO_COLORMAP,
        "magnitude_modes": list(MAGNITUDE_MODES),
        "defaults": DEFAULTS,
        "ranges": {k: {"min": lo, "max": hi, "step": step} for k, (lo, hi, step) in RANGES.items()},
        "luts": {name: f"/api/colormaps/{name}.png?v={fingerprint()}" for name in names},
    }


# --------------------------------------------------------------------------- rendering


def levels(map_png: bytes, zero: int) -> np.ndarray:
    """The stored 8-bit map as signed levels (pixel − zero), the data both renderers use."""
    with Image.open(io.BytesIO(map_png)) as img:
        return np.asarray(img.convert("L"), dtype=np.float64) - float(zero)


def resample(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resampling with pixel centres aligned and edges clamped (render.js does the same)."""
    h, w = m.shape
    if (h, w) == (height, width):
        return m
    ys = np.clip((np.arange(height) + 0.5) * (h / height) - 0.5, 0, h - 1)
    xs = np.clip((np.arange(width) + 0.5) * (w / width) - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
    bottom = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def cumulative_threshold(values: np.ndarray, percentile: float) -> float:
    """The smallest value v of ``values`` (≥ 0) such that the sorted values up to v hold at least
    ``percentile`` % of the total sum; values above it are the outliers that get clipped."""
    flat = np.sort(values.ravel())
    if flat.size == 0:
        return 0.0
    sums = np.cumsum(flat)
    index = int(np.searchsorted(sums, sums[-1] * 0.01 * percentile, side="left"))
    return float(flat[min(index, flat.size - 1)])


def kept(m: np.ndarray, sign: str) -> np.ndarray:
    """The part of the map a sign shows: signed for all, a magnitude ≥ 0 for the others."""
    if sign == "positive":
        return np.maximum(m, 0)
    if sign == "negative":
        return np.maximum(-m, 0)
    if sign == "absolute_value":
        return np.abs(m)
    return m


def normalize(m: np.ndarray, sign: str, outlier: float = 2.0) -> np.ndarray:
    """The map kept to ``sign`` and scaled to [-1, 1] (all) or [0, 1] by Captum's outlier
    threshold (negative values count as magnitudes: the most negative is 1)."""
    if sign not in SIGN_NAMES:
        raise OptionError("sign", f"must be one of {', '.join(SIGN_NAMES)}; got {shown(sign)}")
    k = kept(np.asarray(m, dtype=np.float64), sign)
    threshold = cumulative_threshold(np.abs(k), 100.0 - outlier)
    if threshold == 0:
        return np.zeros_like(k)
    return np.clip(k / threshold, -1, 1)


def render(view: Image.Image, m: np.ndarray, opts: Options) -> Image.Image:
    """The overlay of a 2-D map on the image the model saw, an RGB image of the view's size."""
    rgb = np.asarray(view.convert("RGB"), dtype=np.float64)
    if opts.mode == "original_image":
        return view.convert("RGB")
    m = resample(np.asarray(m, dtype=np.float64), rgb.shape[0], rgb.shape[1])
    sign = "absolute_value" if opts.mode in MAGNITUDE_MODES and opts.sign == "all" else opts.sign
    n = normalize(m, sign, opts.outlier)
    if opts.mode in MAGNITUDE_MODES:
        mag = np.abs(n)[..., None]
        out = rgb * mag if opts.mode == "masked_image" else rgb * mag + 255 * (1 - mag)
    else:
        u = (n + 1) / 2 if sign == "all" else n
        heat = lut(opts.cmap)[np.minimum(255, np.floor(u * 256)).astype(int)].astype(np.float64)
        if opts.mode == "heat_map":
            out = heat
        else:
            grey = ((rgb[..., 0] + rgb[..., 1] + rgb[..., 2]) / 3)[..., None]
            out = opts.alpha * heat + (1 - opts.alpha) * grey
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


def render_result(input_png: bytes, map_png: bytes, encoding: Mapping, opts: Options) -> Image.Image:
    """The overlay of a stored result, from its input.png and map.png as the browser loads them."""
    with Image.open(io.BytesIO(input_png)) as view:
        return render(view, levels(map_png, int(encoding["zero"])), opts)
