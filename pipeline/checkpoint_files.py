"""What a checkpoint file or folder is, found without loading it: :class:`CheckpointInfo`,
the family and prediction type, and the inspection a scan runs on each single file (with
the ``.yaml`` and ``.vae.*`` beside it) and on each diffusers folder's weight files.

Family and prediction type (A1111 detects both from the weights and the ``.yaml``):

* SDXL: any ``conditioner.embedders.*`` key; SD 2.x: OpenCLIP text-encoder keys
  (``cond_stage_model.model.*``); SD 1.x: CLIP keys (``cond_stage_model.transformer.*``);
  otherwise the UNet's cross-attention width decides (768 → SD1, 1024 → SD2, 2048 → SDXL).
* v-prediction: a ``<name>.yaml`` beside the file with ``model.params.parameterization: v``,
  else a safetensors ``__metadata__`` entry ``modelspec.prediction_type`` of ``v``/
  ``v_prediction``; else epsilon. (A1111 also probes SD 2.x UNets with a test input when
  there is no yaml; that probe is not implemented, so a v-model SD 2.x file needs its yaml.)

A file that cannot be used raises :class:`_Skipped`, carrying the error that resolving
its name will raise and the unreadable files to report; the library
(:mod:`pipeline.checkpoints`) leaves it out of its list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import edit_model, safe_load
from pipeline.checkpoint_yaml import ConfigFileError, read_yaml_config
from pipeline.errors import CheckpointLoadError
from pipeline.model_folder import UnreadableFile, code_of, reason_of, relative_name

CheckpointKind = Literal["builtin", "diffusers", "single_file"]
Family = Literal["sd1", "sd2", "sdxl"]

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt")
# A1111's search order for a checkpoint's own VAE.
VAE_SUFFIXES = (".vae.pt", ".vae.ckpt", ".vae.safetensors")
_CROSS_ATTENTION_WIDTH: dict[int, Family] = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint the library knows.

    ``sha256`` is the short (10 hex) model hash infotexts write, ``full_sha256`` the whole
    digest and ``old_hash`` the pre-2023 8-hex hash; all three are None until computed
    (single files only). ``vae_path`` is a ``<name>.vae.*`` file beside the checkpoint,
    ``config_path`` its ``<name>.yaml``; ``family`` is None where not yet known (a
    ``.ckpt`` is only inspected when loaded). ``unet_inputs`` is the UNet's input
    channels (:mod:`pipeline.edit_model`), from the weights, the yaml or the folder's
    config, and from the loaded UNet once loaded; None while unknown.
    """

    name: str
    path: Path | None
    kind: CheckpointKind
    sha256: str | None = None
    family: Family | None = None
    prediction_type: str | None = None
    vae_path: Path | None = None
    config_path: Path | None = None
    full_sha256: str | None = None
    old_hash: str | None = None
    use_ema: bool | None = None
    unet_inputs: int | None = None

    @property
    def is_edit_model(self) -> bool:
        """An instruct-pix2pix checkpoint: it only edits an init image (img2img)."""
        return self.unet_inputs == edit_model.EDIT_INPUTS

    @property
    def is_inpainting(self) -> bool:
        return self.unet_inputs == edit_model.INPAINTING_INPUTS

    @property
    def model_name(self) -> str:
        """What A1111 writes as ``Model``: a single file's stem without its folders."""
        return self.path.stem if self.kind == "single_file" and self.path is not None else self.name

    @property
    def title(self) -> str:
        """A1111's dropdown title: the file's relative name with extension, and its short hash."""
        base = self.name if self.path is None or self.kind != "single_file" else self.name + self.path.suffix
        return f"{base} [{self.sha256}]" if self.sha256 else base


class _Skipped(Exception):
    """A single file left out of the list: the error resolving its name raises, and the
    files to report (the checkpoint, and the .yaml or .vae beside it that made it fail)."""

    def __init__(self, error: CheckpointLoadError, files: list[UnreadableFile]) -> None:
        super().__init__(str(error))
        self.error = error
        self.files = files


def detect_family(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]]) -> Family | None:
    """SD 1.x, 2.x or SDXL from an A1111-layout state dict's keys (and shapes)."""
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    for key in keys:
        if key.startswith("model.diffusion_model.") and key.endswith("attn2.to_k.weight"):
            shape = shapes.get(key) or (0,)
            return _CROSS_ATTENTION_WIDTH.get(shape[-1])
    return None


def _is_checkpoint_file(path: Path, root: Path) -> bool:
    lower = path.name.lower()
    if not lower.endswith(CHECKPOINT_SUFFIXES) or any(lower.endswith(s) for s in VAE_SUFFIXES):
        return False
    if not path.is_file():
        return False
    # Weights inside a diffusers folder belong to that folder, not to the list.
    inside = path.relative_to(root).parents
    return not any((root / parent / "model_index.json").is_file() for parent in inside if parent != Path("."))


def _single_file_info(path: Path, root: Path, models_dir: Path | None) -> CheckpointInfo:
    """The file inspected (no weights read), with the ``.yaml`` and ``.vae.*`` beside it;
    raises :class:`_Skipped` when any of them cannot be used."""
    name = path.relative_to(root).with_suffix("").as_posix()
    label = relative_name(path, models_dir)
    stem = path.with_suffix("")
    vae = next((v for s in VAE_SUFFIXES if (v := stem.with_name(stem.name + s)).is_file()), None)
    yaml_path = stem.with_name(stem.name + ".yaml")
    settings: dict[str, Any] = {}
    if yaml_path.is_file():
        try:
            settings = read_yaml_config(yaml_path)
        except ConfigFileError as exc:
            _skip_for(
                name,
                label,
                yaml_path,
                UnreadableFile(relative_name(yaml_path, models_dir), "config", str(exc)),
            )
    if vae is not None:
        try:
            safe_load.inspect_model_file(vae)
        except CheckpointLoadError as exc:
            side = UnreadableFile(relative_name(vae, models_dir), "vae", reason_of(exc), code_of(exc))
            _skip_for(name, label, vae, side)
    try:
        summary = safe_load.inspect_model_file(path)
    except CheckpointLoadError as exc:
        raise _Skipped(exc, [UnreadableFile(label, "checkpoint", reason_of(exc), code_of(exc))]) from exc
    family = detect_family(summary.shapes, summary.shapes)
    prediction = settings.get("prediction_type") or _metadata_prediction(summary.metadata)
    return CheckpointInfo(
        name=name,
        path=path,
        kind="single_file",
        family=family or settings.get("family"),
        prediction_type=prediction,
        vae_path=vae,
        config_path=yaml_path if yaml_path.is_file() else None,
        use_ema=settings.get("use_ema"),
        unet_inputs=edit_model.unet_inputs(summary.shapes) or settings.get("unet_inputs"),
    )


# What diffusers and transformers may load as weights from a diffusers folder.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _check_folder_weights(folder: Path, name: str, models_dir: Path | None) -> None:
    """Every weight file of a diffusers folder through :func:`safe_load.inspect_model_file`;
    raises :class:`_Skipped` for the folder at the first that fails."""
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in _WEIGHT_SUFFIXES or not path.is_file():
            continue
        try:
            safe_load.inspect_model_file(path)
        except CheckpointLoadError as exc:
            side = UnreadableFile(relative_name(path, models_dir), "checkpoint", reason_of(exc), code_of(exc))
            error = CheckpointLoadError(name, f"its file {side.name} cannot be used: {side.reason}")
            folder_label = relative_name(folder, models_dir)
            own = UnreadableFile(
                folder_label, "checkpoint", f"its file {side.name} cannot be used", "side_file", side.name
            )
            raise _Skipped(error, [side, own]) from exc


def _skip_for(name: str, label: str, side_path: Path, side: UnreadableFile) -> None:
    """A checkpoint whose .yaml or .vae cannot be used is left out with it: loading it
    without them would give wrong images (or fail at every request)."""
    what = "config" if side.kind == "config" else "VAE"
    error = CheckpointLoadError(name, f"its {what} {side_path.name} cannot be used: {side.reason}")
    own = UnreadableFile(
        label, "checkpoint", f"its {what} {side_path.name} cannot be used", "side_file", side.name
    )
    raise _Skipped(error, [side, own])


def _metadata_prediction(metadata: Any) -> str | None:
    value = metadata.get("modelspec.prediction_type") if isinstance(metadata, dict) else None
    if value in ("v", "v_prediction"):
        return "v_prediction"
    return "epsilon" if value == "epsilon" else None


def _folder_family(folder: Path) -> Family | None:
    """SDXL when the folder's ``model_index.json`` names a second text encoder; else unknown."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return "sdxl" if isinstance(index, dict) and "text_encoder_2" in index else None


def _folder_prediction(folder: Path) -> str | None:
    import json

    try:
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("prediction_type", "epsilon") if isinstance(config, dict) else None
