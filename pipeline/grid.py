"""Image grid layout as A1111's ``image_grid`` arranges it (A1111-SEMANTICS.md §14.4).

Layout and drawing are split so the geometry can be checked without building images,
and so labelled grids (X/Y/Z legends) can reuse the same offsets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

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
