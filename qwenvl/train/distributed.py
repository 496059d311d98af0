"""DeepSpeed and FSDP around the Trainer: checks that keep per-module LRs and sharding honest.

What can go wrong silently, and what this module does about it:

- ZeRO-3 builds the model inside ``deepspeed.zero.Init``, which reads the
  world size from ``deepspeed.comm``. On GPUs accelerate initialises it; with
  ``--use_cpu`` (gloo) nobody does, so every rank believes it is alone and the
  batch-size check fails. ``init_deepspeed_distributed`` runs before the model
  is built.
- A DeepSpeed config with its own ``"optimizer"`` section makes the Trainer
  hand DeepSpeed a placeholder, and DeepSpeed builds one optimizer over all
  parameters: the per-module LR and no-decay groups (SPEC 10) are gone. A
  ``"scheduler"`` section broadcasts one LR to every group. ``check_deepspeed_config``
  refuses both (the scheduler only where the per-module LRs differ).
- ``OptimizerGroupsCallback`` looks at the optimizer that actually steps
  (DeepSpeed's wrapper included) when training begins and raises if its groups
  are not the ones ``build_parameter_groups`` made.
- On CPU accelerate turns an FSDP request into plain DDP without a word;
  ``fsdp_fallback_reason`` says so.

The optimizer groups are logged here, once (``OptimizerGroupsCallback``: the optimizer that steps).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

from qwenvl.train.trainer import build_parameter_groups, decay_parameter_names

logger = logging.getLogger(__name__)

# FSDP1-only keys (seed recipes use them); FSDP2, the transformers default, ignores them.
FSDP1_ONLY_KEYS = ("backward_prefetch", "forward_prefetch", "limit_all_gathers", "sync_module_states",
                   "use_orig_params")


# ------------------------------------------------------------------ DeepSpeed
def deepspeed_config(training_args: Any) -> dict | None:
    """The DeepSpeed config dict given with ``--deepspeed`` (parsed by TrainingArguments), or None without it."""
    if not getattr(training_args, "deepspeed", None):
        return None
    hf_config = getattr(training_args, "hf_deepspeed_config", None)
    return hf_config.config if hf_config is not None else None


def check_deepspeed_config(
    config: dict,
    source: str,
    learning_rate: float,
    vision_tower_lr: float | None = None,
    mm_projector_lr: float | None = None,
) -> None:
    """Refuse DeepSpeed configs that would silently drop the per-module optimizer groups.

    Args:
        config: the DeepSpeed config dict.
        source: where it came from (the ``--deepspeed`` path), for the message.
        learning_rate: ``--learning_rate``.
        vision_tower_lr: ``--vision_tower_lr`` (None: learning_rate).
        mm_projector_lr: ``--mm_projector_lr`` (None: learning_rate).

    Raises:
        ValueError: the config has an ``"optimizer"`` section (DeepSpeed would
            build one optimizer over all parameters: one LR, weight decay on
            biases and norms too), or a ``"scheduler"`` section while the
            vision tower or projector LR differs from ``learning_rate``
            (DeepSpeed's schedulers set the same LR on every group).

    Example:
        >>> check_deepspeed_config({"zero_optimization": {"stage": 2}}, "zero2.json", 1e-5)  # fine, returns None
    """
    if "optimizer" in config:
        raise ValueError(
            f"DeepSpeed config {source} has an \"optimizer\" section ({config['optimizer'].get('type', '?')}): "
            "DeepSpeed would then build its own optimizer over all parameters and drop the per-module groups "
            "(--learning_rate / --vision_tower_lr / --mm_projector_lr and no weight decay on biases and norms). "
            "Remove the \"optimizer\" section; the Trainer builds AdamW from --optim, --learning_rate, "
            "--weight_decay, --adam_beta1/2 and --adam_epsilon (scripts/zero2.json, zero3.json and "
            "zero3_offload.json show the shape)."
        )
    if "scheduler" in config:
        lrs = {learning_rate, learning_rate if vision_tower_lr is None else vision_tower_lr,
               learning_rate if mm_projector_lr is None else mm_projector_lr}
        if len(lrs) > 1:
            raise ValueError(
                f"DeepSpeed config {source} has a \"scheduler\" section ({config['scheduler'].get('type', '?')}): "
                "DeepSpeed's schedulers set one learning rate on every parameter group, so --vision_tower_lr / "
                "--mm_projector_lr would be overwritten. Remove the section and use --lr_scheduler_type and "
                "--warmup_steps instead."
            )
        logger.warning("DeepSpeed config %s has a \"scheduler\" section: it replaces --lr_scheduler_type", source)


def prepare_deepspeed(training_args: Any) -> None:
    """``--deepspeed`` only: refuse configs that drop the optimizer groups, then bring up ``deepspeed.comm``.

    Call it before the model is built (see ``init_deepspeed_distributed``).

    Raises:
        ValueError: from ``check_deepspeed_config``.
    """
    config = deepspeed_config(training_args)
    if config is None:
        return
    check_deepspeed_config(config, str(training_args.deepspeed), training_args.learning_rate,
                           getattr(training_args, "vision_tower_lr", None),
                           getattr(training_args, "mm_projector_lr", None))
    init_deepspeed_distributed(training_args)


def init_deepspeed_distributed(training_args: Any) -> None:
    """Bring up ``deepspeed.comm`` before the model is built (needed by ZeRO-3's ``zero.Init``).

    Does nothing without ``--deepspeed``. On GPUs accelerate has already done
    it while setting up the device and this is a no-op; with ``--use_cpu`` it
    wraps the gloo process group accelerate created.

    Args:
        training_args: parsed ``TrainingArguments``.
    """
    if not getattr(training_args, "deepspeed", None):
        return
    import deepspeed

    _ = training_args.device  # accelerate's PartialState: torch.distributed is initialised here
    backend = training_args.ddp_backend
    if backend is None and torch.distributed.is_initialized():
        backend = torch.distributed.get_backend()
    deepspeed.init_distributed(dist_backend=backend)


def expected_optimizer_groups(model: torch.nn.Module, training_args: Any) -> list[dict]:
    """Name, LR and weight decay of every group ``QwenVLTrainer.create_optimizer`` builds for this model.

    Returns:
        ``[{"name", "lr", "weight_decay"}, ...]`` in optimizer order.
    """
    groups = build_parameter_groups(
        model.named_parameters(),
        decay_parameter_names(model),
        training_args.learning_rate,
        training_args.weight_decay,
        vision_tower_lr=getattr(training_args, "vision_tower_lr", None),
        mm_projector_lr=getattr(training_args, "mm_projector_lr", None),
    )
    return [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"], "tensors": len(g["params"])}
            for g in groups]


def optimizer_groups(optimizer: Any) -> list[dict]:
    """Name, base LR and weight decay of each group of the optimizer that steps.

    Works through accelerate's and DeepSpeed's wrappers (their ``param_groups``
    are the wrapped optimizer's). The base LR is ``initial_lr`` where a scheduler
    has set one (the scheduler scales ``lr`` during warmup), else ``lr``.
    """
    return [
        {"name": group.get("name"), "lr": group.get("initial_lr", group["lr"]), "weight_decay": group["weight_decay"]}
        for group in optimizer.param_groups
    ]


def optimizer_chain(optimizer: Any) -> list[str]:
    """Class names from the outermost optimizer wrapper to the optimizer that does the update.

    Example:
        >>> optimizer_chain(trainer.optimizer)  # under ZeRO-3
        ['DeepSpeedOptimizerWrapper', 'DeepSpeedZeroOptimizer_Stage3', 'AdamW']
    """
    names: list[str] = []
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        names.append(type(optimizer).__name__)
        optimizer = getattr(optimizer, "optimizer", None)
    return names


class OptimizerGroupsCallback(TrainerCallback):
    """At train begin, check that the stepping optimizer still has the per-module groups, and log them.

    Args:
        expected: from ``expected_optimizer_groups`` (computed before DeepSpeed
            touches the model: ZeRO-3 partitions parameters, not names).

    Raises (from ``on_train_begin``):
        RuntimeError: the groups differ (names, LRs or weight decay), e.g.
            because DeepSpeed or a custom optimizer replaced them.
    """

    def __init__(self, expected: list[dict]):
        self.expected = expected
        self.seen: list[dict] | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            return
        self.seen = optimizer_groups(optimizer)
        logger.info("stepping optimizer: %s", " > ".join(optimizer_chain(optimizer)))
        # The one place the groups are logged (the Trainer's create_optimizer does not). Tensor counts are the
        # model's: ZeRO-3's groups hold flat partitions instead.
        tensors = {g["name"]: g.get("tensors") for g in self.expected}
        for group in self.seen:
            count = tensors.get(group["name"])
            logger.info("stepping optimizer group %-22s lr=%g weight_decay=%g%s", group["name"], group["lr"],
                        group["weight_decay"], f" ({count} tensors)" if count is not None else "")

        def key(groups: list[dict]) -> list[tuple]:
            return [(g["name"], round(float(g["lr"]), 12), round(float(g["weight_decay"]), 12)) for g in groups]

        if key(self.seen) != key(self.expected):
            raise RuntimeError(
                f"the optimizer that steps ({' > '.join(optimizer_chain(optimizer))}) does not have the per-module "
                f"groups: expected {key(self.expected)}, found {key(self.seen)}. A DeepSpeed config with an "
                "\"optimizer\" or \"scheduler\" section, or a custom optimizer, replaces them."
            )


# ----------------------------------------------------------------------- FSDP
def fsdp_wrap_classes(model: torch.nn.Module) -> list[str]:
    """Class names FSDP should wrap: the LLM decoder layer and the vision block, read from the model.

    Example:
        >>> fsdp_wrap_classes(tiny_qwen2_5_vl)
        ['Qwen2_5_VLDecoderLayer', 'Qwen2_5_VLVisionBlock']
    """
    names = sorted(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    found = [n for n in names if n in present]
    if not found:
        raise ValueError(f"{type(model).__name__} names no block classes to wrap (_no_split_modules={names})")
    return found


def configure_fsdp(training_args: Any, model: torch.nn.Module) -> dict | None:
    """Fill and check the FSDP wrap classes; warn about keys the chosen FSDP version ignores.

    With ``--fsdp`` and no ``transformer_layer_cls_to_wrap`` in ``--fsdp_config``
    the decoder layer and vision block of this model are used. Listed classes
    must exist in the model.

    Args:
        training_args: parsed ``TrainingArguments`` (its ``fsdp_config`` and
            ``fsdp_plugin_args`` are updated in place).
        model: the model to be wrapped.

    Returns:
        the accelerate FSDP plugin arguments, or None without ``--fsdp``.

    Raises:
        ValueError: a class in ``transformer_layer_cls_to_wrap`` is not in the model.
    """
    plugin_args = getattr(training_args, "fsdp_plugin_args", None)
    if not training_args.fsdp or plugin_args is None:
        return None
    config = training_args.fsdp_config
    classes = config.get("transformer_layer_cls_to_wrap")
    present = {type(m).__name__ for m in model.modules()}
    if classes:
        missing = [c for c in classes if c not in present]
        if missing:
            raise ValueError(
                f"fsdp_config transformer_layer_cls_to_wrap names {missing}, which {type(model).__name__} does not "
                f"have; its block classes are {fsdp_wrap_classes(model)}"
            )
    elif plugin_args.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP") == "TRANSFORMER_BASED_WRAP":
        classes = fsdp_wrap_classes(model)
        config["transformer_layer_cls_to_wrap"] = classes
        plugin_args["transformer_cls_names_to_wrap"] = ",".join(classes)
    version = int(plugin_args.get("fsdp_version", 2))
    ignored = [k for k in FSDP1_ONLY_KEYS if k in config] if version == 2 else []
    if ignored:
        logger.warning(
            "fsdp_config sets %s, which only FSDP1 reads; FSDP2 (fsdp_config version 2, the default) ignores "
            "them: it always uses the original parameters, prefetches by itself and loads on rank 0 with "
            "cpu_ram_efficient_loading. Set \"version\": 1 to use them.", ", ".join(ignored),
        )
    logger.info("FSDP%d wraps %s", version, config.get("transformer_layer_cls_to_wrap"))
    return plugin_args


def fsdp_fallback_reason(training_args: Any, distributed_type: Any | None = None) -> str | None:
    """Why an ``--fsdp`` request will not shard anything, or None when it will (or FSDP is off).

    Accelerate only builds FSDP for GPU-like devices; with ``--use_cpu`` (or no
    accelerator) it keeps ``MULTI_CPU`` (DDP: full replicas on every rank) and
    drops the FSDP plugin silently. A single process is not distributed at all.

    Args:
        training_args: parsed ``TrainingArguments``.
        distributed_type: ``trainer.accelerator.distributed_type`` once the
            Trainer exists; before that the device decides.

    Returns:
        a sentence for the log, or None.
    """
    if not training_args.fsdp:
        return None
    if distributed_type is not None:
        if str(distributed_type).endswith("FSDP"):
            return None
        kind = str(distributed_type).split(".")[-1]
        return (f"--fsdp was requested but accelerate runs {kind}, not FSDP: every rank holds the full model "
                "and optimizer state (no sharding). FSDP needs CUDA (or another accelerator) devices.")
    if training_args.device.type == "cpu":
        return ("--fsdp was requested on CPU: accelerate builds FSDP only for GPU-like devices and falls back to "
                "DDP (MULTI_CPU): every rank holds the full model and optimizer state (no sharding).")
    return None
