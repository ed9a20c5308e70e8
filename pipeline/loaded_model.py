"""A checkpoint loaded for an engine's device (:class:`_LoadedModel`): its tokenizer,
textual-inversion lookup, cached prompt chunks and raw text encoding; and a separate VAE
file loaded for it (:class:`_SeparateVae`), swapped into the pipeline for a request by
:func:`_vae_swapped`.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import clip, sdxl
from pipeline.checkpoints import CheckpointInfo
from pipeline.embeddings import EmbeddingDatabase

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

_CHUNK_CACHE_SIZE = 64


@dataclass(frozen=True)
class _SeparateVae:
    """A VAE file loaded for this engine's device, with what the infotext says about it."""

    path: Path
    model: Any  # diffusers AutoencoderKL
    short_hash: str

    @property
    def infotext_fields(self) -> dict[str, str]:
        return {"vae_hash": self.short_hash, "vae_name": self.path.name}


@dataclass
class _LoadedModel:
    """A checkpoint prepared for this engine's device, with what is worth keeping per model:
    the chunked token ids of recent prompts (rerolls and batches repeat prompts; encoder
    outputs are not cached, since networks applied later may change the text encoder)."""

    info: CheckpointInfo
    pipe: StableDiffusionPipeline
    base_scheduler_config: Any
    embeddings: EmbeddingDatabase | None = None
    unet: Any = None  # what the sampler calls: ``pipe.unet``, or its compiled form
    chunks: OrderedDict[tuple[int, str], list[clip.PromptChunk]] = field(default_factory=OrderedDict)
    _lookup: tuple[int, Any] | None = None

    @property
    def prediction_type(self) -> str:
        return dict(self.base_scheduler_config).get("prediction_type", "epsilon")

    @property
    def is_sdxl(self) -> bool:
        return sdxl.is_sdxl(self.pipe)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.pipe.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]

    def embedding_lookup(self) -> Any:
        """Textual-inversion matching for this model's tokenizer and width (None: no embeddings)."""
        if self.embeddings is None:
            return None
        version = self.embeddings.version
        if self._lookup is None or self._lookup[0] != version:
            width = sdxl.text_widths(self.pipe) if self.is_sdxl else self.pipe.text_encoder.config.hidden_size
            self._lookup = (version, self.embeddings.lookup(self.tokenize, hidden_size=width))
        return self._lookup[1]

    def chunk(self, text: str) -> list[clip.PromptChunk]:
        key = (self.embeddings.version if self.embeddings is not None else 0, text)
        cached = self.chunks.get(key)
        if cached is not None:
            self.chunks.move_to_end(key)
            return cached
        chunks, _count = clip.chunk_prompt(text, self.tokenize, embeddings=self.embedding_lookup())
        self.chunks[key] = chunks
        if len(self.chunks) > _CHUNK_CACHE_SIZE:
            self.chunks.popitem(last=False)
        return chunks

    def encode_raw(self, chunks: list[clip.PromptChunk], clip_skip: int) -> Any:
        """``(1, 77*k, C)`` unweighted encoder output (both encoders' for SDXL, where clip skip
        does nothing); emphasis is normalised by the caller over every text encoded together
        (``pipeline.conditioning``)."""
        if self.is_sdxl:
            return sdxl.encode_raw(self.pipe, chunks)
        return clip.encode_chunks(
            self.pipe.text_encoder, chunks, clip_skip=clip_skip, emphasis="Ignore", pad_id=self.pad_id
        )

    @property
    def pad_id(self) -> int | None:
        """SD2-style tokenizers pad with their own id after the first EOS; SD1 pads with EOS."""
        pad = self.pipe.tokenizer.pad_token_id
        return None if pad in (None, clip.EOS_ID) else pad


@contextlib.contextmanager
def _vae_swapped(pipe: StableDiffusionPipeline, separate: _SeparateVae | None) -> Iterator[None]:
    """``pipe`` decodes and encodes with ``separate`` inside the block; its own VAE is put
    back however the block ends, so the next request without an override is unaffected."""
    if separate is None:
        yield
        return
    original = pipe.vae
    pipe.vae = separate.model
    try:
        yield
    finally:
        pipe.vae = original
