"""LoRA / DoRA / rsLoRA / QLoRA for Qwen-VL via peft, and loading what they save.

Under ``--lora_enable`` the language model trains through low-rank adapters on
its linear layers (``--lora_target_modules``, default the attention and MLP
projections; ``all-linear`` takes every linear layer of the LLM but lm_head).
The vision tower and the merger keep the meaning of their tune flags: with
``--tune_mm_mlp`` / ``--tune_mm_vision`` they train fully, as peft
``modules_to_save`` next to the adapters, and the per-module LRs
(``--mm_projector_lr``, ``--vision_tower_lr``) apply to them because
``classify_parameter`` sees ``visual.merger`` / ``visual.`` in the peft names
(an HF-processor family's ``multi_modal_projector`` / ``vision_tower`` alike: the
modules are found by what ``classify_parameter`` says of their parameters, and the
adapters never go into the family's vision modules, ``vision_modules``).

A saved LoRA folder holds ``adapter_config.json`` + ``adapter_model.safetensors``
(plus the processor files ``train_qwen`` writes); ``load_finetuned`` loads it or
a full checkpoint alike, and ``merge_lora`` writes a full checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenvl.models import family_for
from qwenvl.models.loading import load_image_processor, model_class_for
from qwenvl.train.trainer import LLM, PROJECTOR, VISION_TOWER, classify_parameter

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ALL_LINEAR = "all-linear"
AUTO = "auto"  # the family's default targets (qwenvl/models: ModelFamily.lora_targets)
ADAPTER_CONFIG = "adapter_config.json"


# ------------------------------------------------------------------- targets
def llm_linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of the language model except ``lm_head``, by full module name."""
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and classify_parameter(f"{name}.weight") == LLM
        and name.split(".")[-1] != "lm_head"
    }


def lora_target_regex(model: nn.Module, target_modules: str = AUTO) -> str:
    """peft ``target_modules`` regex for the LLM linear layers named by ``--lora_target_modules``.

    The vision tower has layers with the same short names (Qwen2.5-VL's vision
    MLP has ``gate_proj``/``up_proj``/``down_proj``, LLaVA's CLIP tower
    ``q_proj``/``k_proj``/``v_proj``), so the regex excludes everything under the
    family's vision tower and projector modules (``visual.``; ``vision_tower.``,
    ``multi_modal_projector.``: ``vision_modules``).

    Args:
        model: the (unwrapped) Qwen-VL model.
        target_modules: comma-separated short names (``q_proj,v_proj``), ``all-linear``, or ``auto`` (the
            family's default, ``family_targets``).

    Returns:
        a regex that peft full-matches against module names.

    Raises:
        ValueError: a name matches no linear layer of the LLM (the message lists the ones it has).

    Example:
        >>> regex = lora_target_regex(qwen2_5_vl, "q_proj,down_proj")
        >>> [bool(re.fullmatch(regex, name)) for name in ("model.language_model.layers.0.mlp.down_proj",
        ...                                               "model.visual.blocks.0.mlp.down_proj")]
        [True, False]
    """
    available = sorted({name.split(".")[-1] for name in llm_linear_layers(model)})
    if target_modules.strip() == AUTO:
        target_modules = ",".join(family_targets(model))
    if target_modules.strip() == ALL_LINEAR:
        wanted = available
    else:
        wanted = [t.strip() for t in target_modules.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in available]
        if unknown or not wanted:
            raise ValueError(
                f"--lora_target_modules {target_modules!r}: {unknown or 'nothing'} matches no linear layer of the "
                f"language model; it has {','.join(available)} (or pass {ALL_LINEAR})"
            )
    leaves = "|".join(re.escape(t) for t in wanted)
    roots = "|".join(re.escape(m) for m in vision_modules(model))
    return rf"^(?!(?:.*\.)?(?:{roots})\.)(?:.*\.)?(?:{leaves})$"


def vision_modules(model: nn.Module) -> tuple[str, ...]:
    """Names of the modules that hold the vision tower and projector of the model's family (``visual`` for Qwen;
    ``vision_tower``, ``multi_modal_projector`` for LLaVA), never LoRA targets; a model of no registered family:
    ``visual``.

    Example:
        >>> vision_modules(llava_model)
        ('vision_tower', 'multi_modal_projector')
    """
    return family_vision_modules(getattr(model, "config", None))


def family_vision_modules(config: Any) -> tuple[str, ...]:
    """``vision_modules`` from a checkpoint's config (None or of no registered family: ``("visual",)``)."""
    try:
        family = family_for(config)
    except ValueError:
        return ("visual",)
    return tuple(dict.fromkeys((family.vision_module, *family.projector_modules)))


def family_targets(model: nn.Module) -> tuple[str, ...]:
    """``--lora_target_modules auto``: the default targets of the model's family (all projections of a dense
    LLM; attention only for MoE, whose experts are fused parameters, not linear layers)."""
    config = getattr(model, "config", None)
    try:
        return family_for(config).lora_targets
    except ValueError:  # not a Qwen-VL config (e.g. a test model): every projection
        return tuple(DEFAULT_LORA_TARGETS.split(","))


def modules_to_save(model: nn.Module, tune_mm_mlp: bool, tune_mm_vision: bool) -> list[str]:
    """Full names of the vision modules that train fully next to the adapters.

    The largest modules whose parameters are all projector (when ``tune_mm_mlp``) or all vision tower (when
    ``tune_mm_vision``) are listed, found by ``classify_parameter`` whatever the family calls them: Qwen's
    ``visual`` holds both, so its children are listed (the merger; the patch embedding and blocks), LLaVA's
    ``multi_modal_projector`` and ``vision_tower`` are listed whole. The elements of a ModuleList are listed
    one by one, since peft wraps modules it calls. A parameter held directly by a module of mixed kinds
    (LLaVA-NeXT's ``image_newline``) cannot be wrapped: it stays frozen, with a warning.

    Example:
        >>> modules_to_save(tiny_model, tune_mm_mlp=True, tune_mm_vision=False)
        ['model.visual.merger']
        >>> modules_to_save(tiny_llava, tune_mm_mlp=True, tune_mm_vision=True)
        ['model.vision_tower', 'model.multi_modal_projector']
    """
    wanted = {PROJECTOR: tune_mm_mlp, VISION_TOWER: tune_mm_vision, LLM: False}
    names: list[str] = []
    left_out: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        kinds = {classify_parameter(f"{prefix}.{name}" if prefix else name) for name, _ in module.named_parameters()}
        if not any(wanted[kind] for kind in kinds):
            return
        if len(kinds) == 1:
            if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                names.extend(f"{prefix}.{child}" for child, _ in module.named_children())
            else:
                names.append(prefix)
            return
        for name, param in module.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            if wanted[classify_parameter(full)]:
                left_out.append(full)
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    visit("", model)
    if left_out:
        logger.warning("LoRA: %s cannot train next to the adapters (a parameter, not a module peft can save "
                       "whole); it stays frozen", ", ".join(left_out))
    return names


# ---------------------------------------------------------------------- QLoRA
def quantization_config(training_args: Any, config: Any = None) -> Any | None:
    """bitsandbytes nf4 config for ``--load_in_4bit`` (QLoRA), or None.

    nf4 with double quantisation and bf16 compute; the vision tower, projector and
    lm_head stay unquantised so ``--tune_mm_*`` can still train them
    (``quantization_skip_modules`` of the checkpoint's ``config``).

    Raises:
        ValueError: ``--load_in_4bit`` without ``--lora_enable`` (4-bit weights
            cannot be trained directly), or with ``--use_cpu``.
        RuntimeError: no CUDA device (bitsandbytes' 4-bit kernels are CUDA only).
        ImportError: bitsandbytes is not installed.
    """
    if not getattr(training_args, "load_in_4bit", False):
        return None
    if not training_args.lora_enable:
        raise ValueError("--load_in_4bit (QLoRA) trains LoRA adapters on a frozen 4-bit model: add --lora_enable True")
    if training_args.use_cpu or not torch.cuda.is_available():
        raise RuntimeError(
            "--load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes' nf4 4-bit matmuls run on CUDA only, and "
            f"{'--use_cpu is set' if training_args.use_cpu else 'torch.cuda.is_available() is False'} "
            f"(torch {torch.__version__}). Train plain LoRA on CPU (drop --load_in_4bit)."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError("--load_in_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=quantization_skip_modules(config),
    )


def quantization_skip_modules(config: Any = None) -> list[str]:
    """The modules QLoRA leaves unquantised: the family's vision tower and projector (``vision_modules``) and
    ``lm_head``; without a config (or of no registered family) Qwen's ``visual`` and ``lm_head``.

    Example:
        >>> quantization_skip_modules(AutoConfig.from_pretrained("llava-hf/llava-1.5-7b-hf"))
        ['vision_tower', 'multi_modal_projector', 'lm_head']
    """
    return [*family_vision_modules(config), "lm_head"]


# ----------------------------------------------------------------------- LoRA
def lora_config(model: nn.Module, model_args: Any, training_args: Any) -> Any:
    """The peft ``LoraConfig`` the flags describe (see the module docstring)."""
    from peft import LoraConfig

    saved = modules_to_save(model, model_args.tune_mm_mlp, model_args.tune_mm_vision)
    return LoraConfig(
        r=training_args.lora_r,
        lora_alpha=training_args.lora_alpha,
        lora_dropout=training_args.lora_dropout,
        target_modules=lora_target_regex(model, training_args.lora_target_modules),
        modules_to_save=saved or None,
        use_dora=training_args.use_dora,
        use_rslora=training_args.use_rslora,
        bias=getattr(training_args, "lora_bias", "none"),  # --lora_bias (a PEFT config file's bias)
        task_type="CAUSAL_LM",
    )


@contextlib.contextmanager
def peft_deprecations_quiet() -> Iterator[None]:
    """Hide the FutureWarning peft 0.21 triggers while it wraps a model: it reads the deprecated
    ``is_gradient_checkpointing`` (transformers 5: ``is_activation_checkpointing``). peft's to fix; our own
    code calls only the current transformers names."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_lora(model: nn.Module, model_args: Any, training_args: Any) -> nn.Module:
    """Freeze the model and wrap it with LoRA adapters (+ fully trained vision modules per the tune flags).

    Args:
        model: the loaded Qwen-VL model (4-bit under ``--load_in_4bit``).
        model_args: ``ModelArguments`` (``tune_mm_mlp``, ``tune_mm_vision``; ``tune_mm_llm`` is
            ignored with a warning: the LLM trains through its adapters).
        training_args: ``TrainingArguments`` (``lora_*``, ``use_dora``, ``use_rslora``).

    Returns:
        the ``peft.PeftModel``.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if model_args.tune_mm_llm:
        logger.warning("--tune_mm_llm has no effect with --lora_enable: the language model trains through its "
                       "LoRA adapters (%s)", training_args.lora_target_modules)
    if getattr(training_args, "load_in_4bit", False):
        # Freeze and cast only: peft would switch activation checkpointing on through the deprecated
        # gradient_checkpointing_enable; the Trainer does it from --activation_checkpointing
        # (activation_checkpointing_enable), and train_qwen.py lets the frozen embeddings feed it.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for param in model.parameters():
        param.requires_grad_(False)
    config = lora_config(model, model_args, training_args)
    targets = resolved_targets(model, training_args.lora_target_modules)  # before peft adds its own linears
    with peft_deprecations_quiet():
        peft_model = get_peft_model(model, config)
    logger.info("LoRA r=%d alpha=%g dropout=%g%s%s on %s; trained fully: %s", config.r, config.lora_alpha,
                config.lora_dropout, " DoRA" if config.use_dora else "", " rsLoRA" if config.use_rslora else "",
                targets, ", ".join(config.modules_to_save or []) or "nothing")
    return peft_model


def resolved_targets(model: nn.Module, target_modules: str) -> str:
    """``--lora_target_modules`` as the log states it: ``all-linear`` / ``auto`` with the short names they
    resolve to (the language model's layers only, never the vision tower)."""
    wanted = target_modules.strip()
    if wanted == ALL_LINEAR:
        names = sorted({name.split(".")[-1] for name in llm_linear_layers(model)})
    elif wanted == AUTO:
        names = list(family_targets(model))
    else:
        return target_modules
    return f"{wanted} = {','.join(names)} of the language model"


# ------------------------------------------------------------------- loading
def is_lora_folder(path: str | Path) -> bool:
    """True when ``path`` holds a peft adapter (``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_model_of(adapter_dir: str | Path) -> str:
    """The base checkpoint an adapter was trained on (``base_model_name_or_path`` of its config).

    Raises:
        ValueError: the adapter config names no base model.
    """
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{Path(adapter_dir) / ADAPTER_CONFIG} names no base_model_name_or_path; pass --base_model")
    return base


def load_finetuned(
    path: str | Path,
    base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    merge: bool = True,
) -> nn.Module:
    """Load a fine-tuned folder for inference: a full checkpoint, or a LoRA adapter on its base.

    Args:
        path: output folder of ``train_qwen`` (or a ``checkpoint-*`` inside it).
        base_model: base checkpoint for an adapter (default: the one its config names).
        dtype: weight dtype.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
        merge: fold the adapter into the weights (faster generation; same outputs).

    Returns:
        the model in eval mode (a ``PeftModel`` when an adapter is not merged).
    """
    from transformers import AutoConfig

    if not is_lora_folder(path):
        config = AutoConfig.from_pretrained(path)
        model = model_class_for(config).from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
        return model.eval()
    from peft import PeftModel

    base_path = base_model or base_model_of(path)
    config = AutoConfig.from_pretrained(base_path)
    base = model_class_for(config).from_pretrained(base_path, dtype=dtype, attn_implementation=attn_implementation)
    with peft_deprecations_quiet():
        model = PeftModel.from_pretrained(base, str(path))
    if merge:
        model = model.merge_and_unload()
    return model.eval()


def merge_lora(
    adapter_dir: str | Path,
    output_dir: str | Path,
    base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Merge a LoRA adapter into its base and write a full checkpoint that loads with ``from_pretrained``.

    Weights (safetensors), config and generation config come from the merged
    model; the tokenizer, chat template and image processor from the adapter
    folder (``train_qwen`` saves them there, with the training pixel limits),
    else from the base model (an HF-processor family's whole ``AutoProcessor``).

    Args:
        adapter_dir: folder with ``adapter_config.json``.
        output_dir: where to write the merged checkpoint.
        base_model: base checkpoint (default: the one the adapter config names).
        dtype: dtype of the merged weights.

    Returns:
        output_dir.

    Raises:
        ValueError: ``adapter_dir`` holds no adapter.
    """
    from transformers import AutoTokenizer

    if not is_lora_folder(adapter_dir):
        raise ValueError(f"{adapter_dir} holds no {ADAPTER_CONFIG}: not a LoRA output folder")
    base_path = base_model or base_model_of(adapter_dir)
    model = load_finetuned(adapter_dir, base_model=base_path, dtype=dtype, merge=True)
    model.config.use_cache = True
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.use_cache = True
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor_source = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base_path
    if family_for(model.config).uses_processor_items:  # LLaVA & co.: the whole processor, chat template included
        family_for(model.config).load_processor(str(processor_source)).save_pretrained(output_dir)
        logger.info("merged %s into %s -> %s", adapter_dir, base_path, output_dir)
        return output_dir
    AutoTokenizer.from_pretrained(processor_source).save_pretrained(output_dir)
    image_source = adapter_dir if (Path(adapter_dir) / "preprocessor_config.json").is_file() else base_path
    load_image_processor(str(image_source)).save_pretrained(output_dir)
    logger.info("merged %s into %s -> %s", adapter_dir, base_path, output_dir)
    return output_dir
