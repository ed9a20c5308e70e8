"""The one unpickler every ``.ckpt``/``.pt``/``.bin`` file goes through (A1111-SEMANTICS.md §15).

Unpickling runs whatever callables a file names, so a name is resolved only through
:func:`_allowed`, which maps each name a state-dict pickle legitimately uses to a
function written here. None of them is torch's or numpy's own reconstruction code:
each checks its arguments (types, sizes, bounds) before it builds anything, so a file
cannot reach torch internals with arguments torch never expected. Storages are
``persistent_load`` records and nothing else; the caller supplies their bytes (or,
for a scan, a meta tensor of the right size) after checking the size against the file.

Every failure, whatever the unpickler raised, becomes :class:`PickleRefused` with a
short reason.
"""

from __future__ import annotations

import collections
import functools
import math
import pickle
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_DIMS", "PickleRefused", "StorageSource", "describe", "unpickle"]

# torch tensors have at most 64 dimensions; more is a crafted record.
MAX_DIMS = 64
# A record claiming more elements than this is crafted whatever the file size.
_MAX_NUMEL = 1 << 48
_TEXT_LIMIT = 120

# (key, dtype, element count) -> the storage as a 1-D tensor of that dtype and length.
StorageSource = Callable[[str, "torch.dtype", int], "torch.Tensor"]


class PickleRefused(ValueError):
    """The pickle names something outside the allow-list or is not a plain state-dict
    pickle; ``reason`` says what, in words a user can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def describe(value: Any) -> str:
    """A short, always-printable description of an untrusted value (huge ints and deep
    structures cannot make formatting fail or run long)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**18 else "a very large number"
    if isinstance(value, (str, bytes)):
        text = repr(value[:_TEXT_LIMIT])
        return text + ("..." if len(value) > _TEXT_LIMIT else "")
    return f"a {type(value).__name__}"


def unpickle(stream: BinaryIO, storages: StorageSource | None, *, legacy: bool = False) -> Any:
    """The object pickled in ``stream``, reading one pickle (up to its STOP opcode).

    ``storages`` provides tensor data for ``persistent_load`` records; ``None`` refuses
    any record. ``legacy``: records use torch's pre-1.6 layout (with views).
    Raises :class:`PickleRefused`.
    """
    unpickler = _Unpickler(stream, storages, legacy)
    try:
        return unpickler.load()
    except PickleRefused:
        raise
    except Exception as exc:  # any failure of a hostile pickle is a refusal, never a crash
        raise PickleRefused(f"it is not a readable state-dict pickle ({_exception_text(exc)})") from exc


def _exception_text(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = ""
    text = text.splitlines()[0] if text else ""
    text = text[:_TEXT_LIMIT] + ("..." if len(text) > _TEXT_LIMIT else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream: BinaryIO, storages: StorageSource | None, legacy: bool) -> None:
        super().__init__(stream, encoding="utf-8")
        self._storages = storages
        self._legacy = legacy
        self._loaded: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed().get((module, name))
        if found is None:
            raise PickleRefused(
                f"it references the global {describe(module)[1:-1]}.{describe(name)[1:-1]}, which is not allowed"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or _text(pid[0]) != "storage":
            raise PickleRefused("it holds a persistent record that is not a tensor storage")
        expected = 6 if self._legacy else 5
        if len(pid) != expected:
            raise PickleRefused("it holds a malformed storage record")
        storage_type, key, location, numel = pid[1], _text(pid[2]), _text(pid[3]), pid[4]
        if not isinstance(storage_type, _StorageType):
            raise PickleRefused("a storage record does not name a storage type")
        if key is None or not key.isdigit() or len(key) > 20 or location is None:
            raise PickleRefused("a storage record has a malformed key or location")
        if not _is_int(numel) or not 0 <= numel <= _MAX_NUMEL:
            raise PickleRefused(f"storage {key} claims {describe(numel)} elements")
        storage = self._storage(key, storage_type.dtype, numel)
        if self._legacy and pid[5] is not None:
            return _legacy_view(storage, pid[5], self._loaded)
        return storage

    def _storage(self, key: str, dtype: torch.dtype, numel: int) -> _Storage:
        known = self._loaded.get(key)
        if known is not None:
            if known.flat.dtype != dtype or known.flat.numel() != numel:
                raise PickleRefused(f"storage {key} is described twice, differently")
            return known
        if self._storages is None:
            raise PickleRefused("it holds tensor storages where none may be")
        flat = self._storages(key, dtype, numel)
        storage = _Storage(flat)
        self._loaded[key] = storage
        return storage


def _legacy_view(storage: _Storage, view: Any, loaded: dict[str, _Storage]) -> _Storage:
    """torch < 1.6 pickled slices of a storage as (view key, offset, size)."""
    if not isinstance(view, tuple) or len(view) != 3:
        raise PickleRefused("a storage view record is malformed")
    key, offset, size = _text(view[0]), view[1], view[2]
    if key is None or not (_is_int(offset) and _is_int(size)):
        raise PickleRefused("a storage view record is malformed")
    if not (0 <= offset and 0 <= size and offset + size <= storage.flat.numel()):
        raise PickleRefused("a storage view reaches outside its storage")
    if key not in loaded:
        loaded[key] = _Storage(storage.flat[offset : offset + size])
    return loaded[key]


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- tensors -----------------------------------------------------------------------------------


class _Sealed:
    """Objects a pickle may reference but never rebuild: BUILD on them is refused, so one
    file cannot change what the next one is checked with."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise PickleRefused("it tries to modify an object it is only allowed to reference")


class _Storage(_Sealed):
    """What ``persistent_load`` returns: only records can make one, so a rebuild function
    knows its storage argument came from a checked record."""

    __slots__ = ("flat",)

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat


class _StorageType(_Sealed):
    """``torch.FloatStorage`` and kin as they appear in storage records: only a dtype."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _Call(_Sealed):
    """An allowed function as the unpickler hands it out: callable, but not a function
    object whose defaults or attributes a pickle could rewrite."""

    __slots__ = ("_function",)

    def __init__(self, function: Callable[..., Any]) -> None:
        self._function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(*args, **kwargs)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS:
        raise PickleRefused(f"a tensor's {what} is not a list of at most {MAX_DIMS} numbers")
    if not all(_is_int(item) and 0 <= item <= _MAX_NUMEL for item in value):
        raise PickleRefused(f"a tensor's {what} holds something other than sizes")
    return tuple(value)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    """A view of a checked storage, once the view is proven to stay inside it."""
    if not isinstance(storage, _Storage):
        raise PickleRefused("a tensor is built from something other than a storage record")
    shape, strides = _int_tuple(size, "shape"), _int_tuple(stride, "stride")
    if len(shape) != len(strides) or not _is_int(storage_offset) or storage_offset < 0:
        raise PickleRefused("a tensor's shape, stride and offset do not fit together")
    if not isinstance(requires_grad, bool) or (
        backward_hooks is not None and not _empty_mapping(backward_hooks)
    ):
        raise PickleRefused("a tensor carries backward hooks or a malformed flag")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise PickleRefused("a tensor carries malformed metadata")
    available = storage.flat.numel()
    numel = math.prod(shape)
    if numel:
        last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        # More elements than the storage holds only happens for overlapping (expanded)
        # views, which a state dict never has; refusing them bounds what later copies cost.
        if last >= available or numel > available:
            raise PickleRefused("a tensor reaches outside its storage")
    return storage.flat.as_strided(shape, strides, storage_offset)


def _empty_mapping(value: Any) -> bool:
    return isinstance(value, Mapping) and not value


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None) -> torch.Tensor:
    """A parameter is kept as its tensor: nothing here trains."""
    import torch

    if not isinstance(data, torch.Tensor):
        raise PickleRefused("a parameter is built from something other than a tensor")
    return data


def _rebuild_device_tensor_from_numpy(data: Any, dtype: Any, device: Any, requires_grad: Any) -> torch.Tensor:
    import torch

    if not isinstance(data, _SafeArray) or not isinstance(dtype, torch.dtype):
        raise PickleRefused("a tensor is built from something other than a numeric array")
    return torch.from_numpy(np.array(data, copy=True).view(np.ndarray)).to(dtype)


# --- numpy values ------------------------------------------------------------------------------

_NUMPY_CODES = frozenset(
    {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16", "?", "b", "B"}
)
_BYTE_ORDERS = frozenset({"<", ">", "|", "="})


class _DtypeProxy:
    """A numeric numpy dtype as the pickle describes it. numpy never sees the pickle's own
    dtype state (that is how object dtypes, and pointers read from raw bytes, would come in)."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 5 or state[1] not in _BYTE_ORDERS:
            raise PickleRefused("a numpy dtype carries a malformed state")
        if any(part is not None for part in state[2:5]):
            raise PickleRefused("a numpy dtype has fields or sub-arrays; only plain numbers are allowed")
        self.byteorder = state[1]

    def resolve(self) -> np.dtype[Any]:
        dtype = np.dtype(self.code)
        return dtype.newbyteorder(">") if self.byteorder == ">" else dtype


def _numpy_dtype(code: Any, align: Any = False, copy: Any = False) -> _DtypeProxy:
    if not isinstance(code, str) or code not in _NUMPY_CODES:
        raise PickleRefused(f"numpy dtype {describe(code)} is not a plain number type")
    return _DtypeProxy(code)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, _DtypeProxy) or not isinstance(data, bytes):
        raise PickleRefused("a numpy scalar is malformed")
    real = dtype.resolve()
    if len(data) != real.itemsize:
        raise PickleRefused("a numpy scalar has the wrong number of bytes")
    return np.frombuffer(data, dtype=real)[0]


class _SafeArray(np.ndarray):
    """A numeric numpy array whose pickled state is checked before numpy reads it."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise PickleRefused("a numpy array carries a malformed state")
        version, shape, dtype, fortran, raw = state
        shape = _int_tuple(shape, "numpy shape")
        if not isinstance(dtype, _DtypeProxy) or not isinstance(fortran, bool) or not isinstance(raw, bytes):
            raise PickleRefused("a numpy array is not a plain array of numbers")
        real = dtype.resolve()
        if len(raw) != math.prod(shape) * real.itemsize:
            raise PickleRefused("a numpy array's bytes do not match its shape")
        np.ndarray.__setstate__(self, (version, shape, real, fortran, raw))


class _Marker(_Sealed):
    """A name that is allowed only as an argument (``numpy.ndarray`` for ``_reconstruct``),
    never called or instantiated."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_NDARRAY = _Marker("numpy.ndarray")


def _numpy_reconstruct(subtype: Any, shape: Any, typecode: Any) -> _SafeArray:
    if subtype is not _NDARRAY:
        raise PickleRefused("numpy reconstruction of something other than a plain array")
    return np.ndarray.__new__(_SafeArray, (0,), np.uint8)


# --- other values ------------------------------------------------------------------------------

_LATIN1 = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"})


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """How protocol-2 pickles spell ``bytes``: ``_codecs.encode(text, "latin1")``; no
    other codec is reachable."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1:
        raise PickleRefused("it encodes bytes with a codec other than latin-1")
    return text.encode("latin-1")


class _ParameterDict(dict):  # type: ignore[type-arg]
    """``torch.nn.ParameterDict`` (original textual-inversion files) as a plain dict of its
    tensors; no torch module is constructed from the file."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and state:
            state = state[0]
        parameters = state.get("_parameters") if isinstance(state, Mapping) else None
        if isinstance(parameters, Mapping):
            import torch

            self.update(
                (k, v) for k, v in parameters.items() if isinstance(k, str) and isinstance(v, torch.Tensor)
            )


class _Inert:
    """pytorch_lightning's ModelCheckpoint in old SD files: it absorbs its arguments and
    state and does nothing; the package itself is never imported."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


# storage record names and the dtype (torch's attribute) each holds
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_TORCH_DTYPES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)


@functools.cache
def _allowed() -> dict[tuple[str, str], Any]:
    """Made when the first pickle is read (torch is loaded then, not with this module)."""
    import torch

    # Classes are allowed only where pickles instantiate them with NEWOBJ; each defines
    # __setstate__, so BUILD on the class itself fails instead of setting class attributes.
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _Call(_rebuild_tensor_v2),
        ("torch._utils", "_rebuild_parameter"): _Call(_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): _Call(_rebuild_parameter),
        ("torch._utils", "_rebuild_device_tensor_from_numpy"): _Call(_rebuild_device_tensor_from_numpy),
        ("torch.nn.modules.container", "ParameterDict"): _ParameterDict,
        ("numpy", "dtype"): _Call(_numpy_dtype),
        ("numpy", "ndarray"): _NDARRAY,
        ("_codecs", "encode"): _Call(_codecs_encode),
        ("__builtin__", "set"): set,
        ("builtins", "set"): set,
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): _Inert,
        ("pytorch_lightning.callbacks", "model_checkpoint"): _Inert,
    }
    # numpy 2 pickles ``numpy._core``; files from numpy 1 say ``numpy.core``.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "scalar")] = _Call(_numpy_scalar)
        allowed[(module, "_reconstruct")] = _Call(_numpy_reconstruct)
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(getattr(torch, dtype))
    for name in _TORCH_DTYPES:
        allowed[("torch", name)] = getattr(torch, name)
    return allowed
