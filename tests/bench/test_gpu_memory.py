"""bench/gpu_memory.py keeps working: its --tiny run goes through the same code on the CPU."""

from __future__ import annotations

import pytest
import torch

from tests.bench import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("gpu_memory")


def test_tiny_run_prints_a_row_per_mode_and_precision(bench, capsys):
    assert bench.main(["--tiny"]) == 0
    out = capsys.readouterr().out
    rows = [
        line
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith(("| mode", "| ---"))
    ]
    assert [tuple(cell.strip() for cell in row.strip("|").split("|"))[:2] for row in rows] == [
        (mode, precision) for precision in bench.PRECISIONS for mode in bench.MODES
    ]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[2] == "n/a" and float(cells[3]) > 0 and cells[4] == "yes", row
    assert "tiny, 64x64, 2 steps Euler" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_exits_cleanly(bench, capsys):
    assert bench.main([]) == 0
    assert "no CUDA device here" in capsys.readouterr().out


def test_sd15_sized_modules_have_sd15_shapes(bench):
    config = bench.SD15_UNET
    assert config["block_out_channels"] == (320, 640, 1280, 1280) and config["cross_attention_dim"] == 768
    assert bench.CLIP_L["num_hidden_layers"] == 12 and bench.CLIP_L["hidden_size"] == 768
