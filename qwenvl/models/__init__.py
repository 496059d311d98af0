"""Model families: one object per supported ``model_type``, found from the checkpoint's config.

Adding a family is one new file (a ``ModelFamily`` subclass or instance) and one line in
``FAMILIES``.

Example:
    >>> family_for("qwen3_vl_moe").model_class_name
    'Qwen3VLMoeForConditionalGeneration'
"""

from __future__ import annotations

from typing import Any

from qwenvl.models.base import LLM, PROJECTOR, VISION_TOWER, ModelFamily, SpecialTokens, TokenIds, VisionSettings
from qwenvl.models.gemma3 import GEMMA3
from qwenvl.models.idefics3 import IDEFICS3, SMOLVLM
from qwenvl.models.internvl import INTERNVL
from qwenvl.models.llava import LLAVA
from qwenvl.models.llava_next import LLAVA_NEXT
from qwenvl.models.llava_onevision import LLAVA_ONEVISION
from qwenvl.models.paligemma import PALIGEMMA
from qwenvl.models.qwen2_5_vl import QWEN2_5_VL
from qwenvl.models.qwen2_vl import QWEN2_VL
from qwenvl.models.qwen3_vl import QWEN3_VL, QWEN3_VL_MOE

__all__ = [
    "DEFAULT_MODEL_TYPE", "FAMILIES", "LLM", "PROJECTOR", "VISION_TOWER", "ModelFamily", "SpecialTokens", "TokenIds",
    "VisionSettings", "family_for",
]

# The family of callers that name none (the behaviour before families existed).
DEFAULT_MODEL_TYPE = "qwen2_5_vl"

FAMILIES: dict[str, ModelFamily] = {
    "qwen2_vl": QWEN2_VL,
    "qwen2_5_vl": QWEN2_5_VL,
    "qwen3_vl": QWEN3_VL,
    "qwen3_vl_moe": QWEN3_VL_MOE,
    # the HF-processor kind (qwenvl/models/hf_family.py): one line per family
    "llava": LLAVA,
    "llava_next": LLAVA_NEXT,
    "llava_onevision": LLAVA_ONEVISION,
    "internvl": INTERNVL,
    "paligemma": PALIGEMMA,
    "idefics3": IDEFICS3,
    "smolvlm": SMOLVLM,
    "gemma3": GEMMA3,
}


def family_for(config_or_model_type: Any) -> ModelFamily:
    """The family of a checkpoint, from its config (or its ``model_type`` string).

    Args:
        config_or_model_type (Any): a transformers config, a config dict, or ``model_type``.

    Returns:
        ModelFamily: the registered family.

    Raises:
        ValueError: the model type is not registered (the message lists the supported ones).

    Example:
        >>> family_for(AutoConfig.from_pretrained("Qwen/Qwen3-VL-8B-Instruct")).model_type
        'qwen3_vl'
    """
    if isinstance(config_or_model_type, str):
        model_type = config_or_model_type
    elif isinstance(config_or_model_type, dict):
        model_type = config_or_model_type.get("model_type")
    else:
        model_type = getattr(config_or_model_type, "model_type", None)
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ValueError(f"model_type should be one of {', '.join(FAMILIES)} but found {model_type!r}")
    return family
