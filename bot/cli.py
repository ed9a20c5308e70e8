"""``atelier run | console | generate | worker | bench | db upgrade | plugins | discord sync``.

Each command imports what it needs when it runs: ``atelier --help`` loads no third-party
package, ``atelier db upgrade`` no engine or chat library (tests/test_startup.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.settings import Settings

log = logging.getLogger("atelier")


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import that torchvision is absent; Atelier never needs it
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from bot.settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"atelier: {exc}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args, settings)
    except ConfigError as exc:  # a setting this machine cannot honour, found while building the app
        print(f"atelier: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atelier", description="A Stable Diffusion bot for chat communities."
    )
    parser.add_argument("--config", type=Path, help="config file (default: $ATELIER_CONFIG or ./config.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="start the bot: Discord/Telegram when tokens are set, else the console")
    run.set_defaults(func=cmd_run)
    _console_options(run)

    console = sub.add_parser("console", help="read commands on stdin, print replies and job events")
    _console_options(console)
    console.set_defaults(func=cmd_console)

    generate = sub.add_parser(
        "generate",
        help="one image request, written to a PNG file",
        description="Options are those of /draw, e.g. --steps 4 --size 64x64 --seed 1.",
    )
    generate.add_argument(
        "words", nargs=argparse.REMAINDER, help="PROMPT [--option value ...] -o FILE (the first image's PNG)"
    )
    generate.set_defaults(func=cmd_generate)

    dbp = sub.add_parser("db", help="database maintenance")
    dbsub = dbp.add_subparsers(dest="db_command", required=True)
    dbsub.add_parser("upgrade", help="migrate the database to the newest schema").set_defaults(
        func=cmd_db_upgrade
    )

    discord_parser = sub.add_parser("discord", help="Discord maintenance")
    discord_sub = discord_parser.add_subparsers(dest="discord_command", required=True)
    sync = discord_sub.add_parser(
        "sync", help="register the slash commands now, even when they did not change since the last time"
    )
    sync.add_argument("--guild", help="register in this server only (changes show there at once)")
    sync.set_defaults(func=cmd_discord_sync)

    bench = sub.add_parser(
        "bench", help="run every CPU benchmark (a source checkout's bench/) and write their table"
    )
    bench.add_argument("--out", default="bench-results", help="folder for benchmarks.md and benchmarks.json")
    bench.add_argument("--quick", action="store_true", help="the least work each, to check they run")
    bench.set_defaults(func=cmd_bench)

    sub.add_parser("plugins", help="list plugins and the hooks each implements").set_defaults(
        func=cmd_plugins
    )
    sub.add_parser(
        "worker",
        help="run the shared queue's jobs on this host's devices ([queue] backend = \"procrastinate\")",
    ).set_defaults(func=cmd_worker)
    return parser


def _console_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object per reply and event")
    parser.add_argument("--user", default="console", help="the user name to act as")
    parser.add_argument("--locale", default=None, help="en or zh-CN (default: the config's bot.locale)")


def _console_actor(args: argparse.Namespace, settings: Settings):  # -> Actor
    from bot.i18n import normalize_locale
    from bot.types import Actor

    locale = normalize_locale(args.locale or settings.bot.locale)
    return Actor(platform="console", user_id=args.user, name=args.user, locale=locale, chat_id="console")


def cmd_console(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from bot.adapters.console import ConsoleAdapter
    from bot.app import build_app

    # No input line may end the console: bytes that are not UTF-8 arrive as U+FFFD, and
    # text the terminal cannot show is escaped, instead of raising in the middle of a reply.
    for stream, errors in ((sys.stdin, "replace"), (sys.stdout, "backslashreplace")):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)

    async def go() -> None:
        app = build_app(settings)
        await ConsoleAdapter(app, _console_actor(args, settings), json_mode=args.json).run()

    asyncio.run(go())
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """The chat platforms whose tokens are set, in one process; else the console."""
    import asyncio

    from bot.runner import StartError, build_adapters, chosen_platforms, serve

    platforms = chosen_platforms(settings)
    if not platforms:
        return cmd_console(args, settings)
    from bot.app import build_app

    async def go() -> None:
        app = build_app(settings)
        try:
            adapters = build_adapters(app, settings, platforms)
        except BaseException:
            await app.store.close()
            raise
        await serve(app, adapters)

    try:
        asyncio.run(go())
    except StartError as exc:
        print(f"atelier: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from bot.adapters.oneshot import OneShotAdapter
    from bot.app import build_app
    from bot.commands import join_words
    from bot.types import Actor, Route

    words, output = _split_output(args.words)
    if output is None:
        print("atelier generate: -o FILE is required", file=sys.stderr)
        return 2
    text = join_words(words)
    actor = Actor(platform="console", user_id="cli", name="cli", locale=settings.bot.locale, chat_id="cli")

    # one job: warming the device up first would only delay it
    settings = settings.model_copy(update={"engine": settings.engine.model_copy(update={"warm_up": False})})

    async def go() -> int:
        app = build_app(settings)
        adapter = OneShotAdapter(app, output)
        adapter.delivery.start()
        try:
            await app.start(recover=False)
            replies = await adapter.delivery.command("/draw " + text, actor, Route.of(actor))
            if any(reply.error for reply in replies):
                print(f"atelier: {adapter.errors[0]}", file=sys.stderr)
                return 2
            await app.idle()
        finally:
            await adapter.delivery.stop()
            await app.stop()
        if adapter.written is None:
            print(f"atelier: {adapter.errors[0] if adapter.errors else 'no image'}", file=sys.stderr)
            return 1
        print(output)
        return 0

    return asyncio.run(go())


def _split_output(words: list[str]) -> tuple[list[str], Path | None]:
    """Take ``-o FILE`` / ``--output FILE`` out of the /draw words, wherever it stands."""
    rest: list[str] = []
    output: Path | None = None
    items = iter(words)
    for word in items:
        if word in ("-o", "--output"):
            value = next(items, None)
            output = Path(value) if value else None
        elif word.startswith(("-o=", "--output=")):
            output = Path(word.split("=", 1)[1])
        else:
            rest.append(word)
    return rest, output


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from bot import db

    db.upgrade(settings.database_url)
    print(f"database at revision {db.current_revision(settings.database_url)}")
    return 0


def cmd_discord_sync(args: argparse.Namespace, settings: Settings) -> int:
    """Register the command tree with Discord (globally or in one guild), ignoring the
    stored hash: after a manual change on Discord's side, or to try a new plugin in one
    server first."""
    if not settings.secrets.discord_token:
        print("atelier: set ATELIER_DISCORD_TOKEN to register the Discord commands", file=sys.stderr)
        return 2
    import asyncio

    from bot import db
    from bot.adapters.discord import build
    from bot.app import build_app
    from bot.runner import StartError

    async def go() -> None:
        await asyncio.to_thread(db.upgrade, settings.database_url)  # the hash is kept in the store
        app = build_app(settings)
        adapter = build(app, settings)
        try:
            await adapter.login()
            await adapter.sync(guild=args.guild, force=True)
        finally:
            await adapter.client.close()
            await app.store.close()

    try:
        asyncio.run(go())
    except StartError as exc:
        print(f"atelier: {exc}", file=sys.stderr)
        return 1
    where = f"in guild {args.guild}" if args.guild else "globally"
    print(f"registered the slash commands {where}")
    return 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    """The benchmarks live beside the package in a source checkout (they are not installed)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "run.py"
    if not script.is_file():
        print(
            "atelier: the benchmarks come with a source checkout (bench/run.py); run it there",
            file=sys.stderr,
        )
        return 2
    command = [sys.executable, str(script), "--out", args.out, *(["--quick"] if args.quick else [])]
    return subprocess.call(command)


def cmd_plugins(args: argparse.Namespace, settings: Settings) -> int:
    from bot.plugins import build_plugin_manager, plugin_hooks

    pm = build_plugin_manager(settings.plugins.disabled)
    for name, hooks in plugin_hooks(pm):
        print(f"{name}: {', '.join(hooks) or '(no hooks)'}")
    for name in settings.plugins.disabled:
        print(f"{name}: disabled")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run the shared queue's jobs on this host's devices until SIGTERM or SIGINT, then
    drain: the running jobs finish, the ones waiting here go back to the queue."""
    if settings.queue.backend != "procrastinate":
        print(
            'atelier: `atelier worker` runs the jobs of a shared queue: set [queue] backend = "procrastinate" '
            "and a PostgreSQL database (ATELIER_DATABASE_URL). With the local queue, `atelier run` runs "
            "the jobs itself.",
            file=sys.stderr,
        )
        return 2
    import asyncio
    import signal

    from bot.app import build_app

    async def go() -> None:
        app = build_app(settings, worker=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await app.start()
            devices = ", ".join(str(getattr(engine, "device", "?")) for engine in app.engines)
            print(f"worker {app.owner} ready on {devices}", flush=True)
            await stop.wait()
            print("worker draining: the running jobs finish, nothing new is taken", flush=True)
        finally:
            await app.stop(wait=True)

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    sys.exit(main())
