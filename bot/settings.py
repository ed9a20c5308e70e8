"""Typed, validated settings.

``config.toml`` holds every setting with its default; the models below mirror it (a
test keeps the two in step). Loading fails at startup with a ``ConfigError`` that names
the table and key. Secrets never come from the file: they are read from ``ATELIER_*``
environment variables by ``load_settings`` (the only place that reads the environment).
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

LOCALES = ("en", "zh-CN")
ENV_PREFIX = "ATELIER_"


class ConfigError(Exception):
    """A bad configuration file or value; the message names the table and key."""


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BotSettings(_Table):
    locale: Literal["en", "zh-CN"] = "en"
    data_dir: Path = Path("data")
    images_dir: str = ""

    @property
    def images_path(self) -> Path:
        return Path(self.images_dir) if self.images_dir else self.data_dir / "images"


class DatabaseSettings(_Table):
    url: str = ""
    auto_upgrade: bool = True
    echo: bool = False


_DEVICE = r"^(auto|cpu|cuda|cuda:\d+)$"


class EngineSettings(_Table):
    device: str = Field("auto", pattern=_DEVICE)
    # one worker per device, each with its own loaded checkpoints; () = ``device`` alone
    devices: tuple[Annotated[str, Field(pattern=_DEVICE)], ...] = ()
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    models_dir: Path = Path("data/models")
    default_checkpoint: str = "tiny"
    tokenizer_dir: str = ""
    max_loaded: int = Field(2, ge=1)
    memory_mode: Literal["normal", "medvram", "lowvram"] = "normal"
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    no_half_vae: bool = False
    vae_tiling_pixels: int = Field(0, ge=0)
    memory_budget_gb: float = Field(0.0, ge=0)
    oom_retry: bool = True
    preview_every: int = Field(5, ge=0, le=1000)
    warm_up: bool = True  # load and warm default_checkpoint on every device at start
    compile: bool = False  # torch.compile the UNet (normal memory mode; each new shape compiles once)
    channels_last: bool = False  # the UNet's weights in channels-last layout


class DefaultsSettings(_Table):
    sampler: str = "Euler a"
    scheduler: str = "Automatic"
    steps: int = 20
    cfg_scale: int | float = 7
    image_cfg_scale: int | float = 1.5  # instruct-pix2pix checkpoints' "Image CFG scale"
    width: int = 512
    height: int = 512
    negative_prompt: str = ""
    clip_skip: int = 1
    rng: Literal["CPU", "GPU", "NV"] = "CPU"
    ensd: int = 0
    # A1111's sampler settings; 0 for s_tmax and the schedule values means "not set"
    s_churn: float = Field(0.0, ge=0)
    s_tmin: float = Field(0.0, ge=0)
    s_tmax: float = Field(0.0, ge=0)
    s_noise: float = Field(1.0, ge=0)
    schedule_sigma_min: float = Field(0.0, ge=0)
    schedule_sigma_max: float = Field(0.0, ge=0)
    schedule_rho: float = Field(0.0, ge=0)
    noise_multiplier: float = Field(1.0, ge=0)
    extra_noise: float = Field(0.0, ge=0)
    eta_ancestral: float = Field(1.0, ge=0, le=1)
    eta_ddim: float = Field(0.0, ge=0, le=1)
    uni_pc_variant: Literal["bh1", "bh2"] = "bh1"
    uni_pc_order: int = Field(3, ge=1, le=50)
    uni_pc_skip_type: Literal["time_uniform", "time_quadratic", "logSNR"] = "time_uniform"
    uni_pc_lower_order_final: bool = True
    s_min_uncond: float = Field(0.0, ge=0)
    s_min_uncond_all: bool = False
    skip_early_cond: float = Field(0.0, ge=0, le=1)
    pad_cond_uncond: bool = False
    pad_cond_uncond_v0: bool = False
    downcast_alphas_cumprod: bool = False
    batch_size: int = 1
    count: int = 1


class LimitsSettings(_Table):
    min_steps: int = Field(1, ge=1)
    max_steps: int = Field(150, ge=1)
    min_cfg: float = 1.0
    max_cfg: float = 30.0
    min_size: int = Field(64, ge=8)
    max_size: int = Field(2048, ge=8)
    max_pixels: int = Field(1048576, ge=64)
    max_hires_pixels: int = Field(4194304, ge=64)
    max_batch_size: int = Field(8, ge=1)
    max_count: int = Field(8, ge=1)
    max_prompt_length: int = Field(2000, ge=1)
    max_clip_skip: int = Field(12, ge=1)
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> LimitsSettings:
        if self.min_steps > self.max_steps:
            raise ValueError("min_steps must not exceed max_steps")
        if self.min_cfg > self.max_cfg:
            raise ValueError("min_cfg must not exceed max_cfg")
        if self.min_size > self.max_size:
            raise ValueError("min_size must not exceed max_size")
        return self


MAX_REPLAY_HOURS = 720  # 30 days


class QueueSettings(_Table):
    # "local": jobs run in this process; "procrastinate": this process enqueues in
    # PostgreSQL and ``atelier worker`` processes (on any host) run the jobs
    backend: Literal["local", "procrastinate"] = "local"
    # where a worker puts finished images: "database" (any host can read them),
    # "directory" ([bot] images_dir, which must then be one folder shared by all hosts) or
    # "s3" (an S3-compatible bucket, ``[s3]``; with either backend)
    image_store: Literal["database", "directory", "s3"] = "database"
    max_attempts: int = Field(3, ge=1)
    lease_seconds: float = Field(30, ge=1)
    # micro-batching: compatible jobs of any users share one UNet batch of at most
    # ``max_batch`` images; a batch that is not full waits at most ``batch_window_ms``
    max_batch: int = Field(8, ge=1, le=64)
    batch_window_ms: float = Field(50, ge=0, le=5000)
    # at start (and when the relay listens again), the ends of jobs that ended this many
    # hours ago at most and never reached their chat are shown; 0 turns it off
    replay_hours: float = 24

    @field_validator("replay_hours")
    @classmethod
    def _replay_hours(cls, value: float) -> float:
        if not 0 <= value <= MAX_REPLAY_HOURS:
            raise ValueError(f"must be 0-{MAX_REPLAY_HOURS} (hours; 0 turns the replay off), got {value:g}")
        return value


class S3Settings(_Table):
    """``[s3]``: the bucket of ``[queue] image_store = "s3"``, addressed path-style
    (``<endpoint_url>/<bucket>/<prefix><path>``), which every S3-compatible service
    accepts. The keys come from the environment only (``ATELIER_S3_ACCESS_KEY_ID``,
    ``ATELIER_S3_SECRET_ACCESS_KEY``)."""

    endpoint_url: str = ""
    bucket: str = ""
    region: str = "us-east-1"
    prefix: str = "images/"

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        scheme, _, rest = value.partition("://")
        host = rest.split("/", 1)[0]
        if value and (scheme not in ("http", "https") or not host or any(c in value for c in "?# ")):
            raise ValueError('must be an http:// or https:// URL, e.g. "http://127.0.0.1:9000"')
        return value.rstrip("/")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", value):
            raise ValueError("must be a bucket name: 2-255 letters, digits, dots, hyphens or underscores")
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9-]+", value):
            raise ValueError('must be a region name such as "us-east-1" (also for services without regions)')
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value.startswith("/") or any(c.isspace() for c in value):
            raise ValueError('must not start with "/" or hold spaces, e.g. "images/"')
        return value


class PluginsSettings(BaseModel):
    """``disabled`` plus one ``[plugins.<name>]`` table per plugin, validated by that plugin."""

    model_config = ConfigDict(extra="allow", frozen=True)
    disabled: tuple[str, ...] = ()

    def table(self, name: str) -> dict[str, Any]:
        value = (self.model_extra or {}).get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"[plugins.{name}] must be a table")
        return value


class ChatSettings(_Table):
    enabled: bool = True


class TelegramSettings(ChatSettings):
    """``[telegram]``: where the bot answers, who moderates, and how updates arrive."""

    allowed_chats: tuple[
        int, ...
    ] = ()  # chat ids the bot answers in (a private chat's id is the user's); () = all
    moderators: tuple[
        int, ...
    ] = ()  # Telegram user ids that moderate everywhere (chat admins do in their chat)
    webhook_url: str = ""  # receive updates at this public https URL instead of long polling
    webhook_listen: str = "127.0.0.1"
    webhook_port: int = Field(8443, ge=1, le=65535)
    poll_timeout: int = Field(30, ge=0, le=50)  # seconds one getUpdates long poll may wait


class DiscordSettings(ChatSettings):
    """``api_base``/``gateway_url``: a Discord REST proxy (or a test server) instead of
    Discord's own; also ``ATELIER_DISCORD_API_BASE``/``ATELIER_DISCORD_GATEWAY_URL``.
    ``allowed_guilds``: the servers the bot answers in (empty: all; DMs always).
    ``moderator_roles``: role ids whose members are moderators, beside administrators and
    members with Manage Server."""

    api_base: str = ""  # "" = Discord's own
    gateway_url: str = ""
    allowed_guilds: tuple[str, ...] = ()
    moderator_roles: tuple[str, ...] = ()

    @field_validator("allowed_guilds", "moderator_roles", mode="before")
    @classmethod
    def _ids(cls, value: Any) -> Any:
        # snowflakes are written as numbers or strings in TOML; kept as strings
        return tuple(str(v) for v in value) if isinstance(value, list | tuple) else value


class Secrets(BaseModel):
    """Read from the environment only; never printed."""

    model_config = ConfigDict(frozen=True)
    discord_token: str | None = Field(None, repr=False)
    telegram_token: str | None = Field(None, repr=False)
    telegram_base_url: str | None = None  # a self-hosted Bot API server (or a test's fake)
    telegram_base_file_url: str | None = None
    telegram_webhook_secret: str | None = Field(None, repr=False)
    database_url: str | None = Field(None, repr=False)
    s3_access_key_id: str | None = Field(None, repr=False)
    s3_secret_access_key: str | None = Field(None, repr=False)


class Settings(_Table):
    bot: BotSettings = BotSettings()
    database: DatabaseSettings = DatabaseSettings()
    engine: EngineSettings = EngineSettings()
    defaults: DefaultsSettings = DefaultsSettings()
    limits: LimitsSettings = LimitsSettings()
    queue: QueueSettings = QueueSettings()
    plugins: PluginsSettings = PluginsSettings()
    discord: DiscordSettings = DiscordSettings()
    telegram: TelegramSettings = TelegramSettings()
    s3: S3Settings = S3Settings()
    secrets: Secrets = Field(Secrets(), exclude=True)
    # plugin_config's answers by (name, model): the plugins table they were read from, and
    # the config (settings never change: a copy with other plugins reads its own)
    _plugin_configs: dict[tuple[str, type[BaseModel]], tuple[PluginsSettings, BaseModel]] = PrivateAttr(
        default_factory=dict
    )

    @property
    def database_url(self) -> str:
        """The effective URL: the environment's, else the file's, else SQLite in the data dir."""
        url = self.secrets.database_url or self.database.url
        if url:
            return url
        return f"sqlite+aiosqlite:///{(self.bot.data_dir / 'atelier.db').resolve()}"

    def plugin_config(self, name: str, model: type[BaseModel]) -> BaseModel:
        """Validate ``[plugins.<name>]`` with the plugin's own model (extra keys forbidden),
        once: plugins ask on every request."""
        configs = self.__pydantic_private__["_plugin_configs"]  # (the attribute's slow path skipped)
        known = configs.get((name, model))
        if known is not None and known[0] is self.plugins:
            return known[1]
        try:
            config = model.model_validate(self.plugins.table(name))
        except ValidationError as exc:
            raise ConfigError(_describe(exc, prefix=f"plugins.{name}")) from None
        configs[(name, model)] = (self.plugins, config)
        return config


def _describe(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        if prefix:
            loc = prefix.split(".") + loc
        table, key = (".".join(loc[:-1]), loc[-1]) if len(loc) > 1 else ("", loc[0] if loc else "")
        where = f"[{table}] {key}" if table else key
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{where}: {message}")
    return "invalid configuration: " + "; ".join(lines)


def secrets_from_env(environ: dict[str, str] | os._Environ[str]) -> Secrets:
    def get(name: str) -> str | None:
        return environ.get(ENV_PREFIX + name) or None

    return Secrets(
        discord_token=get("DISCORD_TOKEN"),
        telegram_token=get("TELEGRAM_TOKEN"),
        telegram_base_url=get("TELEGRAM_BASE_URL"),
        telegram_base_file_url=get("TELEGRAM_BASE_FILE_URL"),
        telegram_webhook_secret=get("TELEGRAM_WEBHOOK_SECRET"),
        database_url=get("DATABASE_URL"),
        s3_access_key_id=get("S3_ACCESS_KEY_ID"),
        s3_secret_access_key=get("S3_SECRET_ACCESS_KEY"),
    )


def parse_settings(data: dict[str, Any], secrets: Secrets | None = None) -> Settings:
    """Validate a parsed TOML document; raises ConfigError naming the table and key."""
    for (table, forbidden), variable in SECRET_KEYS.items():
        if forbidden in data.get(table, {}):
            raise ConfigError(
                f"[{table}] {forbidden}: secrets are not read from the file; "
                f"set {variable} in the environment"
            )
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    problems = defaults_problems(settings.defaults, settings.limits)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return settings.model_copy(update={"secrets": secrets or Secrets()})


# secrets a user may write in the file (table, key), and the variables they belong in
_DISCORD, _TELEGRAM = f"{ENV_PREFIX}DISCORD_TOKEN", f"{ENV_PREFIX}TELEGRAM_TOKEN"
_S3_KEY, _S3_SECRET = f"{ENV_PREFIX}S3_ACCESS_KEY_ID", f"{ENV_PREFIX}S3_SECRET_ACCESS_KEY"
SECRET_KEYS = {
    ("discord", "token"): _DISCORD,
    ("telegram", "token"): _TELEGRAM,
    ("bot", "token"): f"{_DISCORD} or {_TELEGRAM}",
    **{(table, "discord_token"): _DISCORD for table in ("discord", "telegram", "bot")},
    **{(table, "telegram_token"): _TELEGRAM for table in ("discord", "telegram", "bot")},
    **{("s3", key): _S3_KEY for key in ("access_key_id", "aws_access_key_id", "access_key")},
    **{("s3", key): _S3_SECRET for key in ("secret_access_key", "aws_secret_access_key", "secret_key")},
}


def image_store_problem(settings: Settings) -> str | None:
    """``[queue] image_store = "s3"`` needs its bucket and the keys to it; every missing
    one is named."""
    if settings.queue.image_store != "s3":
        return None
    missing = [f"[s3] {key}" for key in ("endpoint_url", "bucket") if not getattr(settings.s3, key)]
    missing += [
        f"{ENV_PREFIX}{name.upper()} in the environment"
        for name in ("s3_access_key_id", "s3_secret_access_key")
        if not getattr(settings.secrets, name)
    ]
    if not missing:
        return None
    return '[queue] image_store: "s3" needs ' + ", ".join(missing)


def backend_problem(settings: Settings) -> str | None:
    """The procrastinate backend keeps its jobs in PostgreSQL: another database cannot run it."""
    if settings.queue.backend == "procrastinate" and not settings.database_url.startswith("postgresql"):
        return (
            '[queue] backend: "procrastinate" needs PostgreSQL; set ATELIER_DATABASE_URL '
            "(or [database] url) to a postgresql+asyncpg:// URL"
        )
    return None


def defaults_problems(defaults: DefaultsSettings, limits: LimitsSettings) -> list[str]:
    """``[defaults]`` must be a request the bot accepts: a default outside ``[limits]``
    would run unchecked (500 steps under a 150-step limit) or fail every /draw, and a
    size that is not a multiple of 8 would give images whose infotext names another size."""
    problems = []

    def within(key: str, value: float, low: float, high: float, limits_text: str) -> None:
        if not low <= value <= high:
            problems.append(f"[defaults] {key}: {value} is outside {low}-{high} ({limits_text})")

    within("steps", defaults.steps, limits.min_steps, limits.max_steps, "[limits] min_steps-max_steps")
    within("cfg_scale", defaults.cfg_scale, limits.min_cfg, limits.max_cfg, "[limits] min_cfg-max_cfg")
    within("image_cfg_scale", defaults.image_cfg_scale, 0, limits.max_cfg, "0-[limits] max_cfg")
    for key in ("width", "height"):
        value = getattr(defaults, key)
        within(key, value, limits.min_size, limits.max_size, "[limits] min_size-max_size")
        if value % 8:
            problems.append(f"[defaults] {key}: {value} is not a multiple of 8 (e.g. {value // 8 * 8})")
    if defaults.width * defaults.height > limits.max_pixels:
        problems.append(
            f"[defaults] width x height: {defaults.width * defaults.height} pixels is over "
            f"[limits] max_pixels = {limits.max_pixels}"
        )
    within("clip_skip", defaults.clip_skip, 1, limits.max_clip_skip, "1-[limits] max_clip_skip")
    within("batch_size", defaults.batch_size, 1, limits.max_batch_size, "1-[limits] max_batch_size")
    within("count", defaults.count, 1, limits.max_count, "1-[limits] max_count")
    if defaults.ensd < 0:
        problems.append(f"[defaults] ensd: {defaults.ensd} is negative")
    return problems


def load_settings(path: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Read the config file (``ATELIER_CONFIG``, else ./config.toml if present) and the environment."""
    env = os.environ if environ is None else environ
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = Path(env[ENV_PREFIX + "CONFIG"])
    if path is None and Path("config.toml").is_file():
        path = Path("config.toml")
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for name, key in (("DISCORD_API_BASE", "api_base"), ("DISCORD_GATEWAY_URL", "gateway_url")):
        if env.get(ENV_PREFIX + name):
            data.setdefault("discord", {})[key] = env[ENV_PREFIX + name]
    return parse_settings(data, secrets_from_env(env))
