"""Pictures for people: maps enlarged to a legible size, colour bars with ticks, captions
that wrap instead of being cut at the edge, and side-by-side panels (Pillow only).

Every picture is at least ``MIN_WIDTH`` wide and its map's long side at least
``MIN_LONG_SIDE``, whatever the model's input size, so a 32×32 map is as readable as a
224×224 one.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_LONG_SIDE = 256
MIN_WIDTH = 256
FONT_SIZE = 13
MARGIN = 6
GAP = 8
BAR_HEIGHT = 12
TICK_LENGTH = 4
BACKGROUND = (24, 24, 24)
INK = (235, 235, 235)
HEAT_TICKS = ((0.0, "0"), (0.25, "0.25"), (0.5, "0.5"), (0.75, "0.75"), (1.0, "1"))
# A text band's bounds: layout costs grow with the text, which may come from a package or a
# client, so longer text is cut (with an ellipsis) before it is measured.
MAX_TEXT_CHARS = 1000
MAX_TEXT_LINES = 24
ELLIPSIS = "…"

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@lru_cache(maxsize=4)
def font(size: int = FONT_SIZE) -> Font:
    """Pillow's embedded scalable font; its bitmap font where Pillow lacks FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def text_width(text: str, typeface: Font | None = None) -> int:
    return math.ceil((typeface or font()).getlength(text))


def line_height(typeface: Font | None = None) -> int:
    ascent, descent = (typeface or font()).getmetrics()
    return ascent + descent + 2


def jet(values: np.ndarray) -> np.ndarray:
    """A dependency-free jet-like colormap: [0,1] → uint8 RGB."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255.0).astype(np.uint8)


def enlarge(rgb: np.ndarray) -> np.ndarray:
    """Nearest-neighbour enlargement by the smallest whole factor bringing the long side to
    ``MIN_LONG_SIDE``: each map pixel stays a crisp square, none is invented."""
    factor = max(1, math.ceil(MIN_LONG_SIDE / max(rgb.shape[:2])))
    return rgb.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else rgb


def wrap(text: str, width: int, typeface: Font | None = None,
         separators: Sequence[str] = (" · ", " ")) -> list[str]:
    """Lines no wider than ``width`` pixels: broken at the first separator that helps
    (`` · `` between caption fields, then spaces), a word too long for a line inside it."""
    typeface = typeface or font()
    if text_width(text, typeface) <= width:
        return [text]
    if not separators:
        return _break_characters(text, width, typeface)
    separator, finer = separators[0], separators[1:]
    lines: list[str] = []
    line = ""
    for piece in text.split(separator):
        candidate = f"{line}{separator}{piece}" if line else piece
        if text_width(candidate, typeface) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        *full, line = wrap(piece, width, typeface, finer)
        lines.extend(full)
    lines.append(line)
    return lines


def _break_characters(text: str, width: int, typeface: Font) -> list[str]:
    lines: list[str] = []
    while text:
        cut = 1
        while cut < len(text) and text_width(text[:cut + 1], typeface) <= width:
            cut += 1
        lines.append(text[:cut])
        text = text[cut:]
    return lines


def clipped(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, ending in an ellipsis when cut."""
    return text if len(text) <= limit else text[:max(limit - 1, 0)] + ELLIPSIS


def _last_line(line: str, width: int, typeface: Font) -> str:
    """``line`` ending in an ellipsis, shortened until it fits ``width``."""
    while line and text_width(line + ELLIPSIS, typeface) > width:
        line = line[:-1]
    return line + ELLIPSIS


def text_band(text: str, width: int) -> np.ndarray:
    """``text`` wrapped to ``width`` (less the margins), on a band as tall as its lines:
    at most ``MAX_TEXT_CHARS`` characters on ``MAX_TEXT_LINES`` lines, the rest cut."""
    typeface = font()
    text = clipped(text, MAX_TEXT_CHARS)
    lines: list[str] = []
    for paragraph in text.split("\n")[:MAX_TEXT_LINES + 1]:
        lines.extend(wrap(paragraph, width - 2 * MARGIN, typeface))
        if len(lines) > MAX_TEXT_LINES:
            lines = [*lines[:MAX_TEXT_LINES - 1],
                     _last_line(lines[MAX_TEXT_LINES - 1], width - 2 * MARGIN, typeface)]
            break
    step = line_height(typeface)
    band = Image.new("RGB", (width, 2 * MARGIN + step * len(lines) - 2), BACKGROUND)
    draw = ImageDraw.Draw(band)
    for index, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + index * step), line, font=typeface, fill=INK)
    return np.asarray(band)


def colour_bar(colours: np.ndarray, width: int,
               ticks: Sequence[tuple[float, str]]) -> np.ndarray:
    """A bar of ``colours`` (K×3 uint8, first = left) across ``width`` with a tick and its
    label below at each (fraction of the bar, label)."""
    typeface = font()
    length = width - 2 * MARGIN
    height = MARGIN + BAR_HEIGHT + TICK_LENGTH + line_height(typeface) + MARGIN // 2
    band = Image.new("RGB", (width, height), BACKGROUND)
    columns = np.linspace(0, len(colours) - 1, length).round().astype(int)
    strip = np.repeat(np.asarray(colours, np.uint8)[columns][None], BAR_HEIGHT, axis=0)
    band.paste(Image.fromarray(strip), (MARGIN, MARGIN))
    draw = ImageDraw.Draw(band)
    bottom = MARGIN + BAR_HEIGHT
    for fraction, label in ticks:
        x = MARGIN + round(fraction * (length - 1))
        draw.line([(x, bottom), (x, bottom + TICK_LENGTH - 1)], fill=INK)
        left = min(max(x - text_width(label, typeface) // 2, 1),
                   width - text_width(label, typeface) - 1)
        draw.text((left, bottom + TICK_LENGTH), label, font=typeface, fill=INK)
    return np.asarray(band)


def column(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Parts one under another, each centred on the widest."""
    width = max(part.shape[1] for part in parts)
    canvas = Image.new("RGB", (width, sum(part.shape[0] for part in parts)), BACKGROUND)
    top = 0
    for part in parts:
        canvas.paste(Image.fromarray(part), ((width - part.shape[1]) // 2, top))
        top += part.shape[0]
    return np.asarray(canvas)


def row(parts: Sequence[np.ndarray], title: str = "") -> np.ndarray:
    """Parts side by side, top-aligned with a gap between them, under an optional title."""
    width = sum(part.shape[1] for part in parts) + GAP * (len(parts) + 1)
    canvas = Image.new("RGB", (width, max(part.shape[0] for part in parts) + 2 * GAP),
                       BACKGROUND)
    left = GAP
    for part in parts:
        canvas.paste(Image.fromarray(part), (left, GAP))
        left += part.shape[1] + GAP
    picture = np.asarray(canvas)
    return column([text_band(title, width), picture]) if title else picture


def labelled_picture(picture: np.ndarray, legend: Sequence[np.ndarray] = (),
                     caption: str = "") -> np.ndarray:
    """An RGB picture enlarged to a legible size, its legend bands and caption below."""
    picture = enlarge(picture)
    width = max(picture.shape[1], MIN_WIDTH)
    return column([picture, *legend, *([text_band(caption, width)] if caption else [])])


def legend_width(picture_shape: Sequence[int]) -> int:
    """The width of a labelled picture of a map of ``picture_shape`` (H, W, …)."""
    factor = max(1, math.ceil(MIN_LONG_SIDE / max(picture_shape[:2])))
    return max(picture_shape[1] * factor, MIN_WIDTH)


def heat_picture(image: np.ndarray, saliency: np.ndarray, caption: str = "",
                 alpha: float = 0.5, box: np.ndarray | None = None) -> np.ndarray:
    """A [0,1] map blended over a uint8 H×W×3 image, with a ticked colour bar and caption;
    ``box`` (x1, y1, x2, y2 in the image's pixels) is outlined: what the map explains."""
    heat = jet(saliency).astype(np.float32)
    blended = (image.astype(np.float32) * (1 - alpha) + heat * alpha).clip(0, 255)
    picture = blended.astype(np.uint8)
    if box is not None:
        picture = outlined(picture, box)
    bar = colour_bar(jet(np.linspace(0.0, 1.0, 256)), legend_width(image.shape), HEAT_TICKS)
    return labelled_picture(picture, [bar], caption)


def outlined(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """``image`` with ``box`` drawn as a white line inside a black one (seen on any map)."""
    height, width = image.shape[:2]
    x1, y1 = (int(np.clip(np.floor(v), 0, limit - 1)) for v, limit in
              zip(box[:2], (width, height), strict=True))
    x2, y2 = (int(np.clip(np.ceil(v) - 1, 0, limit - 1)) for v, limit in
              zip(box[2:], (width, height), strict=True))
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((x1, y1, x2, y2), outline=(0, 0, 0), width=1)
    if x2 - x1 > 2 and y2 - y1 > 2:
        draw.rectangle((x1 + 1, y1 + 1, x2 - 1, y2 - 1), outline=(255, 255, 255), width=1)
    return np.asarray(canvas)


def png(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()
