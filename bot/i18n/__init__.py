"""Message catalogs: English and Simplified Chinese at least.

Catalogs are JSON files beside this module, one per locale, loaded on first use. A
missing key in a locale falls back to English; a key missing everywhere renders as the
key itself (and a test keeps the catalogs complete).
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FALLBACK = "en"
_DIR = Path(__file__).parent


def clipped(text: str, limit: int) -> str:
    """``text`` as it fits in ``limit`` characters: cut where longer, an ellipsis last."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def normalize_locale(locale: str | None) -> str:
    """Map platform locales ("zh-cn", "zh_CN", "zh-TW", "en-US") onto a catalog name."""
    if not locale:
        return FALLBACK
    lowered = locale.replace("_", "-").lower()
    if lowered.startswith("zh"):
        return "zh-CN"
    if lowered.startswith("en"):
        return "en"
    return FALLBACK


@dataclass(frozen=True)
class Msg:
    """A message used as a parameter of another; rendered in the same locale."""

    key: str
    params: dict[str, Any] = field(default_factory=dict)


class _Lenient(string.Formatter):
    def get_value(self, key: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if isinstance(key, str) and key not in kwargs:
            return "{" + key + "}"
        return super().get_value(key, args, kwargs)


_FORMATTER = _Lenient()


class Translator:
    def __init__(self, catalogs: dict[str, dict[str, str]]) -> None:
        self.catalogs = catalogs

    @property
    def locales(self) -> list[str]:
        return sorted(self.catalogs)

    def t(self, locale: str | None, key: str, **params: Any) -> str:
        catalog = self.catalogs.get(normalize_locale(locale), {})
        template = catalog.get(key) or self.catalogs.get(FALLBACK, {}).get(key)
        if template is None:
            log.warning("missing message %r", key)
            return key
        rendered = {
            name: self.t(locale, value.key, **value.params) if isinstance(value, Msg) else value
            for name, value in params.items()
        }
        return _FORMATTER.format(template, **rendered)

    def has(self, key: str) -> bool:
        return key in self.catalogs.get(FALLBACK, {})


def load_catalogs(directory: Path = _DIR) -> dict[str, dict[str, str]]:
    return {
        path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(directory.glob("*.json"))
    }


@cache
def default_translator() -> Translator:
    return Translator(load_catalogs())
