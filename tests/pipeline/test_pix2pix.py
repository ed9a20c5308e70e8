"""Instruct-pix2pix ("edit") checkpoints (``pipeline.edit_model``): the three-way guidance
on a recording UNet, the image channels the engine gives a real 8-channel UNet, the
infotext's Image CFG scale, and a single file without a ``.yaml`` loaded from its
weights' channel count as A1111 does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline import infotext
from pipeline.checkpoints import CheckpointLibrary
from pipeline.denoiser import CFGPP_DIVISOR, CFGDenoiser, Guidance, PromptConds
from pipeline.engine import Engine
from pipeline.errors import EditModelAndPrompt
from pipeline.request import GenerationRequest
from pipeline.tiny import build_tiny_pipeline
from tests.pipeline.a1111_layout import pipeline_to_a1111
from tests.pipeline.test_denoiser import conds, emb

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")

IMAGE = 2.0  # the value of every image channel the stub sees


class RecordingUNet:
    """An 8-channel UNet stand-in: records every call; its output per row is
    ``0.5·latents + mean(text embedding) + 10·mean(image channels)``, so each row's
    conditioning shows in the result (prompt 1, negative 0; image 2, blank 0)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, x, t, *, encoder_hidden_states, return_dict):
        self.calls.append({"x": x.clone(), "emb": encoder_hidden_states.clone()})
        text = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        image = x[:, 4:].mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
        return (x[:, :4] * 0.5 + text + 10 * image,)


def _denoiser(unet, image_cfg_scale, *, batch=2, prompt=None, **options) -> CFGDenoiser:
    image_cond = torch.full((batch, 4, 2, 2), IMAGE)
    return CFGDenoiser(
        unet,
        prompt or conds((1.0, 1.0)),
        7,
        image_cond=image_cond,
        image_cfg_scale=image_cfg_scale,
        **options,
    )


def _latents(batch: int = 2) -> torch.Tensor:
    return torch.linspace(-1, 1, batch * 16).view(batch, 4, 2, 2)


def _rows(call: dict[str, torch.Tensor]) -> list[tuple[float, float]]:
    """(text, image) of each row: the embedding's mean and the image channels' mean."""
    text = call["emb"].mean(dim=(1, 2)).tolist()
    image = call["x"][:, 4:].mean(dim=(1, 2, 3)).tolist()
    return list(zip(text, image, strict=True))


def test_three_evaluations_per_image_combined_as_a1111_does() -> None:
    unet = RecordingUNet()
    x = _latents()
    eps = _denoiser(unet, 1.5).eps_at_timestep(x, 500)
    (call,) = unet.calls  # one UNet call: prompt and negative have the same token length
    # per image: prompt with the image, negative with the image, negative with zeros
    assert _rows(call) == [(1.0, IMAGE)] * 2 + [(0.0, IMAGE)] * 2 + [(0.0, 0.0)] * 2
    assert all(torch.equal(call["x"][rows, :4], x) for rows in (slice(0, 2), slice(2, 4), slice(4, 6)))
    cond, uncond, blank = 0.5 * x + 1 + 10 * IMAGE, 0.5 * x + 10 * IMAGE, 0.5 * x
    assert torch.equal(eps, blank + 7 * (cond - uncond) + 1.5 * (uncond - blank))  # 0.5·x + 7 + 30


def test_the_k_diffusion_view_combines_the_three_denoised_rows() -> None:
    unet = RecordingUNet()
    x, sigma = _latents(), torch.tensor([2.5, 0.7])
    out = _denoiser(unet, 1.5)(x, sigma)
    (call,) = unet.calls
    assert call["x"].shape[0] == 6
    c_in = torch.rsqrt(sigma**2 + 1).view(-1, 1, 1, 1)
    eps = 0.5 * x * c_in + 7 * 1 + 1.5 * 10 * IMAGE  # the same guidance in eps: linear in the rows
    assert torch.allclose(out, x - sigma.view(-1, 1, 1, 1) * eps, atol=1e-5)


def test_image_cfg_scale_one_is_the_usual_guidance_with_the_image_on_both_halves() -> None:
    unet = RecordingUNet()
    x = _latents()
    eps = _denoiser(unet, 1.0).eps_at_timestep(x, 500)
    (call,) = unet.calls
    assert _rows(call) == [(1.0, IMAGE)] * 2 + [(0.0, IMAGE)] * 2  # two evaluations
    cond, uncond = 0.5 * x + 1 + 10 * IMAGE, 0.5 * x + 10 * IMAGE
    assert torch.equal(eps, uncond + (cond - uncond) * 7)


def test_prompts_of_different_lengths_run_the_negative_rows_together_in_a_second_call() -> None:
    unet = RecordingUNet()
    prompt = PromptConds(parts=(([(1, emb(1.0, 154))], 1.0),), uncond=[(1, emb(0.0))])
    _denoiser(unet, 1.5, prompt=prompt).eps_at_timestep(_latents(), 500)
    first, second = unet.calls
    assert _rows(first) == [(1.0, IMAGE)] * 2 and first["emb"].shape[1] == 154
    assert _rows(second) == [(0.0, IMAGE)] * 2 + [(0.0, 0.0)] * 2


def test_skip_early_cfg_skips_both_negative_rows_and_ngms_does_not_apply() -> None:
    unet = RecordingUNet()
    x = _latents()
    skipping = _denoiser(unet, 1.5, guidance=Guidance(skip_early=0.5, total_steps=4))
    eps = skipping.eps_at_timestep(x, 500)
    assert _rows(unet.calls[0]) == [(1.0, IMAGE)] * 2  # the prompt rows alone: guidance off
    assert torch.equal(eps, 0.5 * x + 1 + 10 * IMAGE)
    assert skipping.infotext_fields == {"Skip Early CFG": 0.5}
    unet.calls.clear()
    ngms = _denoiser(unet, 1.5, guidance=Guidance(ngms=2000.0, ngms_all_steps=True))
    ngms.eps_at_timestep(x, 500)
    assert len(_rows(unet.calls[0])) == 6 and ngms.infotext_fields == {}  # as in A1111: ignored


def test_and_is_refused_unless_image_cfg_scale_is_one() -> None:
    two_parts = conds((1.0, 1.0), (0.5, 0.3))
    with pytest.raises(EditModelAndPrompt) as caught:
        _denoiser(RecordingUNet(), 1.5, prompt=two_parts)
    assert caught.value.key == "error.edit_model_and"
    _denoiser(RecordingUNet(), 1.0, prompt=two_parts).eps_at_timestep(_latents(), 500)


def test_ddim_cfgpp_renoises_with_the_blank_rows() -> None:
    x = _latents()
    guided, unconditional = _denoiser(RecordingUNet(), 1.5).eps_cfgpp(x, 500)
    scale = 7 / CFGPP_DIVISOR
    assert torch.allclose(guided, 0.5 * x + scale + 1.5 * 10 * IMAGE)
    assert torch.equal(unconditional, 0.5 * x)


# -- a real 8-channel UNet through the engine ------------------------------------------------------


def _edit_pipeline():
    from diffusers import UNet2DConditionModel

    pipe = build_tiny_pipeline()
    config = dict(pipe.unet.config)
    config["in_channels"] = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        pipe.unet = UNet2DConditionModel.from_config(config).eval()
    return pipe


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """``edit``: a diffusers folder; ``bare``: the same weights as a single file without a
    ``.yaml`` (assembled from the 4-channel configs in ``cfg``)."""
    base = tmp_path_factory.mktemp("pix2pix")
    sd_dir = base / "models" / "Stable-diffusion"
    sd_dir.mkdir(parents=True)
    pipe = _edit_pipeline()
    pipe.save_pretrained(sd_dir / "edit")
    save_file(pipeline_to_a1111(pipe), sd_dir / "bare.safetensors")
    build_tiny_pipeline().save_pretrained(base / "cfg")
    return base


def _library(models: Path) -> CheckpointLibrary:
    return CheckpointLibrary(models / "models", config_dirs={"sd1": models / "cfg"})


def _init(folder: Path) -> str:
    from PIL import Image

    path = folder / "init.png"
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), np.full((64, 64), 200)], -1)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return str(path)


def _request(init: str, checkpoint: str = "edit", **changes) -> GenerationRequest:
    return GenerationRequest(
        prompt="make it blue", seed=4, num_inference_steps=3, width=64, height=64, checkpoint=checkpoint,
        sampler_name="Euler", init_image=init, denoising_strength=0.9, **changes,
    )  # fmt: skip


def test_the_image_channels_are_the_init_images_unscaled_latent_mode(models, tmp_path) -> None:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
    from diffusers.utils import load_image

    library = _library(models)
    engine = Engine(library, device="cpu")
    pipe = library.load("edit")
    inputs: list[torch.Tensor] = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    init = _init(tmp_path)
    try:
        engine.generate(_request(init, num_images_per_prompt=2))
    finally:
        hook.remove()
    # diffusers' own instruct-pix2pix preparation of the same image: the mode, no scale factor
    pixels = pipe.image_processor.preprocess(load_image(init))
    expected = retrieve_latents(pipe.vae.encode(pixels), sample_mode="argmax")
    assert inputs and all(x.shape == (6, 8, 8, 8) for x in inputs)
    for x in inputs:
        assert torch.allclose(x[:4, 4:], expected.expand(4, -1, -1, -1), atol=1e-5)
        assert torch.equal(x[4:, 4:], torch.zeros_like(x[4:, 4:]))
        assert torch.equal(x[:2, :4], x[4:, :4])


def test_the_infotext_has_image_cfg_scale_after_cfg_scale_for_edit_models_only(models, tmp_path) -> None:
    engine = Engine(_library(models), device="cpu")
    init = _init(tmp_path)
    text = engine.generate(_request(init, image_cfg_scale=2)).images[0].infotext
    assert "CFG scale: 7, Image CFG scale: 2, Seed: 4," in text
    assert infotext.parse(text)["Image CFG scale"] == "2"
    plain = engine.generate(_request(init, checkpoint="tiny")).images[0].infotext
    assert "Image CFG scale" not in plain


def test_a_single_file_without_a_yaml_is_an_edit_model_by_its_weights(models, tmp_path) -> None:
    library = _library(models)
    info = library.resolve("bare")
    assert (info.unet_inputs, info.is_edit_model) == (8, True)
    assert library.load("bare").unet.config.in_channels == 8
    engine = Engine(library, device="cpu")
    init = _init(tmp_path)
    single = np.asarray(engine.generate(_request(init, checkpoint="bare")).images[0].image)
    folder = np.asarray(engine.generate(_request(init)).images[0].image)
    assert single.std() > 0
    assert np.abs(single.astype(int) - folder.astype(int)).max() <= 1


def test_warming_an_edit_model_up_edits_a_grey_image(models) -> None:
    assert Engine(_library(models), device="cpu").warm_up("edit") > 0
