"""Setting up the shared queue: what stops a start, what `atelier worker` says, and the
docker-compose set-up of docs/deploy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bot.app import build_app
from bot.cli import main
from bot.settings import ConfigError, image_store_problem, load_settings
from tests.conftest import make_settings

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy"


def test_the_shared_queue_on_sqlite_stops_the_start_naming_the_key(tmp_path, tiny_library) -> None:
    settings = make_settings(tmp_path, queue={"backend": "procrastinate"})
    with pytest.raises(ConfigError, match=r'\[queue\] backend: "procrastinate" needs PostgreSQL'):
        build_app(settings, library=tiny_library)


def test_a_worker_without_a_shared_queue_says_what_to_set(tmp_path, capsys) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[bot]\ndata_dir = "{tmp_path}"\n', encoding="utf-8")
    assert main(["--config", str(config), "worker"]) == 2
    err = capsys.readouterr().err
    assert '[queue] backend = "procrastinate"' in err and "atelier run" in err


def test_the_compose_set_up_runs_a_bot_and_draining_gpu_workers_on_postgres() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert services["db"]["image"].startswith("postgres:")
    assert services["bot"]["command"] == ["run"] and services["worker"]["command"] == ["worker"]
    assert services["worker"]["stop_signal"] == "SIGTERM"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for name in ("bot", "worker"):
        url = services[name]["environment"]["ATELIER_DATABASE_URL"]
        assert url.startswith("postgresql+asyncpg://") and "@db:5432/" in url
        assert "./config.toml:/etc/atelier/config.toml:ro" in services[name]["volumes"]
        for key in ("ATELIER_S3_ACCESS_KEY_ID", "ATELIER_S3_SECRET_ACCESS_KEY"):  # for an S3 image store
            assert services[name]["environment"][key] == f"${{{key}:-}}"
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert "ATELIER_CONFIG=/etc/atelier/config.toml" in dockerfile and "torchvision" not in dockerfile
    settings = load_settings(
        DEPLOY / "config.toml", environ={"ATELIER_DATABASE_URL": "postgresql+asyncpg://a@db/atelier"}
    )
    assert (settings.queue.backend, settings.queue.image_store) == ("procrastinate", "database")


def test_the_compose_config_turns_the_s3_image_store_on_by_its_commented_lines(tmp_path) -> None:
    text = (DEPLOY / "config.toml").read_text(encoding="utf-8")
    lines = text.split("# or keep them in an S3-compatible bucket", 1)[1].splitlines()[1:]
    uncommented = text.replace('image_store = "database"', "").rstrip() + "\n"
    uncommented += "\n".join(line.removeprefix("# ") for line in lines if line.startswith("# ")) + "\n"
    config = tmp_path / "config.toml"
    config.write_text(uncommented, encoding="utf-8")
    env = {
        "ATELIER_DATABASE_URL": "postgresql+asyncpg://a@db/atelier",
        "ATELIER_S3_ACCESS_KEY_ID": "minio",
        "ATELIER_S3_SECRET_ACCESS_KEY": "minio-secret",
    }
    settings = load_settings(config, environ=env)
    assert (settings.queue.image_store, settings.s3.endpoint_url, settings.s3.bucket) == (
        "s3",
        "http://minio:9000",
        "atelier",
    )
    assert image_store_problem(settings) is None
