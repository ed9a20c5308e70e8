"""A1111 hypernetworks: small residual MLPs applied to the attention context before k and v.

A1111 files are pickled dicts whose module layout must be rebuilt from metadata before the
weights load (the Sequential indices depend on which optional layers exist), and whose
defaults differ from those of a freshly created network (A1111-SEMANTICS.md §11). This module
rebuilds them, and ``hypernetwork_hooks`` wires them into a diffusers UNet's attention.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.restricted_pickle import describe

log = logging.getLogger(__name__)

DEFAULT_LAYER_STRUCTURE: tuple[float, ...] = (1, 2, 1)
_DROPOUT_P = 0.3
# Bounds on what a file may ask for, checked before any module is built. Attention widths
# are 320-1280 and context widths 768-2048 in SD 1.x/2.x/SDXL; A1111's UI offers layer
# multipliers of a few and structures of a handful of entries.
MAX_WIDTH = 4096
MAX_LAYERS = 32
MAX_LAYER_MULTIPLIER = 16.0

# NovelAI files predate the Sequential and name their two linears directly.
_LEGACY_KEYS = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}


def _activation_classes() -> dict[str, type[torch.nn.Module]]:
    """Activation names A1111 accepts: a few fixed ones plus every torch.nn activation class."""
    classes: dict[str, type[torch.nn.Module]] = {
        "linear": torch.nn.Identity,
        "relu": torch.nn.ReLU,
        "leakyrelu": torch.nn.LeakyReLU,
        "elu": torch.nn.ELU,
        "swish": torch.nn.Hardswish,  # A1111's "swish" is Hardswish, not SiLU
        "tanh": torch.nn.Tanh,
        "sigmoid": torch.nn.Sigmoid,
    }
    module = torch.nn.modules.activation
    for name, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ == module.__name__:
            classes[name.lower()] = cls
    return classes


def dropout_structure(
    layer_structure: Sequence[float] | None, use_dropout: bool, last_layer_dropout: bool
) -> list[float]:
    """A1111's ``parse_dropout_structure``: one dropout probability per layer-structure entry.

    Zeros are ints and 0.3s floats, as in A1111. For a two-entry structure with dropout the
    list is one longer than the structure; that quirk is kept because it is A1111's.
    """
    structure = list(DEFAULT_LAYER_STRUCTURE if layer_structure is None else layer_structure)
    if not use_dropout:
        return [0] * len(structure)
    inner: list[float] = [_DROPOUT_P] * (len(structure) - 3)
    return [0, *inner, _DROPOUT_P if last_layer_dropout else 0, 0]


@dataclass(frozen=True)
class ModuleLayout:
    """What decides a module's Sequential layout; shared by the k and v modules of all widths."""

    layer_structure: tuple[float, ...] = DEFAULT_LAYER_STRUCTURE
    activation_func: str | None = None
    add_layer_norm: bool = False
    activate_output: bool = True
    dropout_structure: tuple[float, ...] | None = None


def _activation(name: str) -> torch.nn.Module:
    classes = _activation_classes()
    if name not in classes:
        raise ValueError(f"unsupported hypernetwork activation function {name!r}")
    return classes[name]()


def _dropout(layout: ModuleLayout, layer: int) -> torch.nn.Module | None:
    if layout.dropout_structure is None or layer + 1 >= len(layout.dropout_structure):
        return None
    p = layout.dropout_structure[layer + 1]
    if p <= 0:
        return None
    if not p < 1:
        raise ValueError(f"hypernetwork dropout probability must be between 0 and 1, got {p}")
    return torch.nn.Dropout(p=p)


def _check_structure(structure: Sequence[float]) -> None:
    if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1:
        raise ValueError(f"hypernetwork layer structure must start and end with 1, got {list(structure)}")


def _steps(dim: int, layout: ModuleLayout) -> list[tuple[int, int, bool]]:
    """(width in, width out, activated) of each Linear, in order."""
    structure = layout.layer_structure
    _check_structure(structure)
    last = len(structure) - 2
    steps = []
    for i in range(last + 1):
        activated = layout.activation_func not in (None, "linear") and (i != last or layout.activate_output)
        steps.append((int(dim * structure[i]), int(dim * structure[i + 1]), activated))
    return steps


def _build_layers(
    dim: int, layout: ModuleLayout, device: torch.device | str | None = None
) -> list[torch.nn.Module]:
    """Linear, [activation], [LayerNorm], [Dropout] per step, in A1111's order (§11)."""
    layers: list[torch.nn.Module] = []
    for i, (width_in, width_out, activated) in enumerate(_steps(dim, layout)):
        layers.append(torch.nn.Linear(width_in, width_out, device=device))
        if activated:
            layers.append(_activation(layout.activation_func))
        if layout.add_layer_norm:
            layers.append(torch.nn.LayerNorm(width_out, device=device))
        dropout = _dropout(layout, i)
        if dropout is not None:
            layers.append(dropout)
    return layers


def expected_shapes(dim: int, layout: ModuleLayout) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes of one module of width ``dim``, computed without
    building it (the Sequential indices follow :func:`_build_layers`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    index = 0
    for i, (width_in, width_out, activated) in enumerate(_steps(dim, layout)):
        if width_in < 1 or width_out < 1:
            raise ValueError(f"hypernetwork layer structure gives width {dim} a layer with no units")
        shapes[f"linear.{index}.weight"] = (width_out, width_in)
        shapes[f"linear.{index}.bias"] = (width_out,)
        index += 1 + activated
        if layout.add_layer_norm:
            shapes[f"linear.{index}.weight"] = (width_out,)
            shapes[f"linear.{index}.bias"] = (width_out,)
            index += 1
        index += _dropout(layout, i) is not None
    return shapes


def _renamed_legacy_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {_LEGACY_KEYS.get(key, key): value for key, value in state_dict.items()}


class HypernetworkModule(torch.nn.Module):
    """One residual MLP: ``x + linear(x) * multiplier``."""

    linear: torch.nn.Sequential
    multiplier: float

    def __init__(
        self,
        dim: int,
        layout: ModuleLayout | None = None,
        *,
        multiplier: float = 1.0,
        device: torch.device | str | None = None,
    ) -> None:
        """``device="meta"`` builds the layers without memory, for :meth:`load` to fill."""
        super().__init__()
        self.dim = dim
        self.linear = torch.nn.Sequential(*_build_layers(dim, layout or ModuleLayout(), device))
        self.multiplier = multiplier

    def load(self, state_dict: Mapping[str, Any], *, assign: bool = False) -> None:
        """Load strictly (renaming legacy keys) and switch to inference mode; ``assign``
        takes the tensors themselves (for a module built on the meta device)."""
        try:
            self.load_state_dict(_renamed_legacy_keys(state_dict), strict=True, assign=assign)
        except RuntimeError as exc:
            raise ValueError(f"hypernetwork weights for width {self.dim} do not match: {exc}") from exc
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * self.multiplier


def _layout_from_state(state: Mapping[Any, Any]) -> tuple[ModuleLayout, bool, bool]:
    """The module layout plus the effective (use_dropout, last_layer_dropout), with loading
    defaults; every field type-checked and bounded, since the dict comes from a file."""
    structure = _numbers(state.get("layer_structure"), "layer_structure") or list(DEFAULT_LAYER_STRUCTURE)
    _check_structure(structure)
    if not all(0 < width <= MAX_LAYER_MULTIPLIER for width in structure):
        raise ValueError(
            f"hypernetwork layer structure entries must be above 0 and at most {MAX_LAYER_MULTIPLIER:g}"
        )
    stored_dropout = _numbers(state.get("dropout_structure"), "dropout_structure")
    # A stored structure with any non-zero entry means the network was trained with dropout.
    use_dropout = True if stored_dropout and any(stored_dropout) else _flag(state, "use_dropout", False)
    last_layer_dropout = _flag(state, "last_layer_dropout", False)
    if stored_dropout is None:
        stored_dropout = dropout_structure(structure, use_dropout, last_layer_dropout)
    activation = state.get("activation_func")
    if activation is not None and not isinstance(activation, str):
        raise ValueError("hypernetwork activation_func is not a name")
    if activation not in (None, "linear"):
        _check_activation(activation)
    layout = ModuleLayout(
        layer_structure=tuple(structure),
        activation_func=activation,
        add_layer_norm=_flag(state, "is_layer_norm", False),
        # Files without the key predate the option and were trained with an activated output.
        activate_output=_flag(state, "activate_output", True),
        dropout_structure=tuple(stored_dropout),
    )
    return layout, use_dropout, last_layer_dropout


def _numbers(value: Any, what: str) -> list[float] | None:
    """A list of at most MAX_LAYERS + 1 finite numbers, or None when absent."""
    if value is None:
        return None
    if (
        not isinstance(value, (list, tuple))
        or len(value) > MAX_LAYERS + 1
        or not all(_finite_number(v) for v in value)
    ):
        raise ValueError(f"hypernetwork {what} is not a short list of numbers")
    return list(value)


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= 10**6  # math.isfinite overflows on huge ints
    return isinstance(value, float) and math.isfinite(value)


def _flag(state: Mapping[Any, Any], key: str, default: bool) -> bool:
    value = state.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise ValueError(f"hypernetwork {key} is not true or false")
    return bool(value)


def _check_activation(name: str) -> None:
    """The name must be one A1111 accepts and build without arguments (``threshold`` and
    ``multiheadattention`` are torch activations that need some)."""
    try:
        _activation(name)
    except TypeError:
        raise ValueError(f"unsupported hypernetwork activation function {name[:40]!r}") from None


def _widths(state: Mapping[Any, Any]) -> dict[int, tuple[Mapping[Any, Any], Mapping[Any, Any]]]:
    """The (k, v) state dicts by width; only int keys are widths (bool is an int subclass
    but never one), the others are metadata."""
    widths = {}
    for key, pair in state.items():
        if type(key) is not int:
            continue
        if not 1 <= key <= MAX_WIDTH:
            raise ValueError(
                f"hypernetwork width must be 1-{MAX_WIDTH}, got {key if abs(key) < 10**9 else 'more'}"
            )
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(p, Mapping) for p in pair)
        ):
            raise ValueError(f"hypernetwork width {key} does not hold a pair of weight dicts")
        widths[key] = (pair[0], pair[1])
    return widths


def check_state(state: Any) -> None:
    """Raise ``ValueError`` unless ``state`` is a hypernetwork A1111 could have written;
    works on meta tensors, so a folder scan can check a file without reading its weights."""
    _checked_state(state)


def _checked_state(
    state: Any,
) -> tuple[ModuleLayout, bool, bool, dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]]:
    if not isinstance(state, Mapping):
        raise ValueError(f"a hypernetwork file holds a dict, not a {type(state).__name__}")
    layout, use_dropout, last_layer_dropout = _layout_from_state(state)
    widths = _widths(state)
    if not widths:
        raise ValueError("it holds no hypernetwork layers (no integer width keys)")
    checked = {
        width: (check_weights(width, layout, pair[0]), check_weights(width, layout, pair[1]))
        for width, pair in widths.items()
    }
    return layout, use_dropout, last_layer_dropout, checked


def check_weights(width: int, layout: ModuleLayout, state_dict: Mapping[Any, Any]) -> dict[str, torch.Tensor]:
    """The module's weights as float32, once their keys and shapes are exactly the ones the
    layout gives for ``width``: checked before anything is built, so a file cannot make the
    loader allocate more than the weights it holds."""
    expected = expected_shapes(width, layout)
    weights = _renamed_legacy_keys(state_dict)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(describe(key) for key in set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"hypernetwork weights for width {width} do not match: missing {missing or '-'}, unexpected {unexpected or '-'}"
        )
    checked = {}
    for key, shape in expected.items():
        value = weights[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"hypernetwork weight {key} for width {width} is not a float tensor")
        if tuple(value.shape) != shape:
            raise ValueError(
                f"hypernetwork weights for width {width} do not match: {key} has shape "
                f"{tuple(value.shape)}, expected {shape}"
            )
        checked[key] = value.to(torch.float32)
    return checked


@dataclass
class Hypernetwork:
    """A loaded hypernetwork: a (k, v) module pair per context width."""

    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]]
    layout: ModuleLayout = field(default_factory=ModuleLayout)
    multiplier: float = 1.0
    name: str | None = None
    use_dropout: bool = False
    last_layer_dropout: bool = False
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @classmethod
    def from_state_dict(cls, state: Mapping[Any, Any], *, multiplier: float = 1.0) -> Hypernetwork:
        """Rebuild from the dict stored in an A1111 ``.pt`` file (integer width keys + metadata).

        Raises ``ValueError`` for anything that is not a hypernetwork A1111 could have
        written; the layout, widths and every weight shape are checked before a module
        is built, and modules take the file's tensors instead of allocating their own."""
        layout, use_dropout, last_layer_dropout, checked = _checked_state(state)
        layers = {
            width: (_loaded_module(width, layout, k), _loaded_module(width, layout, v))
            for width, (k, v) in checked.items()
        }
        step = state.get("step")
        network = cls(
            layers=layers,
            layout=layout,
            name=_text(state.get("name")),
            use_dropout=use_dropout,
            last_layer_dropout=last_layer_dropout,
            step=step if type(step) is int else None,
            sd_checkpoint=_text(state.get("sd_checkpoint")),
            sd_checkpoint_name=_text(state.get("sd_checkpoint_name")),
        )
        network.set_multiplier(multiplier)
        return network

    def set_multiplier(self, multiplier: float) -> None:
        """Set the tag strength on every module."""
        self.multiplier = multiplier
        for module_k, module_v in self.layers.values():
            module_k.multiplier = multiplier
            module_v.multiplier = multiplier

    def to(self, *args: Any, **kwargs: Any) -> Hypernetwork:
        """Move every module (device/dtype), like ``torch.nn.Module.to``."""
        for module_k, module_v in self.layers.values():
            module_k.to(*args, **kwargs)
            module_v.to(*args, **kwargs)
        return self


def _loaded_module(width: int, layout: ModuleLayout, weights: dict[str, torch.Tensor]) -> HypernetworkModule:
    module = HypernetworkModule(width, layout, device="meta")
    module.load(weights, assign=True)
    return module


def _text(value: Any) -> str | None:
    """Metadata strings (name, checkpoint); anything else in their place is ignored."""
    return value if isinstance(value, str) else None


def apply_hypernetworks(
    hypernetworks: Sequence[Hypernetwork], context: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The contexts for the k and v projections of one attention block (§11).

    Networks apply in tag order, the k chain and v chain separately; the pair is picked by
    the context's width, and a network without that width leaves the context unchanged.
    """
    context_k = context_v = context
    for network in hypernetworks:
        pair = network.layers.get(context_k.shape[-1])
        if pair is None:
            continue
        with torch.no_grad():
            context_k = pair[0](context_k)
            context_v = pair[1](context_v)
    return context_k, context_v


# --------------------------------------------------------------------------------------
# Hooks on a UNet's attention


@contextmanager
def hypernetwork_hooks(unet: torch.nn.Module, hypernets: list[Hypernetwork]) -> Iterator[None]:
    """Feed ``hn_k(context)`` to every attention's ``to_k`` and ``hn_v(context)`` to ``to_v``.

    diffusers calls ``to_k`` then ``to_v`` on the same context tensor, so the k hook
    computes both chains once and the v hook reuses the v result for that tensor.
    """
    if not hypernets:
        yield
        return
    handles = []
    for module in unet.modules():
        to_k, to_v = getattr(module, "to_k", None), getattr(module, "to_v", None)
        if isinstance(to_k, torch.nn.Linear) and isinstance(to_v, torch.nn.Linear):
            pending: dict[str, Any] = {}
            handles.append(to_k.register_forward_pre_hook(_k_hook(hypernets, pending)))
            handles.append(to_v.register_forward_pre_hook(_v_hook(hypernets, pending)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _k_hook(hypernets: list[Hypernetwork], pending: dict[str, Any]) -> Any:
    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        context_k, context_v = apply_hypernetworks(hypernets, args[0])
        pending["for"], pending["v"] = args[0], context_v
        return (context_k, *args[1:])

    return hook


def _v_hook(hypernets: list[Hypernetwork], pending: dict[str, Any]) -> Any:
    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if pending.get("for") is args[0]:
            context_v = pending.pop("v")
        else:
            context_v = apply_hypernetworks(hypernets, args[0])[1]
        pending.clear()
        return (context_v, *args[1:])

    return hook
