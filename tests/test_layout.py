"""Boundaries of DESIGN.md: the core never imports a chat library, the engine never imports the bot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import importlib, pkgutil, sys
import bot, models, pipeline, plugins
ADAPTERS = ("bot.adapters.discord", "bot.adapters.telegram")  # the only homes of a chat library
checked = []

def check(package):  # walk_packages would import the adapters' packages to look inside
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name in ADAPTERS:
            continue
        module = importlib.import_module(info.name)
        checked.append(info.name)
        if info.ispkg:
            check(module)

for package in (bot, plugins, models, pipeline):
    check(package)
leaks = sorted(m for m in sys.modules if m.split(".")[0] in ("discord", "telegram"))
assert not leaks, leaks
assert {"bot.service", "bot.runner", "bot.delivery.layer", "plugins.variations", "models.store"} <= set(checked)
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
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_core_plugins_pipeline_and_models_never_import_a_chat_library() -> None:
    result = _run(CHECK)
    assert result.returncode == 0, result.stderr


def test_pipeline_imports_without_the_bot() -> None:
    result = _run(ENGINE_ONLY)
    assert result.returncode == 0, result.stderr


def test_no_weights_or_images_are_tracked() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    heavy = [p for p in tracked if p.endswith((".ckpt", ".safetensors", ".pt", ".bin", ".png", ".db"))]
    assert not heavy
