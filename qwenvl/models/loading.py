"""Loading what a checkpoint holds: the model class of its family and its image processor.

Training (``qwenvl/train/train_qwen.py``), LoRA merging and the tools all load through here,
so none of them imports the training entry point for a helper.
"""

from __future__ import annotations

from typing import Any

from qwenvl.models import FAMILIES, family_for


def model_class_for(config: Any) -> type:
    """The model class of the checkpoint's family, from its config's ``model_type`` (never its path).

    Raises:
        ValueError: the model type is not supported (the message lists the supported ones).

    Example:
        >>> model_class_for(AutoConfig.from_pretrained("tiny_model/qwen3_vl_moe")).__name__
        'Qwen3VLMoeForConditionalGeneration'
    """
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    try:
        family = family_for(config)
    except ValueError:
        raise ValueError(f"model_type {model_type!r} is not supported; expected one of {', '.join(FAMILIES)}") from None
    return family.model_class()


def load_image_processor(path: str, cache_dir: str | None = None) -> Any:
    """The checkpoint's image processor; the PIL backend when torchvision is missing."""
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(path, cache_dir=cache_dir)
    except (ImportError, ValueError, OSError):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(path, cache_dir=cache_dir)
