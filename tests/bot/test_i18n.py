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


# Names that stay as they are in every language: products, formats, A1111's field and
# file names, and values a user types literally (none, reset, m/h/d/w, sizes as 512x768).
NAMES = {
    "A1111", "Atelier", "CFG", "CLIP", "Ctrl", "D", "DDIM", "Discord", "ENSD", "Euler", "GPU", "ID",
    "JPEG", "LoRA", "Model", "hash", "NSFW", "PNG", "UTF", "VAE", "WebP", "YYYY", "MM", "DD", "guild",
    "hypernet", "lora", "none", "reset", "pickle", "safetensors", "torch", "yaml", "zip", "telegram", "tiny",
    "name", "prompt", "negative", "style", "save", "steps", "cfg", "sampler",
}  # fmt: skip


def _english_left(text: str) -> list[str]:
    """The words of ``text`` in Latin letters once placeholders, commands with their
    examples, options, file and folder names, config keys and quoted examples are removed."""
    import re

    text = re.sub(r"\{\{?[^}]*\}?\}", "", text)
    text = re.sub(r"\"[^\"]*\"", "", text)
    text = re.sub(r"\[[a-z._]+\]\s*[a-z_]+", "", text)
    text = re.sub(r"/[a-z][\w-]*(?:[ \t][\x21-\x7e ]*?)?(?=[^\x00-\x7f]|$)", "", text)
    text = re.sub(r"--[\w-]+", "", text)
    text = re.sub(r"[\w.-]+\.(?:csv|json|png|yaml)\b|\b[\w-]+/", "", text)
    words = re.findall(r"[A-Za-z][A-Za-z0-9]*", text)
    return [w for w in words if w not in NAMES and len(w) > 1 and not re.fullmatch(r"x\d*", w)]


def test_every_message_renders_in_both_languages_with_no_english_left_in_chinese() -> None:
    t = default_translator()
    english = t.catalogs["en"]
    for key, template in english.items():
        params = {name: 12 for name in _fields(template)}
        for locale in ("en", "zh-CN"):
            text = t.t(locale, key, **params)
            assert text.strip() and "{" not in text.replace("{prompt}", ""), (locale, key, text)
        chinese = t.catalogs["zh-CN"][key]
        assert not _english_left(chinese), (key, _english_left(chinese))
        assert "编号" not in chinese, key  # one word for an id everywhere: ID


def test_numbers_with_units_read_naturally_when_a_limit_is_unlimited() -> None:
    t = default_translator()
    params = {
        "user": "console:alice",
        "period": Msg("quota.period.daily"),
        "images": Msg("quota.images_unlimited"),
        "used": 3,
        "reserved": 0,
        "seconds": Msg("quota.seconds_unlimited", {"used": 7.7}),
        "refill": "00:00",
    }
    en = t.t("en", "quota.status", **params)
    zh = t.t("zh-CN", "quota.status", **params)
    assert "unlimited s" not in en and "of unlimited" not in en and "7.7 s" in en, en
    assert "不限 秒" not in zh and "本天" not in zh and "今天" in zh and "7.7 秒" in zh, zh
    assert "unlimited" not in zh


async def test_quota_status_of_an_unlimited_budget_reads_naturally(make_app) -> None:
    from bot.types import Actor

    app = await make_app(plugins={"quotas": {"images": 0, "gpu_seconds": 0}})
    for locale, banned in (("en", ("unlimited s", "of unlimited")), ("zh-CN", ("不限 秒", "本天"))):
        actor = Actor(platform="console", user_id="alice", name="Alice", chat_id="c", locale=locale)
        (reply,) = await app.service.handle_line("/quota", actor)
        text = app.translator.t(locale, reply.key, **reply.params)
        assert not any(word in text for word in banned), text


def test_english_words_a_new_user_meets() -> None:
    t = default_translator()
    assert t.t("en", "error.missing_argument", name="show", what="ID", usage="/show ID") == (
        "/show needs an argument: ID. Usage: /show ID"
    )
    suggestion = Msg("error.did_you_mean", {"match": "Euler a"})
    text = t.t(
        "en", "error.unknown_sampler", name="euler_a", suggestion=suggestion, available="Euler a, Euler"
    )
    assert 'Unknown sampler "euler_a". Did you mean "Euler a"? Available:' in text
