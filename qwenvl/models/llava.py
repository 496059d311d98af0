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

from qwenvl.models.base import VisionSettings
from qwenvl.models.hf_family import HFProcessorFamily, ProcessorTokens

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


@dataclass(frozen=True)
class LlavaFamily(HFProcessorFamily):
    """LLaVA-1.5: one 336 x 336 crop per image, 576 image tokens, grounding boxes relative 0-1 of the image."""

    grounding_range = 1  # LLaVA-1.5's boxes: [x1, y1, x2, y2] as fractions of the (square) image

    def tiny_config_kwargs(self, token_ids: dict[str, int]) -> dict[str, Any]:
        """LlavaConfig kwargs: CLIP tower depth 2, width 32, at 336/14; a Qwen2 LLM of hidden 64, 2 layers.

        Example:
            >>> LLAVA.tiny_config_kwargs(ids)["image_seq_length"]
            576
        """
        text_config = {
            "model_type": "qwen2",  # the shipped Qwen tokenizer's LLM; released checkpoints: llama
            "vocab_size": 151936,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,  # head_dim 16
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "bos_token_id": token_ids["bos_token_id"],
            "eos_token_id": token_ids["eos_token_id"],
            "pad_token_id": token_ids["pad_token_id"],
            "dtype": "float32",
        }
        vision_config = {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": PATCH_SIZE,
            "image_size": IMAGE_SIZE,
            "projection_dim": 32,
        }
        return {
            "text_config": text_config,
            "vision_config": vision_config,
            "image_token_index": token_ids["image_token_id"],
            "image_seq_length": (IMAGE_SIZE // PATCH_SIZE) ** 2,
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",  # CLS dropped
            "projector_hidden_act": "gelu",
            "tie_word_embeddings": False,
            "dtype": "float32",
        }

    def tiny_processor(self, tokenizer: Any) -> Any:
        """A ``LlavaProcessor`` of the released settings around ``tokenizer`` (which must know ``<image>``)."""
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
        )
        return LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=self.chat_template, image_token=self.tokens.image,
        )


LLAVA = LlavaFamily(
    model_type="llava",
    model_class_name="LlavaForConditionalGeneration",
    processor_class="LlavaProcessor",
    default_system_prompt=None,
    chat_template=LLAVA_CHAT_TEMPLATE,
    vision_defaults=LLAVA_VISION,
    vision_module="vision_tower",
    projector_modules=("multi_modal_projector",),
    tokens=ProcessorTokens(image="<image>", reserved=("<s>", "</s>")),
    image_processor_class="CLIPImageProcessorPil",
)
