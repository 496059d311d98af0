"""Command-line arguments: the three dataclasses HfArgumentParser reads, and how they are parsed.

``parse_args`` reads flags, or YAML/JSON config files (and folders of them) followed by flags that
override them (``train_qwen.py configs/ --learning_rate 1e-5``, ``--config FILE`` repeatable); the
file kinds (train, model, collator, PEFT) are read by ``qwenvl/train/config_files.py``. Abbreviated
flags are refused. Flags that guides written for transformers 4 use
(``--evaluation_strategy``, ``--group_by_length``, ``--save_safetensors``,
``--overwrite_output_dir``, ``--logging_dir``, ``--warmup_ratio``) are
accepted and translated; ``TrainingArguments.legacy_notes`` says what each became.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from qwenvl.data.sources import set_row_format
from qwenvl.train.config_files import (
    ConfigError, LoadedConfigs, check_message_format, load_config_files, unknown_key_hint,
)
from qwenvl.train.launch import single_process_env

REPO_ROOT = Path(__file__).resolve().parents[2]



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
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Accept a model config file whose model_classes name an import_path other than "
                          "transformers (Qwen-VL checkpoints always load with transformers' own classes)."},
    )
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
    train_on_prompt: bool = field(
        default=False,
        metadata={"help": "Learn the prompt too: system and user turns get labels like the answers (a collator "
                          "file's label_masking.mask_input_tokens false). Image and video tokens are never learned."},
    )
    image_resize_mode: str = field(
        default="keep_aspect",
        metadata={"help": "Applied before the model's own resize (smart_resize): keep_aspect (the longer side to at "
                          "most --image_max_size), crop (the centre square, its side at most --image_max_size) or "
                          "stretch (to --image_max_size x --image_max_size).",
                  "choices": ["keep_aspect", "crop", "stretch"]},
    )
    image_max_size: int | None = field(
        default=None, metadata={"help": "Pixels of the longer side (keep_aspect), or of the square side (crop, "
                                        "stretch) before smart_resize; None: no limit (stretch needs one)."})
    video_max_duration: float | None = field(
        default=None, metadata={"help": "Seconds of each video that are sampled (from its start); None: all."})
    video_backend: str | None = field(
        default=None, metadata={"help": "Video decoder: decord, pyav or torchcodec (None: $QWENVL_VIDEO_BACKEND, "
                                        "else the first that imports); sets $QWENVL_VIDEO_BACKEND."})
    image_data: bool = field(
        default=True, metadata={"help": "Train on samples with images; False refuses datasets that hold some "
                                        "(counted, before the model loads)."})
    video_data: bool = field(
        default=True, metadata={"help": "Train on samples with videos; False refuses datasets that hold some."})
    dataset_columns: str = field(
        default="",
        metadata={"help": "JSON column mapping for every --dataset_use source without its own registry \"columns\": "
                          "record key (image, video, question, answer, context, ...) -> your column, e.g. "
                          "'{\"image\": \"image_path\", \"question\": \"query\", \"answer\": \"response\"}'."},
    )
    message_format: str = field(
        default="",
        metadata={"help": "JSON message template rendered per row into the conversation ({system_prompt, messages: "
                          "[{role, content: [{type: text|image|video, text}]}]}, text with {question_column}-style "
                          "placeholders); a collator file's message_format writes it."},
    )
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
        self._check_config_data_flags()

    def _check_config_data_flags(self) -> None:
        """The flags a collator config file writes: resize mode, durations, JSON mapping and template."""
        if self.image_resize_mode not in ("keep_aspect", "crop", "stretch"):
            raise ValueError(f"image_resize_mode should be one of keep_aspect, crop or stretch but found "
                             f"{self.image_resize_mode!r}")
        if self.image_max_size is not None and self.image_max_size < 1:
            raise ValueError(f"image_max_size must be positive (or None), got {self.image_max_size}")
        if self.image_resize_mode == "stretch" and self.image_max_size is None:
            raise ValueError("image_resize_mode stretch needs image_max_size (the square side to stretch to)")
        if self.video_max_duration is not None and not self.video_max_duration > 0:
            raise ValueError(f"video_max_duration must be positive seconds (or None), got {self.video_max_duration}")
        for name in ("dataset_columns", "message_format"):
            value = getattr(self, name)
            if isinstance(value, dict):
                value = json.dumps(value, sort_keys=True)
                setattr(self, name, value)
            if value:
                try:
                    parsed = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{name} must be JSON, got {value!r}: {exc}") from None
                if not isinstance(parsed, dict):
                    raise ValueError(f"{name} must be a JSON object, got {value!r}")
        if self.message_format:
            check_message_format(json.loads(self.message_format), "--message_format")

    def row_format(self) -> tuple[dict[str, str], dict[str, Any] | None]:
        """(column mapping, message template) of ``--dataset_columns`` / ``--message_format``."""
        template = check_message_format(json.loads(self.message_format), "--message_format") \
            if self.message_format else None
        return (json.loads(self.dataset_columns) if self.dataset_columns else {}), template


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
    loss_average: str = field(
        default="token",
        metadata={"help": "How an optimizer step averages the loss: token (every learned token of the accumulated "
                          "batch, over all ranks, weighs the same: the loss of one big batch) or micro_batch (the "
                          "original's: the mean of each micro-batch's token mean, so tokens of short micro-batches "
                          "weigh more).",
                  "choices": ["token", "micro_batch"]},
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
    lora_bias: str = field(
        default="none",
        metadata={"help": "Biases trained with the adapters (peft's bias): none, lora_only or all.",
                  "choices": ["none", "lora_only", "all"]},
    )
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
        if self.loss_average not in ("token", "micro_batch"):
            raise ValueError(f"--loss_average should be one of token or micro_batch but found {self.loss_average!r}")
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
        # --deepspeed / --fsdp / --ddp_backend started with plain python: torchrun's 1-process environment,
        # set before super() builds the distributed state (qwenvl/train/launch.py).
        self.launch_note = single_process_env(self)
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


def build_parser() -> transformers.HfArgumentParser:
    """The entry point's parser: the three dataclasses (and ``--config``), abbreviations refused."""
    parser = transformers.HfArgumentParser(
        ARGUMENT_CLASSES,
        allow_abbrev=False,
        prog="train_qwen.py",
        description="Fine-tune Qwen2-VL / Qwen2.5-VL / Qwen3-VL. Flags, or YAML/JSON config files (train, model, "
                    "collator and PEFT files, in any order, or a folder of them; also --config FILE, repeatable) "
                    "and flags that override them: train_qwen.py configs/ --learning_rate 1e-5",
    )
    # Taken out of the command line by split_config_args before parsing; here for --help only.
    parser.add_argument("--config", action="append", default=argparse.SUPPRESS, metavar="FILE_OR_FOLDER",
                        help="A config file (train, model, collator or PEFT YAML/JSON) or a folder of them; "
                             "repeatable, later files override earlier ones, flags override files.")
    return parser


def argument_names() -> set[str]:
    """Every setting a flag or a config file may give."""
    return {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from one YAML or JSON file of any kind (``qwenvl/train/config_files.py``), as flag name -> value.

    A train file is a flat mapping of flag names, plus an optional ``lora:`` section whose keys may
    drop the ``lora_`` prefix (``r``, ``alpha``, ``dropout``, ``target_modules`` as a list or a
    comma-separated string, ``enable``) or be ``peft.LoraConfig`` fields.

    Raises:
        ConfigError: the file is not a mapping, or names a setting that does not exist (with the closest one).

    Example:
        >>> load_config_file("examples/qwen2_5_vl_lora.yaml")["lora_r"]
        64
    """
    return load_config_files([str(path)], argument_names()).settings


def split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Config files and folders of a command line, and the flags left.

    Config items are the leading arguments that are not flags (``train_qwen.py configs/ model.yaml ...``)
    and every ``--config PATH`` (or ``--config=PATH``), in the order given.

    Example:
        >>> split_config_args(["a.yaml", "configs/", "--config", "b.yaml", "--learning_rate", "1e-5"])
        (['a.yaml', 'configs/', 'b.yaml'], ['--learning_rate', '1e-5'])
    """
    items: list[str] = []
    rest: list[str] = []
    position = 0
    while position < len(argv) and not argv[position].startswith("-"):
        items.append(argv[position])
        position += 1
    while position < len(argv):
        token = argv[position]
        if token == "--config":
            if position + 1 >= len(argv) or argv[position + 1].startswith("--"):
                raise ConfigError("--config needs a file or folder, e.g. --config configs/train_config.yaml")
            items.append(argv[position + 1])
            position += 2
            continue
        if token.startswith("--config="):
            items.append(token.split("=", 1)[1])
        else:
            rest.append(token)
        position += 1
    return items, rest


def non_default_values(parsed: tuple[Any, ...]) -> dict[str, str]:
    """Setting name -> its value as text, for the settings whose value differs from the field's default."""
    values = {}
    for instance in parsed:
        for f in dataclasses.fields(instance):
            if not f.init or not hasattr(instance, f.name):
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            value = getattr(instance, f.name)
            if str(getattr(value, "value", value)) != str(getattr(default, "value", default)):
                values[f.name] = str(getattr(value, "value", value))
    return values


def command_line_origins(flags: list[str], loaded: LoadedConfigs) -> dict[str, str]:
    """Which file (or the command line) set each setting; a flag overriding a file says so."""
    origins = dict(loaded.origins)
    known = argument_names()
    for token in flags:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            if name in known:
                origins[name] = "command line" + (f" (over {loaded.origins[name]})" if name in loaded.origins else "")
    return origins


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Flags, or ``CONFIG... [--config CONFIG]... [flags]``, into the three argument dataclasses.

    Config items are files (YAML/JSON of any kind: train, model, collator, PEFT) or folders of them,
    read in the order given; a later file overrides an earlier one and a flag on the command line
    overrides every file. ``training_args.config_origins`` records where each setting came from,
    ``training_args.config_notes`` what a file key was translated to, and ``model_args.model_classes``
    a model file's classes (checked against the checkpoint by ``config_files.check_run``).

    Raises:
        ConfigError: an unknown or abbreviated flag, a bad config file or a bad value.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    items, argv = split_config_args(argv)
    loaded = load_config_files(items, argument_names()) if items else LoadedConfigs()
    if loaded.settings:
        # Every value becomes the flag's default, so argparse converts strings the same way as on the
        # command line (e.g. "576*28*28", "1e-5") and a flag given after the files wins.
        parser.set_defaults(**loaded.settings)
    try:
        *outputs, remaining = parser.parse_args_into_dataclasses(
            args=argv, look_for_args_file=False, return_remaining_strings=True)
    except ConfigError:
        raise
    except ValueError as exc:  # a dataclass __post_init__ refused a value (flags and files alike)
        raise ConfigError(str(exc)) from exc
    if remaining:
        raise ConfigError(unknown_flags_message(remaining))
    model_args, data_args, training_args = outputs
    try:
        # The run's row format: applied to every source resolved from now on (qwenvl/data/sources.py), so
        # preflight, the datasets and the tools read the same records. Parsing again replaces it.
        set_row_format(*data_args.row_format())
    except ValueError as exc:
        raise ConfigError(f"--dataset_columns: {exc}") from None
    if data_args.video_backend:  # the decoder qwenvl/data/video.py picks (DataLoader workers inherit it)
        os.environ["QWENVL_VIDEO_BACKEND"] = data_args.video_backend
    training_args.config_files = list(loaded.files)
    values = non_default_values((model_args, data_args, training_args))
    training_args.config_origins = {name: origin for name, origin in command_line_origins(argv, loaded).items()
                                    if name in values}
    training_args.config_values = {name: values[name] for name in training_args.config_origins}
    training_args.config_notes = list(loaded.notes)
    model_args.model_classes = dict(loaded.model_classes)
    model_args.model_classes_file = loaded.model_classes_file
    return model_args, data_args, training_args


def unknown_flags_message(remaining: list[str]) -> str:
    """``unknown flag --learning_rat (did you mean --learning_rate?)`` for what the parser did not take.

    Only a close flag is suggested (``config_files.SIMILARITY``); a name other tools use gets what it is
    here (``--mask_input_tokens`` -> ``--train_on_prompt``). Abbreviations are refused
    (``allow_abbrev=False``), so a prefix of a real flag lands here too.
    """
    known = argument_names()
    parts = []
    for token in remaining:
        if not token.startswith("--"):
            continue
        flag = token.split("=", 1)[0]
        hint = unknown_key_hint(flag, known, flag_style=True)
        parts.append(flag + (f" ({hint[2:]})" if hint else ""))
    if not parts:
        return f"unexpected values on the command line: {' '.join(remaining)}"
    return f"unknown flag {', '.join(parts)}; abbreviations are not accepted (see train_qwen.py --help)"
