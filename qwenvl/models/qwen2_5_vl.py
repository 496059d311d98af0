"""Qwen2.5-VL: the Qwen2-VL layout; video time steps scaled by seconds per grid step (absolute time)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwenvl.data.rope2d import get_rope_index_25
from qwenvl.models.qwen2_vl import (
    DEFAULT_SYSTEM_PROMPT,
    QWEN2_CHAT_TEMPLATE,
    QWEN2_VISION,
    Qwen2VLFamily,
    tiny_text_config,
    tiny_top_config,
)


@dataclass(frozen=True)
class Qwen25VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL: as Qwen2-VL, but ``t_index = floor(g * second_per_grid_t * tokens_per_second)``."""

    rope_index = staticmethod(get_rope_index_25)
    grounding_range = None  # absolute pixels of the resized image (the Qwen2.5-VL report's change)

    def tiny_config_kwargs(self, token_ids: dict[str, int]) -> dict[str, Any]:
        """Qwen2_5_VLConfig kwargs: vision depth 2, width 32, windows of 4x4 merged patches, block 1 full.

        Example:
            >>> QWEN2_5_VL.tiny_config_kwargs(ids)["text_config"]["rope_parameters"]["mrope_section"]
            [2, 3, 3]
        """
        text_config = tiny_text_config(token_ids)
        vision_config = {
            "depth": 2,
            "num_heads": 2,  # head_dim 16
            "in_channels": 3,
            "patch_size": self.vision_defaults.patch_size,
            "spatial_merge_size": self.vision_defaults.merge_size,
            "temporal_patch_size": self.vision_defaults.temporal_patch_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "hidden_act": "silu",
            "out_hidden_size": text_config["hidden_size"],
            "window_size": 112,  # pixels: 112 / 14 / 2 = 4x4 merged patches per window
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        }
        return tiny_top_config(text_config, vision_config, token_ids)


QWEN2_5_VL = Qwen25VLFamily(
    model_type="qwen2_5_vl",
    model_class_name="Qwen2_5_VLForConditionalGeneration",
    processor_class="Qwen2_5_VLProcessor",
    default_system_prompt=DEFAULT_SYSTEM_PROMPT,
    chat_template=QWEN2_CHAT_TEMPLATE,
    vision_defaults=QWEN2_VISION,
    uses_second_per_grid_ts=True,
)
