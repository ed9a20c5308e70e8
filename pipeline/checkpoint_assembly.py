"""How a catalog entry of :mod:`pipeline.checkpoints` becomes a pipeline: a single file
assembled from its safely loaded weights and its family's configs (or the shapes its
``.yaml`` declares), a diffusers folder loaded as it is, and the checks on what comes out
(the tokenizer's size and special tokens, the UNet's input channels). A checkpoint that
fails one is refused with a ``CheckpointLoadError`` naming why."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import edit_model
from pipeline.checkpoint_files import CheckpointInfo
from pipeline.checkpoint_yaml import mapping
from pipeline.errors import CheckpointLoadError

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

_MIN_TOKENIZER_SIZE = 258


def _check_tokenizer(info: CheckpointInfo, tokenizer: Any) -> None:
    if tokenizer is None or len(tokenizer) < _MIN_TOKENIZER_SIZE:
        size = 0 if tokenizer is None else len(tokenizer)
        raise CheckpointLoadError(info.name, f"its tokenizer is missing or empty ({size} tokens)")


def _check_special_tokens(info: CheckpointInfo, tokenizer: Any, folder: Path) -> None:
    """A1111 wraps every prompt chunk in the tokenizer's start and end tokens; one that
    lacks them, or whose ids are not the CLIP ones the chunking uses, cannot serve the
    checkpoint, and is refused here rather than failing every draw."""
    from pipeline.clip import BOS_ID, EOS_ID

    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id)
    if ids != (BOS_ID, EOS_ID):
        raise CheckpointLoadError(
            info.name,
            f"the tokenizer in {folder} has start/end token ids {ids}, not CLIP's ({BOS_ID}, {EOS_ID})",
        )


def _has_vocab(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()


def _text_encoder_folder(info: CheckpointInfo, definition: dict[str, Any] | None) -> Path | None:
    """The local folder the yaml's ``cond_stage_config.params.version`` names (absolute, or
    relative to the yaml), which A1111 builds the text encoder and tokenizer from; None
    when it names a hub model (the family's packaged text-encoder config then applies)."""
    if definition is None or info.config_path is None:
        return None
    params = mapping(mapping(mapping(definition, "model"), "params"), "cond_stage_config")
    version = mapping(params, "params").get("version")
    if not isinstance(version, str) or not version:
        return None
    folder = info.config_path.parent / version
    return folder if folder.is_dir() else None


def _assemble_single_file(
    info: CheckpointInfo,
    state: dict[str, torch.Tensor],
    config: Path,
    tokenizer: Any,
    definition: dict[str, Any] | None = None,
    encoder_folder: Path | None = None,
) -> StableDiffusionPipeline:
    """The pipeline from an already safely loaded state dict and a family's configs.

    With a ``definition`` (the checkpoint's ``.yaml``) the UNet and VAE have the shapes it
    declares (channels, attention resolutions, heads, context dimension, input channels),
    as A1111's ``instantiate_from_config`` builds them, and the text encoder comes from
    the folder it names; otherwise from the family's packaged configs. The components
    are converted one by one from the dict, so diffusers never opens the file itself
    (its own ``.ckpt`` reader is not the allow-list one)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    common: dict[str, Any] = {"config": str(config), "local_files_only": True}
    if definition is not None:
        shaped: dict[str, Any] = {"original_config": definition, "local_files_only": True}
        unet = UNet2DConditionModel.from_single_file(state, **shaped)
        _check_unet_inputs(info, unet.config.in_channels)
        vae = AutoencoderKL.from_single_file(state, **shaped)
    else:
        # A1111 picks its inpainting or instruct-pix2pix config from the weights' channels
        inputs = edit_model.unet_inputs(state) or edit_model.TXT2IMG_INPUTS
        _check_unet_inputs(info, inputs)
        unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", in_channels=inputs, **common)
        vae = AutoencoderKL.from_single_file(state, subfolder="vae", **common)
    if encoder_folder is not None:
        subfolder = "text_encoder" if (encoder_folder / "text_encoder" / "config.json").is_file() else ""
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, state, subfolder=subfolder, config=str(encoder_folder), local_files_only=True
        )
    else:
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, state, subfolder="text_encoder", **common
        )
    scheduler = PNDMScheduler.from_pretrained(config, subfolder="scheduler", local_files_only=True)
    scheduler = PNDMScheduler.from_config(scheduler.config, prediction_type=info.prediction_type or "epsilon")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_unet_inputs(info: CheckpointInfo, inputs: int) -> None:
    if inputs not in edit_model.UNET_INPUTS:
        raise CheckpointLoadError(
            info.name, f"its UNet takes {inputs} input channels; {edit_model.UNET_INPUTS_TEXT} are supported"
        )


def _load_sdxl_folder(info: CheckpointInfo) -> Any:
    from pipeline import sdxl

    assert info.path is not None
    pipe = sdxl.load_folder(info.path)
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        _check_tokenizer(info, tokenizer)
    return pipe


def _load_diffusers_folder(info: CheckpointInfo) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    assert info.path is not None
    pipe = StableDiffusionPipeline.from_pretrained(
        info.path,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _check_tokenizer(info, getattr(pipe, "tokenizer", None))
    pipe.set_progress_bar_config(disable=True)
    return pipe
