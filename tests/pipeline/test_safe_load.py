from __future__ import annotations

import collections
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from pipeline import safe_load
from pipeline.errors import CheckpointLoadError, EngineError
from pipeline.safe_load import UnsafeCheckpoint, load_state_dict, read_safetensors_header


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
