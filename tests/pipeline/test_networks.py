"""LoRA and hypernetwork tags on the tiny model: loading, patching, restoring, infotext."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline import hashing, infotext
from pipeline.checkpoints import CheckpointLibrary
from pipeline.engine import Engine
from pipeline.hypernetwork import HypernetworkModule, ModuleLayout, hypernetwork_hooks
from pipeline.networks import (
    LoraPair,
    LoraTag,
    NetworkLibrary,
    NetworkLoadError,
    UnknownNetwork,
    _ldm_unet_name,
    kohya_targets,
    lora_deltas,
    lora_pairs,
    network_tags,
)
from pipeline.request import GenerationRequest

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")

SIZE = 64
STEPS = 3
RANK = 4


def _request(prompt: str = "a cat") -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt, seed=1, width=SIZE, height=SIZE, num_inference_steps=STEPS, sampler_name="Euler"
    )


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image).astype(np.int16)


def _kohya_lora(pipe, seed: int, *, te: bool = True) -> dict[str, torch.Tensor]:
    """Random rank-4 factors in kohya keys for every UNet attention projection (and the
    text encoder's attention projections), plus one 1x1 conv (proj_in)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, (module, part) in kohya_targets(pipe).items():
        wanted = ("attn1_to_", "attn2_to_", "proj_in") if part == "unet" else ("self_attn_",)
        if not any(w in key for w in wanted) or (part == "te" and not te):
            continue
        out_dim, in_dim = module.weight.shape[:2]
        kernel = tuple(module.weight.shape[2:])
        state[f"{key}.lora_down.weight"] = torch.randn((RANK, in_dim, *kernel), generator=generator) * 0.3
        state[f"{key}.lora_up.weight"] = (
            torch.randn((out_dim, RANK, *((1, 1) if kernel else ())), generator=generator) * 0.3
        )
        state[f"{key}.alpha"] = torch.tensor(2.0)
    return state


def _hypernet_state(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state: dict = {
        "layer_structure": [1, 2, 1],
        "activation_func": "relu",
        "is_layer_norm": False,
        "name": "hn",
    }
    for width in (32, 64):
        pair = []
        for _ in range(2):
            module = HypernetworkModule(width, ModuleLayout(activation_func="relu"))
            sd = {k: torch.randn(v.shape, generator=generator) * 0.2 for k, v in module.state_dict().items()}
            pair.append(sd)
        state[width] = tuple(pair)
    return state


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    (root / "Lora" / "sub").mkdir(parents=True)
    (root / "hypernetworks").mkdir()
    pipe = CheckpointLibrary(None).load("tiny")
    save_file(_kohya_lora(pipe, 1), str(root / "Lora" / "alpha.safetensors"))
    save_file(_kohya_lora(pipe, 2), str(root / "Lora" / "sub" / "be,ta.safetensors"))
    torch.save(_kohya_lora(pipe, 3, te=True), root / "Lora" / "gamma.pt")
    torch.save(_hypernet_state(4), root / "hypernetworks" / "hn.pt")
    return root


@pytest.fixture(scope="module")
def net_engine(models_dir) -> Engine:
    return Engine(CheckpointLibrary(models_dir), device="cpu")


@pytest.fixture(scope="module")
def base(net_engine):
    return net_engine.generate(_request())


def _weights(engine: Engine) -> dict[str, torch.Tensor]:
    pipe = engine.library.load("tiny")
    return {
        **{f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()},
        **{f"te.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()},
    }


# -- tags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("<lora:x>", LoraTag("x", 1.0, 1.0)),
        ("<lora:x:0.5>", LoraTag("x", 0.5, 0.5)),
        ("<lora:x:0.5:0.25>", LoraTag("x", 0.5, 0.25)),
        ("<lora:x:0.5:te=1>", LoraTag("x", 1.0, 0.5)),
        ("<lora:x:te=0.5>", LoraTag("x", 0.5, 1.0)),
        ("<lora:x:0.3:unet=0>", LoraTag("x", 0.3, 0.0)),
        ("<lora:x:1:2:dyn=4>", LoraTag("x", 1.0, 2.0)),
    ],
)
def test_lora_multiplier_rules(prompt, expected):
    loras, hypernets = network_tags(f"a {prompt} b")
    assert loras == [expected]
    assert hypernets == []


def test_hypernet_tags_and_order():
    loras, hypernets = network_tags("<hypernet:h1> x <lora:a:1> <hypernet:h2:0.4> <other:z>")
    assert [(h.name, h.multiplier) for h in hypernets] == [("h1", 1.0), ("h2", 0.4)]
    assert [t.name for t in loras] == ["a"]


@pytest.mark.parametrize("prompt", ["<lora:x:abc>", "<lora:te=1>", "<hypernet:h:x>"])
def test_malformed_tags_raise_value_error(prompt):
    with pytest.raises(ValueError):
        network_tags(prompt)


# -- LoRA ---------------------------------------------------------------------------------


def test_lora_changes_output_and_restores_weights(net_engine, base):
    before = _weights(net_engine)
    with_lora = net_engine.generate(_request("a cat <lora:alpha:1>"))
    assert not np.array_equal(_pixels(with_lora), _pixels(base))
    after = _weights(net_engine)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert np.array_equal(_pixels(net_engine.generate(_request())), _pixels(base))


def test_strength_zero_gives_base_pixels(net_engine, base):
    result = net_engine.generate(_request("a cat <lora:alpha:0>"))
    assert np.array_equal(_pixels(result), _pixels(base))


def test_text_encoder_only_and_unet_only_both_change_output(net_engine, base):
    te_only = _pixels(net_engine.generate(_request("a cat <lora:alpha:1:0>")))
    unet_only = _pixels(net_engine.generate(_request("a cat <lora:alpha:0:1>")))
    assert not np.array_equal(te_only, _pixels(base))
    assert not np.array_equal(unet_only, _pixels(base))
    assert not np.array_equal(te_only, unet_only)


def test_two_loras_at_once(net_engine, base):
    one = _pixels(net_engine.generate(_request("a cat <lora:alpha:1>")))
    both = net_engine.generate(_request("a cat <lora:alpha:1> <lora:be,ta:0.5>"))
    assert not np.array_equal(_pixels(both), one)
    fields = infotext.parse(both.images[0].infotext)
    lora_dir = net_engine.library.models_dir / "Lora"
    first = hashing.addnet_hash(lora_dir / "alpha.safetensors")[:12]
    second = hashing.addnet_hash(lora_dir / "sub" / "be,ta.safetensors")[:12]
    assert fields["Lora hashes"] == f"alpha: {first}, beta: {second}"
    assert fields["Prompt"] == "a cat <lora:alpha:1> <lora:be,ta:0.5>"
    assert np.array_equal(_pixels(net_engine.generate(_request())), _pixels(base))


def test_deltas_of_two_loras_add_up(net_engine):
    pipe = net_engine.library.load("tiny")
    library = net_engine.networks
    a = library.for_prompt("<lora:alpha:1>").loras
    b = library.for_prompt("<lora:gamma:0.5>").loras
    together = lora_deltas(pipe, a + b)
    separate_a, separate_b = lora_deltas(pipe, a), lora_deltas(pipe, b)
    assert together.keys() == separate_a.keys()
    for module, delta in together.items():
        assert torch.allclose(delta, separate_a[module] + separate_b[module], atol=1e-6)


def test_pt_lora_hash_is_full_sha256(net_engine):
    result = net_engine.generate(_request("a cat <lora:gamma>"))
    path = net_engine.library.models_dir / "Lora" / "gamma.pt"
    assert infotext.parse(result.images[0].infotext)["Lora hashes"] == f"gamma: {hashing.sha256(path)[:12]}"


def test_no_tags_no_lora_field(base):
    assert "Lora hashes" not in infotext.parse(base.images[0].infotext)


def test_unknown_lora_raises(net_engine):
    with pytest.raises(UnknownNetwork) as info:
        net_engine.generate(_request("a cat <lora:nope:1>"))
    assert info.value.key == "error.unknown_network"
    assert info.value.params == {"name": "nope", "kind": "lora", "available": "alpha, be,ta, gamma"}


def test_unknown_hypernet_raises():
    with pytest.raises(UnknownNetwork) as info:
        NetworkLibrary(None).for_prompt("<hypernet:nope>")
    assert info.value.params == {"name": "nope", "kind": "hypernetwork", "available": "-"}


def test_case_insensitive_name(net_engine):
    assert len(net_engine.networks.for_prompt("<lora:ALPHA:1>").loras) == 1


def test_lora_delta_formula():
    down = torch.randn(2, 5)
    up = torch.randn(3, 2)
    pair = LoraPair(down, up, alpha=1.0)
    delta = pair.delta(torch.Size((3, 5)), torch.device("cpu"))
    assert torch.allclose(delta, 0.5 * up @ down)
    assert LoraPair(down, up, None).delta(torch.Size((3, 5)), torch.device("cpu")).equal(up @ down)


def test_conv_lora_deltas():
    down = torch.randn(2, 4, 3, 3)
    up = torch.randn(6, 2, 1, 1)
    delta = LoraPair(down, up, 2.0).delta(torch.Size((6, 4, 3, 3)), torch.device("cpu"))
    expected = torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
    assert torch.allclose(delta, expected, atol=1e-5)
    linear_on_conv = LoraPair(torch.randn(2, 4), torch.randn(6, 2), None)
    assert linear_on_conv.delta(torch.Size((6, 4, 1, 1)), torch.device("cpu")).shape == (6, 4, 1, 1)
    assert LoraPair(down, up, None).delta(torch.Size((6, 5, 3, 3)), torch.device("cpu")) is None


def test_kohya_keys_reach_modules(net_engine):
    pipe = net_engine.library.load("tiny")
    targets = kohya_targets(pipe)
    module, part = targets["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert (
        part == "unet" and module is pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    )
    assert targets["lora_te_text_model_encoder_layers_0_self_attn_q_proj"][1] == "te"
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0" in targets


def test_ldm_unet_names_map_to_diffusers():
    assert (
        _ldm_unet_name("lora_unet_input_blocks_4_1_proj_in", 2)
        == "lora_unet_down_blocks_1_attentions_0_proj_in"
    )
    assert (
        _ldm_unet_name("lora_unet_output_blocks_2_1_proj_out", 2)
        == "lora_unet_up_blocks_0_attentions_2_proj_out"
    )
    assert _ldm_unet_name("lora_unet_middle_block_1_proj_in", 2) == "lora_unet_mid_block_attentions_0_proj_in"


def test_lora_pairs_groups_keys_and_skips_incomplete():
    state = {
        "m.lora_down.weight": torch.zeros(1, 2),
        "m.lora_up.weight": torch.zeros(2, 1),
        "m.alpha": torch.tensor(1.0),
        "n.lora_down.weight": torch.zeros(1, 2),
    }
    pairs = lora_pairs(state)
    assert list(pairs) == ["m"] and pairs["m"].alpha == 1.0


# -- hypernetworks ------------------------------------------------------------------------


def test_hypernetwork_changes_output_and_zero_strength_is_base(net_engine, base):
    with_hn = net_engine.generate(_request("a cat <hypernet:hn:1>"))
    assert not np.array_equal(_pixels(with_hn), _pixels(base))
    zero = net_engine.generate(_request("a cat <hypernet:hn:0>"))
    assert np.array_equal(_pixels(zero), _pixels(base))
    assert np.array_equal(_pixels(net_engine.generate(_request())), _pixels(base))
    unet = net_engine.library.load("tiny").unet
    assert not any(m._forward_pre_hooks for m in unet.modules())


def test_hypernetwork_feeds_k_and_v_in_self_and_cross_attention(net_engine):
    network = net_engine.networks.for_prompt("<hypernet:hn:0.7>").hypernets[0]
    unet = net_engine.library.load("tiny").unet
    block = unet.down_blocks[1].attentions[0].transformer_blocks[0]
    seen: dict[str, torch.Tensor] = {}
    handles = [
        getattr(getattr(block, attn), proj).register_forward_hook(
            lambda _m, args, _out, key=f"{attn}.{proj}": seen.__setitem__(key, args[0])
        )
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v")
    ]
    hidden = torch.randn(1, 16, 64)
    context = torch.randn(1, 77, 32)
    try:
        with torch.no_grad(), hypernetwork_hooks(unet, [network]):
            block.attn1(hidden)
            block.attn2(hidden, encoder_hidden_states=context)
    finally:
        for handle in handles:
            handle.remove()
    k64, v64 = network.layers[64]
    k32, v32 = network.layers[32]
    with torch.no_grad():
        assert torch.allclose(seen["attn1.to_k"], k64(hidden)) and torch.allclose(
            seen["attn1.to_v"], v64(hidden)
        )
        assert torch.allclose(seen["attn2.to_k"], k32(context)) and torch.allclose(
            seen["attn2.to_v"], v32(context)
        )
    assert torch.equal(seen["attn1.to_q"], hidden) and torch.equal(seen["attn2.to_q"], hidden)


def test_lora_and_hypernetwork_together_restore(net_engine, base):
    both = net_engine.generate(_request("a cat <lora:alpha:0.5> <hypernet:hn:0.5>"))
    assert not np.array_equal(_pixels(both), _pixels(base))
    assert np.array_equal(_pixels(net_engine.generate(_request())), _pixels(base))


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ({"m.lora_down.weight": torch.zeros(2, 4), "m.lora_up.weight": torch.zeros(4, 3)}, "different ranks"),
        (
            {"m.lora_down.weight": torch.zeros(2), "m.lora_up.weight": torch.zeros(4, 2)},
            "not a 2-D or 4-D float",
        ),
        (
            {
                "m.lora_down.weight": torch.zeros(2, 4, dtype=torch.long),
                "m.lora_up.weight": torch.zeros(4, 2),
            },
            "float",
        ),
        ({"m.lora_down.weight": "x", "m.lora_up.weight": torch.zeros(4, 2)}, "float tensor"),
        (
            {
                "m.lora_down.weight": torch.zeros(2, 4),
                "m.lora_up.weight": torch.zeros(4, 2),
                "m.alpha": torch.ones(3),
            },
            "alpha is not one number",
        ),
        (
            {
                "m.lora_down.weight": torch.zeros(2, 4),
                "m.lora_up.weight": torch.zeros(4, 2),
                "m.alpha": float("inf"),
            },
            "not a finite number",
        ),
    ],
)
def test_lora_factors_are_checked_when_loaded(tmp_path, state, reason):
    path = tmp_path / "Lora" / "odd.pt"
    path.parent.mkdir()
    torch.save(state, path)
    with pytest.raises(NetworkLoadError, match=reason) as info:
        NetworkLibrary(tmp_path).for_prompt("<lora:odd>")
    assert info.value.params["name"] == "odd.pt" and info.value.key == "error.network_load"


def test_a_delta_that_cannot_fit_is_not_computed():
    """Factors whose product would be far larger than the weight they patch are compared
    by size first: nothing of that size is allocated."""
    huge = LoraPair(torch.zeros(1, 200_000), torch.zeros(200_000, 1), None)
    assert huge.delta(torch.Size((3, 5)), torch.device("cpu")) is None


# --------------------------------------------------------------------------------------
# Resolved once: what /draw records, the engine loads without resolving again


def _counting_scans(monkeypatch) -> list[str]:
    from pipeline import networks

    scans: list[str] = []
    original = networks._scan
    monkeypatch.setattr(
        networks, "_scan", lambda folder, ext: scans.append(folder.name) or original(folder, ext)
    )
    return scans


def test_resolve_prompt_records_each_tag_once_with_one_scan_per_kind(models_dir, monkeypatch):
    scans = _counting_scans(monkeypatch)
    library = NetworkLibrary(models_dir)
    files = library.resolve_prompt("a <lora:ALPHA:0.5> <lora:be,ta> <hypernet:hn>", "hires <lora:gamma>", "")
    assert files == {
        "lora:ALPHA": "alpha.safetensors",
        "lora:be,ta": "sub/be,ta.safetensors",
        "lora:gamma": "gamma.pt",
        "hypernet:hn": "hn.pt",
    }
    assert sorted(scans) == ["Lora", "hypernetworks"]


def test_the_engine_loads_recorded_files_without_scanning_again(net_engine, models_dir, monkeypatch):
    prompt = "a cat <lora:ALPHA:0.7> <hypernet:hn:0.5>"
    files = NetworkLibrary(models_dir).resolve_prompt(prompt)
    unrecorded = net_engine.generate(_request(prompt))
    scans = _counting_scans(monkeypatch)
    recorded = net_engine.generate(_request(prompt).replace(network_files=files))
    assert scans == []  # /draw resolved them: no folder scan, no name lookup
    assert recorded.images[0].infotext == unrecorded.images[0].infotext
    assert np.abs(_pixels(recorded) - _pixels(unrecorded)).max() == 0


def test_the_engine_resolves_what_was_not_recorded_and_refuses_what_it_lacks(models_dir, monkeypatch):
    library = NetworkLibrary(models_dir)
    scans = _counting_scans(monkeypatch)
    # an older row (nothing recorded): resolved here, with one scan
    assert len(library.for_prompt("<lora:alpha>", {}).loras) == 1 and scans == ["Lora"]
    # recorded files this folder does not have (another worker's folder, a removed file,
    # a path that leaves the folder): resolved by name, and refused when it is missing
    for stale in ("gone.safetensors", "../hypernetworks/hn.pt", "/etc/passwd.pt", "alpha.txt"):
        scans.clear()
        assert len(library.for_prompt("<lora:alpha>", {"lora:alpha": stale}).loras) == 1
        assert scans == ["Lora"], stale
    with pytest.raises(UnknownNetwork) as info:
        library.for_prompt("<lora:nope>", {"lora:nope": "nope.safetensors"})
    assert info.value.params["name"] == "nope"
