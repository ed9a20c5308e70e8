"""Peak GPU memory and time of one generation in each memory mode and precision.

Builds SD 1.5-sized modules with random weights (nothing is downloaded): a
``UNet2DConditionModel`` with SD 1.5's configuration, the SD VAE and a 12-layer, 768-wide
CLIP text encoder, and runs Atelier's engine on them: one 512x512, 20-step Euler image in
``normal``, ``medvram`` and ``lowvram`` modes, each in fp16 and fp32. For each run it
resets ``torch.cuda.max_memory_allocated`` after a warm-up and prints a markdown table:
mode, precision, peak GiB, seconds, and whether the pixels equal the normal run's.

Usage: ``python bench/gpu_memory.py [--device cuda] [--steps 20] [--size 512]``.
Without CUDA it says so and exits 0. ``--tiny`` runs the same code with the built-in
``tiny`` modules on the CPU (64x64, 2 steps; there is no peak figure on a CPU).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

MODES = ("normal", "medvram", "lowvram")
PRECISIONS = ("fp16", "fp32")
PROMPT = "a watercolour painting of a lighthouse at dusk, soft light"

# SD 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json).
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
# CLIP ViT-L/14's text encoder.
CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "hidden_act": "quick_gelu",
    "max_position_embeddings": 77,
}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny modules on the CPU (a smoke run)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="default: 20 (2 with --tiny)")
    parser.add_argument("--size", type=int, default=None, help="default: 512 (64 with --tiny)")
    return parser.parse_args(argv)


def build_sd15_random() -> Any:
    """An SD 1.5-sized pipeline with seeded random weights, on the CPU in float32."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline import tiny
    from pipeline.vae import SD_VAE_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD_VAE_CONFIG)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **CLIP_L,
                vocab_size=tiny.VOCAB_SIZE,
                bos_token_id=tiny.BOS_ID,
                eos_token_id=tiny.EOS_ID,
                pad_token_id=tiny.EOS_ID,
            )
        )
    scheduler = tiny.sd_scheduler()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny.build_tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return pipe


def _library(tiny: bool) -> Any:
    """A library whose built-in checkpoint is the SD 1.5-sized pipeline (or tiny itself)."""
    from pipeline.checkpoints import CheckpointLibrary

    class SizedLibrary(CheckpointLibrary):
        def _load_uncached(self, info: Any) -> Any:
            return build_sd15_random() if info.kind == "builtin" else super()._load_uncached(info)

    return CheckpointLibrary(None) if tiny else SizedLibrary(None)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None


def run(tiny: bool, device_name: str, steps: int, size: int) -> list[dict[str, Any]]:
    """One row per mode and precision: peak GiB (None on a CPU), seconds, same pixels as normal."""
    import numpy as np
    import torch

    from pipeline.engine import Engine
    from pipeline.memory import MemorySettings
    from pipeline.request import GenerationRequest

    device = torch.device(device_name)
    library = _library(tiny)
    request = GenerationRequest(
        prompt=PROMPT, seed=1234, num_inference_steps=steps, width=size, height=size, sampler_name="Euler"
    )
    warmup = request.replace(num_inference_steps=1, width=64, height=64)
    dtypes = {"fp16": torch.float16, "fp32": torch.float32}
    rows = []
    for precision in PRECISIONS:
        reference = None
        for mode in MODES:
            settings = MemorySettings(mode=mode, attention="sdpa")
            engine = Engine(library, device=device_name, dtype=dtypes[precision], memory_settings=settings)
            if device.type == "cuda":
                engine.generate(warmup)  # loads, places and casts the pipeline; warms the kernels
            _reset(device)
            _sync(device)
            started = time.perf_counter()
            result = engine.generate(request)
            _sync(device)
            seconds = time.perf_counter() - started
            pixels = np.asarray(result.images[0].image)
            reference = pixels if reference is None else reference
            rows.append(
                {
                    "mode": mode,
                    "precision": precision,
                    "peak_gib": _peak_gib(device),
                    "seconds": seconds,
                    "same_pixels": bool(np.array_equal(pixels, reference)),
                }
            )
    return rows


def table(rows: list[dict[str, Any]], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| mode | precision | peak GiB | seconds | same pixels as normal |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for row in rows:
        peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        same = "yes" if row["same_pixels"] else "no"
        lines.append(f"| {row['mode']} | {row['precision']} | {peak} | {row['seconds']:.2f} | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    import torch

    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu_memory.py: no CUDA device here; nothing measured (use --tiny for a CPU smoke run)")
        return 0
    steps = args.steps or (2 if args.tiny else 20)
    size = args.size or (64 if args.tiny else 512)
    model = "tiny" if args.tiny else "SD 1.5-sized random weights"
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    rows = run(args.tiny, device, steps, size)
    print(
        table(
            rows,
            f"{model}, {size}x{size}, {steps} steps Euler, batch 1, on {where}, torch {torch.__version__}",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
