"""Qwen2-VL: patch 14, merge 2, CLIP normalisation, a default system prompt, one block per video."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qwenvl.data.rope2d import get_rope_index_2
from qwenvl.models.base import GridThw, ModelFamily, VisionSettings, tiny_text_config as base_tiny_text_config

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The released Qwen2-VL / Qwen2.5-VL image processor: patch 14, 56*56 to 28*28*16384 pixels.
QWEN2_VISION = VisionSettings(
    patch_size=14,
    merge_size=2,
    temporal_patch_size=2,
    image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD,
    min_pixels=56 * 56,
    max_pixels=28 * 28 * 16384,
    video_min_pixels=128 * 28 * 28,
    video_max_pixels=768 * 28 * 28,
    video_fps=2.0,
)

# Our own Jinja text for the Qwen2-VL layout. Every message becomes
# "<|im_start|>{role}\n{content}<|im_end|>\n"; a default system turn is added when the
# conversation does not start with one; image/video parts become
# "<|vision_start|><|image_pad|><|vision_end|>" (resp. <|video_pad|>), and the processor
# later expands each pad token to the right number of tokens.
QWEN2_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or part['type'] == 'video_url' -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}{{ render(message['content']) }}{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def tiny_text_config(token_ids: dict[str, int]) -> dict[str, Any]:
    """Text config of the tiny Qwen2/2.5-VL: the tiny Qwen2 (``qwenvl.models.base.tiny_text_config``) with mrope.

    Example:
        >>> tiny_text_config(ids)["rope_parameters"]["mrope_section"]
        [2, 3, 3]
    """
    return base_tiny_text_config(
        token_ids, model_type=None, use_cache=True, use_sliding_window=False, max_window_layers=2,
        # mrope: (temporal, height, width) sections of the rotary half-dim, head_dim/2 = 8;
        # the released [16, 24, 24] for head_dim 128, scaled down.
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
    )


def tiny_top_config(text_config: dict[str, Any], vision_config: dict[str, Any], token_ids: dict[str, int],
                    ) -> dict[str, Any]:
    """The top-level config kwargs around a text and a vision config (ids from the tokenizer)."""
    return {
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_id": token_ids["image_token_id"],
        "video_token_id": token_ids["video_token_id"],
        "vision_start_token_id": token_ids["vision_start_token_id"],
        "vision_end_token_id": token_ids["vision_end_token_id"],
        "tie_word_embeddings": False,
        "dtype": "float32",
    }


@dataclass(frozen=True)
class Qwen2VLFamily(ModelFamily):
    """Qwen2-VL: a video is one block of t*h*w/merge**2 pads; time is the grid index."""

    rope_index = staticmethod(get_rope_index_2)
    grounding_range = 1000  # boxes are normalised to [0, 1000) (Qwen2-VL report, section 2.2)

    def video_text(self, grid_thw: GridThw, merge_size: int, timestamps: Sequence[float] | None = None) -> str:
        """``<|vision_start|>`` + ``<|video_pad|>`` x (t*h*w / merge**2) + ``<|vision_end|>``; no timestamps.

        Example:
            >>> QWEN2_VL.video_text((2, 4, 4), 2).count("<|video_pad|>")
            8
        """
        return self.tokens.vision_start + self.tokens.video_pad * self.video_block_lengths(grid_thw, merge_size)[0] \
            + self.tokens.vision_end

    def video_block_lengths(self, grid_thw: GridThw, merge_size: int) -> list[int]:
        """One block of t*h*w / merge**2 pads."""
        t, h, w = (int(x) for x in grid_thw)
        return [t * h * w // merge_size**2]

    def tiny_config_kwargs(self, token_ids: dict[str, int]) -> dict[str, Any]:
        """Qwen2VLConfig kwargs: text as ``tiny_text_config``; vision depth 2, embed 32, heads 2.

        Example:
            >>> QWEN2_VL.tiny_config_kwargs(ids)["vision_config"]["hidden_size"]  # merger output = text width
            64
        """
        vision_config = {
            "depth": 2,
            "num_heads": 2,  # head_dim 16
            "in_channels": 3,
            "patch_size": self.vision_defaults.patch_size,
            "spatial_merge_size": self.vision_defaults.merge_size,
            "temporal_patch_size": self.vision_defaults.temporal_patch_size,
            "embed_dim": 32,
            "mlp_ratio": 4,
            "hidden_act": "quick_gelu",
            "hidden_size": 64,  # Qwen2-VL: merger output width = text hidden size
        }
        return tiny_top_config(tiny_text_config(token_ids), vision_config, token_ids)


QWEN2_VL = Qwen2VLFamily(
    model_type="qwen2_vl",
    model_class_name="Qwen2VLForConditionalGeneration",
    processor_class="Qwen2VLProcessor",
    default_system_prompt=DEFAULT_SYSTEM_PROMPT,
    chat_template=QWEN2_CHAT_TEMPLATE,
    vision_defaults=QWEN2_VISION,
)
