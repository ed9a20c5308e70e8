"""The checkpoint library: which models exist and how to load them.

Names are what users type and what infotexts record as ``Model``: the built-in ``tiny``
first, then every diffusers folder directly under ``<models_dir>/Stable-diffusion/`` (a
folder holding ``model_index.json``), named by its folder, then every single-file
checkpoint (``.safetensors``, ``.ckpt``, ``.pt``) anywhere below that folder, named as
A1111 names them: the path relative to ``Stable-diffusion/`` without its extension.
Loaded pipelines are cached in this process so that a model is read from disk once.

Single files are read through :mod:`pipeline.safe_load` (nothing in a pickle runs) and
assembled from diffusers configs of their family: SD 1.x / SD 2.x / SDXL configs ship in
``pipeline/configs/``; ``config_dirs`` overrides them per family. Real SD checkpoints
carry no tokenizer, and the CLIP vocabulary is not available offline, so a family's
config folder must hold a ``tokenizer/`` folder or ``tokenizer_dir`` must name one. SDXL
reads the same vocabulary for both text encoders (``tokenizer_2/`` where the config
folder has one); the OpenCLIP-bigG one pads with ``!`` (:mod:`pipeline.sdxl`). A
diffusers folder whose ``model_index.json`` names a ``text_encoder_2`` is SDXL.

How the family and prediction type are detected, and how each file a scan finds is
inspected: :mod:`pipeline.checkpoint_files`.

A file that cannot be used is never fatal to a scan: a single file is inspected (format,
layout and pickle checks of :mod:`pipeline.safe_load`, without reading weights), and
one that fails, or whose ``.yaml`` or ``.vae.*`` beside it fails, is left out of the list
and kept as an :class:`~pipeline.model_folder.UnreadableFile` with the reason
(:meth:`CheckpointLibrary.unreadable`); resolving its name raises that reason.
:meth:`CheckpointLibrary.model_files` does the same for the VAE, LoRA, hypernetwork and
embedding folders.

Hashes (A1111-SEMANTICS.md §13) are computed for single files only, on first
``resolve``/``load`` (or by ``lookup`` when asked for a hash), through a persistent
:class:`~pipeline.hashing.HashCache`, so a multi-gigabyte file is read once per change.

How an entry becomes a pipeline (assembling single files, the tokenizer and UNet
checks): :mod:`pipeline.checkpoint_assembly`.

Loading is meant to run on the device thread; the lock only guards against two threads
loading at once (and the cache being changed under a reader), so a second caller waits
for the first load and then gets the cached object.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline import edit_model, safe_load
from pipeline.checkpoint_assembly import (
    _assemble_single_file,
    _check_special_tokens,
    _check_tokenizer,
    _has_vocab,
    _load_diffusers_folder,
    _load_sdxl_folder,
    _text_encoder_folder,
)
from pipeline.checkpoint_files import (
    CheckpointInfo,
    _check_folder_weights,
    _folder_family,
    _folder_prediction,
    _is_checkpoint_file,
    _single_file_info,
    _Skipped,
    detect_family,
)
from pipeline.checkpoint_yaml import model_definition
from pipeline.checkpoint_yaml import read_yaml_config as read_yaml_config
from pipeline.errors import CheckpointLoadError, EngineError, UnknownCheckpoint
from pipeline.hashing import HashCache
from pipeline.model_folder import (
    KINDS,
    FileChecks,
    Kind,
    ModelFiles,
    UnreadableFile,
)
from pipeline.tiny import TINY_NAME, build_tiny_pipeline

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "Stable-diffusion"
VAE_SUBDIR = "VAE"
LORA_SUBDIR = "Lora"
HYPERNETWORK_SUBDIR = "hypernetworks"
EMBEDDINGS_SUBDIR = "embeddings"
# how long model_files' answer stands in for a new look at the folders (recent_model_files)
LISTING_FRESH_FOR = 2.0
PACKAGED_CONFIGS = Path(__file__).parent / "configs"
# A real CLIP tokenizer has 49408 entries and tiny's 514; an offline load that silently
# produced an empty tokenizer has 2 (TESTING-NOTES §2.4).
_T = TypeVar("_T")
_HEX = re.compile(r"^[0-9a-fA-F]{8}$|^[0-9a-fA-F]{10}$|^[0-9a-fA-F]{64}$")


@dataclass
class _Scan:
    """What one scan of the checkpoints folder found."""

    infos: dict[str, CheckpointInfo]
    refused: dict[str, CheckpointLoadError] = field(default_factory=dict)
    unreadable: list[UnreadableFile] = field(default_factory=list)


@dataclass
class _CatalogState:
    """What a library's scans found; shared by its devices' views (``for_device``). A scan
    is put in place whole (one assignment) once it is done: readers, which take no lock,
    see one scan or the other, never a part of one."""

    scan: _Scan | None = None  # None until the folder was scanned
    checks: FileChecks = field(default_factory=FileChecks)
    # one scan at a time; never held while a pipeline is built (each device's view has a
    # lock of its own for its loads)
    scan_lock: threading.Lock = field(default_factory=threading.Lock)
    # model_files' last answers, by (folder, kinds): (when, what it found)
    listings: dict[tuple[Path | None, tuple[Kind, ...]], tuple[float, ModelFiles]] = field(
        default_factory=dict
    )


class CheckpointLibrary:
    """Lists, resolves and loads checkpoints.

    ``max_loaded`` bounds how many pipelines stay cached; the least recently used one is
    dropped first, since a real checkpoint holds gigabytes. ``residency`` (a
    :class:`pipeline.memory.Residency`, set by the engine of the device) also bounds their
    bytes: loading one drops least recently used others until it fits. A checkpoint a
    running job holds (:meth:`in_use`) is never dropped. ``hash_cache`` is a
    :class:`HashCache` or the JSON path for one (default ``<models_dir>/../cache/hashes.json``).
    ``config_dirs`` maps a family (``"sd1"``, ``"sd2"``) to a diffusers folder whose configs
    (and ``tokenizer/``) single files of that family are assembled with; ``tokenizer_dir``
    is a CLIP tokenizer folder for families whose config folder has none.
    """

    def __init__(
        self,
        models_dir: Path | None,
        *,
        max_loaded: int = 2,
        hash_cache: HashCache | Path | str | None = None,
        config_dirs: Mapping[str, Path | str] | None = None,
        tokenizer_dir: Path | str | None = None,
    ) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.max_loaded = max_loaded
        if isinstance(hash_cache, HashCache):
            self.hashes = hash_cache
        elif hash_cache is not None:
            self.hashes = HashCache(hash_cache)
        elif self.models_dir is not None:
            self.hashes = HashCache(self.models_dir.parent / "cache" / "hashes.json")
        else:
            self.hashes = HashCache()
        self.config_dirs = {k: Path(v) for k, v in (config_dirs or {}).items()}
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        self._lock = threading.RLock()
        self._shared = _CatalogState()  # shared with this library's other devices' views
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self.residency: Any = None  # pipeline.memory.Residency | None
        self._in_use: Counter[str] = Counter()

    def for_device(self) -> CheckpointLibrary:
        """This library for one more device (multi-GPU): the same catalog (scans, hashes,
        refusals, a refresh seen by all), its own loaded pipelines, memory budget and holds."""
        other = copy.copy(self)
        other._lock = threading.RLock()  # a load here never waits for another device's
        other._loaded = OrderedDict()
        other._in_use = Counter()
        other.residency = None
        return other

    def is_loaded(self, name: str) -> bool:
        """Whether the checkpoint called ``name`` is loaded here (False for an unknown name).
        From memory, without the disk or the lock a load holds: the queue asks on the
        event loop (nothing is loaded before the folder was scanned)."""
        scan = self._shared.scan
        info = _named(scan.infos, name) if scan is not None else None
        return info is not None and info.name in self._loaded

    def refresh(self) -> None:
        """Rescan the models folder; pipelines already loaded stay cached. Until the new
        catalog is ready the old one answers (without waiting for the scan)."""
        self._shared.checks.clear()
        self._shared.listings.clear()
        with self._shared.scan_lock:
            self._shared.scan = self._scan()

    def names(self) -> list[str]:
        return list(self._catalog())

    def infos(self) -> list[CheckpointInfo]:
        return list(self._catalog().values())

    def unreadable(self) -> list[UnreadableFile]:
        """The checkpoints (and ``.yaml``/``.vae.*`` files beside them) the last scan left
        out, with the reasons (once scanned, without the lock a load may hold)."""
        return list(self._scanned().unreadable)

    def model_files(self, kinds: tuple[Kind, ...] = KINDS, *, models_dir: Path | None = None) -> ModelFiles:
        """The usable VAEs, LoRAs, hypernetworks and embeddings, and every unreadable file of
        the ``kinds`` asked for (checkpoints from the last scan; the other folders checked
        now, each file once while it is unchanged). ``models_dir`` is checked instead of
        the library's own folder when the library has none."""
        folder = self.models_dir or models_dir
        found = self._shared.checks.model_files(folder, kinds)
        skipped = [entry for entry in self.unreadable() if entry.kind in kinds]
        files = dataclasses.replace(found, unreadable=skipped + found.unreadable)
        self._shared.listings[(folder, tuple(kinds))] = (time.monotonic(), files)
        return files

    def recent_model_files(
        self, kinds: tuple[Kind, ...] = KINDS, *, models_dir: Path | None = None
    ) -> ModelFiles | None:
        """What ``model_files`` found for the same ``kinds`` within the last
        ``LISTING_FRESH_FOR`` seconds (read from memory: the event loop may ask), else None.
        A ``refresh`` forgets it."""
        seen = self._shared.listings.get((self.models_dir or models_dir, tuple(kinds)))
        if seen is None or time.monotonic() - seen[0] > LISTING_FRESH_FOR:
            return None
        return seen[1]

    def resolve(self, name: str) -> CheckpointInfo:
        """The checkpoint called ``name`` (an exact match first, then a case-insensitive
        one), with its hashes filled in."""
        scan = self._scanned()
        catalog = scan.infos
        info = _named(catalog, name)
        if info is None:
            refused = _named(scan.refused, name)
            if refused is not None:
                raise _again(refused)
            raise UnknownCheckpoint(name, list(catalog))
        return self._with_hashes(info)

    def answers_from_memory(self, name: str) -> bool:
        """Whether ``resolve(name)`` needs neither the disk nor the lock that a load holds:
        the folder was scanned and the checkpoint's hashes are known (an unknown name is
        refused from memory too)."""
        scan = self._shared.scan
        if scan is None:
            return False
        info = _named(scan.infos, name)
        return info is None or info.kind != "single_file" or info.path is None or info.sha256 is not None

    def lookup(self, text: str) -> CheckpointInfo | None:
        """A checkpoint by an infotext's ``Model`` or ``Model hash`` text (A1111 §13): an exact
        name, hash (old 8-hex, short, full sha256), file name, stem or ``name [hash]`` title
        first, then the shortest name containing the text; None when nothing matches.

        Hashes are computed only when the text looks like one and no name matched."""
        text = text.strip()
        if not text:
            return None
        bare = text.rsplit(" [", 1)[0] if text.endswith("]") else text
        found = self._exact(text, bare)
        if found is None and (_HEX.match(text) or text != bare):
            for info in list(self._catalog().values()):
                self._with_hashes(info)
            found = self._exact(text, bare)
        if found is not None:
            return self._with_hashes(found)
        catalog = self._catalog()
        containing = [info for info in catalog.values() if bare.casefold() in info.name.casefold()]
        return self._with_hashes(min(containing, key=lambda info: len(info.name))) if containing else None

    def load(self, name: str) -> StableDiffusionPipeline:
        """The loaded pipeline for ``name``, from the cache when possible."""
        info = self.resolve(name)
        with self._lock:
            pipe = self._loaded.get(info.name)
            if pipe is not None:
                self._loaded.move_to_end(info.name)
                return pipe
            pipe = self._load_uncached(info)
            self._note_unet_inputs(info.name, int(pipe.unet.config.in_channels))
            self._loaded[info.name] = pipe
            self._make_room(info.name)
            return pipe

    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    @contextmanager
    def in_use(self, name: str) -> Iterator[None]:
        """Hold the checkpoint called ``name`` (resolved) for a running job: it is not
        dropped to make room for another one until the block ends."""
        key = self.resolve(name).name
        with self._lock:
            self._in_use[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use[key] -= 1
                if not self._in_use[key]:
                    del self._in_use[key]

    def _make_room(self, loading: str) -> None:
        """Drop least recently used pipelines while more than ``max_loaded`` are loaded or
        they exceed the residency budget; never ``loading`` nor one in use. What cannot be
        dropped stays (a job in use finishes undisturbed), with a warning when over budget."""
        while True:
            over_count = len(self._loaded) > self.max_loaded
            over_budget = self.residency is not None and not self.residency.fits(self._loaded.values())
            if not (over_count or over_budget):
                return
            victim = next((n for n in self._loaded if n != loading and not self._in_use[n]), None)
            if victim is None:
                if over_budget:
                    logger.warning("checkpoints in use exceed the memory budget; loading %s anyway", loading)
                return
            del self._loaded[victim]
            logger.info("unloaded checkpoint %s%s", victim, " (memory budget)" if over_budget else "")

    # -- catalog -------------------------------------------------------------------------

    def _exact(self, text: str, bare: str) -> CheckpointInfo | None:
        catalog = self._catalog()
        for candidate in (text, bare):
            for info in catalog.values():
                if candidate in _aliases(info):
                    return info
        return None

    def _catalog(self) -> dict[str, CheckpointInfo]:
        return self._scanned().infos

    def _scanned(self) -> _Scan:
        """The last whole scan; the first one is made here (once scanned, read without a lock)."""
        scan = self._shared.scan
        if scan is not None:
            return scan
        with self._shared.scan_lock:
            if self._shared.scan is None:
                self._shared.scan = self._scan()
            return self._shared.scan

    def _update(self, info: CheckpointInfo) -> CheckpointInfo:
        """Put what was learnt of a file (its hashes, its UNet's inputs) in the catalog, if
        it still lists that file. Without a lock: one assignment, and an update that a
        rescan replaces meanwhile is learnt again (the hashes come from the hash cache)."""
        catalog = self._catalog()
        if catalog.get(info.name) is not None and catalog[info.name].path == info.path:
            catalog[info.name] = info
        return info

    def _note_unet_inputs(self, name: str, inputs: int) -> None:
        """What the loaded UNet takes, for a checkpoint the scan could not tell."""
        current = self._catalog().get(name)
        if current is not None and current.unet_inputs != inputs:
            self._update(dataclasses.replace(current, unet_inputs=inputs))

    def _with_hashes(self, info: CheckpointInfo) -> CheckpointInfo:
        """``info`` with its hashes, computed once per file version through the cache."""
        if info.kind != "single_file" or info.sha256 is not None or info.path is None:
            return info
        try:
            full = self.hashes.get(info.path, "sha256")
            old = self.hashes.get(info.path, "old")
        except OSError as exc:
            raise CheckpointLoadError(info.name, f"cannot read {info.path}: {exc}") from exc
        return self._update(dataclasses.replace(info, sha256=full[:10], full_sha256=full, old_hash=old))

    def _scan(self) -> _Scan:
        scan = _Scan({TINY_NAME: CheckpointInfo(name=TINY_NAME, path=None, kind="builtin", family="sd1",
                                                prediction_type="epsilon", unet_inputs=4)})  # fmt: skip
        infos = scan.infos
        root = self.models_dir / CHECKPOINT_SUBDIR if self.models_dir is not None else None
        if root is None or not root.is_dir():
            return scan
        for info in [*self._diffusers_infos(root, scan), *self._single_file_infos(root, scan)]:
            if info.name.casefold() == TINY_NAME:
                logger.warning(
                    "ignoring %s: the name %r is reserved for the built-in model", info.path, TINY_NAME
                )
            elif info.name in infos:
                logger.warning("ignoring %s: %r is already %s", info.path, info.name, infos[info.name].path)
            else:
                infos[info.name] = info
        return scan

    def _diffusers_infos(self, root: Path, scan: _Scan) -> list[CheckpointInfo]:
        folders = sorted((index.parent for index in root.glob("*/model_index.json")), key=lambda p: p.name)
        infos = []
        for folder in folders:
            try:
                _check_folder_weights(folder, folder.name, self.models_dir)
            except _Skipped as skipped:
                logger.warning("skipping checkpoint folder %s: %s", folder, skipped.error)
                scan.refused[folder.name] = skipped.error
                scan.unreadable.extend(skipped.files)
                continue
            infos.append(
                CheckpointInfo(
                    name=folder.name,
                    path=folder,
                    kind="diffusers",
                    family=_folder_family(folder),
                    prediction_type=_folder_prediction(folder),
                    unet_inputs=edit_model.folder_unet_inputs(folder),
                )
            )
        return infos

    def _single_file_infos(self, root: Path, scan: _Scan) -> list[CheckpointInfo]:
        infos = []
        for path in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix().casefold()):
            if not _is_checkpoint_file(path, root):
                continue
            try:
                infos.append(_single_file_info(path, root, self.models_dir))
            except _Skipped as skipped:
                name = path.relative_to(root).with_suffix("").as_posix()
                logger.warning("skipping checkpoint %s: %s", path, skipped.error)
                scan.refused[name] = skipped.error
                scan.unreadable.extend(skipped.files)
        return infos

    # -- loading -------------------------------------------------------------------------

    def _load_uncached(self, info: CheckpointInfo) -> StableDiffusionPipeline:
        if info.kind == "builtin":
            return build_tiny_pipeline()
        logger.info("loading checkpoint %s from %s", info.name, info.path)
        try:
            if info.kind == "single_file":
                return self._load_single_file(info)
            assert info.path is not None
            try:
                # diffusers and transformers read a folder's weights themselves; each file
                # passes the same checks as a single file first, also if it changed since the scan.
                _check_folder_weights(info.path, info.name, self.models_dir)
            except _Skipped as skipped:
                raise skipped.error from None
            if info.family == "sdxl":
                return _load_sdxl_folder(info)
            return _load_diffusers_folder(info)
        except EngineError:
            raise
        except Exception as exc:  # any failure inside diffusers/transformers is a bad checkpoint
            raise CheckpointLoadError(info.name, f"{type(exc).__name__}: {exc}") from exc

    def _load_single_file(self, info: CheckpointInfo) -> StableDiffusionPipeline:
        assert info.path is not None
        state = safe_load.load_state_dict(info.path)
        family = info.family or detect_family(state.keys(), {k: tuple(v.shape) for k, v in state.items()})
        if family is None:
            raise CheckpointLoadError(
                info.name, "it is not a Stable Diffusion checkpoint (no known key layout)"
            )
        info = self._update(
            dataclasses.replace(info, family=family, prediction_type=info.prediction_type or "epsilon")
        )
        config = self.config_dirs.get(family, PACKAGED_CONFIGS / family)
        if family == "sdxl":
            from pipeline import sdxl

            problem = sdxl.check_single_file(list(state))
            if problem is not None:
                raise CheckpointLoadError(info.name, problem)
            tokenizers = (self._tokenizer(info, config), self._tokenizer(info, config, "tokenizer_2"))
            return sdxl.assemble_single_file(state, config, tokenizers, info.prediction_type or "epsilon")
        definition = model_definition(info.config_path) if info.config_path is not None else None
        encoder = _text_encoder_folder(info, definition)
        tokenizer = self._tokenizer(info, config, first=encoder)
        return _assemble_single_file(info, state, config, tokenizer, definition, encoder)

    def _tokenizer(
        self, info: CheckpointInfo, config: Path, subfolder: str = "tokenizer", *, first: Path | None = None
    ) -> Any:
        """The CLIP tokenizer in ``first`` (the yaml's text-encoder folder, as A1111 loads
        both from it), ``config/<subfolder>``; SDXL's second one may also come from
        ``config/tokenizer``; else ``tokenizer_dir``."""
        from transformers import CLIPTokenizer

        candidates = [config / subfolder, config / "tokenizer", self.tokenizer_dir]
        if first is not None:
            candidates = [first / "tokenizer", first, *candidates]
        candidates = [f for f in candidates if f is None or f == self.tokenizer_dir or _has_vocab(f)]
        folder = next((f for f in candidates if f is not None and f.is_dir()), None)
        if folder is None:
            raise CheckpointLoadError(
                info.name,
                f"no CLIP tokenizer for {info.family}: set a tokenizer folder (engine.tokenizer_dir)",
            )
        # OpenCLIP (SD 2.x, SDXL's second encoder) pads with "!" (id 0), not with the end token.
        open_clip = info.family == "sd2" or subfolder == "tokenizer_2"
        extra = {"pad_token": "!"} if open_clip and folder != config / subfolder else {}
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True, **extra)
        _check_tokenizer(info, tokenizer)
        _check_special_tokens(info, tokenizer, folder)
        return tokenizer


def _named(entries: dict[str, _T], name: str) -> _T | None:
    """The entry called ``name``: an exact match first, then a case-insensitive one."""
    found = entries.get(name)
    if found is None:
        folded = name.casefold()
        found = next((entry for key, entry in list(entries.items()) if key.casefold() == folded), None)
    return found


def _again(error: CheckpointLoadError) -> CheckpointLoadError:
    """A fresh copy of a stored refusal: one instance raised for every request naming the
    file would collect all their tracebacks."""
    again = type(error).__new__(type(error))
    again.args = error.args
    again.__dict__.update(error.__dict__)
    return again


def _aliases(info: CheckpointInfo) -> set[str]:
    names = {info.name, info.title}
    if info.sha256:
        names |= {f"{info.name} [{info.sha256}]", info.sha256}
    if info.full_sha256:
        names.add(info.full_sha256)
    if info.old_hash:
        names.add(info.old_hash)
    if info.path is not None:
        names |= {info.path.name, info.path.stem}
    return names
