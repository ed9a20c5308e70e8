"""/link and /unlink: one person across platforms.

``/link`` gives a one-time code; the same person sends ``/link CODE`` from their account
on another platform, and from then on both accounts share one history, one set of saved
styles and presets, and one quota (everything keyed by ``Actor.key``). ``/unlink``
separates them again: each account takes back the generations it asked for. Nothing is
linked without the code, and a code is only shown in a private chat (or the local
console), where no one else reads it. The core resolves the person before every command
(``Service.handle``), so every adapter, the console included, gets it for free.
"""

from __future__ import annotations

from bot.errors import UserError
from bot.types import CommandContext, Reply
from models.identity_store import CODE_LIFETIME, IdentityStore, LinkRefused


async def link_command(ctx: CommandContext) -> Reply:
    """``/link``: a code for this account; ``/link CODE``: join the account that made it."""
    store = IdentityStore(ctx.app.store)
    actor = ctx.actor
    code = ctx.text.strip()
    if not code:
        route = ctx.invocation.route
        if actor.platform != "console" and (route is None or not route.is_private):
            # a code shown in a group could be redeemed by anyone who reads it
            raise UserError("link.private_only")
        made = await store.new_code(actor.identity)
        minutes = int(CODE_LIFETIME.total_seconds() // 60)
        return Reply("link.code", {"code": made, "minutes": minutes}, data={"code": made})
    try:
        linked = await store.redeem(code, actor.identity)
    except LinkRefused as exc:
        raise UserError(f"link.refused.{exc.reason}") from None
    data = {"identity": linked.identity, "person": linked.person, "moved": linked.moved}
    return Reply("link.done", {"person": linked.person, "moved": linked.moved}, data=data)


async def unlink_command(ctx: CommandContext) -> Reply:
    separated = await IdentityStore(ctx.app.store).unlink(ctx.actor.identity)
    if not separated:
        raise UserError("link.none")
    return Reply("link.unlinked", {"accounts": ", ".join(separated)}, data={"separated": separated})
