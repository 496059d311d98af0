"""What is already in ``--output_dir``: a finished run, checkpoints to resume from, or a fresh start.

- A run that reached its end writes ``training_complete.json`` next to the final model
  (``mark_finished``). Re-running the same command finds it (``finished_run``) and
  exits without training: no step past ``--max_steps``, the final model untouched.
  Asking for more (a larger ``--max_steps`` or ``--num_train_epochs``) goes on from
  the newest checkpoint instead.
- ``--resume_from_checkpoint PATH`` resumes from that checkpoint; otherwise the newest
  complete ``checkpoint-*`` is taken (``resume_checkpoint``).
- ``--overwrite_output_dir`` deletes the checkpoints and the record (``start_over``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from qwenvl.train.argument import ConfigError

logger = logging.getLogger(__name__)

FINISHED_FILE = "training_complete.json"


def _length_settings(training_args: Any) -> dict[str, float]:
    """The settings that decide where a run ends."""
    return {"max_steps": int(training_args.max_steps), "num_train_epochs": float(training_args.num_train_epochs)}


def mark_finished(output_dir: str, global_step: int, training_args: Any) -> str:
    """Record that the run in ``output_dir`` reached its end (written after the final save).

    Returns:
        the record's path.
    """
    path = os.path.join(output_dir, FINISHED_FILE)
    record = {"global_step": int(global_step), **_length_settings(training_args),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
    os.replace(tmp, path)
    return path


def finished_run(output_dir: str, training_args: Any) -> str | None:
    """A description of the finished run in ``output_dir`` that these settings would repeat, or None.

    A record whose ``max_steps`` / ``num_train_epochs`` differ from the current ones is not
    "the same run": training goes on from the newest checkpoint.

    Example:
        >>> finished_run("output/demo", training_args)
        'step 40 of --max_steps 40, finished 2026-12-02T21:40:00'
    """
    path = os.path.join(output_dir, FINISHED_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        logger.warning("unreadable %s: treating %s as unfinished", path, output_dir)
        return None
    wanted = _length_settings(training_args)
    if {key: record.get(key) for key in wanted} != wanted:
        logger.info("%s finished with max_steps=%s num_train_epochs=%s; now asked for %s: going on", output_dir,
                    record.get("max_steps"), record.get("num_train_epochs"), wanted)
        return None
    limit = (f"--max_steps {record['max_steps']}" if record["max_steps"] > 0
             else f"--num_train_epochs {record['num_train_epochs']:g}")
    return f"step {record.get('global_step')} of {limit}, finished {record.get('finished_at', '?')}"


def find_resume_checkpoint(output_dir: str) -> str | None:
    """Newest complete ``checkpoint-*`` in output_dir, or None.

    A run killed while saving leaves a checkpoint folder without
    ``trainer_state.json`` (the Trainer writes it last); such a folder is
    skipped with a warning instead of crashing the restart.
    """
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for entry in os.listdir(output_dir):
        prefix, _, step = entry.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and os.path.isdir(os.path.join(output_dir, entry)):
            steps.append(int(step))
    for step in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if os.path.isfile(os.path.join(folder, "trainer_state.json")):
            return folder
        logger.warning("skipping incomplete checkpoint %s (no trainer_state.json: the run stopped while saving)",
                       folder)
    return None


def resume_checkpoint(output_dir: str, requested: str | bool | None) -> str | None:
    """The checkpoint to resume from: ``--resume_from_checkpoint PATH`` if given, else the newest in output_dir.

    Raises:
        ConfigError: the named checkpoint does not exist or is incomplete (no ``trainer_state.json``).
    """
    if requested in (None, "", False) or (isinstance(requested, str) and requested.lower() in ("false", "none")):
        checkpoint = find_resume_checkpoint(output_dir)
    elif requested is True or (isinstance(requested, str) and requested.lower() in ("true", "latest")):
        checkpoint = find_resume_checkpoint(output_dir)
        if checkpoint is None:
            raise ConfigError(f"--resume_from_checkpoint {requested}: no complete checkpoint-* in {output_dir}")
    else:
        if not os.path.isdir(requested):
            raise ConfigError(f"--resume_from_checkpoint {requested}: no such folder")
        if not os.path.isfile(os.path.join(requested, "trainer_state.json")):
            raise ConfigError(f"--resume_from_checkpoint {requested}: not a complete checkpoint (no "
                              "trainer_state.json; the run stopped while saving it)")
        checkpoint = requested
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
    return checkpoint


def start_over(output_dir: str, is_main: bool) -> list[str]:
    """``--overwrite_output_dir``: delete the checkpoints and the finished-run record of ``output_dir``.

    Only the main process deletes; the others find nothing left (call it under
    ``training_args.main_process_first``). Other files (logs, bad_samples.jsonl) are kept.

    Returns:
        the deleted paths.
    """
    if not is_main or not os.path.isdir(output_dir):
        return []
    removed = []
    for entry in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, entry)
        prefix, _, step = entry.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(path)
        elif entry in (FINISHED_FILE, "trainer_state.json"):
            os.remove(path)
            removed.append(path)
    if removed:
        logger.warning("--overwrite_output_dir: deleted %d checkpoint(s)/record(s) in %s", len(removed), output_dir)
    return removed


def checkpoint_step(folder: str) -> int:
    """The ``global_step`` recorded in a checkpoint's ``trainer_state.json`` (0 if unreadable)."""
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as handle:
            return int(json.load(handle).get("global_step", 0))
    except (OSError, ValueError):
        return 0


# Files of a checkpoint that make up the model (full weights or a LoRA adapter) and its config.
MODEL_FILES = ("config.json", "generation_config.json", "adapter_config.json", "adapter_model.safetensors",
               "model.safetensors", "model.safetensors.index.json", "trainer_state.json")


def model_files(checkpoint: str) -> list[str]:
    """Names of a checkpoint's files that make up the final model, or [] when it holds no weights.

    A ZeRO-3 checkpoint saved without ``stage3_gather_16bit_weights_on_model_save`` has none.
    """
    names = set(os.listdir(checkpoint))
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    shards: set[str] = set()
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            shards = set(json.load(handle)["weight_map"].values())
    if not ({"model.safetensors", "adapter_model.safetensors"} & names or shards):
        return []
    return sorted(names & (set(MODEL_FILES) | shards))


def copy_final_model(checkpoint: str, output_dir: str) -> list[str]:
    """Copy a checkpoint's model files (weights or adapter, config, state) into ``output_dir``.

    The copied config gets ``use_cache`` back on (training turns it off), as the final save does.

    Returns:
        the copied names ([] when the checkpoint holds no weights).
    """
    names = model_files(checkpoint)
    for name in names:
        shutil.copy2(os.path.join(checkpoint, name), os.path.join(output_dir, name))
    config_path = os.path.join(output_dir, "config.json")
    if "config.json" in names:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        config["use_cache"] = True
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["use_cache"] = True
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
    return names
