from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.hypernetwork import (
    Hypernetwork,
    HypernetworkModule,
    ModuleLayout,
    apply_hypernetworks,
    dropout_structure,
)
from tests.pipeline.crafted_files import hypernetwork_state, torch_bytes, write


def _linear_sd(prefix: str, d_in: int, d_out: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": torch.randn(d_out, d_in, generator=gen) * 0.3,
        f"{prefix}.bias": torch.randn(d_out, generator=gen) * 0.1,
    }


def _norm_sd(prefix: str, d: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": 1 + torch.randn(d, generator=gen) * 0.1,
        f"{prefix}.bias": torch.randn(d, generator=gen) * 0.1,
    }


def _simple_sd(width: int, seed: int, first: int = 0, second: int = 1) -> dict[str, torch.Tensor]:
    """A [1, 2, 1] module's weights with the linears at the given Sequential indices."""
    gen = torch.Generator().manual_seed(seed)
    return {
        **_linear_sd(f"linear.{first}", width, 2 * width, gen),
        **_linear_sd(f"linear.{second}", 2 * width, width, gen),
    }


def _mlp(sd: dict[str, torch.Tensor], x: torch.Tensor, first: str, second: str, act=None) -> torch.Tensor:
    h = x @ sd[f"{first}.weight"].T + sd[f"{first}.bias"]
    if act is not None:
        h = act(h)
    return h @ sd[f"{second}.weight"].T + sd[f"{second}.bias"]


# --- dropout_structure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("structure", "use_dropout", "last", "expected"),
    [
        ([1, 2, 1], False, False, [0, 0, 0]),
        ([1, 2, 1], False, True, [0, 0, 0]),
        ([1, 2, 1], True, False, [0, 0, 0]),
        ([1, 2, 1], True, True, [0, 0.3, 0]),
        ([1, 2, 2, 1], True, False, [0, 0.3, 0, 0]),
        ([1, 2, 2, 1], True, True, [0, 0.3, 0.3, 0]),
        ([1, 2, 3, 2, 1], True, False, [0, 0.3, 0.3, 0, 0]),
        ([1, 2, 3, 2, 1], False, True, [0, 0, 0, 0, 0]),
        (None, False, False, [0, 0, 0]),
        (None, True, True, [0, 0.3, 0]),
        ([1, 1], True, False, [0, 0, 0]),  # quirk: one longer than the structure
        ([1, 1], True, True, [0, 0.3, 0]),
        ([1, 1], False, False, [0, 0]),
    ],
)
def test_dropout_structure_examples(structure, use_dropout, last, expected):
    result = dropout_structure(structure, use_dropout, last)
    assert result == expected
    assert [type(v) for v in result] == [type(v) for v in expected]


def test_dropout_structure_types_are_a1111s():
    result = dropout_structure([1, 2, 3, 2, 1], True, True)
    assert [type(v) for v in result] == [int, float, float, float, int]
    assert isinstance(result, list)


def test_dropout_structure_accepts_tuples():
    assert dropout_structure((1, 1.5, 1), True, True) == [0, 0.3, 0]


# --- module layout -------------------------------------------------------------------------------


def _kinds(module: HypernetworkModule) -> list[type]:
    return [type(layer) for layer in module.linear]


def test_spec_layout_example_relu_no_output_activation_with_dropout():
    layout = ModuleLayout(
        layer_structure=(1, 2, 1),
        activation_func="relu",
        activate_output=False,
        dropout_structure=(0, 0.3, 0),
    )
    module = HypernetworkModule(8, layout)
    assert _kinds(module) == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Dropout, torch.nn.Linear]
    assert set(module.state_dict()) == {
        "linear.0.weight",
        "linear.0.bias",
        "linear.3.weight",
        "linear.3.bias",
    }
    assert module.linear[2].p == 0.3


def test_layout_activate_output_and_layer_norm():
    layout = ModuleLayout(
        layer_structure=(1, 2, 1), activation_func="tanh", add_layer_norm=True, activate_output=True
    )
    module = HypernetworkModule(4, layout)
    assert _kinds(module) == [
        torch.nn.Linear,
        torch.nn.Tanh,
        torch.nn.LayerNorm,
        torch.nn.Linear,
        torch.nn.Tanh,
        torch.nn.LayerNorm,
    ]
    assert module.linear[0].in_features == 4 and module.linear[0].out_features == 8
    assert module.linear[2].normalized_shape == (8,)
    assert module.linear[3].out_features == 4


def test_layout_fractional_widths_truncate():
    module = HypernetworkModule(10, ModuleLayout(layer_structure=(1, 1.25, 0.55, 1)))
    widths = [(layer.in_features, layer.out_features) for layer in module.linear]
    assert widths == [(10, 12), (12, 5), (5, 10)]


def test_layout_dropout_on_last_layer():
    layout = ModuleLayout(layer_structure=(1, 2, 2, 1), dropout_structure=(0, 0.3, 0.3, 0))
    module = HypernetworkModule(4, layout)
    assert _kinds(module) == [
        torch.nn.Linear,
        torch.nn.Dropout,
        torch.nn.Linear,
        torch.nn.Dropout,
        torch.nn.Linear,
    ]


@pytest.mark.parametrize("name", [None, "linear"])
def test_no_activation(name):
    module = HypernetworkModule(4, ModuleLayout(activation_func=name))
    assert _kinds(module) == [torch.nn.Linear, torch.nn.Linear]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("relu", torch.nn.ReLU),
        ("leakyrelu", torch.nn.LeakyReLU),
        ("elu", torch.nn.ELU),
        ("swish", torch.nn.Hardswish),
        ("tanh", torch.nn.Tanh),
        ("sigmoid", torch.nn.Sigmoid),
        ("gelu", torch.nn.GELU),
        ("mish", torch.nn.Mish),
        ("silu", torch.nn.SiLU),
        ("softplus", torch.nn.Softplus),
        ("hardswish", torch.nn.Hardswish),
    ],
)
def test_activation_names(name, cls):
    module = HypernetworkModule(4, ModuleLayout(activation_func=name, activate_output=False))
    assert _kinds(module) == [torch.nn.Linear, cls, torch.nn.Linear]


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation"):
        HypernetworkModule(4, ModuleLayout(activation_func="nope"))


def test_layer_structure_must_start_and_end_with_one():
    with pytest.raises(ValueError, match="layer structure"):
        HypernetworkModule(4, ModuleLayout(layer_structure=(2, 1)))


def test_invalid_dropout_probability_rejected():
    with pytest.raises(ValueError, match="dropout"):
        HypernetworkModule(4, ModuleLayout(dropout_structure=(0, 1.0, 0)))


# --- loading -------------------------------------------------------------------------------------


def test_from_state_dict_defaults_and_forward():
    sd_k, sd_v = _simple_sd(8, 1), _simple_sd(8, 2)
    network = Hypernetwork.from_state_dict({8: (sd_k, sd_v)}, multiplier=0.5)
    module_k, module_v = network.layers[8]
    assert _kinds(module_k) == [torch.nn.Linear, torch.nn.Linear]
    assert not module_k.training and not module_v.training
    assert module_k.multiplier == 0.5 and module_v.multiplier == 0.5
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    k, v = apply_hypernetworks([network], x)
    torch.testing.assert_close(k, x + _mlp(sd_k, x, "linear.0", "linear.1") * 0.5, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v, x + _mlp(sd_v, x, "linear.0", "linear.1") * 0.5, rtol=1e-6, atol=1e-6)
    assert k.dtype == torch.float32 and v.dtype == torch.float32
    assert not k.requires_grad


def test_activate_output_defaults_to_true_when_absent():
    gen = torch.Generator().manual_seed(4)
    sd = {**_linear_sd("linear.0", 4, 8, gen), **_linear_sd("linear.2", 8, 4, gen)}
    network = Hypernetwork.from_state_dict({"activation_func": "relu", 4: (sd, sd)})
    assert _kinds(network.layers[4][0]) == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear, torch.nn.ReLU]
    x = torch.randn(1, 3, 4, generator=gen)
    k, _ = apply_hypernetworks([network], x)
    expected = x + torch.relu(_mlp(sd, x, "linear.0", "linear.2", torch.relu))
    torch.testing.assert_close(k, expected, rtol=1e-6, atol=1e-6)


def test_activate_output_false_in_metadata():
    gen = torch.Generator().manual_seed(5)
    sd = {**_linear_sd("linear.0", 4, 8, gen), **_linear_sd("linear.2", 8, 4, gen)}
    state = {"activation_func": "relu", "activate_output": False, 4: (sd, sd)}
    network = Hypernetwork.from_state_dict(state)
    assert _kinds(network.layers[4][0]) == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]


def test_spec_example_keys_with_dropout_structure_stored():
    gen = torch.Generator().manual_seed(6)
    sd = {**_linear_sd("linear.0", 4, 8, gen), **_linear_sd("linear.3", 8, 4, gen)}
    state = {
        "layer_structure": [1, 2, 1],
        "activation_func": "relu",
        "activate_output": False,
        "dropout_structure": [0, 0.3, 0],
        4: (sd, sd),
    }
    network = Hypernetwork.from_state_dict(state)
    assert network.use_dropout is True
    assert network.last_layer_dropout is False
    x = torch.randn(2, 4, generator=gen)
    k, v = apply_hypernetworks([network], x)
    expected = x + _mlp(sd, x, "linear.0", "linear.3", torch.relu)
    torch.testing.assert_close(k, expected, rtol=1e-6, atol=1e-6)
    # eval mode: dropout is inactive, so repeated calls agree exactly
    assert torch.equal(apply_hypernetworks([network], x)[0], k)
    assert torch.equal(k, v)


def test_use_dropout_metadata_computes_structure_with_last_layer_default_false():
    gen = torch.Generator().manual_seed(7)
    sd = {
        **_linear_sd("linear.0", 4, 8, gen),
        **_linear_sd("linear.2", 8, 8, gen),
        **_linear_sd("linear.3", 8, 4, gen),
    }
    state = {"layer_structure": [1, 2, 2, 1], "use_dropout": True, 4: (sd, sd)}
    network = Hypernetwork.from_state_dict(state)
    assert network.layout.dropout_structure == (0, 0.3, 0, 0)
    assert _kinds(network.layers[4][0]) == [
        torch.nn.Linear,
        torch.nn.Dropout,
        torch.nn.Linear,
        torch.nn.Linear,
    ]


def test_all_zero_stored_dropout_structure_keeps_use_dropout_flag():
    sd = _simple_sd(4, 8)
    network = Hypernetwork.from_state_dict({"dropout_structure": [0, 0, 0], 4: (sd, sd)})
    assert network.use_dropout is False
    network = Hypernetwork.from_state_dict({"dropout_structure": [0, 0, 0], "use_dropout": True, 4: (sd, sd)})
    assert network.use_dropout is True


def test_layer_norm_forward():
    gen = torch.Generator().manual_seed(9)
    sd = {
        **_linear_sd("linear.0", 4, 8, gen),
        **_norm_sd("linear.1", 8, gen),
        **_linear_sd("linear.2", 8, 4, gen),
        **_norm_sd("linear.3", 4, gen),
    }
    network = Hypernetwork.from_state_dict({"is_layer_norm": True, 4: (sd, sd)})
    x = torch.randn(3, 4, generator=gen)

    def norm(prefix: str, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(
            h, h.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-5
        )

    h = norm("linear.1", x @ sd["linear.0.weight"].T + sd["linear.0.bias"])
    h = norm("linear.3", h @ sd["linear.2.weight"].T + sd["linear.2.bias"])
    k, _ = apply_hypernetworks([network], x)
    torch.testing.assert_close(k, x + h, rtol=1e-6, atol=1e-6)


def test_legacy_keys_are_renamed_without_mutating_input():
    gen = torch.Generator().manual_seed(10)
    sd = {**_linear_sd("linear1", 4, 8, gen), **_linear_sd("linear2", 8, 4, gen)}
    before = set(sd)
    network = Hypernetwork.from_state_dict({4: (sd, sd)})
    assert set(sd) == before
    x = torch.randn(2, 4, generator=gen)
    k, _ = apply_hypernetworks([network], x)
    torch.testing.assert_close(k, x + _mlp(sd, x, "linear1", "linear2"), rtol=1e-6, atol=1e-6)


def test_strict_loading_rejects_missing_or_extra_keys():
    sd = _simple_sd(4, 11)
    missing = {key: value for key, value in sd.items() if key != "linear.1.bias"}
    with pytest.raises(ValueError, match="width 4"):
        Hypernetwork.from_state_dict({4: (missing, sd)})
    extra = {**sd, "linear.2.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError):
        Hypernetwork.from_state_dict({4: (sd, extra)})
    with pytest.raises(ValueError):  # wrong layout for the weights: a ReLU shifts the second linear
        Hypernetwork.from_state_dict({"activation_func": "relu", 4: (sd, sd)})


def test_half_precision_weights_load_as_float32():
    sd = {key: value.half() for key, value in _simple_sd(4, 12).items()}
    network = Hypernetwork.from_state_dict({4: (sd, sd)})
    assert network.layers[4][0].linear[0].weight.dtype == torch.float32
    k, _ = apply_hypernetworks([network], torch.randn(1, 2, 4))
    assert k.dtype == torch.float32


def test_metadata_and_only_int_keys_are_widths():
    sd4, sd8 = _simple_sd(4, 13), _simple_sd(8, 14)
    state = {
        "name": "hn",
        "step": 1200,
        "sd_checkpoint": "abcd",
        "sd_checkpoint_name": "model",
        "weight_initialization": "Normal",
        "optional_info": None,
        "layer_structure": [1, 2, 1],
        "activation_func": None,
        True: "not a width",
        "320": "not a width either",
        4: (sd4, sd4),
        8: (sd8, sd8),
    }
    network = Hypernetwork.from_state_dict(state)
    assert sorted(network.layers) == [4, 8]
    assert network.name == "hn" and network.step == 1200
    assert network.sd_checkpoint == "abcd" and network.sd_checkpoint_name == "model"


def test_apply_chains_networks_in_order_k_and_v_separately():
    sd1k, sd1v, sd2k, sd2v = (_simple_sd(4, s) for s in (20, 21, 22, 23))
    first = Hypernetwork.from_state_dict({4: (sd1k, sd1v)}, multiplier=0.7)
    second = Hypernetwork.from_state_dict({4: (sd2k, sd2v)}, multiplier=1.3)
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(24))

    def step(sd, m, t):
        return t + _mlp(sd, t, "linear.0", "linear.1") * m

    k, v = apply_hypernetworks([first, second], x)
    torch.testing.assert_close(k, step(sd2k, 1.3, step(sd1k, 0.7, x)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v, step(sd2v, 1.3, step(sd1v, 0.7, x)), rtol=1e-6, atol=1e-6)
    k_rev, _ = apply_hypernetworks([second, first], x)
    assert not torch.allclose(k_rev, k)


def test_width_without_module_passes_unchanged():
    sd = _simple_sd(4, 30)
    network = Hypernetwork.from_state_dict({4: (sd, sd)})
    x = torch.randn(1, 3, 8)
    k, v = apply_hypernetworks([network], x)
    assert torch.equal(k, x) and torch.equal(v, x)
    k, v = apply_hypernetworks([], x)
    assert torch.equal(k, x) and torch.equal(v, x)


def test_mixed_widths_only_matching_network_applies():
    sd4, sd8 = _simple_sd(4, 31), _simple_sd(8, 32)
    only8 = Hypernetwork.from_state_dict({8: (sd8, sd8)})
    only4 = Hypernetwork.from_state_dict({4: (sd4, sd4)})
    x = torch.randn(2, 4)
    k, _ = apply_hypernetworks([only8, only4, only8], x)
    torch.testing.assert_close(k, x + _mlp(sd4, x, "linear.0", "linear.1"), rtol=1e-6, atol=1e-6)


def test_set_multiplier_zero_is_identity():
    sd = _simple_sd(4, 33)
    network = Hypernetwork.from_state_dict({4: (sd, sd)})
    network.set_multiplier(0.0)
    x = torch.randn(2, 4)
    k, v = apply_hypernetworks([network], x)
    assert torch.equal(k, x) and torch.equal(v, x)


# --- untrusted files ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]

_PEAK_MEMORY = """
from pathlib import Path

import torch

from pipeline.networks import NetworkLibrary, NetworkLoadError

def kb(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key))

def growth(action):
    # Writing 5 to clear_refs resets the peak (VmHWM) to the current resident size.
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = kb("VmRSS")
    action()
    return kb("VmHWM") - before

def load():
    try:
        NetworkLibrary(Path({models!r})).for_prompt("a cat <hypernet:huge>")
    except NetworkLoadError as exc:
        print("refused:", exc.params["reason"])

print("load_kb", growth(load))
# One layer of the size the file asked the old loader to build (it built four).
print("control_kb", growth(lambda: torch.nn.Linear(8192, 16384)))
"""


def test_a_huge_width_key_is_refused_before_anything_is_allocated(tmp_path):
    """A 1.3 KB file whose width key is 8192 once made the loader build 8192-wide layers
    (about 1 GB) before the weights were found not to fit. The peak memory of a fresh
    process shows the refusal costs nothing; the control shows the measure sees such a
    layer."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's peak-memory reset")
    state = hypernetwork_state(width=4)
    state[8192] = state.pop(4)
    path = write(tmp_path / "models" / "hypernetworks" / "huge.pt", torch_bytes(state))
    assert path.stat().st_size < 4096
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY.format(models=str(tmp_path / "models"))],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["refused:"] == "hypernetwork width must be 1-4096, got 8192"
    assert int(lines["load_kb"]) < 64 * 1024
    assert int(lines["control_kb"]) > 400 * 1024


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda s: s.__setitem__(32, s.pop(32)[:1]), "does not hold a pair"),
        (
            lambda s: s[32][0].__setitem__("linear.0.weight", torch.zeros(64, 31)),
            r"has shape \(64, 31\), expected \(64, 32\)",
        ),
        (
            lambda s: s[32][0].__setitem__("linear.0.weight", torch.zeros(64, 32, dtype=torch.long)),
            "not a float tensor",
        ),
        (lambda s: s.__setitem__("layer_structure", [1, 1e9, 1]), "at most 16"),
        (lambda s: s.__setitem__("layer_structure", [1] * 100), "short list of numbers"),
        (lambda s: s.__setitem__("layer_structure", [1, 10**400, 1]), "short list of numbers"),
        (lambda s: s.__setitem__("activation_func", "threshold"), "unsupported hypernetwork activation"),
        (lambda s: s.__setitem__("activation_func", ["relu"]), "not a name"),
        (lambda s: s.__setitem__("is_layer_norm", "yes"), "not true or false"),
        (lambda s: s.__setitem__(0, s[32]), "width must be 1-4096, got 0"),
        (lambda s: s.pop(32), "no hypernetwork layers"),
    ],
)
def test_untrusted_hypernetwork_dicts_are_checked_before_any_layer_is_built(change, reason):
    state = hypernetwork_state()
    change(state)
    with pytest.raises(ValueError, match=reason):
        Hypernetwork.from_state_dict(state)


def test_a_valid_file_draws_nothing_from_the_global_rng():
    """Modules are built on the meta device and take the file's tensors."""
    state = hypernetwork_state()
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    network = Hypernetwork.from_state_dict(state)
    assert torch.equal(torch.rand(1), expected)
    assert torch.equal(network.layers[32][0].linear[0].weight, state[32][0]["linear.0.weight"])
    assert network.name == "hn" and network.layers[32][0].linear[0].weight.device.type == "cpu"
