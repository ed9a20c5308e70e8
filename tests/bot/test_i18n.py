from __future__ import annotations

import string

from bot.i18n import Msg, Translator, default_translator, load_catalogs, normalize_locale


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def test_catalogs_have_the_same_keys_and_placeholders() -> None:
    catalogs = load_catalogs()
    assert {"en", "zh-CN"} <= set(catalogs)
    english = catalogs["en"]
    for locale, catalog in catalogs.items():
        assert set(catalog) == set(english), locale
        for key, template in catalog.items():
            assert _fields(template) == _fields(english[key]), (locale, key)


def test_locale_normalisation_and_fallback() -> None:
    assert normalize_locale("zh_CN") == "zh-CN"
    assert normalize_locale("zh-TW") == "zh-CN"
    assert normalize_locale("en-US") == "en"
    assert normalize_locale(None) == "en"
    assert normalize_locale("fr") == "en"
    t = Translator({"en": {"a": "A {x}", "b": "B"}, "zh-CN": {"a": "甲 {x}"}})
    assert t.t("zh-CN", "a", x=1) == "甲 1"
    assert t.t("zh-CN", "b") == "B"
    assert t.t("en", "missing") == "missing"
    assert t.t("en", "a") == "A {x}"  # a missing parameter never crashes rendering


def test_nested_messages_render_in_the_same_locale() -> None:
    t = default_translator()
    suggestion = Msg("error.unknown_option.suggestion", {"match": "steps"})
    zh = t.t("zh-CN", "error.unknown_option", name="stpes", suggestion=suggestion, allowed="--steps")
    assert "是否想用 --steps" in zh
    en = t.t("en", "error.unknown_option", name="stpes", suggestion=suggestion, allowed="--steps")
    assert "did you mean --steps?" in en
