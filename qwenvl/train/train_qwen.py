"""Fine-tune Qwen2-VL / Qwen2.5-VL: ``torchrun qwenvl/train/train_qwen.py --dataset_use my_ds%50 ...``.

Read top to bottom: parse flags -> checks -> data (the family from the config's model_type) -> load
model -> freeze per the tune flags (or wrap in LoRA adapters) -> Trainer -> train
(resuming from the newest checkpoint) -> save model (or adapter) and processor so
the folder loads for inference (tools/infer.py, tools/merge_lora.py).
DeepSpeed/FSDP checks live in qwenvl/train/distributed.py, LoRA in qwenvl/train/lora.py.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

# `torchrun qwenvl/train/train_qwen.py` runs this file as a script: make `qwenvl` importable.
_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoTokenizer, ProcessorMixin  # noqa: E402
from transformers.integrations import is_deepspeed_zero3_enabled  # noqa: E402

from qwenvl.data.data_qwen import make_supervised_data_module  # noqa: E402
from qwenvl.data.media_settings import media_values, save_media_settings  # noqa: E402
from qwenvl.data.vision import VisionConfig  # noqa: E402
from qwenvl.models import family_for  # noqa: E402
from qwenvl.models.loading import load_image_processor, model_class_for  # noqa: E402  (also imported from here)
import qwenvl.train.attention  # noqa: E402,F401  (registers --attn_implementation sdpa_packed)
from qwenvl.train.argument import ConfigError, ModelArguments, TrainingArguments, parse_args  # noqa: E402
from qwenvl.train.config_files import check_run  # noqa: E402
from qwenvl.train.bad_samples import BadSampleMonitor, dataset_sizes  # noqa: E402
from qwenvl.train.trainer import LLM, PROJECTOR, VISION_TOWER, QwenVLTrainer, classify_parameter, describe_trainable  # noqa: E402
from qwenvl.train.distributed import (  # noqa: E402
    OptimizerGroupsCallback, configure_fsdp, expected_optimizer_groups, fsdp_fallback_reason, prepare_deepspeed,
)
from qwenvl.train.launch import allow_single_process  # noqa: E402
from qwenvl.train.lora import apply_lora, quantization_config  # noqa: E402
from qwenvl.train.plots import LossPlotCallback  # noqa: E402
from qwenvl.train.preflight import preflight  # noqa: E402
from qwenvl.train.runs import (  # noqa: E402,F401  (find_resume_checkpoint: kept importable from here)
    checkpoint_step, copy_final_model, find_resume_checkpoint, finished_run, hold_output_dir, mark_finished,
    model_files, resume_checkpoint, start_over,
)
from qwenvl.train.tracking import (  # noqa: E402
    RunSummaryCallback, StartupSummaryCallback, dataset_summary, parameter_summary, quiet_library_warnings,
)

logger = logging.getLogger("qwenvl")


def setup_logging(training_args: TrainingArguments) -> None:
    """Our INFO lines on the main process (warnings only elsewhere); libraries at WARNING.

    transformers' INFO level prints the whole model config at every load (three times per run);
    the start-up summary (``StartupSummaryCallback``) says what a reader needs instead.
    """
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING, force=True)
    logging.getLogger("qwenvl").setLevel(level)
    logger.setLevel(level)
    transformers.utils.logging.set_verbosity(logging.WARNING)
    quiet_library_warnings()


def set_trainable(model: torch.nn.Module, model_args: ModelArguments) -> None:
    """Freeze per the tune flags; ``lm_head`` and the embeddings follow ``tune_mm_llm``."""
    wanted = {LLM: model_args.tune_mm_llm, VISION_TOWER: model_args.tune_mm_vision, PROJECTOR: model_args.tune_mm_mlp}
    for name, param in model.named_parameters():
        param.requires_grad_(wanted[classify_parameter(name)])


def freeze_unread_vision(model: torch.nn.Module, family: Any) -> list[str]:
    """Freeze the trainable tower parameters an HF-processor family's model never reads
    (``family.unread_vision_parameters``: LLaVA's last tower layer and final norm), so ``--tune_mm_vision`` trains
    under DDP without ``--ddp_find_unused_parameters``; their values could not change anyway.

    Skipped under ZeRO-3, whose partitioned weights cannot run outside its engine (and which needs no such care).

    Returns:
        list[str]: the parameters frozen.
    """
    if not family.uses_processor_items or is_deepspeed_zero3_enabled():
        return []
    unread = family.unread_vision_parameters(model)
    parameters = dict(model.named_parameters())
    for name in unread:
        parameters[name].requires_grad_(False)
    if unread:
        logger.info("froze %d vision parameter(s) the model never reads (its image features come before them): %s",
                    len(unread), ", ".join(unread[:4]) + (" ..." if len(unread) > 4 else ""))
    return unread


def load_model(model_args: ModelArguments, training_args: TrainingArguments) -> torch.nn.Module:
    """The checkpoint's model, its class chosen by its family (from the config's ``model_type``).

    MoE models get the router load-balancing loss on (``--router_aux_loss_coef``, None = the checkpoint's).
    """
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=training_args.cache_dir)
    if family_for(config).configure_router_aux_loss(config, training_args.router_aux_loss_coef):
        logger.info("MoE: router aux loss on, coefficient %g", config.text_config.router_aux_loss_coef)
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    attention = model_args.attn_implementation
    if attention == "sdpa_packed" and family_for(config).uses_processor_items:
        # These families train on padded batches only (no flattened rows), and their masks (Gemma 3's image
        # blocks and sliding window, PaliGemma's prefix) are built by transformers' own sdpa mask.
        attention = "sdpa"
    model = model_class_for(config).from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=training_args.cache_dir,
        attn_implementation=attention,
        dtype=dtype,
        quantization_config=quantization_config(training_args, config),  # --load_in_4bit (QLoRA), else None
    )
    # Packed rows are split by the text position ids only when no cache is built (SPEC 9).
    model.config.use_cache = False
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.use_cache = False
    return model


def save_processor(tokenizer: Any, image_processor: Any, data_args: Any, output_dir: str) -> None:
    """Save the tokenizer (chat template included), the image processor with the pixel limits used in training and
    the other media flags (``media_settings.json``: resize mode, max size, video sampling), so inference
    preprocesses the same way. A whole processor (HF-processor families) is saved as it was loaded."""
    if isinstance(image_processor, ProcessorMixin):
        image_processor.save_pretrained(output_dir)
        return
    image_processor.size = {"shortest_edge": int(data_args.min_pixels), "longest_edge": int(data_args.max_pixels)}
    for attr, value in (("min_pixels", data_args.min_pixels), ("max_pixels", data_args.max_pixels)):
        if hasattr(image_processor, attr):
            setattr(image_processor, attr, int(value))
    tokenizer.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    # What preprocessor_config.json cannot hold (resize mode, max size, video sampling): media_settings.json.
    save_media_settings(media_values(data_args), output_dir)


def train(argv: list[str] | None = None) -> Path:
    """Parse, check, train, save; returns the output folder.

    Raises:
        ConfigError: a setting that cannot work, found before the model loads (PreflightError too).
    """
    # Token counts and DataLoader workers fork this process: the tokenizer's thread pool would only be
    # disabled in the children with a warning (and slows the short encodes of one process).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_library_warnings()  # before TrainingArguments, which may import DeepSpeed (its once-per-run line)
    model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args)
    # One run per --output_dir; RANK, not training_args, so no device is set up before preflight's checks.
    with hold_output_dir(training_args.output_dir, is_main=int(os.environ.get("RANK", "0")) == 0):
        return _train(model_args, data_args, training_args)


def _train(model_args: ModelArguments, data_args: Any, training_args: TrainingArguments) -> Path:
    """``train`` after the flags are parsed, with ``--output_dir`` held."""
    preflight(model_args, data_args, training_args)  # seconds: datasets, integrations, eval, tune flags, limits
    # Config files: model_classes against the checkpoint, data_processing's modalities against the datasets.
    training_args.config_notes = [*getattr(training_args, "config_notes", []),
                                  *check_run(model_args, data_args, training_args)]
    output_dir = training_args.output_dir
    if training_args.overwrite_output_dir:
        with training_args.main_process_first(local=False, desc="--overwrite_output_dir"):
            start_over(output_dir, training_args.should_save)
        checkpoint = None
    else:
        finished = finished_run(output_dir, training_args)
        if finished is not None:
            logger.warning("%s already holds a finished run (%s); nothing to do. Pass --overwrite_output_dir to "
                           "train again from step 0, or raise --max_steps / --num_train_epochs to go on.",
                           output_dir, finished)
            return Path(output_dir)
        checkpoint = resume_checkpoint(output_dir, training_args.resume_from_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, cache_dir=training_args.cache_dir,
        model_max_length=training_args.model_max_length, padding_side="right",
    )
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=training_args.cache_dir)
    family = family_for(config)
    if family.uses_processor_items:  # LLaVA & co.: the whole processor (chat template, image processor) builds items
        image_processor = family.load_processor(model_args.model_name_or_path, cache_dir=training_args.cache_dir)
    else:
        image_processor = load_image_processor(model_args.model_name_or_path, training_args.cache_dir)
    if (checkpoint is not None and 0 < training_args.max_steps <= checkpoint_step(checkpoint)
            and model_files(checkpoint)):
        # The run stopped after its last checkpoint but before the final save. Resuming would make the
        # Trainer take one more step past --max_steps; the checkpoint already is the final model.
        if training_args.should_save:
            copy_final_model(checkpoint, output_dir)
            save_processor(tokenizer, image_processor, data_args, output_dir)
            mark_finished(output_dir, checkpoint_step(checkpoint), training_args)
        logger.warning("%s is at --max_steps %d: saved it as the final model without training", checkpoint,
                       training_args.max_steps)
        return Path(output_dir)
    # The data before the model: exact token counts (online packing, group_by_length) and a bad sample under
    # --bad_sample_policy error are found without weights in memory.
    if family.uses_processor_items:  # the processor resizes; the released geometry, for reports only
        vision_config = family.vision_defaults.image_config()
    else:
        vision_config = VisionConfig.from_image_processor(image_processor, data_args.min_pixels, data_args.max_pixels,
                                                          data_args.image_resize_mode, data_args.image_max_size)
    data_module = make_supervised_data_module(
        tokenizer,
        data_args,
        vision_config,
        family=family,
        vision_settings=family.vision_settings(model_args.model_name_or_path),
        model_max_length=training_args.model_max_length,
        seed=training_args.seed,
        tokens_per_second=getattr(config.vision_config, "tokens_per_second", 2),
        processor=image_processor if family.uses_processor_items else None,
    )
    if training_args.train_sampling_strategy == "group_by_length" and hasattr(data_module["train_dataset"],
                                                                               "exact_lengths"):
        data_module["train_dataset"].exact_lengths()  # counted (or read from the cache) now, not after the load

    # Before the model exists: ZeRO-3 builds it inside deepspeed.zero.Init, which needs deepspeed.comm up.
    prepare_deepspeed(training_args)

    model = load_model(model_args, training_args)
    set_trainable(model, model_args)
    freeze_unread_vision(model, family)
    if training_args.lora_enable:
        # Adapters on the LLM; merger / vision tower train fully per their tune flags (modules_to_save).
        model = apply_lora(model, model_args, training_args)
    configure_fsdp(training_args, model)  # --fsdp: wrap the decoder layers and vision blocks
    # transformers 5.23 names it activation_checkpointing; --gradient_checkpointing is its alias.
    if training_args.activation_checkpointing:
        # Frozen embeddings produce no grad: let checkpointed blocks see inputs that require one.
        model.enable_input_require_grads()
        if training_args.activation_checkpointing_kwargs is None:
            training_args.activation_checkpointing_kwargs = {"use_reentrant": False}

    trainer = QwenVLTrainer(model=model, args=training_args, processing_class=tokenizer, **data_module)
    if data_args.bad_sample_policy == "skip":  # counts, reports and caps skipped samples (bad_samples.jsonl)
        trainer.add_callback(BadSampleMonitor(dataset_sizes(data_module["train_dataset"]),
                                              data_args.bad_sample_threshold, training_args.output_dir))
    # Fails at train begin if DeepSpeed (or anything) replaced the per-module optimizer groups.
    trainer.add_callback(OptimizerGroupsCallback(expected_optimizer_groups(model, training_args)))
    trainer.add_callback(LossPlotCallback())  # output_dir/loss.png at each save and at the end (rank 0)
    trainer.add_non_finite_guard()  # all ranks stop at a non-finite loss or grad norm; NaN weights are never saved
    if "wandb" in training_args.report_to:
        summary = parameter_summary(model) | dataset_summary(data_module["train_dataset"], data_module["eval_dataset"])
        trainer.add_callback(RunSummaryCallback(summary, describe_trainable(model)))
    fallback = fsdp_fallback_reason(training_args, trainer.accelerator.distributed_type)
    if fallback and training_args.should_log:  # accelerate does this silently (e.g. FSDP -> DDP on CPU)
        logger.warning(fallback)
    trainer.add_callback(StartupSummaryCallback(
        model, model_args, data_args, data_module, trainer.accelerator.distributed_type, describe_trainable(model),
        legacy_notes=training_args.legacy_notes, resume_from=checkpoint,
    ))
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_state()

    model.config.use_cache = True
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.use_cache = True
    trainer.save_model(training_args.output_dir)
    if trainer.args.should_save:
        save_processor(tokenizer, image_processor, data_args, training_args.output_dir)
        mark_finished(training_args.output_dir, trainer.state.global_step, training_args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank leaves together: a rank tearing its process down while rank 0 still writes the final
        # model can abort in the communication threads ("terminate called without an active exception").
        torch.distributed.barrier()
    return Path(training_args.output_dir)


def main() -> None:
    allow_single_process()  # --deepspeed / --fsdp / --ddp_backend without torchrun: 1 process (train/launch.py)
    try:
        train()
    except ConfigError as exc:  # a setting that cannot work: the message says which flag, no traceback
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"train_qwen.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    close_distributed()


def close_distributed() -> None:
    """Destroy the process group, if any, before the interpreter exits: gloo's and NCCL's threads torn down
    by interpreter exit can abort the process ("terminate called without an active exception") after a run
    that succeeded. Every launcher of ``train()`` (this file's ``main``, test workers) ends with it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
