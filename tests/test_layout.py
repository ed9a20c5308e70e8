"""Boundaries of DESIGN.md, checked over every module of the project.

- No chat library outside its adapter: ``discord`` only in ``bot/adapters/discord*``,
  ``telegram`` only in ``bot/adapters/telegram*``.
- The engine (``pipeline``) never imports the bot, the plugins or the store; the store
  (``models``) and the migrations never import the bot or the plugins.
- Plugins use the core through ``bot.api`` and ``bot.types`` only (never ``bot.service``,
  ``models.tables`` or another plugin), besides the engine and their own stores.
- Importing every module of the core, plugins, store and engine loads no chat library.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "plugins", "pipeline", "models", "migrations")
CHAT_LIBRARIES = {"discord": "bot/adapters/discord", "telegram": "bot/adapters/telegram"}
PLUGIN_CORE = {"bot.api", "bot.types"}
PLUGIN_STORES = {"models.style_store", "models.styles", "models.quota_store", "models.moderation_store"}
NEVER = {
    "pipeline": ("bot", "plugins", "models"),
    "models": ("bot", "plugins"),
    "migrations": ("bot", "plugins"),
    "bot": ("plugins",),
}


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at any depth (lazy imports in functions included)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def test_every_project_module_is_checked() -> None:
    checked = {p.relative_to(ROOT).parts[0] for p in modules()}
    assert checked == set(PACKAGES)
    assert len(modules()) > 100


def test_no_chat_library_outside_its_adapter() -> None:
    leaks = []
    for path in modules():
        where = path.relative_to(ROOT).as_posix()
        for name in imports(path):
            home = CHAT_LIBRARIES.get(top(name))
            if home is not None and not where.startswith(home):
                leaks.append(f"{where} imports {name}")
    assert not leaks, leaks


def test_lower_layers_never_import_higher_ones() -> None:
    leaks = []
    for path in modules():
        where = path.relative_to(ROOT)
        forbidden = NEVER.get(where.parts[0], ())
        leaks += [f"{where} imports {n}" for n in imports(path) if top(n) in forbidden]
    assert not leaks, leaks


def test_plugins_use_the_core_through_its_api_only() -> None:
    leaks = []
    for path in sorted((ROOT / "plugins").glob("*.py")):
        for name in imports(path):
            if top(name) == "bot" and name not in PLUGIN_CORE:
                leaks.append(f"{path.name} imports {name}")
            elif top(name) == "models" and name not in PLUGIN_STORES:
                leaks.append(f"{path.name} imports {name}")
            elif top(name) == "plugins":
                leaks.append(f"{path.name} imports another plugin's module, {name}")
    assert not leaks, leaks


def test_the_layout_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from bot.service import Service\n    import discord.ext\n")
    assert imports(bad) == ["bot.service", "discord.ext"]


IMPORT_ALL = """
import importlib, pkgutil, sys
import bot, plugins, pipeline, models
skip = ("bot.adapters.discord", "bot.adapters.telegram")
for package in (bot, plugins, pipeline, models):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not info.name.startswith(skip):
            importlib.import_module(info.name)
leaks = sorted(m for m in sys.modules if m.split(".")[0] in ("discord", "telegram"))
assert not leaks, leaks
"""

ENGINE_ONLY = """
import importlib, pkgutil, sys
import pipeline
for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
    importlib.import_module(info.name)
leaks = sorted(m for m in sys.modules if m.split(".")[0] in ("bot", "plugins", "discord", "telegram"))
assert not leaks, leaks
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}  # no ATELIER_* variables, no tokens
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )


def test_core_plugins_pipeline_and_models_never_load_a_chat_library() -> None:
    result = _run(IMPORT_ALL)
    assert result.returncode == 0, result.stderr


def test_pipeline_imports_without_the_bot() -> None:
    result = _run(ENGINE_ONLY)
    assert result.returncode == 0, result.stderr


def test_no_weights_or_images_are_tracked() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    heavy = [p for p in tracked if p.endswith((".ckpt", ".safetensors", ".pt", ".bin", ".png", ".db"))]
    assert not heavy
