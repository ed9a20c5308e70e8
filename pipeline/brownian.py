"""Brownian-tree noise for A1111's SDE samplers (A1111-SEMANTICS.md §8.5).

One torchsde ``BrownianTree`` per image, its entropy the image's seed, so an image's
noise does not depend on the batch it runs in; torchsde's own normal draws follow the
request's RNG source (but not ENSD).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from pipeline import rng
from pipeline.sampling import SamplingContext, host_values

_TORCHSDE_LOCK = threading.Lock()


@contextlib.contextmanager
def _tree_normals(source: str) -> Iterator[None]:
    """Route torchsde's normal draws through our RNG sources while the block runs.

    torchsde makes every draw as ``_randn(size, dtype, device, seed)`` with a fresh
    ``torch.Generator(device)`` seeded by a seed it derives from the tree's entropy and
    the interval. A1111 replaces that function for good with ``randn_local(seed, size)``,
    a fresh generator of the selected RNG source (no ENSD). We swap the same function in
    only around our own tree calls and put the original back afterwards, holding a lock
    so our swaps never interleave. A "GPU" source on a non-CUDA device draws on the CPU,
    as A1111 does (``rng.effective_source``). With the CPU source on a CPU float32 tree the
    draws equal torchsde's own.
    """
    from torchsde._brownian import brownian_interval as module

    def draw(size: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
        generator = rng.Generator(int(seed), rng.effective_source(source, device))
        return rng.to_device(generator.draw(tuple(size)), device, dtype)

    with _TORCHSDE_LOCK, warnings.catch_warnings():
        # torchsde warns, then clamps, when a query lies a rounding error outside the
        # tree (σ's recomputed as exp(−(−log σ)) do); A1111 gets the same clamped values.
        warnings.filterwarnings("ignore", message="Should have", category=UserWarning, module=r"torchsde\.")
        original = module._randn
        module._randn = draw
        try:
            yield
        finally:
            module._randn = original


class BrownianNoiseSampler:
    """k-diffusion's ``BrownianTreeNoiseSampler`` as A1111 builds it: one tree per image.

    Each tree spans t ∈ [σ_min, σ_max] (the smallest non-zero and the largest σ of the
    schedule), starts at zero with one image's shape and uses that image's seed as its
    entropy, so an image's noise does not depend on the rest of the batch. A call returns
    the normalised increment ``(W(σ_next) − W(σ)) / √|σ_next − σ|`` per image (the sign
    follows the direction of the query). A tree is a deterministic function of its seed,
    so building the trees on first use changes no value; it only saves the work when
    nothing is drawn (η = 0).
    """

    def __init__(
        self, x: torch.Tensor, sigmas: torch.Tensor, seeds: Sequence[int], source: str = "CPU"
    ) -> None:
        if len(seeds) != x.shape[0]:
            raise ValueError(
                f"Brownian samplers need one seed per image: got {len(seeds)} for a batch of {x.shape[0]}"
            )
        rng.effective_source(source, x.device)  # validates the source name early
        self._seeds = [int(s) for s in seeds]
        self._source = source
        self._w0 = torch.zeros_like(x[0])
        # the tree's ends as host floats (torchsde walks its tree on the host), read back once
        sigma_min, sigma_max = host_values([sigmas[sigmas > 0].min(), sigmas.max()])
        self._t0, self._t1, self._sign = _sorted(sigma_min, sigma_max)
        self._trees: list[Any] | None = None

    @classmethod
    def from_context(
        cls, x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext
    ) -> BrownianNoiseSampler:
        return cls(x, sigmas, ctx.seeds, ctx.rng_source)

    def _build(self) -> list[Any]:
        import torchsde  # imported here: only the Brownian samplers need it

        return [torchsde.BrownianTree(self._t0, self._w0, self._t1, entropy=seed) for seed in self._seeds]

    def __call__(
        self, sigma: torch.Tensor, sigma_next: torch.Tensor, *, host: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """The increment from σ to σ_next. The tree is looked up at the σ's host values:
        ``host`` when the caller has them, else the tensors are read back (a wait on the
        device when they live there)."""
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high, sign = _sorted(*(host if host is not None else (float(t0), float(t1))))
        with _tree_normals(self._source):
            if self._trees is None:
                self._trees = self._build()
            w = torch.stack([tree(low, high) for tree in self._trees]) * (self._sign * sign)
        return w / (t1 - t0).abs().sqrt()


def _sorted(a: float, b: float) -> tuple[float, float, int]:
    return (a, b, 1) if a < b else (b, a, -1)
