"""A1111 hypernetworks: small residual MLPs applied to the attention context before k and v.

A1111 files are pickled dicts whose module layout must be rebuilt from metadata before the
weights load (the Sequential indices depend on which optional layers exist), and whose
defaults differ from those of a freshly created network (A1111-SEMANTICS.md §11). This module
rebuilds them; wiring into diffusers' attention is the engine's attention processor's job.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_LAYER_STRUCTURE: tuple[float, ...] = (1, 2, 1)
_DROPOUT_P = 0.3

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


def _build_layers(dim: int, layout: ModuleLayout) -> list[torch.nn.Module]:
    """Linear, [activation], [LayerNorm], [Dropout] per step, in A1111's order (§11)."""
    structure = layout.layer_structure
    if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1:
        raise ValueError(f"hypernetwork layer structure must start and end with 1, got {list(structure)}")
    last = len(structure) - 2
    layers: list[torch.nn.Module] = []
    for i in range(last + 1):
        width_in, width_out = int(dim * structure[i]), int(dim * structure[i + 1])
        layers.append(torch.nn.Linear(width_in, width_out))
        skip_activation = layout.activation_func in (None, "linear") or (
            i == last and not layout.activate_output
        )
        if not skip_activation:
            layers.append(_activation(layout.activation_func))
        if layout.add_layer_norm:
            layers.append(torch.nn.LayerNorm(width_out))
        dropout = _dropout(layout, i)
        if dropout is not None:
            layers.append(dropout)
    return layers


def _renamed_legacy_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {_LEGACY_KEYS.get(key, key): value for key, value in state_dict.items()}


class HypernetworkModule(torch.nn.Module):
    """One residual MLP: ``x + linear(x) * multiplier``."""

    linear: torch.nn.Sequential
    multiplier: float

    def __init__(self, dim: int, layout: ModuleLayout | None = None, *, multiplier: float = 1.0) -> None:
        super().__init__()
        self.dim = dim
        self.linear = torch.nn.Sequential(*_build_layers(dim, layout or ModuleLayout()))
        self.multiplier = multiplier

    def load(self, state_dict: Mapping[str, Any]) -> None:
        """Load strictly (renaming legacy keys) and switch to inference mode."""
        try:
            self.load_state_dict(_renamed_legacy_keys(state_dict), strict=True)
        except RuntimeError as exc:
            raise ValueError(f"hypernetwork weights for width {self.dim} do not match: {exc}") from exc
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * self.multiplier


def _layout_from_state(state: Mapping[Any, Any]) -> tuple[ModuleLayout, bool, bool]:
    """The module layout plus the effective (use_dropout, last_layer_dropout), with loading defaults."""
    structure = state.get("layer_structure") or list(DEFAULT_LAYER_STRUCTURE)
    stored_dropout = state.get("dropout_structure")
    # A stored structure with any non-zero entry means the network was trained with dropout.
    use_dropout = (
        True if stored_dropout is not None and any(stored_dropout) else bool(state.get("use_dropout", False))
    )
    last_layer_dropout = bool(state.get("last_layer_dropout", False))
    if stored_dropout is None:
        stored_dropout = dropout_structure(structure, use_dropout, last_layer_dropout)
    layout = ModuleLayout(
        layer_structure=tuple(structure),
        activation_func=state.get("activation_func"),
        add_layer_norm=bool(state.get("is_layer_norm", False)),
        # Files without the key predate the option and were trained with an activated output.
        activate_output=bool(state.get("activate_output", True)),
        dropout_structure=tuple(stored_dropout),
    )
    return layout, use_dropout, last_layer_dropout


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
        """Rebuild from the dict stored in an A1111 ``.pt`` file (integer width keys + metadata)."""
        layout, use_dropout, last_layer_dropout = _layout_from_state(state)
        layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {}
        for key, pair in state.items():
            if type(key) is not int:  # bool is an int subclass but never a width
                continue
            layers[key] = (_loaded_module(key, layout, pair[0]), _loaded_module(key, layout, pair[1]))
        network = cls(
            layers=layers,
            layout=layout,
            name=state.get("name"),
            use_dropout=use_dropout,
            last_layer_dropout=last_layer_dropout,
            step=state.get("step"),
            sd_checkpoint=state.get("sd_checkpoint"),
            sd_checkpoint_name=state.get("sd_checkpoint_name"),
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


def _loaded_module(width: int, layout: ModuleLayout, state_dict: Mapping[str, Any]) -> HypernetworkModule:
    module = HypernetworkModule(width, layout)
    module.load(state_dict)
    return module


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
