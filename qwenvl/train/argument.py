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


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    model_max_length: int = field(default=512, metadata={"help": "Longest sample in tokens (text is truncated, "
                                                                 "vision blocks never are)."})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "LR of the merger (None: learning_rate)."})
    vision_tower_lr: float | None = field(default=None, metadata={"help": "LR of the vision tower (None: learning_rate)."})
    lora_enable: bool = field(default=False)
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=128)
    lora_dropout: float = field(default=0.05)
