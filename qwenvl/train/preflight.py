"""Checks that need no model weights, run before the model loads (seconds, not minutes).

Each failure is a ``PreflightError`` naming the flag and what to do. Order:
the model folder's config (the weights are not read), the datasets and their
files, the integrations asked for with ``--report_to``, evaluation settings,
what would train, and the pixel limits against the checkpoint's patch size.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from qwenvl.data import load_registry_file
from qwenvl.data.annotations import open_store
from qwenvl.data.packing import is_packed_file, offline_packed
from qwenvl.data.sources import Source, resolve_sources
from qwenvl.models import FAMILIES, family_for
from qwenvl.models.loading import CheckpointError, check_model_type, resolve_checkpoint
from qwenvl.train.argument import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

# --report_to integration -> (importable module(s) that satisfy it, what to install)
INTEGRATION_PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "comet_ml": (("comet_ml",), "comet_ml"),
    "clearml": (("clearml",), "clearml"),
    "neptune": (("neptune",), "neptune"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
    "trackio": (("trackio",), "trackio"),
}


class PreflightError(ConfigError):
    """A setting that cannot work, found before the model loads; the message names the flag."""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_model_path(model_name_or_path: str, cache_dir: str | None = None) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict (no weights read), from a local folder, the HF cache or the hub.

    See ``check_model`` (which also swaps an unreachable hub id for its cached snapshot).

    Raises:
        PreflightError: no config can be found (fast: see ``resolve_checkpoint``), or its ``model_type`` is
            not supported (remote-code checkpoints named, with what to use instead).
    """
    return check_model(SimpleNamespace(model_name_or_path=model_name_or_path), cache_dir)


def check_model(model_args: Any, cache_dir: str | None = None) -> dict[str, Any]:
    """``check_model_path`` for ``--model_name_or_path``; when the hub is unreachable and the model is fully cached,
    ``model_args.model_name_or_path`` becomes the cached snapshot folder (said in a warning), so no later load
    waits on the network.

    Raises:
        PreflightError: as ``check_model_path``.
    """
    from transformers import AutoConfig

    name = model_args.model_name_or_path
    flag = f"--model_name_or_path {name}"
    try:
        source, config_file, note = resolve_checkpoint(name, cache_dir)
        try:
            raw = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CheckpointError(f"no model config found ({config_file} is not JSON: {exc})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"no model config found ({config_file} holds {type(raw).__name__}, not an object)")
        check_model_type(raw)
    except CheckpointError as exc:
        raise PreflightError(f"{flag}: {exc}") from None
    if note:
        logger.warning(note)
        model_args.model_name_or_path = source
    try:
        config = AutoConfig.from_pretrained(source, cache_dir=cache_dir)
    except (OSError, ValueError) as exc:
        raise PreflightError(f"{flag}: no model config found ({str(exc).splitlines()[0]})") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise PreflightError(
            f"{flag}: model_type {config.model_type!r} is not supported; expected one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config.to_dict()


def check_datasets(flag: str, value: str, packing: bool = False) -> list[Source]:
    """The sources of ``--dataset_use``/``--eval_dataset_use``, resolved and converted to their annotation stores.

    Conversion happens here, once per node (the other processes wait for it), so the datasets
    built after the model loads open warm.

    Raises:
        PreflightError: an unknown name or path, a bad ``%N``, a name given twice, a missing annotation file
            or media folder, a column mapping naming a missing column, a folder that is not a dataset.
    """
    try:
        sources = resolve_sources(value, flag=flag)
    except ValueError as exc:
        raise PreflightError(f"{flag}: {exc}") from None
    if packing:
        try:
            offline_packed(sources)
        except ValueError as exc:
            raise PreflightError(str(exc)) from None
    else:
        check_not_packed(flag, sources)
    for source in sources:
        if source.data_path and not os.path.isdir(source.data_path):
            raise PreflightError(
                f"{flag} {source.name}: data_path {source.data_path} is not a folder (media paths are relative to it)"
            )
        try:
            open_store(source)
        except (ValueError, OSError) as exc:
            raise PreflightError(f"{flag} {source.name}: {exc}") from None
    return sources


def check_not_packed(flag: str, sources: list[Source]) -> None:
    """No source of a flag that reads plain samples is a file written by ``tools/pack_data.py``.

    Raises:
        PreflightError: naming the file and ``--data_packing True`` (for ``--dataset_use``), or the unpacked
            file to evaluate on (``--eval_dataset_use``: evaluation reads samples, not groups).
    """
    for source in sources:
        if source.kind != "json" or not is_packed_file(source.location):
            continue
        if flag == "--dataset_use":
            raise PreflightError(
                f"--dataset_use {source.name}: {source.location} holds groups of samples written by "
                "tools/pack_data.py; add --data_packing True to train on its groups as written (or give the "
                "unpacked annotation file)"
            )
        raise PreflightError(
            f"{flag} {source.name}: {source.location} holds groups of samples written by tools/pack_data.py; "
            "evaluation reads samples: give the unpacked annotation file"
        )


def check_report_to(report_to: list[str] | str | None) -> None:
    """Every ``--report_to`` integration is installed.

    Raises:
        PreflightError: naming the package to install, or ``--report_to none``.
    """
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all"):
            continue
        modules, package = INTEGRATION_PACKAGES.get(name, ((name,), name))
        if not any(_installed(m) for m in modules):
            raise PreflightError(
                f"--report_to {name}: the {package} package is not installed; `pip install {package}` "
                "(scripts/install.sh installs tensorboard and wandb), or pass --report_to none"
            )


def check_eval(training_args: Any, data_args: Any) -> None:
    """Evaluation asked for has an eval set.

    Raises:
        PreflightError: ``--eval_strategy`` (or ``--do_eval``, ``--load_best_model_at_end``) with no
            ``--eval_dataset_use``.
    """
    strategy = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy))
    if data_args.eval_dataset_use:
        if strategy == "no":
            logger.warning("--eval_dataset_use %s is given but --eval_strategy is no: it is never evaluated "
                           "(set --eval_strategy steps --eval_steps N, or epoch)", data_args.eval_dataset_use)
        return
    asked = strategy != "no" or getattr(training_args, "load_best_model_at_end", False)
    if asked:
        raise PreflightError(
            f"--eval_strategy {strategy} asks for evaluation but there is no eval set: give --eval_dataset_use "
            "NAME[,NAME%N] (registry names or files, same syntax as --dataset_use), or --eval_strategy no"
        )


def check_trainable(model_args: Any, training_args: Any) -> None:
    """Something trains.

    Raises:
        PreflightError: no ``--tune_mm_*`` flag is on and ``--lora_enable`` is off.
    """
    if not (model_args.tune_mm_llm or model_args.tune_mm_mlp or model_args.tune_mm_vision
            or getattr(training_args, "lora_enable", False)):
        raise PreflightError(
            "nothing would train: every --tune_mm_llm / --tune_mm_mlp / --tune_mm_vision is False and "
            "--lora_enable is off. Set --tune_mm_llm True (the LLM), --tune_mm_mlp True (the merger), "
            "--tune_mm_vision True (the vision tower) or --lora_enable True."
        )


ATTENTION_CHOICES = ("flash_attention_2", "flash_attention_3", "sdpa_packed", "sdpa", "eager", "flex_attention")


def check_attention(attn_implementation: str) -> None:
    """The attention implementation exists and, for flash attention, is installed.

    Raises:
        PreflightError: an unknown name, or flash_attention_2/3 without its package.
    """
    if attn_implementation not in ATTENTION_CHOICES:
        raise PreflightError(f"--attn_implementation {attn_implementation}: expected one of "
                             f"{', '.join(ATTENTION_CHOICES)}")
    package = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(attn_implementation)
    if package and not _installed(package):
        raise PreflightError(f"--attn_implementation {attn_implementation}: the {package} package is not installed "
                             "(pip install flash-attn, on a CUDA machine), or use sdpa_packed")


def vision_factor(model_name_or_path: str, model_config: dict[str, Any]) -> int:
    """Pixels per side of one LLM vision token: patch_size x merge_size (28 for Qwen2/2.5-VL, 32 for Qwen3-VL).

    Read from the checkpoint's ``preprocessor_config.json`` when it is a local folder, else from the
    model config's vision config.
    """
    processor = Path(model_name_or_path) / "preprocessor_config.json"
    settings: dict[str, Any] = {}
    if processor.is_file():
        settings = json.loads(processor.read_text(encoding="utf-8"))
    vision = model_config.get("vision_config") or {}
    patch = settings.get("patch_size") or vision.get("patch_size") or 14
    merge = settings.get("merge_size") or vision.get("spatial_merge_size") or 2
    if isinstance(patch, (list, tuple)):  # (height, width), e.g. InternVL's vision config: [14, 14]
        patch = max(patch)
    return int(patch) * int(merge)


def check_pixel_limits(data_args: Any, factor: int) -> None:
    """Pixel limits allow at least one vision token per image and per video frame.

    Raises:
        PreflightError: a maximum below ``factor**2`` pixels.
    """
    one = factor * factor
    for flag in ("max_pixels", "video_max_frame_pixels", "video_max_pixels"):
        value = getattr(data_args, flag, None)
        if value is not None and int(value) < one:
            raise PreflightError(
                f"--{flag} {int(value)} is below one vision token for this model ({factor}x{factor} = {one} "
                f"pixels); use at least {one}, e.g. 256*{factor}*{factor}"
            )
    if data_args.video_min_frames < 1:
        raise PreflightError(f"--video_min_frames must be at least 1, got {data_args.video_min_frames}")


def check_family_support(data_args: Any, training_args: Any, model_config: dict[str, Any]) -> None:
    """What the checkpoint's family cannot do yet is refused here, before the model loads.

    HF-processor families (``qwenvl/models/hf_family.py``, e.g. LLaVA) train on padded batches only: no
    flattened batches or packing (``family.flatten_refusal``) and no ``group_by_length`` (their exact token
    counts are not counted ahead).

    Raises:
        PreflightError: naming the flag, the family and the reason.
    """
    family = family_for(model_config)
    if not family.uses_processor_items:
        return
    for flag in ("data_flatten", "data_packing"):
        if getattr(data_args, flag, False):
            raise PreflightError(f"--{flag} True: not supported for the {family.model_type} family "
                                 f"({family.model_class_name}): {family.flatten_refusal}; train with padded batches "
                                 f"(--data_flatten False --data_packing False)")
    if getattr(training_args, "train_sampling_strategy", None) == "group_by_length":
        raise PreflightError(f"--train_sampling_strategy group_by_length: not supported for the {family.model_type} "
                             f"family yet (its exact token counts are not counted ahead); use random")


def preflight(model_args: Any, data_args: Any, training_args: Any) -> dict[str, Any]:
    """Run every check that needs no model weights; returns the model config dict.

    Raises:
        PreflightError: the first failing check.
    """
    if getattr(data_args, "dataset_registry", ""):
        try:
            added = load_registry_file(data_args.dataset_registry)
        except (OSError, ValueError) as exc:
            raise PreflightError(f"--dataset_registry {data_args.dataset_registry}: {exc}") from None
        logger.info("registry file %s: %s", data_args.dataset_registry, ", ".join(added))
    # The model first: a checkpoint that cannot be found or trained fails before any dataset is converted.
    config = check_model(model_args, getattr(training_args, "cache_dir", None))
    if not data_args.dataset_use:
        raise PreflightError("--dataset_use is empty: name the datasets to train on, e.g. --dataset_use "
                             "demo_single_image,my_dataset%50 (registry names from qwenvl/data/__init__.py)")
    check_datasets("--dataset_use", data_args.dataset_use, packing=getattr(data_args, "data_packing", False))
    if data_args.eval_dataset_use:
        check_datasets("--eval_dataset_use", data_args.eval_dataset_use)
    check_report_to(training_args.report_to)
    check_eval(training_args, data_args)
    check_trainable(model_args, training_args)
    check_attention(model_args.attn_implementation)
    check_family_support(data_args, training_args, config)
    check_pixel_limits(data_args, vision_factor(model_args.model_name_or_path, config))
    return config
