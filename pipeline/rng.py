"""Noise generation with A1111's seed semantics (A1111-SEMANTICS.md §8).

Three sources exist because an image is only reproducible when the noise comes from
the same algorithm that made it: "GPU" is CUDA's own ``torch.randn``, "CPU" is torch's
CPU generator, and "NV" is a CPU reimplementation of CUDA's philox stream so CPU-only
hosts can reproduce GPU seeds (§8.2).

The engine should call :func:`effective_source` before building generators: A1111 on a
CPU (or Apple MPS) device draws "GPU" noise with the CPU generator, and so must we. The
:class:`Generator` itself refuses "GPU" without CUDA rather than silently substituting,
so a parity caller never gets CPU noise labelled as GPU noise.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

SOURCES = ("GPU", "CPU", "NV")

_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)

# Philox-4x32 constants (§8.2).
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_ROUNDS = 10

# Box–Muller constants, as the float32 values CUDA uses, evaluated in float64 (§8.2).
_TWO_POW_M32 = float(np.float32(2.3283064e-10))
_TWO_POW_M33 = float(np.float32(2.3283064e-10) / np.float32(2.0))
_ANGLE_SCALE = float(np.float32(2.3283064e-10 * 6.2831855))

# A1111 hard-codes the VAE's 8x downscale when turning "seed resize from" pixels into latents.
_LATENT_FACTOR = 8


def _check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"unknown RNG source {source!r}; expected one of {', '.join(SOURCES)}")
    return source


def _normalise_seed(seed: int) -> int:
    """Map a seed to torch's unsigned 64-bit seed space.

    torch's ``manual_seed`` takes negative values down to -2**63 and wraps them mod 2**64;
    doing the same here keeps CPU and NV generators keyed by the same 64-bit value.
    """
    try:
        value = operator.index(seed)
    except TypeError:
        raise ValueError(f"seed must be an integer, got {type(seed).__name__}") from None
    if not _SEED_MIN <= value <= _SEED_MAX:
        raise ValueError(f"seed must be in {_SEED_MIN}..{_SEED_MAX}, got {value}")
    return value % 2**64


def _shape_tuple(shape: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(operator.index(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape dimensions must be >= 0, got {dims}")
    return dims


def effective_source(source: str, device: str | torch.device) -> str:
    """The source A1111 actually uses on ``device``.

    A1111 draws "GPU" noise with ``torch.randn`` on the compute device, and on MPS it uses
    the CPU; on a CPU device that is exactly the "CPU" source. So "GPU" stays "GPU" only on
    a CUDA device. The infotext should still record the requested source, as A1111 does.
    """
    _check_source(source)
    device_type = torch.device(device).type
    if source == "GPU" and device_type != "cuda":
        return "CPU"
    return source


def philox_randn(seed: int, offset: int, shape: Sequence[int]) -> torch.Tensor:
    """One NV draw: normal float32 noise for counter block ``offset`` (§8.2).

    Vectorised over elements with uint64 arithmetic so a full latent takes milliseconds.
    """
    dims = _shape_tuple(shape)
    key_seed = _normalise_seed(seed)
    count = math.prod(dims)
    c0 = np.full(count, offset & 0xFFFFFFFF, dtype=np.uint64)
    c1 = np.zeros(count, dtype=np.uint64)
    c2 = np.arange(count, dtype=np.uint64)
    c3 = np.zeros(count, dtype=np.uint64)
    k0 = key_seed & 0xFFFFFFFF
    k1 = key_seed >> 32
    for round_index in range(_ROUNDS):
        p0 = c0 * _M0
        p1 = c2 * _M1
        c0 = (p1 >> _SHIFT32) ^ c1 ^ np.uint64(k0)
        c1 = p1 & _MASK32
        c2 = (p0 >> _SHIFT32) ^ c3 ^ np.uint64(k1)
        c3 = p0 & _MASK32
        if round_index < _ROUNDS - 1:
            k0 = (k0 + _W0) & 0xFFFFFFFF
            k1 = (k1 + _W1) & 0xFFFFFFFF
    u = c0.astype(np.float64) * _TWO_POW_M32 + _TWO_POW_M33
    v = c1.astype(np.float64) * _ANGLE_SCALE + _ANGLE_SCALE / 2
    values = np.sqrt(-2.0 * np.log(u)) * np.sin(v)
    return torch.from_numpy(values.astype(np.float32).reshape(dims))


class Generator:
    """One noise stream; successive :meth:`randn` calls continue it (§8.1, §8.2)."""

    def __init__(self, seed: int, source: str = "GPU") -> None:
        self.source = _check_source(source)
        self.seed = _normalise_seed(seed)
        self._offset = 0
        self._torch_gen: torch.Generator | None = None
        if source == "GPU":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    'RNG source "GPU" needs CUDA, which is not available; use "CPU" or "NV" '
                    "(see pipeline.rng.effective_source for A1111's CPU-device fallback)"
                )
            self._torch_gen = torch.Generator("cuda").manual_seed(self.seed)
        elif source == "CPU":
            self._torch_gen = torch.Generator("cpu").manual_seed(self.seed)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """Draw standard-normal float32 noise of exactly ``shape``, on the CPU."""
        return self.draw(shape).cpu()

    def draw(self, shape: Sequence[int]) -> torch.Tensor:
        """:meth:`randn` left where it was drawn: "GPU" noise stays on its GPU (reading it
        back would make the host wait for the device), the others are on the CPU."""
        dims = _shape_tuple(shape)
        if self.source == "NV":
            out = philox_randn(self.seed, self._offset, dims)
            self._offset += 1
            return out
        assert self._torch_gen is not None
        device = self._torch_gen.device
        return torch.randn(dims, generator=self._torch_gen, device=device, dtype=torch.float32)


def to_device(
    tensor: torch.Tensor, device: str | torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``tensor.to(device, dtype)`` without making the host wait: a CPU tensor bound for a
    CUDA device is staged in pinned memory and copied asynchronously, since a plain copy
    from pageable memory first waits for everything queued on the device to finish."""
    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device=device, dtype=dtype, non_blocking=True)
    return tensor.to(device=device, dtype=dtype)


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Blend seed noise ``low`` towards variation noise ``high`` (§8.4).

    Vectors run along dim 1 (height for a ``(C, H, W)`` latent), matching A1111; the
    near-parallel fallback keeps A1111's swapped weights on purpose.
    """
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:
        return low * strength + high * (1 - strength)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    low_weight = (torch.sin((1.0 - strength) * omega) / sin_omega).unsqueeze(1)
    high_weight = (torch.sin(strength * omega) / sin_omega).unsqueeze(1)
    return low_weight * low + high_weight * high


def _paste_centred(noise: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Centre ``noise`` in ``target`` (pasting if smaller, cropping if larger), as §8.3 step 5."""
    height, width = target.shape[-2], target.shape[-1]
    h, w = noise.shape[-2], noise.shape[-1]
    dx = (width - w) // 2
    dy = (height - h) // 2
    copy_w = w if dx >= 0 else w + 2 * dx
    copy_h = h if dy >= 0 else h + 2 * dy
    ty, tx = max(dy, 0), max(dx, 0)
    sy, sx = max(-dy, 0), max(-dx, 0)
    out = target.clone()
    out[..., ty : ty + copy_h, tx : tx + copy_w] = noise[..., sy : sy + copy_h, sx : sx + copy_w]
    return out


class ImageRNG:
    """Per-image noise for one batch (§8.3).

    Every image owns a generator, so per-step sampler noise depends only on that image's
    seed and not on what else shares the batch.
    """

    def __init__(
        self,
        shape: Sequence[int],
        seeds: Sequence[int],
        *,
        subseeds: Sequence[int] | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from_h: int = 0,
        seed_resize_from_w: int = 0,
        source: str = "GPU",
        ensd: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        """``device``: where :meth:`next` returns the noise (None: the CPU). Per-step "GPU"
        noise then never leaves the GPU, and CPU noise goes up without a wait."""
        self.shape = _shape_tuple(shape)
        self.device = None if device is None else torch.device(device)
        if len(self.shape) < 2:
            raise ValueError(f"shape must have at least 2 dimensions (C, H, W), got {self.shape}")
        self.seeds = [operator.index(s) for s in seeds]
        self.subseeds = None if subseeds is None else [operator.index(s) for s in subseeds]
        self.subseed_strength = subseed_strength
        self.seed_resize_from_h = seed_resize_from_h
        self.seed_resize_from_w = seed_resize_from_w
        self.source = _check_source(source)
        self.ensd = ensd
        self.generators = [Generator(seed, source) for seed in self.seeds]
        self.is_first = True

    def _noise_shape(self) -> tuple[int, ...]:
        if self.seed_resize_from_h <= 0 or self.seed_resize_from_w <= 0:
            return self.shape
        return (
            *self.shape[:-2],
            int(self.seed_resize_from_h) // _LATENT_FACTOR,
            int(self.seed_resize_from_w) // _LATENT_FACTOR,
        )

    def _subseed(self, index: int) -> int | None:
        if self.subseeds is None or self.subseed_strength == 0:
            return None
        return self.subseeds[index] if index < len(self.subseeds) else 0

    def _first_noise(self, index: int) -> torch.Tensor:
        seed = self.seeds[index]
        generator = self.generators[index]
        noise_shape = self._noise_shape()
        resizing = noise_shape != self.shape
        if resizing:
            noise = Generator(seed, self.source).randn(noise_shape)
        else:
            noise = generator.randn(noise_shape)
        subseed = self._subseed(index)
        if subseed is not None:
            subnoise = Generator(subseed, self.source).randn(noise_shape)
            noise = slerp(self.subseed_strength, noise, subnoise)
        if resizing:
            noise = _paste_centred(noise, generator.randn(self.shape))
        return noise

    def _stack(self, noises: list[torch.Tensor]) -> torch.Tensor:
        if not noises:
            return torch.zeros((0, *self.shape), dtype=torch.float32)
        return torch.stack(noises).to(torch.float32)

    def _deliver(self, noise: torch.Tensor) -> torch.Tensor:
        return noise.cpu() if self.device is None else to_device(noise, self.device)

    def next(self) -> torch.Tensor:
        """Initial noise on the first call, per-step sampler noise afterwards."""
        if not self.is_first:
            return self._deliver(self._stack([gen.draw(self.shape) for gen in self.generators]))
        self.is_first = False
        noise = self._stack([self._first_noise(i) for i in range(len(self.seeds))])
        if self.ensd != 0:
            # ENSD only shifts later draws: the initial latent above is already fixed.
            self.generators = [Generator(seed + self.ensd, self.source) for seed in self.seeds]
        return self._deliver(noise)
