from __future__ import annotations

import dataclasses

import pytest

from pipeline.request import GenerationRequest


def _request() -> GenerationRequest:
    return GenerationRequest(
        prompt="a cat",
        seed=5,
        styles=("noir",),
        extra={"ENSD": "31337"},
        network_files={"lora:x": "Lora/x.safetensors"},
    )


def test_replace_makes_what_dataclasses_replace_makes() -> None:
    request = _request()
    copy = request.replace(seed=7, subseed=9, prompt="a dog")
    assert copy == dataclasses.replace(request, seed=7, subseed=9, prompt="a dog")
    assert (request.seed, request.prompt) == (5, "a cat")  # the original is unchanged
    assert copy.extra is request.extra  # no field is copied deeper, as dataclasses does
    assert request.replace() == request and request.replace() is not request
    with pytest.raises(dataclasses.FrozenInstanceError):
        copy.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError, match="no field sed"):
        request.replace(sed=7)


def test_from_dict_keeps_known_fields_only() -> None:
    request = _request()
    data = {**request.to_dict(), "not_a_field": 1}
    assert GenerationRequest.from_dict(data) == request
