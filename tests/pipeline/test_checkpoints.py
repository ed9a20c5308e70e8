from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.checkpoint_assembly as checkpoint_assembly
import pipeline.checkpoints as checkpoints
from pipeline import hashing, safe_load
from pipeline.checkpoints import CheckpointInfo, CheckpointLibrary
from pipeline.engine import Engine
from pipeline.errors import CheckpointLoadError, UnknownCheckpoint
from pipeline.request import GenerationRequest
from pipeline.safe_load import UnsafeCheckpoint
from pipeline.tiny import build_tiny_pipeline
from tests.pipeline.a1111_layout import a1111_library, fake_diffusers_folder
from tests.pipeline.crafted_files import safetensors_header, write


@pytest.fixture(scope="module")
def saved_models_dir(tmp_path_factory):
    """A models folder holding the tiny pipeline saved as a diffusers folder ``foo``."""
    root = tmp_path_factory.mktemp("models")
    build_tiny_pipeline().save_pretrained(root / "Stable-diffusion" / "foo")
    return root


def test_without_models_dir_only_tiny():
    library = CheckpointLibrary(None)
    assert library.names() == ["tiny"]
    assert library.resolve("tiny") == CheckpointInfo(
        name="tiny",
        path=None,
        kind="builtin",
        sha256=None,
        family="sd1",
        prediction_type="epsilon",
        unet_inputs=4,
    )


def test_missing_models_folder_is_not_an_error(tmp_path):
    assert CheckpointLibrary(tmp_path / "nowhere").names() == ["tiny"]


def test_names_tiny_first_then_diffusers_folders_sorted(tmp_path):
    for name in ("zeta", "Alpha", "beta"):
        fake_diffusers_folder(tmp_path, name)
    (tmp_path / "Stable-diffusion" / "not-a-model").mkdir()
    (tmp_path / "Stable-diffusion" / "single.safetensors").write_bytes(b"x")
    library = CheckpointLibrary(tmp_path)
    # A broken single file is left out of the list and reported with the reason.
    assert library.names() == ["tiny", "Alpha", "beta", "zeta"]
    [skipped] = library.unreadable()
    assert (skipped.name, skipped.kind) == ("Stable-diffusion/single.safetensors", "checkpoint")
    assert "too short" in skipped.reason
    info = library.resolve("beta")
    assert info.kind == "diffusers"
    assert info.path == tmp_path / "Stable-diffusion" / "beta"
    assert info.sha256 is None


def test_folder_named_like_the_builtin_is_ignored(tmp_path):
    fake_diffusers_folder(tmp_path, "TINY")
    library = CheckpointLibrary(tmp_path)
    assert library.names() == ["tiny"]
    assert library.resolve("TINY").kind == "builtin"


def test_resolve_is_case_insensitive(tmp_path):
    fake_diffusers_folder(tmp_path, "MyModel")
    library = CheckpointLibrary(tmp_path)
    assert library.resolve("mymodel").name == "MyModel"
    assert library.resolve("TINY").name == "tiny"


def test_unknown_checkpoint_lists_available_names(tmp_path):
    fake_diffusers_folder(tmp_path, "foo")
    library = CheckpointLibrary(tmp_path)
    with pytest.raises(UnknownCheckpoint) as info:
        library.resolve("bar")
    assert "tiny, foo" in str(info.value)
    assert info.value.params == {"name": "bar", "available": "tiny, foo"}
    with pytest.raises(UnknownCheckpoint):
        library.load("bar")


def test_refresh_rescans(tmp_path):
    library = CheckpointLibrary(tmp_path)
    assert library.names() == ["tiny"]
    fake_diffusers_folder(tmp_path, "later")
    assert library.names() == ["tiny"]  # scanned once, until asked again
    library.refresh()
    assert library.names() == ["tiny", "later"]


def test_load_tiny_is_cached():
    library = CheckpointLibrary(None)
    first = library.load("tiny")
    assert library.load("Tiny") is first
    assert library.loaded_names() == ["tiny"]


def test_concurrent_loads_build_once(monkeypatch):
    calls = []
    real_build = checkpoints.build_tiny_pipeline

    def counting_build():
        calls.append(1)
        return real_build()

    monkeypatch.setattr(checkpoints, "build_tiny_pipeline", counting_build)
    library = CheckpointLibrary(None)
    results = []
    threads = [threading.Thread(target=lambda: results.append(library.load("tiny"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(results) == 4 and all(r is results[0] for r in results)


def test_least_recently_used_pipeline_is_dropped(saved_models_dir):
    library = CheckpointLibrary(saved_models_dir, max_loaded=1)
    tiny = library.load("tiny")
    library.load("foo")
    assert library.loaded_names() == ["foo"]
    assert library.load("tiny") is not tiny


def test_max_loaded_must_be_positive():
    with pytest.raises(ValueError, match="max_loaded"):
        CheckpointLibrary(None, max_loaded=0)


def test_diffusers_folder_loads_offline_with_tiny_weights(saved_models_dir):
    library = CheckpointLibrary(saved_models_dir)
    assert library.names() == ["tiny", "foo"]
    pipe = library.load("foo")
    assert library.load("foo") is pipe
    assert pipe.safety_checker is None
    assert pipe.tokenizer.convert_tokens_to_ids(",</w>") == 267
    reference = build_tiny_pipeline()
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_broken_folder_raises_load_error_with_reason(tmp_path):
    fake_diffusers_folder(tmp_path, "broken")
    library = CheckpointLibrary(tmp_path)
    with pytest.raises(CheckpointLoadError) as info:
        library.load("broken")
    assert info.value.params["name"] == "broken"
    assert info.value.params["reason"]
    assert "broken" in str(info.value)
    assert library.loaded_names() == []


def test_empty_tokenizer_is_rejected(saved_models_dir, monkeypatch):
    # An offline load can silently produce a 2-token tokenizer (TESTING-NOTES §2.4).
    monkeypatch.setattr(checkpoint_assembly, "_MIN_TOKENIZER_SIZE", 10**6)
    library = CheckpointLibrary(saved_models_dir)
    with pytest.raises(CheckpointLoadError, match="tokenizer"):
        library.load("foo")


# --------------------------------------------------------------------------------------
# A1111 layout: single files, hashes, side files


def _pixels(library, name):
    request = GenerationRequest(
        prompt="a cat", seed=1, num_inference_steps=2, width=64, height=64, checkpoint=name
    )
    result = Engine(library, device="cpu").generate(request)
    return result, np.asarray(result.images[0].image)


def test_single_files_are_listed_with_side_files(a1111_dir):
    library = a1111_library(a1111_dir)
    assert library.names() == ["tiny", "folder", "single", "sub/pickled"]
    sd_dir = a1111_dir / "models" / "Stable-diffusion"
    single = library.infos()[2]
    assert (single.kind, single.family, single.prediction_type, single.use_ema) == (
        "single_file",
        "sd1",
        "epsilon",
        False,
    )
    assert single.vae_path == sd_dir / "single.vae.pt"
    assert single.config_path == sd_dir / "single.yaml"
    assert single.sha256 is None  # nothing hashed until asked for
    pickled = library.resolve("sub/pickled")
    assert pickled.family == "sd1"  # the scan reads the pickle's records, not its weights
    assert pickled.use_ema is True and pickled.prediction_type is None
    assert pickled.vae_path == sd_dir / "sub" / "pickled.vae.pt"
    assert pickled.model_name == "pickled"


def test_single_files_generate_the_same_pixels_as_tiny(a1111_dir):
    library = a1111_library(a1111_dir)
    _, want = _pixels(library, "tiny")
    for name in ("folder", "single", "sub/pickled"):
        result, got = _pixels(library, name)
        assert np.array_equal(got, want), name
    result, _ = _pixels(library, "single")
    digest = hashing.sha256(a1111_dir / "models" / "Stable-diffusion" / "single.safetensors")
    assert result.model_hash == digest[:10]
    assert f"Model hash: {digest[:10]}" in result.images[0].infotext
    assert library.resolve("sub/pickled").family == "sd1"  # learnt while loading


def test_hashes_and_lookup_aliases(a1111_dir):
    library = a1111_library(a1111_dir, hash_cache=a1111_dir / "cache.json")
    path = a1111_dir / "models" / "Stable-diffusion" / "single.safetensors"
    full, old = hashing.sha256(path), hashing.old_model_hash(path)
    info = library.resolve("single")
    assert (info.sha256, info.full_sha256, info.old_hash) == (full[:10], full, old)
    assert info.title == f"single.safetensors [{full[:10]}]"
    fresh = a1111_library(a1111_dir, hash_cache=a1111_dir / "cache-2.json")
    for text in (full[:10], full, old, "single.safetensors", "single", f"single [{full[:10]}]", info.title):
        assert fresh.lookup(text).name == "single", text
    assert fresh.lookup("pickl").name == "sub/pickled"
    assert fresh.lookup("0123456789") is None


def test_hash_cache_is_persisted_and_reused(a1111_dir, monkeypatch):
    cache = a1111_dir / "persist.json"
    first = a1111_library(a1111_dir, hash_cache=cache).resolve("single").sha256
    assert cache.is_file()

    def no_hashing(*args, **kwargs):
        raise AssertionError("hashed again")

    monkeypatch.setattr(hashing, "_full_hash", no_hashing)
    assert a1111_library(a1111_dir, hash_cache=cache).resolve("single").sha256 == first


def test_default_hash_cache_lives_beside_the_models_folder(tmp_path):
    library = CheckpointLibrary(tmp_path / "models")
    assert library.hashes._path == tmp_path / "cache" / "hashes.json"


def test_v_prediction_from_yaml_and_metadata(a1111_dir, tmp_path):
    from safetensors.torch import save_file

    sd_dir = tmp_path / "models" / "Stable-diffusion"
    sd_dir.mkdir(parents=True)
    state = safe_load.load_state_dict(a1111_dir / "models" / "Stable-diffusion" / "single.safetensors")
    save_file(state, sd_dir / "vyaml.safetensors")
    (sd_dir / "vyaml.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    save_file(state, sd_dir / "vmeta.safetensors", metadata={"modelspec.prediction_type": "v"})
    library = CheckpointLibrary(tmp_path / "models", config_dirs={"sd1": a1111_dir / "cfg"})
    assert library.resolve("vyaml").prediction_type == "v_prediction"
    assert library.resolve("vmeta").prediction_type == "v_prediction"
    assert library.load("vyaml").scheduler.config.prediction_type == "v_prediction"


def test_detect_family_from_keys_and_shapes():
    assert checkpoints.detect_family(["conditioner.embedders.0.transformer.x"], {}) == "sdxl"
    assert checkpoints.detect_family(["cond_stage_model.model.ln_final.weight"], {}) == "sd2"
    assert checkpoints.detect_family(["cond_stage_model.transformer.text_model.x"], {}) == "sd1"
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert checkpoints.detect_family([key], {key: (320, 1024)}) == "sd2"
    assert checkpoints.detect_family([key], {key: (320, 768)}) == "sd1"
    assert checkpoints.detect_family(["something.else"], {}) is None


def test_read_yaml_config(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(
        "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: v\n"
        "    use_ema: False\n    cond_stage_config:\n      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n"
    )
    assert checkpoints.read_yaml_config(path) == {
        "prediction_type": "v_prediction",
        "use_ema": False,
        "family": "sd2",
    }


def test_a_broken_sdxl_file_is_listed_and_refused_clearly(tmp_path):
    from safetensors.torch import save_file

    sd_dir = tmp_path / "Stable-diffusion"
    sd_dir.mkdir()
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, sd_dir / "xl.safetensors")
    library = CheckpointLibrary(tmp_path)
    assert library.resolve("xl").family == "sdxl"
    with pytest.raises(CheckpointLoadError, match="no UNet, no VAE, no CLIP-L text encoder weights"):
        library.load("xl")


def test_bad_files_give_clear_errors_and_others_keep_working(a1111_dir, tmp_path):
    sd_dir = tmp_path / "models" / "Stable-diffusion"
    sd_dir.mkdir(parents=True)
    (sd_dir / "corrupt.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    (sd_dir / "garbage.ckpt").write_bytes(b"not a pickle at all")
    (sd_dir / "good.safetensors").write_bytes(
        (a1111_dir / "models" / "Stable-diffusion" / "single.safetensors").read_bytes()
    )
    library = CheckpointLibrary(tmp_path / "models", config_dirs={"sd1": a1111_dir / "cfg"})
    assert library.names() == ["tiny", "good"]
    assert [entry.name for entry in library.unreadable()] == [
        "Stable-diffusion/corrupt.safetensors",
        "Stable-diffusion/garbage.ckpt",
    ]
    # Naming a skipped file says why it was skipped.
    with pytest.raises(UnsafeCheckpoint, match="corrupt.safetensors") as info:
        library.load("corrupt")
    assert isinstance(info.value, CheckpointLoadError) and info.value.key == "error.unsafe_checkpoint"
    with pytest.raises(CheckpointLoadError, match="garbage"):
        library.load("garbage")
    with pytest.raises(UnknownCheckpoint):
        library.load("missing")
    assert library.load("good") is library.load("good")
    assert library.loaded_names() == ["good"]


def test_single_file_without_tokenizer_says_so(a1111_dir):
    library = a1111_library(a1111_dir, config_dirs={})  # the packaged SD1 configs carry no vocabulary
    with pytest.raises(CheckpointLoadError, match="tokenizer"):
        library.load("single")


def test_packaged_configs_describe_sd1_and_sd2():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    for family, width, layers in (("sd1", 768, 12), ("sd2", 1024, 23)):
        folder = checkpoints.PACKAGED_CONFIGS / family
        assert (
            json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
        )
        assert UNet2DConditionModel.load_config(folder, subfolder="unet")["cross_attention_dim"] == width
        text = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
        assert (text.hidden_size, text.num_hidden_layers) == (width, layers)


@pytest.mark.parametrize(
    ("files", "skipped", "reason"),
    [
        (
            {"deep.safetensors": safetensors_header(b"[" * 200_000)},
            ["deep.safetensors"],
            "nested 200000 levels",
        ),
        (
            {
                "shape.safetensors": safetensors_header(
                    {"w": {"dtype": "F32", "shape": 5, "data_offsets": [0, 4]}}, b"\0" * 4
                )
            },
            ["shape.safetensors"],
            "not a list of sizes",
        ),
        (
            {
                "m.safetensors": safetensors_header(
                    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4
                ),
                "m.yaml": b"model: {params: [}",
            },
            ["m.yaml", "m.safetensors"],
            "not valid YAML",
        ),
        (
            {
                "m.safetensors": safetensors_header(
                    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4
                ),
                "m.yaml": b"model:\n  target: \xff\n",
            },
            ["m.yaml", "m.safetensors"],
            "not UTF-8",
        ),
        (
            {
                "m.safetensors": safetensors_header(
                    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4
                ),
                "m.vae.pt": b"\x80\x02cos\nsystem\nq\x00.",
            },
            ["m.vae.pt", "m.safetensors"],
            "os.system",
        ),
    ],
)
def test_a_bad_file_is_skipped_with_its_reason_and_the_rest_works(tmp_path, files, skipped, reason):
    sd_dir = tmp_path / "Stable-diffusion"
    for name, data in files.items():
        write(sd_dir / name, data)
    library = CheckpointLibrary(tmp_path)
    assert library.names() == ["tiny"]
    found = library.unreadable()
    assert [entry.name for entry in found] == [f"Stable-diffusion/{name}" for name in skipped]
    assert re.search(reason, found[0].reason), found[0].reason
    with pytest.raises(CheckpointLoadError, match=reason):
        library.resolve(Path(skipped[-1]).stem.removesuffix(".vae"))
    library.refresh()
    assert library.load("tiny") is library.load("tiny")


def test_a_zero_dim_cross_attention_weight_does_not_break_the_scan(tmp_path):
    header = {
        "model.diffusion_model.x.attn2.to_k.weight": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}
    }
    write(tmp_path / "Stable-diffusion" / "odd.safetensors", safetensors_header(header, b"\0" * 4))
    library = CheckpointLibrary(tmp_path)
    assert library.names() == ["tiny", "odd"] and library.resolve("odd").family is None
    with pytest.raises(CheckpointLoadError, match="not a Stable Diffusion checkpoint"):
        library.load("odd")


def test_yaml_values_of_the_wrong_type_are_ignored(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(
        "a: &a [1, 2]\nb: &b [*a, *a, *a, *a]\nc: &c [*b, *b, *b, *b]\n"
        "model:\n  target: *c\n  params:\n    parameterization: *c\n    use_ema: [1]\n"
    )
    assert checkpoints.read_yaml_config(path) == {}


@pytest.fixture(scope="module")
def bin_folder(tmp_path_factory):
    """The tiny model as a diffusers folder with pickled (.bin) weights."""
    folder = tmp_path_factory.mktemp("bin") / "folder"
    build_tiny_pipeline().save_pretrained(folder, safe_serialization=False)
    return folder


def test_a_diffusers_folder_with_pickled_weights_is_checked_then_loads(bin_folder, tmp_path):
    import shutil

    shutil.copytree(bin_folder, tmp_path / "Stable-diffusion" / "bins")
    library = CheckpointLibrary(tmp_path)
    assert library.names() == ["tiny", "bins"] and library.unreadable() == []
    assert library.load("bins").unet is not None


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize(
    "crafted", ["torchscript with a cut end record appended", "pickle calling open (zip)"]
)
def test_a_diffusers_folder_with_a_hostile_weight_file_is_skipped(bin_folder, tmp_path, crafted):
    """diffusers and transformers load a folder's weights themselves, so every weight file
    passes the single-file checks first; one that fails takes the folder out."""
    import shutil

    from tests.pipeline.crafted_files import crafted_family

    folder = tmp_path / "Stable-diffusion" / "bins"
    shutil.copytree(bin_folder, folder)
    marker = tmp_path / "marker.txt"
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(crafted_family(marker)[crafted][0])
    library = CheckpointLibrary(tmp_path)
    assert library.names() == ["tiny"]
    bad, own = library.unreadable()
    assert bad.name == "Stable-diffusion/bins/unet/diffusion_pytorch_model.bin" and bad.code == "refused"
    assert (own.name, own.code, own.side) == ("Stable-diffusion/bins", "side_file", bad.name)
    with pytest.raises(CheckpointLoadError, match="diffusion_pytorch_model.bin"):
        library.load("bins")
    assert not marker.exists()
