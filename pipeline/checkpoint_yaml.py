"""A single-file checkpoint's ``<name>.yaml``, read as A1111 reads it.

Two uses: the scan learns the family, prediction type, ``use_ema`` and the UNet's input
channels from it (:func:`read_yaml_config`), and a yaml that describes the networks
(``unet_config`` and ``first_stage_config``) defines the model's shapes when it loads
(:func:`model_definition`). Nothing in the file can run: it is read with ``yaml.safe_load``
and only plain values of the expected types are used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A checkpoint's .yaml is a few kilobytes; far larger is not a model config.
MAX_YAML_BYTES = 1024 * 1024


class ConfigFileError(ValueError):
    """A checkpoint's ``.yaml`` that cannot be read as a model config; the text says why."""


def read_yaml_config(path: Path) -> dict[str, Any]:
    """What a checkpoint's ``.yaml`` tells us: ``prediction_type``, ``use_ema``, ``family``
    and ``unet_inputs`` (the UNet's ``in_channels``: 8 for instruct-pix2pix, 9 for inpainting).

    Raises :class:`ConfigFileError` for a file that is not UTF-8 YAML (or is too large or
    too deeply nested); values of the wrong type are ignored, so a crafted file cannot
    make this format an exponentially aliased structure."""
    data = _load_yaml(path)
    model = mapping(data, "model")
    params = mapping(model, "params")
    found: dict[str, Any] = {}
    parameterization = params.get("parameterization")
    if isinstance(parameterization, str):
        found["prediction_type"] = "v_prediction" if parameterization == "v" else "epsilon"
    if isinstance(params.get("use_ema"), (bool, int)):
        found["use_ema"] = bool(params["use_ema"])
    in_channels = mapping(mapping(params, "unet_config"), "params").get("in_channels")
    if isinstance(in_channels, int) and not isinstance(in_channels, bool):
        found["unet_inputs"] = in_channels
    target = model.get("target")
    cond_target = mapping(params, "cond_stage_config").get("target")
    target = target if isinstance(target, str) else ""
    cond_target = cond_target if isinstance(cond_target, str) else ""
    if target.startswith("sgm."):
        found["family"] = "sdxl"
    elif "OpenCLIP" in cond_target:
        found["family"] = "sd2"
    elif "FrozenCLIPEmbedder" in cond_target:
        found["family"] = "sd1"
    return found


def model_definition(path: Path) -> dict[str, Any] | None:
    """The whole ``.yaml`` when it defines the model's networks (A1111's
    ``instantiate_from_config``: ``model.params.unet_config`` and ``first_stage_config``),
    else None (a yaml that only sets the parameterization or ``use_ema``)."""
    data = _load_yaml(path)
    params = mapping(mapping(data, "model"), "params")
    unet = mapping(mapping(params, "unet_config"), "params")
    vae = mapping(mapping(mapping(params, "first_stage_config"), "params"), "ddconfig")
    if not unet or not vae:
        return None
    return data if isinstance(data, dict) else None


def _load_yaml(path: Path) -> Any:
    import yaml

    try:
        raw = path.read_bytes() if path.stat().st_size <= MAX_YAML_BYTES else None
    except OSError as exc:
        raise ConfigFileError(f"cannot be read ({exc.strerror or exc})") from exc
    if raw is None:
        raise ConfigFileError(f"it is larger than {MAX_YAML_BYTES} bytes; a model config is a few kilobytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"it is not UTF-8 text (byte {exc.start})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or type(exc).__name__).split())[:120]
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigFileError(f"it is not valid YAML ({problem}{where})") from exc
    except (RecursionError, ValueError, TypeError) as exc:
        raise ConfigFileError(f"it is not a model config YAML ({type(exc).__name__})") from exc
    return data


def mapping(data: Any, key: str) -> dict[Any, Any]:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else {}
