"""What does a live preview cost per step?

Builds the ``tiny`` checkpoint once and interleaves, in one process, rounds of the same
request without previews and with a preview on every step (the worst case; the default
is every 5th). Prints the median time of one preview (x0 of the step, the cheap
latent-to-RGB mix, PNG encoding), the median step time without previews, the preview as
a fraction of a step (target under 2 %), and the median per-round ratio of a whole job
with previews against one without.

Usage: ``python bench/preview_cost.py [--rounds N] [--steps 8] [--size 128] [--batch 1] [--device cpu]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import pin_threads

    pin_threads()

    import torch

    from pipeline import previews
    from pipeline.checkpoints import CheckpointLibrary
    from pipeline.engine import Engine
    from pipeline.request import GenerationRequest

    engine = Engine(CheckpointLibrary(None), device=args.device)
    request = GenerationRequest(
        prompt="a lighthouse at dusk",
        seed=1234,
        num_inference_steps=args.steps,
        width=args.size,
        height=args.size,
        num_images_per_prompt=args.batch,
        sampler_name="Euler a",
    )
    preview_seconds: list[float] = []
    encode = previews.batch_preview_png

    def timed_encode(latents: torch.Tensor, *, sdxl: bool = False) -> bytes:
        started = time.perf_counter()
        png = encode(latents, sdxl=sdxl)
        preview_seconds.append(time.perf_counter() - started)
        return png

    previews.batch_preview_png = timed_encode

    def run(every: int) -> float:
        engine.preview_every = every
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        engine.generate(request, on_preview=(lambda _step, _png: None) if every else None)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for _ in range(args.warmup):
        run(0)
        run(1)
    preview_seconds.clear()
    plain, previewed = [], []
    for round_index in range(args.rounds):
        # Alternate which goes first so drift hits both alike.
        order = (0, 1) if round_index % 2 == 0 else (1, 0)
        times = {every: run(every) for every in order}
        plain.append(times[0])
        previewed.append(times[1])
    previews.batch_preview_png = encode

    step = statistics.median(plain) / args.steps
    one = statistics.median(preview_seconds)
    ratios = [p / q for p, q in zip(previewed, plain, strict=True)]
    print(
        f"device={args.device} size={args.size}x{args.size} batch={args.batch} steps={args.steps} "
        f"rounds={args.rounds} torch_threads={torch.get_num_threads()}"
    )
    print(f"one preview              median {one * 1000:.3f} ms ({len(preview_seconds)} previews)")
    print(f"one step, no previews    median {step * 1000:.3f} ms")
    print(f"preview / step           {100 * one / step:.2f} % (target < 2 %)")
    print(f"job with/without         median ratio {statistics.median(ratios):.3f} (a preview on every step)")
    from report import result

    result(
        "preview_cost",
        {"preview_ms": one * 1000, "step_ms": step * 1000, "fraction": one / step,
         "job_ratio": statistics.median(ratios), "size": args.size, "steps": args.steps},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
