"""bench/gpu.py dry-runs on the CPU: the same code, the tiny modules, a row per batch size,
the queue's table and the SDXL table; the full-size models it builds on a GPU have the real models' shapes
and FLOPs (counted on the meta device: no weights are made)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.bench import load_bench


def test_the_dry_run_measures_every_batch_size_and_counts_the_flops(capsys):
    module = load_bench("gpu")
    assert module.main(["--tiny", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    # SD 1.5 against diffusers, SD 1.5 through the queue at max_batch 1, 4, 8, then SDXL
    assert [row.split("|")[1].strip() for row in rows] == ["1", "4", "8", "1", "4", "8", "1"]
    assert "### tiny SDXL, 64x64, 2 steps Euler a" in out
    (line,) = [line for line in out.splitlines() if line.startswith("RESULT gpu ")]
    figures = json.loads(line.removeprefix("RESULT gpu "))
    assert figures["tflop_per_image"] > 0
    assert all(figures[f"batch{b}"]["atelier_images_per_s"] > 0 for b in (1, 4, 8))
    assert figures["sdxl"]["batch1"]["atelier_images_per_s"] > 0 and figures["sdxl"]["tflop_per_image"] > 0
    assert all(figures["queue"][f"max_batch{b}"] > 0 for b in (1, 4, 8))


@pytest.mark.parametrize(
    ("sdxl", "size", "unet_billions", "tflop_per_guided_step"),
    [(False, 512, 0.86, 1.61), (True, 1024, 2.57, 13.5)],
)
def test_the_full_size_models_have_the_real_ones_shapes_and_flops(
    sdxl, size, unet_billions, tflop_per_guided_step
):
    gpu = load_bench("gpu")
    sized = load_bench("gpu_memory")
    if sdxl:
        pipe = sized.build_sdxl_random("meta")
        assert pipe.text_encoder_2.config.hidden_size == 1280 and pipe.unet.config.cross_attention_dim == 2048
    else:
        with torch.device("meta"):
            pipe = sized.build_sd15_random()
    assert sum(p.numel() for p in pipe.unet.parameters()) / 1e9 == pytest.approx(unet_billions, rel=0.01)
    unet, _decode = gpu.guided_step_flops(pipe, size, torch.device("meta"), torch.float32)
    assert unet / 1e12 == pytest.approx(tflop_per_guided_step, rel=0.01)


def test_a_part_that_fails_is_reported_and_the_others_still_run(capsys, monkeypatch):
    module = load_bench("gpu")
    measured = module.throughput

    def throughput(*args, sdxl=False, **kwargs):
        if sdxl:
            raise RuntimeError("CUDA out of memory (a stand-in)")
        return measured(*args, **kwargs)

    monkeypatch.setattr(module, "throughput", throughput)
    assert module.main(["--tiny", "--rounds", "1"]) == 1
    captured = capsys.readouterr()
    assert "### tiny, 64x64" in captured.out and "[SD 1.5: " in captured.out
    assert "[SDXL: failed after" in captured.out and "CUDA out of memory (a stand-in)" in captured.err
    (line,) = [line for line in captured.out.splitlines() if line.startswith("RESULT gpu ")]
    assert json.loads(line.removeprefix("RESULT gpu "))["failed"] == ["SDXL"]
