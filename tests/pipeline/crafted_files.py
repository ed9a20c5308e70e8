"""Model files built at test time: small valid ones of each kind, and hostile ones whose
payload creates a marker file if anything executes it (TorchScript code run on load,
pickles that call ``open``), wrapped in the archive tricks that once got them past a
layout check."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save, save_file

WIDTH = 32  # the tiny model's text-encoder width
LORA_KEY = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
END_RECORD = b"PK\x05\x06"


class CreatesFile:
    """Unpickling this creates ``path``: the attack a safe loader must stop."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


class _WritesOnLoad(torch.nn.Module):
    """Scripted, its ``__setstate__`` (run by ``torch.jit.load``) creates ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.size = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        self.size = torch.from_file(state[0], shared=True, size=8).numel()


def torchscript_bytes(marker: Path) -> bytes:
    """A TorchScript archive that creates ``marker`` when ``torch.jit.load`` reads it."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(_WritesOnLoad(str(marker))), buffer)
    return buffer.getvalue()


def torch_bytes(obj: Any, *, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


# --- valid files of each kind ------------------------------------------------------------------


def lora_state(rank: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        f"{LORA_KEY}.lora_down.weight": torch.randn(rank, WIDTH, generator=generator) * 0.1,
        f"{LORA_KEY}.lora_up.weight": torch.randn(WIDTH * 2, rank, generator=generator) * 0.1,
        f"{LORA_KEY}.alpha": torch.tensor(float(rank)),
    }


def hypernetwork_state(width: int = WIDTH) -> dict[Any, Any]:
    generator = torch.Generator().manual_seed(1)

    def module() -> dict[str, torch.Tensor]:
        return {
            "linear.0.weight": torch.randn(2 * width, width, generator=generator) * 0.1,
            "linear.0.bias": torch.zeros(2 * width),
            "linear.1.weight": torch.randn(width, 2 * width, generator=generator) * 0.1,
            "linear.1.bias": torch.zeros(width),
        }

    return {
        "layer_structure": [1, 2, 1],
        "activation_func": "linear",
        "name": "hn",
        width: [module(), module()],
    }


def embedding_state(rows: int = 1) -> dict[str, Any]:
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(rows, WIDTH)}, "step": 10}


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_lora(path: Path) -> Path:
    if path.suffix == ".safetensors":
        return write(path, save(lora_state()))
    return write(path, torch_bytes(lora_state()))


def write_hypernetwork(path: Path) -> Path:
    return write(path, torch_bytes(hypernetwork_state()))


def write_embedding(path: Path) -> Path:
    if path.suffix == ".safetensors":
        return write(path, save({"emb_params": torch.randn(1, WIDTH)}))
    return write(path, torch_bytes(embedding_state()))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


# --- archive tricks ----------------------------------------------------------------------------


def trailing_end_record(data: bytes, zeros: int = 18) -> bytes:
    """``PK\\x05\\x06`` and zeros after the end record: some readers then see a different
    archive (or none) than torch does."""
    return data + END_RECORD + b"\0" * zeros


def zip_of(members: dict[str, bytes], *, compress: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compress) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def _end_offset(data: bytes) -> int:
    return len(data) - 22


def zip64_locator_moved(data: bytes) -> bytes:
    """The zip64 locator points 8 bytes before the zip64 end record."""
    at = _end_offset(data) - 20
    offset = struct.unpack_from("<Q", data, at + 8)[0]
    return data[: at + 8] + struct.pack("<Q", offset - 8) + data[at + 16 :]


def zip64_disagrees(data: bytes) -> bytes:
    """The zip64 end record claims one member more than the classic end record."""
    at = _end_offset(data) - 20 - 56
    entries = struct.unpack_from("<Q", data, at + 32)[0]
    patched = struct.pack("<QQ", entries + 1, entries + 1)
    return data[: at + 24] + patched + data[at + 40 :]


def zip64_many_disks(data: bytes) -> bytes:
    """The zip64 locator claims the archive spans two disks."""
    at = _end_offset(data) - 20
    return data[: at + 16] + struct.pack("<I", 2) + data[at + 20 :]


def zip64_markers_without_records(data: bytes) -> bytes:
    """The end record says "see zip64" but the zip64 records are cut out."""
    end = data[-22:]
    head = data[: _end_offset(data) - 20 - 56]
    fields = list(struct.unpack("<4sHHHHIIH", end))
    fields[3], fields[4], fields[6] = 0xFFFF, 0xFFFF, 0xFFFFFFFF
    return head + struct.pack("<4sHHHHIIH", *fields)


def pickle_named_safetensors(marker: Path) -> bytes:
    """A valid safetensors file whose tensor name and metadata are pickles that would
    create ``marker`` if anything unpickled them."""
    payload = pickle.dumps(CreatesFile(marker), protocol=2).decode("latin-1")
    return save({payload: torch.zeros(2)}, metadata={"pickle": payload})


def safetensors_hiding(data: bytes) -> bytes:
    """A valid safetensors file whose only tensor's bytes are ``data`` (an archive)."""
    return save({"blob": torch.frombuffer(bytearray(data), dtype=torch.uint8)})


def safetensors_header(header: Any, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def crafted_family(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Name -> (file bytes, a pattern the refusal's reason must match; "" where the file
    is safe to read and only its layout decides whether a loader takes it). Each one
    would create ``marker`` if anything in it ran."""
    script = torchscript_bytes(marker)
    state_dict = torch_bytes(lora_state())
    pickle_payload = {"hook": CreatesFile(marker), "state_dict": lora_state()}
    family: dict[str, tuple[bytes, str]] = {
        "torchscript": (script, "TorchScript"),
        "torchscript with an empty end record appended": (trailing_end_record(script), "bytes follow"),
        "torchscript with a cut end record appended": (trailing_end_record(script, 4), "bytes follow"),
        "torchscript with junk appended": (script + b"\0" * 100, "bytes follow"),
        "torchscript after a state-dict archive": (state_dict + script, "zip64"),
        "state-dict archive after torchscript": (script + state_dict, "zip64"),
        "torchscript inside a zip": (
            zip_of({"archive/data.pkl": script, "archive/version": b"3\n"}),
            "pickle",
        ),
        "zip inside a zip member name": (zip_of({"inner.zip": script}), "folder"),
        "deflated state-dict members": (_deflated(state_dict), "compressed"),
        "zip64 locator moved": (zip64_locator_moved(script), "zip64"),
        "zip64 records disagree": (zip64_disagrees(script), "disagree"),
        "zip64 on two disks": (zip64_many_disks(script), "disks"),
        "zip64 markers without records": (zip64_markers_without_records(script), "zip64"),
        "pickle calling open (zip)": (torch_bytes(pickle_payload), "open"),
        "pickle calling open (legacy)": (torch_bytes(pickle_payload, legacy=True), "open"),
        "plain pickle calling open": (pickle.dumps(pickle_payload, protocol=2), "open"),
        "pickle in a safetensors name": (pickle_named_safetensors(marker), ""),
        "torchscript inside a safetensors tensor": (safetensors_hiding(script), ""),
        "deep safetensors header": (safetensors_header(b"[" * 200_000), "nested|unrecognised"),
    }
    return family


def repickled(data: bytes, old: bytes, new: bytes) -> bytes:
    """A torch zip archive with ``old`` replaced by ``new`` in its data.pkl (to name any
    global a pickle can name), rewritten as a plain stored zip."""
    source = zipfile.ZipFile(io.BytesIO(data))
    members = {info.filename: source.read(info) for info in source.infolist()}
    (name,) = [n for n in members if n.endswith("/data.pkl")]
    assert old in members[name]
    members[name] = members[name].replace(old, new)
    return zip_of(members)


def pickled_str(text: str) -> bytes:
    """How protocol 2 writes a short ``str``: BINUNICODE, its length, its UTF-8 bytes."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _deflated(data: bytes) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(data))
    return zip_of(
        {info.filename: source.read(info) for info in source.infolist()}, compress=zipfile.ZIP_DEFLATED
    )


Writer = Callable[[Path], Path]
