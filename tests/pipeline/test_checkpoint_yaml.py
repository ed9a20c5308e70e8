"""A single-file checkpoint is the model its ``.yaml`` describes, as A1111 instantiates it:
network shapes from the yaml (not the packaged full-size SD 1.x configs), the text encoder
and tokenizer from the folder the yaml names, inpainting UNets with their mask channels,
instruct-pix2pix UNets with their image channels (img2img only), other input channel
counts refused, and a tokenizer without CLIP's start/end tokens refused at load naming
its folder.

Fixtures are built at test time from random weights; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.checkpoints import CheckpointLibrary
from pipeline.engine import Engine
from pipeline.errors import CheckpointLoadError, EditModelNeedsImage
from pipeline.request import GenerationRequest
from pipeline.tiny import build_tiny_pipeline
from tests.pipeline.a1111_layout import pipeline_to_a1111

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")

# The tiny pipeline's networks in LDM terms: 32/64 channels, attention at the second level
# only, 8 heads, context 32, a 4-level VAE of width 32 (SD 1.x: 320/640/1280/1280, 768).
YAML = """\
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.012
    timesteps: 1000
    image_size: 32
    channels: 4
    conditioning_key: {conditioning}
    scale_factor: 0.18215
    use_ema: false
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: {in_channels}
        out_channels: 4
        model_channels: 32
        attention_resolutions: [2]
        num_res_blocks: 2
        channel_mult: [1, 2]
        num_heads: 8
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 32
        legacy: false
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2, 2, 2]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: {version}
"""


def _write_yaml(path: Path, *, in_channels: int = 4, version: str = "clip-tiny") -> None:
    conditioning = "crossattn" if in_channels == 4 else "hybrid"
    text = YAML.format(in_channels=in_channels, conditioning=conditioning, version=version)
    if in_channels == 8:  # A1111's instruct-pix2pix yaml
        text = text.replace("    conditioning_key:", "    cond_stage_key: edit\n    conditioning_key:")
    path.write_text(text)


def _inpainting_pipeline(channels: int = 9):
    """The tiny pipeline with a seeded 9-channel UNet (4 latent + 1 mask + 4 masked image)."""
    from diffusers import UNet2DConditionModel

    pipe = build_tiny_pipeline()
    config = dict(pipe.unet.config)
    config["in_channels"] = channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        pipe.unet = UNet2DConditionModel.from_config(config).eval()
    return pipe


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("yaml-models")
    sd_dir = base / "Stable-diffusion"
    sd_dir.mkdir(parents=True)
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(sd_dir / "folder")
    clip = sd_dir / "clip-tiny"
    pipe.text_encoder.config.save_pretrained(clip)
    pipe.tokenizer.save_pretrained(clip)
    save_file(pipeline_to_a1111(pipe), sd_dir / "shaped.safetensors")
    _write_yaml(sd_dir / "shaped.yaml")
    save_file(pipeline_to_a1111(_inpainting_pipeline()), sd_dir / "inpaint.safetensors")
    _write_yaml(sd_dir / "inpaint.yaml", in_channels=9)
    pix2pix = _inpainting_pipeline(8)
    save_file(pipeline_to_a1111(pix2pix), sd_dir / "pix2pix.safetensors")
    _write_yaml(sd_dir / "pix2pix.yaml", in_channels=8)
    pix2pix.save_pretrained(sd_dir / "pix2pix-folder")
    save_file(pipeline_to_a1111(_inpainting_pipeline(5)), sd_dir / "five.safetensors")
    _write_yaml(sd_dir / "five.yaml", in_channels=5)
    bad = sd_dir / "clip-bad"
    pipe.text_encoder.config.save_pretrained(bad)
    pipe.tokenizer.save_pretrained(bad)
    data = json.loads((bad / "tokenizer.json").read_text(encoding="utf-8"))  # no start token
    data["model"]["vocab"].pop("<|startoftext|>")
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|startoftext|>"]
    (bad / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = json.loads((bad / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("added_tokens_decoder", None)
    (bad / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file(pipeline_to_a1111(pipe), sd_dir / "badtok.safetensors")
    _write_yaml(sd_dir / "badtok.yaml", version="clip-bad")
    return base


def _library(models: Path) -> CheckpointLibrary:
    return CheckpointLibrary(models)  # no config_dirs: the packaged configs are full-size SD 1.x


def _draw(engine: Engine, name: str, **changes) -> np.ndarray:
    request = GenerationRequest(
        prompt="a cat", seed=3, num_inference_steps=3, width=64, height=64, checkpoint=name, **changes
    )
    return np.asarray(engine.generate(request).images[0].image)


def test_the_yaml_defines_the_networks_and_the_image_matches_the_diffusers_folder(models) -> None:
    library = _library(models)
    pipe = library.load("shaped")
    assert pipe.unet.config.block_out_channels == [32, 64]
    assert pipe.unet.config.cross_attention_dim == 32 and pipe.unet.config.attention_head_dim == 8
    assert pipe.unet.config.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert pipe.vae.config.block_out_channels == [32, 64, 64, 64]
    assert pipe.text_encoder.config.hidden_size == 32
    engine = Engine(library, device="cpu")
    single = _draw(engine, "shaped")
    assert np.array_equal(single, _draw(engine, "folder"))
    assert single.std() > 0


def test_an_inpainting_checkpoint_loads_and_draws_with_a1111s_mask_channels(models) -> None:
    library = _library(models)
    pipe = library.load("inpaint")
    assert pipe.unet.config.in_channels == 9
    inputs: list[torch.Tensor] = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    try:
        engine = Engine(library, device="cpu")
        image = _draw(engine, "inpaint")
    finally:
        hook.remove()
    assert image.shape == (64, 64, 3)
    assert inputs and all(x.shape[1] == 9 for x in inputs)
    assert all(torch.equal(x[:, 4], torch.ones_like(x[:, 4])) for x in inputs)  # the mask: all ones
    grey = inputs[0][:, 5:]
    assert all(torch.equal(x[:, 5:], grey) for x in inputs)  # the grey image's latents, every call


def test_an_inpainting_checkpoint_runs_img2img(models, tmp_path) -> None:
    from PIL import Image

    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 40, 90)).save(init)
    engine = Engine(_library(models), device="cpu")
    image = _draw(engine, "inpaint", init_image=str(init), denoising_strength=0.5)
    assert image.shape == (64, 64, 3)


def test_a_tokenizer_without_clips_start_token_is_refused_naming_its_folder(models) -> None:
    with pytest.raises(CheckpointLoadError, match="clip-bad"):
        _library(models).load("badtok")


def _init_image(folder: Path) -> str:
    from PIL import Image

    path = folder / "init.png"
    gradient = np.linspace(0, 255, 64, dtype=np.uint8)
    pixels = np.stack(
        [np.tile(gradient, (64, 1)), np.tile(gradient[:, None], (1, 64)), np.full((64, 64), 90)], -1
    )
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return str(path)


def test_an_instruct_pix2pix_checkpoint_loads_and_edits_like_its_diffusers_folder(models, tmp_path) -> None:
    library = _library(models)
    assert library.resolve("pix2pix").is_edit_model  # from the weights, before any load
    assert library.resolve("pix2pix-folder").is_edit_model
    assert library.resolve("inpaint").is_inpainting and not library.resolve("shaped").is_edit_model
    assert library.load("pix2pix").unet.config.in_channels == 8
    engine = Engine(library, device="cpu")
    init = _init_image(tmp_path)
    single = _draw(engine, "pix2pix", init_image=init, denoising_strength=0.8)
    folder = _draw(engine, "pix2pix-folder", init_image=init, denoising_strength=0.8)
    assert single.std() > 0
    # two loading paths, the same weights: the same pixels within one 8-bit level
    assert np.abs(single.astype(int) - folder.astype(int)).max() <= 1


def test_text_to_image_with_an_instruct_pix2pix_checkpoint_is_refused_before_sampling(models) -> None:
    engine = Engine(_library(models), device="cpu")
    with pytest.raises(EditModelNeedsImage, match="pix2pix") as caught:
        _draw(engine, "pix2pix")
    assert caught.value.key == "error.edit_model_needs_image"
    assert caught.value.params == {"checkpoint": "pix2pix"}


def test_a_unet_with_other_input_channels_is_refused_at_load(models) -> None:
    with pytest.raises(
        CheckpointLoadError, match="5 input channels; 4 .text to image., 8 .instruct-pix2pix."
    ):
        _library(models).load("five")
