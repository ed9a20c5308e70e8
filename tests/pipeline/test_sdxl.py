"""SDXL checkpoints on the tiny SDXL: loading a diffusers folder and SGM-layout single files
offline, A1111's two-encoder conditioning with pooled vectors and size ids, SDXL σ schedules,
embedding pairs, infotexts, hires fix and img2img."""

from __future__ import annotations

import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline import clip, conditioning, hashing, infotext, samplers, sdxl
from pipeline.checkpoints import PACKAGED_CONFIGS, CheckpointLibrary
from pipeline.denoiser import PooledCond
from pipeline.engine import Engine
from pipeline.errors import CheckpointLoadError
from pipeline.request import GenerationRequest
from pipeline.tiny import SDXL_POOLED_WIDTH, SDXL_WIDTHS, build_tiny_sdxl, build_tiny_tokenizer
from tests.pipeline.sdxl_layout import sdxl_to_sgm

WIDTH_L, WIDTH_G = SDXL_WIDTHS
NAMES = ("xl-folder", "xl", "sub/xl-pickled")


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    """A models folder with the tiny SDXL as a diffusers folder, a ``.safetensors`` and a
    ``.ckpt`` (SGM layout); ``cfg`` is the tiny SDXL's config folder (with tokenizers)."""
    base = tmp_path_factory.mktemp("xl")
    sd_dir = base / "models" / "Stable-diffusion"
    (sd_dir / "sub").mkdir(parents=True)
    (base / "models" / "embeddings").mkdir()
    pipe = build_tiny_sdxl()
    pipe.save_pretrained(base / "cfg")
    pipe.save_pretrained(sd_dir / "xl-folder")
    state = sdxl_to_sgm(pipe)
    save_file(state, sd_dir / "xl.safetensors")
    torch.save({"state_dict": state, "global_step": 3}, sd_dir / "sub" / "xl-pickled.ckpt")
    return base


@pytest.fixture(scope="module")
def library(xl_dir):
    return CheckpointLibrary(
        xl_dir / "models", max_loaded=4, config_dirs={"sdxl": xl_dir / "cfg"}, hash_cache=xl_dir / "h.json"
    )


@pytest.fixture(scope="module")
def xl_engine(library):
    return Engine(library, device="cpu")


def _request(**changes) -> GenerationRequest:
    base = GenerationRequest(
        prompt="a cat",
        negative_prompt="blurry",
        seed=7,
        width=64,
        height=64,
        num_inference_steps=2,
        sampler_name="Euler",
        checkpoint="xl",
    )
    return base.replace(**changes)


def _pixels(result, index: int = 0) -> np.ndarray:
    return np.asarray(result.images[index].image).astype(np.int16)


def _tokenize(pipe):
    return lambda texts: pipe.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]


def _chunks(pipe, text: str, embeddings=None) -> list[clip.PromptChunk]:
    return clip.chunk_prompt(text, _tokenize(pipe), embeddings=embeddings)[0]


def _conds(pipe, prompt: str, negative: str = "", steps: int = 4, size=(64, 64)):
    return conditioning.build_conds(
        prompt,
        negative,
        steps,
        chunk=lambda text: _chunks(pipe, text),
        encode=lambda chunks: sdxl.encode_raw(pipe, chunks),
        device=torch.device("cpu"),
        dtype=torch.float32,
        time_ids=sdxl.time_ids(*size),
        zero_empty_negative=True,
    )


@pytest.fixture
def unet_calls(library):
    """The ``added_cond_kwargs``, text conditioning and timesteps of every UNet call on the
    loaded ``xl``."""
    calls = []

    def record(module, args, kwargs):
        calls.append(
            types.SimpleNamespace(
                t=args[1].clone(),
                added=kwargs["added_cond_kwargs"],
                context=kwargs["encoder_hidden_states"].clone(),
            )
        )

    handle = library.load("xl").unet.register_forward_pre_hook(record, with_kwargs=True)
    yield calls
    handle.remove()


# -- loading --------------------------------------------------------------------------------------


def test_folder_and_single_files_are_recognised_as_sdxl_and_load_offline(library):
    from diffusers import StableDiffusionXLPipeline

    assert library.names() == ["tiny", "xl-folder", "sub/xl-pickled", "xl"]
    assert library.resolve("xl-folder").family == "sdxl"
    assert library.resolve("xl").family == "sdxl"  # from the safetensors header
    assert library.resolve("sub/xl-pickled").family == "sdxl"  # from the pickle's records, weights unread
    for name in NAMES:
        pipe = library.load(name)
        assert isinstance(pipe, StableDiffusionXLPipeline) and sdxl.is_sdxl(pipe)
        assert sdxl.text_widths(pipe) == SDXL_WIDTHS
    assert library.resolve("sub/xl-pickled").family == "sdxl"
    assert not sdxl.is_sdxl(library.load("tiny"))


def test_folder_and_single_files_draw_the_same_pixels(xl_engine, xl_dir):
    results = {name: xl_engine.generate(_request(checkpoint=name)) for name in NAMES}
    want = _pixels(results["xl-folder"])
    assert want.std() > 1  # not a flat image
    for name in NAMES[1:]:
        assert np.array_equal(_pixels(results[name]), want), name
    digest = hashing.sha256(xl_dir / "models" / "Stable-diffusion" / "xl.safetensors")
    assert results["xl"].model_hash == digest[:10]
    assert f"Model hash: {digest[:10]}, Model: xl," in results["xl"].images[0].infotext


def test_tokenizers_come_from_the_tokenizer_folder(xl_dir, xl_engine, tmp_path):
    """A real single file has no tokenizer: both encoders read ``tokenizer_dir``'s vocabulary,
    bigG with OpenCLIP's "!" padding."""
    configs = tmp_path / "cfg"
    shutil.copytree(xl_dir / "cfg", configs, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer*"))
    with pytest.raises(CheckpointLoadError, match="tokenizer"):
        CheckpointLibrary(xl_dir / "models", config_dirs={"sdxl": configs}).load("xl")
    build_tiny_tokenizer().save_pretrained(tmp_path / "vocab")
    library = CheckpointLibrary(
        xl_dir / "models", config_dirs={"sdxl": configs}, tokenizer_dir=tmp_path / "vocab"
    )
    pipe = library.load("xl")
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    got = Engine(library, device="cpu").generate(_request())
    assert np.array_equal(_pixels(got), _pixels(xl_engine.generate(_request())))


def test_incomplete_or_refiner_files_are_refused_clearly(xl_dir, tmp_path):
    sd_dir = tmp_path / "Stable-diffusion"
    sd_dir.mkdir()
    state = sdxl_to_sgm(build_tiny_sdxl())
    save_file(
        {k: v for k, v in state.items() if not k.startswith("first_stage_model.")},
        sd_dir / "novae.safetensors",
    )
    save_file(
        {"conditioner.embedders.0.model.text_projection": torch.zeros(2, 2)}, sd_dir / "refiner.safetensors"
    )
    library = CheckpointLibrary(tmp_path, config_dirs={"sdxl": xl_dir / "cfg"})
    assert library.resolve("novae").family == "sdxl"
    with pytest.raises(CheckpointLoadError, match="no VAE weights"):
        library.load("novae")
    with pytest.raises(CheckpointLoadError, match="refiner"):
        library.load("refiner")


def test_packaged_configs_describe_sdxl_base():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder = PACKAGED_CONFIGS / "sdxl"
    unet = UNet2DConditionModel.load_config(folder, subfolder="unet")
    clip_l = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    clip_g = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2", local_files_only=True)
    assert (clip_l.hidden_size, clip_l.num_hidden_layers) == (768, 12)
    assert (clip_g.hidden_size, clip_g.num_hidden_layers, clip_g.projection_dim) == (1280, 32, 1280)
    assert unet["cross_attention_dim"] == clip_l.hidden_size + clip_g.hidden_size == 2048
    time_ids_width = 6 * unet["addition_time_embed_dim"]
    assert unet["projection_class_embeddings_input_dim"] == clip_g.projection_dim + time_ids_width == 2816
    assert AutoencoderKL.load_config(folder, subfolder="vae")["scaling_factor"] == 0.13025


def test_real_sdxl_encoders_give_2048_wide_tokens_and_a_1280_pooled_vector():
    """The shipped configs' encoders, built without weights (meta tensors), through our conditioning."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = PACKAGED_CONFIGS / "sdxl"
    with init_empty_weights():
        clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True))
        config_g = CLIPTextConfig.from_pretrained(folder / "text_encoder_2", local_files_only=True)
        clip_g = CLIPTextModelWithProjection(config_g)
    tokenizer = build_tiny_tokenizer()
    pipe = types.SimpleNamespace(text_encoder=clip_l, text_encoder_2=clip_g, tokenizer=tokenizer)
    conds = conditioning.build_conds(
        "a cat",
        "",
        4,
        chunk=lambda text: _chunks(pipe, text),
        encode=lambda chunks: sdxl.encode_raw(pipe, chunks),
        device=torch.device("meta"),
        dtype=torch.float16,
        time_ids=sdxl.time_ids(1024, 1024),
    )
    cond = conds.parts[0][0][0][1]
    assert cond.tokens.shape == (77, 2048) and cond.pooled.shape == (1280,)


# -- conditioning -----------------------------------------------------------------------------------


def test_tokens_are_both_penultimate_layers_and_pooled_is_bigg_projected(library):
    pipe = library.load("xl")
    [chunk] = _chunks(pipe, "a cat")
    raw = sdxl.encode_raw(pipe, [chunk])
    ids = torch.tensor([chunk.tokens])
    first_eos = chunk.tokens.index(clip.EOS_ID)
    ids_g = ids.clone()
    ids_g[0, first_eos + 1 :] = 0  # OpenCLIP pads with 0 after the end token
    with torch.no_grad():
        out_l = pipe.text_encoder(input_ids=ids, output_hidden_states=True)
        out_g = pipe.text_encoder_2(input_ids=ids_g, output_hidden_states=True)
    assert torch.equal(raw.streams[0], out_l.hidden_states[-2])  # no final LayerNorm
    assert torch.equal(raw.streams[1], out_g.hidden_states[-2])
    assert torch.equal(raw.pooled, out_g.text_embeds)
    assert raw.pooled.shape == (1, SDXL_POOLED_WIDTH)


def test_conds_join_both_encoders_and_pool_the_first_chunk(library):
    pipe = library.load("xl")
    short = _conds(pipe, "a cat", "blurry", size=(64, 48))
    cond = short.parts[0][0][0][1]
    assert isinstance(cond, PooledCond)
    assert cond.tokens.shape == (77, WIDTH_L + WIDTH_G) and cond.pooled.shape == (SDXL_POOLED_WIDTH,)
    assert short.time_ids.tolist() == [48, 64, 0, 0, 48, 64]
    long = _conds(pipe, "a cat BREAK a dog").parts[0][0][0][1]
    assert long.tokens.shape == (154, WIDTH_L + WIDTH_G)
    assert torch.equal(long.pooled, cond.pooled)  # the first chunk's, which is "a cat" alone
    assert not torch.equal(long.tokens[:77], long.tokens[77:])


def test_each_scheduled_and_part_carries_its_own_pooled_vector(library):
    pipe = library.load("xl")
    conds = _conds(pipe, "[a cat:a dog:2] AND a hat :0.5", steps=4)
    (edited, weight_a), (hat, weight_b) = conds.parts
    assert (weight_a, weight_b) == (1.0, 0.5)
    assert [end for end, _ in edited] == [2, 4]
    cat, dog = edited[0][1], edited[1][1]
    assert torch.equal(cat.pooled, _conds(pipe, "a cat").parts[0][0][0][1].pooled)
    assert torch.equal(dog.pooled, _conds(pipe, "a dog").parts[0][0][0][1].pooled)
    assert not torch.equal(cat.pooled, dog.pooled) and not torch.equal(hat[0][1].pooled, cat.pooled)


def test_an_empty_negative_prompt_is_zeros(library):
    pipe = library.load("xl")
    [(_, empty)] = _conds(pipe, "a cat", "").uncond
    assert not empty.tokens.any() and not empty.pooled.any()
    [(_, blurry)] = _conds(pipe, "a cat", "blurry").uncond
    assert blurry.tokens.any() and blurry.pooled.any()
    # Only when every scheduled text is empty: "[:blurry:2]" starts from an encoded "".
    (_, first), (_, second) = _conds(pipe, "a cat", "[:blurry:2]").uncond
    assert first.tokens.any() and first.pooled.any()
    positive = _conds(pipe, "", "").parts[0][0][0][1]
    assert positive.tokens.any()  # an empty positive prompt is encoded


def test_embedding_pair_columns_reach_their_own_encoder(library):
    pipe = library.load("xl")
    target = _tokenize(pipe)(["q"])[0][0]

    def encode(vectors: torch.Tensor) -> conditioning.RawText:
        match = clip.EmbeddingMatch(name="q", vectors=vectors, token_length=1)
        chunks = _chunks(pipe, "a q cat", lambda ids, pos: match if ids[pos] == target else None)
        assert chunks[0].fixes
        return sdxl.encode_raw(pipe, chunks)

    generator = torch.Generator().manual_seed(0)
    clip_l, clip_g = (torch.randn(2, width, generator=generator) for width in SDXL_WIDTHS)
    base = encode(torch.cat([clip_l, clip_g], dim=1))
    other_g = encode(torch.cat([clip_l, clip_g + 1], dim=1))
    other_l = encode(torch.cat([clip_l + 1, clip_g], dim=1))
    assert torch.equal(base.streams[0], other_g.streams[0]) and not torch.equal(
        base.streams[1], other_g.streams[1]
    )
    assert not torch.equal(base.pooled, other_g.pooled)
    assert not torch.equal(base.streams[0], other_l.streams[0]) and torch.equal(
        base.streams[1], other_l.streams[1]
    )


# -- generation -----------------------------------------------------------------------------------------


def test_infotext_is_written_and_reproduces_the_image(xl_engine, library):
    request = _request(
        prompt="a (cat:1.2), night",
        sampler_name="DPM++ 2M",
        scheduler="Karras",
        width=64,
        height=48,
        clip_skip=2,
    )
    result = xl_engine.generate(request)
    text = result.images[0].infotext
    fields = infotext.parse(text)
    digest = library.resolve("xl").sha256
    assert (fields["Model hash"], fields["Model"], fields["Size-1"], fields["Size-2"]) == (
        digest,
        "xl",
        "64",
        "48",
    )
    assert fields["Clip skip"] == "2" and fields["Schedule type"] == "Karras"
    rerun = GenerationRequest(
        prompt=fields["Prompt"],
        negative_prompt=fields["Negative prompt"],
        num_inference_steps=int(fields["Steps"]),
        sampler_name=fields["Sampler"],
        scheduler=fields["Schedule type"],
        guidance_scale=int(fields["CFG scale"]),
        seed=int(fields["Seed"]),
        width=int(fields["Size-1"]),
        height=int(fields["Size-2"]),
        clip_skip=int(fields["Clip skip"]),
        checkpoint=library.lookup(fields["Model hash"]).name,
    )
    again = xl_engine.generate(rerun)
    assert again.images[0].infotext == text
    assert np.array_equal(_pixels(again), _pixels(result))
    # Clip skip does nothing for SDXL; it is only recorded.
    plain = xl_engine.generate(request.replace(clip_skip=1))
    assert np.array_equal(_pixels(plain), _pixels(result)) and "Clip skip" not in plain.images[0].infotext


def test_prompt_editing_alternation_and_and_change_the_conditioning(xl_engine, unet_calls):
    """Whether a small change of conditioning survives to 8-bit pixels on a random tiny UNet
    depends on the CPU's kernels; what the UNet is given does not."""

    def contexts(prompt: str) -> list[torch.Tensor]:
        unet_calls.clear()
        xl_engine.generate(_request(prompt=prompt, num_inference_steps=3))
        return [call.context for call in unet_calls]

    plain = contexts("a cat in a house")
    for prompt in ("a [cat:dog:1] in a house", "a [cat|dog] in a house", "a cat in a house AND a hat :0.6"):
        changed = contexts(prompt)
        assert any(
            a.shape != b.shape or not torch.allclose(a, b) for a, b in zip(changed, plain, strict=False)
        ) or len(changed) != len(plain), prompt
    edited = contexts("a [cat:dog:1] in a house")
    assert torch.allclose(edited[0], plain[0])  # step 1 still draws the cat


def test_every_unet_call_gets_pooled_vectors_and_the_request_size(xl_engine, unet_calls):
    """Batched cond/uncond calls (equal lengths) and separate ones (a longer prompt)."""
    xl_engine.generate(_request(width=64, height=48, num_images_per_prompt=2))
    joint = unet_calls[0].added
    assert joint["text_embeds"].shape == (4, SDXL_POOLED_WIDTH)  # 2 images x (cond, uncond)
    assert joint["time_ids"].tolist() == [[48, 64, 0, 0, 48, 64]] * 4
    assert not torch.equal(joint["text_embeds"][0], joint["text_embeds"][2])
    unet_calls.clear()
    xl_engine.generate(_request(prompt="a cat BREAK a dog", width=64, height=48))
    shapes = [call.added["text_embeds"].shape[0] for call in unet_calls]
    assert shapes[:2] == [1, 1]  # cond, then uncond: 154 vs 77 tokens
    assert all(call.added["time_ids"].tolist() == [[48, 64, 0, 0, 48, 64]] for call in unet_calls)


def test_hires_pass_conditions_on_the_target_size(xl_engine, unet_calls):
    request = _request(width=64, height=48, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2)
    result = xl_engine.generate(request)
    assert result.images[0].image.size == (96, 72)
    sizes = [call.added["time_ids"][0].tolist() for call in unet_calls]
    assert sizes == [[48, 64, 0, 0, 48, 64]] * 2 + [[72, 96, 0, 0, 72, 96]] * 2
    assert "Hires upscale: 1.5" in result.images[0].infotext


def test_img2img_conditions_on_the_request_size(xl_engine, unet_calls, tmp_path):
    path = tmp_path / "init.png"
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    request = _request(
        width=64, height=48, init_image=str(path), denoising_strength=0.5, num_inference_steps=4
    )
    result = xl_engine.generate(request)
    assert result.images[0].image.size == (64, 48)
    assert unet_calls and all(c.added["time_ids"][0].tolist() == [48, 64, 0, 0, 48, 64] for c in unet_calls)
    assert "Denoising strength: 0.5" in result.images[0].infotext
    assert not np.array_equal(
        _pixels(result), _pixels(xl_engine.generate(request.replace(denoising_strength=0.9)))
    )


def test_schedules_use_the_sdxl_tables(xl_engine, unet_calls):
    xl_engine.generate(_request(scheduler="Align Your Steps", num_inference_steps=3))
    got = torch.stack([call.t[0] for call in unet_calls])
    sigmas = samplers.sigma_schedule("Euler", "Align Your Steps", 3, sdxl=True).sigmas[:-1]
    sd15 = samplers.sigma_schedule("Euler", "Align Your Steps", 3).sigmas[:-1]
    assert torch.allclose(got, samplers.sigma_to_timestep(sigmas))
    assert not torch.allclose(got, samplers.sigma_to_timestep(sd15))


def test_embedding_pairs_apply_and_single_encoder_embeddings_do_not(xl_engine, xl_dir):
    folder = xl_dir / "models" / "embeddings"
    generator = torch.Generator().manual_seed(5)
    before = {p: xl_engine.generate(_request(prompt=p)) for p in ("a xlpair cat", "a sdonly cat")}
    pair = folder / "xlpair.safetensors"
    save_file(
        {
            "clip_l": torch.randn(2, WIDTH_L, generator=generator),
            "clip_g": torch.randn(2, WIDTH_G, generator=generator),
        },
        pair,
    )
    torch.save({"string_to_param": {"*": torch.randn(1, WIDTH_L, generator=generator)}}, folder / "sdonly.pt")
    xl_engine.embeddings.refresh()
    try:
        with_pair = xl_engine.generate(_request(prompt="a xlpair cat"))
        assert not np.array_equal(_pixels(with_pair), _pixels(before["a xlpair cat"]))
        digest = hashing.short_hash(pair, "textual_inversion")
        assert f'TI hashes: "xlpair: {digest}"' in with_pair.images[0].infotext
        # A CLIP-L-wide embedding fits neither SDXL encoder pair: left as plain words, as in A1111.
        plain = xl_engine.generate(_request(prompt="a sdonly cat"))
        assert np.array_equal(_pixels(plain), _pixels(before["a sdonly cat"]))
        assert "TI hashes" not in plain.images[0].infotext
    finally:
        for path in folder.iterdir():
            path.unlink()
        xl_engine.embeddings.refresh()


def test_sd1_requests_still_use_the_sd15_tables(engine):
    """The tiny SD1 model gets no size ids and the SD 1.5 Align Your Steps table."""
    calls = []
    unet = engine.library.load("tiny").unet
    handle = unet.register_forward_pre_hook(lambda m, a, k: calls.append((a[1][0], k)), with_kwargs=True)
    try:
        engine.generate(_request(checkpoint="tiny", scheduler="Align Your Steps", num_inference_steps=3))
    finally:
        handle.remove()
    sigmas = samplers.sigma_schedule("Euler", "Align Your Steps", 3).sigmas[:-1]
    assert torch.allclose(torch.stack([t for t, _ in calls]), samplers.sigma_to_timestep(sigmas))
    assert all("added_cond_kwargs" not in kwargs for _, kwargs in calls)
