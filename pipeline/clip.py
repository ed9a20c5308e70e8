"""A1111's CLIP prompt handling: 75-token chunks, emphasis weights, clip skip.

diffusers truncates prompts at 77 tokens and knows nothing of ``(word:1.2)`` or ``BREAK``;
A1111 instead cuts the token stream into 75-token chunks (backtracking to a recent comma),
encodes each chunk on its own and concatenates the results. Reproducing that is what
makes long or weighted prompts give the same images as A1111 (A1111-SEMANTICS.md §7).

``chunk_prompt``, ``target_token_count`` and ``apply_emphasis`` are part of the parity
contract (PARITY-API.md); the rest serves the engine.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.prompts import parse_attention

log = logging.getLogger(__name__)

BOS_ID = 49406
EOS_ID = 49407
COMMA_ID = 267
CHUNK_LENGTH = 75
# Id put in the slots an embedding's vectors overwrite; any id works since its
# embedding row is replaced before the transformer sees it.
EMBEDDING_PLACEHOLDER_ID = 0

EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")

Tokenize = Callable[[list[str]], list[list[int]]]


@dataclass(frozen=True)
class EmbeddingMatch:
    """A textual-inversion embedding found at some position of a fragment's token ids.

    ``token_length`` is how many prompt tokens the match consumed (the embedding's name
    as tokenised); ``vectors`` is ``(rows, C)`` and takes ``rows`` chunk slots.
    """

    name: str
    vectors: torch.Tensor
    token_length: int

    @property
    def rows(self) -> int:
        return int(self.vectors.shape[0])


# Given a fragment's token ids and a position, return the embedding that starts there.
EmbeddingLookup = Callable[[Sequence[int], int], EmbeddingMatch | None]


@dataclass
class EmbeddingFix:
    """An embedding placed in a chunk; ``slot`` is 0-based among the 75 content slots,
    so its first vector lands at position ``slot + 1`` of the 77 ids (after BOS)."""

    slot: int
    embedding: EmbeddingMatch


@dataclass
class PromptChunk:
    tokens: list[int]  # 77 ids: BOS + 75 + EOS
    multipliers: list[float]  # 77 emphasis multipliers (1.0 at BOS/EOS/padding)
    fixes: list[EmbeddingFix] = field(default_factory=list)


def _check_emphasis(mode: str) -> None:
    if mode not in EMPHASIS_MODES:
        raise ValueError(f"emphasis mode must be one of {', '.join(EMPHASIS_MODES)}; got {mode!r}")


class _ChunkBuilder:
    """The mutable state of A1111's chunk filling loop (§7.1 step 3)."""

    def __init__(self, comma_padding_backtrack: int) -> None:
        self.backtrack = comma_padding_backtrack
        self.chunks: list[PromptChunk] = []
        self.token_count = 0
        self.tokens: list[int] = []
        self.multipliers: list[float] = []
        self.fixes: list[EmbeddingFix] = []
        self.last_comma: int | None = None

    def close(self, *, is_last: bool = False) -> None:
        """Pad, wrap in BOS/EOS and store the current chunk; closed-early chunks count 75."""
        self.token_count += len(self.tokens) if is_last else CHUNK_LENGTH
        pad = CHUNK_LENGTH - len(self.tokens)
        tokens = [BOS_ID, *self.tokens, *([EOS_ID] * pad), EOS_ID]
        multipliers = [1.0, *self.multipliers, *([1.0] * pad), 1.0]
        self.chunks.append(PromptChunk(tokens=tokens, multipliers=multipliers, fixes=self.fixes))
        self.tokens, self.multipliers, self.fixes = [], [], []
        self.last_comma = None

    def _wraps_at_comma(self) -> bool:
        return (
            self.backtrack != 0
            and len(self.tokens) == CHUNK_LENGTH
            and self.last_comma is not None
            and CHUNK_LENGTH - self.last_comma <= self.backtrack
        )

    def _wrap_at_comma(self) -> None:
        """Move the tokens after the last comma into a new chunk, so a phrase isn't split."""
        cut = self.last_comma + 1
        moved_tokens, moved_multipliers = self.tokens[cut:], self.multipliers[cut:]
        moved_fixes = [f for f in self.fixes if f.slot >= cut]
        self.tokens, self.multipliers = self.tokens[:cut], self.multipliers[:cut]
        self.fixes = [f for f in self.fixes if f.slot < cut]
        self.close()
        self.tokens, self.multipliers = moved_tokens, moved_multipliers
        self.fixes = [EmbeddingFix(f.slot - cut, f.embedding) for f in moved_fixes]

    def before_token(self, token: int) -> None:
        """Rules (a)-(c): remember commas, wrap at a comma or close a full chunk."""
        if token == COMMA_ID:
            self.last_comma = len(self.tokens)
        elif self._wraps_at_comma():
            self._wrap_at_comma()
        if len(self.tokens) == CHUNK_LENGTH:
            self.close()

    def add_token(self, token: int, weight: float) -> None:
        self.tokens.append(token)
        self.multipliers.append(weight)

    def add_embedding(self, embedding: EmbeddingMatch, weight: float) -> None:
        """Keep an embedding whole: close the chunk first if its rows don't fit."""
        if len(self.tokens) + embedding.rows > CHUNK_LENGTH:
            self.close()
        self.fixes.append(EmbeddingFix(len(self.tokens), embedding))
        self.tokens.extend([EMBEDDING_PLACEHOLDER_ID] * embedding.rows)
        self.multipliers.extend([weight] * embedding.rows)

    def add_fragment(self, ids: Sequence[int], weight: float, embeddings: EmbeddingLookup | None) -> None:
        position = 0
        while position < len(ids):
            token = int(ids[position])
            self.before_token(token)
            match = embeddings(ids, position) if embeddings is not None else None
            if match is None:
                self.add_token(token, weight)
                position += 1
            else:
                self.add_embedding(match, weight)
                position += max(match.token_length, 1)

    def finish(self) -> tuple[list[PromptChunk], int]:
        if self.tokens or not self.chunks:
            self.close(is_last=True)
        return self.chunks, self.token_count


def _fragments(text: str, emphasis: str) -> list[tuple[str, float]]:
    if emphasis == "None":
        return [(text, 1.0)]
    return parse_attention(text)


def _is_break(text: str, weight: float) -> bool:
    # A BREAK that sat inside brackets has a scaled weight and is plain text (§2, §16.5).
    return text == "BREAK" and weight == -1


def chunk_prompt(
    text: str,
    tokenize: Tokenize,
    *,
    comma_padding_backtrack: int = 20,
    emphasis: str = "Original",
    embeddings: EmbeddingLookup | None = None,
) -> tuple[list[PromptChunk], int]:
    """A1111's ``tokenize_line`` (§7.1) for SD1 CLIP ids.

    ``embeddings`` finds textual-inversion embeddings in a fragment's ids; each match
    takes one slot per vector and is recorded in the chunk's ``fixes``. Returns the
    chunks and A1111's token count (75 per chunk closed early, plus the final length).
    """
    _check_emphasis(emphasis)
    fragments = _fragments(text, emphasis)
    token_lists = tokenize([fragment for fragment, _ in fragments])
    if len(token_lists) != len(fragments):
        raise ValueError(f"tokenize returned {len(token_lists)} id lists for {len(fragments)} texts")
    builder = _ChunkBuilder(comma_padding_backtrack)
    for (fragment, weight), ids in zip(fragments, token_lists, strict=True):
        if _is_break(fragment, weight):
            builder.close()
            continue
        builder.add_fragment(ids, float(weight), embeddings)
    return builder.finish()


def target_token_count(token_count: int) -> int:
    """The UI counter's denominator: the chunk capacity the prompt occupies (§7.1 step 7)."""
    return CHUNK_LENGTH * math.ceil(max(token_count, 1) / CHUNK_LENGTH)


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, mode: str = "Original") -> torch.Tensor:
    """Weight each token vector of ``z`` (B, T, C) by ``multipliers`` (B, T) as A1111 does (§7.2).

    "Original" restores the mean over the whole tensor afterwards, so emphasis shifts the
    balance between tokens without changing the overall magnitude; the operation order
    follows A1111 so results agree to float32 rounding.
    """
    _check_emphasis(mode)
    if mode in ("Ignore", "None"):
        return z
    z = z.to(torch.float32)
    weights = multipliers.to(device=z.device, dtype=torch.float32).unsqueeze(-1).expand(z.shape)
    if mode == "No norm":
        return z * weights
    original_mean = z.mean()
    z = z * weights
    new_mean = z.mean()
    return z * (original_mean / new_mean)


def _final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """transformers >= 5.6 flattened ``CLIPTextModel``; older ones nest it in ``text_model``."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    norm = getattr(inner, "final_layer_norm", None)
    if norm is None:
        raise ValueError(f"{type(text_encoder).__name__} has no final_layer_norm")
    return norm


def _encoder_device(text_encoder: torch.nn.Module) -> torch.device:
    return next(text_encoder.parameters()).device


def _chunk_ids(chunk: PromptChunk, pad_id: int | None, device: torch.device) -> torch.Tensor:
    """Token ids for the encoder; SD2-style encoders want everything after the first EOS as ``pad_id``."""
    ids = list(chunk.tokens)
    if pad_id is not None and pad_id != EOS_ID and EOS_ID in ids:
        first_eos = ids.index(EOS_ID)
        ids[first_eos + 1 :] = [pad_id] * (len(ids) - first_eos - 1)
    return torch.tensor([ids], dtype=torch.long, device=device)


class _EmbeddingInjector:
    """Overwrites the placeholder rows of the token embedding output with TI vectors
    (``columns`` of them: an SDXL embedding holds both encoders' vectors side by side)."""

    def __init__(self, fixes: list[EmbeddingFix], columns: slice | None = None) -> None:
        self.fixes = fixes
        self.columns = columns

    def __call__(self, module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for fix in self.fixes:
            start = fix.slot + 1
            vectors = fix.embedding.vectors
            if self.columns is not None:
                vectors = vectors[:, self.columns]
            vectors = vectors.to(device=output.device, dtype=output.dtype)
            output[:, start : start + vectors.shape[0]] = vectors
        return output


@torch.no_grad()
def run_chunk(
    text_encoder: torch.nn.Module,
    chunk: PromptChunk,
    *,
    pad_id: int | None = None,
    columns: slice | None = None,
) -> Any:
    """The text encoder's whole output for one 77-id chunk, hidden states included, with the
    chunk's embedding vectors (their ``columns``, when given) in place of the placeholders."""
    ids = _chunk_ids(chunk, pad_id, _encoder_device(text_encoder))
    if not chunk.fixes:
        return text_encoder(input_ids=ids, output_hidden_states=True)
    injector = _EmbeddingInjector(chunk.fixes, columns)
    hook = text_encoder.get_input_embeddings().register_forward_hook(injector)
    try:
        return text_encoder(input_ids=ids, output_hidden_states=True)
    finally:
        hook.remove()


def _layer_output(text_encoder: torch.nn.Module, outputs: Any, clip_skip: int) -> torch.Tensor:
    if clip_skip == 1:
        return outputs.last_hidden_state
    hidden_states = outputs.hidden_states
    if clip_skip > len(hidden_states):
        raise ValueError(f"clip skip must be 1-{len(hidden_states)} for this text encoder, got {clip_skip}")
    return _final_layer_norm(text_encoder)(hidden_states[-clip_skip])


def _encode_chunk(
    text_encoder: torch.nn.Module, chunk: PromptChunk, clip_skip: int, pad_id: int | None
) -> torch.Tensor:
    return _layer_output(text_encoder, run_chunk(text_encoder, chunk, pad_id=pad_id), clip_skip)


@torch.no_grad()
def encode_chunks(
    text_encoder: torch.nn.Module,
    chunks: list[PromptChunk],
    *,
    clip_skip: int = 1,
    emphasis: str = "Original",
    pad_id: int | None = None,
) -> torch.Tensor:
    """Encode each 77-id chunk on its own, weight it, and join them to ``(1, 77*n, C)`` (§7.2).

    A1111 "Clip skip N" (N >= 2) is ``hidden_states[-N]`` followed by the final LayerNorm;
    N = 1 is the normal output. Emphasis is normalised per chunk, as A1111 does.
    """
    _check_emphasis(emphasis)
    if clip_skip < 1:
        raise ValueError(f"clip skip must be at least 1, got {clip_skip}")
    if not chunks:
        raise ValueError("encode_chunks needs at least one chunk")
    encoded = []
    for chunk in chunks:
        z = _encode_chunk(text_encoder, chunk, clip_skip, pad_id)
        multipliers = torch.tensor([chunk.multipliers], dtype=torch.float32, device=z.device)
        encoded.append(apply_emphasis(z, multipliers, emphasis))
    return torch.cat(encoded, dim=1)


def match_lengths(
    cond: torch.Tensor, uncond: torch.Tensor, empty_chunk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the shorter of cond/uncond with encodings of the empty prompt (§7.2 "Pad conds").

    A1111 does this only with "Pad prompt/negative prompt" on; by default it runs separate
    UNet passes instead, so call this only when the request asks for padding. Tensors are
    ``(B, 77*k, C)``; ``empty_chunk`` is the ``(1, 77, C)`` encoding of ``""``.
    """
    cond_len, uncond_len = cond.shape[1], uncond.shape[1]
    chunk_len = empty_chunk.shape[1]
    if (cond_len - uncond_len) % chunk_len != 0:
        raise ValueError(f"lengths {cond_len} and {uncond_len} differ by a non-multiple of {chunk_len}")
    if cond_len < uncond_len:
        return _append_empty(cond, empty_chunk, (uncond_len - cond_len) // chunk_len), uncond
    if uncond_len < cond_len:
        return cond, _append_empty(uncond, empty_chunk, (cond_len - uncond_len) // chunk_len)
    return cond, uncond


def _append_empty(tensor: torch.Tensor, empty_chunk: torch.Tensor, repeats: int) -> torch.Tensor:
    empty = empty_chunk.to(device=tensor.device, dtype=tensor.dtype)
    return torch.cat([tensor, empty.repeat(tensor.shape[0], repeats, 1)], dim=1)


def pad_repeating_last(conds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Bring ``(T, C)`` conds encoded for one batch to the longest length by repeating each
    one's last token vector, as A1111 does for prompts (or AND parts) of unequal length."""
    if not conds:
        return []
    longest = max(c.shape[0] for c in conds)
    padded = []
    for cond in conds:
        missing = longest - cond.shape[0]
        padded.append(torch.cat([cond, cond[-1:].repeat(missing, 1)]) if missing else cond)
    return padded
