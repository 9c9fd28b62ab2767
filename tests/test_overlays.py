"""Overlays people can read: a legible size whatever the input, captions that wrap instead of
being cut, a colour bar with ticks, LOVI's legend; and the same pictures from a real server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from saliency_service.proto import explainer_pb2 as pb
from saliency_service.render.drawing import (
    BACKGROUND,
    BAR_HEIGHT,
    HEAT_TICKS,
    MARGIN,
    MIN_LONG_SIDE,
    MIN_WIDTH,
    TICK_LENGTH,
    colour_bar,
    font,
    heat_picture,
    jet,
    text_band,
)
from saliency_service.render.lovi_picture import depth_colours, lovi_picture
from saliency_service.render.overlays import panel_png
from tests.test_server_e2e import explain_request

LONG_CAPTION = ("integrated_gradients · three_tails · fwd 66 bwd 32 · 1234 ms · "
                "guided_absolutegrad · eight_tails · fwd 42 bwd 20 · 98 ms")


def ink(pixels: np.ndarray) -> float:
    """How much text a band holds: brightness above the background, summed."""
    return float(np.clip(pixels.astype(np.float64).mean(axis=2) - BACKGROUND[0], 0, None).sum())


def one_line_ink(text: str) -> float:
    """The ink of ``text`` drawn on one line of a canvas wide enough for all of it."""
    typeface = font()
    canvas = Image.new("RGB", (int(typeface.getlength(text)) + 20, 40), BACKGROUND)
    ImageDraw.Draw(canvas).text((5, 5), text, font=typeface, fill=(235, 235, 235))
    return ink(np.asarray(canvas))


def caption_fits(band: np.ndarray, text: str) -> bool:
    """All of ``text`` is in ``band`` (as much ink as the text on one unbounded line) and no
    glyph reaches the right margin (a cut line would run into it)."""
    right_margin = band[:, -(MARGIN - 1):]
    return ink(right_margin) == 0 and ink(band) >= 0.95 * one_line_ink(text)


def clipped_band(text: str, width: int) -> np.ndarray:
    """The old rendering: one line, cut at the picture's edge."""
    canvas = Image.new("RGB", (width, 24), BACKGROUND)
    ImageDraw.Draw(canvas).text((2, 2), text, font=font(), fill=(235, 235, 235))
    return np.asarray(canvas)


def test_a_cut_caption_fails_the_check() -> None:
    assert not caption_fits(clipped_band(LONG_CAPTION, MIN_WIDTH), LONG_CAPTION)


@pytest.mark.parametrize("width", [MIN_WIDTH, 300, 120])
def test_captions_wrap_and_are_never_cut(width: int) -> None:
    band = text_band(LONG_CAPTION, width)
    assert band.shape[1] == width
    assert band.shape[0] > 2 * 16  # more than one line
    assert caption_fits(band, LONG_CAPTION)


def test_a_word_wider_than_the_band_is_broken_not_cut() -> None:
    word = "a_single_parameter_name_much_wider_than_the_band"
    band = text_band(word, 100)
    assert caption_fits(band, word)


@pytest.mark.parametrize(("height", "width"), [(48, 192), (192, 48), (32, 32), (128, 128),
                                               (300, 400)])
def test_overlays_are_legible_whatever_the_input_size(height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    picture = heat_picture(image, rng.random((height, width)), LONG_CAPTION)
    factor = max(1, -(-MIN_LONG_SIDE // max(height, width)))
    assert picture.shape[1] == max(width * factor, MIN_WIDTH)
    assert picture.shape[0] > height * factor  # the map, then the bar and the caption
    assert max(height, width) * factor >= MIN_LONG_SIDE
    if (height, width) == (48, 192):
        assert height * factor == 96  # not 48 px tall
    # The map is the image blended with the heat, enlarged: its top-left pixel repeats.
    left = (picture.shape[1] - width * factor) // 2
    block = picture[:factor, left:left + factor]
    assert (block == block[0, 0]).all()


def test_the_colour_bar_has_ticks_and_labels() -> None:
    bar = colour_bar(jet(np.linspace(0, 1, 256)), MIN_WIDTH, HEAT_TICKS)
    length = MIN_WIDTH - 2 * MARGIN
    # The bar's ends are blue and red.
    assert bar[MARGIN + 2, MARGIN, 2] > 100 and bar[MARGIN + 2, MARGIN + length - 1, 0] > 100
    tick_row = bar[MARGIN + BAR_HEIGHT + TICK_LENGTH // 2]
    marked = np.flatnonzero(tick_row.mean(axis=1) > 200)
    expected = [MARGIN + round(f * (length - 1)) for f, _ in HEAT_TICKS]
    assert marked.tolist() == expected
    labels = bar[MARGIN + BAR_HEIGHT + TICK_LENGTH:]
    assert ink(labels) >= 0.9 * sum(one_line_ink(label) for _, label in HEAT_TICKS)


def test_lovi_has_a_legend_from_violet_to_red() -> None:
    maps = np.random.default_rng(3).random((4, 16, 16)).astype(np.float32)
    picture = lovi_picture(maps)
    assert picture.shape[1] == MIN_WIDTH  # 16×16 enlarged 16×
    bar_row = picture[MIN_WIDTH + MARGIN + BAR_HEIGHT // 2, MARGIN:MIN_WIDTH - MARGIN]
    np.testing.assert_array_equal(bar_row[0], depth_colours()[0])
    np.testing.assert_array_equal(bar_row[-1], depth_colours()[-1])
    violet, red = bar_row[0].astype(int), bar_row[-1].astype(int)
    assert violet[2] > 200 and violet[0] > 100 and violet[1] < 30
    assert red[0] > 240 and red[1] < 30 and red[2] < 30
    below = picture[MIN_WIDTH + MARGIN + BAR_HEIGHT:]
    assert ink(below) > 3 * one_line_ink("scale_0 scale_1 scale_2 scale_3")  # ticks + meaning


def overlays(stub, method: int) -> list[np.ndarray]:
    reply = stub.Explain(explain_request(method, batch=2, return_overlay=True), timeout=60)
    assert len(reply.overlays) == 2
    return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in reply.overlays]


def test_the_server_returns_legible_overlays(stub) -> None:
    for picture in overlays(stub, pb.METHOD_GRADCAM):
        assert picture.shape[1] == MIN_WIDTH  # 32×32 enlarged 8×
        below = picture[MIN_WIDTH:]
        assert ink(below) > one_line_ink("gradcam · alpha · fwd 2 bwd 1 · 1 ms")


def test_the_server_returns_lovi_with_its_legend_and_caption(stub) -> None:
    legend_bottom = lovi_picture(np.zeros((3, 32, 32), np.float32)).shape[0]  # tiny: 3 scales
    for picture in overlays(stub, pb.METHOD_LOVI):
        assert picture.shape[1] == MIN_WIDTH
        bar_row = picture[MIN_WIDTH + MARGIN + BAR_HEIGHT // 2, MARGIN:MIN_WIDTH - MARGIN]
        np.testing.assert_array_equal(bar_row[[0, -1]], depth_colours()[[0, -1]])
        caption = picture[legend_bottom:]
        assert ink(caption) > 0.8 * one_line_ink("lovi · alpha · fwd 1 bwd 0 · 1 ms")


def test_a_panel_holds_every_overlay_side_by_side(stub) -> None:
    pictures = overlays(stub, pb.METHOD_GRADCAM)[:1] + overlays(stub, pb.METHOD_LOVI)[:1]
    encoded = []
    for picture in pictures:
        out = io.BytesIO()
        Image.fromarray(picture).save(out, format="PNG")
        encoded.append(out.getvalue())
    panel = np.asarray(Image.open(io.BytesIO(panel_png(encoded, "tiny · alpha 0.31"))))
    assert panel.shape[1] >= sum(p.shape[1] for p in pictures)
    assert panel.shape[0] > max(p.shape[0] for p in pictures)
    # Each overlay appears whole in the panel.
    for picture in pictures:
        found = any((panel[top:top + picture.shape[0], left:left + picture.shape[1]] == picture)
                    .all() for top in range(panel.shape[0] - picture.shape[0] + 1)
                    for left in (8, 8 + pictures[0].shape[1] + 8)
                    if left + picture.shape[1] <= panel.shape[1])
        assert found
