"""A request's text conditioning for one sampling pass (A1111-SEMANTICS.md §1 step 4).

The positive prompt loses its extra-network tags, is split on ``AND`` (§4) and each part
gets its prompt-editing schedule (§3); the negative prompt is scheduled but never split.
Each prompt's scheduled texts are encoded *together*, as A1111 does: "Original" emphasis
restores the mean over all of them at once (§7.2, §16.19), so a ``[cat:dog:5]`` prompt's
two variants share one normalisation.

SDXL encodes every chunk with two text encoders: each one's output is weighted and
normalised on its own, as A1111 does per embedder, then the two are joined on the feature
axis; each text also keeps its pooled vector (``PooledCond``). An SDXL negative prompt
whose texts are all empty is zeros, tokens and pooled alike, as A1111 forces for SDXL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline import clip, extra_networks, prompts
from pipeline.denoiser import Cond, PooledCond, PromptConds, Schedule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawText:
    """A text's unweighted encodings: one ``(1, 77·k, C_i)`` tensor per text encoder, and
    (SDXL) the pooled vector ``(1, P)`` of its first chunk."""

    streams: tuple[torch.Tensor, ...]
    pooled: torch.Tensor | None = None


Chunker = Callable[[str], list[clip.PromptChunk]]
# The unweighted encoder output (1, 77·k, C) of a text's chunks, or a RawText for several
# encoders; emphasis is applied here.
RawEncoder = Callable[[list[clip.PromptChunk]], "torch.Tensor | RawText"]

_CHUNK_TOKENS = clip.CHUNK_LENGTH + 2


def positive_parts(prompt: str) -> list[tuple[str, float]]:
    """The ``AND`` parts of a positive prompt once its extra-network tags are cut out (§1 step 3)."""
    text, _networks = extra_networks.parse(prompt)
    return prompts.split_and(text)


def build_conds(
    prompt: str,
    negative_prompt: str,
    steps: int,
    *,
    chunk: Chunker,
    encode: RawEncoder,
    device: torch.device,
    dtype: torch.dtype,
    hires_steps: int | None = None,
    time_ids: torch.Tensor | None = None,
    zero_empty_negative: bool = False,
    with_empty: bool = False,
) -> PromptConds:
    """Encoded schedules for the positive parts and the negative prompt.

    ``steps`` (and ``hires_steps``) are the denoiser-call totals: the sampler's steps
    times ``SamplerInfo.total_steps_multiplier``. Identical prompts are encoded once.
    SDXL passes its size ``time_ids`` and ``zero_empty_negative``. ``with_empty`` adds the
    empty prompt's encoding ("Pad conds" pads with it; never zeroed).
    """
    parts = positive_parts(prompt)
    texts = [text for text, _ in parts] + [negative_prompt]
    schedules = prompts.prompt_schedules(texts, steps, hires_steps=hires_steps)
    cache: dict[tuple[tuple[str, ...], bool], Schedule] = {}

    def encoded(schedule: list[tuple[int, str]], negative: bool = False) -> Schedule:
        key = tuple(text for _, text in schedule)
        zero = negative and zero_empty_negative and all(text == "" for text in key)
        if (key, zero) not in cache:
            conds = _encode_together(list(key), chunk, encode)
            if zero:
                conds = {text: _zeros_like(cond) for text, cond in conds.items()}
            cache[key, zero] = [(end, conds[text].to(device, dtype)) for end, text in schedule]
        return cache[key, zero]

    positive = tuple(
        (encoded(schedule), weight) for schedule, (_, weight) in zip(schedules, parts, strict=False)
    )
    ids = None if time_ids is None else time_ids.to(device, dtype)
    empty = None
    if with_empty:
        empty = _encode_together([""], chunk, encode)[""].to(device, dtype)
    return PromptConds(
        parts=positive, uncond=encoded(schedules[-1], negative=True), time_ids=ids, empty=empty
    )


def _zeros_like(cond: Cond) -> Cond:
    if isinstance(cond, PooledCond):
        return PooledCond(torch.zeros_like(cond.tokens), torch.zeros_like(cond.pooled))
    return torch.zeros_like(cond)


def _as_raw(value: torch.Tensor | RawText) -> RawText:
    return value if isinstance(value, RawText) else RawText((value,))


def _encode_together(texts: Sequence[str], chunk: Chunker, encode: RawEncoder) -> dict[str, Cond]:
    """``(77·k, C)`` per distinct text (a ``PooledCond`` when the encoder pools), emphasis
    normalised over all ``texts`` (duplicates count), per text encoder.

    Texts with fewer chunks than the longest take the empty prompt's chunk in the missing
    places: a batch encoded together has one chunk count.
    """
    distinct = list(dict.fromkeys(texts))
    chunks = {text: chunk(text) for text in distinct}
    raw = {text: _as_raw(encode(chunks[text])) for text in distinct}
    count = max(len(c) for c in chunks.values())
    filler: tuple[RawText, list[float]] | None = None
    if any(len(c) < count for c in chunks.values()):
        empty = chunk("")[:1]
        filler = (_as_raw(encode(empty)), empty[0].multipliers)
    rows = [distinct.index(text) for text in texts]
    streams = range(len(raw[distinct[0]].streams))
    pieces: dict[str, list[torch.Tensor]] = {text: [] for text in distinct}
    for index in range(count):
        zs: list[list[torch.Tensor]] = [[] for _ in streams]
        multipliers = []
        for text in distinct:
            if index < len(chunks[text]):
                source, start = raw[text], index * _CHUNK_TOKENS
                multipliers.append(chunks[text][index].multipliers)
            else:
                assert filler is not None
                source, start = filler[0], 0
                multipliers.append(filler[1])
            for stream in streams:
                zs[stream].append(source.streams[stream][0, start : start + _CHUNK_TOKENS])
        weights = torch.tensor(multipliers, dtype=torch.float32, device=zs[0][0].device)[rows]
        weighted = [clip.apply_emphasis(torch.stack(z)[rows], weights, "Original") for z in zs]
        joined = weighted[0] if len(weighted) == 1 else torch.cat(weighted, dim=-1)
        for position, text in enumerate(distinct):
            pieces[text].append(joined[rows.index(position)])
    result: dict[str, Cond] = {}
    for text, parts in pieces.items():
        tokens, pooled = torch.cat(parts), raw[text].pooled
        result[text] = tokens if pooled is None else PooledCond(tokens, pooled[0].float())
    return result
