"""Reading checkpoint files without trusting them (A1111-SEMANTICS.md §15).

A ``.ckpt``/``.pt`` file is a pickle, and unpickling runs whatever callables the file
names. Everything here resolves globals through an allow-list, so a file that names
anything else (``os.system``, ``builtins.eval``, a class with a side-effecting
constructor …) is refused before any of it runs. ``.safetensors`` files carry no code,
but their header is checked first so a truncated or hostile header gets a clear refusal
instead of a crash deep inside the reader.

Refusals raise :class:`UnsafeCheckpoint`, a :class:`CheckpointLoadError` with its own
message key, so callers that handle load failures handle these too.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import CheckpointLoadError, EngineError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# safetensors' own reader refuses headers above 100 MB; so do we, before reading one.
MAX_SAFETENSORS_HEADER = 100_000_000
_LENGTH_BYTES = 8

# (module, name) pairs an A1111-era checkpoint pickle may name (§15). ``None`` as the name
# allows the module object itself.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_device_tensor_from_numpy"),
        ("torch", "FloatStorage"),
        ("torch", "HalfStorage"),
        ("torch", "IntStorage"),
        ("torch", "LongStorage"),
        ("torch", "DoubleStorage"),
        ("torch", "ByteStorage"),
        ("torch", "BFloat16Storage"),
        ("torch", "float32"),
        ("torch.nn.modules.container", "ParameterDict"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),  # the same functions, as numpy 2 pickles them
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("_codecs", "encode"),
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
        ("__builtin__", "set"),
        ("builtins", "set"),
    }
)
_ALLOWED_MODULES = frozenset({"pytorch_lightning.callbacks.model_checkpoint"})
# numpy 2 moved ``numpy.core`` to ``numpy._core``; the old path only warns, so go direct.
_MODULE_ALIASES = {
    "numpy.core.multiarray": ("numpy._core.multiarray", "numpy.core.multiarray"),
    "__builtin__": ("builtins",),
}
# §15's member names, plus the two metadata files torch >= 2.5 writes beside them.
_ZIP_MEMBER = re.compile(
    r"^[^/]+/(data\.pkl|data/\d+|version|byteorder|\.data/serialization_id|\.format_version|\.storage_alignment)$"
)


class UnsafeCheckpoint(CheckpointLoadError):
    """A checkpoint file refused before anything in it ran: a pickle naming a global
    outside the allow-list, or a malformed file layout/header.

    Message key ``error.unsafe_checkpoint``; params ``name`` (file name), ``file`` (full
    path) and ``reason``.
    """

    key = "error.unsafe_checkpoint"

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        path = Path(path)
        EngineError.__init__(
            self, f"refused to load {path}: {reason}", name=path.name, file=str(path), reason=reason
        )


class _Inert:
    """Stands in for an allowed class whose package is not installed (pytorch_lightning's
    ModelCheckpoint in old SD files): it absorbs its state and does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _import_allowed(module: str, name: str) -> Any:
    for candidate in _MODULE_ALIASES.get(module, (module,)):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    if module.startswith("pytorch_lightning"):
        return _Inert
    raise pickle.UnpicklingError(f"allowed global {module}.{name} is not available")


def _make_unpickler(path: Path) -> type[pickle.Unpickler]:
    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in _ALLOWED_GLOBALS:
                return _import_allowed(module, name)
            if module in _ALLOWED_MODULES and name == "__module__":
                return importlib.import_module(module)
            raise UnsafeCheckpoint(path, f"it references the global {module}.{name}, which is not allowed")

    return RestrictedUnpickler


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: every pickle it reads (the legacy
    format's header pickles too) goes through the allow-list."""

    def __init__(self, path: Path) -> None:
        self.Unpickler = _make_unpickler(path)
        self.__name__ = "atelier_restricted_pickle"

    def load(self, file: Any, **kwargs: Any) -> Any:
        return self.Unpickler(file, **kwargs).load()


def check_zip_layout(path: Path) -> None:
    """A1111's zip check: only torch's own members, exactly one ``data.pkl``."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    bad = [name for name in names if not _ZIP_MEMBER.match(name)]
    if bad:
        raise UnsafeCheckpoint(path, f"unexpected member {bad[0]!r} in the archive")
    pickles = [name for name in names if name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise UnsafeCheckpoint(path, f"expected exactly one data.pkl, found {len(pickles)}")


def load_pickle_checkpoint(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` of a ``.ckpt``/``.pt`` with every global checked against the allow-list."""
    import torch

    path = Path(path)
    if zipfile.is_zipfile(path):
        check_zip_layout(path)
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule(path)
        )
    except UnsafeCheckpoint:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise CheckpointLoadError(path.name, f"{path} is not a readable checkpoint: {exc}") from exc


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed JSON header, refusing files whose header could not be what it claims."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as stream:
        prefix = stream.read(_LENGTH_BYTES)
        if len(prefix) < _LENGTH_BYTES:
            raise UnsafeCheckpoint(path, f"the file has {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_SAFETENSORS_HEADER:
            raise UnsafeCheckpoint(
                path, f"its header claims {length} bytes, over the {MAX_SAFETENSORS_HEADER}-byte limit"
            )
        if _LENGTH_BYTES + length > size:
            raise UnsafeCheckpoint(
                path, f"its header claims {length} bytes but only {size - _LENGTH_BYTES} follow"
            )
        raw = stream.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UnsafeCheckpoint(path, f"its header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise UnsafeCheckpoint(path, "its header is not a JSON object")
    _check_offsets(path, header, size - _LENGTH_BYTES - length)
    return header


def _check_offsets(path: Path, header: dict[str, Any], data_size: int) -> None:
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        valid = (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
        )
        if not valid:
            raise UnsafeCheckpoint(path, f"tensor {name!r} has invalid data offsets {offsets!r}")


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_safetensors_header(path)
    try:
        return load_file(os.fspath(path), device="cpu")
    except SafetensorError as exc:
        raise UnsafeCheckpoint(path, f"safetensors refused it: {exc}") from exc


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from A1111's ``state_dict`` wrapper.

    Non-tensor entries (training step counters, callbacks) are dropped.
    """
    import torch

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        loaded: Any = load_safetensors(path)
    else:
        loaded = load_pickle_checkpoint(path)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointLoadError(path.name, f"{path} holds a {type(loaded).__name__}, not a state dict")
    return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
