"""bench/gpu_memory.py keeps working: its --tiny run goes through the same code on the CPU
(our memory modes, diffusers' offloading, whole and tiled VAE decodes)."""

from __future__ import annotations

import pytest
import torch

from tests.bench import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("gpu_memory")


def test_tiny_run_prints_our_modes_and_diffusers_offloading_and_tiled_decodes(bench, capsys):
    assert bench.main(["--tiny"]) == 0
    out = capsys.readouterr().out
    ours = _rows(out.split("### ")[1])
    assert [tuple(row[:2]) for row in ours] == [
        (mode, precision) for precision in bench.PRECISIONS for mode in bench.MODES
    ]
    ours, offloading, vae = (_rows(part) for part in out.split("### ")[1:])
    for row in ours:
        assert row[2] == "n/a" and float(row[3]) > 0 and row[4] == "yes", row
    assert "tiny, 64x64, 2 steps Euler" in out
    # diffusers' own placements of the same modules: the same pixels, or how one failed
    assert [row[0] for row in offloading] == list(bench.DIFFUSERS_MODES)
    for row in offloading:
        assert row[1:3] == ["failed", "failed"] and row[3] or float(row[2]) > 0 and row[3] == "0", row
    assert offloading[0][3] == "0" and offloading[1][3] == "0"  # on the device, model offload: ran
    # whole and tiled decodes, ours and diffusers': a tiled one differs a little at its seams
    assert [(row[0], row[1]) for row in vae] == [
        ("Atelier", "no"),
        ("Atelier", "yes"),
        ("diffusers", "no"),
        ("diffusers", "yes"),
    ]
    for row in vae:
        assert float(row[3]) > 0 and (float(row[4]) == 0) == (row[1] == "no"), row


def _rows(table: str) -> list[list[str]]:
    """A markdown table's body rows, cell by cell."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("| ")
        and not line.startswith(("| mode", "| diffusers placement", "| decode", "| ---"))
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_exits_cleanly(bench, capsys):
    assert bench.main([]) == 0
    assert "no CUDA device here" in capsys.readouterr().out


def test_sd15_sized_modules_have_sd15_shapes(bench):
    config = bench.SD15_UNET
    assert config["block_out_channels"] == (320, 640, 1280, 1280) and config["cross_attention_dim"] == 768
    assert bench.CLIP_L["num_hidden_layers"] == 12 and bench.CLIP_L["hidden_size"] == 768
