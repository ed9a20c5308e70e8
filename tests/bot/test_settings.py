from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bot.settings import ConfigError, Settings, image_store_problem, load_settings, parse_settings

ROOT = Path(__file__).resolve().parents[2]


def test_config_toml_lists_every_setting_with_its_default() -> None:
    data = tomllib.loads((ROOT / "config.toml").read_text(encoding="utf-8"))
    from_file = parse_settings(data).model_dump(mode="json")
    defaults = Settings().model_dump(mode="json")
    # [plugins.<name>] tables are the plugins' own: the test below checks them
    plugin_tables = {k for k in from_file["plugins"] if k != "disabled"}
    from_file["plugins"] = {k: v for k, v in from_file["plugins"].items() if k not in plugin_tables}
    assert from_file == defaults
    for table, values in defaults.items():
        if table == "plugins":
            continue
        assert set(data[table]) == set(values), table


def test_config_toml_lists_every_builtin_plugin_setting_with_its_default() -> None:
    from plugins.moderation import ModerationConfig
    from plugins.quotas import QuotasConfig

    settings = parse_settings(tomllib.loads((ROOT / "config.toml").read_text(encoding="utf-8")))
    for name, model in (("quotas", QuotasConfig), ("moderation", ModerationConfig)):
        table = settings.plugins.table(name)
        assert set(table) == set(model.model_fields), name
        assert settings.plugin_config(name, model) == model(), name


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"quotas": {"images": -1}}, "[plugins.quotas] images"),
        ({"quotas": {"period": "yearly"}}, "[plugins.quotas] period"),
        (
            {"quotas": {"roles": {"patron": {"imagez": 5}}}},
            "[plugins.quotas.roles.patron] imagez: unknown key",
        ),
        ({"moderation": {"blocked_patterns": ["(unclosed"]}}, "[plugins.moderation] blocked_patterns"),
        ({"moderation": {"nsfw": "sometimes"}}, "[plugins.moderation] nsfw"),
    ],
)
def test_bad_plugin_values_fail_naming_table_and_key(table: dict, expected: str) -> None:
    from plugins.moderation import ModerationConfig
    from plugins.quotas import QuotasConfig

    settings = parse_settings({"plugins": table})
    name = next(iter(table))
    with pytest.raises(ConfigError) as info:
        settings.plugin_config(name, QuotasConfig if name == "quotas" else ModerationConfig)
    assert expected in str(info.value)


def test_a_plugin_config_is_validated_once_and_a_copy_reads_its_own() -> None:
    from plugins.quotas import QuotasConfig

    settings = parse_settings({"plugins": {"quotas": {"images": 7}}})
    config = settings.plugin_config("quotas", QuotasConfig)
    assert config.images == 7 and settings.plugin_config("quotas", QuotasConfig) is config
    other = settings.model_copy(
        update={"plugins": parse_settings({"plugins": {"quotas": {"images": 9}}}).plugins}
    )
    assert other.plugin_config("quotas", QuotasConfig).images == 9
    assert settings.plugin_config("quotas", QuotasConfig).images == 7
    same = settings.model_copy(update={"secrets": settings.secrets})
    assert same.plugin_config("quotas", QuotasConfig).images == 7
    # a bad table fails on every ask, not only the first
    bad = parse_settings({"plugins": {"quotas": {"images": -1}}})
    for _ in range(2):
        with pytest.raises(ConfigError):
            bad.plugin_config("quotas", QuotasConfig)


def test_every_setting_has_a_comment() -> None:
    for line in (ROOT / "config.toml").read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith("#"):
            assert "#" in line.split("=", 1)[1], line


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"limits": {"max_steps": "abc"}}, "[limits] max_steps"),
        ({"limits": {"max_stepz": 3}}, "[limits] max_stepz: unknown key"),
        ({"engine": {"device": "tpu"}}, "[engine] device"),
        ({"bot": {"locale": "fr"}}, "[bot] locale"),
        ({"nonsense": {"a": 1}}, "nonsense: unknown key"),
        ({"limits": {"min_steps": 10, "max_steps": 5}}, "min_steps must not exceed max_steps"),
        ({"queue": {"image_store": "bucket"}}, "[queue] image_store"),
        ({"s3": {"endpoint_url": "s3.amazonaws.com"}}, "[s3] endpoint_url: Value error, must be an http://"),
        ({"s3": {"bucket": "my bucket"}}, "[s3] bucket"),
        ({"s3": {"prefix": "/images/"}}, "[s3] prefix"),
        ({"s3": {"region": ""}}, "[s3] region"),
        ({"s3": {"url": "http://x"}}, "[s3] url: unknown key"),
        ({"queue": {"replay_hours": -1}}, "[queue] replay_hours: Value error, must be 0-720 (hours; 0 turns"),
        ({"queue": {"replay_hours": 721}}, "got 721"),
    ],
)
def test_bad_values_fail_naming_table_and_key(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(data)
    assert expected in str(info.value)


def test_secrets_come_from_the_environment_only(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[discord]\ntoken = "abc"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="ATELIER_DISCORD_TOKEN"):
        load_settings(path, environ={})
    path.write_text('[bot]\nlocale = "zh-CN"\n', encoding="utf-8")
    env = {"ATELIER_DISCORD_TOKEN": "d", "ATELIER_DATABASE_URL": "postgresql+asyncpg://u:p@h/db"}
    settings = load_settings(path, environ=env)
    assert settings.bot.locale == "zh-CN"
    assert settings.secrets.discord_token == "d"
    assert settings.database_url == "postgresql+asyncpg://u:p@h/db"
    assert "d" not in repr(settings.secrets).replace("discord", "").replace("database", "")


def test_default_database_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    settings = parse_settings({"bot": {"data_dir": str(tmp_path)}})
    assert settings.database_url == f"sqlite+aiosqlite:///{tmp_path / 'atelier.db'}"


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[defaults]\nsteps = 9\n", encoding="utf-8")
    assert load_settings(environ={"ATELIER_CONFIG": str(path)}).defaults.steps == 9
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml", environ={})
    path.write_text("[defaults\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path, environ={})


S3_KEYS = {"ATELIER_S3_ACCESS_KEY_ID": "AKIDATELIER", "ATELIER_S3_SECRET_ACCESS_KEY": "s3-secret-value"}


def test_the_s3_store_needs_its_endpoint_bucket_and_keys_naming_each_missing_one(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[queue]\nimage_store = "s3"\n', encoding="utf-8")
    problem = image_store_problem(load_settings(path, environ={}))
    assert problem == (
        '[queue] image_store: "s3" needs [s3] endpoint_url, [s3] bucket, ATELIER_S3_ACCESS_KEY_ID in the '
        "environment, ATELIER_S3_SECRET_ACCESS_KEY in the environment"
    )
    path.write_text(
        '[queue]\nimage_store = "s3"\n[s3]\nendpoint_url = "http://127.0.0.1:9000/"\nbucket = "atelier"\n',
        encoding="utf-8",
    )
    env = {"ATELIER_S3_ACCESS_KEY_ID": "AKIDATELIER"}
    assert image_store_problem(load_settings(path, environ=env)) == (
        '[queue] image_store: "s3" needs ATELIER_S3_SECRET_ACCESS_KEY in the environment'
    )
    settings = load_settings(path, environ=S3_KEYS)
    assert image_store_problem(settings) is None
    assert settings.s3.endpoint_url == "http://127.0.0.1:9000" and settings.s3.prefix == "images/"
    assert settings.secrets.s3_secret_access_key == "s3-secret-value"
    assert "s3-secret-value" not in repr(settings) and "AKIDATELIER" not in repr(settings.secrets)
    assert image_store_problem(parse_settings({})) is None  # the other stores need none of it


@pytest.mark.parametrize(
    ("key", "variable"),
    [("secret_access_key", "ATELIER_S3_SECRET_ACCESS_KEY"), ("access_key_id", "ATELIER_S3_ACCESS_KEY_ID"),
     ("aws_secret_access_key", "ATELIER_S3_SECRET_ACCESS_KEY")],
)  # fmt: skip
def test_s3_keys_in_the_file_are_refused_naming_the_variable(tmp_path: Path, key: str, variable: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[s3]\nbucket = "atelier"\n{key} = "written down"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=S3_KEYS)
    assert str(info.value) == (
        f"[s3] {key}: secrets are not read from the file; set {variable} in the environment"
    )
    assert "written down" not in str(info.value)


def test_a_missing_bucket_stops_the_start_with_exit_2_naming_it(tmp_path: Path, capsys) -> None:
    from bot.cli import main

    config = tmp_path / "config.toml"
    config.write_text(
        f'[bot]\ndata_dir = "{tmp_path}"\n[queue]\nimage_store = "s3"\n'
        '[s3]\nendpoint_url = "http://127.0.0.1:9000"\n',
        encoding="utf-8",
    )
    assert main(["--config", str(config), "generate", "a cat", "-o", str(tmp_path / "cat.png")]) == 2
    err = capsys.readouterr().err
    assert '[queue] image_store: "s3" needs [s3] bucket' in err
    assert "ATELIER_S3_ACCESS_KEY_ID" in err and "ATELIER_S3_SECRET_ACCESS_KEY" in err
