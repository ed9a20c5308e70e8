"""A request's text conditioning for one sampling pass (A1111-SEMANTICS.md §1 step 4).

The positive prompt loses its extra-network tags, is split on ``AND`` (§4) and each part
gets its prompt-editing schedule (§3); the negative prompt is scheduled but never split.
Each prompt's scheduled texts are encoded *together*, as A1111 does: "Original" emphasis
restores the mean over all of them at once (§7.2, §16.19), so a ``[cat:dog:5]`` prompt's
two variants share one normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from pipeline import clip, extra_networks, prompts
from pipeline.denoiser import PromptConds, Schedule

logger = logging.getLogger(__name__)

Chunker = Callable[[str], list[clip.PromptChunk]]
# The unweighted encoder output (1, 77·k, C) of a text's chunks; emphasis is applied here.
RawEncoder = Callable[[list[clip.PromptChunk]], torch.Tensor]

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
) -> PromptConds:
    """Encoded schedules for the positive parts and the negative prompt.

    ``steps`` (and ``hires_steps``) are the denoiser-call totals: the sampler's steps
    times ``SamplerInfo.total_steps_multiplier``. Identical prompts are encoded once.
    """
    parts = positive_parts(prompt)
    texts = [text for text, _ in parts] + [negative_prompt]
    schedules = prompts.prompt_schedules(texts, steps, hires_steps=hires_steps)
    cache: dict[tuple[str, ...], Schedule] = {}

    def encoded(schedule: list[tuple[int, str]]) -> Schedule:
        key = tuple(text for _, text in schedule)
        if key not in cache:
            tensors = _encode_together(list(key), chunk, encode)
            cache[key] = [(end, tensors[text].to(device, dtype)) for end, text in schedule]
        return cache[key]

    positive = tuple(
        (encoded(schedule), weight) for schedule, (_, weight) in zip(schedules, parts, strict=False)
    )
    return PromptConds(parts=positive, uncond=encoded(schedules[-1]))


def _encode_together(texts: Sequence[str], chunk: Chunker, encode: RawEncoder) -> dict[str, torch.Tensor]:
    """``(77·k, C)`` per distinct text, emphasis normalised over all ``texts`` (duplicates count).

    Texts with fewer chunks than the longest take the empty prompt's chunk in the missing
    places: a batch encoded together has one chunk count.
    """
    distinct = list(dict.fromkeys(texts))
    chunks = {text: chunk(text) for text in distinct}
    raw = {text: encode(chunks[text])[0] for text in distinct}
    count = max(len(c) for c in chunks.values())
    filler: tuple[torch.Tensor, list[float]] | None = None
    if any(len(c) < count for c in chunks.values()):
        empty = chunk("")[:1]
        filler = (encode(empty)[0], empty[0].multipliers)
    rows = [distinct.index(text) for text in texts]
    pieces: dict[str, list[torch.Tensor]] = {text: [] for text in distinct}
    for index in range(count):
        zs, multipliers = [], []
        for text in distinct:
            if index < len(chunks[text]):
                start = index * _CHUNK_TOKENS
                zs.append(raw[text][start : start + _CHUNK_TOKENS])
                multipliers.append(chunks[text][index].multipliers)
            else:
                assert filler is not None
                zs.append(filler[0])
                multipliers.append(filler[1])
        z = torch.stack(zs)
        weights = torch.tensor(multipliers, dtype=torch.float32, device=z.device)
        weighted = clip.apply_emphasis(z[rows], weights[rows], "Original")
        for position, text in enumerate(distinct):
            pieces[text].append(weighted[rows.index(position)])
    return {text: torch.cat(parts) for text, parts in pieces.items()}
