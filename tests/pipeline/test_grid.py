from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.grid import GridLayout, grid_layout, paste_grid


def squares(n: int, side: int = 512) -> list[tuple[int, int]]:
    return [(side, side)] * n


def test_parity_example_three_images() -> None:
    layout = grid_layout(squares(3))
    assert (layout.rows, layout.cols) == (2, 2)
    assert layout.size == (1024, 1024)
    assert layout.cell_size == (512, 512)
    assert layout.offsets == [(0, 0), (512, 0), (0, 512)]


def test_types_are_strict() -> None:
    layout = grid_layout(squares(5, 64))
    assert isinstance(layout, GridLayout)
    for value in (layout.rows, layout.cols, *layout.cell_size, *layout.size):
        assert type(value) is int
    assert all(type(x) is int and type(y) is int for x, y in layout.offsets)


@pytest.mark.parametrize(
    ("n", "rows", "cols"),
    [
        (1, 1, 1),
        (2, 1, 2),
        (4, 2, 2),
        (5, 2, 3),
        (6, 2, 3),
        (7, 3, 3),
        (8, 3, 3),
        (10, 3, 4),
        (12, 3, 4),
        (13, 4, 4),
    ],
)
def test_default_rows_round_sqrt(n: int, rows: int, cols: int) -> None:
    layout = grid_layout(squares(n, 8))
    assert (layout.rows, layout.cols) == (rows, cols)
    assert layout.size == (cols * 8, rows * 8)


@pytest.mark.parametrize(
    ("n", "rows", "cols"),
    [
        (1, 1, 1),
        (2, 1, 2),
        (3, 1, 3),
        (6, 2, 3),
        (7, 1, 7),
        (8, 2, 4),
        (9, 3, 3),
        (12, 3, 4),
        (15, 3, 5),
        (16, 4, 4),
    ],
)
def test_prevent_empty_spots(n: int, rows: int, cols: int) -> None:
    layout = grid_layout(squares(n, 8), prevent_empty_spots=True)
    assert (layout.rows, layout.cols) == (rows, cols)
    assert layout.rows * layout.cols == n


def test_n_rows_setting_wins_over_prevent_empty_spots() -> None:
    layout = grid_layout(squares(7, 8), n_rows=2, prevent_empty_spots=True)
    assert (layout.rows, layout.cols) == (2, 4)


def test_n_rows_zero_uses_batch_size() -> None:
    layout = grid_layout(squares(8, 8), n_rows=0, batch_size=4)
    assert (layout.rows, layout.cols) == (4, 2)


def test_n_rows_is_capped_at_image_count() -> None:
    layout = grid_layout(squares(3, 8), n_rows=10)
    assert (layout.rows, layout.cols) == (3, 1)
    layout = grid_layout(squares(3, 8), n_rows=0, batch_size=6)
    assert (layout.rows, layout.cols) == (3, 1)


def test_explicit_rows_override_settings() -> None:
    layout = grid_layout(squares(6, 8), rows=1, n_rows=3, batch_size=2, prevent_empty_spots=True)
    assert (layout.rows, layout.cols) == (1, 6)
    assert grid_layout(squares(2, 8), rows=5).rows == 2


def test_explicit_rows_can_leave_an_empty_row() -> None:
    # A1111 does not rebalance: 5 images in 4 rows need 2 columns, and the last row stays empty.
    layout = grid_layout(squares(5, 8), rows=4)
    assert (layout.rows, layout.cols) == (4, 2)
    assert layout.size == (16, 32)


def test_mixed_sizes_are_centred_in_max_cell() -> None:
    sizes = [(100, 50), (60, 80), (101, 79)]
    layout = grid_layout(sizes, rows=1)
    assert layout.cell_size == (101, 80)
    assert layout.size == (303, 80)
    assert layout.offsets == [(0, 15), (101 + 20, 0), (202, 0)]


def test_offsets_follow_row_major_order() -> None:
    layout = grid_layout(squares(6, 10), rows=2)
    assert layout.offsets == [(0, 0), (10, 0), (20, 0), (0, 10), (10, 10), (20, 10)]


def test_no_images_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        grid_layout([])


@pytest.mark.parametrize("kwargs", [{"rows": 0}, {"rows": -2}, {"n_rows": 0, "batch_size": 0}])
def test_fewer_than_one_row_is_an_error(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="at least 1 row"):
        grid_layout(squares(4, 8), **kwargs)


def check_layout(sizes: list[tuple[int, int]], layout: GridLayout) -> None:
    n = len(sizes)
    assert 1 <= layout.rows <= n
    assert layout.cols == math.ceil(n / layout.rows)
    assert layout.rows * layout.cols >= n
    assert len(layout.offsets) == n
    cell_w, cell_h = layout.cell_size
    assert layout.size == (layout.cols * cell_w, layout.rows * cell_h)
    for (x, y), (w, h) in zip(layout.offsets, sizes, strict=True):
        assert 0 <= x and x + w <= layout.size[0]
        assert 0 <= y and y + h <= layout.size[1]


def test_every_count_and_setting_combination_is_valid() -> None:
    for n in range(1, 65):
        sizes = squares(n, 16)
        for n_rows in (-1, 0, 1, 3, 100):
            for prevent in (False, True):
                for batch_size in (1, 4, 64):
                    layout = grid_layout(
                        sizes, n_rows=n_rows, batch_size=batch_size, prevent_empty_spots=prevent
                    )
                    check_layout(sizes, layout)


@settings(max_examples=500, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=64),
    rows=st.one_of(st.none(), st.integers(1, 80)),
    n_rows=st.integers(-1, 70),
    batch_size=st.integers(1, 64),
    prevent=st.booleans(),
)
def test_grid_layout_never_raises_for_valid_input(
    sizes: list[tuple[int, int]], rows: int | None, n_rows: int, batch_size: int, prevent: bool
) -> None:
    layout = grid_layout(sizes, rows=rows, batch_size=batch_size, n_rows=n_rows, prevent_empty_spots=prevent)
    check_layout(sizes, layout)


# --- paste_grid ----------------------------------------------------------------------------


def test_paste_grid_places_images_on_white() -> None:
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    blue = Image.new("RGB", (2, 2), (0, 0, 255))
    green = Image.new("RGB", (4, 4), (0, 255, 0))
    images = [red, blue, green]
    layout = grid_layout([im.size for im in images])
    grid = paste_grid(images, layout)
    assert grid.mode == "RGB"
    assert grid.size == (8, 8)
    assert grid.getpixel((0, 0)) == (255, 0, 0)
    assert grid.getpixel((4, 0)) == (255, 255, 255)  # margin around the centred small image
    assert grid.getpixel((5, 1)) == (0, 0, 255)
    assert grid.getpixel((6, 2)) == (0, 0, 255)
    assert grid.getpixel((7, 3)) == (255, 255, 255)
    assert grid.getpixel((1, 5)) == (0, 255, 0)
    assert grid.getpixel((5, 5)) == (255, 255, 255)  # the empty fourth cell


def test_paste_grid_converts_other_modes() -> None:
    images = [Image.new("L", (3, 3), 128), Image.new("RGBA", (3, 3), (10, 20, 30, 0))]
    grid = paste_grid(images, grid_layout([im.size for im in images]))
    assert grid.getpixel((0, 0)) == (128, 128, 128)
    assert grid.getpixel((3, 0)) == (10, 20, 30)


def test_paste_grid_count_mismatch() -> None:
    layout = grid_layout(squares(2, 4))
    with pytest.raises(ValueError, match="2 places but 1 images"):
        paste_grid([Image.new("RGB", (4, 4))], layout)
