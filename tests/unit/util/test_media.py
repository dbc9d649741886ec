"""The pictures a run writes for people: contact sheets whose labels are readable and never cut."""

import numpy as np
from PIL import Image, ImageFont

from cogtune.util.media import LINE_HEIGHT, contact_sheet, label_font, wrapped


def test_a_long_label_is_wrapped_in_a_real_font_not_cut(tmp_path):
    font = label_font()
    assert isinstance(font, ImageFont.FreeTypeFont)  # Pillow's TrueType font, not the tiny bitmap one
    label = "DEMO a red square moves slowly from left to right across a dark gradient background (seed 42)"
    lines = wrapped(label, 124, font)
    assert len(lines) > 2 and " ".join(lines) == label  # every word, in order, spaces kept
    assert all(font.getlength(line) <= 124 for line in lines)
    frames = [np.full((32, 64, 3), 200, dtype=np.uint8)] * 2
    contact_sheet([(label, frames)], tmp_path / "sheet.png")
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("L")).astype(int)
    assert sheet.shape == (LINE_HEIGHT * len(lines) + 32, 128)
    text = sheet[:LINE_HEIGHT * len(lines)]
    assert (text < 128).sum() > 100  # drawn
    assert (text[:, -2:] < 128).sum() == 0  # nothing runs into the right edge
    assert wrapped("x" * 80, 50, font) != ["x" * 80]  # a word wider than the sheet is broken, not cut


def test_the_loss_curve_smooths_as_tensorboard_does():
    from cogtune.train.report import smoothed, smoothing_weight

    values = np.array([1.78, 1.74, 2.03, 1.95, 1.94, 1.81, 1.93, 2.05])
    # TensorBoard's scalar smoothing (tb's smoothing.ts: last = last * w + (1 - w) * v; debiased), written out
    weight, last, expected = 0.6, 0.0, []
    for i, value in enumerate(values):
        last = last * weight + (1 - weight) * value
        expected.append(last / (1 - weight ** (i + 1)))
    assert smoothing_weight(len(values)) == 0.6
    assert np.allclose(smoothed(values, 0.6), expected)
    assert smoothed(values, 0.6)[0] == values[0]  # debiased: the first point is the first value
    assert 0.6 < smoothing_weight(1000) <= 0.98
