"""Which files in the models folder can be used, and why the others cannot.

A scan never fails because of one file: each VAE, LoRA, hypernetwork and embedding is
checked on its own (format, layout and pickle checks of :mod:`pipeline.safe_load`, on the
meta device so no weights are read; an embedding, being small, is loaded), and a file
that fails is reported as an :class:`UnreadableFile` with the reason instead of being
offered. Results are kept per file while its size and modification time are unchanged,
so listing a large folder again costs a ``stat`` per file.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.errors import EngineError

logger = logging.getLogger(__name__)

__all__ = ["FileChecks", "ModelFiles", "UnreadableFile", "code_of", "reason_of"]

Kind = Literal["checkpoint", "config", "vae", "lora", "hypernetwork", "embedding"]
# Why a file was skipped, for users: refused by the safe loader, safe but not a usable file
# of its kind, not readable at all, or a checkpoint whose .yaml/.vae beside it failed.
Code = Literal["refused", "invalid", "unreadable", "side_file"]
KINDS: tuple[Kind, ...] = ("checkpoint", "config", "vae", "lora", "hypernetwork", "embedding")
# An embedding is at most 75 vectors of 2048 floats (an SDXL pair); far larger files are
# not embeddings, and loading them whole to find out would be slow.
MAX_EMBEDDING_BYTES = 64 * 1024 * 1024
_REASON_LIMIT = 300


@dataclass(frozen=True)
class UnreadableFile:
    """A file that was skipped: ``name`` is its path relative to the models folder
    (``"Lora/bad.safetensors"``), ``kind`` what it was taken for, ``reason`` why (English
    detail), ``code`` the kind of reason; ``side`` the ``.yaml``/``.vae`` file that made a
    checkpoint fail (code ``side_file``)."""

    name: str
    kind: Kind
    reason: str
    code: Code = "invalid"
    side: str | None = None


@dataclass(frozen=True)
class ModelFiles:
    """The usable VAE, LoRA, hypernetwork and embedding names, and every skipped file
    (checkpoints and the files beside them included)."""

    vaes: list[str] = field(default_factory=list)
    loras: list[str] = field(default_factory=list)
    hypernetworks: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    unreadable: list[UnreadableFile] = field(default_factory=list)


def reason_of(exc: BaseException) -> str:
    """The short reason an engine error carries (its ``reason`` param), else its text."""
    params = getattr(exc, "params", None)
    reason = params.get("reason") if isinstance(params, dict) else None
    text = " ".join(str(reason if reason is not None else exc).split())
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 3] + "..."


def code_of(exc: BaseException) -> Code:
    """``refused`` when the safe loader refused the file (also behind a loader's own error),
    ``unreadable`` for I/O errors, ``invalid`` otherwise."""
    from pipeline.safe_load import UnsafeCheckpoint

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, UnsafeCheckpoint):
            return "refused"
        if isinstance(seen, OSError):
            return "unreadable"
        seen = seen.__cause__
    return "invalid"


def relative_name(path: Path, models_dir: Path | None) -> str:
    if models_dir is not None:
        try:
            return path.relative_to(models_dir).as_posix()
        except ValueError:
            pass
    return path.name


class FileChecks:
    """Check results by file, kept while the file's size and mtime stay the same."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._results: dict[tuple[Path, str], tuple[tuple[int, int], tuple[str, Code] | None]] = {}

    def clear(self) -> None:
        with self._lock:
            self._results.clear()

    def reason(self, path: Path, kind: Kind, check: Callable[[Path], None]) -> tuple[str, Code] | None:
        """None when ``check(path)`` passes, else why not (reason, code); never raises for
        a bad file."""
        try:
            stat = path.stat()
        except OSError as exc:
            return f"cannot be read ({exc.strerror or exc})", "unreadable"
        stamp = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._results.get((path, kind))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        reason = _run(path, kind, check)
        with self._lock:
            self._results[(path, kind)] = (stamp, reason)
        return reason

    def model_files(self, models_dir: Path | None, kinds: Iterable[Kind] = KINDS) -> ModelFiles:
        """Check every VAE, LoRA, hypernetwork and embedding file under ``models_dir``
        (only the ``kinds`` asked for)."""
        from pipeline import networks, vae

        wanted = set(kinds)
        found = ModelFiles()
        if models_dir is None:
            return found
        library = networks.NetworkLibrary(models_dir)
        # Each folder is listed only when its kind is asked for (a /draw asks for embeddings).
        folders: list[tuple[Kind, Callable[[], dict[str, Path]], Callable[[Path], None], list[str]]] = [
            ("vae", lambda: vae.vae_names(models_dir), _check_vae, found.vaes),
            ("lora", library.lora_files, _check_lora, found.loras),
            ("hypernetwork", library.hypernetwork_files, _check_hypernetwork, found.hypernetworks),
            ("embedding", lambda: _embedding_files(models_dir), _check_embedding, found.embeddings),
        ]
        for kind, files, check, usable in folders:
            if kind not in wanted:
                continue
            for name, path in files().items():
                failed = self.reason(path, kind, check)
                if failed is None:
                    usable.append(name)
                else:
                    reason, code = failed
                    found.unreadable.append(
                        UnreadableFile(relative_name(path, models_dir), kind, reason, code)
                    )
        return found


def _run(path: Path, kind: Kind, check: Callable[[Path], None]) -> tuple[str, Code] | None:
    try:
        check(path)
    except (EngineError, ValueError) as exc:
        logger.warning("skipping %s file %s: %s", kind, path, exc)
        return reason_of(exc), code_of(exc)
    except OSError as exc:
        logger.warning("cannot read %s file %s: %s", kind, path, exc)
        return f"cannot be read ({exc.strerror or exc})", "unreadable"
    return None


def _embedding_files(models_dir: Path) -> dict[str, Path]:
    """Embedding name -> file, the later file winning a name as the database's scan does."""
    from pipeline.checkpoints import EMBEDDINGS_SUBDIR
    from pipeline.embeddings import embedding_files

    folder = models_dir / EMBEDDINGS_SUBDIR
    if not folder.is_dir():
        return {}
    files: dict[str, Path] = {}
    for path in embedding_files(folder):
        files.pop(path.stem, None)
        files[path.stem] = path
    return files


def _check_vae(path: Path) -> None:
    from pipeline.safe_load import inspect_model_file

    if not inspect_model_file(path).shapes:
        raise ValueError("it holds no tensors")


def _check_lora(path: Path) -> None:
    from pipeline.networks import lora_pairs
    from pipeline.safe_load import read_model_file

    state = read_model_file(path, meta=True)
    if not isinstance(state, dict) or not lora_pairs(state):
        raise ValueError("it holds no kohya-format LoRA weights")


def _check_hypernetwork(path: Path) -> None:
    from pipeline.hypernetwork import check_state
    from pipeline.safe_load import read_model_file

    check_state(read_model_file(path, meta=True))


def _check_embedding(path: Path) -> None:
    from pipeline.embeddings import load_embedding

    size = path.stat().st_size
    if size == 0:
        raise ValueError("the file is empty")
    if size > MAX_EMBEDDING_BYTES:
        raise ValueError(f"it has {size} bytes, far more than an embedding holds")
    load_embedding(path)
