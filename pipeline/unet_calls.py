"""The UNet calls of the CFG denoiser (:mod:`pipeline.denoiser`): the rows it sends and
how they run (A1111-SEMANTICS.md §7.2, §10).

A call's text embeddings come from one choice of scheduled conds: the ``AND`` parts,
padded to one length by repeating their last vector and repeated for every image, and
the negative prompt. Cond and uncond share one UNet call when their token lengths are
equal, which "Pad conds" arranges. SDXL conds (:class:`PooledCond`) add diffusers'
``added_cond_kwargs`` for the same rows.

A denoiser evaluation runs as :data:`Steps`: it yields the UNet calls it needs
(:class:`UnetCall`) and is sent their outputs, so ``_drive`` runs one denoiser's calls
and :class:`pipeline.denoiser.BatchedDenoiser` runs several denoisers' calls together,
one UNet call for each group of calls that can share a batch (``_batch_key``).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import clip


@dataclass(frozen=True)
class PooledCond:
    """An SDXL cond: cross-attention tokens ``(T, C)`` and the pooled text vector ``(P,)``
    that the UNet's extra conditioning takes beside the size ids."""

    tokens: torch.Tensor
    pooled: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype) -> PooledCond:
        return PooledCond(self.tokens.to(device, dtype), self.pooled.to(device, dtype))


Cond = torch.Tensor | PooledCond


@dataclass(frozen=True)
class UnetCall:
    """One UNet evaluation a denoiser asks for: latents rows, timesteps, text embeddings
    (and SDXL's extra conditioning) for the same rows, run in ``dtype``."""

    x: torch.Tensor
    t: torch.Tensor
    emb: torch.Tensor
    dtype: torch.dtype
    added: dict[str, torch.Tensor] | None = None


# A denoiser evaluation as steps: yields the UNet calls it needs and is sent their outputs
# (one float32 tensor per call); its return value is the evaluation's result.
Steps = Generator[list[UnetCall], list[torch.Tensor], Any]


@dataclass
class _Prepared:
    """The embeddings for one choice of scheduled conds, expanded to the batch."""

    cond: torch.Tensor  # (B*J, T, C), image-major: image i's parts are rows i*J … i*J+J-1
    uncond: torch.Tensor  # (B, T', C)
    joint: torch.Tensor | None  # (B*J + B, T, C) when T == T', for one UNet call
    # SDXL's ``added_cond_kwargs`` for the same rows (None for SD 1.x/2.x).
    cond_added: dict[str, torch.Tensor] | None = None
    uncond_added: dict[str, torch.Tensor] | None = None
    joint_added: dict[str, torch.Tensor] | None = None
    padded: str | None = None  # the infotext flag of the padding applied ("Pad conds", "Pad conds v0")


def _tokens(cond: Cond) -> torch.Tensor:
    return cond.tokens if isinstance(cond, PooledCond) else cond


def _expand(
    chosen: list[Cond],
    uncond: Cond,
    batch: int,
    time_ids: torch.Tensor | None,
    *,
    padding: tuple[str, torch.Tensor | None] | None = None,
    uncond_rows: int | None = None,
) -> _Prepared:
    """AND parts of unequal length are padded by repeating their last vector (§7.2); with
    ``padding`` (its infotext flag and the empty prompt's tokens) cond and uncond of unequal
    length are padded to one length (:class:`pipeline.denoiser.Guidance`). ``uncond_rows``:
    how many rows the uncond fills (``batch``, or twice that for an edit model's blank rows)."""
    parts = torch.stack(clip.pad_repeating_last([_tokens(c) for c in chosen]))  # (J, T, C)
    cond = parts.repeat(batch, 1, 1)
    rows = batch if uncond_rows is None else uncond_rows
    uncond_batch = _tokens(uncond).unsqueeze(0).expand(rows, -1, -1)
    padded = None
    if padding is not None and cond.shape[1] != uncond_batch.shape[1]:
        cond, uncond_batch, padded = _pad_cond_uncond(cond, uncond_batch, *padding)
    joint = None
    if cond.shape[1] == uncond_batch.shape[1]:
        joint = torch.cat([cond, uncond_batch])
    prepared = _Prepared(cond=cond, uncond=uncond_batch, joint=joint, padded=padded)
    if time_ids is None:
        return prepared
    pooled_parts = [c for c in chosen if isinstance(c, PooledCond)]
    if len(pooled_parts) != len(chosen) or not isinstance(uncond, PooledCond):
        raise ValueError("size ids (SDXL) need pooled conds for every prompt")
    pooled = torch.stack([c.pooled for c in pooled_parts]).repeat(batch, 1)
    uncond_pooled = uncond.pooled.unsqueeze(0).expand(rows, -1)
    prepared.cond_added = _added(pooled, time_ids)
    prepared.uncond_added = _added(uncond_pooled, time_ids)
    if joint is not None:
        prepared.joint_added = _added(torch.cat([pooled, uncond_pooled]), time_ids)
    return prepared


def _pad_cond_uncond(
    cond: torch.Tensor, uncond: torch.Tensor, flag: str, empty: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """Cond (N, T, C) and uncond (B, T', C) padded to one length, and the flag to report.

    "Pad conds v0": the uncond's last vector repeated, or the uncond cut to T. "Pad conds":
    the shorter one gets whole copies of the empty prompt's (77, C) tokens at its end.
    """
    length = cond.shape[1]
    if empty is None:
        if uncond.shape[1] < length:
            extra = uncond[:, -1:].expand(-1, length - uncond.shape[1], -1)
            return cond, torch.cat([uncond, extra], dim=1), flag
        return cond, uncond[:, :length], flag
    repeats = (length - uncond.shape[1]) // empty.shape[0]
    empty = empty.to(cond)
    if repeats < 0:
        cond = torch.cat([cond, empty.repeat(cond.shape[0], -repeats, 1)], dim=1)
    elif repeats > 0:
        uncond = torch.cat([uncond, empty.repeat(uncond.shape[0], repeats, 1)], dim=1)
    return cond, uncond, flag if repeats else None


def _added(pooled: torch.Tensor, time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """diffusers' SDXL extra conditioning for ``pooled.shape[0]`` UNet rows."""
    ids = time_ids.to(pooled.device, pooled.dtype).reshape(1, -1).expand(pooled.shape[0], -1)
    return {"text_embeds": pooled, "time_ids": ids}


def _batch_key(call: UnetCall) -> tuple:
    added = None
    if call.added is not None:
        added = tuple(sorted((key, tuple(value.shape[1:])) for key, value in call.added.items()))
    return (tuple(call.x.shape[1:]), tuple(call.emb.shape[1:]), call.emb.dtype, call.dtype, added)


def _run_unet(unet: torch.nn.Module, call: UnetCall) -> torch.Tensor:
    extra = {} if call.added is None else {"added_cond_kwargs": call.added}
    x = call.x.to(call.dtype)
    out = unet(x, call.t.float(), encoder_hidden_states=call.emb, return_dict=False, **extra)[0]
    return out.float()


def _drive(
    steps: Steps,
    run: Callable[[list[UnetCall]], list[torch.Tensor]],
    before_call: Callable[[], None] | None = None,
) -> Any:
    """Run an evaluation's steps to their result, each batch of UNet calls through ``run``
    (``before_call`` first: where the engine checks for a stop)."""
    try:
        calls = next(steps)
        while True:
            if before_call is not None:
                before_call()
            calls = steps.send(run(calls))
    except StopIteration as done:
        return done.value
