"""Command-line arguments: the three dataclasses HfArgumentParser reads."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import transformers

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
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:
        return "sdpa"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="Qwen/Qwen2.5-VL-3B-Instruct")
    tune_mm_llm: bool = field(default=False, metadata={"help": "Train the language model (and lm_head)."})
    tune_mm_mlp: bool = field(default=False, metadata={"help": "Train the vision-language merger (projector)."})
    tune_mm_vision: bool = field(default=False, metadata={"help": "Train the vision tower."})
    attn_implementation: str = field(
        default_factory=_default_attn,
        metadata={"help": "flash_attention_2 (default when flash-attn is installed), sdpa or eager."},
    )


@dataclass
class DataArguments:
    dataset_use: str = field(default="", metadata={"help": "Comma-separated registry names, each optionally name%N."})
    eval_dataset_use: str = field(default="", metadata={"help": "Registry names for the eval set (same syntax)."})
    data_flatten: bool = field(default=False, metadata={"help": "Concatenate each micro-batch into one row."})
    data_packing: bool = field(default=False, metadata={"help": "dataset_use names files from tools/pack_data.py."})
    base_interval: float = field(default=2, metadata={"help": "Seconds between sampled video frames."})
    max_pixels: PixelCount = field(default=PixelCount(576 * 28 * 28), metadata={"help": "e.g. 576*28*28"})
    min_pixels: PixelCount = field(default=PixelCount(16 * 28 * 28), metadata={"help": "e.g. 16*28*28"})
    video_max_frames: int = field(default=8)
    video_min_frames: int = field(default=4)
    video_max_frame_pixels: PixelCount = field(default=PixelCount(32 * 28 * 28))
    video_min_frame_pixels: PixelCount = field(default=PixelCount(4 * 28 * 28))
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
        for name in ("max_pixels", "min_pixels", "video_max_frame_pixels", "video_min_frame_pixels"):
            setattr(self, name, PixelCount(getattr(self, name)))
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
    lora_enable: bool = field(default=False, metadata={"help": "Train LoRA adapters on the LLM (train/lora.py)."})
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=128)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "LLM linear layers that get adapters (comma-separated short names) or all-linear."},
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA."})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scale adapters by lora_alpha / sqrt(r)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: nf4 base weights (CUDA + bitsandbytes)."})
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "Warmup as a fraction of the training steps, in [0, 1). transformers 5 folded it into "
                          "--warmup_steps (a float below 1); kept so the original launch scripts run unchanged."},
    )

    def __post_init__(self) -> None:
        if self.warmup_ratio is not None:
            if not 0.0 <= self.warmup_ratio < 1.0:
                raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            if self.warmup_steps:
                raise ValueError("give --warmup_ratio or --warmup_steps, not both")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()
