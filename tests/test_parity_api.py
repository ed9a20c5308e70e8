"""Every name of PARITY-API.md imports from a checkout: no GPU, database, network or env needed."""

from __future__ import annotations

import inspect

from tests.scenario import run_bare

NAMES = {
    "pipeline.prompts": ["parse_attention", "prompt_schedules", "scheduled_at", "split_and"],
    "pipeline.errors": ["PromptSyntaxError", "AxisValueError"],
    "pipeline.extra_networks": ["parse", "ExtraNetworkParams"],
    "plugins.styles": ["merge_prompt", "apply_style_texts", "extract_style_text", "Style", "StyleDatabase"],
    "pipeline.infotext": ["parse", "format", "InfotextParams", "quote", "unquote", "StyleExtractor"],
    "plugins.xy_grid": ["parse_axis_values", "axis_labels"],
    "pipeline.grid": ["grid_layout", "GridLayout"],
    "pipeline.rng": ["Generator", "slerp", "ImageRNG"],
    "pipeline.hashing": ["sha256", "old_model_hash", "addnet_hash", "short_hash"],
    "pipeline.samplers": [
        "list_samplers", "list_schedulers", "resolve", "ensd_in_infotext", "sigma_schedule", "sigma_to_timestep",
        "timesteps", "unet_call_timesteps", "SamplerInfo", "SchedulerInfo", "SigmaSchedule",
    ],
    "pipeline.clip": ["chunk_prompt", "target_token_count", "apply_emphasis", "PromptChunk"],
    "pipeline.hypernetwork": ["Hypernetwork", "HypernetworkModule", "apply_hypernetworks", "dropout_structure"],
}  # fmt: skip

P, K = "positional", "keyword"
SIGNATURES = {
    ("pipeline.prompts", "prompt_schedules"): [("prompts", P), ("steps", P), ("hires_steps", K, None),
                                               ("old_timelines", K, False)],
    ("pipeline.samplers", "resolve"): [("sampler_name", P), ("scheduler", P, None), ("convert_automatic", K, False)],
    ("pipeline.samplers", "sigma_schedule"): [("sampler", P), ("scheduler", P), ("steps", P), ("sdxl", K, False)],
    ("pipeline.grid", "grid_layout"): [("image_sizes", P), ("rows", K, None), ("batch_size", K, 1), ("n_rows", K, -1),
                                       ("prevent_empty_spots", K, False)],
    ("pipeline.clip", "apply_emphasis"): [("z", P), ("multipliers", P), ("mode", P, "Original")],
    ("pipeline.hashing", "short_hash"): [("path", P), ("kind", P)],
    ("plugins.xy_grid", "parse_axis_values"): [("axis", P), ("text", P)],
    ("pipeline.rng", "slerp"): [("strength", P), ("low", P), ("high", P)],
    ("pipeline.clip", "chunk_prompt"): [("text", P), ("tokenize", P), ("comma_padding_backtrack", K, 20),
                                        ("emphasis", K, "Original")],
}  # fmt: skip


def _described(parameter: inspect.Parameter) -> tuple:
    kind = K if parameter.kind is inspect.Parameter.KEYWORD_ONLY else P
    if parameter.default is inspect.Parameter.empty:
        return (parameter.name, kind)
    return (parameter.name, kind, parameter.default)


def test_every_parity_name_imports_in_a_bare_environment() -> None:
    lines = [f"from {module} import {', '.join(names)}" for module, names in NAMES.items()]
    run_bare("\n".join(lines), CUDA_VISIBLE_DEVICES="")


def test_signatures_follow_the_contract() -> None:
    """The documented parameters come first, in order; extra ones must be optional keywords."""
    import importlib

    for (module, name), expected in SIGNATURES.items():
        parameters = list(
            inspect.signature(getattr(importlib.import_module(module), name)).parameters.values()
        )
        assert [_described(p) for p in parameters[: len(expected)]] == expected, (module, name)
        for extra in parameters[len(expected) :]:
            assert (
                extra.kind is inspect.Parameter.KEYWORD_ONLY and extra.default is not inspect.Parameter.empty
            )


def test_errors_are_value_errors() -> None:
    from pipeline.errors import AxisValueError, PromptSyntaxError

    assert issubclass(PromptSyntaxError, ValueError) and issubclass(AxisValueError, ValueError)
