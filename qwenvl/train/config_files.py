"""Config files as users of config-driven VLM pipelines write them, turned into our flags.

Four kinds of YAML/JSON file are read (``../shared/VLM_CONFIG_FORMAT.md``; the README maps each key):

- **model** (``model_classes``, ``loading_params``, ``processor_params``);
- **collator** (``dataset_columns``, ``data_processing``, ``message_format``, ``image_processing``,
  ``video_processing``, ``text_processing``, ``label_masking``);
- **peft** (the fields of ``peft.LoraConfig``: ``task_type``, ``r``, ``lora_alpha``, ...), at the top
  level or under ``lora:``;
- **train**: our flags as keys (every ``TrainingArguments`` field among them), plus an optional ``lora:`` section.

A file's kind comes from its keys, so files may be given in any order; one file may hold
several kinds. Every key either becomes a flag value or is refused with a ``ConfigFileError`` that
names the flag to use or says why it is not supported; a misspelt key gets the closest key of
the same kind (never an unrelated flag).

Example:
    >>> loaded = load_config_files(["examples/vlm_config"], argument_names())
    >>> loaded.settings["lora_r"], loaded.origins["lora_r"]
    (8, 'examples/vlm_config/peft_config.yaml')
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoConfig
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

from qwenvl.data.annotations import open_store
from qwenvl.data.sources import resolve_sources
from qwenvl.models.loading import model_class_for

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
FILE_KINDS = ("model", "collator", "peft", "train")
MODEL_SECTIONS = ("model_classes", "loading_params", "processor_params")
COLLATOR_SECTIONS = ("dataset_columns", "data_processing", "message_format", "image_processing",
                     "video_processing", "text_processing", "label_masking")
# A file holding any of these at the top level is a PEFT file (LoraConfig fields that are not our flags).
PEFT_MARKERS = ("task_type", "r", "target_modules", "bias", "peft_type")
# peft.LoraConfig field (or our short name under `lora:`) -> our flag.
PEFT_KEYS = {"r": "lora_r", "lora_alpha": "lora_alpha", "alpha": "lora_alpha", "lora_dropout": "lora_dropout",
             "dropout": "lora_dropout", "target_modules": "lora_target_modules", "use_dora": "use_dora",
             "use_rslora": "use_rslora", "bias": "lora_bias", "enable": "lora_enable",
             "load_in_4bit": "load_in_4bit"}
# LoraConfig fields accepted only at their default (the value that means "what this project does").
PEFT_FIXED = {"task_type": "CAUSAL_LM", "peft_type": "LORA", "inference_mode": False, "fan_in_fan_out": False,
              "init_lora_weights": True}
PEFT_REFUSED = {
    "modules_to_save": "the merger and the vision tower train fully next to the adapters with --tune_mm_mlp True / "
                       "--tune_mm_vision True",
    "base_model_name_or_path": "give the checkpoint with --model_name_or_path",
    "layers_to_transform": "adapters go on every layer of the language model",
    "layers_pattern": "adapters go on every layer of the language model",
    "rank_pattern": "one rank for every adapter (--lora_r)",
    "alpha_pattern": "one alpha for every adapter (--lora_alpha)",
    "exclude_modules": "the vision tower is always excluded; name the LLM layers to adapt in target_modules",
    "target_parameters": "adapters go on linear layers (target_modules)",
    "megatron_config": "not supported", "megatron_core": "not supported", "loftq_config": "not supported",
    "layer_replication": "not supported", "runtime_config": "not supported", "lora_bias": "not supported",
    "use_qalora": "not supported", "qalora_group_size": "not supported", "eva_config": "not supported",
    "corda_config": "not supported", "revision": "not supported", "auto_mapping": "not supported",
    "trainable_token_indices": "not supported", "alora_invocation_tokens": "not supported",
    "arrow_config": "not supported", "ensure_weight_tying": "not supported",
}
# Command-line and train-file names from other tools -> what to write here.
ALIASES = {
    "mask_input_tokens": "--train_on_prompt (its inverse: mask_input_tokens false = --train_on_prompt True)",
    "dataset_text_field": "nothing: samples are conversations; map dataset columns with a collator file's "
                          "dataset_columns or a registry entry's \"columns\"",
    "max_length": "--model_max_length", "max_seq_length": "--model_max_length", "max_seq_len": "--model_max_length",
    "torch_dtype": "--bf16 True / --fp16 True (float32: neither)", "dtype": "--bf16 True / --fp16 True",
    "lr": "--learning_rate", "epochs": "--num_train_epochs", "batch_size": "--per_device_train_batch_size",
    "lora_rank": "--lora_r", "rank": "--lora_r", "r": "--lora_r", "num_frames": "--video_num_frames",
    "max_size": "--image_max_size", "resize_mode": "--image_resize_mode", "max_duration": "--video_max_duration",
    "model_id": "--model_name_or_path", "model_name": "--model_name_or_path", "model_path": "--model_name_or_path",
    "dataset": "--dataset_use", "dataset_name": "--dataset_use", "train_file": "--dataset_use",
    "system_prompt": "a collator file's message_format.system_prompt (or a registry entry's \"system_prompt\")",
    "train_on_inputs": "--train_on_prompt", "device_map": "nothing: the launcher places the model (torchrun, "
                                                          "DeepSpeed, FSDP)",
}
SIMILARITY = 0.75  # a suggestion must be at least this close (difflib ratio); below, none is given
IGNORE_INDEX = -100
RESIZE_MODES = ("keep_aspect", "crop", "stretch")
TEMPORAL_PATCH = 2  # every supported family groups 2 frames per temporal patch
DTYPES = {"bfloat16": ("bf16", "fp16"), "bf16": ("bf16", "fp16"), "float16": ("fp16", "bf16"),
          "fp16": ("fp16", "bf16"), "half": ("fp16", "bf16"), "float32": (None, None), "fp32": (None, None),
          "float": (None, None)}


class ConfigError(ValueError):
    """A setting that cannot work, found before the model loads; the message names the flag and the fix.

    Defined here and re-exported by ``qwenvl.train.argument`` (which imports this module).
    """


class ConfigFileError(ConfigError):
    """A config-file key that cannot work; the message names the file, the key and our flag (or why not)."""


@dataclass
class LoadedConfigs:
    """Settings read from config files, in the order given.

    Attributes:
        files: (path, kinds) per file read.
        settings: flag name -> value (a later file wins).
        origins: flag name -> the file that set it.
        notes: what a key was translated to, or why it is ignored (printed in the start-up summary).
        model_classes: checkpoint id -> {model_class, processor_class, import_path} from model files.
        model_classes_file: the file the model classes came from.
    """

    files: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model_classes: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_classes_file: str = ""


# ------------------------------------------------------------------ suggestions
def closest(name: str, candidates: list[str] | tuple[str, ...] | set[str], prefix: str = "") -> str | None:
    """The candidate closest to ``name`` when it is close enough (``SIMILARITY``), else None.

    Example:
        >>> closest("lora_alfa", ["lora_alpha", "lora_dropout"]), closest("dataset_text_field", ["dataset_use"])
        ('lora_alpha', None)
    """
    found = difflib.get_close_matches(prefix + name, [prefix + c for c in sorted(candidates)], n=1, cutoff=SIMILARITY)
    return found[0][len(prefix):] if found else None


def unknown_key_hint(name: str, candidates: list[str] | tuple[str, ...] | set[str], flag_style: bool = False) -> str:
    """``; did you mean --x?`` (a close key of the same kind), or what a known foreign name is here, or ``""``.

    Example:
        >>> unknown_key_hint("mask_input_tokens", ["include_num_input_tokens_seen"], flag_style=True)
        '; in this project: --train_on_prompt (its inverse: mask_input_tokens false = --train_on_prompt True)'
    """
    bare = name.lstrip("-")
    match = closest(bare, candidates, "--" if flag_style else "")
    if match is not None:
        return f"; did you mean {'--' if flag_style else ''}{match}?"
    if bare in ALIASES:
        return f"; in this project: {ALIASES[bare]}"
    return ""


# ------------------------------------------------------------------ files
def config_paths(items: list[str]) -> list[Path]:
    """Files named by ``items`` (files, or folders whose ``*.yaml|*.yml|*.json`` are read in name order).

    Raises:
        ConfigFileError: a path that does not exist, a file of another type, or a folder without config files.
    """
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in CONFIG_SUFFIXES)
            if not found:
                raise ConfigFileError(f"config folder {path}: no {', '.join(CONFIG_SUFFIXES)} files in it")
            paths.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in CONFIG_SUFFIXES:
                raise ConfigFileError(f"config file {path}: expected a {', '.join(CONFIG_SUFFIXES)} file")
            paths.append(path)
        else:
            raise ConfigFileError(f"config file {path}: no such file or folder")
    return paths


def read_mapping(path: Path) -> dict[str, Any]:
    """The YAML/JSON mapping in ``path`` (an empty file is ``{}``).

    Raises:
        ConfigFileError: the file does not parse, or is not a mapping.
    """
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text) if text.strip() else None
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - json.JSONDecodeError, or yaml.YAMLError (yaml is imported lazily)
        raise ConfigFileError(f"config file {path}: does not parse: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path}: expected a mapping of settings, found {type(data).__name__}")
    return data


def file_kinds(data: dict[str, Any], known: set[str] | frozenset[str] = frozenset()) -> tuple[str, ...]:
    """Which kinds of config a file's top-level keys hold (``train`` for flag names, or when nothing is
    recognised); an unknown key adds no kind, so its suggestion comes from the file's own kind.

    Example:
        >>> file_kinds({"task_type": "CAUSAL_LM", "r": 8, "lora_alfa": 16}), file_kinds({"learning_rate": 1e-5})
        (('peft',), ('train',))
    """
    kinds = []
    if any(k in MODEL_SECTIONS for k in data):
        kinds.append("model")
    if any(k in COLLATOR_SECTIONS for k in data):
        kinds.append("collator")
    if any(k in PEFT_MARKERS for k in data):
        kinds.append("peft")
    peft_file = "peft" in kinds
    flags = [k for k in data if (k in known or k == "lora") and not (peft_file and k in PEFT_KEYS)
             and k not in COLLATOR_SECTIONS]
    if not kinds or flags:
        kinds.append("train")
    return tuple(kinds)


def load_config_files(items: list[str], known: set[str]) -> LoadedConfigs:
    """Read config files (and folders of them) in order into flag settings; later files win.

    Args:
        items: paths as given (``configs/``, ``model.yaml``, ...).
        known: every flag name (``argument.argument_names()``).

    Returns:
        the settings, which file set each, notes, and the model classes of a model file.

    Raises:
        ConfigFileError: a key that does not exist (with the closest key of the same kind) or cannot work
            (naming our flag or why), a bad value, or an unreadable file.
    """
    loaded = LoadedConfigs()
    for path in config_paths(items):
        data = read_mapping(path)
        kinds = file_kinds(data, known)
        loaded.files.append((str(path), kinds))
        reader = _FileReader(path, kinds, known, loaded)
        reader.read(data)
    if len(loaded.model_classes) == 1 and "model_name_or_path" not in loaded.settings:
        checkpoint = next(iter(loaded.model_classes))
        loaded.settings["model_name_or_path"] = checkpoint
        loaded.origins["model_name_or_path"] = loaded.model_classes_file
        loaded.notes.append(f"{loaded.model_classes_file}: model_classes has one entry, {checkpoint}: the "
                            "checkpoint trained unless --model_name_or_path names another")
    return loaded


class _FileReader:
    """Turns one file's keys into settings of ``loaded`` (one method per kind of section)."""

    def __init__(self, path: Path, kinds: tuple[str, ...], known: set[str], loaded: LoadedConfigs):
        self.path, self.kinds, self.known, self.loaded = path, kinds, known, loaded

    # -------------------------------------------------------------- helpers
    def error(self, key: str, message: str) -> ConfigFileError:
        return ConfigFileError(f"config file {self.path}: {key}: {message}")

    def set(self, flag: str, value: Any) -> None:
        if flag not in self.known:  # a bug of this module, not of the file
            raise AssertionError(f"{flag} is not a flag")
        self.loaded.settings[flag] = value
        self.loaded.origins[flag] = str(self.path)

    def note(self, text: str) -> None:
        self.loaded.notes.append(f"{self.path}: {text}")

    def section(self, key: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
        """A mapping section whose keys must be among ``allowed`` (``null`` = empty)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping, found {type(value).__name__} {value!r}")
        for name in value:
            if name not in allowed:
                hint = unknown_key_hint(str(name), allowed)
                raise self.error(f"{key}.{name}", f"unknown key{hint or ''}; {key} takes {', '.join(allowed)}")
        return value

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, found {value!r}")
        return value

    def fixed(self, key: str, value: Any, wanted: Any, why: str) -> None:
        """A key accepted only at ``wanted`` (what this project always does)."""
        if value != wanted:
            raise self.error(key, f"{value!r} is not supported: {why}")

    # -------------------------------------------------------------- dispatch
    def read(self, data: dict[str, Any]) -> None:
        peft_file = "peft" in self.kinds
        for key, value in data.items():
            if key in MODEL_SECTIONS:
                getattr(self, f"model_{key}")(value)
            elif key in COLLATOR_SECTIONS:
                getattr(self, f"collator_{key}")(value)
            elif key == "lora" and isinstance(value, dict):
                self.peft(value, "lora.")
                if "lora_enable" not in self.loaded.settings or self.loaded.origins["lora_enable"] != str(self.path):
                    self.set("lora_enable", True)
            elif peft_file and (key in PEFT_KEYS or key in PEFT_FIXED or key in PEFT_REFUSED):
                self.peft({key: value}, "")
            elif key in self.known:
                self.train(key, value)
            else:
                self.unknown(key)
        if peft_file and "lora_enable" not in data:
            self.set("lora_enable", True)

    def unknown(self, key: str) -> None:
        if "peft" in self.kinds and "train" not in self.kinds:
            candidates: set[str] | tuple[str, ...] = (*PEFT_KEYS, *PEFT_FIXED, *PEFT_REFUSED)
        elif self.kinds == ("model",):
            candidates = MODEL_SECTIONS
        elif self.kinds == ("collator",):
            candidates = COLLATOR_SECTIONS
        else:
            candidates = self.known | set(MODEL_SECTIONS) | set(COLLATOR_SECTIONS) | {"lora"}
        hint = unknown_key_hint(key, candidates)
        raise ConfigFileError(f"config file {self.path}: unknown setting {key!r}{hint}")

    # -------------------------------------------------------------- train file
    def train(self, key: str, value: Any) -> None:
        if key in ("dataset_use", "eval_dataset_use") and isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)  # a YAML list of datasets is natural
        if key == "lora_target_modules" and isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        if key in ("gradient_checkpointing", "gradient_checkpointing_kwargs"):  # transformers 5's deprecated names
            new = key.replace("gradient", "activation")
            self.note(f"{key} -> --{new} (the transformers 5 name)")
            key = new
        self.set(key, value)

    # -------------------------------------------------------------- peft file
    def peft(self, section: dict[str, Any], where: str) -> None:
        for key, value in section.items():
            label = where + key
            if key in PEFT_FIXED:
                wanted = PEFT_FIXED[key]
                given = str(value).upper() if key in ("task_type", "peft_type") else value
                self.fixed(label, given, wanted, {
                    "task_type": "the Qwen-VL language models are causal LMs (CAUSAL_LM)",
                    "peft_type": "this project trains LoRA adapters (DoRA / rsLoRA: use_dora / use_rslora)",
                    "inference_mode": "training needs trainable adapters",
                    "fan_in_fan_out": "the Qwen-VL linear layers store (out, in) weights",
                    "init_lora_weights": "adapters start at zero (peft's default)",
                }[key])
            elif key in PEFT_REFUSED:
                raise self.error(label, f"not supported: {PEFT_REFUSED[key]}")
            elif key in PEFT_KEYS or (where and key.startswith("lora_") and key in self.known):
                flag = PEFT_KEYS.get(key, key)
                if flag == "lora_target_modules" and isinstance(value, (list, tuple)):
                    value = ",".join(str(v) for v in value)
                if flag == "lora_bias" and value not in ("none", "all", "lora_only"):
                    raise self.error(label, f"expected none, all or lora_only, found {value!r}")
                self.set(flag, value)
            else:
                hint = unknown_key_hint(key, (*PEFT_KEYS, *PEFT_FIXED, *PEFT_REFUSED))
                raise self.error(label, f"unknown LoRA setting{hint}")

    # -------------------------------------------------------------- model file
    def model_model_classes(self, value: Any) -> None:
        if not isinstance(value, dict) or not value:
            raise self.error("model_classes", f"expected a mapping checkpoint id -> {{model_class, processor_class, "
                                              f"import_path}}, found {value!r}")
        for checkpoint, entry in value.items():
            self.section(f"model_classes.{checkpoint}", entry, ("model_class", "processor_class", "import_path"))
        self.loaded.model_classes = {str(k): dict(v or {}) for k, v in value.items()}
        self.loaded.model_classes_file = str(self.path)

    def model_loading_params(self, value: Any) -> None:
        params = self.section("loading_params", value, ("torch_dtype", "dtype", "device_map", "trust_remote_code",
                                                        "attn_implementation", "low_cpu_mem_usage", "cache_dir"))
        for key, item in params.items():
            label = f"loading_params.{key}"
            if key in ("torch_dtype", "dtype"):
                name = str(item).removeprefix("torch.").lower()
                if name not in DTYPES:
                    raise self.error(label, f"{item!r}: expected torch.bfloat16, torch.float16 or torch.float32 "
                                            f"(our flags --bf16 True / --fp16 True / neither); 'auto' is not "
                                            f"supported: training needs one dtype")
                on, off = DTYPES[name]
                for flag in ("bf16", "fp16"):
                    self.set(flag, flag == on)
                self.note(f"{label} {item} -> " + (f"--{on} True" if on else "--bf16 False --fp16 False (float32)"))
            elif key == "device_map":
                self.note(f"{label} {item!r} ignored: training places the model by its launcher (one device per "
                          "process under torchrun; DeepSpeed / FSDP shard it)")
            elif key == "low_cpu_mem_usage":
                self.note(f"{label} ignored: transformers always loads weights this way")
            elif key == "trust_remote_code":
                self.set("trust_remote_code", self.boolean(label, item))
            else:
                self.set(key, item)

    def model_processor_params(self, value: Any) -> None:
        params = self.section("processor_params", value, ("trust_remote_code", "min_pixels", "max_pixels",
                                                          "use_fast"))
        for key, item in params.items():
            label = f"processor_params.{key}"
            if key == "trust_remote_code":
                self.set("trust_remote_code", self.boolean(label, item) or bool(self.loaded.settings.get(
                    "trust_remote_code", False)))
            elif key == "use_fast":
                self.note(f"{label} ignored: images are processed by this project's own numpy pipeline "
                          "(qwenvl/data/vision.py), the same for every processor")
            else:
                self.set(key, item)

    # -------------------------------------------------------------- collator file
    def collator_dataset_columns(self, value: Any) -> None:
        if isinstance(value, str):  # our flag's own form: JSON of record key -> column
            self.set("dataset_columns", value)
            return
        columns = self.section("dataset_columns", value, COLUMN_KEYS)
        mapping = {COLUMN_KEYS[k]: v for k, v in columns.items() if v is not None}
        for key, column in mapping.items():
            if not isinstance(column, str) or not column:
                raise self.error(f"dataset_columns.{key}_column", f"expected a column name, found {column!r}")
        self.set("dataset_columns", json.dumps(mapping, sort_keys=True) if mapping else "")

    def collator_data_processing(self, value: Any) -> None:
        params = self.section("data_processing", value, ("image_data", "video_data"))
        for key, item in params.items():
            self.set(key, self.boolean(f"data_processing.{key}", item))

    def collator_message_format(self, value: Any) -> None:
        if isinstance(value, str):  # our flag's own form: JSON
            self.set("message_format", value)
            return
        if value is None:
            self.set("message_format", "")
            return
        params = self.section("message_format", value, ("system_prompt", "training_messages"))
        check_message_format(params, f"config file {self.path}: message_format")
        self.set("message_format", json.dumps(params, sort_keys=True))

    def collator_image_processing(self, value: Any) -> None:
        params = self.section("image_processing", value, ("convert_to_rgb", "resize_mode", "max_size"))
        for key, item in params.items():
            label = f"image_processing.{key}"
            if key == "convert_to_rgb":
                self.fixed(label, item, True, "images are always converted to RGB (the vision tower takes 3 "
                                              "channels; transparency becomes white)")
            elif key == "resize_mode":
                if item not in RESIZE_MODES:
                    raise self.error(label, f"expected one of {', '.join(RESIZE_MODES)}, found {item!r}")
                self.set("image_resize_mode", item)
            else:
                if item is not None and (not isinstance(item, int) or isinstance(item, bool) or item < 1):
                    raise self.error(label, f"expected a positive number of pixels or null, found {item!r}")
                self.set("image_max_size", item)

    def collator_video_processing(self, value: Any) -> None:
        params = self.section("video_processing", value, ("enabled", "frame_extraction", "file_processing"))
        for key, item in params.items():
            label = f"video_processing.{key}"
            if key == "enabled":
                if not self.boolean(label, item):
                    self.set("video_data", False)
                    self.note(f"{label} false -> data_processing.video_data false")
            elif key == "frame_extraction":
                self.frame_extraction(self.section(label, item, ("library", "sampling_strategy", "num_frames")))
            else:
                files = self.section(label, item, ("convert_to_rgb", "max_duration"))
                if "convert_to_rgb" in files:
                    self.fixed(f"{label}.convert_to_rgb", files["convert_to_rgb"], True,
                               "video frames are always decoded to RGB")
                if files.get("max_duration") is not None:
                    seconds = files["max_duration"]
                    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
                        raise self.error(f"{label}.max_duration", f"expected seconds > 0 or null, found {seconds!r}")
                    self.set("video_max_duration", float(seconds))

    def frame_extraction(self, params: dict[str, Any]) -> None:
        label = "video_processing.frame_extraction"
        if "library" in params:
            library = str(params["library"]).lower()
            backend = {"decord": "decord", "cv2": None, "opencv": None, "pyav": "pyav", "av": "pyav",
                       "torchcodec": "torchcodec"}.get(library, "?")
            if backend == "?":
                raise self.error(f"{label}.library", f"expected decord or cv2 (or pyav, torchcodec), found "
                                                     f"{params['library']!r}")
            if backend is None:
                self.note(f"{label}.library {library}: no OpenCV decoder here; videos are read by the first of "
                          "decord, pyav, torchcodec that imports ($QWENVL_VIDEO_BACKEND picks one); frames are "
                          "the same")
            else:
                self.set("video_backend", backend)
        strategy = params.get("sampling_strategy", "uniform")
        if strategy not in ("uniform", "fps"):
            raise self.error(f"{label}.sampling_strategy", f"expected uniform (num_frames evenly spaced frames) or "
                                                           f"fps (--base_interval / --video_fps), found {strategy!r}")
        if strategy == "fps":
            if params.get("num_frames") is not None:
                raise self.error(f"{label}.num_frames", "applies to sampling_strategy uniform; with fps the frame "
                                                        "count follows the duration (--video_min_frames .. "
                                                        "--video_max_frames)")
            return
        frames = params.get("num_frames")
        if frames is None:
            if "sampling_strategy" in params:
                raise self.error(f"{label}.num_frames", "sampling_strategy uniform needs num_frames")
            return
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise self.error(f"{label}.num_frames", f"expected a positive number of frames, found {frames!r}")
        rounded = -(-frames // TEMPORAL_PATCH) * TEMPORAL_PATCH
        self.set("video_min_frames", rounded)
        self.set("video_max_frames", rounded)
        self.note(f"{label}: uniform {frames} frame(s) -> --video_min_frames {rounded} --video_max_frames {rounded} "
                  f"(evenly spaced over the clip"
                  + (f"; rounded up to a multiple of the temporal patch, {TEMPORAL_PATCH})" if rounded != frames else ")"))

    def collator_text_processing(self, value: Any) -> None:
        params = self.section("text_processing", value, ("padding", "truncation", "max_length",
                                                         "add_generation_prompt"))
        for key, item in params.items():
            label = f"text_processing.{key}"
            if key == "padding":
                if item not in (True, "longest"):
                    raise self.error(label, f"{item!r} is not supported: batches are padded to their longest "
                                            "sample (or flattened / packed: --data_flatten, --data_packing)")
            elif key == "truncation":
                self.fixed(label, item, True, "text beyond --model_max_length is cut (a cut through an image or "
                                              "video is refused per --bad_sample_policy)")
            elif key == "max_length":
                if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                    raise self.error(label, f"expected a positive number of tokens, found {item!r}")
                self.set("model_max_length", item)
            else:
                self.fixed(label, item, False, "training learns each answer after the generation prompt of its "
                                               "turn; the prompt alone is for inference (tools/infer.py)")

    def collator_label_masking(self, value: Any) -> None:
        params = self.section("label_masking", value, ("mask_pad_token", "mask_image_token", "mask_input_tokens",
                                                       "ignore_index"))
        for key, item in params.items():
            label = f"label_masking.{key}"
            if key == "mask_pad_token":
                self.fixed(label, item, True, "padding is never learned")
            elif key == "mask_image_token":
                self.fixed(label, item, True, "image and video tokens are never learned (they are not text the "
                                              "model could predict)")
            elif key == "mask_input_tokens":
                self.set("train_on_prompt", not self.boolean(label, item))
            else:
                self.fixed(label, item, IGNORE_INDEX, "labels that are not learned are -100, the index the loss "
                                                      "ignores")


# collator dataset_columns key -> our column-mapping key (qwenvl/data/sources.py MAPPING_KEYS)
COLUMN_KEYS = {"image_column": "image", "question_column": "question", "answer_column": "answer",
               "video_column": "video", "context_column": "context"}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def check_message_format(params: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``message_format`` section checked and normalised: ``{system_prompt, messages}``.

    ``training_messages`` is a list of ``{role, content}``; content is a string or a list of parts
    ``{type: text, text}``, ``{type: image}``, ``{type: video}``. Text may hold ``{placeholder}``s: a
    ``dataset_columns`` key (``question_column`` ...) or ``system_prompt``.

    Raises:
        ConfigFileError: a bad shape, a role other than system/user/assistant, an unknown part type, an
            unknown placeholder (named, with the ones that exist), or no assistant turn.

    Example:
        >>> check_message_format({"training_messages": [{"role": "user", "content": "{question_column}"},
        ...     {"role": "assistant", "content": "{answer_column}"}]}, "x")["messages"][0]
        {'role': 'user', 'content': [{'type': 'text', 'text': '{question_column}'}]}
    """
    system = params.get("system_prompt")
    if system is not None and not isinstance(system, str):
        raise ConfigFileError(f"{where}.system_prompt: expected text, found {system!r}")
    turns = params.get("training_messages")
    if not isinstance(turns, list) or not turns:
        raise ConfigFileError(f"{where}.training_messages: expected a list of {{role, content}} turns, found "
                              f"{turns!r}")
    names = (*COLUMN_KEYS, "system_prompt")
    messages = []
    for number, turn in enumerate(turns):
        label = f"{where}.training_messages[{number}]"
        if not isinstance(turn, dict) or set(turn) - {"role", "content"}:
            raise ConfigFileError(f"{label}: expected {{role, content}}, found {turn!r}")
        role = turn.get("role")
        if role not in ("system", "user", "assistant"):
            raise ConfigFileError(f"{label}.role: expected system, user or assistant, found {role!r}")
        content = turn.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list) or not parts:
            raise ConfigFileError(f"{label}.content: expected text or a list of parts, found {content!r}")
        for index, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "image", "video"):
                raise ConfigFileError(f"{label}.content[{index}]: expected {{type: text|image|video}}, found {part!r}")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ConfigFileError(f"{label}.content[{index}]: a text part needs text, found {part!r}")
                for name in _PLACEHOLDER.findall(part["text"]):
                    if name not in names:
                        hint = unknown_key_hint(name, names)
                        raise ConfigFileError(f"{label}.content[{index}]: unknown placeholder {{{name}}}{hint}; "
                                              f"placeholders are {', '.join('{' + n + '}' for n in names)}")
        messages.append({"role": role, "content": parts})
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigFileError(f"{where}.training_messages: no assistant turn, so nothing would be learned")
    return {"system_prompt": system, "messages": messages}


# ------------------------------------------------------------------ model classes
def model_class_entry(model_classes: dict[str, dict[str, Any]], model_name_or_path: str) -> tuple[str, dict] | None:
    """The ``model_classes`` entry of this checkpoint: its id or folder name, else the only entry, else None.

    Example:
        >>> model_class_entry({"Qwen/Qwen2-VL-2B-Instruct": {}, "x/y": {}}, "/ckpt/Qwen2-VL-2B-Instruct")[0]
        'Qwen/Qwen2-VL-2B-Instruct'
    """
    name = model_name_or_path.rstrip("/")
    for key, entry in model_classes.items():
        if key == name or key.rstrip("/").split("/")[-1] == os.path.basename(name):
            return key, entry
    if len(model_classes) == 1:
        return next(iter(model_classes.items()))
    return None


def check_model_classes(model_classes: dict[str, dict[str, Any]], model_name_or_path: str, model_type: str,
                        model_class: str, processor_classes: tuple[str, ...], trust_remote_code: bool,
                        where: str) -> str:
    """Check a model file's ``model_classes`` against the checkpoint; returns what the summary says.

    Args:
        model_classes: checkpoint id -> {model_class, processor_class, import_path}.
        model_name_or_path: the checkpoint trained.
        model_type: its config's ``model_type``.
        model_class: the class its family loads (``model_class_for(config).__name__``).
        processor_classes: the processor class names transformers registers for ``model_type``.
        trust_remote_code: ``--trust_remote_code``.
        where: the file, for messages.

    Raises:
        ConfigFileError: an ``import_path`` other than transformers without ``--trust_remote_code``; the
            checkpoint's entry naming another class than its family's (both named) or code from elsewhere.
    """
    for key, entry in model_classes.items():
        path = entry.get("import_path", "transformers")
        if path != "transformers" and not trust_remote_code:
            raise ConfigFileError(f"config file {where}: model_classes.{key}.import_path {path!r}: a config file "
                                  "must not import code from outside transformers silently; pass "
                                  "--trust_remote_code True (or loading_params.trust_remote_code: true) to accept "
                                  "the file")
    found = model_class_entry(model_classes, model_name_or_path)
    if found is None:
        return (f"model_classes ({where}): no entry for {model_name_or_path}; its model_type {model_type} loads as "
                f"{model_class}")
    key, entry = found
    path = entry.get("import_path", "transformers")
    if path != "transformers":
        raise ConfigFileError(f"config file {where}: model_classes.{key}.import_path {path!r}: this project loads "
                              f"{model_type} checkpoints with transformers' {model_class}; code from {path} is "
                              "not supported")
    given = entry.get("model_class")
    if given is not None and given != model_class:
        raise ConfigFileError(f"config file {where}: model_classes.{key}.model_class {given} does not fit "
                              f"{model_name_or_path}: its model_type is {model_type}, which loads as {model_class}")
    processor = entry.get("processor_class")
    if processor is not None and processor not in processor_classes:
        raise ConfigFileError(f"config file {where}: model_classes.{key}.processor_class {processor} does not fit "
                              f"{model_name_or_path}: its model_type is {model_type}, whose processor is "
                              f"{' or '.join(processor_classes)}")
    return f"model_classes ({where}): {key} -> {model_class} ({model_type}), checked"


# ------------------------------------------------------------------ modalities
def check_modalities(image_data: bool, video_data: bool, counts: dict[str, tuple[int, int, int]],
                     origin: str = "") -> list[str]:
    """Refuse datasets holding samples of a modality that ``data_processing`` turned off; never drop silently.

    Args:
        image_data, video_data: ``--image_data`` / ``--video_data``.
        counts: dataset name -> (samples, samples with images, samples with videos).
        origin: the file that set the toggles, for the message.

    Returns:
        one summary line per dataset (``name: N samples, I with images, V with videos``).

    Raises:
        ConfigFileError: naming each dataset and how many of its samples hold the modality turned off.

    Example:
        >>> check_modalities(True, False, {"demo": (4, 4, 0)})
        ['demo: 4 samples, 4 with images, 0 with videos']
    """
    lines, refused = [], []
    for name, (total, images, videos) in counts.items():
        lines.append(f"{name}: {total} samples, {images} with images, {videos} with videos")
        for on, count, what, flag in ((image_data, images, "images", "image_data"),
                                      (video_data, videos, "videos", "video_data")):
            if not on and count:
                refused.append(f"{name} has {count} of {total} samples with {what} but {flag} is off")
    if refused:
        source = f" ({origin})" if origin else ""
        raise ConfigFileError("; ".join(refused) + f"{source}: those samples would be dropped; take the datasets "
                              "out of --dataset_use or turn the modality on (data_processing, or --image_data / "
                              "--video_data True)")
    return lines


def media_counts(dataset_use: str) -> dict[str, tuple[int, int, int]]:
    """Per source of ``dataset_use``: (records, records with images, records with videos), from its store."""
    counts = {}
    for source in resolve_sources(dataset_use):
        store = open_store(source)
        images, videos = store.column("num_images"), store.column("num_videos")
        counts[source.name] = (len(store), int((images > 0).sum()), int((videos > 0).sum()))
    return counts


def check_run(model_args: Any, data_args: Any, training_args: Any) -> list[str]:
    """The config-file checks that read the checkpoint's config or the datasets (no weights): run after
    ``preflight``, before the model loads.

    Returns:
        lines for the start-up summary (the model-classes check, the modality counts).

    Raises:
        ConfigError: ``check_model_classes``'s and ``check_modalities``' errors.
    """
    lines = []
    classes = getattr(model_args, "model_classes", None)
    if classes:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=training_args.cache_dir)
        processor = PROCESSOR_MAPPING_NAMES.get(config.model_type)
        processors = (processor,) if isinstance(processor, str) else tuple(processor or ())
        lines.append(check_model_classes(classes, model_args.model_name_or_path, config.model_type,
                                         model_class_for(config).__name__, processors,
                                         bool(model_args.trust_remote_code), model_args.model_classes_file))
    if not (data_args.image_data and data_args.video_data):
        origins = getattr(training_args, "config_origins", {})
        origin = ", ".join(sorted({origins[k] for k in ("image_data", "video_data") if k in origins}))
        for flag in ("dataset_use", "eval_dataset_use"):
            if getattr(data_args, flag):
                lines += [f"{flag}: {line}" for line in check_modalities(
                    data_args.image_data, data_args.video_data, media_counts(getattr(data_args, flag)), origin)]
    return lines
