"""Peak GPU memory and time of one generation in each memory mode and precision.

Builds SD 1.5-sized modules with random weights (nothing is downloaded): a
``UNet2DConditionModel`` with SD 1.5's configuration, the SD VAE and a 12-layer, 768-wide
CLIP text encoder, and runs Atelier's engine on them: one 512x512, 20-step Euler image in
``normal``, ``medvram`` and ``lowvram`` modes, each in fp16 and fp32. For each run it
resets ``torch.cuda.max_memory_allocated`` after a warm-up and prints a markdown table:
mode, precision, peak GiB, seconds, and whether the pixels equal the normal run's.

Then the same against diffusers' own ways to save memory, on the same modules:

- the whole generation through a plain ``StableDiffusionPipeline`` call (Euler, same
  steps and size, fp16) with the pipeline on the device, with
  ``enable_model_cpu_offload`` (its counterpart of medvram) and with
  ``enable_sequential_cpu_offload`` (of lowvram); each offload's pixels against the
  pipeline on the device. A mode that fails says how, and the table goes on.
- one large VAE decode (1024x1024 from 128x128 latents): whole and tiled (64-latent
  tiles), by ours (``pipeline.vae.tiled_decode``) and by diffusers'
  ``AutoencoderKL.enable_tiling``; each tiled decode's largest difference from the whole
  one, in the [-1, 1] range.

Usage: ``python bench/gpu_memory.py [--device cuda] [--steps 20] [--size 512]``.
Without CUDA it says so and exits 0. ``--tiny`` runs the same code with the built-in
``tiny`` modules on the CPU (64x64, 2 steps; a 128x128 decode in 8-latent tiles; there
is no peak figure on a CPU).
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


def build_sdxl_random(device: str = "cpu") -> Any:
    """An SDXL base-sized pipeline (UNet, VAE and both text encoders from the configurations
    Atelier ships, ``pipeline/configs/sdxl``) with seeded random weights, in float32, its
    weights made on ``device`` (initialising 3.5 billion of them on a CPU takes minutes)."""
    import json
    from pathlib import Path

    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipeline import tiny

    folder = Path(__file__).resolve().parents[1] / "pipeline" / "configs" / "sdxl"

    def config(part: str, name: str = "config.json") -> dict[str, Any]:
        return json.loads((folder / part / name).read_text())

    def text(part: str) -> Any:
        return CLIPTextConfig.from_dict(
            {**config(part), "vocab_size": tiny.VOCAB_SIZE, "bos_token_id": tiny.BOS_ID,
             "eos_token_id": tiny.EOS_ID, "pad_token_id": tiny.EOS_ID}
        )  # fmt: skip

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        if device.startswith("cuda"):
            torch.cuda.manual_seed_all(0)
        unet = UNet2DConditionModel.from_config(config("unet"))
        vae = AutoencoderKL.from_config(config("vae"))
        text_encoder = CLIPTextModel(text("text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(text("text_encoder_2"))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny.build_tiny_tokenizer(),
        tokenizer_2=tiny.build_tiny_tokenizer(pad_token=tiny.OPEN_CLIP_PAD_TOKEN),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(config("scheduler", "scheduler_config.json")),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return pipe


def _library(tiny: bool, *, sdxl: bool = False, device: str = "cpu") -> Any:
    """A library whose built-in checkpoint is the SD 1.5-sized pipeline, or with ``sdxl``
    the SDXL base-sized one (built on ``device``); with ``tiny``, tiny itself, or tiny's
    SDXL."""
    from pipeline.checkpoints import CheckpointLibrary
    from pipeline.tiny import build_tiny_sdxl

    def build() -> Any:
        if sdxl:
            return build_tiny_sdxl() if tiny else build_sdxl_random(device)
        return build_sd15_random()

    class SizedLibrary(CheckpointLibrary):
        def _load_uncached(self, info: Any) -> Any:
            return build() if info.kind == "builtin" else super()._load_uncached(info)

    return CheckpointLibrary(None) if tiny and not sdxl else SizedLibrary(None)


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


def markdown(title: str, columns: list[tuple[str, str]], cells: list[list[str]]) -> str:
    """A titled markdown table: ``columns`` as (heading, alignment row cell), then ``cells``."""
    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(heading for heading, _ in columns) + " |",
        "| " + " | ".join(align for _, align in columns) + " |",
    ]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in cells)])


def _peak(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def table(rows: list[dict[str, Any]], title: str) -> str:
    columns = [("mode", "---"), ("precision", "---"), ("peak GiB", "---:"), ("seconds", "---:")]
    cells = [
        [row["mode"], row["precision"], _peak(row["peak_gib"]), f"{row['seconds']:.2f}"]
        + ["yes" if row["same_pixels"] else "no"]
        for row in rows
    ]
    return markdown(title, [*columns, ("same pixels as normal", "---")], cells)


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
    print()
    print(against_diffusers(args.tiny, device, steps, size, where))
    return 0


def against_diffusers(tiny: bool, device: str, steps: int, size: int, where: str) -> str:
    """The tables of diffusers' own offloading and of both tiled VAE decodes."""
    latents = 16 if tiny else 128
    return "\n\n".join(
        (
            diffusers_table(
                run_diffusers(tiny, device, steps, size),
                f"diffusers' offloading, {size}x{size}, {steps} steps Euler, batch 1, on {where}",
            ),
            vae_table(
                run_vae(tiny, device, latents),
                f"VAE decode of {latents * 8}x{latents * 8}, whole and tiled, on {where}",
            ),
        )
    )


DIFFUSERS_MODES = ("on the device", "enable_model_cpu_offload", "enable_sequential_cpu_offload")
VAE_WAYS = (("Atelier", False), ("Atelier", True), ("diffusers", False), ("diffusers", True))


def _pipeline(tiny: bool, dtype: Any) -> Any:
    """A fresh pipeline of the benchmark's modules, with diffusers' Euler scheduler."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.utils import logging as diffusers_logging

    from pipeline import tiny as tiny_models

    pipe = tiny_models.build_tiny_pipeline() if tiny else build_sd15_random()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # not its note on casting modules it keeps in float32 (none here)
    try:
        return pipe.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def _vae(tiny: bool) -> Any:
    """The benchmark's VAE alone (the SD VAE with seeded random weights, or tiny's)."""
    import torch
    from diffusers import AutoencoderKL

    from pipeline import tiny as tiny_models
    from pipeline.vae import SD_VAE_CONFIG

    if tiny:
        return tiny_models.build_tiny_pipeline().vae
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(**SD_VAE_CONFIG).eval()


def _place(pipe: Any, mode: str, device: str) -> None:
    if mode == "on the device":
        pipe.to(device)
    elif mode == "enable_model_cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


def run_diffusers(tiny: bool, device_name: str, steps: int, size: int) -> list[dict[str, Any]]:
    """One row per diffusers placement: peak GiB (None on a CPU), seconds, and the largest
    pixel difference from the pipeline on the device (0-255); ``error`` when it failed."""
    import numpy as np
    import torch

    device = torch.device(device_name)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows: list[dict[str, Any]] = []
    reference = None
    for mode in DIFFUSERS_MODES:
        row: dict[str, Any] = {
            "mode": mode,
            "peak_gib": None,
            "seconds": None,
            "max_diff": None,
            "error": None,
        }
        pipe = None
        try:
            pipe = _pipeline(tiny, dtype)
            _place(pipe, mode, device_name)

            def draw(steps_: int, size_: int, pipe: Any = pipe) -> Any:
                generator = torch.Generator("cpu").manual_seed(1234)
                return pipe(
                    PROMPT,
                    num_inference_steps=steps_,
                    height=size_,
                    width=size_,
                    generator=generator,
                    output_type="np",
                ).images[0]

            if device.type == "cuda":
                draw(1, 64)  # warms the kernels, as the engine's rows do
            _reset(device)
            _sync(device)
            started = time.perf_counter()
            pixels = np.round(draw(steps, size) * 255)
            _sync(device)
            row["seconds"] = time.perf_counter() - started
            row["peak_gib"] = _peak_gib(device)
            reference = pixels if reference is None else reference
            row["max_diff"] = float(np.abs(pixels - reference).max())
        except Exception as exc:  # a table row, not the end of the run
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        finally:
            del pipe
            _reset(device)
        rows.append(row)
    return rows


def run_vae(tiny: bool, device_name: str, latent_side: int) -> list[dict[str, Any]]:
    """One row per (implementation, tiled): peak GiB, seconds, and a tiled decode's largest
    difference from the same implementation's whole decode."""
    import torch

    from pipeline import latents as latents_module
    from pipeline import vae as vae_module

    device = torch.device(device_name)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tile = 8 if tiny else vae_module.TILE_LATENTS
    vae = _vae(tiny).to(device, dtype)
    vae.tile_latent_min_size, vae.tile_sample_min_size = tile, tile * 8  # the same tiles as ours
    generator = torch.Generator("cpu").manual_seed(7)
    latents = torch.randn((1, 4, latent_side, latent_side), generator=generator).to(device)
    whole: dict[str, Any] = {}
    rows = []
    for implementation, tiled in VAE_WAYS:
        vae.use_tiling = implementation == "diffusers" and tiled

        def decode(implementation: str = implementation, tiled: bool = tiled) -> Any:
            with torch.no_grad():
                if implementation == "Atelier":
                    return vae_module.decode_batch(
                        vae, latents, latents_module.decode, tile=tile if tiled else None
                    ).float()
                return vae.decode(latents.to(dtype) / vae.config.scaling_factor).sample.float()

        if device.type == "cuda":
            decode()
        _reset(device)
        _sync(device)
        started = time.perf_counter()
        images = decode()
        _sync(device)
        seconds = time.perf_counter() - started
        whole.setdefault(implementation, images)
        rows.append(
            {
                "implementation": implementation,
                "tiled": tiled,
                "peak_gib": _peak_gib(device),
                "seconds": seconds,
                "max_diff": float((images - whole[implementation]).abs().max()),
            }
        )
    return rows


def diffusers_table(rows: list[dict[str, Any]], title: str) -> str:
    columns = [("diffusers placement", "---"), ("peak GiB", "---:"), ("seconds", "---:")]
    cells = [
        [row["mode"], "failed", "failed", row["error"]]
        if row["error"]
        else [row["mode"], _peak(row["peak_gib"]), f"{row['seconds']:.2f}", f"{row['max_diff']:.0f}"]
        for row in rows
    ]
    return markdown(title, [*columns, ("largest pixel difference from on the device", "---:")], cells)


def vae_table(rows: list[dict[str, Any]], title: str) -> str:
    columns = [("decode", "---"), ("tiled", "---"), ("peak GiB", "---:"), ("seconds", "---:")]
    cells = [
        [row["implementation"], "yes" if row["tiled"] else "no", _peak(row["peak_gib"])]
        + [f"{row['seconds']:.3f}", f"{row['max_diff']:.4f}"]
        for row in rows
    ]
    return markdown(title, [*columns, ("largest difference from the whole decode", "---:")], cells)


if __name__ == "__main__":
    sys.exit(main())
