"""The link-preview card of a result: a 1200×630 PNG (the size chat tools and social sites show
large) with the model's input crop and its overlay side by side, the class and its probability,
the method and the model written beside them. Rendered by the server from the stored result, once;
the store keeps it with the result (``card.png``)."""
from __future__ import annotations

import io
import os

from PIL import Image, ImageDraw, ImageFont

from . import overlay

VERSION = 1  # bump when the card's look changes: part of its ETag
WIDTH, HEIGHT = 1200, 630
SIDE = 380  # each picture's side
GAP = 24
BACKGROUND = (13, 16, 23)  # the page's own
INK, MUTED, ACCENT = (236, 239, 245), (150, 158, 176), (124, 156, 255)


def _font(size: int, bold: bool = False) -> ImageFont.ImageFont:
    """DejaVu Sans from matplotlib's own fonts (always installed with it), else Pillow's."""
    import matplotlib

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name)
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return ImageFont.load_default(size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text``, shortened with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def render(meta: dict, input_png: bytes, map_png: bytes, method_label: str, model_label: str) -> bytes:
    """The card of a stored result (its metadata, input.png and map.png) as PNG bytes."""
    opts = overlay.options({}, bool(meta["signed"]))
    heat = overlay.render_result(input_png, map_png, meta["encoding"], opts)
    with Image.open(io.BytesIO(input_png)) as view:
        picture = view.convert("RGB").resize((SIDE, SIDE), Image.Resampling.LANCZOS)
    heat = heat.convert("RGB").resize((SIDE, SIDE), Image.Resampling.LANCZOS)
    card = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(card)
    top = (HEIGHT - SIDE) // 2 + 30
    card.paste(picture, (56, top))
    card.paste(heat, (56 + SIDE + GAP, top))
    text_left = 56 + 2 * SIDE + GAP + 36
    text_width = WIDTH - text_left - 48
    label = str(meta.get("target_label") or f"class {meta.get('target')}")
    prob = next((p["prob"] for p in meta.get("predictions") or [] if p.get("index") == meta.get("target")), None)
    draw.text((56, 40), "Insights", font=_font(34, bold=True), fill=INK)
    draw.text((56 + 170, 50), "what the model looks at", font=_font(22), fill=MUTED)
    y = top
    draw.text((text_left, y), "CLASS", font=_font(18, bold=True), fill=MUTED)
    y += 28
    for line in _wrap(draw, label[:1].upper() + label[1:], _font(34, bold=True), text_width, 3):
        draw.text((text_left, y), line, font=_font(34, bold=True), fill=INK)
        y += 42
    if prob is not None:
        draw.text((text_left, y + 4), f"{100 * float(prob):.1f}% probability", font=_font(24), fill=ACCENT)
        y += 40
    y += 28
    for heading, value in (("METHOD", method_label), ("MODEL", model_label)):
        draw.text((text_left, y), heading, font=_font(18, bold=True), fill=MUTED)
        draw.text((text_left, y + 26), _fit(draw, value, _font(26), text_width), font=_font(26), fill=INK)
        y += 78
    draw.text((56, top + SIDE + 12), "input", font=_font(18), fill=MUTED)
    draw.text((56 + SIDE + GAP, top + SIDE + 12), "attribution map", font=_font(18), fill=MUTED)
    out = io.BytesIO()
    card.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int, lines: int) -> list[str]:
    """``text`` in at most ``lines`` lines of ``width`` pixels (the last one shortened)."""
    words, out = text.split(), [""]
    for word in words:
        trial = f"{out[-1]} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not out[-1]:
            out[-1] = trial
        else:
            out.append(word)
    if len(out) > lines:
        out = out[:lines - 1] + [" ".join(out[lines - 1:])]
    return [_fit(draw, line, font, width) for line in out]
