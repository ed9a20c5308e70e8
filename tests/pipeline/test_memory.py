"""Memory modes, VAE slicing/tiling, attention, precision, residency budget and OOM retry.

Everything runs on the CPU: moves between the CPU and "the device" are no-ops there, but
the offload code runs (hooks installed and removed, moves counted), so the tests prove
that every mode produces the same pixels and cleans up after itself.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline import latents
from pipeline import vae as vae_module
from pipeline.checkpoints import CheckpointLibrary
from pipeline.engine import Engine
from pipeline.errors import OutOfMemory
from pipeline.memory import (
    DeviceMemory,
    MemorySettings,
    Residency,
    SettingError,
    lower_mode,
    move_module,
    offload_units,
    resolve_attention,
)
from pipeline.request import GenerationRequest
from pipeline.tiny import build_tiny_pipeline
from tests.pipeline.conftest import bf16_generate
from tests.pipeline.test_networks import _hypernet_state, _kohya_lora

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")

SIZE = 64
OOM_TEXT = "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 8.00 GiB total capacity)"


def _request(prompt: str = "a cat", **changes) -> GenerationRequest:
    values = {"seed": 7, "width": SIZE, "height": SIZE, "num_inference_steps": 2, "sampler_name": "Euler"}
    values.update(changes)
    return GenerationRequest(prompt=prompt, **values)


def _pixels(result) -> list[np.ndarray]:
    return [np.asarray(image.image).astype(np.int16) for image in result.images]


def _engine(library: CheckpointLibrary, **settings) -> Engine:
    return Engine(library, device="cpu", memory_settings=MemorySettings(**settings))


def _modules(pipe) -> list[torch.nn.Module]:
    return [m for part in (pipe.unet, pipe.vae, pipe.text_encoder) for m in part.modules()]


def _offload_hooks(pipe) -> int:
    """Forward (pre-)hooks of the offloader on the pipeline's modules (others install their own)."""
    hooks = [h for m in _modules(pipe) for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    return sum(isinstance(getattr(h, "__self__", None), DeviceMemory) for h in hooks)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A LoRA, a hypernetwork and a VAE (tiny's, decoder shifted) beside the built-in tiny."""
    root = tmp_path_factory.mktemp("models")
    for sub in ("Lora", "hypernetworks", "VAE"):
        (root / sub).mkdir()
    pipe = build_tiny_pipeline()
    save_file(_kohya_lora(pipe, 1), str(root / "Lora" / "alpha.safetensors"))
    torch.save(_hypernet_state(4), root / "hypernetworks" / "hn.pt")
    with torch.no_grad():
        for name, param in pipe.vae.named_parameters():
            if name.startswith("decoder."):
                param.add_(0.05)
    save_file(
        {k: v.contiguous() for k, v in pipe.vae.state_dict().items()},
        str(root / "VAE" / "shifted.safetensors"),
    )
    return root


@pytest.fixture(scope="module")
def library(models_dir) -> CheckpointLibrary:
    return CheckpointLibrary(models_dir)


# -- memory modes ----------------------------------------------------------------------------


HIRES = {"enable_hr": True, "hr_scale": 1.25, "hr_upscaler": "Lanczos", "denoising_strength": 0.6}
FULL = {
    "prompt": "a cat <lora:alpha:0.8> <hypernet:hn:0.5>",
    "num_images_per_prompt": 2,
    "vae": "shifted",
    **HIRES,
}


def test_all_modes_give_identical_pixels_with_networks_hires_and_vae_override(library):
    request = _request(**FULL)
    pipe = library.load("tiny")
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    results = {
        mode: _engine(library, mode=mode).generate(request) for mode in ("normal", "medvram", "lowvram")
    }
    normal = _pixels(results["normal"])
    assert len(normal) == 2 and normal[0].shape == (80, 80, 3)
    for mode in ("medvram", "lowvram"):
        assert all(np.array_equal(a, b) for a, b in zip(_pixels(results[mode]), normal, strict=True)), mode
        assert [i.infotext for i in results[mode].images] == [i.infotext for i in results["normal"].images]
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in weights.items()), (
        "LoRA left in the weights"
    )
    assert pipe.vae is library.load("tiny").vae  # the override was swapped back
    assert _offload_hooks(pipe) == 0


def test_medvram_moves_each_component_in_and_out_per_use(library):
    engine = _engine(library, mode="medvram")
    engine.generate(_request(**HIRES))
    # Text encoder: once per pass (2); UNet: once per pass (2); VAE: decode, encode for the
    # pixel upscaler, final decode (3). Each use is a move in and a move out.
    assert engine.memory.stats.moves == 2 * (2 + 2 + 3)
    assert engine.memory.stats.hooks_installed == 0


def test_lowvram_hooks_move_every_block_for_its_own_forward_and_are_removed(library):
    engine = _engine(library, mode="lowvram")
    pipe = library.load("tiny")
    units = {id(u) for part in (pipe.unet, pipe.vae, pipe.text_encoder) for u in offload_units(part)}
    forwards = []
    seen_during_sampling = []

    def count(module, _args, _output):
        if id(module) in units:
            forwards.append(module)

    def on_progress(_step, _total):
        seen_during_sampling.append((_offload_hooks(pipe), engine.memory.stats.hooks_active))

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        engine.generate(_request(**HIRES), on_progress=on_progress)
    finally:
        handle.remove()
    stats = engine.memory.stats
    assert forwards and stats.moves == 2 * len(forwards)
    assert stats.hooks_installed > 0 and stats.hooks_active == 0
    assert seen_during_sampling
    # During sampling the UNet's blocks are hooked (the text encoder's are gone again).
    unet_units = len(offload_units(pipe.unet))
    assert all(hooked == 2 * unet_units == 2 * active for hooked, active in seen_during_sampling)
    assert _offload_hooks(pipe) == 0


def test_offload_units_are_blocks_and_cover_every_weight():
    pipe = build_tiny_pipeline()
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        units = offload_units(part)
        covered = {id(p) for unit in units for p in unit.parameters()}
        assert covered == {id(p) for p in part.parameters()}
        assert not any(isinstance(u, torch.nn.ModuleList | torch.nn.Sequential) for u in units)
    assert set(pipe.unet.down_blocks) <= set(offload_units(pipe.unet))
    assert set(pipe.vae.decoder.up_blocks) <= set(offload_units(pipe.vae))
    assert set(pipe.text_encoder.encoder.layers) <= set(offload_units(pipe.text_encoder))


def test_moves_inside_inference_mode_keep_normal_tensors():
    """The LoRA restore copies into the weights after the job, outside inference mode; a
    weight moved inside it would have become an inference tensor and refuse that copy."""
    layer = torch.nn.Linear(4, 4)
    with torch.inference_mode():
        move_module(layer, torch.device("meta"))
    assert layer.weight.device.type == "meta" and not layer.weight.is_inference()


def test_lower_modes():
    assert [lower_mode(m) for m in ("normal", "medvram", "lowvram")] == ["medvram", "lowvram", "lowvram"]
    with pytest.raises(SettingError):
        MemorySettings(mode="highvram")


# -- VAE: slicing and tiling ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae():
    return build_tiny_pipeline().vae


def test_batch_is_decoded_one_image_at_a_time(tiny_vae):
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = []
    with torch.inference_mode():
        batch = vae_module.decode_batch(
            tiny_vae, z, lambda vae, x: calls.append(x.shape[0]) or latents.decode(vae, x)
        )
        solo = [latents.decode(tiny_vae, z[i : i + 1]) for i in range(3)]
    assert calls == [1, 1, 1]
    assert all(torch.equal(batch[i : i + 1], solo[i]) for i in range(3))


def test_tiled_decode_of_a_large_latent_is_close_to_the_whole_decode(tiny_vae):
    generator = torch.Generator().manual_seed(2)
    z, other = torch.randn(1, 4, 16, 24, generator=generator), torch.randn(1, 4, 16, 24, generator=generator)
    tiles = []
    with torch.inference_mode():
        whole = latents.decode(tiny_vae, z)
        tiled = vae_module.tiled_decode(
            tiny_vae, z, lambda vae, x: tiles.append(x.shape) or latents.decode(vae, x), tile=12
        )
        unrelated = latents.decode(tiny_vae, other)
    assert len(tiles) > 1 and all(shape[-1] <= 12 and shape[-2] <= 12 for shape in tiles)
    assert tiled.shape == whole.shape
    difference = (tiled - whole).abs().mean().item()
    assert 0 < difference < 0.2 * (unrelated - whole).abs().mean().item()
    assert not torch.isnan(tiled).any()


def test_a_latent_that_fits_one_tile_is_decoded_whole(tiny_vae):
    z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(
            vae_module.tiled_decode(tiny_vae, z, latents.decode, tile=16), latents.decode(tiny_vae, z)
        )


def test_engine_tiles_only_images_above_the_threshold(library):
    plain = _engine(library)
    tiling = _engine(library, vae_tiling_pixels=SIZE * SIZE, vae_tile=8)
    decoder = library.load("tiny").vae.decoder
    calls = []
    handle = decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        small = tiling.generate(_request())
        small_calls, calls[:] = len(calls), []
        large = tiling.generate(_request(width=SIZE + 32))
        large_calls = len(calls)
    finally:
        handle.remove()
    assert small_calls == 1 and large_calls > 1
    assert np.array_equal(_pixels(small)[0], _pixels(plain.generate(_request()))[0])
    whole = _pixels(plain.generate(_request(width=SIZE + 32)))[0]
    tiled = _pixels(large)[0]
    assert tiled.shape == whole.shape and not np.array_equal(tiled, whole)


# -- attention and precision -----------------------------------------------------------------


def test_attention_without_xformers():
    cuda = torch.device("cuda")
    assert resolve_attention("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attention("sdpa", cuda) == "sdpa"
    if "xformers" not in sys.modules:
        with pytest.raises(SettingError, match="not installed"):
            resolve_attention("xformers", cuda)
    with pytest.raises(SettingError, match="CUDA") as info:
        resolve_attention("xformers", torch.device("cpu"))
    assert info.value.key == "attention"


def test_auto_takes_xformers_only_on_cuda(monkeypatch):
    package = types.ModuleType("xformers")
    package.ops = types.ModuleType("xformers.ops")
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", package.ops)
    assert resolve_attention("auto", torch.device("cuda")) == "xformers"
    assert resolve_attention("xformers", torch.device("cuda:1")) == "xformers"
    assert resolve_attention("auto", torch.device("cpu")) == "sdpa"


def test_engine_with_unavailable_xformers_fails_at_construction():
    with pytest.raises(SettingError, match="xformers"):
        _engine(CheckpointLibrary(None), attention="xformers")


def test_no_half_vae_runs_the_vae_in_float32_beside_a_half_unet(caplog):
    engine = Engine(
        CheckpointLibrary(None), device="cpu", dtype=torch.bfloat16,
        memory_settings=MemorySettings(no_half_vae=True),
    )  # fmt: skip
    pipe = engine.library.load("tiny")
    seen = []
    handle = pipe.vae.decoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.vae"):
            result = bf16_generate(engine, _request())
    finally:
        handle.remove()
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32 and seen == [torch.float32]
    assert not [r for r in caplog.records if r.name == "pipeline.vae"]
    assert len(np.unique(_pixels(result)[0])) > 10
    assert "VAE fp32" in engine.memory.describe(2) and "precision bf16" in engine.memory.describe(2)


# -- residency budget ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    """Diffusers folders ``a``, ``b``, ``c`` (the tiny weights) and the cost of one at fp32."""
    root = tmp_path_factory.mktemp("residency")
    folder = root / "Stable-diffusion"
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(folder / "a")
    for name in ("b", "c"):
        shutil.copytree(folder / "a", folder / name)
    return root, Residency(0, dtype=torch.float32).cost(pipe)


def _budget_gb(cost: int, count: float) -> float:
    return cost * count / 1024**3


def test_cost_counts_parameters_and_buffers_at_the_target_dtypes():
    pipe = build_tiny_pipeline()
    full = Residency(0, torch.float32, torch.float32).cost(pipe)
    half = Residency(0, torch.float16, torch.float16).cost(pipe)
    half_vae_fp32 = Residency(0, torch.float16, torch.float32).cost(pipe)
    vae_floats = sum(
        t.numel() for t in (*pipe.vae.parameters(), *pipe.vae.buffers()) if t.is_floating_point()
    )
    assert half < full < 2 * half + 1024 * 1024
    assert half_vae_fp32 - half == 2 * vae_floats


def test_budget_for_two_keeps_the_two_most_recent(three_models):
    root, cost = three_models
    library = CheckpointLibrary(root, max_loaded=5)
    engine = _engine(library, budget_gb=_budget_gb(cost, 2.5))
    assert library.residency is engine.memory.residency
    engine.generate(_request(checkpoint="a", num_inference_steps=2))
    library.load("b")
    assert library.loaded_names() == ["a", "b"]
    library.load("c")
    assert library.loaded_names() == ["b", "c"]
    library.load("b")
    library.load("a")
    assert library.loaded_names() == ["b", "a"]


def test_budget_for_one_keeps_only_the_loaded_one(three_models, caplog):
    root, cost = three_models
    library = CheckpointLibrary(root, max_loaded=5)
    _engine(library, budget_gb=_budget_gb(cost, 1.5))
    library.load("a")
    with caplog.at_level(logging.INFO, logger="pipeline.checkpoints"):
        library.load("b")
    assert library.loaded_names() == ["b"]
    assert any("unloaded checkpoint a (memory budget)" in r.getMessage() for r in caplog.records)


def test_a_running_job_keeps_its_checkpoint_while_another_device_switches(three_models):
    """Two engines share the library; engine one's job on ``a`` is paused mid-sampling while
    engine two loads ``b`` and ``c`` under a budget for two: ``b`` is dropped, never ``a``."""
    root, cost = three_models
    library = CheckpointLibrary(root, max_loaded=5)
    first, second = _engine(library, budget_gb=_budget_gb(cost, 2.5)), _engine(library)
    request = _request(checkpoint="a", num_inference_steps=2)
    paused, resume = threading.Event(), threading.Event()
    outcome = {}

    def on_progress(step, _total):
        if step == 1:
            paused.set()
            resume.wait(60)

    def run():
        outcome["result"] = first.generate(request, on_progress=on_progress)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert paused.wait(60)
        second.generate(_request(checkpoint="b", num_inference_steps=2))
        second.generate(_request(checkpoint="c", num_inference_steps=2))
        assert library.loaded_names() == ["a", "c"]
    finally:
        resume.set()
        thread.join(60)
    assert _pixels(outcome["result"])[0].tolist() == _pixels(first.generate(request))[0].tolist()


def test_checkpoints_in_use_may_exceed_the_budget(three_models, caplog):
    root, cost = three_models
    library = CheckpointLibrary(root, max_loaded=5)
    _engine(library, budget_gb=_budget_gb(cost, 1.5))
    library.load("a")
    with library.in_use("a"), caplog.at_level(logging.WARNING, logger="pipeline.checkpoints"):
        library.load("b")
    assert library.loaded_names() == ["a", "b"]
    assert any("exceed the memory budget" in r.getMessage() for r in caplog.records)


def test_cpu_without_a_budget_only_counts_checkpoints(three_models):
    root, _cost = three_models
    library = CheckpointLibrary(root, max_loaded=2)
    engine = _engine(library)
    assert library.residency is None and engine.memory.residency is None
    assert "memory budget none (max_loaded 2)" in engine.memory.describe(library.max_loaded)
    for name in ("a", "b", "c"):
        library.load(name)
    assert library.loaded_names() == ["b", "c"]


def test_offloaded_modes_have_no_byte_budget():
    memory = DeviceMemory(torch.device("cpu"), torch.float32, MemorySettings(mode="medvram", budget_gb=1))
    assert memory.residency is None
    assert "memory budget none (medvram keeps checkpoints on the CPU)" in memory.describe(2)


# -- out-of-memory retry -------------------------------------------------------------------------


def _oom_hook(unet: torch.nn.Module, times: int) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    raised: list[int] = []

    def hook(_module, _args):
        if len(raised) < times:
            raised.append(1)
            raise RuntimeError(OOM_TEXT)

    return raised, unet.register_forward_pre_hook(hook)


LORA_BATCH = {"prompt": "a cat <lora:alpha:1>", "num_images_per_prompt": 2}


@pytest.fixture(scope="module")
def lora_baseline(library) -> list[np.ndarray]:
    return _pixels(_engine(library).generate(_request(**LORA_BATCH)))


@pytest.mark.parametrize(
    ("base", "retry"), [("normal", "medvram"), ("medvram", "lowvram"), ("lowvram", "lowvram")]
)
def test_oom_is_retried_once_in_the_next_lower_mode_with_the_same_pixels(
    library, lora_baseline, caplog, base, retry
):
    request = _request(**LORA_BATCH)
    engine = _engine(library, mode=base, oom_retry=True)
    pipe = library.load("tiny")
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    raised, handle = _oom_hook(pipe.unet, 1)
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.engine"):
            result = engine.generate(request)
    finally:
        handle.remove()
    assert raised == [1]
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(result), lora_baseline, strict=True))
    assert any(f"retrying once in {retry} mode with VAE tiling" in r.getMessage() for r in caplog.records)
    assert engine.memory.stats.moves > 0 and engine.memory.mode == base
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in weights.items()), (
        "LoRA left in the weights"
    )
    assert _offload_hooks(pipe) == 0


def test_oom_twice_fails_cleanly_and_the_next_job_runs(library, lora_baseline):
    engine = _engine(library, oom_retry=True)
    raised, handle = _oom_hook(library.load("tiny").unet, 2)
    try:
        with pytest.raises(OutOfMemory) as info:
            engine.generate(_request(num_images_per_prompt=3))
    finally:
        handle.remove()
    assert raised == [1, 1]
    assert info.value.params["detail"] == OOM_TEXT.splitlines()[0]
    assert info.value.params["batch_size"] == 3
    after = _pixels(engine.generate(_request(**LORA_BATCH)))
    assert all(np.array_equal(a, b) for a, b in zip(after, lora_baseline, strict=True))


def test_without_retry_the_first_oom_fails(library):
    engine = _engine(library, oom_retry=False)
    raised, handle = _oom_hook(library.load("tiny").unet, 1)
    try:
        with pytest.raises(OutOfMemory):
            engine.generate(_request())
    finally:
        handle.remove()
    assert raised == [1]


def test_other_errors_are_not_retried(library):
    engine = _engine(library, oom_retry=True)
    calls = []

    def hook(_module, _args):
        calls.append(1)
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    handle = library.load("tiny").unet.register_forward_pre_hook(hook)
    try:
        with pytest.raises(RuntimeError, match="shapes"):
            engine.generate(_request())
    finally:
        handle.remove()
    assert calls == [1]


# -- on a GPU ------------------------------------------------------------------------------------


CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode", ["medvram", "lowvram"])
def test_offload_on_cuda_keeps_weights_on_the_cpu_and_pixels_equal(models_dir, mode):
    library = CheckpointLibrary(models_dir)
    request = _request(**FULL)
    normal = _pixels(Engine(library, device="cuda", dtype=torch.float16).generate(request))
    engine = Engine(library, device="cuda", dtype=torch.float16, memory_settings=MemorySettings(mode=mode))
    pipe = library.load("tiny")
    weights = {k: v.cpu().clone() for k, v in pipe.unet.state_dict().items()}
    result = _pixels(engine.generate(request))
    assert all(np.array_equal(a, b) for a, b in zip(result, normal, strict=True))
    assert {p.device.type for p in pipe.unet.parameters()} == {"cpu"}
    assert not any(p.is_inference() for p in pipe.unet.parameters())
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in weights.items())
