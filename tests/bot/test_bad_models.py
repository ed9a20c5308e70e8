"""Bad model input through the bot: unknown or malformed network names, corrupt or unsafe
files, a missing models folder, engine refusals. Each gets a clear, translated message,
nothing half-done is stored, and the next request is served."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bot.types import Actor
from pipeline.checkpoints import CheckpointLibrary
from tests.conftest import EventLog
from tests.pipeline.a1111_layout import pipeline_to_a1111
from tests.pipeline.crafted_files import (
    LORA_KEY,
    hypernetwork_state,
    pickled_str,
    repickled,
    safetensors_header,
    torch_bytes,
    torchscript_bytes,
    trailing_end_record,
    write,
    write_embedding,
    write_lora,
    write_tensors,
)

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
LI = Actor(platform="console", user_id="li", name="Li", locale="zh-CN", chat_id="c")
MOD = Actor(platform="console", user_id="mod", name="Mod", chat_id="c")
MODERATION = {"moderation": {"moderators": ["console:mod"]}}


class _CreatesFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _text(app, reply, locale: str = "en") -> str:
    return app.translator.t(locale, reply.key, **reply.params)


async def _app_with_library(make_app, models: Path, **tables):
    return await make_app(models_dir=models, **tables)


async def _rows(app) -> int:
    return sum((await app.store.count_by_status()).values())


async def _finishes(app, log: EventLog, line: str, actor: Actor = ALICE) -> str:
    [accepted] = await app.service.handle_line(line, actor)
    assert not accepted.error, accepted
    (job,) = accepted.data["jobs"]
    await log.wait_for(lambda: log.of("finished", job) or log.of("failed", job))
    assert log.of("finished", job), log.of("failed", job)
    return job


async def test_unknown_and_malformed_network_tags_are_refused_before_anything_is_stored(
    make_app, tmp_path
) -> None:
    models = tmp_path / "models"
    (models / "Lora").mkdir(parents=True)
    pipe = CheckpointLibrary(None).load("tiny")
    key = next(k for k in _kohya_keys(pipe))
    save_file(
        {f"{key}.lora_down.weight": torch.zeros(2, 32), f"{key}.lora_up.weight": torch.zeros(32, 2)},
        str(models / "Lora" / "detail.safetensors"),
    )
    app = await _app_with_library(make_app, models)
    log = EventLog(app)
    [reply] = await app.service.handle_line("/draw a cat <lora:detial:0.8>", ALICE)
    assert reply.error and reply.key == "error.unknown_network"
    assert _text(app, reply) == 'Unknown lora "detial". Available: detail'
    [reply] = await app.service.handle_line("/draw a cat <hypernet:nope>", LI)
    assert reply.error and "nope" in _text(app, reply, "zh-CN")
    [reply] = await app.service.handle_line("/draw a cat <lora:detail:lots>", ALICE)
    assert reply.error and reply.key == "error.network_tag" and "lots" in _text(app, reply)
    [reply] = await app.service.handle_line("/draw a cat --hires --hr-prompt 'x <lora:gone>'", ALICE)
    assert reply.error and reply.params["name"] == "gone"
    assert await _rows(app) == 0
    await _finishes(app, log, "/draw a cat <lora:DETAIL:0.5> --steps 2")


async def test_a_draws_networks_are_resolved_once_and_recorded_on_its_row(
    make_app, tmp_path, monkeypatch
) -> None:
    """/draw scans the Lora folder once and records what each tag resolved to; the engine
    loads that file without scanning or resolving the name again."""
    from pipeline import networks

    models = tmp_path / "models"
    write_lora(models / "Lora" / "styles" / "Detail.safetensors")
    app = await _app_with_library(make_app, models)
    log = EventLog(app)
    scans = []
    original = networks._scan
    monkeypatch.setattr(
        networks, "_scan", lambda folder, ext: scans.append(folder.name) or original(folder, ext)
    )
    job = await _finishes(app, log, "/draw a cat <lora:detail:0.5> --hires --hr-scale 1.25 --steps 2")
    assert scans == ["Lora"]
    record = await app.store.get(job)
    assert record.request.network_files == {"lora:detail": "styles/Detail.safetensors"}
    infotext = log.of("finished", job)[0].images[0].infotext
    assert 'Lora hashes: "detail: ' in infotext


def _kohya_keys(pipe):
    from pipeline.networks import kohya_targets

    return [k for k, (module, part) in kohya_targets(pipe).items() if module.weight.shape[1] == 32 and part]


async def test_corrupt_checkpoint_and_network_files_are_refused_and_the_next_job_runs(
    make_app, tmp_path
) -> None:
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "Lora").mkdir()
    (models / "Stable-diffusion" / "broken.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{not json")
    (models / "Lora" / "torn.safetensors").write_bytes(b"\xff" * 16)
    victim = tmp_path / "pwned.txt"
    with open(models / "Lora" / "evil.pt", "wb") as stream:
        pickle.dump({"x": _CreatesFile(str(victim))}, stream)
    app = await _app_with_library(make_app, models)
    log = EventLog(app)
    # A checkpoint the scan skipped is refused at once, with the reason, and nothing is stored.
    [broken] = await app.service.handle_line("/draw a cat --checkpoint broken --steps 2", ALICE)
    assert broken.error and broken.key == "error.unsafe_checkpoint"
    assert broken.params["name"] == "broken.safetensors" and "not valid JSON" in broken.params["reason"]
    assert await _rows(app) == 0
    failures = []
    for line in ("/draw a cat <lora:torn> --steps 2", "/draw a cat <lora:evil> --steps 2"):
        [accepted] = await app.service.handle_line(line, ALICE)
        (job,) = accepted.data["jobs"]
        await log.wait_for(lambda job=job: log.of("failed", job))
        failures.append(log.of("failed", job)[0])
    torn, evil = failures
    assert torn.key == "error.unsafe_checkpoint" and torn.params["name"] == "torn.safetensors"
    assert evil.key == "error.unsafe_checkpoint" and evil.params["name"] == "evil.pt"
    assert "not allowed" in app.translator.t("zh-CN", evil.key, **evil.params)
    assert not victim.exists()
    record = await app.store.get(evil.generation_id)
    assert record.status == "failed" and "evil.pt" in record.error
    await _finishes(app, log, "/draw a cat --steps 2")


async def test_a_missing_models_folder_is_reported_and_the_builtin_model_still_draws(
    make_app, tmp_path, caplog
) -> None:
    app = await make_app(models_dir=tmp_path / "nowhere")
    assert f"models folder {tmp_path / 'nowhere'} does not exist" in caplog.text
    listing, missing = await app.service.handle_line("/models", ALICE)
    assert listing.data["checkpoints"] == ["tiny"]
    assert missing.key == "models.folder_missing" and missing.params["path"] == str(tmp_path / "nowhere")
    assert "does not exist" in _text(app, missing) and "不存在" in _text(app, missing, "zh-CN")
    await _finishes(app, EventLog(app), "/draw a cat --steps 2")


async def test_models_refresh_is_for_moderators_and_finds_new_files(make_app, tmp_path) -> None:
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    app = await _app_with_library(make_app, models, plugins=MODERATION)
    [denied] = await app.service.handle_line("/models refresh", ALICE)
    assert denied.error and denied.key == "error.moderators_only"
    [bad] = await app.service.handle_line("/models reload", MOD)
    assert bad.error and bad.key == "error.unknown_subcommand" and bad.params["allowed"] == "list, refresh"
    assert app.library.names() == ["tiny"]
    tiny = CheckpointLibrary(None).load("tiny")
    save_file(pipeline_to_a1111(tiny), str(models / "Stable-diffusion" / "fresh.safetensors"))
    write_lora(models / "Lora" / "new.safetensors")
    [done] = await app.service.handle_line("/models refresh", MOD)
    assert not done.error and done.params["checkpoints"] == 2 and done.params["loras"] == 1
    assert "fresh" in done.data["checkpoints"]
    assert "2 checkpoint(s)" in _text(app, done) and "2 个模型" in _text(app, done, "zh-CN")


async def test_an_engine_refusal_is_translated_and_the_next_job_runs(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    [accepted] = await app.service.handle_line("/draw a cat --clip-skip 12 --steps 2", ALICE)
    (job,) = accepted.data["jobs"]
    await log.wait_for(lambda: log.of("failed", job))
    [failed] = log.of("failed", job)
    assert failed.key == "error.invalid_request" and "clip skip" in failed.params["detail"]
    assert app.translator.t("zh-CN", failed.key, **failed.params).startswith("引擎拒绝了此请求")
    await _finishes(app, log, "/draw a cat --steps 2")


# --- a bad file must not stop the bot ---------------------------------------------------------

# Each alone in its folder; the name /models reports it under (None: a readable file).
ONE_BAD_FILE = {
    "a header of 200,000 [": ("Stable-diffusion/deep.safetensors", safetensors_header(b"[" * 200_000)),
    "a shape that is a number": (
        "Stable-diffusion/shape.safetensors",
        safetensors_header({"w": {"dtype": "F32", "shape": 5, "data_offsets": [0, 4]}}, b"\0" * 4),
    ),
    "a 0-d cross-attention weight": (
        None,
        safetensors_header(
            {
                "model.diffusion_model.x.attn2.to_k.weight": {
                    "dtype": "F32",
                    "shape": [],
                    "data_offsets": [0, 4],
                }
            },
            b"\0" * 4,
        ),
    ),
    "a malformed .yaml": ("Stable-diffusion/model.yaml", b"model: {params: [}"),
    "a .yaml that is not UTF-8": ("Stable-diffusion/model.yaml", b"model:\n  target: \xff\xfe\n"),
    "a TorchScript VAE": ("VAE/script.pt", b"torchscript"),
    "a LoRA that is not one": (
        "Lora/empty.safetensors",
        safetensors_header({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
    ),
    "a hypernetwork pickle calling open": ("hypernetworks/evil.pt", b"pickle"),
    "an embedding of the wrong shape": ("embeddings/cube.pt", b"cube"),
}


def _bad_file_bytes(kind: bytes, marker: Path) -> bytes:
    if kind == b"torchscript":
        return trailing_end_record(torchscript_bytes(marker))
    if kind == b"pickle":
        return torch_bytes({"layer_structure": [1, 2, 1], "hook": _CreatesFile(str(marker))})
    if kind == b"cube":
        return torch_bytes({"emb_params": torch.zeros(2, 3, 32)})
    return kind


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("case", list(ONE_BAD_FILE))
async def test_one_bad_file_does_not_stop_draw_or_models(make_app, tmp_path, case) -> None:
    reported, data = ONE_BAD_FILE[case]
    models = tmp_path / "models"
    marker = tmp_path / "marker.txt"
    if reported is None:
        write(models / "Stable-diffusion" / "odd.safetensors", data)
    else:
        write(models / reported, _bad_file_bytes(data, marker))
        if reported.endswith(".yaml"):
            write_tensors(models / "Stable-diffusion" / "model.safetensors", {"x": torch.zeros(1)})
    app = await _app_with_library(make_app, models, plugins=MODERATION)
    log = EventLog(app)
    await _finishes(app, log, "/draw a cat --checkpoint tiny --steps 2")
    for line, actor in (("/models", ALICE), ("/models refresh", MOD)):
        replies = await app.service.handle_line(line, actor)
        assert not any(reply.error for reply in replies), replies
        listed = [entry["name"] for entry in replies[0].data["unreadable"]]
        if reported is None:
            assert listed == [] and "odd" in replies[0].data["checkpoints"]
        else:
            assert reported in listed
            assert reported in _text(app, replies[1]) and reported in _text(app, replies[1], "zh-CN")
    await _finishes(app, log, "/draw a cat --checkpoint tiny --steps 2")
    assert not marker.exists()


def _lightning_pickle(state: dict, placeholder: str, module: str, name: str) -> bytes:
    """``state`` saved by torch with the string ``placeholder`` replaced by the global
    ``module.name`` (pytorch_lightning is not installed, so torch could not pickle it)."""
    global_opcode = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    return repickled(torch_bytes(state), pickled_str(placeholder), global_opcode)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
        ("pytorch_lightning.callbacks.model_checkpoint", "__module__"),
        ("pytorch_lightning.callbacks", "model_checkpoint"),
    ],
)
async def test_network_files_with_nonsense_contents_fail_their_job_with_a_translated_reason(
    make_app, tmp_path, module, name
) -> None:
    models = tmp_path / "models"
    hypernet = hypernetwork_state()
    hypernet["activation_func"] = "PLACEHOLDER"
    write(models / "hypernetworks" / "lightning.pt", _lightning_pickle(hypernet, "PLACEHOLDER", module, name))

    class Nonsense:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, ("not a storage", -1, "shape", None, "x", 3))

    write(models / "Lora" / "nonsense.pt", torch_bytes({f"{LORA_KEY}.lora_down.weight": Nonsense()}))
    app = await _app_with_library(make_app, models)
    log = EventLog(app)
    failures = []
    for line in ("/draw a cat <hypernet:lightning> --steps 2", "/draw a cat <lora:nonsense> --steps 2"):
        [accepted] = await app.service.handle_line(line, ALICE)
        (job,) = accepted.data["jobs"]
        await log.wait_for(lambda job=job: log.of("failed", job))
        failures.append(log.of("failed", job)[0])
    lightning, nonsense = failures
    assert lightning.key in ("error.network_load", "error.unsafe_checkpoint"), lightning
    assert lightning.params["name"] == "lightning.pt"
    assert nonsense.key == "error.unsafe_checkpoint" and "other than a storage" in nonsense.params["reason"]
    for failure in failures:
        assert "lightning.pt" in _text(app, failure) or "nonsense.pt" in _text(app, failure)
        assert _text(app, failure, "zh-CN") != _text(app, failure)
    await _finishes(app, log, "/draw a cat --steps 2")


async def test_a_refused_embedding_is_reported_on_the_draw_reply(make_app, tmp_path) -> None:
    models = tmp_path / "models"
    marker = tmp_path / "marker.txt"
    write(models / "embeddings" / "evil-style.pt", torch_bytes({"emb_params": _CreatesFile(str(marker))}))
    write_embedding(models / "embeddings" / "good.pt")
    app = await _app_with_library(make_app, models)
    log = EventLog(app)
    accepted, note = await app.service.handle_line("/draw a cat, Evil-Style --steps 2", ALICE)
    assert not accepted.error and note.key == "draw.embeddings_refused"
    assert note.params["names"] == "evil-style" and "io.open" in note.params["details"]
    assert "evil-style is not used as an embedding" in _text(app, note)
    assert "evil-style 没有作为嵌入使用" in _text(app, note, "zh-CN")
    (job,) = accepted.data["jobs"]
    await log.wait_for(lambda: log.of("finished", job) or log.of("failed", job))
    assert log.of("finished", job)
    # A prompt that does not name it gets no note; the good embedding is listed as usable.
    [plain] = await app.service.handle_line("/draw a good cat --steps 2", ALICE)
    assert not plain.error and plain.key == "draw.accepted"
    listing, skipped = await app.service.handle_line("/models", ALICE)
    assert listing.data["embeddings"] == ["good"]
    assert "embeddings/evil-style.pt" in _text(app, skipped)
    assert not marker.exists()


async def test_a_draw_is_answered_while_a_load_holds_the_library(make_app, tmp_path, monkeypatch) -> None:
    """The refused-embeddings check of a /draw neither waits for a checkpoint load (which
    holds the library's lock) nor looks at the folder again while its listing is fresh."""
    import asyncio
    import threading

    import pipeline.checkpoints as checkpoints

    models = tmp_path / "models"
    write(
        models / "embeddings" / "evil-style.pt",
        torch_bytes({"emb_params": _CreatesFile(str(tmp_path / "m"))}),
    )
    app = await _app_with_library(make_app, models)
    await app.queue.stop()  # only the replies matter here
    loading, done = threading.Event(), threading.Event()

    def load() -> None:  # as a load does while it builds a pipeline
        with app.library._lock:
            loading.set()
            done.wait(30)

    holder = threading.Thread(target=load)
    holder.start()
    try:
        await asyncio.to_thread(loading.wait, 5)
        first, note = await asyncio.wait_for(app.service.handle_line("/draw evil-style --steps 2", ALICE), 10)
        assert not first.error and note.key == "draw.embeddings_refused"
    finally:
        done.set()
        holder.join()
    # within LISTING_FRESH_FOR the listing of a moment ago answers: a file added meanwhile
    # is seen once it has passed
    write(models / "embeddings" / "other.pt", torch_bytes({"emb_params": _CreatesFile(str(tmp_path / "m"))}))
    monkeypatch.setattr(checkpoints, "LISTING_FRESH_FOR", 3600.0)
    [plain] = await app.service.handle_line("/draw other --steps 2", ALICE)
    assert plain.key == "draw.accepted"
    monkeypatch.setattr(checkpoints, "LISTING_FRESH_FOR", 0.0)
    _, note = await app.service.handle_line("/draw other --steps 2", ALICE)
    assert note.key == "draw.embeddings_refused" and note.params["names"] == "other"
