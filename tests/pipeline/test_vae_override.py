"""A request's ``vae`` swaps the checkpoint's VAE for that call only, and says so in the infotext."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.checkpoints import CheckpointLibrary
from pipeline.engine import Engine
from pipeline.hashing import short_hash
from pipeline.infotext import parse
from pipeline.networks import UnknownNetwork
from pipeline.request import GenerationRequest
from pipeline.tiny import build_tiny_pipeline

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")

SIZE = 64


def _request(**changes) -> GenerationRequest:
    return GenerationRequest(
        prompt="a cat",
        seed=3,
        width=SIZE,
        height=SIZE,
        num_inference_steps=3,
        sampler_name="Euler",
        **changes,
    )


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image).astype(np.int16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An engine over a models folder holding one VAE: tiny's own, with its decoder shifted."""
    root = tmp_path_factory.mktemp("models")
    (root / "VAE").mkdir()
    source = build_tiny_pipeline().vae
    with torch.no_grad():
        for name, param in source.named_parameters():
            if name.startswith("decoder."):
                param.add_(0.05)
    state = {f"first_stage_model.{k}": v.contiguous() for k, v in source.state_dict().items()}
    path = root / "VAE" / "shifted.vae.safetensors"
    save_file(state, str(path))
    engine = Engine(CheckpointLibrary(root), device="cpu")
    baseline = engine.generate(_request())
    return engine, path, baseline


def test_override_changes_pixels_and_restores_the_checkpoint_vae(setup):
    engine, _path, baseline = setup
    own_vae = engine.library.load("tiny").vae
    swapped = engine.generate(_request(vae="shifted.vae"))
    diff = np.abs(_pixels(swapped) - _pixels(baseline))
    assert diff.max() > 10, "the VAE override did not change the image"
    assert engine.library.load("tiny").vae is own_vae
    assert np.array_equal(_pixels(engine.generate(_request())), _pixels(baseline))


def test_override_infotext_names_the_vae(setup):
    engine, path, baseline = setup
    fields = parse(engine.generate(_request(vae="SHIFTED.vae.safetensors")).images[0].infotext)
    assert fields["VAE hash"] == short_hash(path, "vae")
    assert len(fields["VAE hash"]) == 10
    assert fields["VAE"] == "shifted.vae.safetensors"
    plain = parse(baseline.images[0].infotext)
    assert "VAE hash" not in plain and "VAE" not in plain


def test_loaded_vae_is_cached(setup):
    engine, _path, _baseline = setup
    first = engine._separate_vae(engine._model("tiny"), "shifted.vae")
    assert engine._separate_vae(engine._model("tiny"), "shifted.vae") is first


def test_vae_restored_after_an_error(setup, monkeypatch):
    engine, _path, _baseline = setup
    pipe = engine.library.load("tiny")
    own_vae = pipe.vae

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipe.unet, "forward", explode)
    with pytest.raises(RuntimeError, match="boom"):
        engine.generate(_request(vae="shifted.vae"))
    assert pipe.vae is own_vae


def test_unknown_vae_is_refused(setup):
    engine, _path, _baseline = setup
    with pytest.raises(UnknownNetwork) as info:
        engine.generate(_request(vae="nope"))
    assert info.value.params["kind"] == "vae"
    assert "shifted.vae" in info.value.params["available"]


def test_request_round_trips_vae():
    request = _request(vae="shifted.vae")
    assert GenerationRequest.from_dict(request.to_dict()) == request
    assert _request().vae is None


def test_checkpoint_vae_file_is_used_without_an_override(setup, monkeypatch):
    """A checkpoint's ``<name>.vae.*`` file beside it (``vae_path``) is its default VAE."""
    import dataclasses

    engine, path, baseline = setup
    model = engine._model("tiny")
    monkeypatch.setattr(model, "info", dataclasses.replace(model.info, vae_path=path))
    result = engine.generate(_request())
    assert parse(result.images[0].infotext)["VAE"] == "shifted.vae.safetensors"
    assert not np.array_equal(_pixels(result), _pixels(baseline))
