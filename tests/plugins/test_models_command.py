"""/models lists what the models folder holds; /draw --vae picks a VAE file from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bot.commands import parse_args
from bot.draw import freeze, new_draft, options_from_request
from bot.errors import UserError
from bot.options import draw_options
from bot.types import Actor
from pipeline.checkpoints import CheckpointLibrary
from tests.conftest import make_settings
from tests.pipeline.crafted_files import (
    CreatesFile,
    hypernetwork_state,
    safetensors_header,
    torch_bytes,
    torchscript_bytes,
    trailing_end_record,
    write,
    write_embedding,
    write_hypernetwork,
    write_lora,
    write_tensors,
)

ALICE = Actor(platform="console", user_id="alice", name="Alice", locale="en", chat_id="c")
LORAS = ["detail", "style"]  # a LoRA in a subfolder is listed by its file name, as tags name it
LI = Actor(platform="console", user_id="li", name="Li", locale="zh-CN", chat_id="c")


def _populate(models: Path) -> None:
    """One small valid file of each kind (listing checks each file's format and layout)."""
    write_tensors(models / "VAE/b-vae.safetensors", {"decoder.conv_in.weight": torch.zeros(2)})
    write(models / "VAE/A.vae.pt", torch_bytes({"state_dict": {"decoder.conv_in.weight": torch.zeros(2)}}))
    write_lora(models / "Lora/style.safetensors")
    write_lora(models / "Lora/sub/detail.pt")
    write_hypernetwork(models / "hypernetworks/anime.pt")
    for name in ("bad-hands.pt", "easy2.safetensors", "easy10.safetensors"):
        write_embedding(models / "embeddings" / name)


async def test_models_lists_every_kind(make_app, tmp_path):
    _populate(tmp_path / "models")
    app = await make_app()
    [reply] = await app.service.handle_line("/models", ALICE)
    assert not reply.error
    data = reply.data
    assert data["checkpoints"] == ["tiny"]
    assert data["default_checkpoint"] == "tiny"
    assert data["vaes"] == ["A.vae", "b-vae"]
    assert sorted(data["loras"]) == LORAS
    assert data["hypernetworks"] == ["anime"]
    assert data["embeddings"] == ["bad-hands", "easy2", "easy10"]
    text = app.translator.t("en", reply.key, **reply.params)
    assert "tiny *" in text
    assert "VAEs: A.vae, b-vae" in text
    assert "Hypernetworks: anime" in text
    assert "Embeddings: bad-hands, easy2, easy10" in text
    zh = app.translator.t("zh-CN", reply.key, **reply.params)
    assert "超网络：anime" in zh


async def test_models_on_an_empty_folder(make_app):
    app = await make_app()
    reply, _missing = await app.service.handle_line("/models", LI)
    assert reply.data["vaes"] == [] and reply.data["loras"] == [] and reply.data["embeddings"] == []
    text = app.translator.t(LI.locale, reply.key, **reply.params)
    assert "VAE：-" in text


async def test_models_shows_known_hashes(make_app, tmp_path):
    models = tmp_path / "models" / "Stable-diffusion"
    write_tensors(models / "junk.safetensors", {"not.a.model": torch.zeros(4)})
    app = await make_app()
    library = CheckpointLibrary(tmp_path / "models")
    library.lookup("deadbeef00")  # a hash-looking text makes it hash every checkpoint
    app.library = library
    [reply] = await app.service.handle_line("/models", ALICE)
    hashes = reply.data["checkpoint_hashes"]
    assert set(hashes) == {"junk"} and len(hashes["junk"]) == 10
    assert f"junk [{hashes['junk']}]" in reply.params["checkpoints"]


async def test_draw_refuses_an_unknown_vae(make_app):
    app = await make_app()
    [reply] = await app.service.handle_line("/draw a cat --vae nope", ALICE)
    assert reply.error and reply.key == "error.unknown_network"
    assert reply.params["kind"] == "VAE" and reply.params["name"] == "nope"
    assert app.translator.t("en", reply.key, **reply.params) == 'Unknown VAE "nope". Available: -'


def _freeze_options(tmp_path: Path, prompt: str, options: dict):
    settings = make_settings(tmp_path)
    draft = new_draft(prompt, options, settings)
    return freeze(draft, ALICE, settings, CheckpointLibrary(tmp_path / "models"))


def _freeze(tmp_path: Path, line: str):
    parsed = parse_args(line)
    options = draw_options().convert(parsed, make_settings(tmp_path).limits)
    return _freeze_options(tmp_path, parsed.text, options)


def test_draw_vae_goes_into_the_request_and_round_trips(tmp_path):
    _populate(tmp_path / "models")
    request = _freeze(tmp_path, "a cat --vae a.VAE.pt").generation
    assert request.vae == "A.vae"  # the canonical name, whatever case or extension was typed
    options = options_from_request(request)
    assert options["vae"] == "A.vae"
    assert _freeze_options(tmp_path, request.prompt, options).generation == request
    assert _freeze(tmp_path, "a cat --sd-vae b-vae.safetensors").generation.vae == "b-vae"
    assert _freeze(tmp_path, "a cat").generation.vae is None


def test_draw_unknown_vae_names_the_available_ones(tmp_path):
    _populate(tmp_path / "models")
    with pytest.raises(UserError) as info:
        _freeze(tmp_path, "a cat --vae missing")
    assert info.value.key == "error.unknown_network"
    assert info.value.params == {"kind": "VAE", "name": "missing", "available": "A.vae, b-vae"}


def _bad_files(models: Path, marker: Path) -> dict[str, str]:
    """One unusable file per folder; name -> a phrase its English line must contain."""
    write(models / "Stable-diffusion/deep.safetensors", safetensors_header(b"[" * 200_000))
    write_tensors(models / "Stable-diffusion/with-yaml.safetensors", {"x": torch.zeros(1)})
    write(models / "Stable-diffusion/with-yaml.yaml", b"model: [unclosed")
    write(models / "VAE/evil.pt", torch_bytes({"x": CreatesFile(marker)}))
    write(models / "Lora/script.pt", trailing_end_record(torchscript_bytes(marker)))
    huge = hypernetwork_state()
    huge[8192] = huge.pop(32)
    write(models / "hypernetworks/huge.pt", torch_bytes(huge))
    write(models / "embeddings/two.pt", torch_bytes({"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)}))
    return {
        "Stable-diffusion/deep.safetensors": "refused as unsafe or malformed (its header is nested 200000 levels",
        "Stable-diffusion/with-yaml.yaml": "not a usable checkpoint config (.yaml) (it is not valid YAML",
        "Stable-diffusion/with-yaml.safetensors": "skipped because Stable-diffusion/with-yaml.yaml beside it",
        "VAE/evil.pt": "refused as unsafe or malformed (it references the global io.open, which is not allowed)",
        "Lora/script.pt": "refused as unsafe or malformed (22 bytes follow the zip end record)",
        "hypernetworks/huge.pt": "not a usable hypernetwork (hypernetwork width must be 1-4096, got 8192)",
        "embeddings/two.pt": "not a usable embedding (a diffusers embedding must hold exactly one tensor",
    }


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
async def test_models_lists_skipped_files_with_reasons_in_both_languages(make_app, tmp_path):
    models = tmp_path / "models"
    _populate(models)
    marker = tmp_path / "marker.txt"
    expected = _bad_files(models, marker)
    app = await make_app(models_dir=models)
    listing, skipped = await app.service.handle_line("/models", ALICE)
    # The usable files are still listed; the bad ones only among the skipped.
    assert listing.data["vaes"] == ["A.vae", "b-vae"] and sorted(listing.data["loras"]) == LORAS
    assert listing.data["hypernetworks"] == ["anime"] and "two" not in listing.data["embeddings"]
    assert sorted(entry["name"] for entry in listing.data["unreadable"]) == sorted(expected)
    english = app.translator.t("en", skipped.key, **skipped.params)
    assert english.startswith("Skipped 7 file(s) that will not be loaded:")
    for name, phrase in expected.items():
        assert f"• {name}: {phrase}" in english, (name, english)
    assert "Only .safetensors files and torch state-dict files" in english
    [_listing, skipped_zh] = await app.service.handle_line("/models", LI)
    chinese = app.translator.t(LI.locale, skipped_zh.key, **skipped_zh.params)
    assert chinese.startswith("跳过了 7 个不会加载的文件")
    assert "• hypernetworks/huge.pt：不是可用的超网络（hypernetwork width must be 1-4096" in chinese
    assert "• VAE/evil.pt：不安全或格式错误，已拒绝" in chinese
    assert (
        "• Stable-diffusion/with-yaml.safetensors：已跳过，因为同目录的 Stable-diffusion/with-yaml.yaml"
        in chinese
    )
    assert not marker.exists()
