"""Trainer with per-module learning rates and a trainable-parameter report."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn
from transformers import Trainer

logger = logging.getLogger(__name__)

LLM, VISION_TOWER, PROJECTOR = "llm", "vision_tower", "projector"

# Qwen2-VL / Qwen2.5-VL call the projector `visual.merger`; Qwen3-VL adds `visual.deepstack_merger_list`.
_PROJECTOR = re.compile(r"(^|\.)visual\.(merger|deepstack_merger_list)(\.|$)")
_VISION = re.compile(r"(^|\.)visual\.")


def classify_parameter(name: str) -> str:
    """Which module a parameter belongs to: ``llm``, ``vision_tower`` or ``projector``.

    Example:
        >>> classify_parameter("model.visual.merger.mlp.0.weight"), classify_parameter("model.visual.blocks.0.attn.qkv.bias")
        ('projector', 'vision_tower')
        >>> classify_parameter("lm_head.weight")
        'llm'
    """
    if _PROJECTOR.search(name):
        return PROJECTOR
    if _VISION.search(name):
        return VISION_TOWER
    return LLM


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that get weight decay: everything but biases and norm weights.

    Norms are found by module type (any class whose name contains ``Norm``: the
    RMSNorms called ``norm1``, ``ln_q``, ``input_layernorm`` ... alike), not by
    parameter name, so no norm escapes because of how it is called.
    """
    no_decay: set[str] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__
        for param_name, _ in module.named_parameters(recurse=False):
            if is_norm or param_name == "bias":
                no_decay.add(f"{module_name}.{param_name}" if module_name else param_name)
    return {name for name, _ in model.named_parameters() if name not in no_decay}


def build_parameter_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    decay_names: set[str],
    learning_rate: float,
    weight_decay: float,
    vision_tower_lr: float | None = None,
    mm_projector_lr: float | None = None,
) -> list[dict]:
    """Optimizer groups {decay, no decay} x {llm, vision tower, projector}.

    Only parameters that require grad; empty groups are left out. Each group
    carries a ``name`` such as ``"projector/no_decay"``.

    Args:
        named_parameters: ``model.named_parameters()``.
        decay_names: names that get weight decay (``decay_parameter_names``).
        learning_rate: LR of the LLM, and of the other modules when their own LR is None.
        weight_decay: decay of the decay groups.
        vision_tower_lr: LR of the vision tower.
        mm_projector_lr: LR of the merger/projector.

    Returns:
        list of ``{"name", "params", "lr", "weight_decay"}``.
    """
    lrs = {
        LLM: learning_rate,
        VISION_TOWER: vision_tower_lr if vision_tower_lr is not None else learning_rate,
        PROJECTOR: mm_projector_lr if mm_projector_lr is not None else learning_rate,
    }
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = defaultdict(list)
    for name, param in named_parameters:
        if param.requires_grad:
            buckets[(classify_parameter(name), name in decay_names)].append(param)
    groups = []
    for module in (LLM, VISION_TOWER, PROJECTOR):
        for decay in (True, False):
            params = buckets.get((module, decay))
            if params:
                groups.append({
                    "name": f"{module}/{'decay' if decay else 'no_decay'}",
                    "params": params,
                    "lr": lrs[module],
                    "weight_decay": weight_decay if decay else 0.0,
                })
    return groups


def describe_trainable(model: nn.Module) -> str:
    """One line per module: which vision blocks, merger and LLM layers train.

    Example output::

        vision tower: blocks trainable [] frozen [0, 1]; patch_embed frozen
        merger: trainable
        llm: layers trainable [0, 1] frozen []; embed_tokens trainable; lm_head trainable
        trainable parameters: 1,234 / 5,678 (21.73%)
    """
    layer = re.compile(r"(?:^|\.)(blocks|layers)\.(\d+)\.")
    per_layer: dict[tuple[str, int], list[bool]] = defaultdict(list)
    other: dict[str, list[bool]] = defaultdict(list)
    total = trainable = 0
    for name, param in model.named_parameters():
        count = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        total += count
        trainable += count if param.requires_grad else 0
        module = classify_parameter(name)
        match = layer.search(name)
        if match and module != PROJECTOR:
            per_layer[(module, int(match.group(2)))].append(param.requires_grad)
        else:
            key = "merger" if module == PROJECTOR else name.split(".")[-2] if "." in name else name
            if "lm_head" in name:
                key = "lm_head"
            elif "embed_tokens" in name:
                key = "embed_tokens"
            elif "patch_embed" in name:
                key = "patch_embed"
            other[key].append(param.requires_grad)

    def layers_of(module: str) -> str:
        indices = sorted(i for (m, i) in per_layer if m == module)
        on = [i for i in indices if any(per_layer[(module, i)])]
        off = [i for i in indices if not any(per_layer[(module, i)])]
        return f"trainable {on} frozen {off}"

    def state(key: str) -> str:
        flags = other.get(key)
        if not flags:
            return "absent"
        return "trainable" if all(flags) else "frozen" if not any(flags) else "partly trainable"

    lines = [
        f"vision tower: blocks {layers_of(VISION_TOWER)}; patch_embed {state('patch_embed')}",
        f"merger: {state('merger')}",
        f"llm: layers {layers_of(LLM)}; embed_tokens {state('embed_tokens')}; lm_head {state('lm_head')}",
        f"trainable parameters: {trainable:,} / {total:,} ({100.0 * trainable / max(total, 1):.2f}%)",
    ]
    return "\n".join(lines)


class QwenVLTrainer(Trainer):
    """HF Trainer whose optimizer has per-module learning rates (SPEC 10)."""

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        groups = build_parameter_groups(
            opt_model.named_parameters(),
            decay_parameter_names(opt_model),
            self.args.learning_rate,
            self.args.weight_decay,
            vision_tower_lr=getattr(self.args, "vision_tower_lr", None),
            mm_projector_lr=getattr(self.args, "mm_projector_lr", None),
        )
        if not groups:
            raise ValueError("no parameter requires grad: set --tune_mm_llm, --tune_mm_mlp or --tune_mm_vision")
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("params", None)
        optimizer_kwargs.pop("model", None)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        for group in groups:
            logger.info("optimizer group %-22s %4d tensors lr=%g weight_decay=%g", group["name"],
                        len(group["params"]), group["lr"], group["weight_decay"])
        return self.optimizer
