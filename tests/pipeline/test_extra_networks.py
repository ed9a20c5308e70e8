"""Tests for pipeline.extra_networks: cutting ``<name:args>`` tags out of prompts (§5)."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.extra_networks import ExtraNetworkParams, parse


def test_parity_example() -> None:
    assert parse("a <lora:x:0.5:te=1> b") == (
        "a  b",
        {
            "lora": [
                ExtraNetworkParams(items=["x", "0.5", "te=1"], positional=["x", "0.5"], named={"te": "1"})
            ]
        },
    )


def test_fields_are_the_contract() -> None:
    assert [f.name for f in dataclasses.fields(ExtraNetworkParams)] == ["items", "positional", "named"]


def test_no_tags_leaves_prompt_untouched() -> None:
    assert parse("a cat, (b:1.2) [c:d:5]") == ("a cat, (b:1.2) [c:d:5]", {})
    assert parse("") == ("", {})


def test_occurrences_kept_in_order_per_name_with_case() -> None:
    text, networks = parse("<lora:a:1> x <LoRA:b> <hypernet:h:0.3> <lora:c:2>")
    assert text == " x   "
    assert [p.items for p in networks["lora"]] == [["a", "1"], ["c", "2"]]
    assert [p.items for p in networks["LoRA"]] == [["b"]]
    assert networks["hypernet"] == [ExtraNetworkParams(items=["h", "0.3"], positional=["h", "0.3"], named={})]
    assert list(networks) == ["lora", "LoRA", "hypernet"]


def test_same_network_twice_is_two_occurrences() -> None:
    _, networks = parse("<lora:a:1><lora:a:1>")
    assert len(networks["lora"]) == 2


def test_named_needs_exactly_one_equals_sign() -> None:
    (params,) = parse("<lora:x:a=b=c:=v:k=:te=0.5:unet=1>")[1]["lora"]
    assert params.items == ["x", "a=b=c", "=v", "k=", "te=0.5", "unet=1"]
    assert params.positional == ["x", "a=b=c"]
    assert params.named == {"": "v", "k": "", "te": "0.5", "unet": "1"}


def test_later_named_value_wins() -> None:
    (params,) = parse("<lora:x:te=1:te=2>")[1]["lora"]
    assert params.named == {"te": "2"}
    assert params.items == ["x", "te=1", "te=2"]


def test_empty_items_are_kept() -> None:
    (params,) = parse("<lora:x::>")[1]["lora"]
    assert params.items == ["x", "", ""]
    assert params.positional == ["x", "", ""]


def test_non_matching_shapes_stay_in_prompt() -> None:
    prompt = "<lora:> <:x> <lo ra:x> <lora> lora:x> <lora-x:1>"
    assert parse(prompt) == (prompt, {})


def test_args_run_to_first_closing_angle() -> None:
    # '<' is an ordinary argument character; '>' ends the tag.
    assert parse("<lora:a<b:c>>") == (">", {"lora": [ExtraNetworkParams(["a<b", "c"], ["a<b", "c"], {})]})


def test_args_may_span_lines_and_unicode_names() -> None:
    text, networks = parse("x <lora:a\nb:1> <ñame_2:v>")
    assert text == "x  "
    assert networks["lora"][0].items == ["a\nb", "1"]
    assert networks["ñame_2"][0].items == ["v"]


def test_from_items_splits_kinds() -> None:
    params = ExtraNetworkParams.from_items(["n", "0.7", "dyn=8"])
    assert params == ExtraNetworkParams(
        items=["n", "0.7", "dyn=8"], positional=["n", "0.7"], named={"dyn": "8"}
    )


def test_default_construction_is_empty() -> None:
    assert ExtraNetworkParams() == ExtraNetworkParams(items=[], positional=[], named={})


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.sampled_from(["<", ">", ":", "=", "lora", "a", " ", "\n", "0.5"]), max_size=30).map("".join)
)
def test_tags_are_removed_and_items_round_trip(prompt: str) -> None:
    text, networks = parse(prompt)
    assert len(text) <= len(prompt)
    for name, occurrences in networks.items():
        assert occurrences
        for params in occurrences:
            assert f"<{name}:{':'.join(params.items)}>" in prompt
            assert len(params.positional) + len(params.named) <= len(params.items)
