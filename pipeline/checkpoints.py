"""The checkpoint library: which models exist and how to load them.

Names are what users type and what infotexts record as ``Model``: the built-in ``tiny``
first, then every diffusers folder under ``<models_dir>/Stable-diffusion/`` (a folder
holding ``model_index.json``), named by its folder. Loaded pipelines are cached in this
process so that a model is read from disk once, not per job.

Loading is meant to run on the device thread; the lock only guards against two threads
loading at once (and the cache being changed under a reader), so a second caller waits
for the first load and then gets the cached object.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.errors import CheckpointLoadError, UnknownCheckpoint
from pipeline.tiny import TINY_NAME, build_tiny_pipeline

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

logger = logging.getLogger(__name__)

CheckpointKind = Literal["builtin", "diffusers"]

CHECKPOINT_SUBDIR = "Stable-diffusion"
EMBEDDINGS_SUBDIR = "embeddings"
# A real CLIP tokenizer has 49408 entries and tiny's 514; an offline load that silently
# produced an empty tokenizer has 2 (TESTING-NOTES §2.4).
_MIN_TOKENIZER_SIZE = 258


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint the library knows; ``sha256`` is the short (10 hex) model hash, if known."""

    name: str
    path: Path | None
    kind: CheckpointKind
    sha256: str | None = None


class CheckpointLibrary:
    """Lists, resolves and loads checkpoints.

    ``max_loaded`` bounds how many pipelines stay cached; the least recently used one is
    dropped first, since a real checkpoint holds gigabytes.
    """

    def __init__(self, models_dir: Path | None, *, max_loaded: int = 2) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.max_loaded = max_loaded
        self._lock = threading.RLock()
        self._infos: dict[str, CheckpointInfo] | None = None
        self._loaded: OrderedDict[str, Any] = OrderedDict()

    def refresh(self) -> None:
        """Rescan the models folder; pipelines already loaded stay cached."""
        with self._lock:
            self._infos = self._scan()

    def names(self) -> list[str]:
        return list(self._catalog())

    def resolve(self, name: str) -> CheckpointInfo:
        """The checkpoint called ``name``: an exact match first, then a case-insensitive one."""
        catalog = self._catalog()
        if name in catalog:
            return catalog[name]
        folded = name.casefold()
        for info in catalog.values():
            if info.name.casefold() == folded:
                return info
        raise UnknownCheckpoint(name, list(catalog))

    def lookup(self, text: str) -> CheckpointInfo | None:
        """A checkpoint by an infotext's ``Model`` or ``Model hash`` text (A1111 §13): an exact
        name, hash (old 8-hex, short, full sha256) or ``name [hash]`` title first, then the
        shortest name containing the text; None when nothing matches."""
        text = text.strip()
        if not text:
            return None
        catalog = self._catalog()
        bare = text.rsplit(" [", 1)[0] if text.endswith("]") else text
        for candidate in (text, bare):
            for info in catalog.values():
                if candidate in _aliases(info):
                    return info
        containing = [info for info in catalog.values() if bare.casefold() in info.name.casefold()]
        return min(containing, key=lambda info: len(info.name)) if containing else None

    def load(self, name: str) -> StableDiffusionPipeline:
        """The loaded pipeline for ``name``, from the cache when possible."""
        info = self.resolve(name)
        with self._lock:
            pipe = self._loaded.get(info.name)
            if pipe is not None:
                self._loaded.move_to_end(info.name)
                return pipe
            pipe = self._load_uncached(info)
            self._loaded[info.name] = pipe
            while len(self._loaded) > self.max_loaded:
                evicted, _ = self._loaded.popitem(last=False)
                logger.info("unloaded checkpoint %s", evicted)
            return pipe

    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def _catalog(self) -> dict[str, CheckpointInfo]:
        with self._lock:
            if self._infos is None:
                self._infos = self._scan()
            return self._infos

    def _scan(self) -> dict[str, CheckpointInfo]:
        infos = {TINY_NAME: CheckpointInfo(name=TINY_NAME, path=None, kind="builtin")}
        for folder in self._diffusers_folders():
            if folder.name.casefold() == TINY_NAME:
                logger.warning(
                    "ignoring %s: the name %r is reserved for the built-in model", folder, TINY_NAME
                )
                continue
            infos[folder.name] = CheckpointInfo(name=folder.name, path=folder, kind="diffusers")
        return infos

    def _diffusers_folders(self) -> list[Path]:
        if self.models_dir is None:
            return []
        root = self.models_dir / CHECKPOINT_SUBDIR
        if not root.is_dir():
            return []
        return sorted((index.parent for index in root.glob("*/model_index.json")), key=lambda p: p.name)

    def _load_uncached(self, info: CheckpointInfo) -> StableDiffusionPipeline:
        if info.kind == "builtin":
            return build_tiny_pipeline()
        logger.info("loading checkpoint %s from %s", info.name, info.path)
        try:
            pipe = _load_diffusers_folder(info)
        except CheckpointLoadError:
            raise
        except Exception as exc:  # any failure inside diffusers/transformers is a bad checkpoint
            raise CheckpointLoadError(info.name, f"{type(exc).__name__}: {exc}") from exc
        return pipe


def _aliases(info: CheckpointInfo) -> set[str]:
    names = {info.name, f"{info.name} [{info.sha256}]" if info.sha256 else info.name}
    if info.path is not None:
        names |= {info.path.name, info.path.stem}
    if info.sha256:
        names.add(info.sha256)
    return names


def _load_diffusers_folder(info: CheckpointInfo) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    assert info.path is not None
    pipe = StableDiffusionPipeline.from_pretrained(
        info.path,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None or len(tokenizer) < _MIN_TOKENIZER_SIZE:
        size = 0 if tokenizer is None else len(tokenizer)
        raise CheckpointLoadError(info.name, f"its tokenizer is missing or empty ({size} tokens)")
    pipe.set_progress_bar_config(disable=True)
    return pipe
