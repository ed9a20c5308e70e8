"""/pnginfo's re-run button and its answers to uploads that are not images with parameters."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.types import Actor, Attachment
from models.preferences import GLOBAL, PreferenceStore
from tests.conftest import EventLog, opened, png
from tests.scenario import ConsoleSession, jobs_of

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
BOB = Actor(platform="console", user_id="bob", name="Bob", locale="zh-CN", chat_id="c")
MISSING_MODEL = "a cat\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model hash: 925997e9, Model: nowhere"


def pixels(source: str | Path | Image.Image) -> np.ndarray:
    if isinstance(source, Image.Image):
        return np.asarray(source.convert("RGB"))
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


def text(app, reply, locale: str = "en") -> str:
    return app.translator.t(locale, reply.key, **reply.params)


async def finished(app, log: EventLog, replies) -> object:
    assert replies[0].key == "draw.accepted", replies[0]
    (job,) = replies[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", job) or log.of("failed", job))
    (event,) = log.of("finished", job)
    return event


async def test_the_rerun_button_draws_the_same_pixels(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    line = "/draw a (red:1.2) boat, at dusk --negative fog --steps 3 --cfg 6.5 --seed 77 --sampler DPM++ 2M"
    original = (await finished(app, log, await app.service.handle_line(line, ALICE))).images[0]
    upload = Attachment("boat.png", await png(app, original))
    (info,) = await app.service.handle_line("/pnginfo", ALICE, attachments=(upload,))
    assert info.key == "pnginfo.result"
    (action,) = info.actions
    assert action.id.startswith("rerun:") and len(action.id) <= 100  # a Discord custom_id
    assert app.translator.t("zh-CN", action.label_key) == "按此生成"
    stored = await PreferenceStore(app.store).get(GLOBAL, "pnginfo." + action.id.split(":", 1)[1])
    assert stored == {"infotext": original.infotext}

    # anyone who sees the answer may press it; it is their own job
    again = (await finished(app, log, await app.service.run_action(action.id, BOB))).images[0]
    assert again.infotext == original.infotext
    assert np.array_equal(pixels(await opened(app, again)), pixels(await opened(app, original)))
    records = [await app.store.get(event.generation_id) for event in log.of("finished")]
    assert [r.user.platform_user_id for r in records] == ["alice", "bob"]

    # /pnginfo of a stored generation answers the same
    (by_id,) = await app.service.handle_line(f"/pnginfo {records[0].id}", ALICE)
    assert by_id.data["command"] == info.data["command"] and by_id.actions[0].id != action.id

    (gone,) = await app.service.run_action("rerun:01HZZZZZZZZZZZZZZZZZZZZZZZ", BOB)
    assert (
        gone.error and gone.key == "pnginfo.rerun_gone" and "请重新运行 /pnginfo" in text(app, gone, "zh-CN")
    )
    (junk,) = await app.service.run_action("rerun:../../etc", ALICE)
    assert junk.key == "pnginfo.rerun_gone"


async def test_no_button_when_the_model_is_missing(make_app) -> None:
    app = await make_app()
    (info,) = await app.service.handle_line("/pnginfo " + MISSING_MODEL, ALICE)
    assert info.key == "pnginfo.result" and info.actions == []
    assert "--checkpoint" not in info.data["command"]


def _image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "english", "chinese"),
    [
        (
            "notes.txt",
            b"Steps: 20, Seed: 1",
            "The attached image could not be used: /pnginfo reads the parameters of PNG, JPEG, WEBP "
            'images; "notes.txt" is not an image.',
            "附带的图片无法使用：/pnginfo 读取 PNG, JPEG, WEBP 图片中的参数；“notes.txt”不是图片。",
        ),
        ("anim.gif", _image_bytes("GIF"), '"anim.gif" is a GIF image.', "“anim.gif”是 GIF 图片。"),
        ("scan.bmp", _image_bytes("BMP"), '"scan.bmp" is a BMP image.', "“scan.bmp”是 BMP 图片。"),
    ],
)
async def test_an_upload_that_is_not_a_png_is_refused_in_the_users_language(
    make_app, name: str, data: bytes, english: str, chinese: str
) -> None:
    app = await make_app()
    for actor, expected in ((ALICE, english), (BOB, chinese)):
        (reply,) = await app.service.handle_line("/pnginfo", actor, attachments=(Attachment(name, data),))
        assert reply.error and reply.key == "error.init_image"
        assert expected in text(app, reply, actor.locale)
    # a JPEG without parameters is read (A1111 keeps them in EXIF there) and has none
    (jpeg,) = await app.service.handle_line(
        "/pnginfo", ALICE, attachments=(Attachment("a.jpg", _image_bytes("JPEG")),)
    )
    assert jpeg.key == "pnginfo.none" and not jpeg.error


@pytest.mark.slow
def test_console_pnginfo_of_a_file_then_its_button(tmp_path: Path) -> None:
    with ConsoleSession(tmp_path, user="alice") as alice:
        (job,) = jobs_of(alice.command("/draw a green kite --steps 3 --seed 5"))
        path = alice.finished(job)["images"][0]["path"]
        (info,) = alice.command(f"/pnginfo --attach {path}")
        assert "--seed 5" in info["command"]
        (button,) = info["actions"]
        assert button["label"] == "Draw this"
        (again,) = jobs_of(alice.command("/" + button["id"].replace(":", " ", 1)))
        image = alice.finished(again)["images"][0]
        assert np.array_equal(pixels(image["path"]), pixels(path))
        (refused,) = alice.command(f"/pnginfo --attach {tmp_path / 'config.toml'}")
        assert refused["event"] == "error" and '"config.toml" is not an image' in refused["text"]


# hostile uploads: bounded text, one size cap -----------------------------------------------------

PARAMETERS = "a quiet lake\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 9, Size: 64x64"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _with_chunks(data: bytes, chunks: list[bytes]) -> bytes:
    """``chunks`` added after the pixel data, before IEND."""
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + b"".join(chunks) + data[iend:]


def ztxt_bomb(count: int = 128, inflated: int = 16 * 1024 * 1024) -> bytes:
    """A PNG whose ``parameters`` come first, then ``count`` zTXt chunks after the pixel
    data, each inflating to ``inflated`` bytes (128 x 16 MiB fit in 2 MB)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", PARAMETERS)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    bomb = zlib.compress(b"\0" * inflated, 9)
    return _with_chunks(
        buffer.getvalue(), [_chunk(b"zTXt", b"Comment%d\0\0" % i + bomb) for i in range(count)]
    )


def test_a_ztxt_bomb_is_read_within_the_text_caps() -> None:
    from pipeline.images import MAX_TEXT_TOTAL, read_infotext

    data = ztxt_bomb()
    assert 1_500_000 < len(data) < 2_500_000
    tracemalloc.start()
    try:
        found = read_infotext(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found == PARAMETERS
    assert peak < 2 * MAX_TEXT_TOTAL  # 16 MiB for one chunk, 2 GiB for all before the caps


def test_text_past_the_caps_is_not_read() -> None:
    from pipeline.images import MAX_TEXT_CHUNK, read_infotext

    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    big = "x" * (MAX_TEXT_CHUNK + 1)
    for text, expected in (
        (PARAMETERS, PARAMETERS),
        (big, None),
        ("y" * MAX_TEXT_CHUNK, "y" * MAX_TEXT_CHUNK),
    ):
        chunk = _chunk(b"zTXt", b"parameters\0\0" + zlib.compress(text.encode("latin-1")))
        assert read_infotext(_with_chunks(plain.getvalue(), [chunk])) == expected
    # the total cap stops the walk: parameters behind 16 chunks of 64 KiB are not reached
    filler = _chunk(b"zTXt", b"filler\0\0" + zlib.compress(b"z" * MAX_TEXT_CHUNK))
    late = _chunk(b"tEXt", b"parameters\0" + PARAMETERS.encode())
    assert read_infotext(_with_chunks(plain.getvalue(), [filler] * 16 + [late])) is None
    assert read_infotext(_with_chunks(plain.getvalue(), [filler] * 15 + [late])) == PARAMETERS


async def test_pnginfo_answers_a_ztxt_bomb_with_its_parameters(make_app) -> None:
    app = await make_app()
    (reply,) = await app.service.handle_line(
        "/pnginfo", ALICE, attachments=(Attachment("bomb.png", ztxt_bomb()),)
    )
    assert reply.key == "pnginfo.result" and "--seed 9" in reply.data["command"]


async def test_every_command_refuses_an_upload_over_the_cap(make_app) -> None:
    app = await make_app(limits={"max_upload_bytes": 64 * 1024})
    png = ztxt_bomb(count=0) + b"\0" * 64 * 1024  # one page of bytes too many
    for line in ("/pnginfo", "/draw a cat", "/style import", "/refine x"):
        for actor, expected in ((ALICE, "uploads may be at most 64 KiB"), (BOB, "最大 64 KiB")):
            (reply,) = await app.service.handle_line(line, actor, attachments=(Attachment("big.png", png),))
            assert reply.error and reply.key == "error.upload_too_large", line
            assert expected in text(app, reply, actor.locale) and "big.png" in text(app, reply, actor.locale)
    assert await app.store.count_by_status() == {}
    small = ztxt_bomb(count=0)
    (fine,) = await app.service.handle_line("/pnginfo", ALICE, attachments=(Attachment("ok.png", small),))
    assert fine.key == "pnginfo.result"
