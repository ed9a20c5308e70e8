"""The engine's fast path settings: a compiled UNet and channels-last weights draw the
same picture (within float rounding: they are other computation paths)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.checkpoints import CheckpointLibrary
from pipeline.engine import Engine
from pipeline.memory import MemorySettings
from tests.pipeline.test_engine import _pixels, _request


def _difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def test_a_compiled_unet_and_channels_last_weights_draw_the_same_picture(engine) -> None:
    request = _request(width=32, height=32, num_inference_steps=2)
    plain = _pixels(engine.generate(request))
    library = CheckpointLibrary(None)  # its own: channels-last changes the loaded modules

    compiled = Engine(library, device="cpu", compile=True, compile_backend="eager")
    first = compiled.generate(request)
    model = compiled._model("tiny")
    assert model.unet is not model.pipe.unet and model.unet._orig_mod is model.pipe.unet
    assert _difference(_pixels(first), plain) <= 2
    assert _pixels(compiled.generate(request.replace(seed=7))).shape == (32, 32, 3)  # the cached graph

    offloading = Engine(library, device="cpu", compile=True, memory_settings=MemorySettings(mode="medvram"))
    assert offloading._model("tiny").unet is library.load("tiny").unet  # hooks would break graphs

    fast = Engine(library, device="cpu", channels_last=True)
    result = fast.generate(request)
    assert fast._model("tiny").pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert _difference(_pixels(result), plain) <= 2
