"""Textual-inversion embeddings by name in the prompt, through the engine, with TI hashes."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.checkpoints import CheckpointLibrary
from pipeline.engine import Engine
from pipeline.hashing import short_hash
from pipeline.infotext import parse
from pipeline.request import GenerationRequest


def test_an_embedding_named_in_the_prompt_conditions_the_image(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    generator = torch.Generator().manual_seed(3)
    vectors = torch.randn(2, 32, generator=generator) * 3
    path = folder / "shiny-style.pt"
    torch.save({"string_to_param": {"*": vectors}, "name": "shiny-style", "step": 100}, path)
    engine = Engine(CheckpointLibrary(tmp_path), device="cpu")
    base = GenerationRequest(prompt="a cat, shiny-style", seed=4, num_inference_steps=3, width=64, height=64)

    styled = engine.generate(base)
    plain = engine.generate(base.replace(prompt="a cat, shiny-stile"))
    assert styled.images[0].image.tobytes() != plain.images[0].image.tobytes()
    fields = parse(styled.images[0].infotext)
    assert fields["TI hashes"] == f"shiny-style: {short_hash(path, 'textual_inversion')}"
    assert "TI hashes" not in parse(plain.images[0].infotext)
    again = engine.generate(base)
    assert again.images[0].image.tobytes() == styled.images[0].image.tobytes()
