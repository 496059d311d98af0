"""Command-line arguments: the three dataclasses HfArgumentParser reads, and how they are parsed.

``parse_args`` reads flags, or a YAML/JSON config file followed by flags that
override it (``train_qwen.py config.yaml --learning_rate 1e-5``). Abbreviated
flags are refused. Flags that guides written for transformers 4 use
(``--evaluation_strategy``, ``--group_by_length``, ``--save_safetensors``,
``--overwrite_output_dir``, ``--logging_dir``, ``--warmup_ratio``) are
accepted and translated; ``TrainingArguments.legacy_notes`` says what each became.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A setting that cannot work, found before the model loads; the message names the flag and the fix."""

_PRODUCT = re.compile(r"^\s*\d+(\s*\*\s*\d+)*\s*$")


class PixelCount(int):
    """An int that also parses products such as ``576*28*28`` (or ``576\\*28\\*28``).

    The published launch examples pass pixel limits that way; argparse calls
    this type on the string.

    Example:
        >>> PixelCount("576*28*28")
        451584
    """

    def __new__(cls, value: int | str) -> "PixelCount":
        if isinstance(value, str):
            text = value.replace("\\", "")
            if not _PRODUCT.match(text):
                raise ValueError(f"expected an integer or a product like 576*28*28, got {value!r}")
            result = 1
            for factor in text.split("*"):
                result *= int(factor)
            value = result
        if int(value) <= 0:
            raise ValueError(f"pixel counts must be positive, got {value}")
        return super().__new__(cls, int(value))


def _default_attn() -> str:
    """flash_attention_2 when flash-attn is installed, else sdpa_packed (qwenvl/train/attention.py).

    sdpa_packed is transformers' SDPA, except that flattened rows run per sample instead of
    through a dense T x T mask (10x faster at 4k-16k tokens on CPU, bench/packed_attention.py).
    """
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:
        return "sdpa_packed"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="Qwen/Qwen2.5-VL-3B-Instruct")
    tune_mm_llm: bool = field(default=False, metadata={"help": "Train the language model (and lm_head)."})
    tune_mm_mlp: bool = field(default=False, metadata={"help": "Train the vision-language merger (projector)."})
    tune_mm_vision: bool = field(default=False, metadata={"help": "Train the vision tower."})
    attn_implementation: str = field(
        default_factory=_default_attn,
        metadata={"help": "flash_attention_2 (default when flash-attn is installed), else sdpa_packed (SDPA that "
                          "runs flattened rows per sample, without a T x T mask); also sdpa or eager."},
    )


@dataclass
class DataArguments:
    # argparse formats help strings with %: a literal percent sign is written %%.
    dataset_use: str = field(default="", metadata={"help": "Comma-separated registry names, each optionally "
                                                            "name%%N (keep a seeded N%% of it)."})
    eval_dataset_use: str = field(default="", metadata={"help": "Registry names for the eval set (same syntax)."})
    dataset_registry: str = field(
        default="",
        metadata={"help": "A registry file (YAML or JSON: name -> {annotation_path, data_path}) whose entries are "
                          "added to the registry of qwenvl/data/__init__.py (tools/pack_data.py --registry_file "
                          "writes one)."},
    )
    data_flatten: bool = field(default=False, metadata={"help": "Concatenate each micro-batch into one row."})
    data_packing: bool = field(
        default=False,
        metadata={"help": "Train on rows of several samples (no padding). On files from tools/pack_data.py their "
                          "groups are used as written; on any other dataset the samples are packed when training "
                          "starts: first-fit-decreasing bins of --pack_length tokens from exact token counts "
                          "(counted once, cached next to the annotation store)."},
    )
    pack_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per packed row with --data_packing on an unpacked dataset (default: "
                          "--model_max_length)."},
    )
    count_workers: int = field(
        default=0,
        metadata={"help": "Processes that count exact token lengths (online packing, group_by_length) when they "
                          "are not cached yet; one process group per node counts (0 = the node's cores, up to 32)."},
    )
    base_interval: float = field(default=2, metadata={"help": "Seconds between sampled video frames."})
    max_pixels: PixelCount = field(default=PixelCount(576 * 28 * 28), metadata={"help": "e.g. 576*28*28"})
    min_pixels: PixelCount = field(default=PixelCount(16 * 28 * 28), metadata={"help": "e.g. 16*28*28"})
    video_max_frames: int = field(default=8)
    video_min_frames: int = field(default=4)
    video_max_frame_pixels: PixelCount = field(default=PixelCount(32 * 28 * 28))
    video_min_frame_pixels: PixelCount = field(default=PixelCount(4 * 28 * 28))
    # Qwen3-VL video sampling (upstream HEAD's flags); Qwen2/2.5-VL use base_interval and the frame-pixel flags.
    video_fps: float = field(default=2.0, metadata={"help": "Qwen3-VL: frames sampled per second of video, within "
                                                             "--video_min_frames..--video_max_frames."})
    video_max_pixels: PixelCount | None = field(
        default=None, metadata={"help": "Qwen3-VL: pixel budget of a whole video (all sampled frames), e.g. "
                                        "768*32*32*8 (None: the checkpoint's video processor config)."})
    video_min_pixels: PixelCount | None = field(
        default=None, metadata={"help": "Qwen3-VL: least pixels of a whole video (None: the checkpoint's)."})
    bad_sample_policy: str = field(
        default="skip",
        metadata={"help": "What a bad sample (missing/corrupt media, tag mismatch, over-length ...) does: 'error' "
                          "stops with file:index: reason; 'skip' leaves it out, logs and counts it "
                          "(output_dir/bad_samples.jsonl).", "choices": ["error", "skip"]},
    )
    bad_sample_threshold: float = field(
        default=0.01,
        metadata={"help": "With skip: stop, listing them, once more than this fraction of the training samples "
                          "is bad."},
    )

    def __post_init__(self) -> None:
        for name in ("max_pixels", "min_pixels", "video_max_frame_pixels", "video_min_frame_pixels",
                     "video_max_pixels", "video_min_pixels"):
            if getattr(self, name) is not None:
                setattr(self, name, PixelCount(getattr(self, name)))
        if self.video_fps <= 0:
            raise ValueError(f"video_fps must be positive, got {self.video_fps}")
        if self.video_min_pixels is not None and self.video_max_pixels is not None \
                and self.video_min_pixels > self.video_max_pixels:
            raise ValueError(f"video_min_pixels ({self.video_min_pixels}) is larger than video_max_pixels "
                             f"({self.video_max_pixels})")
        if self.pack_length is not None and self.pack_length < 1:
            raise ValueError(f"pack_length must be positive, got {self.pack_length}")
        if self.count_workers < 0:
            raise ValueError(f"count_workers must be 0 (the node's cores) or more, got {self.count_workers}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        if self.video_min_frame_pixels > self.video_max_frame_pixels:
            raise ValueError(
                f"video_min_frame_pixels ({self.video_min_frame_pixels}) is larger than "
                f"video_max_frame_pixels ({self.video_max_frame_pixels})"
            )
        if self.video_min_frames > self.video_max_frames:
            raise ValueError(
                f"video_min_frames ({self.video_min_frames}) is larger than video_max_frames ({self.video_max_frames})"
            )
        if self.bad_sample_policy not in ("error", "skip"):
            raise ValueError(
                f"bad_sample_policy should be one of 'error' or 'skip' but found {self.bad_sample_policy!r}"
            )
        if not 0.0 <= self.bad_sample_threshold <= 1.0:
            raise ValueError(f"bad_sample_threshold must be a fraction in [0, 1], got {self.bad_sample_threshold}")


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    model_max_length: int = field(default=512, metadata={"help": "Longest sample in tokens (text is truncated, "
                                                                 "vision blocks never are)."})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "LR of the merger (None: learning_rate)."})
    vision_tower_lr: float | None = field(default=None, metadata={"help": "LR of the vision tower (None: learning_rate)."})
    loss_impl: str = field(
        default="auto",
        metadata={"help": "Training loss: auto (Liger's fused linear cross-entropy on CUDA with liger-kernel, else "
                          "chunked), chunked (plain PyTorch, never holds the full logits), liger, or model (the "
                          "model's own, full logits). Evaluation always uses the model's own.",
                  "choices": ["auto", "chunked", "liger", "model"]},
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "MoE models (Qwen3-VL-30B-A3B): weight of the router load-balancing loss added to the "
                          "loss (None: the checkpoint's value, 0.001 for the released ones). Dense models ignore it."},
    )
    lora_enable: bool = field(default=False, metadata={"help": "Train LoRA adapters on the LLM (train/lora.py)."})
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=128)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: str = field(
        default="auto",
        metadata={"help": "LLM linear layers that get adapters: comma-separated short names (q_proj,v_proj), "
                          "all-linear, or auto: the model family's default (every attention and MLP projection; "
                          "attention only for MoE models, whose experts are fused tensors)."},
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA."})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scale adapters by lora_alpha / sqrt(r)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: nf4 base weights (CUDA + bitsandbytes)."})
    logging_steps: float = field(
        default=10,
        metadata={"help": "Log the loss every N optimizer steps (transformers' default, 500, shows nothing in a "
                          "short run); step 1 is logged too (--logging_first_step)."},
    )
    logging_first_step: bool = field(default=True, metadata={"help": "Log the first step's loss."})
    # ---- flags of the transformers 4 era that guides still use: translated in __post_init__ (legacy_notes)
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "Warmup as a fraction of the training steps, in [0, 1). transformers 5 folded it into "
                          "--warmup_steps (a float below 1); kept so the original launch scripts run unchanged."},
    )
    evaluation_strategy: str | None = field(
        default=None, metadata={"help": "Old name of --eval_strategy (transformers 5 removed it); same meaning."},
    )
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Old flag (transformers 5 removed it): same as --train_sampling_strategy group_by_length."},
    )
    save_safetensors: bool | None = field(
        default=None,
        metadata={"help": "Old flag (transformers 5 removed it): checkpoints are always safetensors; True is "
                          "accepted, False refused."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in --output_dir: delete its checkpoint-* folders and finished-run record "
                          "instead of resuming from them (transformers 5 removed the flag; this is its meaning here)."},
    )
    logging_dir: str | None = field(
        default=None,
        metadata={"help": "Old flag (transformers 5 removed it): TensorBoard's log folder, passed on as "
                          "TENSORBOARD_LOGGING_DIR."},
    )

    def __post_init__(self) -> None:
        self.legacy_notes: list[str] = []
        if self.loss_impl not in ("auto", "chunked", "liger", "model"):
            raise ValueError(f"--loss_impl should be one of auto, chunked, liger or model but found {self.loss_impl!r}")
        if self.use_liger_kernel:
            # The Trainer applies Liger's kernels; its fused-loss forward would replace the model's forward and
            # bring the full logits back, so that part is ours (qwenvl/train/loss.py) and the rest is Liger's.
            if self.loss_impl not in ("auto", "liger"):
                raise ValueError(f"--use_liger_kernel with --loss_impl {self.loss_impl}: the fused loss is Liger's; "
                                 "drop one of them")
            self.loss_impl = "liger"
            self.liger_kernel_config = {**(self.liger_kernel_config or {}), "fused_linear_cross_entropy": False,
                                        "cross_entropy": False}
        self._translate_legacy_flags()
        self.deepspeed = _resolve_config_path(self.deepspeed, "--deepspeed")
        self.fsdp_config = _resolve_config_path(self.fsdp_config, "--fsdp_config")
        if self.fp16 and not _fp16_device_available(self.use_cpu):
            raise ValueError(
                "--fp16: float16 mixed precision needs a CUDA (or other accelerator) device; on CPU the loss "
                "underflows and the weights become NaN. Use --bf16 True (CPU supports bfloat16) or float32 "
                "(neither flag)."
            )
        super().__post_init__()

    def _translate_legacy_flags(self) -> None:
        """Map the transformers 4 flags onto their transformers 5 equivalents, noting each in ``legacy_notes``."""
        notes = self.legacy_notes
        if self.warmup_ratio is not None:
            if not 0.0 <= self.warmup_ratio < 1.0:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            if self.warmup_steps:
                raise ValueError("give --warmup_ratio or --warmup_steps, not both")
            self.warmup_steps = self.warmup_ratio
            notes.append(f"--warmup_ratio {self.warmup_ratio:g} -> --warmup_steps {self.warmup_ratio:g} "
                         "(transformers 5: a value below 1 is a fraction of the steps)")
        if self.evaluation_strategy is not None:
            given = str(getattr(self.eval_strategy, "value", self.eval_strategy))
            if given != "no" and given != self.evaluation_strategy:
                raise ValueError(f"--evaluation_strategy {self.evaluation_strategy} contradicts --eval_strategy "
                                 f"{given}; give only --eval_strategy")
            self.eval_strategy = self.evaluation_strategy
            notes.append(f"--evaluation_strategy {self.evaluation_strategy} -> --eval_strategy "
                         f"{self.evaluation_strategy}")
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
            notes.append("--group_by_length -> --train_sampling_strategy group_by_length")
        if self.save_safetensors is False:
            raise ValueError("--save_safetensors False: transformers 5 always saves safetensors; drop the flag "
                             "(torch.load-style .bin checkpoints are no longer written)")
        if self.save_safetensors:
            notes.append("--save_safetensors: always on in transformers 5 (flag ignored)")
        if self.logging_dir:
            os.environ["TENSORBOARD_LOGGING_DIR"] = self.logging_dir
            notes.append(f"--logging_dir {self.logging_dir} -> TENSORBOARD_LOGGING_DIR={self.logging_dir}")
        if self.overwrite_output_dir:
            notes.append("--overwrite_output_dir: earlier checkpoints and the finished-run record in --output_dir "
                         "are deleted; training starts from step 0")


def _fp16_device_available(use_cpu: bool) -> bool:
    """Whether float16 mixed precision can run: a CUDA/XPU/NPU device that the run will use."""
    if use_cpu:
        return False
    if torch.cuda.is_available():
        return True
    for name in ("xpu", "npu", "mlu", "musa"):
        backend = getattr(torch, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return True
    return False


def _resolve_config_path(value: Any, flag: str) -> Any:
    """A ``--deepspeed`` / ``--fsdp_config`` file: as given, else relative to the project root (or its scripts/).

    Inline JSON, dicts and None pass through unchanged.

    Raises:
        ValueError: no such file in any of those places; the message lists where it looked.

    Example:
        >>> _resolve_config_path("zero3.json", "--deepspeed")  # from any working directory
        '/path/to/project/zero3.json'
    """
    if not isinstance(value, str) or not value or value.lstrip().startswith("{") or os.path.isfile(value):
        return value
    if os.path.isabs(value):
        raise ValueError(f"{flag} {value}: no such file")
    candidates = [REPO_ROOT / value, REPO_ROOT / "scripts" / value]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    shipped = sorted(str(p.relative_to(REPO_ROOT)) for p in [*REPO_ROOT.glob("*.json"), *(REPO_ROOT / "scripts").glob("*.json")])
    raise ValueError(
        f"{flag} {value}: no such file in the working directory ({os.getcwd()}) nor in the project "
        f"({REPO_ROOT}, {REPO_ROOT / 'scripts'}); the project ships {', '.join(shipped)}"
    )


# ------------------------------------------------------------------- parsing
ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments)
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# Keys of a config file's `lora:` section -> TrainingArguments fields.
LORA_KEYS = {"enable": "lora_enable", "r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
             "target_modules": "lora_target_modules", "use_dora": "use_dora", "use_rslora": "use_rslora",
             "load_in_4bit": "load_in_4bit"}


def build_parser() -> transformers.HfArgumentParser:
    """The entry point's parser: the three dataclasses, abbreviations refused."""
    return transformers.HfArgumentParser(
        ARGUMENT_CLASSES,
        allow_abbrev=False,
        prog="train_qwen.py",
        description="Fine-tune Qwen2-VL / Qwen2.5-VL / Qwen3-VL. Flags, or a YAML/JSON config file first and "
                    "flags that override it: train_qwen.py config.yaml --learning_rate 1e-5",
    )


def argument_names() -> set[str]:
    """Every setting a flag or a config file may give."""
    return {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a YAML or JSON file: a flat mapping of flag names, plus an optional ``lora:`` section.

    The ``lora`` section's keys may drop the ``lora_`` prefix (``r``, ``alpha``, ``dropout``,
    ``target_modules`` as a list or a comma-separated string, ``enable``).

    Raises:
        ValueError: the file is not a mapping, or names a setting that does not exist (with close matches).

    Example:
        >>> load_config_file("examples/qwen2_5_vl_lora.yaml")["lora_r"]
        64
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings, found {type(data).__name__}")
    settings: dict[str, Any] = {}
    for key, value in data.items():
        if key == "lora" and isinstance(value, dict):
            for lora_key, lora_value in value.items():
                name = LORA_KEYS.get(lora_key, lora_key if lora_key.startswith("lora_") else f"lora_{lora_key}")
                if name == "lora_target_modules" and isinstance(lora_value, (list, tuple)):
                    lora_value = ",".join(str(v) for v in lora_value)
                settings[name] = lora_value
            if "lora_enable" not in settings:
                settings["lora_enable"] = True
        else:
            settings[key] = value
    known = argument_names()
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"config file {path}: unknown setting {key!r}{hint}")
    for key in ("dataset_use", "eval_dataset_use"):  # a YAML list of datasets is natural
        if isinstance(settings.get(key), (list, tuple)):
            settings[key] = ",".join(str(v) for v in settings[key])
    return settings


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Flags, or ``CONFIG.yaml|json [flags]``, into the three argument dataclasses.

    A flag given on the command line overrides the same setting in the file.

    Raises:
        ConfigError: an unknown or abbreviated flag, a bad config file or a bad value.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(CONFIG_SUFFIXES):
        settings = load_config_file(argv[0])
        argv = argv[1:]
        # Every value becomes the flag's default, so argparse converts strings the same way as on the
        # command line (e.g. "576*28*28", "1e-5") and a flag given after the file wins.
        parser.set_defaults(**{k: v if not isinstance(v, bool) else v for k, v in settings.items()})
    try:
        *outputs, remaining = parser.parse_args_into_dataclasses(
            args=argv, look_for_args_file=False, return_remaining_strings=True)
    except ConfigError:
        raise
    except ValueError as exc:  # a dataclass __post_init__ refused a value (flags and files alike)
        raise ConfigError(str(exc)) from exc
    if remaining:
        raise ConfigError(unknown_flags_message(remaining))
    return outputs[0], outputs[1], outputs[2]


def unknown_flags_message(remaining: list[str]) -> str:
    """``unknown flag --learning_rat (did you mean --learning_rate?)`` for what the parser did not take.

    Abbreviations are refused (``allow_abbrev=False``), so a prefix of a real flag lands here too.
    """
    known = sorted(f"--{name}" for name in argument_names())
    parts = []
    for token in remaining:
        if not token.startswith("--"):
            continue
        flag = token.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=2)
        parts.append(flag + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    if not parts:
        return f"unexpected values on the command line: {' '.join(remaining)}"
    return f"unknown flag {', '.join(parts)}; abbreviations are not accepted (see train_qwen.py --help)"
