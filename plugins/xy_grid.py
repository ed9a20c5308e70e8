"""X/Y/Z grids: ``/grid a cat --x "steps: 10-30 [3]" --y "cfg: 5,7,9" --z "sampler: Euler, DDIM"``.

Each axis is ``NAME: VALUES``: an axis name (any case, or an alias: "cfg" is "CFG Scale")
and values in A1111's text syntax (``1-5``, ``1-5 (+2)``, ``10-5 (-3)``, ``1-10 [5]``,
quoted CSV). ``--x/--y/--z`` are /draw options too, so styles, presets and every other
option compose with them. A grid is planned as one job per cell in A1111's order
(expensive axes outermost), all with the request's seed unless the seed is an axis;
each cell is an ordinary generation with its own PNG and infotext. The first cell's
infotext carries A1111's ``Script: X/Y/Z plot`` fields, which is also how the finished
grid is put back together: when the last cell ends, the labelled grid (X on top, Y on the
left, one grid per Z value side by side under its title) is posted with that infotext.
Cells that failed or were cancelled are left black, as A1111 leaves cells that produced
nothing; when no cell finished there is no grid, only a notice.

The cell cap is ``[plugins.xy_grid] max_cells``; moderators change it per guild/chat
(``/grid cap N``) or everywhere (``--global``) at run time. A1111's text rules live in
``pipeline.xy_axes``, the axes and the grid's shape in ``bot.grid_axes``; their public
names (``GridAxis`` for third-party axes among them) are importable from here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from datetime import UTC
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bot.api import (  # noqa: F401  (re-exported: third-party axes and tests import them here)
    AXIS_OPTIONS,
    DRAW_OPTIONS,
    GLOBAL_MODERATOR,
    HARD_MAX_CELLS,
    SCRIPT,
    AxisChoice,
    ConfigError,
    GenerationRecord,
    GridAxis,
    GridCell,
    GridSpec,
    ImageStoreError,
    Msg,
    NotFound,
    OptionSpec,
    PermissionDenied,
    PreferenceStore,
    UserError,
    actor_scopes,
    asks_global,
    audit,
    builtin_axes,
    find_axis,
    freeze,
    grid_from_infotext_fields,
    group_jobs,
    hookimpl,
    loop_order,
    maybe_await,
    missing_argument,
    options_from_request,
    parse_args,
    plugin_state,
    read_axis,
    read_grid,
    read_values,
    redraw,
    require_global_moderator,
    require_moderator,
    whole_number,
)
from bot.api import GLOBAL as GLOBAL_SCOPE
from bot.api import GLOBAL_SCOPE as GLOBAL
from bot.api import PreferenceScope as Scope
from bot.types import (
    Action,
    Admission,
    Argument,
    Command,
    CommandContext,
    Denial,
    DrawRequest,
    FileInput,
    OutgoingFile,
    Plan,
    PlannedJob,
    Reply,
    RequestDraft,
)
from pipeline.request import GenerationRequest
from pipeline.xy_axes import (  # noqa: F401  (re-exported: the parity API and tests import them here)
    _FLOAT_COUNT,
    _FLOAT_RANGE,
    _INT_COUNT,
    _INT_RANGE,
    AXES,
    DEFAULT_MAX_VALUES,
    AxisContext,
    AxisKind,
    AxisSpec,
    AxisTextError,
    axis_labels,
    axis_spec,
    confirm_checkpoints,
    confirm_samplers,
    format_bare,
    format_base_name,
    format_joined,
    format_nothing,
    format_with_label,
    parse_axis_values,
    parse_values,
    sampler_choices,
    scheduler_choices,
    split_axis_text,
)

log = logging.getLogger(__name__)

CAP_KEY = "grid.max_cells"  # PreferenceStore key of the cap set at run time
POSTED_KEY = "grid.posted"  # PreferenceStore key (scope "grid", id = group) of a grid already posted
_SPEC, _PLAN = "xy_grid.spec", "xy_grid.plan"  # caches on DrawRequest.options
_AGAIN = "xy_grid.again"  # DrawRequest.options: the cells of a grid to run again with a new seed


class GridConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_cells: int = Field(100, ge=1, le=HARD_MAX_CELLS)
    font: str = ""


def config(app: Any) -> GridConfig:
    return app.settings.plugin_config("xy_grid", GridConfig)  # type: ignore[return-value]


def font_loader(app: Any) -> Any:
    from PIL import ImageFont

    from pipeline.grid import default_font

    path = config(app).font
    if not path:
        return default_font
    return lambda size: ImageFont.truetype(path, max(1, size))


def is_grid(request: DrawRequest) -> bool:
    return _AGAIN in request.options or any(request.options.get(option) for option in AXIS_OPTIONS)


def grid_spec(request: DrawRequest, app: Any) -> GridSpec:
    """Read once per request: random seeds of Seed axes are drawn only once."""
    if _SPEC not in request.options:
        if request.count != 1:
            raise UserError("error.grid.count", count=request.count)
        if _AGAIN in request.options:
            spec = grid_from_infotext_fields(app, request.options[_AGAIN][0].request.extra)
        else:
            spec = read_grid(app, {o: request.options.get(o) for o in AXIS_OPTIONS})
        request.options[_SPEC] = spec
    return request.options[_SPEC]


def grid_plan(request: DrawRequest, app: Any) -> Plan:
    """Built once per request (``check_request`` and ``plan_generation`` share it)."""
    if _PLAN not in request.options:
        spec = grid_spec(request, app)
        again = _AGAIN in request.options
        request.options[_PLAN] = _again_plan(request, spec) if again else _new_plan(request, spec, app)
    return request.options[_PLAN]


def _new_plan(request: DrawRequest, spec: GridSpec, app: Any) -> Plan:
    carried = carried_fields(request, app)
    jobs = []
    for position in spec.processing_order():
        cell = build_cell(request, spec, position, app).replace(**carried)
        if position == (0, 0, 0):
            cell = cell.replace(extra={**cell.extra, **spec.infotext_fields()})
        kind = "img2img" if cell.init_image else "txt2img"
        jobs.append(PlannedJob(cell, kind=kind, label=spec.cell_label(position)))
    return Plan(tuple(jobs), kind="grid")


def _again_plan(request: DrawRequest, spec: GridSpec) -> Plan:
    """The stored cells with the request's new seed, except where a Seed axis set it."""
    fixed = {choice.axis.name for choice in spec.axes}
    changes = {}
    if "Seed" not in fixed:
        changes["seed"] = request.generation.seed
    if "Var. seed" not in fixed:
        changes["subseed"] = request.generation.subseed
    cells = request.options[_AGAIN]
    return Plan(tuple(PlannedJob(c.request.replace(**changes), c.kind, c.label) for c in cells), kind="grid")


def _shown(choice: AxisChoice, value: Any) -> str:
    text = ", ".join(value) if isinstance(value, list) else str(value)
    return f"{choice.axis.name}: {text}"


def _cell_draft(request: DrawRequest, cell: GridCell) -> RequestDraft:
    return RequestDraft(cell.prompt, cell.negative_prompt, cell.options, request.parent_id)


def _new_cell(request: DrawRequest, app: Any) -> GridCell:
    base = request.generation
    options = options_from_request(base, count=1)
    del options["negative"]
    return GridCell(base.prompt, base.negative_prompt, options, app)


def carried_fields(request: DrawRequest, app: Any) -> dict[str, Any]:
    """The request's fields no /draw option sets (styles and presets recorded by name,
    extra infotext fields): what a cell rebuilt from options must copy over."""
    control = freeze(_cell_draft(request, _new_cell(request, app)), request.actor, app.settings, app.library)
    base = request.generation
    return {
        f.name: getattr(base, f.name)
        for f in dataclasses.fields(base)
        if getattr(control.generation, f.name) != getattr(base, f.name)
    }


def build_cell(
    request: DrawRequest, spec: GridSpec, position: tuple[int, int, int], app: Any
) -> GenerationRequest:
    """The request with the cell's axis values applied (X, then Y, then Z), checked as /draw."""
    cell = _new_cell(request, app)
    shown = []
    for choice, index in zip(spec.axes, position, strict=True):
        value = choice.values[index]
        if not choice.is_nothing:
            shown.append(_shown(choice, value))
        try:
            choice.axis.apply(cell, value, choice.values)
        except UserError as exc:
            detail = Msg(exc.key, exc.params)
            raise UserError("error.grid.bad_cell", cell=_shown(choice, value), detail=detail) from None
    try:
        frozen = freeze(_cell_draft(request, cell), request.actor, app.settings, app.library)
    except UserError as exc:
        raise UserError(
            "error.grid.bad_cell", cell=" | ".join(shown), detail=Msg(exc.key, exc.params)
        ) from None
    return frozen.generation


# the cap -------------------------------------------------------------------------------------


def _cap_scopes(actor: Any) -> list[Scope]:
    return [scope for scope in actor_scopes(actor) if scope[0] != "user"]


def _local_scope(actor: Any) -> Scope:
    """Where a moderator's ``/grid cap N`` applies: their guild, else their chat."""
    return next((scope for scope in _cap_scopes(actor) if scope[0] == "guild"), _cap_scopes(actor)[0])


async def current_cap(app: Any, actor: Any) -> int:
    found = await PreferenceStore(app.store).lookup(_cap_scopes(actor), CAP_KEY)
    return int(found) if found is not None else config(app).max_cells


async def cap_guard(ctx: CommandContext) -> None:
    """Anyone may see the cap; changing it (any argument or option) is for moderators,
    refused before the text is read, so every attempt is audited."""
    if ctx.text.strip():
        await require_moderator(ctx, "grid.cap")
        if asks_global(ctx.text):
            await require_global_moderator(ctx, "grid.cap")


async def cap_command(ctx: CommandContext) -> Reply:
    words = ctx.text.split()
    if not words and not ctx.options:
        cap = await current_cap(ctx.app, ctx.actor)
        return Reply("grid.cap", {"max": cap}, data={"max_cells": cap})
    if len(words) != 1:
        raise missing_argument(ctx)
    cap = whole_number("cap", words[0], minimum=1, maximum=HARD_MAX_CELLS)
    scope = GLOBAL if ctx.options.get("global") else _local_scope(ctx.actor)
    if scope == GLOBAL and GLOBAL_MODERATOR not in ctx.actor.roles:  # cap_guard refused and audited it
        raise PermissionDenied("error.global_moderators_only", command="grid cap")
    await PreferenceStore(ctx.app.store).set(scope, CAP_KEY, cap, by=ctx.actor.key)
    await audit(ctx, "grid.cap", scope=GLOBAL_SCOPE if scope == GLOBAL else None, max_cells=cap)
    where = Msg("grid.scope.everywhere" if scope == GLOBAL else "grid.scope.here")
    return Reply("grid.cap_set", {"max": cap, "where": where}, data={"max_cells": cap})


# commands ------------------------------------------------------------------------------------


async def grid_command(ctx: CommandContext) -> list[Reply] | Reply:
    given = {name for name, _ in parse_args(ctx.text).options}
    if not given & set(AXIS_OPTIONS):
        raise UserError("error.grid.no_axes")
    replies = await ctx.app.service.draw_command(ctx)
    if replies and replies[0].key == "draw.accepted":
        replies.insert(1, Reply("grid.planned", {"cells": replies[0].params["count"]}))
    return replies


async def axes_command(ctx: CommandContext) -> Reply:
    """The axes a grid can use, third-party ones included, by their A1111 names."""
    names = [axis.name for axis in ctx.app.grid_axes.items.values()]
    return Reply("grid.axes", {"axes": ", ".join(names)}, data={"axes": names})


async def grid_again(ctx: CommandContext) -> list[Reply]:
    """The same cells with a new seed (seeds a Seed axis set are kept), checked and
    billed like any request."""
    # who may see it is the core's one rule: platform and user id, or a moderator
    record = await ctx.app.service.visible(ctx.text.strip(), ctx.actor)
    if record.plan != "grid" or record.group_index != 0:
        raise NotFound("error.not_found", id=ctx.text.strip())
    cells = await group_jobs(ctx.app, record.group_id)
    changes = {"seed": -1, "subseed": -1, _AGAIN: cells}
    return await redraw(ctx.app, record, changes, ctx.actor, ctx.invocation.route)


# composing the grid when its last cell ends ------------------------------------------------------


async def _claim(app: Any, group_id: str, value: dict[str, Any]) -> bool:
    """Exactly one caller wins, across tasks and processes: the first to store the key."""
    return await plugin_state(app).claim(("grid", group_id), POSTED_KEY, value)


async def cell_ended(record: GenerationRecord, app: Any) -> None:
    if record.plan != "grid":
        return
    if await group_jobs(app, record.group_id, open_only=True):
        return  # cells still to run: the last one to end composes
    cells = await group_jobs(app, record.group_id)
    first = cells[0]
    path = Path(first.created_at.astimezone(UTC).strftime("%Y-%m-%d")) / f"{first.group_id}-grid.png"
    if not await _claim(app, first.group_id, {"path": path.as_posix(), "cells": [c.id for c in cells]}):
        return
    reply = await compose(app, cells, path)
    app.service.post(first, reply)


async def compose(app: Any, cells: list[GenerationRecord], path: Path) -> Reply:
    """The grid image of finished ``cells`` (in plan order), or a notice why there is none."""
    first = cells[0]
    counts = {
        status: sum(1 for c in cells if c.status == status) for status in ("finished", "failed", "cancelled")
    }
    unavailable = Reply(
        "grid.unavailable", {"cells": len(cells)}, error=True, data={"cells": [c.id for c in cells]}
    )
    try:
        spec = grid_from_infotext_fields(app, first.request.extra)
        order = spec.processing_order()
        if len(order) != len(cells):
            raise ValueError(f"{len(cells)} cells for a grid of {len(order)}")
    except (UserError, ValueError):
        log.exception("grid %s cannot be put back together", first.group_id)
        return unavailable
    places = {spec.index(position): cell for position, cell in zip(order, cells, strict=True)}
    by_index = [places[index] for index in range(len(cells))]
    data = {"cells": [c.id for c in by_index], "missing": [c.id for c in by_index if c.status != "finished"]}
    params = {"cells": len(cells), "shape": spec.shape_text(), **counts}
    if not counts["finished"]:
        return Reply("grid.nothing", params, error=True, data=data)
    try:
        sources = [await _first_image(app, cell) for cell in by_index]
        png = await asyncio.to_thread(_draw, app, spec, by_index, sources, app.images_dir / path)
    except (OSError, NotFound, ImageStoreError):  # a cell's PNG removed meanwhile, a full disk, no bucket
        log.exception("grid %s could not be drawn", first.group_id)
        return unavailable
    data["grid"] = str(app.images_dir / path)
    key = "grid.done" if counts["finished"] == len(cells) else "grid.partial"
    actions = [Action(f"grid-again:{first.id}", "action.grid_again")]
    grid = OutgoingFile(path.name, "image", data=png)
    return Reply(key, params, files=[grid], actions=actions, data=data)


async def _first_image(app: Any, cell: GenerationRecord) -> bytes | None:
    """A finished cell's first PNG, through the image store (no shared disk assumed)."""
    if cell.status == "finished" and cell.images:
        return await app.images.read(cell.images[0].id)
    return None


def _draw(
    app: Any, spec: GridSpec, cells: Sequence[GenerationRecord], sources: list[bytes | None], out: Path
) -> bytes:
    """On a worker thread: decode the cells' first images, draw the plot, keep it as PNG
    beside the images (the grid of record) and return its bytes for the notice."""
    import io

    from PIL import Image

    from pipeline.grid import xyz_grid
    from pipeline.images import png_bytes

    loaded: list[Image.Image | None] = []
    for source in sources:
        if source is None:
            loaded.append(None)
            continue
        with Image.open(io.BytesIO(source)) as image:
            loaded.append(image.convert("RGB"))
    present = [image for image in loaded if image is not None]
    size = (max(i.width for i in present), max(i.height for i in present))
    images = [image if image is not None else Image.new("RGB", size) for image in loaded]
    infotext = next(c.images[0].infotext for c in [cells[0], *cells] if c.status == "finished" and c.images)
    x, y, z = (choice.labels for choice in spec.axes)
    plot = xyz_grid(images, x, y, z, font_loader(app))
    data = png_bytes(plot, infotext)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return data


# hooks -----------------------------------------------------------------------------------------


@hookimpl
def startup(app: Any) -> None:
    cfg = config(app)  # a bad [plugins.xy_grid] table fails at startup, naming the key
    if cfg.font:
        try:
            font_loader(app)(12)
        except OSError as exc:
            raise ConfigError(f"[plugins.xy_grid] font: cannot load {cfg.font!r}: {exc}") from None


@hookimpl
def register_options(register: Any) -> None:
    for option in AXIS_OPTIONS:
        register(OptionSpec(option, "axis", description=f"option.{option}"))


@hookimpl
def register_grid_axes(register: Any) -> None:
    for axis in builtin_axes():
        register(axis)


@hookimpl
def register_commands(register: Any) -> None:
    plot = Command(
        "plot",
        grid_command,
        "cmd.grid.plot",
        (Argument("prompt", "text", "arg.prompt", required=False),),
        DRAW_OPTIONS,
        attachment=FileInput("file.draw"),
        details="details.grid.plot",
    )
    cap = Command(
        "cap",
        cap_command,
        "cmd.grid.cap",
        (Argument("cells", "integer", "arg.grid_cap", required=False),),
        (OptionSpec("global", "flag", description="option.moderation.global"),),
        guard=cap_guard,
    )
    axes = Command("axes", axes_command, "cmd.grid.axes")
    register(Command("grid", description="cmd.grid", subcommands=(plot, cap, axes), default="plot"))
    register(Command("grid-again", grid_again, hidden=True, arguments=(Argument("id", "id"),)))


@hookimpl
async def check_request(request: Any, actor: Any, app: Any) -> Any:
    """Axes read and the cell cap applied before anything is stored (bad input raises);
    then cells whose prompts differ from the request's go through the other checks."""
    if not is_grid(request):
        return None
    # axis values and every cell resolve names against the models folder: off the event loop
    spec = await asyncio.to_thread(grid_spec, request, app)
    cap = await current_cap(app, actor)
    if spec.cells > cap:
        return Denial(
            "error.grid.too_many_cells", {"cells": spec.cells, "shape": spec.shape_text(), "max": cap}
        )
    return await check_cells(request, await asyncio.to_thread(grid_plan, request, app), app)


async def check_cells(request: DrawRequest, plan: Plan, app: Any) -> Denial | Admission | None:
    """Word lists and bans must see every prompt a grid draws (Prompt S/R can bring in
    any word): each distinct cell prompt goes through the checks that reserve nothing.
    Those are all but the ``trylast`` ones (the hook's contract puts reserving checks,
    like quotas, last), and not this one. A spoiler on any cell marks the whole grid."""
    impls = [
        impl
        for impl in app.pm.hook.check_request.get_hookimpls()
        if not impl.trylast and impl.function is not check_request
    ]
    seen = {(request.generation.prompt, request.generation.negative_prompt)}
    spoiler = False
    for job in plan.jobs:
        prompts = (job.request.prompt, job.request.negative_prompt)
        if prompts in seen:
            continue
        seen.add(prompts)
        cell = dataclasses.replace(request, generation=job.request, options={})
        for impl in impls:
            arguments = {"request": cell, "actor": request.actor, "app": app}
            result = await maybe_await(impl.function(**{name: arguments[name] for name in impl.argnames}))
            if isinstance(result, Denial):
                return result
            spoiler = spoiler or (isinstance(result, Admission) and result.spoiler)
    return Admission(spoiler=True) if spoiler else None


@hookimpl
def plan_generation(request: Any, app: Any) -> Any:
    return grid_plan(request, app) if is_grid(request) else None


@hookimpl
async def generation_finished(record: Any, app: Any) -> None:
    await cell_ended(record, app)


@hookimpl
async def generation_ended(record: Any, app: Any) -> None:
    await cell_ended(record, app)
