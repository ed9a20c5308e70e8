from __future__ import annotations

import math
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch

from pipeline.rng import Generator, ImageRNG, effective_source, philox_randn, slerp

CUDA = torch.cuda.is_available()


def reference_philox(seed: int, offset: int, count: int) -> list[float]:
    """Element-by-element philox written straight from §8.2, to check the vectorised one."""
    mask = 0xFFFFFFFF
    two_m32 = float(np.float32(2.3283064e-10))
    angle = float(np.float32(2.3283064e-10 * 6.2831855))
    out = []
    for i in range(count):
        c = [offset & mask, 0, i, 0]
        k0, k1 = seed & mask, (seed >> 32) & mask
        for r in range(10):
            p0 = c[0] * 0xD2511F53
            p1 = c[2] * 0xCD9E8D57
            c = [(p1 >> 32) ^ c[1] ^ k0, p1 & mask, (p0 >> 32) ^ c[3] ^ k1, p0 & mask]
            if r < 9:
                k0 = (k0 + 0x9E3779B9) & mask
                k1 = (k1 + 0xBB67AE85) & mask
        u = c[0] * two_m32 + two_m32 / 2
        v = c[1] * angle + angle / 2
        out.append(float(np.float32(math.sqrt(-2.0 * math.log(u)) * math.sin(v))))
    return out


def cpu_stream(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


# --- NV (philox) -------------------------------------------------------------------------


def test_nv_parity_example() -> None:
    noise = Generator(0, "NV").randn((3, 4))
    assert noise.dtype == torch.float32
    assert noise.shape == (3, 4)
    expected = torch.tensor([-0.92466241, -0.42534396, -2.6438458, 0.14518388])
    torch.testing.assert_close(noise.flatten()[:4], expected, atol=2e-6, rtol=0)


def test_nv_matches_cuda_docstring_values() -> None:
    # torch.randn((3, 4), device="cuda") after manual_seed(0), as printed to 4 decimals.
    expected = torch.tensor(
        [
            [-0.9247, -0.4253, -2.6438, 0.1452],
            [-0.1209, -0.5797, -0.6229, -0.3284],
            [-1.0745, -0.3631, -1.6711, 2.2655],
        ]
    )
    torch.testing.assert_close(Generator(0, "NV").randn((3, 4)), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 1234, 2**32 - 1, 2**32 + 7, 2**63, 2**64 - 1])
@pytest.mark.parametrize("offset", [0, 1, 5])
def test_nv_vectorised_equals_scalar_reference(seed: int, offset: int) -> None:
    got = philox_randn(seed, offset, (2, 3, 5)).flatten().tolist()
    assert got == pytest.approx(reference_philox(seed, offset, 30), abs=1e-7)


def test_nv_stream_advances_offset_per_call() -> None:
    gen = Generator(42, "NV")
    first = gen.randn((4, 8, 8))
    second = gen.randn((2,))
    third = gen.randn((4, 8, 8))
    assert torch.equal(first, philox_randn(42, 0, (4, 8, 8)))
    assert torch.equal(second, philox_randn(42, 1, (2,)))
    assert torch.equal(third, philox_randn(42, 2, (4, 8, 8)))
    assert not torch.equal(first, third)


def test_nv_element_index_is_c_order() -> None:
    # Same counter block, so a longer draw starts with the shorter one.
    short = Generator(7, "NV").randn((5,))
    long = Generator(7, "NV").randn((2, 10))
    assert torch.equal(long.flatten()[:5], short)


def _calls_made(draw: Callable[[], object]) -> int:
    """How many Python and C functions ``draw`` calls."""
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        draw()
    finally:
        sys.setprofile(None)
    return calls


def test_nv_draws_are_vectorised() -> None:
    """The philox stream is computed on whole tensors: a full latent takes as many calls
    as a tiny one (a loop per element would take 4,096 times more)."""
    tiny = _calls_made(lambda: Generator(2**64 - 1, "NV").randn((4, 2, 2)))
    full = _calls_made(lambda: Generator(2**64 - 1, "NV").randn((4, 128, 128)))
    assert 0 < full <= tiny + 10


def test_nv_full_latent_is_normal() -> None:
    noise = Generator(2**64 - 1, "NV").randn((4, 128, 128))
    assert noise.shape == (4, 128, 128)
    assert noise.dtype == torch.float32
    assert abs(noise.mean().item()) < 0.02
    assert abs(noise.std().item() - 1.0) < 0.02


def test_nv_odd_shapes() -> None:
    assert Generator(3, "NV").randn(()).shape == ()
    assert Generator(3, "NV").randn((0, 4)).shape == (0, 4)
    assert Generator(3, "NV").randn(torch.Size([1, 4, 3, 3])).shape == (1, 4, 3, 3)


# --- CPU -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 4294967293, 2**63 + 11, 2**64 - 1])
def test_cpu_equals_torch_generator_stream(seed: int) -> None:
    gen = Generator(seed, "CPU")
    shapes = [(4, 16, 16), (3,), (2, 5), (4, 16, 16)]
    got = [gen.randn(shape) for shape in shapes]
    for g, e in zip(got, cpu_stream(seed, *shapes), strict=True):
        assert g.dtype == torch.float32
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, atol=1e-6, rtol=0)


def test_cpu_negative_seed_wraps_like_torch() -> None:
    torch.testing.assert_close(Generator(-1, "CPU").randn((5,)), cpu_stream(2**64 - 1, (5,))[0])


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_seed_out_of_range(seed: int, source: str) -> None:
    with pytest.raises(ValueError, match="seed"):
        Generator(seed, source)


def test_non_integer_seed_rejected() -> None:
    with pytest.raises(ValueError, match="integer"):
        Generator(1.5, "CPU")  # type: ignore[arg-type]


@pytest.mark.parametrize("source", ["gpu", "cuda", "", "Philox"])
def test_unknown_source(source: str) -> None:
    with pytest.raises(ValueError, match="unknown RNG source"):
        Generator(1, source)
    with pytest.raises(ValueError, match="unknown RNG source"):
        ImageRNG((4, 8, 8), [1], source=source)


# --- GPU -----------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="CUDA is available")
def test_gpu_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="needs CUDA"):
        Generator(1, "GPU")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        Generator(1)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        ImageRNG((4, 8, 8), [1])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_equals_cuda_randn_and_nv_first_draw() -> None:
    gen = Generator(1234, "GPU")
    first, second = gen.randn((4, 64, 64)), gen.randn((4, 64, 64))
    cuda_gen = torch.Generator("cuda").manual_seed(1234)
    expected = [torch.randn((4, 64, 64), generator=cuda_gen, device="cuda").cpu() for _ in range(2)]
    assert first.device.type == "cpu"
    torch.testing.assert_close(first, expected[0], atol=0, rtol=0)
    torch.testing.assert_close(second, expected[1], atol=0, rtol=0)
    # The NV source exists to reproduce this on a CPU (§8.2); CUDA's fast float32 intrinsics differ a
    # little (measured on an H100, torch 2.11: <= 7e-6 over 4x128x128, first four draws alike).
    torch.testing.assert_close(philox_randn(1234, 0, (4, 64, 64)), first, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    ("source", "device", "expected"),
    [
        ("GPU", "cuda", "GPU"),
        ("GPU", "cuda:1", "GPU"),
        ("GPU", "cpu", "CPU"),
        ("GPU", "mps", "CPU"),
        ("GPU", torch.device("cpu"), "CPU"),
        ("CPU", "cuda", "CPU"),
        ("NV", "cpu", "NV"),
        ("NV", "cuda", "NV"),
    ],
)
def test_effective_source(source: str, device: str, expected: str) -> None:
    assert effective_source(source, device) == expected


def test_effective_source_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown RNG source"):
        effective_source("XPU", "cpu")


def test_effective_cpu_fallback_is_torch_randn_on_cpu() -> None:
    # What A1111 draws for "GPU" on a CPU device: torch.randn on the CPU with a seeded generator.
    source = effective_source("GPU", "cpu")
    gen = torch.Generator("cpu").manual_seed(99)
    expected = torch.randn((4, 8, 8), device="cpu", generator=gen)
    assert torch.equal(Generator(99, source).randn((4, 8, 8)), expected)


# --- slerp ---------------------------------------------------------------------------------


def reference_slerp(val: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """§8.4 in float64 with explicit loops over (channel, column)."""
    channels, height, width = low.shape
    out = np.empty_like(low, dtype=np.float64)
    dots = np.empty((channels, width))
    for c in range(channels):
        for w in range(width):
            a, b = low[c, :, w].astype(np.float64), high[c, :, w].astype(np.float64)
            dots[c, w] = np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b))
    if dots.mean() > 0.9995:
        return low * val + high * (1 - val)
    for c in range(channels):
        for w in range(width):
            omega = math.acos(dots[c, w])
            so = math.sin(omega)
            out[c, :, w] = (
                math.sin((1 - val) * omega) / so * low[c, :, w] + math.sin(val * omega) / so * high[c, :, w]
            )
    return out


@pytest.mark.parametrize("strength", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_slerp_matches_reference(strength: float) -> None:
    low, high = cpu_stream(1, (4, 6, 5))[0], cpu_stream(2, (4, 6, 5))[0]
    got = slerp(strength, low, high)
    assert got.dtype == torch.float32
    assert got.shape == (4, 6, 5)
    expected = reference_slerp(strength, low.numpy(), high.numpy())
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=0)


def test_slerp_endpoints() -> None:
    low, high = cpu_stream(3, (4, 16, 16))[0], cpu_stream(4, (4, 16, 16))[0]
    torch.testing.assert_close(slerp(0.0, low, high), low, atol=1e-5, rtol=0)
    torch.testing.assert_close(slerp(1.0, low, high), high, atol=1e-5, rtol=0)


def test_slerp_normalises_along_height() -> None:
    # Column vectors along H: scaling one whole (channel, column) vector must not change its angle.
    low, high = cpu_stream(5, (2, 8, 3))[0], cpu_stream(6, (2, 8, 3))[0]
    scaled = low.clone()
    scaled[:, :, 1] *= 3.0
    base, other = slerp(0.4, low, high), slerp(0.4, scaled, high)
    torch.testing.assert_close(other[:, :, 0], base[:, :, 0])
    torch.testing.assert_close(other[:, :, 2], base[:, :, 2])


def test_slerp_near_identical_uses_reversed_weights() -> None:
    x = cpu_stream(7, (4, 8, 8))[0]
    low, high = x, 2.0 * x  # parallel: every normalised dot is 1
    got = slerp(0.25, low, high)
    torch.testing.assert_close(got, low * 0.25 + high * 0.75)
    # An ordinary lerp would give 0.75·low + 0.25·high = 1.25·x, not 1.75·x.
    torch.testing.assert_close(got, 1.75 * x)


# --- ImageRNG ------------------------------------------------------------------------------

SHAPE = (4, 8, 8)


def test_image_rng_plain_batch_is_per_image_streams() -> None:
    rng = ImageRNG(SHAPE, [10, 11, 12], source="CPU")
    first, second = rng.next(), rng.next()
    assert first.shape == (3, *SHAPE)
    assert first.dtype == torch.float32
    for i, seed in enumerate([10, 11, 12]):
        expected_first, expected_second = cpu_stream(seed, SHAPE, SHAPE)
        assert torch.equal(first[i], expected_first)
        assert torch.equal(second[i], expected_second)


def test_image_rng_noise_is_independent_of_batch_composition() -> None:
    alone = ImageRNG(SHAPE, [11], source="NV")
    batch = ImageRNG(SHAPE, [10, 11], source="NV")
    for _ in range(3):
        assert torch.equal(alone.next()[0], batch.next()[1])


def test_image_rng_nv_source() -> None:
    rng = ImageRNG(SHAPE, [0, 5], source="NV")
    first, second = rng.next(), rng.next()
    assert torch.equal(first[1], philox_randn(5, 0, SHAPE))
    assert torch.equal(second[0], philox_randn(0, 1, SHAPE))


def test_image_rng_variation() -> None:
    rng = ImageRNG(SHAPE, [100, 100], subseeds=[200, 201], subseed_strength=0.3, source="CPU")
    first, second = rng.next(), rng.next()
    for i, subseed in enumerate([200, 201]):
        expected = slerp(0.3, cpu_stream(100, SHAPE)[0], cpu_stream(subseed, SHAPE)[0])
        torch.testing.assert_close(first[i], expected, atol=1e-6, rtol=0)
        # Later draws continue the image seed's stream, not the subseed's.
        assert torch.equal(second[i], cpu_stream(100, SHAPE, SHAPE)[1])


def test_image_rng_fewer_subseeds_than_images_uses_zero() -> None:
    rng = ImageRNG(SHAPE, [100, 100, 100], subseeds=[200], subseed_strength=0.5, source="CPU")
    noise = rng.next()
    seed_noise = cpu_stream(100, SHAPE)[0]
    torch.testing.assert_close(noise[0], slerp(0.5, seed_noise, cpu_stream(200, SHAPE)[0]))
    torch.testing.assert_close(noise[1], slerp(0.5, seed_noise, cpu_stream(0, SHAPE)[0]))
    torch.testing.assert_close(noise[2], noise[1])


def test_image_rng_empty_subseed_list_still_varies() -> None:
    noise = ImageRNG(SHAPE, [3], subseeds=[], subseed_strength=0.5, source="CPU").next()
    torch.testing.assert_close(noise[0], slerp(0.5, cpu_stream(3, SHAPE)[0], cpu_stream(0, SHAPE)[0]))


@pytest.mark.parametrize(("subseeds", "strength"), [(None, 0.5), ([9], 0.0)])
def test_image_rng_no_variation_without_subseeds_or_strength(
    subseeds: list[int] | None, strength: float
) -> None:
    noise = ImageRNG(SHAPE, [3], subseeds=subseeds, subseed_strength=strength, source="CPU").next()
    assert torch.equal(noise[0], cpu_stream(3, SHAPE)[0])


def test_resize_seed_from_pastes_smaller_noise_in_centre() -> None:
    # 32x32 px -> 4x4 latent noise, centred in the 8x8 latent at offset (2, 2).
    rng = ImageRNG(SHAPE, [5], seed_resize_from_h=32, seed_resize_from_w=32, source="CPU")
    first, second = rng.next(), rng.next()
    small = cpu_stream(5, (4, 4, 4))[0]
    full_first, full_second = cpu_stream(5, SHAPE, SHAPE)
    expected = full_first.clone()
    expected[:, 2:6, 2:6] = small
    assert torch.equal(first[0], expected)
    # The image generator drew exactly once (the full-size x), so the next draw is its second.
    assert torch.equal(second[0], full_second)


def test_resize_seed_from_non_square_with_odd_margin() -> None:
    # Target 6 high x 9 wide; noise 2 high (16 px) x 4 wide (32 px): dy = 2, dx = (9-4)//2 = 2.
    shape = (4, 6, 9)
    noise = ImageRNG(shape, [8], seed_resize_from_h=16, seed_resize_from_w=32, source="CPU").next()[0]
    expected = cpu_stream(8, shape)[0].clone()
    expected[:, 2:4, 2:6] = cpu_stream(8, (4, 2, 4))[0]
    assert torch.equal(noise, expected)


def test_resize_seed_from_crops_larger_noise() -> None:
    # 96 px high -> 12, 80 px wide -> 10: dy = -2, dx = -1, the whole target is covered.
    noise = ImageRNG(SHAPE, [5], seed_resize_from_h=96, seed_resize_from_w=80, source="NV").next()[0]
    big = philox_randn(5, 0, (4, 12, 10))
    assert torch.equal(noise, big[:, 2:10, 1:9])


def test_resize_seed_from_odd_crop_leaves_a_fresh_column() -> None:
    # 88 px wide -> 11: dx = (8-11)//2 = -2, so only 11-4 = 7 columns are copied (source 2..8).
    noise = ImageRNG(SHAPE, [5], seed_resize_from_h=64, seed_resize_from_w=88, source="CPU").next()[0]
    big = cpu_stream(5, (4, 8, 11))[0]
    fresh = cpu_stream(5, SHAPE)[0]
    assert torch.equal(noise[:, :, :7], big[:, :, 2:9])
    assert torch.equal(noise[:, :, 7], fresh[:, :, 7])


def test_resize_seed_from_with_variation() -> None:
    rng = ImageRNG(
        SHAPE,
        [5],
        subseeds=[6],
        subseed_strength=0.5,
        seed_resize_from_h=32,
        seed_resize_from_w=32,
        source="CPU",
    )
    noise = rng.next()[0]
    blended = slerp(0.5, cpu_stream(5, (4, 4, 4))[0], cpu_stream(6, (4, 4, 4))[0])
    torch.testing.assert_close(noise[:, 2:6, 2:6], blended)
    assert torch.equal(noise[:, 0, :], cpu_stream(5, SHAPE)[0][:, 0, :])


@pytest.mark.parametrize(("h", "w"), [(0, 32), (32, 0), (-8, 64)])
def test_resize_needs_both_values(h: int, w: int) -> None:
    noise = ImageRNG(SHAPE, [5], seed_resize_from_h=h, seed_resize_from_w=w, source="CPU").next()
    assert torch.equal(noise[0], cpu_stream(5, SHAPE)[0])


def test_resize_to_same_size_is_plain_noise() -> None:
    rng = ImageRNG(SHAPE, [5], seed_resize_from_h=64, seed_resize_from_w=64, source="CPU")
    first, second = rng.next(), rng.next()
    expected = cpu_stream(5, SHAPE, SHAPE)
    assert torch.equal(first[0], expected[0])
    assert torch.equal(second[0], expected[1])


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_ensd_changes_only_later_draws(source: str) -> None:
    plain = ImageRNG(SHAPE, [1000, 1001], source=source)
    shifted = ImageRNG(SHAPE, [1000, 1001], source=source, ensd=31337)
    assert torch.equal(plain.next(), shifted.next())
    second, third = shifted.next(), shifted.next()
    for i, seed in enumerate([1000, 1001]):
        gen = Generator(seed + 31337, source)
        assert torch.equal(second[i], gen.randn(SHAPE))
        assert torch.equal(third[i], gen.randn(SHAPE))
    assert not torch.equal(second, plain.next())


def test_ensd_applies_after_variation_initial_noise() -> None:
    kwargs = {"subseeds": [7], "subseed_strength": 0.2, "source": "CPU"}
    plain = ImageRNG(SHAPE, [3], **kwargs)
    shifted = ImageRNG(SHAPE, [3], ensd=-2, **kwargs)
    assert torch.equal(plain.next(), shifted.next())
    assert torch.equal(shifted.next()[0], cpu_stream(1, SHAPE)[0])


def test_image_rng_no_seeds() -> None:
    rng = ImageRNG(SHAPE, [], source="CPU")
    assert rng.next().shape == (0, *SHAPE)
    assert rng.next().shape == (0, *SHAPE)


def test_image_rng_hires_restart_is_first_draw_at_larger_size() -> None:
    # §8.6: a fresh ImageRNG at the hires shape starts from each seed's first draw again.
    ImageRNG(SHAPE, [4], source="NV").next()
    hires = ImageRNG((4, 16, 16), [4], source="NV").next()
    assert torch.equal(hires[0], philox_randn(4, 0, (4, 16, 16)))
