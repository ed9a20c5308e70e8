"""How much does Atelier's engine add on top of a bare diffusers call?

Builds the ``tiny`` pipeline once and interleaves, in one process, rounds of
(a) ``Engine.generate`` and (b) a plain ``pipe(prompt, ...)`` call with the same scheduler
(Euler a), size, steps and CFG scale, after warming both up. Prints the per-image
median of each and the ratio atelier/bare (the target is <= 1.05).

Usage: ``python bench/engine_overhead.py [--rounds N] [--steps 8] [--size 128] [--device cpu]``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

logger = logging.getLogger("bench.engine_overhead")

PROMPT = "a watercolour painting of a lighthouse at dusk, soft light"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = _parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import pin_threads, result

    pin_threads()

    import torch
    from diffusers import EulerAncestralDiscreteScheduler

    from pipeline.checkpoints import CheckpointLibrary
    from pipeline.engine import Engine
    from pipeline.request import GenerationRequest

    library = CheckpointLibrary(None)
    engine = Engine(library, device=args.device)
    request = GenerationRequest(
        prompt=PROMPT,
        seed=1234,
        num_inference_steps=args.steps,
        width=args.size,
        height=args.size,
        guidance_scale=7,
        sampler_name="Euler a",
        rng="CPU",
    )
    # The pipeline object the engine uses, prepared on its device by the warm-up.
    engine.generate(request)
    pipe = library.load("tiny")
    # The same scheduler and configuration the engine picked for Euler a.
    bare_scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    engine_scheduler = pipe.scheduler

    def run_atelier() -> float:
        _sync(args.device)
        started = time.perf_counter()
        engine.generate(request)
        _sync(args.device)
        return time.perf_counter() - started

    def run_bare() -> float:
        pipe.scheduler = bare_scheduler
        generator = torch.Generator("cpu").manual_seed(1234)
        _sync(args.device)
        started = time.perf_counter()
        pipe(
            PROMPT,
            num_inference_steps=args.steps,
            width=args.size,
            height=args.size,
            guidance_scale=7,
            generator=generator,
        )
        _sync(args.device)
        elapsed = time.perf_counter() - started
        pipe.scheduler = engine_scheduler
        return elapsed

    for _ in range(args.warmup):
        run_atelier()
        run_bare()
    atelier, bare = [], []
    for round_index in range(args.rounds):
        # Alternate which goes first so drift (thermal, caches) hits both alike.
        if round_index % 2:
            bare.append(run_bare())
            atelier.append(run_atelier())
        else:
            atelier.append(run_atelier())
            bare.append(run_bare())

    atelier_median = statistics.median(atelier)
    bare_median = statistics.median(bare)
    logger.info(
        "device=%s size=%dx%d steps=%d rounds=%d torch_threads=%d",
        args.device,
        args.size,
        args.size,
        args.steps,
        args.rounds,
        torch.get_num_threads(),
    )
    logger.info("atelier Engine.generate  median %.2f ms/image", atelier_median * 1000)
    logger.info("bare diffusers pipe()    median %.2f ms/image", bare_median * 1000)
    ratio = statistics.median(a / b for a, b in zip(atelier, bare, strict=True))
    logger.info("ratio atelier/bare       %.3f (median of per-round ratios; target <= 1.05)", ratio)
    result(
        "engine_overhead",
        {"atelier_ms": atelier_median * 1000, "diffusers_ms": bare_median * 1000, "ratio": ratio,
         "size": args.size, "steps": args.steps, "threads": torch.get_num_threads()},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
