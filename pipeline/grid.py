"""Image grid layout as A1111's ``image_grid`` arranges it (A1111-SEMANTICS.md §14.4).

Layout and drawing are split so the geometry can be checked without building images,
and so labelled grids (X/Y/Z legends, §14.3) can reuse the same offsets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

# A1111 fills unused cells and the margins of smaller images with white.
GRID_BACKGROUND = "#ffffff"


@dataclass
class GridLayout:
    rows: int
    cols: int
    cell_size: tuple[int, int]  # (max width, max height)
    size: tuple[int, int]  # grid (width, height)
    offsets: list[tuple[int, int]]  # paste (x, y) of each image


def _resolve_rows(
    count: int, rows: int | None, batch_size: int, n_rows: int, prevent_empty_spots: bool
) -> int:
    """Row count before capping, in A1111's order of precedence."""
    if rows is not None:
        return rows
    if n_rows > 0:
        return n_rows
    if n_rows == 0:
        return batch_size
    if prevent_empty_spots:
        candidate = math.isqrt(count)
        while count % candidate != 0:
            candidate -= 1
        return candidate
    return round(math.sqrt(count))


def grid_layout(
    image_sizes: Sequence[tuple[int, int]],
    *,
    rows: int | None = None,
    batch_size: int = 1,
    n_rows: int = -1,
    prevent_empty_spots: bool = False,
) -> GridLayout:
    """Rows, columns, cell and paste offsets for ``image_sizes`` (each ``(width, height)``).

    Raises ``ValueError`` where A1111 itself would fail: no images, or fewer than one row.
    """
    count = len(image_sizes)
    if count == 0:
        raise ValueError("a grid needs at least one image")
    resolved = min(_resolve_rows(count, rows, batch_size, n_rows, prevent_empty_spots), count)
    if resolved < 1:
        raise ValueError(f"a grid needs at least 1 row, got {resolved}")
    cols = math.ceil(count / resolved)
    cell_w = max(int(w) for w, _ in image_sizes)
    cell_h = max(int(h) for _, h in image_sizes)
    offsets = [
        (
            (index % cols) * cell_w + (cell_w - int(w)) // 2,
            (index // cols) * cell_h + (cell_h - int(h)) // 2,
        )
        for index, (w, h) in enumerate(image_sizes)
    ]
    return GridLayout(
        rows=resolved,
        cols=cols,
        cell_size=(cell_w, cell_h),
        size=(cols * cell_w, resolved * cell_h),
        offsets=offsets,
    )


def paste_grid(images: Sequence[Image.Image], layout: GridLayout) -> Image.Image:
    """Draw ``images`` at ``layout``'s offsets on a white RGB canvas, as A1111 does."""
    if len(images) != len(layout.offsets):
        raise ValueError(f"layout has {len(layout.offsets)} places but {len(images)} images were given")
    grid = Image.new("RGB", layout.size, GRID_BACKGROUND)
    for image, offset in zip(images, layout.offsets, strict=True):
        grid.paste(image if image.mode == "RGB" else image.convert("RGB"), offset)
    return grid


# --- legends (A1111-SEMANTICS.md §14.3) ------------------------------------------------------

LEGEND_TEXT = "#000000"

FontLoader = Callable[[int], Any]  # size in pixels -> a PIL font


def default_font(size: int) -> Any:
    """Pillow's bundled scalable font: the same glyphs on every machine."""
    return ImageFont.load_default(size=max(1, size))


def wrap_words(text: str, fits: Callable[[str], bool]) -> list[str]:
    """Greedy word wrap: each line takes words while ``fits`` says the line still fits; a
    word too long for a line alone gets a line of its own (its font shrinks later)."""
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if fits(candidate) or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


@dataclass(frozen=True)
class _LegendLine:
    text: str
    height: int
    allowed_width: int


def _legend_lines(draw: ImageDraw.ImageDraw, text: str, font: Any, allowed_width: int) -> list[_LegendLine]:
    lines = []
    for line in wrap_words(text, lambda candidate: draw.textlength(candidate, font=font) <= allowed_width):
        left, top, right, bottom = draw.multiline_textbbox((0, 0), line, font=font)
        lines.append(_LegendLine(line, bottom - top, allowed_width))
    return lines


def _block_height(lines: Sequence[_LegendLine], spacing: int) -> int:
    return sum(line.height + spacing for line in lines) - spacing if lines else 0


def _draw_block(
    draw: ImageDraw.ImageDraw,
    centre_x: float,
    top: float,
    lines: Sequence[_LegendLine],
    size: int,
    spacing: int,
    load_font: FontLoader,
) -> None:
    """Each line centred on ``centre_x``; a line wider than allowed is drawn smaller."""
    y = top
    for line in lines:
        font_size = size
        font = load_font(font_size)
        while draw.textlength(line.text, font=font) > line.allowed_width and font_size > 1:
            font_size -= 1
            font = load_font(font_size)
        if line.text:
            draw.multiline_text(
                (centre_x, y + line.height / 2),
                line.text,
                font=font,
                fill=LEGEND_TEXT,
                anchor="mm",
                align="center",
            )
        y += line.height + spacing


def annotate_grid(
    grid: Image.Image,
    cell_size: tuple[int, int],
    top: Sequence[str],
    left: Sequence[str],
    load_font: FontLoader = default_font,
) -> tuple[Image.Image, tuple[int, int]]:
    """``grid`` with ``top`` labels over its columns and ``left`` labels beside its rows.

    The geometry is A1111's: font size ``(cell_w + cell_h) // 25``, half of it between
    lines, a left margin of ``cell_w * 3 // 4`` only when some row has a label, a top
    margin as tall as the tallest column label plus two line gaps (none without labels).
    Returns the new image and where the grid's top-left corner now is.
    """
    cell_w, cell_h = cell_size
    size = (cell_w + cell_h) // 25
    spacing = size // 2
    font = load_font(size)
    pad_left = cell_w * 3 // 4 if any(text for text in left) else 0
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    columns = [_legend_lines(measure, text, font, cell_w) for text in top]
    rows = [_legend_lines(measure, text, font, pad_left) for text in left]
    column_heights = [_block_height(lines, spacing) for lines in columns]
    pad_top = max(column_heights) + spacing * 2 if sum(column_heights) else 0
    result = Image.new("RGB", (grid.width + pad_left, grid.height + pad_top), GRID_BACKGROUND)
    result.paste(grid, (pad_left, pad_top))
    draw = ImageDraw.Draw(result)
    for col, (lines, height) in enumerate(zip(columns, column_heights, strict=True)):
        centre = pad_left + cell_w * col + cell_w / 2
        _draw_block(draw, centre, pad_top / 2 - height / 2, lines, size, spacing, load_font)
    for row, lines in enumerate(rows):
        top_y = pad_top + cell_h * row + cell_h / 2 - _block_height(lines, spacing) / 2
        _draw_block(draw, pad_left / 2, top_y, lines, size, spacing, load_font)
    return result, (pad_left, pad_top)


def xyz_grid(
    images: Sequence[Image.Image],
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    z_labels: Sequence[str] = ("",),
    load_font: FontLoader = default_font,
) -> Image.Image:
    """The X/Y/Z plot image: per Z value a grid of |Y| rows and |X| columns (X labels on
    top, Y labels on the left), and those grids side by side under their Z titles.

    ``images`` are in A1111's index order, ``x + y*|X| + z*|X|*|Y|``.
    """
    per_grid = len(x_labels) * len(y_labels)
    if len(images) != per_grid * len(z_labels):
        raise ValueError(
            f"{len(images)} images do not fill a {len(x_labels)}x{len(y_labels)}x{len(z_labels)} plot"
        )
    sub_grids = []
    for z in range(len(z_labels)):
        cells = images[z * per_grid : (z + 1) * per_grid]
        layout = grid_layout([image.size for image in cells], rows=len(y_labels))
        annotated, _ = annotate_grid(
            paste_grid(cells, layout), layout.cell_size, x_labels, y_labels, load_font
        )
        sub_grids.append(annotated)
    layout = grid_layout([grid.size for grid in sub_grids], rows=1)
    plot, _ = annotate_grid(paste_grid(sub_grids, layout), layout.cell_size, z_labels, [""], load_font)
    return plot
