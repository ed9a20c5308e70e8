"""Fuzzing the model-file loaders: mutated archives, crafted safetensors headers and
mutated pickles. Every loader (checkpoint, VAE, LoRA, hypernetwork, embedding) and the
folder check either load a file or raise the loader's own error, never anything else,
and nothing in a file ever runs (the TorchScript and pickle seeds create a marker file
if executed)."""

from __future__ import annotations

import codecs
import collections
import io
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from pipeline.checkpoints import CheckpointLibrary
from pipeline.embeddings import EmbeddingLoadError, load_embedding
from pipeline.errors import CheckpointLoadError
from pipeline.networks import NetworkLibrary, NetworkLoadError
from pipeline.vae import VaeLoadError, load_vae
from tests.pipeline.crafted_files import (
    END_RECORD,
    CreatesFile,
    embedding_state,
    hypernetwork_state,
    lora_state,
    safetensors_header,
    torch_bytes,
    torchscript_bytes,
    write,
    zip_of,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

# Modest counts (a few seconds each): an example runs five loaders and a folder scan on
# fresh files; most crafted headers and pickles are refused early, so they afford more.
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_MORE = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MARKER = Path(tempfile.mkdtemp(prefix="atelier-fuzz-")) / "marker.txt"


def _seeds() -> list[bytes]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit", DeprecationWarning)
        script = torchscript_bytes(MARKER)
    return [
        save(lora_state()),
        torch_bytes(lora_state()),
        torch_bytes(hypernetwork_state()),
        torch_bytes(embedding_state(), legacy=True),
        torch_bytes({"state_dict": lora_state(), "hook": CreatesFile(MARKER)}),
        script,
    ]


SEEDS = _seeds()
_VAE_CONFIG: dict[str, Any] = {}


def _vae_config() -> dict[str, Any]:
    if not _VAE_CONFIG:
        from pipeline.tiny import build_tiny_pipeline

        _VAE_CONFIG.update(build_tiny_pipeline().vae.config)
    return _VAE_CONFIG


def _every_loader(data: bytes) -> None:
    """Put ``data`` where each loader looks and load it; only the loaders' own errors may
    come out, and the folder check must not raise at all."""
    with tempfile.TemporaryDirectory() as folder:
        models = Path(folder)
        paths = {
            relative: write(models / relative, data)
            for relative in (
                "Stable-diffusion/fuzz.safetensors",
                "VAE/fuzz.pt",
                "Lora/fuzz.safetensors",
                "hypernetworks/fuzz.pt",
                "embeddings/fuzz.bin",
            )
        }
        library = CheckpointLibrary(models)
        library.model_files()
        calls = [
            (lambda: library.load("fuzz"), (CheckpointLoadError,)),
            (
                lambda: load_vae(paths["VAE/fuzz.pt"], config=_vae_config()),
                (CheckpointLoadError, VaeLoadError),
            ),
            (
                lambda: NetworkLibrary(models).for_prompt("<lora:fuzz>"),
                (CheckpointLoadError, NetworkLoadError),
            ),
            (
                lambda: NetworkLibrary(models).for_prompt("<hypernet:fuzz>"),
                (CheckpointLoadError, NetworkLoadError),
            ),
            (lambda: load_embedding(paths["embeddings/fuzz.bin"]), (EmbeddingLoadError,)),
        ]
        for call, errors in calls:
            try:
                call()
            except errors:
                pass
    assert not MARKER.exists()


# --- mutated bytes ---------------------------------------------------------------------------

_INTERESTING = st.sampled_from(
    [
        END_RECORD + b"\0" * 18,
        END_RECORD + b"\0" * 4,
        b"PK\x06\x06" + b"\xff" * 20,
        b"\xff\xff\xff\xff",
        b"\0\0\0\0",
        b"[" * 64,
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        b"\x80\x02cos\nsystem\n.",
    ]
)
_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(
        st.just("insert"), st.floats(0, 1), st.one_of(_INTERESTING, st.binary(min_size=1, max_size=16))
    ),
    st.tuples(st.just("overwrite"), st.floats(0, 1), _INTERESTING),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(0)),
    st.tuples(st.just("append"), st.just(1.0), _INTERESTING),
)


def _mutated(data: bytes, mutations: list[tuple[str, float, Any]]) -> bytes:
    for kind, where, value in mutations:
        at = min(int(where * len(data)), max(len(data) - 1, 0))
        if kind == "flip" and data:
            data = data[:at] + bytes([value]) + data[at + 1 :]
        elif kind in ("insert", "append"):
            at = len(data) if kind == "append" else at
            data = data[:at] + value + data[at:]
        elif kind == "overwrite":
            data = data[:at] + value + data[at + len(value) :]
        elif kind == "delete":
            data = data[:at] + data[at + value :]
        elif kind == "truncate":
            data = data[:at]
    return data


@FUZZ
@given(seed=st.sampled_from(range(len(SEEDS))), mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_files_load_or_are_refused_by_every_loader(seed: int, mutations: list[Any]) -> None:
    _every_loader(_mutated(SEEDS[seed], mutations))


# --- crafted safetensors headers ---------------------------------------------------------------

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X", ""]) | _JSON,
        "shape": st.lists(st.integers(-2, 2**40), max_size=4) | _JSON,
        "data_offsets": st.lists(st.integers(-4, 64), min_size=0, max_size=3) | _JSON,
    },
    optional={"extra": _JSON},
)
_NAMES = st.sampled_from(
    ["lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight", "emb_params", "__metadata__", "clip_l"]
) | st.text(max_size=12)


@FUZZ_MORE
@given(
    header=st.dictionaries(_NAMES, _ENTRY | _JSON, max_size=4) | _JSON,
    data=st.binary(max_size=64),
)
def test_crafted_safetensors_headers_load_or_are_refused(header: Any, data: bytes) -> None:
    _every_loader(safetensors_header(header, data))


# --- mutated pickles inside a well-formed archive ----------------------------------------------


def _with_pickle(archive: bytes, mutate: Any) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(archive))
    members = {info.filename: source.read(info) for info in source.infolist()}
    (name,) = [n for n in members if n.endswith("/data.pkl")]
    members[name] = mutate(members[name])
    return zip_of(members)


_ARCHIVES = [seed for seed in SEEDS if seed.startswith(b"PK") and b"constants.pkl" not in seed]


@FUZZ_MORE
@given(
    seed=st.sampled_from(range(len(_ARCHIVES))),
    mutations=st.lists(_MUTATION, min_size=1, max_size=3),
)
def test_mutated_pickles_load_or_are_refused(seed: int, mutations: list[Any]) -> None:
    _every_loader(_with_pickle(_ARCHIVES[seed], lambda pickled: _mutated(pickled, mutations)))


# --- allowed names called with arbitrary arguments ---------------------------------------------


class _Call:
    """Pickles as a call of ``function`` (one of the allowed names) with ``args``."""

    def __init__(self, function: Any, args: tuple[Any, ...]) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.function, self.args)


def _storage(size: int) -> Any:
    return torch.ones(size).untyped_storage()


def _typed(size: int) -> Any:
    return torch.storage.TypedStorage(wrap_storage=_storage(size), dtype=torch.float32, _internal=True)


_ALLOWED_FUNCTIONS = st.sampled_from(
    [
        torch._utils._rebuild_tensor_v2,
        torch._utils._rebuild_parameter,
        torch._utils._rebuild_device_tensor_from_numpy,
        collections.OrderedDict,
        numpy.dtype,
        codecs.encode,
        set,
    ]
)
_ARGUMENT = st.one_of(
    _JSON,
    st.integers(0, 8).map(_typed),
    st.tuples(st.integers(-2, 5), st.integers(-2, 5)),
    st.sampled_from([(), (2,), (2, 2), (1,), (0,), collections.OrderedDict(), True, False, "latin1", "F"]),
)


@FUZZ_MORE
@given(calls=st.lists(st.tuples(_ALLOWED_FUNCTIONS, st.lists(_ARGUMENT, max_size=7)), min_size=1, max_size=4))
def test_allowed_names_called_with_arbitrary_arguments_load_or_are_refused(calls: list[Any]) -> None:
    state = {f"lora_unet_x{i}.lora_down.weight": _Call(f, tuple(args)) for i, (f, args) in enumerate(calls)}
    try:
        data = torch_bytes(state)
    except Exception:  # torch cannot pickle some argument mixes; nothing to load then
        return
    _every_loader(data)


def test_the_seeds_are_what_the_fuzzing_starts_from() -> None:
    """The clean seeds load as their kinds, so the fuzzing starts from real files."""
    with tempfile.TemporaryDirectory() as folder:
        models = Path(folder)
        write(models / "Lora/a.safetensors", SEEDS[0])
        write(models / "Lora/b.pt", SEEDS[1])
        write(models / "hypernetworks/c.pt", SEEDS[2])
        write(models / "embeddings/d.pt", SEEDS[3])
        files = CheckpointLibrary(models).model_files()
        assert (
            sorted(files.loras) == ["a", "b"] and files.hypernetworks == ["c"] and files.embeddings == ["d"]
        )
        assert files.unreadable == []
