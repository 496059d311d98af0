"""LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf``): ``LlavaForConditionalGeneration`` + ``LlavaProcessor``.

A CLIP ViT-L/14-336 tower, a two-layer GELU projector and a Llama/Vicuna LLM. Each image is resized to 336 on
its short side and centre-cropped to 336 x 336 (CLIP image processor); the processor writes 576 ``<image>``
tokens per image (24 x 24 patches, CLS dropped). The chat layout is the released llava-hf one,
``{system} USER: <image>\\n{question} ASSISTANT: {answer}``, each answer closed by the tokenizer's eos, as
LLaVA-1.5 was trained (Vicuna v1: ``</s>`` after every answer); no default system prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwenvl.models.base import VisionSettings, tiny_text_config
from qwenvl.models.hf_family import HFProcessorFamily, ProcessorTokens, tiny_vision_config

# The released llava-hf layout (images first in a turn, then its text), each answer ending with eos_token.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + eos_token }}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

IMAGE_SIZE = 336  # CLIP ViT-L/14-336
PATCH_SIZE = 14
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

LLAVA_VISION = VisionSettings(
    patch_size=PATCH_SIZE, merge_size=1, temporal_patch_size=1, image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD, min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE,
    video_min_pixels=IMAGE_SIZE * IMAGE_SIZE, video_max_pixels=IMAGE_SIZE * IMAGE_SIZE,
)


# What LlavaProcessor / LlavaNextProcessor need to count a CLIP tower's image tokens (its CLS token dropped).
CLIP_PROCESSOR_SETTINGS = {"patch_size": PATCH_SIZE, "vision_feature_select_strategy": "default",
                           "num_additional_image_tokens": 1}


def tiny_llava_config(token_ids: dict[str, int], image_size: int, **settings: Any) -> dict[str, Any]:
    """The config kwargs of a tiny LLaVA-style checkpoint (LLaVA-1.5, LLaVA-NeXT): a CLIP tower of depth 2, width
    32 at ``image_size`` / 14, read at layer -2 without its CLS token, a GELU projector, a Qwen2 LLM of hidden 64,
    2 layers (``tiny_text_config``), and the family's further ``settings``.

    Args:
        token_ids (dict[str, int]): the tokenizer's ids (``image_token_id``, bos / eos / pad).
        image_size (int): the tower's input side (a tile of LLaVA-NeXT).
        **settings (Any): further config kwargs, or replacements (``text_config``).

    Returns:
        dict[str, Any]: the config kwargs.
    """
    return {
        "text_config": tiny_text_config(token_ids, max_position_embeddings=4096),  # released: llama
        "vision_config": tiny_vision_config("clip_vision_model", patch_size=PATCH_SIZE, image_size=image_size,
                                            projection_dim=32),
        "image_token_index": token_ids["image_token_id"],
        "image_seq_length": (image_size // PATCH_SIZE) ** 2,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",  # CLS dropped
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
        "dtype": "float32",
        **settings,
    }


@dataclass(frozen=True)
class LlavaFamily(HFProcessorFamily):
    """LLaVA-1.5: one 336 x 336 crop per image, 576 image tokens, grounding boxes relative 0-1 of the image."""

    grounding_range = 1  # LLaVA-1.5's boxes: [x1, y1, x2, y2] as fractions of the (square) image

    def tiny_config_kwargs(self, token_ids: dict[str, int]) -> dict[str, Any]:
        """LlavaConfig kwargs: CLIP tower depth 2, width 32, at 336/14; a Qwen2 LLM of hidden 64, 2 layers
        (``tiny_llava_config``).

        Example:
            >>> LLAVA.tiny_config_kwargs(ids)["image_seq_length"]
            576
        """
        return tiny_llava_config(token_ids, IMAGE_SIZE)

    def tiny_processor(self, tokenizer: Any) -> Any:
        """A ``LlavaProcessor`` of the released settings around ``tokenizer`` (which must know ``<image>``)."""
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
        )
        return self.tiny_processor_around(tokenizer, image_processor, image_token=self.tokens.image,
                                          **CLIP_PROCESSOR_SETTINGS)


LLAVA = LlavaFamily(
    model_type="llava",
    model_class_name="LlavaForConditionalGeneration",
    processor_class="LlavaProcessor",
    default_system_prompt=None,
    chat_template=LLAVA_CHAT_TEMPLATE,
    vision_defaults=LLAVA_VISION,
    tokens=ProcessorTokens(image="<image>", reserved=("<s>", "</s>")),
    image_processor_class="CLIPImageProcessorPil",
)
