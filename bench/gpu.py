"""Images per second on one CUDA GPU: plain diffusers against Atelier's engine.

SD 1.5-sized random-weight UNet, VAE and CLIP text encoder (bench/gpu_memory.py builds
them; nothing is downloaded), fp16, 512x512, 20 steps of Euler a, CFG 7. For batch 1, 4
and 8 it interleaves rounds of a plain ``StableDiffusionPipeline`` call and Atelier's
``Engine.generate`` doing the same work (SDPA attention, the CFG pair in one UNet call,
channels-last weights on CUDA, ``--compile`` for torch.compile; the two share the modules,
so diffusers runs on the channels-last weights too, which can only flatter it),
and prints images/s for each, Atelier's batch-8 rate over diffusers' batch-1 rate
(target 1.5x or more), and the fraction of the FLOP floor Atelier reaches: the UNet's
and the VAE decoder's floating-point operations, counted by torch's FLOP counter on one
guided step and one decode (about 1.6 TFLOP per guided step at 512x512), over the
card's dense fp16 peak (``--peak-tflops``; H100 SXM 989 by default). Then images/s
through the bot's queue: 8 users' one-image requests at once (each its own prompt, seed
and CFG scale), micro-batched with ``[queue] max_batch`` 1, 4 and 8. Then the same for an
SDXL base-sized model (its shipped configurations, random weights made on the GPU) at
1024x1024, batch 1, against ``StableDiffusionXLPipeline``. Then the memory modes' tables
of bench/gpu_memory.py (peak memory in normal, medvram and lowvram, and against diffusers'
own offloading and tiled VAE decode).

Usage: ``python bench/gpu.py [--rounds 3] [--peak-tflops 989] [--compile]``. Each part prints
how long it took; one that fails prints its error and the rest still run (exit status 1).
Without CUDA it says so and exits 0; ``--tiny`` runs the same code on the CPU with the
built-in tiny modules (64x64, 2 steps; tiny's SDXL for the SDXL table) as a dry run. On a
machine without a package index, docs/benchmarks.md says how to bring what it needs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_memory import PROMPT, _library, _sync, against_diffusers  # noqa: E402
from gpu_memory import run as memory_run  # noqa: E402
from gpu_memory import table as memory_table  # noqa: E402
from report import result  # noqa: E402

BATCHES = (1, 4, 8)
QUEUE_USERS = 8  # one-image requests put on the queue at once


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a CPU dry run with the tiny modules")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense fp16 peak")
    parser.add_argument("--compile", action="store_true", help="Atelier with [engine] compile = true")
    return parser.parse_args(argv)


def guided_step_flops(pipe: Any, size: int, device: Any, dtype: Any) -> tuple[float, float]:
    """FLOPs of one guided UNet step (the CFG pair) and of one VAE decode, counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet.config
    latent = torch.zeros(2, 4, size // 8, size // 8, device=device, dtype=dtype)
    context = torch.zeros(2, 77, unet.cross_attention_dim, device=device, dtype=dtype)
    extra: dict[str, Any] = {}
    if unet.addition_embed_type == "text_time":  # SDXL: the pooled text and the size conditioning
        pooled = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(2, pooled, device=device, dtype=dtype),
            "time_ids": torch.zeros(2, 6, device=device, dtype=dtype),
        }
    with torch.no_grad():
        with FlopCounterMode(display=False) as unet_count:
            pipe.unet(latent, torch.tensor([500.0], device=device), encoder_hidden_states=context, **extra)
        with FlopCounterMode(display=False) as vae_count:
            pipe.vae.decode(latent[:1])
    return float(unet_count.get_total_flops()), float(vae_count.get_total_flops())


def throughput(
    tiny: bool,
    device_name: str,
    steps: int,
    size: int,
    rounds: int,
    compile: bool = False,
    *,
    sdxl: bool = False,
    batches: tuple[int, ...] = BATCHES,
    queue_batches: tuple[int, ...] = (),
) -> dict[int, dict[str, float]]:
    """images/s of diffusers and of Atelier per batch size (medians of interleaved rounds);
    ``sdxl``: the SDXL base-sized model instead of the SD 1.5-sized one. Atelier's engine
    runs as ``[engine]`` runs it on this device: SDPA attention, channels-last UNet weights
    on CUDA, torch.compile with ``compile``. With ``queue_batches``, ``rates[-1]`` is the
    images/s through the queue at each of those ``max_batch`` values (``_through_queue``)."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler

    from pipeline.engine import Engine
    from pipeline.memory import MemorySettings
    from pipeline.request import GenerationRequest

    device = torch.device(device_name)
    dtype = torch.float32 if tiny else torch.float16
    library = _library(tiny, sdxl=sdxl, device=device_name)
    engine = Engine(
        library, device=device_name, dtype=dtype, memory_settings=MemorySettings(attention="sdpa"),
        compile=compile, channels_last=device.type == "cuda",
    )  # fmt: skip
    engine.generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=1, width=64, height=64))
    pipe = library.load("tiny")  # the modules the engine placed on the device
    plain_scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    rates: dict[int, dict[str, float]] = {}
    for batch in batches:
        request = GenerationRequest(
            prompt=PROMPT, seed=1234, num_inference_steps=steps, width=size, height=size,
            guidance_scale=7, sampler_name="Euler a", num_images_per_prompt=batch,
        )  # fmt: skip

        def atelier(request: GenerationRequest = request) -> float:
            _sync(device)
            started = time.perf_counter()
            engine.generate(request)
            _sync(device)
            return time.perf_counter() - started

        def plain(batch: int = batch) -> float:
            saved, pipe.scheduler = pipe.scheduler, plain_scheduler
            try:
                _sync(device)
                started = time.perf_counter()
                pipe(PROMPT, num_inference_steps=steps, width=size, height=size, guidance_scale=7,
                     num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(1234))  # fmt: skip
                _sync(device)
                return time.perf_counter() - started
            finally:
                pipe.scheduler = saved

        atelier()
        plain()  # warm both at this shape
        ours, theirs = [], []
        for number in range(rounds):
            pair = (atelier, plain) if number % 2 == 0 else (plain, atelier)
            times = {fn: fn() for fn in pair}
            ours.append(times[atelier])
            theirs.append(times[plain])
        rates[batch] = {
            "atelier_images_per_s": batch / statistics.median(ours),
            "diffusers_images_per_s": batch / statistics.median(theirs),
            "ratio": statistics.median(t / o for o, t in zip(ours, theirs, strict=True)),
        }
    unet_flops, vae_flops = guided_step_flops(pipe, size, device, dtype)
    rates[0] = {"unet_flops_per_guided_step": unet_flops, "vae_decode_flops": vae_flops}
    if queue_batches:
        rates[-1] = asyncio.run(_through_queue(engine, steps, size, rounds, queue_batches))
    return rates


async def _through_queue(
    engine: Any, steps: int, size: int, rounds: int, batches: tuple[int, ...]
) -> dict[str, float]:
    """images/s of 8 one-image requests from 8 users (each their own prompt, seed and CFG
    scale) put on the bot's queue at once, with ``[queue] max_batch`` at each of
    ``batches``: the micro-batches it forms across users, timed from the first put to the
    last result (the median of ``rounds``, after one warm round)."""
    from batching import Collector, timed_round

    from pipeline.queue import Job, LocalQueue
    from pipeline.request import GenerationRequest

    requests = [
        GenerationRequest(
            prompt=f"user {user}: {PROMPT}",
            seed=1000 + user,
            guidance_scale=5 + user % 4,
            width=size,
            height=size,
            num_inference_steps=steps,
            sampler_name="Euler a",
        )  # fmt: skip
        for user in range(QUEUE_USERS)
    ]
    rates: dict[str, float] = {}
    for batch in batches:
        collector = Collector()
        queue = LocalQueue([engine], collector, max_batch=batch, batch_window=0.5)
        await queue.start()
        try:
            times = []
            for number in range(rounds + 1):
                jobs = [Job(f"{batch}-{number}-{i}", f"user{i}", r) for i, r in enumerate(requests)]
                times.append(await timed_round(queue, collector, jobs))
        finally:
            await queue.stop()
        rates[f"max_batch{batch}"] = len(requests) / statistics.median(times[1:])
    return rates


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    import torch

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; nothing measured (use --tiny for a CPU dry run)")
        return 0
    steps, size = (2, 64) if args.tiny else (20, 512)
    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    figures: dict[str, Any] = {"device": where, "size": size, "steps": steps}

    def sd15() -> None:
        model = "tiny" if args.tiny else "SD 1.5-sized random weights, fp16"
        rates = throughput(args.tiny, device, steps, size, args.rounds, args.compile, queue_batches=BATCHES)
        queued = rates.pop(-1)
        title = f"{model}, {size}x{size}, {steps} steps Euler a, CFG 7, on {where}, torch {torch.__version__}"
        figures.update(_table(title, rates, steps, args.peak_tflops))
        gain = figures["batch8"]["atelier_images_per_s"] / figures["batch1"]["diffusers_images_per_s"]
        figures["batch8_over_diffusers_batch1"] = gain
        print(f"Atelier at batch 8 / diffusers at batch 1: {gain:.2f}x (target >= 1.5x)")
        print(
            f"\nThrough the queue: {QUEUE_USERS} users' one-image requests at once, micro-batched up to max_batch\n"
        )
        print("| max_batch | images/s | over max_batch 1 |")
        print("| ---: | ---: | ---: |")
        for batch in BATCHES:
            rate = queued[f"max_batch{batch}"]
            print(f"| {batch} | {rate:.2f} | {rate / queued['max_batch1']:.2f}x |")
        figures["queue"] = queued

    def sdxl() -> None:
        xl_size = 64 if args.tiny else 1024
        xl_model = "tiny SDXL" if args.tiny else "SDXL base-sized random weights, fp16"
        xl_rates = throughput(
            args.tiny, device, steps, xl_size, args.rounds, args.compile, sdxl=True, batches=(1,)
        )
        xl_title = f"{xl_model}, {xl_size}x{xl_size}, {steps} steps Euler a, CFG 7, on {where}"
        figures["sdxl"] = {"size": xl_size, **_table(xl_title, xl_rates, steps, args.peak_tflops)}

    sections = [("SD 1.5", sd15), ("SDXL", sdxl)]
    if not args.tiny:  # the memory modes' own dry run is bench/gpu_memory.py --tiny
        sections += [
            ("memory modes", lambda: print(memory_table(memory_run(False, device, steps, size), f"memory modes on {where}"))),
            ("diffusers' offloading", lambda: print(against_diffusers(False, device, steps, size, where))),
        ]  # fmt: skip
    failed = [name for name, run in sections if not _section(name, run)]
    figures["failed"] = failed
    result("gpu", figures)
    return 1 if failed else 0


def _section(name: str, run: Any) -> bool:
    """Run one part of the benchmark and say how long it took; a part that fails prints its
    error and the others still run (a GPU machine may be lent for minutes only)."""
    import traceback

    started = time.perf_counter()
    try:
        run()
    except Exception:
        traceback.print_exc()
        print(f"\n[{name}: failed after {time.perf_counter() - started:.0f} s]\n", flush=True)
        return False
    print(f"\n[{name}: {time.perf_counter() - started:.0f} s]\n", flush=True)
    return True


def _table(title: str, rates: dict[int, dict[str, float]], steps: int, peak_tflops: float) -> dict[str, Any]:
    """Print one model's table (images/s per batch, the FLOP floor fraction); its figures."""
    flops = rates.pop(0)
    per_image = steps * flops["unet_flops_per_guided_step"] + flops["vae_decode_flops"]
    print(f"### {title}\n")
    print("| batch | diffusers images/s | Atelier images/s | Atelier / diffusers | of the FLOP floor |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    figures: dict[str, Any] = {"tflop_per_image": per_image / 1e12}
    for batch, rate in rates.items():
        floor = rate["atelier_images_per_s"] * per_image / (peak_tflops * 1e12)
        print(
            f"| {batch} | {rate['diffusers_images_per_s']:.2f} | {rate['atelier_images_per_s']:.2f} | "
            f"{rate['ratio']:.2f} | {floor:.1%} |"
        )
        figures[f"batch{batch}"] = {**rate, "floor_fraction": floor}
    print(f"\nFLOPs per image: {per_image / 1e12:.2f} TFLOP ({flops['unet_flops_per_guided_step'] / 1e12:.2f} per "
          f"guided step, {flops['vae_decode_flops'] / 1e12:.2f} per decode); peak {peak_tflops:g} TFLOP/s")  # fmt: skip
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
