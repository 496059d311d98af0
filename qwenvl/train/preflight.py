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
from typing import Any

from qwenvl.data import load_registry_file
from qwenvl.data.annotations import open_store
from qwenvl.data.packing import offline_packed
from qwenvl.data.sources import Source, resolve_sources
from qwenvl.models import FAMILIES
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
    """The checkpoint's ``config.json`` as a dict (no weights read).

    Raises:
        PreflightError: no config can be found, or its ``model_type`` is not supported.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name_or_path, cache_dir=cache_dir)
    except (OSError, ValueError) as exc:
        raise PreflightError(
            f"--model_name_or_path {model_name_or_path}: no model config found ({str(exc).splitlines()[0]}). "
            "Give a local folder holding config.json, or a hub name already in the local cache (no downloads)."
        ) from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise PreflightError(
            f"--model_name_or_path {model_name_or_path}: model_type {config.model_type!r} is not supported; "
            f"expected one of {', '.join(SUPPORTED_MODEL_TYPES)}"
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
    config = check_model_path(model_args.model_name_or_path, getattr(training_args, "cache_dir", None))
    check_pixel_limits(data_args, vision_factor(model_args.model_name_or_path, config))
    return config
