"""Textual-inversion embeddings from A1111's ``embeddings/`` folder.

A1111 finds an embedding in a prompt by its name's token ids, not by text: the name is
tokenised with the model's tokenizer, and wherever that id sequence appears in a prompt
fragment the embedding's vectors replace it, one chunk slot per vector (A1111-SEMANTICS.md
§7.1, §7.2). The database lists the files; :meth:`EmbeddingDatabase.lookup` builds the
matcher that :func:`pipeline.clip.chunk_prompt` takes for one text encoder, and
:meth:`EmbeddingDatabase.used` names what a prompt used for the ``TI hashes`` infotext
field (§12.1, §13).

SDXL embeddings hold a ``clip_l``/``clip_g`` pair; they load as one embedding whose vectors
are the two side by side (``part_widths`` records the split), usable only by a model whose
two text encoders have exactly those widths, as A1111 matches an embedding's shape; each
encoder takes its own columns (``pipeline.sdxl``). Single-vector embeddings are for
single-encoder models.

Files are untrusted: they are read through :func:`pipeline.safe_load.read_model_file`, the
one path every model file takes (format decided from the bytes, pickles through the
allow-list, §15), so nothing in them is executed. A file that cannot be read that way, or
whose layout is not an embedding's, is refused, logged, and kept in
:attr:`EmbeddingDatabase.refused` with the reason so the bot can tell its users.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import safe_load
from pipeline.clip import CHUNK_LENGTH, EmbeddingLookup, EmbeddingMatch, PromptChunk, Tokenize
from pipeline.errors import CheckpointLoadError
from pipeline.hashing import short_hash

log = logging.getLogger(__name__)

EMBEDDING_EXTENSIONS = (".pt", ".bin", ".safetensors")
# Keys A1111's own training writes next to the vectors; a file's other keys are ignored.
_A1111_PARAM_KEY = "string_to_param"
_EMB_PARAMS_KEY = "emb_params"
_SDXL_KEYS = ("clip_l", "clip_g")
_REASON_LIMIT = 300


class EmbeddingLoadError(ValueError):
    """A file in the embeddings folder that is not a usable embedding; the text says why."""


@dataclass(frozen=True, eq=False)
class Embedding:
    """One loaded embedding; ``vectors`` is ``(rows, width)`` float32 on the CPU.

    ``name`` is the file stem, as in A1111: a ``name`` key stored inside a ``.pt`` is kept
    as ``stored_name`` only, so renaming the file renames the prompt word. An SDXL pair has
    ``part_widths`` ``(clip_l, clip_g)`` and its vectors are ``clip_l`` then ``clip_g``.
    """

    name: str
    path: Path
    vectors: torch.Tensor
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    stored_name: str | None = None
    part_widths: tuple[int, ...] | None = None

    @property
    def rows(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def widths(self) -> tuple[int, ...]:
        """The text-encoder widths this embedding is for: one per encoder."""
        return self.part_widths if self.part_widths is not None else (self.width,)


# --- reading one file ---------------------------------------------------------------------------


def _short_reason(exc: BaseException) -> str:
    reason = str(exc.params.get("reason", exc)) if isinstance(exc, safe_load.UnsafeCheckpoint) else str(exc)
    reason = " ".join(reason.split())
    if len(reason) > _REASON_LIMIT:
        reason = reason[: _REASON_LIMIT - 3] + "..."
    return reason


def _read_file(path: Path) -> Any:
    """The file's raw contents, loaded without running any code the file might carry."""
    try:
        return safe_load.read_model_file(path)
    except CheckpointLoadError as exc:
        raise EmbeddingLoadError(f"cannot be loaded safely ({_short_reason(exc)})") from exc


def _single_tensor(params: Any, what: str) -> torch.Tensor:
    """The one tensor in a ``{token: tensor}`` mapping; A1111 refuses several tokens per file."""
    params = getattr(params, "_parameters", params)
    if not isinstance(params, Mapping) or len(params) != 1:
        count = len(params) if isinstance(params, Mapping) else type(params).__name__
        raise EmbeddingLoadError(f"{what} must hold exactly one tensor, found {count}")
    (value,) = params.values()
    if not isinstance(value, torch.Tensor):
        raise EmbeddingLoadError(f"{what} holds a {type(value).__name__}, not a tensor")
    return value


def _is_sdxl(data: Mapping[Any, Any]) -> bool:
    return all(isinstance(data.get(key), torch.Tensor) for key in _SDXL_KEYS)


def _raw_vectors(data: Any) -> torch.Tensor:
    """Find the vectors in any of the single-encoder layouts A1111 reads."""
    if not isinstance(data, Mapping):
        raise EmbeddingLoadError(f"holds a {type(data).__name__}, not a dict of tensors")
    if _A1111_PARAM_KEY in data:
        return _single_tensor(data[_A1111_PARAM_KEY], _A1111_PARAM_KEY)
    if isinstance(data.get(_EMB_PARAMS_KEY), torch.Tensor):
        return data[_EMB_PARAMS_KEY]
    return _single_tensor(data, "a diffusers embedding")


def _vectors(data: Any) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """The vectors and, for an SDXL pair, the two encoders' widths (the vectors side by side)."""
    if not isinstance(data, Mapping) or _A1111_PARAM_KEY in data or not _is_sdxl(data):
        return _as_vectors(_raw_vectors(data)), None
    parts = [_as_vectors(data[key]) for key in _SDXL_KEYS]
    if parts[0].shape[0] != parts[1].shape[0]:
        raise EmbeddingLoadError(
            f"has {parts[0].shape[0]} clip_l and {parts[1].shape[0]} clip_g vectors; they must match"
        )
    return torch.cat(parts, dim=1).contiguous(), tuple(int(p.shape[1]) for p in parts)


def _as_vectors(raw: torch.Tensor) -> torch.Tensor:
    """``(rows, width)`` float32: a diffusers file may store a single vector as ``(width,)``."""
    if not raw.is_floating_point():
        raise EmbeddingLoadError(f"holds a {raw.dtype} tensor, not floating point")
    vectors = raw.detach().to(device="cpu", dtype=torch.float32)
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise EmbeddingLoadError(f"has shape {tuple(raw.shape)}; expected (vectors, width)")
    if vectors.shape[0] > CHUNK_LENGTH:
        # A prompt chunk has 75 slots and an embedding is never split across chunks.
        raise EmbeddingLoadError(f"has {vectors.shape[0]} vectors; at most {CHUNK_LENGTH} fit in a chunk")
    return vectors.contiguous()


def _optional_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    return None


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def load_embedding(path: Path) -> Embedding:
    """Read one embedding file (an SDXL ``clip_l``/``clip_g`` pair included).

    Raises :class:`EmbeddingLoadError` for anything unreadable, unsafe or of an unknown layout.
    """
    data = _read_file(path)
    vectors, part_widths = _vectors(data)
    return Embedding(
        name=path.stem,
        path=path,
        vectors=vectors,
        part_widths=part_widths,
        step=_optional_int(data.get("step")),
        sd_checkpoint=_optional_str(data.get("sd_checkpoint")),
        sd_checkpoint_name=_optional_str(data.get("sd_checkpoint_name")),
        stored_name=_optional_str(data.get("name")),
    )


# --- scanning the folder ------------------------------------------------------------------------


def _natural_key(text: str) -> list[tuple[int, int | str]]:
    """Sort ``emb2`` before ``emb10``, as A1111 orders the files it walks."""
    return [(0, int(part)) if part.isdigit() else (1, part.lower()) for part in re.split(r"(\d+)", text)]


def embedding_files(folder: Path) -> list[Path]:
    """Embedding files under ``folder`` in load order; hidden folders are skipped, as in A1111."""
    found: list[Path] = []
    seen_dirs: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:  # a symlink loop would otherwise be walked forever
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=_natural_key)
        for name in sorted(files, key=_natural_key):
            if os.path.splitext(name)[1].lower() in EMBEDDING_EXTENSIONS:
                found.append(Path(root) / name)
    return found


@dataclass(frozen=True)
class RefusedEmbedding:
    """A file in the embeddings folder that was not loaded, and why (English)."""

    name: str
    path: Path
    reason: str


def _load_folder(folder: Path | None) -> tuple[dict[str, Embedding], list[RefusedEmbedding]]:
    if folder is None:
        return {}, []
    if not folder.is_dir():
        log.info("embeddings folder %s does not exist; no textual-inversion embeddings", folder)
        return {}, []
    loaded: dict[str, Embedding] = {}
    refused: list[RefusedEmbedding] = []
    for path in embedding_files(folder):
        embedding = _load_one(path)
        if isinstance(embedding, str):
            refused.append(RefusedEmbedding(path.stem, path, embedding))
            continue
        previous = loaded.pop(embedding.name, None)
        if previous is not None:
            log.warning("embedding %r: %s replaces %s (same name)", embedding.name, path, previous.path)
        loaded[embedding.name] = embedding
    log.info("loaded %d textual-inversion embeddings from %s", len(loaded), folder)
    return loaded, refused


def _load_one(path: Path) -> Embedding | str:
    """Load a file for the scan; the reason, logged, when it is left out."""
    try:
        if path.stat().st_size == 0:
            log.info("skipping empty embedding file %s", path)
            return "the file is empty"
        return load_embedding(path)
    except EmbeddingLoadError as exc:
        log.warning("refusing embedding file %s: %s", path, exc)
        return str(exc)
    except OSError as exc:
        log.warning("cannot read embedding file %s: %s", path, exc)
        return f"cannot be read ({exc.strerror or exc})"


# --- matching names in prompts ------------------------------------------------------------------


class _NameIndex:
    """The ``EmbeddingLookup`` for one tokenizer: candidates by first id, longest name first."""

    def __init__(self, by_first_id: dict[int, list[tuple[tuple[int, ...], EmbeddingMatch]]]) -> None:
        self._by_first_id = by_first_id

    def __call__(self, ids: Sequence[int], position: int) -> EmbeddingMatch | None:
        if not 0 <= position < len(ids):
            return None
        for name_ids, match in self._by_first_id.get(int(ids[position]), ()):
            end = position + len(name_ids)
            if end <= len(ids) and tuple(int(t) for t in ids[position:end]) == name_ids:
                return match
        return None


def _build_index(embeddings: list[Embedding], tokenize: Tokenize) -> _NameIndex:
    by_first_id: dict[int, list[tuple[tuple[int, ...], EmbeddingMatch]]] = {}
    if not embeddings:
        return _NameIndex(by_first_id)
    token_lists = tokenize([embedding.name for embedding in embeddings])
    for embedding, ids in zip(embeddings, token_lists, strict=True):
        name_ids = tuple(int(t) for t in ids)
        if not name_ids:
            log.info("embedding %r tokenises to nothing; it can never match", embedding.name)
            continue
        match = EmbeddingMatch(name=embedding.name, vectors=embedding.vectors, token_length=len(name_ids))
        by_first_id.setdefault(name_ids[0], []).append((name_ids, match))
    for candidates in by_first_id.values():
        # Stable sort: among equal lengths the file loaded first is tried first.
        candidates.sort(key=lambda item: len(item[0]), reverse=True)
    return _NameIndex(by_first_id)


# --- the database -------------------------------------------------------------------------------


class EmbeddingDatabase:
    """The embeddings in one A1111-style folder, scanned on first use and on :meth:`refresh`.

    The database is model-independent; :meth:`lookup` adapts it to one text encoder's
    tokenizer and width. Safe to share between threads: a refresh swaps the whole catalogue,
    so a lookup built before it keeps serving the old one.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._lock = threading.Lock()
        self._embeddings: dict[str, Embedding] | None = None
        self._refused: list[RefusedEmbedding] = []
        self._hashes: dict[Path, str] = {}
        self._warned_widths: set[tuple[str, tuple[int, ...]]] = set()
        self._version = 0

    def refresh(self) -> None:
        """Re-scan the folder, e.g. after files were added; cached hashes are dropped too."""
        embeddings, refused = _load_folder(self.folder)
        with self._lock:
            self._embeddings = embeddings
            self._refused = refused
            self._hashes = {}
            self._warned_widths = set()
            self._version += 1

    @property
    def version(self) -> int:
        """Bumped by every scan, so callers caching chunked prompts know when to drop them."""
        self._catalogue()
        return self._version

    @property
    def embeddings(self) -> dict[str, Embedding]:
        """Name -> embedding, in load order (a copy)."""
        return dict(self._catalogue())

    def names(self) -> list[str]:
        return list(self._catalogue())

    @property
    def refused(self) -> list[RefusedEmbedding]:
        """The files of the last scan that were not loaded, with the reason, in scan order."""
        self._catalogue()
        with self._lock:
            return list(self._refused)

    def get(self, name: str) -> Embedding | None:
        return self._catalogue().get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._catalogue()

    def __len__(self) -> int:
        return len(self._catalogue())

    def _catalogue(self) -> dict[str, Embedding]:
        with self._lock:
            current = self._embeddings
        if current is None:
            self.refresh()
            with self._lock:
                current = self._embeddings or {}
        return current

    def usable(self, hidden_size: int | tuple[int, ...] | None = None) -> list[Embedding]:
        """The embeddings a model's text encoder(s) can take: ``hidden_size`` is one width, or
        one per encoder (SDXL: ``(768, 1280)``); all when ``None``."""
        wanted = (hidden_size,) if isinstance(hidden_size, int) else hidden_size
        usable = []
        for embedding in self._catalogue().values():
            if wanted is None or embedding.widths == tuple(wanted):
                usable.append(embedding)
            else:
                self._log_width_skip(embedding, tuple(wanted))
        return usable

    def _log_width_skip(self, embedding: Embedding, widths: tuple[int, ...]) -> None:
        key = (embedding.name, widths)
        with self._lock:
            first = key not in self._warned_widths
            self._warned_widths.add(key)
        if first:
            log.info(
                "embedding %r (%s) has width %s; skipped for this model, whose text encoder has width %s",
                embedding.name,
                embedding.path,
                _widths_text(embedding.widths),
                _widths_text(widths),
            )

    def lookup(
        self, tokenize: Tokenize, *, hidden_size: int | tuple[int, ...] | None = None
    ) -> EmbeddingLookup:
        """The ``embeddings=`` matcher for ``chunk_prompt`` with this ``tokenize``.

        Pass the text encoder's ``hidden_size`` (a tuple for SDXL's two) so that embeddings
        trained for another model family (768 vs 1024 wide, SD vs SDXL) are left as plain
        words instead of breaking the encoder.
        """
        return _build_index(self.usable(hidden_size), tokenize)

    def used(self, prompt_chunks: Iterable[PromptChunk]) -> dict[str, str]:
        """Name -> 12-hex short hash of each embedding placed in ``prompt_chunks``, in first-use order.

        An embedding whose file cannot be hashed any more is left out, as A1111 leaves out
        embeddings without a hash.
        """
        names: dict[str, None] = {}
        for chunk in prompt_chunks:
            for fix in chunk.fixes:
                names.setdefault(fix.embedding.name, None)
        catalogue = self._catalogue()
        hashes: dict[str, str] = {}
        for name in names:
            embedding = catalogue.get(name)
            if embedding is None:
                log.warning("embedding %r was used but is no longer in the database", name)
                continue
            digest = self._short_hash(embedding)
            if digest is not None:
                hashes[name] = digest
        return hashes

    def _short_hash(self, embedding: Embedding) -> str | None:
        with self._lock:
            cached = self._hashes.get(embedding.path)
        if cached is not None:
            return cached
        try:
            digest = short_hash(embedding.path, "textual_inversion")
        except OSError as exc:
            log.warning("cannot hash embedding %r (%s): %s", embedding.name, embedding.path, exc)
            return None
        with self._lock:
            self._hashes[embedding.path] = digest
        return digest


def _widths_text(widths: tuple[int, ...]) -> str:
    return "+".join(str(width) for width in widths)


def ti_hashes_field(used: Mapping[str, str]) -> str:
    """The ``TI hashes`` infotext value, ``"name: hash, name2: hash"`` (§7.2, §13).

    ``:`` and ``,`` are removed from names so the list splits back unambiguously; the
    infotext writer still quotes the whole value. Empty when nothing was used, in which
    case A1111 writes no ``TI hashes`` field at all.
    """
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {digest}" for name, digest in used.items())
