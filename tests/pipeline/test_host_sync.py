"""No sampling loop reads a tensor back to the host once per step (issue 16).

On a GPU every ``.item()``, ``float(t)``, ``if t > 0:``, ``.tolist()``, ``.cpu()`` ... of a
device tensor makes the host wait until the device has run everything queued before it,
so the host cannot queue the next step's kernels meanwhile. A CPU run cannot tell a device
tensor from a host one, so the counter here counts every such read-back of any tensor; the
loops are written to make none per step (host decisions read host copies of the schedule,
made once before the loop). Each sampler runs with N and 2N steps: what is read back
before the loop may stay, but the count must not grow with the steps.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pipeline import kdiffusion, samplers, timestep_samplers
from pipeline.request import GenerationRequest
from pipeline.samplers import sigma_schedule
from pipeline.sampling import SamplingContext

SHAPE = (2, 4, 4, 4)
SIGMA_RANGE = {"sigma_min": 0.0291675, "sigma_max": 14.614642}
# DPM adaptive sizes its next step from the error of the last one: every attempt has to
# read that error back before it can go on, and it ignores the step count anyway.
DATA_DEPENDENT = {"DPM adaptive"}

_READ_BACKS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.masked_select,
    torch.Tensor.masked_select,
}


def _to_host(args: tuple, kwargs: dict) -> bool:
    """``t.to("cpu")`` / ``t.to(device="cpu")`` named explicitly (``t.to(x.device)`` is the
    device's own, which a CPU run cannot tell apart)."""
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(target, str) and target.startswith("cpu")


def _bool_mask(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool


class ReadBacks(TorchFunctionMode):
    """Counts tensor reads into host values, with where in the project each happened."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if (
            func in _READ_BACKS
            or (func is torch.Tensor.to and _to_host(args, kwargs))
            or (func is torch.Tensor.__getitem__ and _bool_mask(args))
        ):
            self.sites[f"{getattr(func, '__name__', func)} at {_project_frame()}"] += 1
        return func(*args, **kwargs)


def _project_frame() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/pipeline/" in frame.filename or "/tests/" in frame.filename:
            return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.name}:{frame.lineno}"
    return "?"


def _context(**extra: object) -> SamplingContext:
    gen = torch.Generator().manual_seed(3)

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s2 = sigma.view(-1, 1, 1, 1) ** 2
        return (x * 0.25 + 0.3 * s2) / (s2 + 0.25)

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * torch.cos(t.view(-1, 1, 1, 1) / 300)

    return SamplingContext(
        model=model,
        eps_model=eps_model,
        alphas_cumprod=samplers.sd_alphas_cumprod(),
        noise=lambda: torch.randn(SHAPE, generator=gen),
        seeds=[11, 12],
        extra={"eps_model_cfgpp": lambda x, t: (eps_model(x, t), eps_model(x, t)), **extra},
    )


def _read_backs(run: Callable[[], Any]) -> ReadBacks:
    counter = ReadBacks()
    with counter:
        run()
    return counter


_Wrap = Callable[[SamplingContext], SamplingContext]


def _k_run(name: str, steps: int, *, wrap: _Wrap = lambda ctx: ctx, **extra: object) -> Callable[[], Any]:
    sigmas = sigma_schedule(name, "Automatic", steps).sigmas
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    return lambda: kdiffusion.SAMPLERS[name](x, sigmas, wrap(_context(**SIGMA_RANGE, **extra)))


def _t_run(name: str, steps: int, *, wrap: _Wrap = lambda ctx: ctx, **extra: object) -> Callable[[], Any]:
    timesteps = samplers.timesteps(name, steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    return lambda: timestep_samplers.SAMPLERS[name](x, timesteps, wrap(_context(**extra)))


def _assert_flat(short: ReadBacks, long: ReadBacks) -> None:
    grown = {site: n for site, n in long.sites.items() if n > short.sites.get(site, 0)}
    assert long.count == short.count, f"read-backs that grow with the steps: {grown}"


@pytest.mark.parametrize("name", [n for n in kdiffusion.SAMPLERS if n not in DATA_DEPENDENT])
def test_k_diffusion_loops_read_nothing_back_per_step(name: str) -> None:
    _assert_flat(_read_backs(_k_run(name, 4)), _read_backs(_k_run(name, 8)))


@pytest.mark.parametrize("name", ["Euler", "Heun", "DPM2"])
def test_churned_loops_read_nothing_back_per_step(name: str) -> None:
    churn = {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 10.0, "s_noise": 1.003}
    _assert_flat(_read_backs(_k_run(name, 4, **churn)), _read_backs(_k_run(name, 8, **churn)))


def test_restart_reads_nothing_back_per_step_through_its_restarts() -> None:
    # 20-35 steps restart once, 36 and more twice (a longer segment each time)
    _assert_flat(_read_backs(_k_run("Restart", 20)), _read_backs(_k_run("Restart", 40)))


def _eta(ctx: SamplingContext) -> SamplingContext:
    ctx.eta = 0.5  # DDIM's stochastic part on (it draws either way)
    return ctx


@pytest.mark.parametrize("name", list(timestep_samplers.SAMPLERS))
def test_timestep_loops_read_nothing_back_per_step(name: str) -> None:
    _assert_flat(_read_backs(_t_run(name, 4, wrap=_eta)), _read_backs(_t_run(name, 8, wrap=_eta)))


def test_dpm_adaptive_is_the_exception() -> None:
    """Its error control reads the error back every attempt (the exemption above is real)."""
    short, long = _read_backs(_k_run("DPM adaptive", 4)), _read_backs(_k_run("DPM adaptive", 8))
    assert short.count > 10 and long.count > 10


def test_the_counter_sees_a_per_step_read_back() -> None:
    """A loop that asks ``if sigma > 0`` every step is caught."""

    def naive(x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
        for i in range(len(sigmas) - 1):
            if sigmas[i + 1] > 0:
                x = x * 0.5
        return x

    def run(steps: int) -> Callable[[], Any]:
        sigmas = sigma_schedule("Euler", "Automatic", steps).sigmas
        return lambda: naive(torch.ones(SHAPE), sigmas, _context())

    short, long = _read_backs(run(4)), _read_backs(run(8))
    assert long.count == short.count + 4


@pytest.mark.parametrize("name", [*kdiffusion.SAMPLERS, *timestep_samplers.SAMPLERS])
def test_each_model_call_is_announced_with_its_own_level(name: str) -> None:
    """The host level a loop announces (what NGMS compares) is the σ or timestep the call gets."""
    pending: list[float] = []
    pairs: list[tuple[float | None, float]] = []

    def listening(ctx: SamplingContext) -> SamplingContext:
        def wrap(model: Callable[..., Any]) -> Callable[..., Any]:
            def call(x: torch.Tensor, level: torch.Tensor) -> Any:
                pairs.append((pending.pop() if pending else None, float(level[0])))
                return model(x, level)

            return call

        assert ctx.model is not None and ctx.eps_model is not None
        ctx.model, ctx.eps_model, ctx.level_hint = wrap(ctx.model), wrap(ctx.eps_model), pending.append
        ctx.extra["eps_model_cfgpp"] = wrap(ctx.extra["eps_model_cfgpp"])  # type: ignore[arg-type]
        return ctx

    if name in timestep_samplers.SAMPLERS:
        _t_run(name, 5, wrap=listening)()
    else:
        churn = {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 10.0} if name in ("Euler", "Heun", "DPM2") else {}
        _k_run(name, 21 if name == "Restart" else 5, wrap=listening, **churn)()
    assert pairs and not pending
    if name not in DATA_DEPENDENT:  # DPM adaptive announces nothing: it reads back anyway
        assert all(announced == level for announced, level in pairs), pairs


# --------------------------------------------------------------------------------------
# The whole engine path: CFG denoiser, timestep lookup, noise, progress (previews off)


def _request(name: str, steps: int, **changes: Any) -> GenerationRequest:
    return GenerationRequest(
        prompt="a cat",
        negative_prompt="blurry",
        width=64,
        height=64,
        seed=5,
        num_images_per_prompt=2,
        sampler_name=name,
        num_inference_steps=steps,
        **changes,
    )


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("Euler a", {}),
        ("DPM++ 2M", {"s_min_uncond": 5.0}),  # NGMS compares the announced host σ
        ("DPM++ SDE", {"s_min_uncond": 5.0, "s_min_uncond_all": True}),
        ("Heun", {"s_churn": 1.0, "skip_early_cond": 0.2}),
        ("DDIM", {"eta": 0.5, "s_min_uncond": 400.0}),
        ("UniPC", {"s_min_uncond": 400.0}),
        ("LCM", {}),
    ],
)
def test_engine_steps_read_nothing_back(engine: Any, name: str, changes: dict[str, Any]) -> None:
    progress: list[int] = []

    def run(steps: int) -> Callable[[], Any]:
        request = _request(name, steps, **changes)
        return lambda: engine.generate(request, on_progress=lambda step, total: progress.append(step))

    run(3)(), run(6)()  # warm what is cached per shape and per step count (kernels, schedules)
    short, long = _read_backs(run(3)), _read_backs(run(6))
    assert progress[-6:] == [1, 2, 3, 4, 5, 6]
    _assert_flat(short, long)


def test_only_preview_steps_read_back(tiny_library: Any) -> None:
    """A live preview reads its latents back to make a PNG; the steps between previews do not."""
    from pipeline.engine import Engine

    engine = Engine(tiny_library, device="cpu", preview_every=3)
    previews: list[int] = []

    def run(steps: int) -> Callable[[], Any]:
        request = _request("Euler a", steps)
        return lambda: engine.generate(request, on_preview=lambda step, png: previews.append(step))

    for steps in (4, 7, 13):
        run(steps)()
    previews.clear()
    one, two, four = _read_backs(run(4)), _read_backs(run(7)), _read_backs(run(13))
    assert previews == [3, 3, 6, 3, 6, 9, 12]
    per_preview = two.count - one.count
    assert per_preview > 0
    assert four.count - two.count == 2 * per_preview


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M", "DPM++ SDE", "DPM2 a", "DDIM", "UniPC"])
def test_no_loop_step_synchronises_the_gpu(name: str) -> None:
    """On CUDA the runtime itself reports synchronising calls (blocking copies included)."""
    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(3)
    ctx = _context()
    ctx.noise = lambda: torch.randn(SHAPE, generator=gen, device=device)
    if name in timestep_samplers.SAMPLERS:
        x = torch.randn(SHAPE, device=device)
        args: tuple = (x, samplers.timesteps(name, 6))
        loop: Callable[..., torch.Tensor] = timestep_samplers.SAMPLERS[name]
    else:
        sigmas = sigma_schedule(name, "Automatic", 6).sigmas
        x = torch.randn(SHAPE, device=device) * sigmas[0]
        args, loop = (x, sigmas), kdiffusion.SAMPLERS[name]
    steps: list[int] = []

    def checked_step(index: int, total: int) -> None:
        steps.append(index)
        if index == 0:
            torch.cuda.set_sync_debug_mode("error")  # setup is over: from here on, none

    ctx.callback = checked_step
    try:
        loop(*args, ctx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert steps
