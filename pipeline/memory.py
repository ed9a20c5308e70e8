"""Memory modes, attention backend, VAE precision and the residency budget of one device.

What A1111's command-line switches do, as ``[engine]`` settings (docs/memory.md):

* ``normal``: every component of a loaded checkpoint stays on the compute device.
* ``medvram`` (model offload): the components live on the CPU; the text encoder(s), the
  UNet and the VAE are each moved to the device for their part of a job and back after.
* ``lowvram`` (sequential offload): the components live on the CPU and only a block at a
  time is on the device: forward hooks move each block (the UNet's down/mid/up blocks, the
  text encoder's layers, the VAE's encoder/decoder blocks) in before its forward and out
  after it. The hooks are installed for one use of a component and removed after it.
* ``no_half_vae``: the VAE runs in float32 whatever the model precision (``--no-half-vae``).
* ``attention``: PyTorch SDPA (diffusers' default processor) or xformers, an optional
  extra used only on CUDA.

Moving weights never changes them, and a batch is always decoded one image at a time, so
all three modes give the same pixels for the same request. On a CPU-only machine the
moves are no-ops, but the same code runs (and is counted in :class:`OffloadStats`).

Weights are moved with ``inference_mode`` off: parameters created inside it would become
inference tensors, which the LoRA restore (an in-place copy after the job) cannot write.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import latents as latents_module
from pipeline import vae as vae_module
from pipeline.passes import LATENT_FACTOR

__all__ = [
    "ATTENTION_BACKENDS",
    "MEMORY_MODES",
    "DeviceMemory",
    "MemorySettings",
    "OffloadStats",
    "Residency",
    "SettingError",
    "budget_bytes",
    "lower_mode",
    "move_module",
    "offload_units",
    "precision_name",
    "resolve_attention",
    "text_encoders",
]

MEMORY_MODES = ("normal", "medvram", "lowvram")
ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")
# With memory_budget_gb = 0, a CUDA device keeps checkpoints in up to this share of its memory;
# the rest is for activations.
AUTO_BUDGET_SHARE = 0.8
_GIB = 1024**3
_CPU = torch.device("cpu")
_PRECISION_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


class SettingError(ValueError):
    """A memory/attention setting this machine cannot honour; ``key`` names the setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class MemorySettings:
    """The engine's memory settings (``[engine]`` in config.toml).

    ``oom_retry`` is off by default for an engine built in code; the bot's config turns it
    on. ``vae_tile`` is the tile edge in latents (64 = 512 px, what the SD VAE was trained on).
    """

    mode: str = "normal"
    attention: str = "auto"
    no_half_vae: bool = False
    vae_tiling_pixels: int = 0
    budget_gb: float = 0.0
    oom_retry: bool = False
    vae_tile: int = vae_module.TILE_LATENTS

    def __post_init__(self) -> None:
        if self.mode not in MEMORY_MODES:
            raise SettingError("memory_mode", f"memory mode must be one of {', '.join(MEMORY_MODES)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise SettingError("attention", f"attention must be one of {', '.join(ATTENTION_BACKENDS)}")
        if self.vae_tiling_pixels < 0 or self.budget_gb < 0 or self.vae_tile < 2:
            raise ValueError("vae_tiling_pixels and budget_gb must be >= 0, vae_tile >= 2")


def lower_mode(mode: str) -> str:
    """The mode an out-of-memory job is retried in: one step down, lowvram stays lowvram."""
    return MEMORY_MODES[min(MEMORY_MODES.index(mode) + 1, len(MEMORY_MODES) - 1)]


def precision_name(dtype: torch.dtype) -> str:
    return _PRECISION_NAMES.get(dtype, str(dtype).removeprefix("torch."))


# --------------------------------------------------------------------------------------
# Attention


def _xformers_importable() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # not installed, or built for another torch/CUDA
        return False
    return True


def resolve_attention(setting: str, device: torch.device) -> str:
    """``"sdpa"`` or ``"xformers"`` for ``setting`` on ``device``.

    ``auto`` takes xformers only when it imports and the device is CUDA. An explicit
    ``xformers`` that cannot run raises :class:`SettingError` (the bot fails at startup).
    """
    if setting == "sdpa":
        return "sdpa"
    cuda = device.type == "cuda"
    if setting == "auto":
        return "xformers" if cuda and _xformers_importable() else "sdpa"
    if not cuda:
        raise SettingError(
            "attention", f'attention = "xformers" needs a CUDA device; this engine runs on {device}'
        )
    if not _xformers_importable():
        raise SettingError(
            "attention",
            'attention = "xformers" but the xformers package is not installed or does not load '
            '(pip install "atelier[xformers]"), or set attention = "auto" or "sdpa"',
        )
    return "xformers"


# --------------------------------------------------------------------------------------
# Residency budget


def _component_modules(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's torch modules by component name (unet, vae, text_encoder, ...)."""
    components = getattr(pipe, "components", {}) or {}
    return {name: m for name, m in components.items() if isinstance(m, torch.nn.Module)}


def text_encoders(pipe: Any) -> list[torch.nn.Module]:
    """The text encoder(s) a job's conditioning runs (SDXL has two)."""
    found = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    return [module for module in found if isinstance(module, torch.nn.Module)]


@dataclass(frozen=True)
class Residency:
    """How many bytes of device memory loaded checkpoints may occupy together.

    A checkpoint's cost is its parameter and buffer bytes at the engine's dtype (the VAE at
    its own). There is none in medvram/lowvram: checkpoints stay on the CPU there.
    """

    budget_bytes: int
    dtype: torch.dtype = torch.float32
    vae_dtype: torch.dtype = torch.float32

    def cost(self, pipe: Any) -> int:
        total = 0
        for name, module in _component_modules(pipe).items():
            dtype = self.vae_dtype if name == "vae" else self.dtype
            for tensor in (*module.parameters(), *module.buffers()):
                size = dtype.itemsize if tensor.is_floating_point() else tensor.element_size()
                total += tensor.numel() * size
        return total

    def fits(self, pipes: Iterable[Any]) -> bool:
        return sum(self.cost(pipe) for pipe in pipes) <= self.budget_bytes


def budget_bytes(device: torch.device, budget_gb: float) -> tuple[int | None, str]:
    """The residency budget and how the startup log describes it; None: no byte budget."""
    if budget_gb > 0:
        return int(budget_gb * _GIB), f"{budget_gb:g} GiB"
    if device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory
        return int(total * AUTO_BUDGET_SHARE), (
            f"{total * AUTO_BUDGET_SHARE / _GIB:.1f} GiB ({AUTO_BUDGET_SHARE:.0%} of {total / _GIB:.1f} GiB)"
        )
    return None, "none"


# --------------------------------------------------------------------------------------
# Offload


@dataclass
class OffloadStats:
    """What offloading did: ``moves`` counts module transfers between the CPU and the compute
    device (both ways); ``hooks_installed`` the lowvram hook pairs ever installed, and
    ``hooks_active`` those installed right now (0 between jobs)."""

    moves: int = 0
    hooks_installed: int = 0
    hooks_active: int = 0


def _has_own_tensors(module: torch.nn.Module) -> bool:
    return bool((*module.parameters(recurse=False), *module.buffers(recurse=False)))


def offload_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks lowvram moves one at a time: each element of a ``ModuleList``/``Sequential``
    (down/up blocks, encoder layers), and each other child, entered when it holds such lists
    itself (the VAE's encoder and decoder, mid blocks). A module with tensors of its own is
    never entered, so every tensor is moved by the hook of the unit that uses it."""
    if _has_own_tensors(module):
        return [module]
    units: list[torch.nn.Module] = []
    for child in module.children():
        if isinstance(child, torch.nn.ModuleList | torch.nn.Sequential):
            units.extend(child.children())
        elif any(isinstance(c, torch.nn.ModuleList | torch.nn.Sequential) for c in child.children()):
            units.extend(offload_units(child))
        else:
            units.append(child)
    return units


def move_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """``module.to(device, dtype)`` with inference mode off (see the module docstring).

    The dtype is passed only when it changes something: diffusers warns on every cast."""
    if dtype is not None and all(p.dtype == dtype for p in module.parameters() if p.is_floating_point()):
        dtype = None
    if dtype is None and all(
        t.device == device for t in itertools.chain(module.parameters(), module.buffers())
    ):
        return  # already there: ``to`` would still walk every submodule, on every job
    with torch.inference_mode(False), torch.no_grad():
        if dtype is None:
            module.to(device)
        else:
            module.to(device, dtype)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if type(value) is tuple:
        return tuple(_to_device(v, device) for v in value)
    if type(value) is list:
        return [_to_device(v, device) for v in value]
    if type(value) is dict:
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _device_of(module: torch.nn.Module) -> torch.device | None:
    tensor = next(iter((*module.parameters(), *module.buffers())), None)
    return None if tensor is None else tensor.device


class DeviceMemory:
    """One engine's memory settings put to work: placement, offload, decode, budget, log line.

    The engine runs each job as one or two *attempts* (:meth:`attempts`); an attempt places
    the pipeline for its mode, and within it :meth:`using` brings a component to the
    device for one use. Not thread-safe: the engine's lock serialises jobs.
    """

    def __init__(
        self, device: torch.device, dtype: torch.dtype, settings: MemorySettings | None = None
    ) -> None:
        self.settings = settings if settings is not None else MemorySettings()
        self.device = device
        self.dtype = dtype
        self.vae_dtype = torch.float32 if self.settings.no_half_vae else dtype
        self.attention = resolve_attention(self.settings.attention, device)
        self.mode = self.settings.mode
        self.tiling = False
        self.stats = OffloadStats()
        budget, self._budget_text = budget_bytes(device, self.settings.budget_gb)
        self.residency: Residency | None = None
        if self.settings.mode != "normal":
            self._budget_text = f"none ({self.settings.mode} keeps checkpoints on the CPU)"
        elif budget is not None:
            self.residency = Residency(budget, dtype=dtype, vae_dtype=self.vae_dtype)

    def describe(self, max_loaded: int) -> str:
        """The startup log line's fields."""
        budget = f"none (max_loaded {max_loaded})" if self._budget_text == "none" else self._budget_text
        return (
            f"device {self.device}, precision {precision_name(self.dtype)}, "
            f"VAE {precision_name(self.vae_dtype)}, attention {self.attention}, "
            f"memory mode {self.settings.mode}, memory budget {budget}"
        )

    def _storage(self, mode: str) -> torch.device:
        return _CPU if mode != "normal" else self.device

    # -- placement ---------------------------------------------------------------------

    def prepare(self, pipe: Any) -> None:
        """A newly loaded pipeline at this engine's dtypes, where the base mode keeps it."""
        storage = self._storage(self.settings.mode)
        for name, module in _component_modules(pipe).items():
            move_module(module, storage, self.vae_dtype if name == "vae" else self.dtype)
        if self.attention == "xformers":
            pipe.enable_xformers_memory_efficient_attention()

    def attempts(self) -> list[tuple[str, bool]]:
        """(mode, force VAE tiling) of each try: the base mode, then one lower with tiling."""
        first = (self.settings.mode, False)
        return [first, (lower_mode(self.settings.mode), True)] if self.settings.oom_retry else [first]

    @contextlib.contextmanager
    def attempt(self, pipe: Any, mode: str, tiling: bool) -> Iterator[None]:
        """Run one try in ``mode``: components (the swapped-in VAE included) are placed for it.

        Nothing is moved back on exit: after an out-of-memory error the device may still be
        full; the next job's attempt places the pipeline for its own mode."""
        self.mode, self.tiling = mode, tiling
        storage = self._storage(mode)
        for module in _component_modules(pipe).values():
            move_module(module, storage)
        try:
            yield
        finally:
            self.mode, self.tiling = self.settings.mode, False

    def _move(self, module: torch.nn.Module, device: torch.device) -> None:
        self.stats.moves += 1
        move_module(module, device)

    # -- use -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def using(self, *modules: torch.nn.Module) -> Iterator[None]:
        """``modules`` ready to run on the compute device for the block (current attempt's mode)."""
        if self.mode == "medvram":
            for module in modules:
                self._move(module, self.device)
            try:
                yield
            finally:
                for module in modules:
                    self._move(module, _CPU)
        elif self.mode == "lowvram":
            with contextlib.ExitStack() as stack:
                for module in modules:
                    stack.enter_context(self._sequential(module))
                yield
        else:
            yield

    @contextlib.contextmanager
    def _sequential(self, module: torch.nn.Module) -> Iterator[None]:
        """Hooks that bring each unit of ``module`` (and its inputs) to the device for its own
        forward and send it back after; removed, and every unit back on the CPU, on exit."""
        units = offload_units(module)
        handles = []
        for unit in units:
            handles.append(unit.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            handles.append(unit.register_forward_hook(self._post_hook))
        self.stats.hooks_installed += len(units)
        self.stats.hooks_active += len(units)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.stats.hooks_active -= len(units)
            for unit in units:  # a unit whose forward raised is still on the device
                if _device_of(unit) not in (None, _CPU):
                    self._move(unit, _CPU)

    def _pre_hook(
        self, unit: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        self._move(unit, self.device)
        return _to_device(args, self.device), _to_device(kwargs, self.device)

    def _post_hook(self, unit: torch.nn.Module, _args: Any, _output: Any) -> None:
        self._move(unit, _CPU)

    # -- VAE -----------------------------------------------------------------------------

    def decode(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents: one image at a time, tiled above
        ``vae_tiling_pixels`` (or in an out-of-memory retry), float32 again on NaN/black."""
        height, width = (side * LATENT_FACTOR for side in latents.shape[-2:])
        threshold = self.settings.vae_tiling_pixels
        tiled = self.tiling or (threshold > 0 and width * height > threshold)
        with self.using(vae):
            return vae_module.decode_batch(
                vae, latents, latents_module.decode, tile=self.settings.vae_tile if tiled else None
            )

    def encode(self, vae: Any, images: torch.Tensor, *, scaled: bool = True) -> torch.Tensor:
        with self.using(vae):
            return latents_module.encode(vae, images, scaled=scaled)
