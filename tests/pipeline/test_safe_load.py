"""Safe loading: the format from the file's bytes, one allow-list unpickler, and the
crafted-archive family refused by every loader without running anything."""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import safe_load
from pipeline.checkpoints import CheckpointLibrary
from pipeline.embeddings import EmbeddingLoadError, load_embedding
from pipeline.errors import CheckpointLoadError, EngineError
from pipeline.networks import NetworkLibrary, NetworkLoadError
from pipeline.safe_load import UnsafeCheckpoint, load_state_dict, read_safetensors_header
from pipeline.vae import VaeLoadError, load_vae
from tests.pipeline.crafted_files import crafted_family, safetensors_header, write
from tests.pipeline.crafted_files import torch_bytes as crafted_torch_bytes

# The crafted payloads are scripted and saved with torch.jit, which warns that it is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


class _CreatesFile:
    """Unpickling this would create ``path`` (the attack a safe loader must stop)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a1111_state_dict_ckpt_loads(tmp_path):
    state = collections.OrderedDict(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4),
            "first_stage_model.encoder.conv_in.bias": torch.nn.Parameter(torch.zeros(3)),
            "cond_stage_model.transformer.text_model.x": torch.ones(2, dtype=torch.bfloat16),
        }
    )
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": np.int64(7), "epoch": 1, "tags": {"a"}}, path)
    loaded = load_state_dict(path)
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_legacy_non_zip_format_loads(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.arange(3)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict(path)["w"], torch.arange(3))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_would_create_a_file_is_refused(tmp_path, legacy):
    victim = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.ones(1)}, "x": _CreatesFile(str(victim))}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpoint) as info:
        load_state_dict(path)
    assert not victim.exists()
    assert "evil.ckpt" in str(info.value) and "io.open" in str(info.value)
    assert info.value.key == "error.unsafe_checkpoint"
    assert info.value.params["file"] == str(path) and info.value.params["name"] == "evil.ckpt"
    assert isinstance(info.value, CheckpointLoadError) and isinstance(info.value, EngineError)


def test_os_system_global_is_refused(tmp_path):
    path = tmp_path / "sys.pt"
    path.write_bytes(pickle.dumps(_Reduce(os.system, ("true",)), protocol=2))
    with pytest.raises(UnsafeCheckpoint, match=r"(posix|os|nt)\.system"):
        load_state_dict(path)


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def test_zip_with_foreign_member_is_refused(tmp_path):
    import zipfile

    path = tmp_path / "extra.ckpt"
    torch.save({"w": torch.ones(1)}, path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("extra/payload.py", "print('hi')")
    with pytest.raises(UnsafeCheckpoint, match="payload.py"):
        load_state_dict(path)


def test_garbage_ckpt_is_a_load_error(tmp_path):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(b"\x00\x01 definitely not a checkpoint")
    with pytest.raises(CheckpointLoadError, match="junk.ckpt"):
        load_state_dict(path)


def test_non_dict_pickle_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointLoadError, match="list"):
        load_state_dict(path)


def test_safetensors_roundtrip(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.ones(2, 3)}, path, metadata={"k": "v"})
    assert read_safetensors_header(path)["__metadata__"] == {"k": "v"}
    assert torch.equal(load_state_dict(path)["a"], torch.ones(2, 3))


def _header_file(tmp_path, length: int, body: bytes) -> os.PathLike[str]:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", length) + body)
    return path


@pytest.mark.parametrize(
    ("length", "body", "reason"),
    [
        (10, b"{}", "only 2 follow"),
        (safe_load.MAX_SAFETENSORS_HEADER + 1, b"{}", "limit"),
        (4, b"nope", "not valid JSON"),
        (2, b"[]", "not a JSON object"),
        (2, b"\xff\xfe", "not valid JSON"),
    ],
)
def test_malformed_safetensors_headers_are_refused(tmp_path, length, body, reason):
    path = _header_file(tmp_path, length, body)
    with pytest.raises(UnsafeCheckpoint, match=reason) as info:
        load_state_dict(path)
    assert "bad.safetensors" in str(info.value)


def test_tensor_offsets_beyond_the_data_are_refused(tmp_path):
    header = b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    path = _header_file(tmp_path, len(header), header + b"\x00" * 8)
    with pytest.raises(UnsafeCheckpoint, match="invalid data offsets"):
        load_state_dict(path)


def test_too_short_safetensors_is_refused(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01")
    with pytest.raises(UnsafeCheckpoint, match="too short"):
        read_safetensors_header(path)


# --- the crafted-archive family, for every loader --------------------------------------------

CRAFTED = list(crafted_family(Path("/marker-placeholder")))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The family once per module (scripting the TorchScript payload takes a while); the
    payloads create ``marker`` if anything executes them."""
    marker = tmp_path_factory.mktemp("family") / "marker.txt"
    return marker, crafted_family(marker)


@pytest.fixture(scope="module")
def tiny_vae_config():
    from pipeline.tiny import build_tiny_pipeline

    return dict(build_tiny_pipeline().vae.config)


def _load_checkpoint(models: Path, path: Path, vae_config: dict) -> None:
    CheckpointLibrary(models).load("crafted")


def _load_vae(models: Path, path: Path, vae_config: dict) -> None:
    load_vae(path, config=vae_config)


def _load_lora(models: Path, path: Path, vae_config: dict) -> None:
    NetworkLibrary(models).for_prompt("a cat <lora:crafted:1>")


def _load_hypernetwork(models: Path, path: Path, vae_config: dict) -> None:
    NetworkLibrary(models).for_prompt("a cat <hypernet:crafted:1>")


def _load_embedding(models: Path, path: Path, vae_config: dict) -> None:
    load_embedding(path)


# loader -> (how it loads, where the file goes, the errors it may raise)
LOADERS = {
    "checkpoint": (_load_checkpoint, "Stable-diffusion/crafted.safetensors", (CheckpointLoadError,)),
    "vae": (_load_vae, "VAE/crafted.ckpt", (CheckpointLoadError, VaeLoadError)),
    "lora": (_load_lora, "Lora/crafted.pt", (CheckpointLoadError, NetworkLoadError)),
    "hypernetwork": (_load_hypernetwork, "hypernetworks/crafted.pt", (CheckpointLoadError, NetworkLoadError)),
    "embedding": (_load_embedding, "embeddings/crafted.bin", (EmbeddingLoadError,)),
}
FOLDER_KIND = {"vae": "vae", "lora": "lora", "hypernetwork": "hypernetwork", "embedding": "embedding"}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("crafted", CRAFTED)
def test_crafted_archives_are_refused_by_every_loader(tmp_path, family, tiny_vae_config, crafted, loader):
    marker, files = family
    data, pattern = files[crafted]
    load, relative, errors = LOADERS[loader]
    models = tmp_path / "models"
    path = write(models / relative, data)
    try:
        load(models, path, tiny_vae_config)
    except errors as exc:
        # Every refusal names the file (a checkpoint by its name) and says why.
        assert "crafted" in str(exc) or isinstance(exc, EmbeddingLoadError)
        if pattern:
            assert re.search(pattern, str(exc)), str(exc)
    else:
        assert not pattern, f"{crafted} was loaded by the {loader} loader"
    assert not marker.exists()
    if pattern:
        library = CheckpointLibrary(models)
        skipped = library.model_files().unreadable
        assert [entry.name for entry in skipped] == [relative]
        assert skipped[0].kind == FOLDER_KIND.get(loader, "checkpoint")
        assert re.search(pattern, skipped[0].reason), skipped[0].reason
    assert not marker.exists()


def test_the_crafted_payloads_are_live(tmp_path, family):
    """Control: the same payloads do run when handed to torch, so the refusals above are
    what stops them; and Python's zip reader does not see the archive torch sees."""
    import zipfile

    marker = tmp_path / "control.txt"
    script = crafted_family(marker)["torchscript with a cut end record appended"][0]
    path = write(tmp_path / "control.pt", script)
    assert not zipfile.is_zipfile(path)
    with pytest.warns(UserWarning, match="TorchScript"):
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_state_dicts_of_every_layout_round_trip(tmp_path):
    """What torch.save writes for a state dict reads back equal: views and transposes of
    shared storages, parameters, every storage dtype, empty and 0-d tensors, numpy
    scalars and arrays, nested containers; in both torch formats."""
    base = torch.randn(4, 6)
    state = {
        "w": base,
        "view": base[1:3, ::2],
        "t": base.t(),
        "p": torch.nn.Parameter(torch.ones(2)),
        "half": torch.ones(3, dtype=torch.float16),
        "bf16": torch.ones(3, dtype=torch.bfloat16),
        "bool": torch.tensor([True, False]),
        "long": torch.arange(5),
        "byte": torch.arange(3, dtype=torch.uint8),
        "0d": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
        "step": np.int64(7),
        "loss": np.float32(0.25),
        "array": np.arange(4, dtype=np.float32),
        "nested": {"list": [torch.ones(2), (1, "s", None, b"\x00\xff")], "set": {1, 2}},
    }
    for legacy in (False, True):
        path = tmp_path / f"state-{legacy}.pt"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        loaded = safe_load.read_model_file(path)
        for key in ("w", "view", "t", "p", "half", "bf16", "bool", "long", "byte", "0d", "empty"):
            assert loaded[key].dtype == state[key].dtype and torch.equal(loaded[key], state[key]), key
        assert loaded["step"] == 7 and loaded["loss"] == np.float32(0.25)
        assert np.array_equal(loaded["array"], state["array"])
        assert torch.equal(loaded["nested"]["list"][0], torch.ones(2))
        assert loaded["nested"]["list"][1] == (1, "s", None, b"\x00\xff") and loaded["nested"]["set"] == {
            1,
            2,
        }
        summary = safe_load.inspect_model_file(path)
        assert summary.format == ("torch-legacy" if legacy else "torch-zip")
        assert summary.shapes["view"] == (2, 3) and summary.shapes["empty"] == (0, 4)


def test_the_format_comes_from_the_bytes_not_the_name(tmp_path):
    from safetensors.torch import save

    named_pt = write(tmp_path / "really-safetensors.pt", save({"a": torch.ones(2)}))
    named_safetensors = write(
        tmp_path / "really-torch.safetensors", crafted_torch_bytes({"a": torch.ones(2)})
    )
    assert safe_load.sniff_format(named_pt) == "safetensors"
    assert safe_load.sniff_format(named_safetensors) == "torch-zip"
    assert torch.equal(load_state_dict(named_pt)["a"], torch.ones(2))
    assert torch.equal(load_state_dict(named_safetensors)["a"], torch.ones(2))


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"a": {"dtype": "F32", "shape": 5, "data_offsets": [0, 4]}}, "not a list of sizes"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "not a list of sizes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "does not match its 4 bytes"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "not a list of sizes"),
        ({"a": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]}}, "dtype 'PICKLE'; allowed: F64"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, "exactly dtype"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "does not start"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"k": 1}}, "strings"),
        ({"a": [[[[1]]]]}, "nested 5 levels"),
        ({"a": {"dtype": "F32", "shape": [1, 10**30], "data_offsets": [0, 4]}}, "does not match its 4 bytes"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "4 bytes after the last tensor"),
    ],
)
def test_safetensors_headers_are_type_checked(tmp_path, header, reason):
    path = write(tmp_path / "bad.safetensors", safetensors_header(header, b"\0" * 8))
    with pytest.raises(UnsafeCheckpoint, match=re.escape(reason) if "'" in reason else reason):
        load_state_dict(path)


def test_zero_dim_tensors_and_duplicate_names(tmp_path):
    scalar = {"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}
    path = write(tmp_path / "scalar.safetensors", safetensors_header(scalar, struct.pack("<f", 1.5)))
    assert load_state_dict(path)["a"].item() == 1.5
    duplicate = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    path = write(tmp_path / "twice.safetensors", safetensors_header(duplicate, b"\0\0"))
    with pytest.raises(UnsafeCheckpoint, match="appears twice"):
        load_state_dict(path)


@pytest.mark.parametrize(
    ("rebuild_args", "reason"),
    [
        (("not a storage", 0, (2,), (1,), False, collections.OrderedDict()), "other than a storage"),
        (None, "outside its storage"),
    ],
)
def test_rebuild_arguments_are_checked_before_use(tmp_path, rebuild_args, reason):
    """A LoRA whose pickle calls torch's tensor rebuild with nonsense arguments is refused
    with a reason, not an internal error."""

    class Nonsense:
        def __init__(self, args):
            self.args = args

        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, self.args)

    if rebuild_args is None:  # a real storage, viewed far beyond its end
        storage = torch.ones(2).untyped_storage()
        typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
        rebuild_args = (typed, 0, (1000,), (1,), False, collections.OrderedDict())
    path = tmp_path / "nonsense.pt"
    torch.save({"x.lora_down.weight": Nonsense(rebuild_args)}, path)
    with pytest.raises(UnsafeCheckpoint, match=reason):
        safe_load.read_model_file(path)


def test_one_file_cannot_change_how_the_next_is_checked(tmp_path):
    """BUILD on an allowed name (here the storage type every tensor record uses) is refused,
    so a file cannot rewrite the allow-list's objects for later loads."""
    import pickletools

    payload = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypectorch\nint64\nsb."
    pickletools.dis(payload, out=io.StringIO())  # a well-formed pickle
    path = write(tmp_path / "rewrite.pt", payload)
    with pytest.raises(UnsafeCheckpoint, match="modify"):
        safe_load.read_model_file(path)
    path = tmp_path / "after.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert load_state_dict(path)["w"].dtype == torch.float32
