"""Trainer with per-module learning rates and a trainable-parameter report."""

from __future__ import annotations

import gc
import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from qwenvl.data.data_qwen import BAD_SAMPLES_KEY
from qwenvl.models import FAMILIES, LLM, PROJECTOR, VISION_TOWER, family_for
from qwenvl.train.bad_samples import BadSampleMonitor
from qwenvl.train.checkpoint import checkpoint_weight_files, load_checkpoint_weights
from qwenvl.train.guards import SAMPLE_REFS_KEY, NonFiniteGuard, SampleRefsCollator, WithSampleRefs
from qwenvl.train.loss import IGNORE_INDEX, compute_lm_loss, select_loss_impl

logger = logging.getLogger(__name__)

def classify_parameter(name: str) -> str:
    """Which module a parameter belongs to: ``llm``, ``vision_tower`` or ``projector``.

    The rule is the families' own (``ModelFamily.classify_parameter`` in qwenvl/models): a name
    that any supported family counts as projector (``visual.merger``, Qwen3-VL's
    ``visual.deepstack_merger_list``) is projector, one under its vision tower is vision tower.
    Used where only names are at hand (optimizer groups, freezing, LoRA, reports).

    Example:
        >>> classify_parameter("model.visual.merger.mlp.0.weight"), classify_parameter("model.visual.blocks.0.attn.qkv.bias")
        ('projector', 'vision_tower')
        >>> classify_parameter("lm_head.weight")
        'llm'
    """
    kinds = {family.classify_parameter(name) for family in FAMILIES.values()}
    return PROJECTOR if PROJECTOR in kinds else VISION_TOWER if VISION_TOWER in kinds else LLM


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


def module_names(model: nn.Module) -> tuple[str, str, str]:
    """What the model's family calls its vision tower, projector and language model (for reports).

    Example:
        >>> module_names(qwen2_5_vl_model), module_names(llava_model)
        (('visual', 'merger', 'language_model'), ('vision_tower', 'multi_modal_projector', 'language_model'))
    """
    try:
        family = family_for(getattr(model, "config", None))  # a PeftModel forwards its base model's config
    except ValueError:  # a model of no registered family: the Qwen names
        return "visual", "merger", "language_model"
    return family.vision_module, ", ".join(family.projector_modules), family.language_module


def describe_trainable(model: nn.Module) -> str:
    """One line per module, named as the model's family names it: which vision blocks, projector and LLM layers
    train.

    Example output (Qwen2.5-VL; LLaVA: ``vision tower (vision_tower)``, ``projector (multi_modal_projector)``)::

        vision tower (visual): blocks trainable [] frozen [0, 1]; patch_embed frozen
        projector (merger): trainable
        llm (language_model): layers trainable [0, 1] frozen []; embed_tokens trainable; lm_head trainable
        trainable parameters: 1,234 / 5,678 (21.73%)
    """
    vision_name, projector_name, llm_name = module_names(model)
    layer = re.compile(r"(?:^|\.)(blocks|layers|layer)\.(\d+)\.")
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
        f"vision tower ({vision_name}): blocks {layers_of(VISION_TOWER)}; patch_embed {state('patch_embed')}",
        f"projector ({projector_name}): {state('merger')}",
        f"llm ({llm_name}): layers {layers_of(LLM)}; embed_tokens {state('embed_tokens')}; lm_head {state('lm_head')}",
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


def media_keys(model: nn.Module) -> tuple[str, ...]:
    """The batch keys of the media ``model``'s family takes (``pixel_values`` and ``pixel_values_videos`` for Qwen,
    ``pixel_values`` for LLaVA); a model of no registered family: the Qwen keys."""
    try:
        return family_for(getattr(model, "config", None)).media_keys
    except ValueError:
        return ("pixel_values", "pixel_values_videos")


def learned_tokens(batch: dict) -> torch.Tensor:
    """Positions of a batch that predict a label, as the causal-LM loss counts them: ``labels[..., 1:] != -100``
    (or ``shift_labels != -100`` when the batch carries them).

    Example:
        >>> learned_tokens({"labels": torch.tensor([[-100, 5, 6, -100]])})
        tensor(2)
    """
    labels = batch["shift_labels"] if "shift_labels" in batch else batch["labels"][..., 1:]
    return labels.ne(IGNORE_INDEX).sum()


def vision_features_for_llm(output: object) -> list[torch.Tensor]:
    """The outputs of one vision-tower call that the model feeds its LLM, and only those.

    Qwen2-VL / Qwen2.5-VL use ``pooler_output`` (the merger's tokens); Qwen3-VL
    also the ``deepstack_features`` of its deepstack mergers (added to the first
    LLM layers' hidden states). ``last_hidden_state`` (the tower before the
    merger) is not used by any of them. A dummy pass must use exactly these: a
    tensor the real path leaves unused would give the tower one more backward
    entry point than a real pass has (DeepSpeed ZeRO-3 traces every one).

    Args:
        output: what ``visual(pixel_values, grid_thw=...)`` returned.

    Returns:
        the tensors, ``pooler_output`` first.

    Raises:
        TypeError: the output has no ``pooler_output`` (an unknown tower).
    """
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"the vision tower returned {type(output).__name__} without a pooler_output tensor; "
                        "a model family with another tower must say which of its outputs reach the LLM")
    return [pooled, *(getattr(output, "deepstack_features", None) or [])]


class EpochCallback(TrainerCallback):
    """Tells a dataset with ``set_epoch`` (online packing's bins) which epoch begins, in every process.

    ``on_epoch_begin`` runs before the epoch's DataLoader iterator starts its workers, so they hold
    that epoch's dataset. On a resume the Trainer's epoch (``state.epoch``, restored from the
    checkpoint) gives the same bins the interrupted run trained on.
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int((state.epoch or 0) + 1e-6))  # state.epoch: epochs done, a float


class QwenVLTrainer(Trainer):
    """HF Trainer whose optimizer has per-module learning rates (SPEC 10).

    It also keeps the vision tower in step across ranks (``compute_loss``), and tells a training set
    with ``set_epoch`` (online packing) which epoch begins (``EpochCallback``).
    """

    _vision_needs_sync: bool | None = None
    _llm_trains: bool = True

    _unused_check_pending: bool = False

    def __init__(self, *args: Any, **kwargs: Any):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        decided = training_args is not None and getattr(training_args, "ddp_find_unused_parameters", False) is None
        if decided:
            # Every trainable parameter takes part in every step: the dummy vision passes (``compute_loss``) run
            # the tower on ranks whose micro-batch has no image or video. transformers' default (True without
            # activation checkpointing) would make DDP walk the whole graph after each backward for nothing.
            training_args.ddp_find_unused_parameters = False
        super().__init__(*args, **kwargs)
        self._unused_check_pending = decided and self.args.world_size > 1 and not (
            self.is_deepspeed_enabled or self.is_fsdp_enabled)
        if hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(EpochCallback(self.train_dataset))
        # --loss_average token: our loss is already the token mean of the accumulated batch (``_loss``), so the
        # Trainer must not divide it by the accumulation steps again; micro_batch: the Trainer's division.
        self.loss_is_scaled_for_ga = True if self.token_average else None
        self._counting_for_training = False

    @property
    def token_average(self) -> bool:
        """``--loss_average token`` (the default): every learned token of an optimizer step weighs the same.

        transformers' Qwen-VL classes say ``accepts_loss_kwargs = False``, so a plain Trainer averages each
        micro-batch on its own and then the micro-batches (``micro_batch``, the original's weighting): with
        accumulation, or several ranks, tokens of short micro-batches weigh more than tokens of long ones.
        """
        return getattr(self.args, "loss_average", "token") == "token"

    def dummy_vision_calls(self, model: nn.Module, inputs: dict) -> int:
        """Dummy vision passes this micro-batch needs so every rank runs the tower alike.

        With several ranks, a rank whose micro-batch has no images (or no videos)
        skips the model's image (video) pass through the vision tower while its
        peers run it. DDP then waits for gradients of the tower that never come;
        ZeRO-3 and FSDP gather the tower's weights on some ranks only. One dummy
        pass per missing modality makes every rank call the tower exactly twice
        (see ``compute_loss`` for where).

        On a single process the same passes are what keeps an all-text batch
        differentiable when only the merger (or the tower) trains: without them
        its loss depends on no trainable weight and backward fails.

        Returns:
            0 when the batch has both images and videos, when the tower neither
            trains nor is sharded (ZeRO-3, FSDP), or on a single process whose LLM
            trains; else the number of missing modalities (1 or 2).
        """
        missing = sum(inputs.get(key) is None for key in media_keys(self.accelerator.unwrap_model(model)))
        if not missing:
            return 0
        if self._vision_needs_sync is None:
            # ZeRO-3 and FSDP gather frozen weights too (every forward): a sharded frozen tower needs it as well.
            params = [(classify_parameter(name), param) for name, param in model.named_parameters()]
            self._vision_needs_sync = self.is_fsdp_enabled or any(
                p.requires_grad or hasattr(p, "ds_id") for kind, p in params if kind != LLM)
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
        """The model's loss; ranks whose batch lacks images or videos run dummy tower passes in its forward.

        Where the dummies run decides whether the ranks stay in step. The model
        embeds the text, calls the tower for images, then for videos, then calls
        ``language_model(inputs_embeds=...)``. DeepSpeed ZeRO-3 records the
        sequence of modules every rank enters in forward and in backward (each
        entry fetches weights with a collective) and requires it to be the same
        on every rank and every step. So the dummies run in a forward PRE-hook on
        ``language_model`` registered ahead of all others (``prepend=True``, before
        ZeRO-3's own fetch hook), and their outputs enter the graph where the real
        ones do: ``inputs_embeds + 0 x sum(features)``. Every rank then enters
        ``embed_tokens, visual, visual, language_model, ...`` in forward, and, as
        autograd runs the newest nodes first, ``..., language_model, visual,
        visual, embed_tokens`` in backward, whatever its batch holds. Only the
        features the LLM consumes are used (``vision_features_for_llm``).

        Because the hook runs inside the model's forward, DDP sees the tower's
        parameters used, with ``find_unused_parameters`` on or off. The loss value
        and the gradients are unchanged (``x + 0.0 == x``; the tower's dummy
        gradients are 0). Skipped bad samples listed in the batch are recorded
        first (``record_bad_samples``); the batch's ``sample_refs`` are popped and,
        with the loss, handed to the ``NonFiniteGuard`` callbacks (qwenvl/train/guards.py).

        Raises:
            RuntimeError: the model has a vision tower but no ``language_model``
                called with ``inputs_embeds=`` (not a Qwen-VL layout).
        """
        self.record_bad_samples(inputs)
        refs = inputs.pop(SAMPLE_REFS_KEY, None)
        loss, outputs = self._loss_with_vision_sync(model, inputs, True, num_items_in_batch)
        if model.training:
            for guard in self.callback_handler.callbacks:
                if isinstance(guard, NonFiniteGuard):
                    guard.record(loss, refs)
            aux = outputs.get("aux_loss") if isinstance(outputs, dict) else getattr(outputs, "aux_loss", None)
            if aux is not None:  # MoE router load-balancing loss (already inside the loss, times its coefficient)
                self.__dict__.setdefault("_aux_losses", []).append(aux.detach().float())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The Trainer's log, plus ``aux_loss``: the MoE router loss averaged since the last log, over all ranks.

        Every rank calls ``log`` at a logging step, so the mean is reduced across them.
        """
        pending = self.__dict__.get("_aux_losses")
        if "loss" in logs and pending:
            mean = torch.stack(pending).mean()
            logs["aux_loss"] = round(float(self.accelerator.reduce(mean, reduction="mean")), 6)
            pending.clear()
        super().log(logs, *args, **kwargs)

    def _loss_with_vision_sync(self, model: nn.Module, inputs: dict, return_outputs: bool,
                               num_items_in_batch: torch.Tensor | int | None):
        """``Trainer.compute_loss`` with the dummy vision passes ``compute_loss`` describes."""
        calls = self.dummy_vision_calls(model, inputs)
        host = self.accelerator.unwrap_model(model) if calls else None
        family = family_for(host.config) if calls else None
        visual = find_submodule(host, family.vision_module) if calls else None
        if visual is None:
            return self._loss(model, inputs, return_outputs, num_items_in_batch)
        language_model = find_submodule(host, family.language_module)
        if language_model is None:
            raise RuntimeError(f"{type(host).__name__} has a vision tower but no {family.language_module} submodule: "
                               "the dummy vision passes that keep ranks in step have nowhere to run")
        done: list[bool] = []

        def run_dummies(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if done:
                return args, kwargs
            done.append(True)
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                raise RuntimeError(f"{type(module).__name__} was called without inputs_embeds=: cannot attach the "
                                   "dummy vision features where the real ones go")
            reference = next(visual.parameters())  # the tower's dtype/device, even when ZeRO-3 partitioned it
            if family.uses_processor_items:  # LLaVA & co.: a black image through tower and projector
                features = [f for _ in range(calls)
                            for f in family.dummy_vision_features(host, reference.dtype, reference.device)]
            else:
                pixel_values, grid_thw = family.dummy_vision_input(visual.config, reference.dtype, reference.device)
                features = [f for _ in range(calls) for f in vision_features_for_llm(visual(pixel_values,
                                                                                              grid_thw=grid_thw))]
            zero = 0.0 * torch.stack([f.float().sum() for f in features]).sum()
            kwargs["inputs_embeds"] = embeds + zero.to(embeds.dtype)
            return args, kwargs

        handle = language_model.register_forward_pre_hook(run_dummies, with_kwargs=True, prepend=True)
        try:
            return self._loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()

    _training_loss: str | None = None  # resolved on the first training step, on the wrapped model

    def _loss(self, model: nn.Module, inputs: dict, return_outputs: bool,
              num_items_in_batch: torch.Tensor | int | None):
        """Training: the loss from the last hidden states, never the full logits (``--loss_impl``,
        qwenvl/train/loss.py: Liger's fused linear cross-entropy on CUDA, else a chunked one); evaluation,
        prediction and the fallbacks ``select_loss_impl`` names: the model's own loss.

        Same value and gradients as the model's own loss, ``num_items_in_batch`` averaging included
        (tests/train/test_loss.py).
        """
        if model.training and self._training_loss is None:
            if self.label_smoother is not None or self.compute_loss_func is not None:
                self._training_loss, reason = "model", "label smoothing / compute_loss_func need the logits"
            else:
                self._training_loss, reason = select_loss_impl(model, getattr(self.args, "loss_impl", "auto"))
            logger.info("training loss: %s (%s)", self._training_loss, reason)
        if not model.training or self._training_loss == "model":
            inputs.pop("skip_logits", None)  # set by the Trainer for liger-patched models only
            if (model.training and self.token_average and num_items_in_batch is not None
                    and self.compute_loss_func is None):
                return self._model_loss_as_token_sum(model, inputs, return_outputs, num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss, outputs = compute_lm_loss(model, inputs, num_items_in_batch, impl=self._training_loss)
        loss = loss * self._rank_scale(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _rank_scale(self, num_items_in_batch: torch.Tensor | int | None) -> int:
        """Factor that undoes the ranks' gradient averaging when the item count is the global one (as
        ``Trainer.compute_loss`` applies it): DDP / DeepSpeed / FSDP average gradients over ranks, and each rank's
        loss is its token sum over every rank's tokens."""
        if num_items_in_batch is None or not self.args.average_tokens_across_devices:
            return 1
        if self.args.n_gpu > 1:
            return self.args.n_gpu
        return self.accelerator.num_processes // self.get_tp_size()

    def _model_loss_as_token_sum(self, model: nn.Module, inputs: dict, return_outputs: bool,
                                 num_items_in_batch: torch.Tensor | int) -> Any:
        """The model's own loss (a mean over this micro-batch) turned into this micro-batch's share of the token
        mean of the accumulated batch, ``sum / num_items_in_batch`` (``--loss_average token``).

        A MoE model adds ``router_aux_loss_coef x aux_loss`` to its mean: that term keeps the original weighting
        (divided by the accumulation steps, averaged over ranks), only the cross-entropy is re-weighted.
        """
        micro_items = learned_tokens(inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        aux = outputs.get("aux_loss") if isinstance(outputs, dict) else getattr(outputs, "aux_loss", None)
        router = 0.0
        if aux is not None:
            config = getattr(self.accelerator.unwrap_model(model).config, "text_config", None)
            coef = getattr(config, "router_aux_loss_coef", 0.0) or 0.0
            router = coef * aux.to(loss.dtype)
        cross_entropy = (loss - router) * micro_items.to(loss.dtype) / num_items_in_batch
        loss = cross_entropy * self._rank_scale(num_items_in_batch) + router / self.current_gradient_accumulation_steps
        if isinstance(outputs, dict):
            outputs["loss"] = loss
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch: torch.Tensor | int | None = None
                      ) -> torch.Tensor:
        """The Trainer's step; after the first backward under DDP with ``find_unused_parameters`` decided False
        here, a trainable parameter without a gradient stops the run naming it (DDP itself would fail one step
        later with parameter indices only)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._unused_check_pending:
            self._unused_check_pending = False
            unused = [name for name, p in self.accelerator.unwrap_model(model).named_parameters()
                      if p.requires_grad and p.grad is None]
            if unused:
                shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
                raise RuntimeError(f"{len(unused)} trainable parameter(s) got no gradient in the first step: {shown}. "
                                   "Pass --ddp_find_unused_parameters True to train a model whose forward leaves "
                                   "trainable weights unused.")
        return loss

    last_grad_norm: float | torch.Tensor | None = None

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm of the step, kept for ``NonFiniteGuard`` (which then computes none itself)."""
        self.last_grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        return self.last_grad_norm

    def add_non_finite_guard(self) -> NonFiniteGuard:
        """Add a ``NonFiniteGuard``: the run stops (on every rank) at the first step whose loss or gradient
        norm is not finite, naming the step and its samples, and never saves non-finite weights.

        Returns:
            the guard (already in ``self.callback_handler``).
        """
        guard = NonFiniteGuard(self)
        self.add_callback(guard)
        return guard

    def get_train_dataloader(self):
        """The Trainer's training dataloader, whose batches also list their samples (``batch["sample_refs"]``).

        Only for datasets that know their samples (``refs``: ``LazySupervisedDataset``,
        ``PackedSupervisedDataset``); the refs let ``NonFiniteGuard`` name the samples
        of a step whose loss is not finite. ``compute_loss`` pops them before the model.
        """
        if self.args.dataloader_num_workers > 0:
            # Workers fork from here: objects frozen now are never scanned by their garbage collector, whose
            # first full pass would otherwise copy (and unshare) the pages of every object it visits.
            gc.freeze()
        dataset, collator = self.train_dataset, self.data_collator
        if getattr(dataset, "refs", None) is None:
            return super().get_train_dataloader()
        self.train_dataset, self.data_collator = WithSampleRefs(dataset), SampleRefsCollator(collator)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset, self.data_collator = dataset, collator

    def _get_train_sampler(self, train_dataset=None):
        """``--train_sampling_strategy group_by_length`` (``--group_by_length``) from the dataset's ``lengths``.

        transformers' own path measures each sample by building it (``dataset[i]``, images decoded and
        all): hours at a million samples. Our datasets know every sample's length from its record
        (``LazySupervisedDataset.lengths``, ``PackedSupervisedDataset.lengths``) without building any.
        """
        dataset = self.train_dataset if train_dataset is None else train_dataset
        lengths = getattr(dataset, "lengths", None) if self.args.train_sampling_strategy == "group_by_length" else None
        if lengths is None:
            return super()._get_train_sampler(train_dataset)
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=list(lengths))

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
        # The groups are logged once, from the optimizer that steps (distributed.OptimizerGroupsCallback).
        return self.optimizer

    # ------------------------------------- checkpoint weights, saved layout (qwenvl/train/checkpoint.py)
    def _plain_weights_checkpoint(self, folder: str | None, model: nn.Module) -> bool:
        """A checkpoint the Trainer would load with a plain ``load_state_dict`` (not DeepSpeed/FSDP/peft)."""
        from transformers.trainer import _is_peft_model

        return bool(folder) and not (self.is_deepspeed_enabled or self.is_fsdp_enabled or _is_peft_model(model)) \
            and checkpoint_weight_files(folder) is not None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume: load the checkpoint's weights with the key conversion ``from_pretrained`` applies.

        transformers 5.23 would load only ``lm_head`` of a Qwen-VL checkpoint (huggingface/transformers#43701).
        """
        model = self.model if model is None else model
        if not self._plain_weights_checkpoint(resume_from_checkpoint, model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("loading weights of %s", resume_from_checkpoint)
        self._issue_warnings_after_load(load_checkpoint_weights(model, resume_from_checkpoint))

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: same key conversion as ``_load_from_checkpoint``."""
        best = self.state.best_model_checkpoint
        if not self._plain_weights_checkpoint(best, self.model):
            return super()._load_best_model()
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

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The Trainer's micro-batches of one optimizer step and their learned-token count (training only)."""
        self._counting_for_training = True
        try:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        finally:
            self._counting_for_training = False

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | int | None:
        """Learned tokens of the accumulated batch (``--loss_average token``: over every rank, as transformers
        counts them for text models: ``labels[..., 1:] != -100``), else the Trainer's count; at least 1, since
        a window of all-bad placeholder batches has none (0/0 = NaN)."""
        if self.token_average and self._counting_for_training and batch_samples and "labels" in batch_samples[0]:
            count = sum(learned_tokens(batch) for batch in batch_samples).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()
        else:
            count = super()._get_num_items_in_batch(batch_samples, device)
        if torch.is_tensor(count):
            return count.clamp(min=1)
        return max(count, 1) if count is not None else None
