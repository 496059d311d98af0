"""Trainer with per-module learning rates and a trainable-parameter report."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn
from transformers import Trainer

from qwenvl.data.data_qwen import BAD_SAMPLES_KEY
from qwenvl.train.bad_samples import BadSampleMonitor

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
        if ".original_module." in name:  # peft's frozen spare of a modules_to_save module (LoRA): not in use
            continue
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


# ---------------------------------------------------------- vision-tower sync
def find_submodule(model: nn.Module, leaf_name: str) -> nn.Module | None:
    """First submodule whose own name is ``leaf_name`` (e.g. ``visual``), also under PEFT/DDP wrappers.

    Example:
        >>> type(find_submodule(qwen2_5_vl_model, "visual")).__name__
        'Qwen2_5_VisionTransformerPretrainedModel'
    """
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == leaf_name:
            return module
    return None


def dummy_vision_input(visual: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A black (merge x merge)-patch image (28x28 pixels for Qwen2/2.5-VL) for ``visual``.

    Returns:
        pixel_values: (merge**2, in_channels * temporal_patch_size * patch_size**2) zeros,
            in the tower's dtype and device.
        grid_thw: (1, 3) long ``[[1, merge, merge]]``.
    """
    config = visual.config
    merge, patch = int(config.spatial_merge_size), int(config.patch_size)
    features = int(getattr(config, "in_channels", 3)) * int(config.temporal_patch_size) * patch * patch
    reference = next(visual.parameters())  # right dtype/device even when ZeRO-3 has partitioned it
    pixel_values = torch.zeros(merge * merge, features, dtype=reference.dtype, device=reference.device)
    grid_thw = torch.tensor([[1, merge, merge]], dtype=torch.long, device=reference.device)
    return pixel_values, grid_thw


def _sum_floating(output: object) -> torch.Tensor | None:
    """Sum of every floating tensor in a (nested) model output: touches all of the tower's outputs."""
    if isinstance(output, torch.Tensor):
        return output.float().sum() if output.is_floating_point() else None
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    sums = [s for s in (_sum_floating(v) for v in values) if s is not None]
    return torch.stack(sums).sum() if sums else None


class QwenVLTrainer(Trainer):
    """HF Trainer whose optimizer has per-module learning rates (SPEC 10).

    It also keeps the vision tower in step across ranks (``compute_loss``).
    """

    _vision_needs_sync: bool | None = None
    _llm_trains: bool = True

    def dummy_vision_calls(self, model: nn.Module, inputs: dict) -> int:
        """Dummy vision passes this micro-batch needs so every rank runs the tower alike.

        With several ranks, a rank whose micro-batch has no images (or no videos)
        skips the model's image (video) pass through the vision tower while its
        peers run it. DDP then waits for gradients of the tower that never come,
        and ZeRO-3 gathers the tower's weights on some ranks only; both hang or
        mix up collectives. One dummy pass per missing modality makes every rank
        call the tower exactly twice, in the same place (after the embeddings,
        before the LLM layers), so the ZeRO-3 gathers line up too.

        On a single process the same passes are what keeps an all-text batch
        differentiable when only the merger (or the tower) trains: without them
        its loss depends on no trainable weight and backward fails.

        Returns:
            0 when the batch has both images and videos, when the tower neither
            trains nor is ZeRO-3 partitioned, or on a single process whose LLM
            trains; else the number of missing modalities (1 or 2).
        """
        missing = sum(inputs.get(key) is None for key in ("pixel_values", "pixel_values_videos"))
        if not missing:
            return 0
        if self._vision_needs_sync is None:
            # ZeRO-3 gathers frozen weights too (every forward), so a partitioned frozen tower needs it as well.
            params = [(classify_parameter(name), param) for name, param in model.named_parameters()]
            self._vision_needs_sync = any(p.requires_grad or hasattr(p, "ds_id") for kind, p in params if kind != LLM)
            self._llm_trains = any(p.requires_grad for kind, p in params if kind == LLM)
        if self.args.world_size <= 1 and self._llm_trains:
            return 0
        return missing if self._vision_needs_sync else 0

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict,
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """The model's loss, plus ``0 x`` dummy vision outputs on ranks whose batch lacks images or videos.

        The dummy passes run inside the model's own forward (hooks), so DDP sees
        the tower's parameters used in forward, with ``find_unused_parameters``
        on or off. The loss value and the gradients are unchanged. Skipped bad
        samples listed in the batch are recorded first (``record_bad_samples``).
        """
        self.record_bad_samples(inputs)
        calls = self.dummy_vision_calls(model, inputs)
        host = self.accelerator.unwrap_model(model) if calls else None
        visual = find_submodule(host, "visual") if calls else None
        if visual is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # The model embeds the text, runs the tower on images and videos, then the LLM: run the dummies there.
        trigger = find_submodule(host, "language_model") or host
        dummy_sums: list[torch.Tensor] = []

        def run_dummies(module: nn.Module, args: tuple) -> None:
            if not dummy_sums:
                pixel_values, grid_thw = dummy_vision_input(visual)
                for _ in range(calls):
                    dummy_sums.append(_sum_floating(visual(pixel_values, grid_thw=grid_thw)))

        def add_zero(module: nn.Module, args: tuple, output):
            if not dummy_sums:
                return output
            zero = 0.0 * torch.stack(dummy_sums).sum()
            if isinstance(output, dict):
                key = "loss" if output.get("loss") is not None else "logits"
                output[key] = output[key] + zero.to(output[key].dtype)
                return output
            return (output[0] + zero.to(output[0].dtype),) + tuple(output[1:])

        handles = [trigger.register_forward_pre_hook(run_dummies), host.register_forward_hook(add_zero)]
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        finally:
            for handle in handles:
                handle.remove()

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

    # ------------------------------------- checkpoint weights, saved layout (qwenvl/train/checkpoint.py)
    def _plain_weights_checkpoint(self, folder: str | None, model: nn.Module) -> bool:
        """A checkpoint the Trainer would load with a plain ``load_state_dict`` (not DeepSpeed/FSDP/peft)."""
        from transformers.trainer import _is_peft_model

        from qwenvl.train.checkpoint import checkpoint_weight_files

        return bool(folder) and not (self.is_deepspeed_enabled or self.is_fsdp_enabled or _is_peft_model(model)) \
            and checkpoint_weight_files(folder) is not None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume: load the checkpoint's weights with the key conversion ``from_pretrained`` applies.

        transformers 5.23 would load only ``lm_head`` of a Qwen-VL checkpoint (huggingface/transformers#43701).
        """
        model = self.model if model is None else model
        if not self._plain_weights_checkpoint(resume_from_checkpoint, model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from qwenvl.train.checkpoint import load_checkpoint_weights

        logger.info("loading weights of %s", resume_from_checkpoint)
        self._issue_warnings_after_load(load_checkpoint_weights(model, resume_from_checkpoint))

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: same key conversion as ``_load_from_checkpoint``."""
        best = self.state.best_model_checkpoint
        if not self._plain_weights_checkpoint(best, self.model):
            return super()._load_best_model()
        from qwenvl.train.checkpoint import load_checkpoint_weights

        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        self._issue_warnings_after_load(load_checkpoint_weights(self.model, best))

    # ------------------------------------------------ skipped bad samples (qwenvl/train/bad_samples.py)
    def record_bad_samples(self, inputs: dict) -> None:
        """Hand the batch's skipped bad samples to the ``BadSampleMonitor`` and drop them from ``inputs``.

        Called first in ``compute_loss`` (training and evaluation both go through it), so
        the model never sees the list.
        """
        problems = inputs.pop(BAD_SAMPLES_KEY, None)
        if problems:
            split = "train" if self.model.training else "eval"
            monitors = [cb for cb in self.callback_handler.callbacks if isinstance(cb, BadSampleMonitor)]
            for monitor in monitors:
                monitor.record(problems, split)
            if not monitors:
                for problem in problems:
                    logger.warning("skipped bad sample (%s): %s", problem.kind, problem.message)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | int | None:
        """The Trainer's label count, at least 1: a window of all-bad placeholder batches has none (0/0 = NaN)."""
        count = super()._get_num_items_in_batch(batch_samples, device)
        if torch.is_tensor(count):
            return count.clamp(min=1)
        return max(count, 1) if count is not None else None
