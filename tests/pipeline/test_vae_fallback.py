"""The fp32 VAE decode fallback, separate VAE files, and recovery from out-of-memory errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline import vae as vae_module
from pipeline.checkpoints import CheckpointLibrary
from pipeline.engine import Engine
from pipeline.errors import OutOfMemory
from pipeline.networks import UnknownNetwork
from pipeline.request import GenerationRequest
from pipeline.tiny import build_tiny_pipeline
from tests.pipeline.conftest import bf16_generate

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")

SIZE = 64
STEPS = 3


def _request(prompt: str = "a cat", **changes) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt,
        seed=1,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        sampler_name="Euler",
        **changes,
    )


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image).astype(np.int16)


# -- fp32 fallback ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_engine() -> Engine:
    """A CPU engine over its own tiny pipeline, cast to bfloat16 (what a GPU runs in half)."""
    return Engine(CheckpointLibrary(None), device="cpu", dtype=torch.bfloat16)


def _inject_half_nan(decoder: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    original = decoder.forward
    calls: list[torch.dtype] = []

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out.dtype)
        if out.dtype in (torch.float16, torch.bfloat16):
            out = out.clone()
            out[:, :, : out.shape[2] // 2] = float("nan")
        return out

    monkeypatch.setattr(decoder, "forward", forward)
    return calls


def test_nan_half_decode_is_retried_in_fp32(bf16_engine, monkeypatch, caplog):
    pipe = bf16_engine.library.load("tiny")
    calls = _inject_half_nan(pipe.vae.decoder, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pipeline.vae"):
        result = bf16_generate(bf16_engine, _request())
    pixels = _pixels(result)
    assert calls == [torch.bfloat16, torch.float32]
    assert pixels.max() > 0, "the image is black"
    assert len(np.unique(pixels)) > 10
    assert any("retrying in float32" in record.getMessage() for record in caplog.records)
    assert pipe.vae.dtype == torch.bfloat16  # back to half after the retry


def test_clean_half_decode_is_not_retried(bf16_engine, monkeypatch, caplog):
    pipe = bf16_engine.library.load("tiny")
    original = pipe.vae.decoder.forward
    calls: list[torch.dtype] = []
    monkeypatch.setattr(pipe.vae.decoder, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    with caplog.at_level(logging.WARNING, logger="pipeline.vae"):
        bf16_generate(bf16_engine, _request())
    assert calls == [1]
    assert not [r for r in caplog.records if r.name == "pipeline.vae"]


def test_fp32_decode_is_never_retried():
    vae = build_tiny_pipeline().vae
    calls = []

    def decode(model, latents):
        calls.append(model.dtype)
        return torch.full((1, 3, 8, 8), float("nan"))

    out = vae_module.decode_with_fallback(vae, torch.zeros(1, 4, 1, 1), decode)
    assert torch.isnan(out).all() and calls == [torch.float32]


def test_all_black_half_decode_is_retried():
    vae = build_tiny_pipeline().vae.to(torch.bfloat16)
    results = iter([torch.full((1, 3, 8, 8), -1.0), torch.zeros(1, 3, 8, 8)])
    seen = []

    def decode(model, latents):
        seen.append(model.dtype)
        return next(results)

    out = vae_module.decode_with_fallback(vae, torch.zeros(1, 4, 1, 1), decode)
    assert torch.equal(out, torch.zeros(1, 3, 8, 8))
    assert seen == [torch.bfloat16, torch.float32] and vae.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("values", "expected"),
    [([0.0, 0.5], False), ([-1.0, -1.0], True), ([-1.0, 0.0], False), ([float("nan"), 0.0], True)],
)
def test_needs_fp32_retry(values, expected):
    assert vae_module.needs_fp32_retry(torch.tensor(values)) is expected


# -- VAE files ----------------------------------------------------------------------------


def test_load_vae_with_a1111_prefix(tmp_path):
    source = build_tiny_pipeline().vae
    with torch.no_grad():
        for param in source.parameters():
            param.add_(0.01)
    folder = tmp_path / "VAE"
    folder.mkdir()
    state = {f"first_stage_model.{k}": v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(folder / "my.vae.safetensors"))
    path = vae_module.find_vae(tmp_path, "my.vae")
    assert vae_module.find_vae(tmp_path, "MY.VAE.safetensors") == path
    loaded = vae_module.load_vae(path, config=dict(source.config))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_vae_from_weights_only_pt(tmp_path):
    source = build_tiny_pipeline().vae
    path = tmp_path / "plain.pt"
    torch.save(source.state_dict(), path)
    loaded = vae_module.load_vae(path, config=dict(source.config))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


def test_load_vae_refuses_a_mismatched_file(tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_file({"decoder.up_blocks.0.x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="not a VAE"):
        vae_module.load_vae(path, config=dict(build_tiny_pipeline().vae.config))


def test_a_vae_with_wrong_shapes_is_a_translated_load_error(tmp_path):
    """Weights with the right names but wrong shapes fail inside diffusers; the user sees
    which file and why, not an internal error."""
    source = build_tiny_pipeline().vae
    state = {k: torch.zeros(*(n + 1 for n in v.shape)) for k, v in source.state_dict().items()}
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    with pytest.raises(vae_module.VaeLoadError, match="do not fit this model's VAE") as info:
        vae_module.load_vae(path, config=dict(source.config))
    assert info.value.key == "error.network_load"
    assert info.value.params["kind"] == "VAE" and info.value.params["name"] == "odd.safetensors"


def test_unknown_vae(tmp_path):
    with pytest.raises(UnknownNetwork) as info:
        vae_module.find_vae(tmp_path, "nope")
    assert info.value.params["kind"] == "vae"


# -- out of memory ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oom_engine(tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("models")
    (root / "Lora").mkdir()
    library = CheckpointLibrary(root)
    pipe = library.load("tiny")
    module = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {
            f"{key}.lora_down.weight": torch.ones(2, module.in_features),
            f"{key}.lora_up.weight": torch.ones(64, 2),
        },
        str(root / "Lora" / "big.safetensors"),
    )
    return Engine(library, device="cpu")


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory"),
        RuntimeError("Unable to find a valid cuDNN algorithm"),
    ],
)
def test_oom_once_then_next_job_runs(oom_engine, monkeypatch, error):
    baseline = _pixels(oom_engine.generate(_request()))
    unet = oom_engine.library.load("tiny").unet
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    original = unet.forward
    raised = []

    def forward(*args, **kwargs):
        if not raised:
            raised.append(True)
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", forward)
    with pytest.raises(OutOfMemory) as info:
        oom_engine.generate(_request("a cat <lora:big:1>", num_images_per_prompt=2))
    params = info.value.params
    assert params["detail"] == str(error)
    assert (params["width"], params["height"], params["batch_size"]) == (SIZE, SIZE, 2)
    assert (params["hires_width"], params["hires_height"]) == (0, 0)
    assert params["megapixels"] == round(SIZE * SIZE * 2 / 1e6, 2)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in weights.items()), "LoRA left in the weights"
    assert np.array_equal(_pixels(oom_engine.generate(_request())), baseline)


def test_oom_params_name_the_hires_size(oom_engine, monkeypatch):
    unet = oom_engine.library.load("tiny").unet

    def explode(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(unet, "forward", explode)
    with pytest.raises(OutOfMemory) as info:
        oom_engine.generate(_request(enable_hr=True, hr_scale=2.0))
    assert (info.value.params["hires_width"], info.value.params["hires_height"]) == (2 * SIZE, 2 * SIZE)
