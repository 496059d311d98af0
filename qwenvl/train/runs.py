"""What is already in ``--output_dir``: a finished run, checkpoints to resume from, or a fresh start.

- A run that reached its end writes ``training_complete.json`` next to the final model
  (``mark_finished``). Re-running the same command finds it (``finished_run``) and
  exits without training: no step past ``--max_steps``, the final model untouched.
  Asking for more (a larger ``--max_steps`` or ``--num_train_epochs``) goes on from
  the newest checkpoint instead.
- ``--resume_from_checkpoint PATH`` resumes from that checkpoint; otherwise the newest
  complete ``checkpoint-*`` is taken (``resume_checkpoint``): complete means every file checks
  without loading weights (``checkpoint_problem``); a newer one that does not is skipped with a
  warning naming the bad file.
- One run at a time per ``--output_dir`` (``hold_output_dir``): a second is refused while the
  first lives; the lock of a dead run is gone with it.
- ``--overwrite_output_dir`` deletes the checkpoints and the record (``start_over``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
import zipfile
from collections.abc import Iterator
from typing import Any

try:
    import fcntl
except ImportError:  # not a Unix system: no output_dir lock
    fcntl = None

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


def _safetensors_problem(path: str) -> str | None:
    """Why a ``.safetensors`` file is not whole (header unreadable, size not what the header says), or None.

    Reads the 8-byte header length and the JSON header only, never the weights: the file must be
    exactly ``8 + header length + the largest tensor end offset`` bytes long.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, expected at least an 8-byte header length (truncated)"
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            return f"{size} bytes, expected more than the header's {header_len} (truncated)"
        try:
            header = json.loads(handle.read(header_len))
        except ValueError as exc:
            return f"unreadable header ({exc})"
    if not isinstance(header, dict):
        return "unreadable header (not a JSON object)"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"{size} bytes, expected {expected} from its header ({'truncated' if size < expected else 'extra data'})"
    return None


def _torch_file_problem(path: str) -> str | None:
    """Why a ``torch.save`` file (zip format) is not whole, or None; files in the older pickle format are not checked."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04":
        return None if magic else "empty file"
    try:
        with zipfile.ZipFile(path) as archive:
            size = os.path.getsize(path)
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"entry {info.filename} ends past the end of the file (truncated)"
    except zipfile.BadZipFile as exc:
        return f"not a complete torch.save archive ({exc}; truncated?)"
    return None


def _json_problem(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            json.load(handle)
    except ValueError as exc:
        return f"not valid JSON ({exc})"
    return None


def checkpoint_problem(folder: str) -> str | None:
    """Why ``folder`` is not a complete checkpoint to resume from, or None when every file checks.

    Checked without loading weights: ``trainer_state.json`` exists (the Trainer writes it last) and
    parses as an object; every ``*.safetensors`` has the size its header says; every
    ``torch.save`` file (optimizer, scheduler, RNG states, DeepSpeed shards) is a whole zip archive;
    the JSON configs parse and the shards a ``*.index.json`` names exist.

    Returns:
        ``"FILE: cause"`` naming the first bad file, or None.

    Example:
        >>> checkpoint_problem("output/run/checkpoint-40")
        'model.safetensors: 1048576 bytes, expected 2097160 from its header (truncated)'
    """
    state = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(state):
        return "trainer_state.json: missing (the run stopped while saving)"
    try:
        with open(state, encoding="utf-8") as handle:
            record = json.load(handle)
    except ValueError as exc:
        return f"trainer_state.json: not valid JSON ({exc})"
    if not isinstance(record, dict) or not isinstance(record.get("global_step", 0), int):
        return f"trainer_state.json: expected an object with an integer global_step, found {str(record)[:80]}"
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            path = os.path.join(root, name)
            if name.endswith(".safetensors"):
                problem = _safetensors_problem(path)
            elif name.endswith((".pt", ".pth", ".bin")):
                problem = _torch_file_problem(path)
            elif name.endswith(".index.json"):
                problem = _json_problem(path)
                if problem is None:
                    with open(path, encoding="utf-8") as handle:
                        shards = set(json.load(handle).get("weight_map", {}).values())
                    missing = sorted(s for s in shards if not os.path.isfile(os.path.join(root, s)))
                    problem = f"names missing shards {missing}" if missing else None
            elif name in ("config.json", "adapter_config.json", "generation_config.json"):
                problem = _json_problem(path)
            else:
                continue
            if problem is not None:
                return f"{os.path.relpath(path, folder)}: {problem}"
    return None


def find_resume_checkpoint(output_dir: str) -> str | None:
    """Newest complete ``checkpoint-*`` in output_dir (``checkpoint_problem`` finds nothing), or None.

    Newer checkpoints that do not check are skipped with a warning naming the bad file. One
    without ``trainer_state.json`` is a save that was interrupted (the Trainer writes that file
    last); when only such folders exist the run starts from step 0 (with the warning). A checkpoint
    whose save finished but whose files are damaged with no complete one before it stops the run:
    starting from step 0 would silently drop its training.

    Raises:
        ConfigError: no complete checkpoint and a damaged one (the message names its file).
    """
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for entry in os.listdir(output_dir):
        prefix, _, step = entry.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and os.path.isdir(os.path.join(output_dir, entry)):
            steps.append(int(step))
    damaged = []
    for step in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        problem = checkpoint_problem(folder)
        if problem is None:
            if damaged:
                logger.warning("resuming from %s, the newest complete checkpoint", folder)
            return folder
        logger.warning("skipping checkpoint %s: %s", folder, problem)
        if not problem.startswith("trainer_state.json: missing"):
            damaged.append(f"{folder}/{problem}")
    if damaged:
        raise ConfigError(f"no complete checkpoint to resume from in {output_dir}: {'; '.join(damaged)}. Repair or "
                          "remove it, pass --resume_from_checkpoint PATH, or --overwrite_output_dir to start from step 0")
    if steps:
        logger.warning("no complete checkpoint in %s (every save was interrupted): starting from step 0", output_dir)
    return None


def resume_checkpoint(output_dir: str, requested: str | bool | None) -> str | None:
    """The checkpoint to resume from: ``--resume_from_checkpoint PATH`` if given, else the newest in output_dir.

    Raises:
        ConfigError: the named checkpoint does not exist or does not check (``checkpoint_problem``, named).
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
        problem = checkpoint_problem(requested)
        if problem is not None:
            raise ConfigError(f"--resume_from_checkpoint {requested}: not a complete checkpoint ({problem})")
        checkpoint = requested
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
    return checkpoint


# ------------------------------------------------------------------ one run per output_dir
LOCK_FILE = ".run.lock"


@contextlib.contextmanager
def hold_output_dir(output_dir: str, is_main: bool) -> Iterator[str | None]:
    """Hold ``output_dir`` for this run: a second run started on it is refused while this one lives.

    The main process (global rank 0) takes an exclusive ``fcntl.flock`` on ``{output_dir}/.run.lock``
    and writes its pid, host and start time into it; the other ranks of the run take nothing. The
    kernel drops the lock when the process ends, however it ends (SIGKILL, OOM kill), so the lock of
    a dead run never blocks a later one. Where the file system has no ``flock`` the run goes on with
    a warning.

    Args:
        output_dir: ``--output_dir`` (created if missing).
        is_main: whether this process is the run's main process.

    Yields:
        the lock file's path (None on other ranks or without ``flock``).

    Raises:
        ConfigError: another live run holds ``output_dir`` (its pid and host are named).
    """
    if not is_main or fcntl is None:
        yield None
        return
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "{}")
            except ValueError:
                holder = {}
            raise ConfigError(
                f"--output_dir {output_dir} is in use by another run (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}; lock {path}). Wait for it to end, "
                "stop it, or pick another --output_dir") from None
        except OSError as exc:  # a file system without flock (some network mounts)
            logger.warning("cannot lock %s (%s): a second run on this --output_dir would not be refused", path, exc)
            yield None
            return
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        handle.flush()
        yield path
    finally:
        handle.close()  # releases the lock


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
