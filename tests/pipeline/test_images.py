from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipeline import infotext
from pipeline.images import ImageFormatError, png_bytes, read_infotext, save_png

LATIN1_INFOTEXT = (
    "a café, (masterpiece:1.2)\nNegative prompt: lowres\nSteps: 20, Sampler: DPM++ 2M, "
    "Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 64x64, Version: v1.10.1"
)
CHINESE_INFOTEXT = (
    "一只可爱的猫, 杰作\nNegative prompt: 低质量\nSteps: 20, Sampler: Euler a, "
    'Schedule type: Automatic, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: "模型: v2"'
)


def image(size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new("RGB", size, (200, 100, 50))


def chunk(chunk_type: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + chunk_type + body + struct.pack(">I", zlib.crc32(chunk_type + body))


def chunk_types(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, keyword) of every chunk, in file order."""
    out, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        out.append((kind, data[pos + 8 : pos + 8 + length].split(b"\0", 1)[0]))
        pos += 12 + length
    return out


def insert_before_iend(data: bytes, extra: bytes) -> bytes:
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + extra + data[iend:]


def encoded(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def exif_with_comment(comment: bytes) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment
    return exif.tobytes()


# ---------------------------------------------------------------------------------------
# PNG write -> read


def test_png_latin1_infotext_is_a_text_chunk() -> None:
    data = png_bytes(image(), LATIN1_INFOTEXT)
    assert (b"tEXt", b"parameters") in chunk_types(data)
    assert read_infotext(data) == LATIN1_INFOTEXT
    with Image.open(io.BytesIO(data)) as im:
        assert im.info["parameters"] == LATIN1_INFOTEXT
        assert im.size == (64, 48)


def test_png_chinese_infotext_is_an_utf8_itxt_chunk() -> None:
    data = png_bytes(image(), CHINESE_INFOTEXT)
    assert (b"iTXt", b"parameters") in chunk_types(data)
    assert (b"tEXt", b"parameters") not in chunk_types(data)
    assert CHINESE_INFOTEXT.encode("utf-8") in data  # uncompressed
    assert read_infotext(data) == CHINESE_INFOTEXT
    with Image.open(io.BytesIO(data)) as im:
        assert im.info["parameters"] == CHINESE_INFOTEXT


def test_png_round_trip_through_format_and_parse() -> None:
    params = infotext.InfotextParams(
        prompt="一只猫, (smile:1.1)",
        negative_prompt="lowres, 模糊",
        steps=28,
        sampler="Euler a",
        cfg_scale=7,
        seed=987654321,
        width=64,
        height=48,
        extra={"Lora hashes": "猫: 0123456789ab"},
    )
    text = infotext.format(params)
    parsed = infotext.parse(read_infotext(png_bytes(image(), text)) or "")
    assert parsed["Prompt"] == params.prompt
    assert parsed["Negative prompt"] == params.negative_prompt
    assert parsed["Seed"] == "987654321"
    assert parsed["Lora hashes"] == "猫: 0123456789ab"


def test_save_png_to_path_and_file(tmp_path: Path) -> None:
    path = tmp_path / "00001-1234.png"
    save_png(image(), path, LATIN1_INFOTEXT)
    assert read_infotext(path.read_bytes()) == LATIN1_INFOTEXT
    save_png(image(), str(path), CHINESE_INFOTEXT)
    assert read_infotext(path.read_bytes()) == CHINESE_INFOTEXT
    buffer = io.BytesIO()
    save_png(image(), buffer, LATIN1_INFOTEXT)
    assert buffer.getvalue() == png_bytes(image(), LATIN1_INFOTEXT)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_png_keeps_pixels_and_mode(mode: str) -> None:
    original = image().convert(mode)
    with Image.open(io.BytesIO(png_bytes(original, "x"))) as im:
        assert im.mode == mode
        assert im.tobytes() == original.tobytes()


def test_png_lone_surrogate_does_not_break_writing() -> None:
    data = png_bytes(image(), "a \ud800 b")
    assert read_infotext(data) == "a ? b"


def test_png_without_infotext_gives_none() -> None:
    assert read_infotext(encoded(image(), "PNG")) is None


def test_png_empty_infotext_counts_as_absent() -> None:
    assert read_infotext(png_bytes(image(), "")) is None


def test_png_parameters_after_the_pixel_data_are_found() -> None:
    data = insert_before_iend(encoded(image(), "PNG"), chunk(b"tEXt", b"parameters\0late text"))
    assert chunk_types(data)[-2] == (b"tEXt", b"parameters")
    assert read_infotext(data) == "late text"


@pytest.mark.parametrize("text", [LATIN1_INFOTEXT, CHINESE_INFOTEXT])
def test_png_compressed_text_chunks(text: str) -> None:
    info = PngInfo()
    info.add_text("parameters", text, zip=True)
    assert read_infotext(encoded(image(), "PNG", pnginfo=info)) == text
    info = PngInfo()
    info.add_itxt("parameters", text, lang="en", tkey="Parameters", zip=True)
    assert read_infotext(encoded(image(), "PNG", pnginfo=info)) == text


def test_png_broken_compressed_chunk_is_ignored() -> None:
    data = insert_before_iend(encoded(image(), "PNG"), chunk(b"zTXt", b"parameters\0\0not zlib"))
    assert read_infotext(data) is None


def test_png_parameters_win_over_exif_comment() -> None:
    data = png_bytes(image(), "from png")
    data = insert_before_iend(
        data, chunk(b"eXIf", exif_with_comment(b"UNICODE\0" + "exif".encode("utf-16-be")))
    )
    assert read_infotext(data) == "from png"


# ---------------------------------------------------------------------------------------
# EXIF UserComment (JPEG, WebP) and comments (GIF)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize("text", [LATIN1_INFOTEXT, CHINESE_INFOTEXT])
def test_exif_user_comment_utf16_be_as_a1111_writes_it(fmt: str, text: str) -> None:
    data = encoded(image(), fmt, exif=exif_with_comment(b"UNICODE\0" + text.encode("utf-16-be")))
    assert read_infotext(data) == text


@pytest.mark.parametrize(
    ("comment", "expected"),
    [
        (b"UNICODE\0" + "Steps: 20, 猫".encode("utf-16-le"), "Steps: 20, 猫"),
        (b"UNICODE\0" + "\ufeffSteps: 20".encode("utf-16-le"), "Steps: 20"),
        (b"UNICODE\0" + "\ufeffSteps: 20".encode("utf-16-be"), "Steps: 20"),
        (b"UNICODE\0" + "a cat\0".encode("utf-16-be"), "a cat"),
        (b"ASCII\0\0\0Steps: 20, Seed: 1", "Steps: 20, Seed: 1"),
        (b"\0" * 8 + b"plain text", "plain text"),
        (b"no prefix at all", "no prefix at all"),
    ],
)
def test_exif_user_comment_variants(comment: bytes, expected: str) -> None:
    assert read_infotext(encoded(image(), "JPEG", exif=exif_with_comment(comment))) == expected


def test_exif_without_user_comment_gives_none() -> None:
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    assert read_infotext(encoded(image(), "JPEG", exif=exif.tobytes())) is None


def test_gif_comment() -> None:
    assert read_infotext(encoded(image(), "GIF", comment=LATIN1_INFOTEXT.encode("utf-8"))) == LATIN1_INFOTEXT
    assert read_infotext(encoded(image(), "GIF", comment="猫".encode())) == "猫"
    assert read_infotext(encoded(image(), "GIF")) is None


def test_exif_comment_wins_over_jpeg_comment() -> None:
    data = encoded(image(), "JPEG", comment=b"com", exif=exif_with_comment(b"ASCII\0\0\0exif"))
    assert read_infotext(data) == "exif"
    assert read_infotext(encoded(image(), "JPEG", comment=b"com")) == "com"


# ---------------------------------------------------------------------------------------
# NovelAI


def novelai_png(
    comment: object, description: str = "1girl, smile", size: tuple[int, int] = (64, 48)
) -> bytes:
    info = PngInfo()
    info.add_text("Title", "AI generated image")
    info.add_text("Description", description)
    info.add_text("Software", "NovelAI")
    info.add_text("Source", "Stable Diffusion 1D44365E")
    info.add_text("Comment", comment if isinstance(comment, str) else json.dumps(comment))
    return encoded(image(size), "PNG", pnginfo=info)


NOVELAI_SETTINGS = {
    "steps": 28,
    "sampler": "k_euler_ancestral",
    "seed": 2718281828,
    "strength": 0.69,
    "noise": 0.667,
    "scale": 11.0,
    "uc": "lowres, bad anatomy",
}


def test_novelai_png_is_converted() -> None:
    text = read_infotext(novelai_png(NOVELAI_SETTINGS))
    assert text == (
        "1girl, smile\nNegative prompt: lowres, bad anatomy\n"
        "Steps: 28, Sampler: Euler a, CFG scale: 11.0, Seed: 2718281828, Size: 64x48, Clip skip: 2, ENSD: 31337"
    )
    parsed = infotext.parse(text or "")
    assert (parsed["Size-1"], parsed["Size-2"], parsed["ENSD"], parsed["Clip skip"]) == (
        "64",
        "48",
        "31337",
        "2",
    )


@pytest.mark.parametrize(
    ("sampler", "expected"),
    [
        ("k_euler", "Euler"),
        ("k_lms", "LMS"),
        ("k_dpmpp_2m", "DPM++ 2M"),
        ("ddim", "DDIM"),
        ("euler a", "Euler a"),
        ("dpm++ 2m sde", "DPM++ 2M SDE"),
        ("DDIM", "Euler a"),  # looked up as is, and A1111's keys are lower-case
        ("k_dpm_2_ancestral", "Euler a"),  # not an A1111 alias
        ("nai_smea", "Euler a"),
        (7, "Euler a"),
    ],
)
def test_novelai_sampler_mapping(sampler: object, expected: str) -> None:
    text = read_infotext(novelai_png({**NOVELAI_SETTINGS, "sampler": sampler})) or ""
    assert f"Sampler: {expected}," in text


@pytest.mark.parametrize(
    "comment", ["not json", json.dumps([1, 2]), json.dumps({"steps": 28}), "[" * 100_000]
)
def test_novelai_with_broken_comment_is_left_alone(comment: str) -> None:
    assert read_infotext(novelai_png(comment)) is None


def test_novelai_conversion_wins_over_parameters() -> None:
    info = PngInfo()
    for key, value in (
        ("parameters", "a1111 text"),
        ("Software", "NovelAI"),
        ("Description", "d"),
        ("Comment", json.dumps(NOVELAI_SETTINGS)),
    ):
        info.add_text(key, value)
    text = read_infotext(encoded(image(), "PNG", pnginfo=info)) or ""
    assert text.startswith("d\nNegative prompt: lowres, bad anatomy\nSteps: 28,")


# ---------------------------------------------------------------------------------------
# Not images


def test_image_format_error_is_a_value_error() -> None:
    assert issubclass(ImageFormatError, ValueError)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world",
        b"\x89PNG\r\n\x1a\n",
        b"\x89PNG\r\n\x1a\n" + b"\0" * 30,
        b"GIF89a",
        b"\xff\xd8\xff",
    ],
)
def test_not_an_image_raises(data: bytes) -> None:
    with pytest.raises(ImageFormatError):
        read_infotext(data)


def test_truncated_png_still_gives_its_infotext() -> None:
    data = png_bytes(image(), LATIN1_INFOTEXT)
    idat = data.index(b"IDAT")
    assert read_infotext(data[: idat + 10]) == LATIN1_INFOTEXT


@given(
    st.binary(max_size=200), st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"RIFF"])
)
@settings(max_examples=300, deadline=None)
def test_read_infotext_fuzz(tail: bytes, head: bytes) -> None:
    try:
        result = read_infotext(head + tail)
    except ImageFormatError:
        return
    assert result is None or isinstance(result, str)


@given(st.binary(max_size=120))
@settings(max_examples=300, deadline=None)
def test_read_infotext_fuzz_png_chunks(tail: bytes) -> None:
    data = png_bytes(image((8, 8)), "x")
    try:
        result = read_infotext(data[:33] + tail)  # signature + IHDR, then anything
    except ImageFormatError:
        return
    assert result is None or isinstance(result, str)
