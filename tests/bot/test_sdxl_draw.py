"""An SDXL single file in the models folder: /models lists it and /draw --checkpoint draws
with it, on SQLite and PostgreSQL."""

from __future__ import annotations

from safetensors.torch import save_file

from bot.types import Actor
from pipeline import hashing
from pipeline.images import read_infotext
from pipeline.infotext import parse
from pipeline.tiny import build_tiny_sdxl
from tests.conftest import EventLog, opened, png
from tests.pipeline.sdxl_layout import sdxl_to_sgm

ALICE = Actor(platform="console", user_id="alice", name="Alice", locale="en", chat_id="c")


async def test_draw_with_an_sdxl_checkpoint_file(make_app, tmp_path) -> None:
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    pipe = build_tiny_sdxl()
    pipe.save_pretrained(tmp_path / "xl-configs")  # the tiny model's configs and tokenizers
    checkpoint = models / "Stable-diffusion" / "tiny-xl.safetensors"
    save_file(sdxl_to_sgm(pipe), str(checkpoint))
    app = await make_app(models_dir=models, start=False)
    app.library.config_dirs["sdxl"] = tmp_path / "xl-configs"
    await app.start()

    [listing] = await app.service.handle_line("/models", ALICE)
    assert listing.data["checkpoints"] == ["tiny", "tiny-xl"]

    log = EventLog(app)
    line = "/draw a cat, night --checkpoint tiny-xl --steps 2 --size 72x64 --seed 11 --clip-skip 2"
    [accepted] = await app.service.handle_line(line, ALICE)
    assert not accepted.error, accepted
    (job,) = accepted.data["jobs"]
    await log.wait_for(lambda: log.of("finished", job) or log.of("failed", job))
    assert log.of("finished", job), log.of("failed", job)
    [image] = log.of("finished", job)[0].images
    assert (await opened(app, image)).size == (72, 64)
    fields = parse(read_infotext(await png(app, image)))
    assert fields["Model"] == "tiny-xl"
    assert fields["Model hash"] == hashing.sha256(checkpoint)[:10]
    size = (fields["Size-1"], fields["Size-2"])
    assert (size, fields["Clip skip"], fields["Seed"]) == (("72", "64"), "2", "11")
    record = await app.store.get(job)
    assert record.status == "finished" and record.request.checkpoint == "tiny-xl"
