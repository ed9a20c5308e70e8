"""The plugin host: built-ins, the `atelier` entry-point group, disabling by name."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from bot.plugins import DEFAULT_PLUGINS, PluginError, build_plugin_manager, builtin_name, plugin_hooks


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An installed-looking distribution with an `atelier` entry point, on sys.path."""
    (tmp_path / "atelier_hello.py").write_text(
        textwrap.dedent(
            """
            from bot.hookspecs import hookimpl

            @hookimpl
            def register_negative_presets(register):
                register("hello", "goodbye")
            """
        ),
        encoding="utf-8",
    )
    dist = tmp_path / "atelier_hello-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: atelier-hello\nVersion: 1.0\n", encoding="utf-8"
    )
    (dist / "entry_points.txt").write_text("[atelier]\nhello = atelier_hello\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "hello"
    sys.modules.pop("atelier_hello", None)


def test_builtin_and_entry_point_plugins_are_listed_with_their_hooks(third_party: str) -> None:
    listing = dict(plugin_hooks(build_plugin_manager()))
    assert listing["generate"] == ["check_request", "plan_generation", "register_commands", "result_actions"]
    assert listing["hello"] == ["register_negative_presets"]


def test_plugins_are_disabled_by_name(third_party: str) -> None:
    pm = build_plugin_manager(disabled=["hello", *(builtin_name(m) for m in DEFAULT_PLUGINS)])
    assert pm.get_plugin("hello") is None and pm.get_plugin("generate") is None
    assert plugin_hooks(pm) == []


def test_a_broken_entry_point_fails_at_startup_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dist = tmp_path / "atelier_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: atelier-broken\nVersion: 1.0\n", encoding="utf-8"
    )
    (dist / "entry_points.txt").write_text("[atelier]\nbroken = no_such_module_xyz\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="plugin 'broken' \\(no_such_module_xyz\\) failed to load"):
        build_plugin_manager()


def test_one_manager_per_call() -> None:
    assert build_plugin_manager() is not build_plugin_manager()
