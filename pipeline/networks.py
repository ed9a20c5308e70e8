"""LoRA and hypernetworks from ``<lora:…>`` / ``<hypernet:…>`` prompt tags (A1111 §5, §11, §13).

LoRAs are applied by patching the weights they touch for the duration of one generate
call: ``W + multiplier · (alpha/rank) · up @ down``, summed in float32 over every tagged
LoRA and added once per module. The original tensors are kept aside and copied back
afterwards, so the model is bit-for-bit the base model again (and a strength of 0 never
touches a weight). This avoids ``peft`` and works the same for Linear and Conv2d layers.

Hypernetworks transform the context that enters the k and v projections of every UNet
attention block (self- and cross-attention, §11, §16.12) through forward pre-hooks on
``to_k``/``to_v`` (``pipeline.hypernetwork.hypernetwork_hooks``); the hooks are removed when
the call ends.

Files: ``<models_dir>/Lora/**/*.safetensors|.pt|.ckpt`` and
``<models_dir>/hypernetworks/**/*.pt``, named by their file stem, read through
:mod:`pipeline.safe_load` like every model file, so nothing in them is executed.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from pipeline import extra_networks
from pipeline.errors import EngineError
from pipeline.hashing import HashCache

if TYPE_CHECKING:  # torch and the hypernetwork modules load when a network is applied
    import torch

    from pipeline.hypernetwork import Hypernetwork

logger = logging.getLogger(__name__)

__all__ = [
    "HYPERNETWORK_SUBDIR",
    "LORA_SUBDIR",
    "ActiveNetworks",
    "HypernetTag",
    "LoraTag",
    "NetworkLibrary",
    "UnknownNetwork",
    "kohya_targets",
    "lora_deltas",
    "network_tags",
]

LORA_SUBDIR = "Lora"
HYPERNETWORK_SUBDIR = "hypernetworks"
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
HYPERNETWORK_EXTENSIONS = (".pt",)

_LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


@dataclass(frozen=True)
class _Kind:
    tag: str  # the prompt tag: <lora:...>, <hypernet:...>
    name: str  # as UnknownNetwork names it
    subdir: str
    extensions: tuple[str, ...]


_LORA = _Kind("lora", "lora", LORA_SUBDIR, LORA_EXTENSIONS)
_HYPERNET = _Kind("hypernet", "hypernetwork", HYPERNETWORK_SUBDIR, HYPERNETWORK_EXTENSIONS)
_KINDS = (_LORA, _HYPERNET)


class UnknownNetwork(EngineError):
    """A prompt tagged a LoRA / hypernetwork (``kind``) that is not in the models folder."""

    key = "error.unknown_network"

    def __init__(self, name: str, kind: str, available: list[str]) -> None:
        super().__init__(
            f"unknown {kind} {name!r}; available: {', '.join(available) or '(none)'}",
            name=name,
            kind=kind,
            available=", ".join(available) or "-",
        )


# --------------------------------------------------------------------------------------
# Tags


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float
    unet: float


@dataclass(frozen=True)
class HypernetTag:
    name: str
    multiplier: float


def _float(value: str, tag: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"<{tag}:…> multiplier {value!r} is not a number") from None


def _lora_tag(params: extra_networks.ExtraNetworkParams) -> LoraTag:
    """§5: name, te multiplier (1), unet multiplier (= te); ``te=``/``unet=`` override.

    The unet default is the *positional* te, computed before the named overrides, so
    ``<lora:x:te=0.5>`` keeps unet at 1.
    """
    if not params.positional:
        raise ValueError(f"<lora:{':'.join(params.items)}> has no network name")
    pos = params.positional
    te = _float(pos[1], "lora") if len(pos) > 1 else 1.0
    unet = _float(pos[2], "lora") if len(pos) > 2 else te
    te = _float(params.named["te"], "lora") if "te" in params.named else te
    unet = _float(params.named["unet"], "lora") if "unet" in params.named else unet
    return LoraTag(pos[0], te, unet)


def _hypernet_tag(params: extra_networks.ExtraNetworkParams) -> HypernetTag:
    if not params.positional:
        raise ValueError(f"<hypernet:{':'.join(params.items)}> has no network name")
    pos = params.positional
    return HypernetTag(pos[0], _float(pos[1], "hypernet") if len(pos) > 1 else 1.0)


def network_tags(prompt: str) -> tuple[list[LoraTag], list[HypernetTag]]:
    """The LoRA and hypernetwork tags of ``prompt``, in prompt order (other tags are ignored)."""
    _text, found = extra_networks.parse(prompt)
    loras = [_lora_tag(params) for params in found.get("lora", [])]
    hypernets = [_hypernet_tag(params) for params in found.get("hypernet", [])]
    return loras, hypernets


# --------------------------------------------------------------------------------------
# Files


def _scan(folder: Path | None, extensions: tuple[str, ...]) -> dict[str, Path]:
    """Name (file stem) → file, recursive, sorted case-insensitively like A1111's lists."""
    if folder is None or not folder.is_dir():
        return {}
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions]
    found: dict[str, Path] = {}
    for path in sorted(files, key=lambda p: str(p).casefold()):
        found.setdefault(path.stem, path)
    return found


def _resolve(name: str, files: Mapping[str, Path], kind: str) -> tuple[str, Path]:
    """An exact name first, then a case-insensitive one (chat users rarely match case)."""
    if name in files:
        return name, files[name]
    folded = name.casefold()
    for candidate, path in files.items():
        if candidate.casefold() == folded:
            return candidate, path
    raise UnknownNetwork(name, kind, sorted(files, key=str.casefold))


def _recorded_file(folder: Path | None, kind: _Kind, relative: str | None) -> Path | None:
    """A recorded file (relative to ``folder``) when it is one of the folder's network files
    of ``kind``; None otherwise (none recorded, removed since, or not a path inside it)."""
    if folder is None or not relative:
        return None
    parts = PurePosixPath(relative)
    if parts.is_absolute() or ".." in parts.parts or parts.suffix.lower() not in kind.extensions:
        return None
    path = folder.joinpath(*parts.parts)
    return path if path.is_file() else None


class NetworkLoadError(EngineError):
    """A LoRA or hypernetwork file exists but is not one (wrong layout, shapes that do not fit)."""

    key = "error.network_load"

    def __init__(self, path: Path, kind: str, reason: str) -> None:
        super().__init__(
            f"could not load {kind} {path.name}: {reason}", name=path.name, kind=kind, reason=reason
        )


def load_tensors(path: Path) -> dict[Any, Any]:
    """A network file's dict, read by :func:`pipeline.safe_load.read_model_file` (the one
    path for every model file: format decided from the bytes, pickles through the
    allow-list, nothing in the file executed). Hypernetwork dicts keep their non-tensor
    metadata (layer structure, activation ...)."""
    from pipeline.safe_load import read_model_file

    data = read_model_file(path)
    if not isinstance(data, dict):
        raise NetworkLoadError(path, "network", f"it holds a {type(data).__name__}, not a dict of weights")
    return data


# --------------------------------------------------------------------------------------
# LoRA weights


@dataclass(frozen=True)
class LoraPair:
    """One patched module's low-rank factors (kohya layout)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    def delta(self, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        """``(alpha/rank) · up @ down`` in float32 and ``shape``; None when the shapes don't fit.

        Linear and 1x1/3x3 Conv2d downs work with a 1x1 (or 2-D) up; the kernel comes from
        the down projection. The sizes are compared before the product is formed, so a file
        cannot make this allocate more than the weight it patches.
        """
        import torch

        if self.up.dim() == 4 and self.up.shape[2:] != (1, 1):
            return None
        rank = self.down.shape[0]
        if self.up.shape[0] * (self.down.numel() // rank) != shape.numel():
            return None
        down = self.down.to(device, torch.float32).reshape(rank, -1)
        up = self.up.to(device, torch.float32).reshape(self.up.shape[0], rank)
        scale = 1.0 if self.alpha is None else self.alpha / rank
        return (up @ down).reshape(shape) * scale


def lora_pairs(state: Mapping[Any, Any]) -> dict[str, LoraPair]:
    """Group ``<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` by module key.

    Raises ``ValueError`` naming the module when its factors cannot be a LoRA's (not
    floating-point tensors, not 2-D or 4-D, ranks that differ, an alpha that is not one
    finite number), so a bad file fails when loaded rather than in the middle of a job.
    """
    parts: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            continue
        for suffix in _LORA_SUFFIXES:
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[suffix] = value
                break
    pairs: dict[str, LoraPair] = {}
    for module, found in parts.items():
        down, up = found.get(".lora_down.weight"), found.get(".lora_up.weight")
        if down is None or up is None:
            logger.warning("LoRA module %s lacks its down or up weight; skipped", module)
            continue
        _check_factors(module, down, up)
        pairs[module] = LoraPair(down, up, _alpha(module, found.get(".alpha")))
    return pairs


def _check_factors(module: str, down: Any, up: Any) -> None:
    import torch

    for what, factor in (("down", down), ("up", up)):
        if (
            not isinstance(factor, torch.Tensor)
            or not factor.is_floating_point()
            or factor.dim() not in (2, 4)
        ):
            raise ValueError(f"module {module[:120]}: its {what} weight is not a 2-D or 4-D float tensor")
    if down.shape[0] < 1 or up.shape[1] != down.shape[0]:
        raise ValueError(f"module {module[:120]}: its up and down weights have different ranks")


def _alpha(module: str, alpha: Any) -> float | None:
    import torch

    if alpha is None:
        return None
    if isinstance(alpha, torch.Tensor) and alpha.numel() == 1 and not alpha.is_complex():
        if alpha.is_meta:  # a folder scan checks shapes only; the value is read on load
            return None
        value = float(alpha)
    elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        value = float(alpha)
    else:
        raise ValueError(f"module {module[:120]}: its alpha is not one number")
    if not math.isfinite(value):
        raise ValueError(f"module {module[:120]}: its alpha is not a finite number")
    return value


def _ldm_unet_name(key: str, layers_per_block: int) -> str:
    """A1111/LDM UNet attention names (``input_blocks_4_1_…``) as diffusers names."""
    step = layers_per_block + 1

    def down(match: re.Match[str]) -> str:
        index = int(match.group(1)) - 1
        return f"down_blocks_{index // step}_attentions_{index % step}_"

    def up(match: re.Match[str]) -> str:
        index = int(match.group(1))
        return f"up_blocks_{index // step}_attentions_{index % step}_"

    key = re.sub(r"^lora_unet_input_blocks_(\d+)_1_", lambda m: "lora_unet_" + down(m), key)
    key = re.sub(r"^lora_unet_output_blocks_(\d+)_1_", lambda m: "lora_unet_" + up(m), key)
    return re.sub(r"^lora_unet_middle_block_1_", "lora_unet_mid_block_attentions_0_", key)


def kohya_targets(pipe: Any) -> dict[str, tuple[torch.nn.Module, str]]:
    """kohya key (``lora_unet_…`` / ``lora_te_…``) → (module, ``"unet"`` or ``"te"``).

    kohya names a module by its diffusers path with ``.`` → ``_``; text-encoder paths are
    written under ``text_model.``, which newer transformers no longer has, so it is added.
    """
    import torch

    targets: dict[str, tuple[torch.nn.Module, str]] = {}
    encoders = [("lora_te_", getattr(pipe, "text_encoder", None))]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders = [("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)]
    for prefix, encoder in encoders:
        if encoder is None:
            continue
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear):
                path = name if name.startswith("text_model.") else f"text_model.{name}"
                targets[prefix + path.replace(".", "_")] = (module, "te")
    for name, module in pipe.unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            targets["lora_unet_" + name.replace(".", "_")] = (module, "unet")
    return targets


def lora_deltas(
    pipe: Any, loras: list[tuple[LoraTag, dict[str, LoraPair]]]
) -> dict[torch.nn.Module, torch.Tensor]:
    """The summed float32 weight change per module for all ``loras`` at their multipliers."""

    targets = kohya_targets(pipe)
    layers = int(getattr(pipe.unet.config, "layers_per_block", 2))
    totals: dict[torch.nn.Module, torch.Tensor] = {}
    for tag, pairs in loras:
        unmatched = 0
        for key, pair in pairs.items():
            target = targets.get(key) or targets.get(_ldm_unet_name(key, layers))
            if target is None:
                unmatched += 1
                continue
            module, part = target
            multiplier = tag.te if part == "te" else tag.unet
            if multiplier == 0:
                continue
            delta = pair.delta(module.weight.shape, module.weight.device)
            if delta is None:
                unmatched += 1
                continue
            total = totals.get(module)
            totals[module] = delta * multiplier if total is None else total + delta * multiplier
        if unmatched:
            logger.warning(
                "LoRA %s: %d of %d modules did not match the model", tag.name, unmatched, len(pairs)
            )
    return totals


@contextmanager
def patched_weights(deltas: Mapping[torch.nn.Module, torch.Tensor]) -> Iterator[None]:
    """Add each delta to its module's weight; copy the saved originals back on exit."""
    import torch

    backups: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for module, delta in deltas.items():
                weight = module.weight
                backups.append((weight, weight.detach().clone()))
                weight.copy_((weight.float() + delta).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for weight, original in backups:
                weight.copy_(original)


# --------------------------------------------------------------------------------------
# One request's networks


@dataclass
class ActiveNetworks:
    """The networks one request's prompt tags, loaded and ready to apply."""

    loras: list[tuple[LoraTag, dict[str, LoraPair]]] = field(default_factory=list)
    hypernets: list[Hypernetwork] = field(default_factory=list)
    lora_hashes: list[tuple[str, str]] = field(default_factory=list)

    def infotext_fields(self) -> dict[str, str]:
        """``Lora hashes: "name: hash, …"`` with ``:`` and ``,`` removed from names (§13).

        The tags themselves stay in the prompt (§5); hypernetworks add no field.
        """
        if not self.lora_hashes:
            return {}
        entries: dict[str, str] = {}
        for name, short in self.lora_hashes:
            entries.setdefault(name.replace(":", "").replace(",", ""), short)
        return {"Lora hashes": ", ".join(f"{name}: {short}" for name, short in entries.items())}

    @contextmanager
    def applied(self, pipe: Any, device: torch.device | None = None) -> Iterator[None]:
        """The pipeline with these networks on; exactly the base model again afterwards.

        ``device`` is where the UNet computes, when it differs from where its weights are
        kept between uses (medvram/lowvram, ``pipeline.memory``)."""
        if not self.loras and not self.hypernets:
            yield
            return
        unet = pipe.unet
        for network in self.hypernets:
            network.to(device if device is not None else unet.device, unet.dtype)
        from pipeline.hypernetwork import hypernetwork_hooks

        with patched_weights(lora_deltas(pipe, self.loras)), hypernetwork_hooks(unet, self.hypernets):
            yield


class NetworkLibrary:
    """Finds, loads and caches LoRA and hypernetwork files under ``models_dir``.

    Loaded files are cached by (path, size, mtime), so a replaced file is read again.
    """

    def __init__(self, models_dir: Path | None, *, hashes: HashCache | None = None) -> None:
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.hashes = hashes if hashes is not None else HashCache()
        self._loras: dict[Path, tuple[tuple[int, int], dict[str, LoraPair]]] = {}
        self._hypernets: dict[Path, tuple[tuple[int, int], Hypernetwork]] = {}

    def _folder(self, subdir: str) -> Path | None:
        return self.models_dir / subdir if self.models_dir is not None else None

    def lora_names(self) -> list[str]:
        return list(self.lora_files())

    def hypernetwork_names(self) -> list[str]:
        return list(self.hypernetwork_files())

    def lora_files(self) -> dict[str, Path]:
        """Name -> the file a ``<lora:name>`` tag loads."""
        return _scan(self._folder(LORA_SUBDIR), LORA_EXTENSIONS)

    def hypernetwork_files(self) -> dict[str, Path]:
        """Name -> the file a ``<hypernet:name>`` tag loads."""
        return _scan(self._folder(HYPERNETWORK_SUBDIR), HYPERNETWORK_EXTENSIONS)

    def resolve_prompt(self, *prompts: str) -> dict[str, str]:
        """Resolve every network the prompts tag, loading nothing: ``"lora:<name as
        tagged>"`` / ``"hypernet:<name>"`` -> its file, relative to its kind's folder. A
        request records this (``GenerationRequest.network_files``) so :meth:`for_prompt`
        loads those files without resolving the names again. One folder scan per kind at
        most. Raises ``UnknownNetwork`` (with the available names) or ``ValueError`` (a
        malformed tag)."""
        tags: dict[str, list[str]] = {kind.tag: [] for kind in _KINDS}
        for prompt in prompts:
            if prompt and "<" in prompt:
                loras, hypernets = network_tags(prompt)
                tags["lora"] += [tag.name for tag in loras]
                tags["hypernet"] += [tag.name for tag in hypernets]
        found: dict[str, str] = {}
        for kind in _KINDS:
            folder = self._folder(kind.subdir) or Path()  # a name found means a folder
            for name, path in zip(tags[kind.tag], self._locate(kind, tags[kind.tag], {}), strict=True):
                found[f"{kind.tag}:{name}"] = path.relative_to(folder).as_posix()
        return found

    def check_prompt(self, prompt: str) -> None:
        """Resolve every network ``prompt`` tags without loading anything: raises
        ``UnknownNetwork`` (with the available names) or ``ValueError`` (a malformed tag)."""
        self.resolve_prompt(prompt)

    def for_prompt(self, prompt: str, files: Mapping[str, str] | None = None) -> ActiveNetworks:
        """Load what ``prompt`` tags. ``files`` is what :meth:`resolve_prompt` found when the
        request was made: a tag found there whose file this folder has is loaded as is, with
        no folder scan and no name resolution. Any other tag (a row stored before requests
        recorded their files, a worker whose models folder differs) is resolved here, and
        one this folder lacks is refused. Raises ``UnknownNetwork`` or ``ValueError`` (bad tag)."""
        lora_tags, hypernet_tags = network_tags(prompt)
        recorded = files or {}
        active = ActiveNetworks()
        lora_paths = self._locate(_LORA, [tag.name for tag in lora_tags], recorded)
        for tag, path in zip(lora_tags, lora_paths, strict=True):
            active.loras.append((tag, self._lora(path)))
            active.lora_hashes.append((tag.name, self.hashes.get(path, "lora")))
        hypernet_paths = self._locate(_HYPERNET, [tag.name for tag in hypernet_tags], recorded)
        for tag, path in zip(hypernet_tags, hypernet_paths, strict=True):
            network = self._hypernet(path)
            # A1111 keeps one object per name: a repeated tag's last strength wins.
            network.set_multiplier(tag.multiplier)
            active.hypernets.append(network)
        return active

    def _locate(self, kind: _Kind, names: list[str], recorded: Mapping[str, str]) -> list[Path]:
        """The file of each name: the recorded one where this folder has it, else by name
        from one scan of the folder (made only when some name needs it)."""
        folder = self._folder(kind.subdir)
        scanned: dict[str, Path] | None = None
        paths = []
        for name in names:
            path = _recorded_file(folder, kind, recorded.get(f"{kind.tag}:{name}"))
            if path is None:
                if scanned is None:
                    scanned = _scan(folder, kind.extensions)
                _name, path = _resolve(name, scanned, kind.name)
            paths.append(path)
        return paths

    def _lora(self, path: Path) -> dict[str, LoraPair]:
        stamp = _stamp(path)
        cached = self._loras.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            pairs = lora_pairs(load_tensors(path))
        except ValueError as exc:
            raise NetworkLoadError(path, "lora", str(exc)) from exc
        if not pairs:
            raise NetworkLoadError(path, "lora", "it holds no kohya-format LoRA weights")
        self._loras[path] = (stamp, pairs)
        return pairs

    def _hypernet(self, path: Path) -> Hypernetwork:
        from pipeline.hypernetwork import Hypernetwork

        stamp = _stamp(path)
        cached = self._hypernets.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        # The modules are built on the meta device and take the file's tensors, so loading
        # draws nothing from the global RNG (a seed's image does not depend on the cache).
        try:
            network = Hypernetwork.from_state_dict(load_tensors(path))
        except ValueError as exc:
            raise NetworkLoadError(path, "hypernetwork", str(exc)) from exc
        network.name = network.name or path.stem
        self._hypernets[path] = (stamp, network)
        return network


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
