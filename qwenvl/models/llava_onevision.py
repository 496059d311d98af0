"""LLaVA-OneVision (``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``, ``-7b-ov-hf``):
``LlavaOnevisionForConditionalGeneration`` + ``LlavaOnevisionProcessor``.

What differs for a user:

- A SigLIP-so400m tower at 384 x 384 (patch 14: 729 features per tile, all kept), a two-layer GELU projector and
  a Qwen2 LLM; normalisation mean = std = 0.5.
- A sample with ONE image is tiled "anyres_max_9": the best of ``image_grid_pinpoints`` (384 x 384 ... 2304 x 2304,
  multiples of 384) for its size, cut into 384-pixel tiles after a whole-image tile; when the tiles' features
  outnumber 9 tiles' worth they are shrunk (bilinear) to about that many, a newline token closing each row. A
  sample with SEVERAL images gets one padded-to-square 384 x 384 tile per image (729 features + 1 newline each):
  the processor reads this from the images per sample (``batch_num_images``, kept in the item and concatenated
  by the collator), as the model does.
- ``pixel_values`` (images, tiles, 3, 384, 384), zero-padded to the most tiles of the call, and ``image_sizes``
  (images, 2) as LLaVA-NeXT; a batch pads the items' tiles alike (``collate_media``).
- ``image_newline`` trains with the projector (``--tune_mm_mlp``).
- Chat layout: the released template, ``<|im_start|>user <image>\\n{question}<|im_end|><|im_start|>assistant
  \\n{answer}<|im_end|>`` (a space after each role, no newline between turns), generation prompt
  ``<|im_start|>assistant\\n``; learned: each answer and its ``<|im_end|>``. No default system prompt (a system
  turn: ``<|im_start|>system \\n{system}<|im_end|>``).
- Grounding boxes in answers: relative 0-1 of the image (``[x1, y1, x2, y2]``), as in LLaVA-OneVision's data.
- Video: not trained yet (a counted bad sample) — its video processor (``LlavaOnevisionVideoProcessor``) needs
  torchvision, an optional GPU extra; flattened batches / packing: refused at start-up (1-D
  positions from the attention mask).
- Without torchvision transformers cannot build a ``LlavaOnevisionProcessor``: ``LLAVA_ONEVISION.load_processor``
  then builds ``LlavaOnevisionImageTextProcessor``, the same processor without the video part, from the folder's
  tokenizer, PIL image processor and chat template (``qwenvl.models.hf_family.image_text_processor_class``).
  Saved folders (tiny checkpoint, trained runs) name ``LlavaOnevisionProcessor`` as released ones do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qwenvl.models.base import VisionSettings, tiny_text_config
from qwenvl.models.hf_family import TORCHVISION_VIDEO_REFUSAL, AnyresFamily, ProcessorTokens, tiny_vision_config
from qwenvl.models.llava import PATCH_SIZE

# The released llava-hf OneVision template: every turn ``<|im_start|>{role} `` + its images + ``\n{text}`` per text
# part + ``<|im_end|>``; the generation prompt ``<|im_start|>assistant\n``.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

IMAGE_SIZE = 384  # SigLIP so400m-patch14-384
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# (height, width): every multiple of the tile from 1 x 1 to 6 x 6 tiles, as released.
IMAGE_GRID_PINPOINTS = tuple((IMAGE_SIZE * i, IMAGE_SIZE * j) for i in range(1, 7) for j in range(1, 7))
VISION_ASPECT_RATIO = "anyres_max_9"

# The tiny checkpoint tiles at 112 pixels (8 x 8 patches of 14, 64 features per tile), pinpoints 112 x 112 ...
# 672 x 672: the same tiling, anyres_max_9 shrinking and newline rule, far shorter sequences.
TINY_TILE = 112
TINY_GRID_PINPOINTS = tuple((TINY_TILE * i, TINY_TILE * j) for i in range(1, 7) for j in range(1, 7))

LLAVA_ONEVISION_VISION = VisionSettings(
    patch_size=PATCH_SIZE, merge_size=1, temporal_patch_size=1, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
    min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=max(h * w for h, w in IMAGE_GRID_PINPOINTS),
    video_min_pixels=IMAGE_SIZE * IMAGE_SIZE, video_max_pixels=IMAGE_SIZE * IMAGE_SIZE,
)


@dataclass(frozen=True)
class LlavaOnevisionFamily(AnyresFamily):
    """LLaVA-OneVision: anyres_max_9 tiles for a single image, one tile per image of a multi-image sample."""

    grounding_range = 1  # boxes [x1, y1, x2, y2] as fractions of the image

    def tiled_feature_kwargs(self, device: torch.device | str) -> dict[str, Any]:
        """``batch_num_images`` 1: the dummy image is a single-image sample (tiled anyres_max_9)."""
        return {"batch_num_images": torch.tensor([1], device=device)}

    def end_of_turn(self, tokenizer: Any) -> str | None:
        """``<|im_end|>``, which closes every turn of the layout (Qwen2's end of turn)."""
        return "<|im_end|>"

    def processor_images(self, images: Sequence[Any]) -> Any:
        """``[images]``: one sample's images nested, so the processor tiles a lone image and gives each image of a
        multi-image sample one tile (``batch_num_images``), as OneVision was trained; None without images."""
        return [list(images)] if images else None

    def tiny_added_tokens(self) -> tuple[str, ...]:
        """``<image>`` and ``<video>`` (the processor looks both up)."""
        return (self.tokens.image, "<video>")

    def tiny_config_kwargs(self, token_ids: dict[str, int]) -> dict[str, Any]:
        """LlavaOnevisionConfig kwargs: SigLIP tower depth 2, width 32, patch 14 on 112-pixel tiles (``TINY_TILE``,
        no pooling head, as released), its pinpoints; a Qwen2 LLM of hidden 64, 2 layers.

        Example:
            >>> LLAVA_ONEVISION.tiny_config_kwargs(ids)["image_grid_pinpoints"][-1]
            [672, 672]
        """
        vision_config = tiny_vision_config("siglip_vision_model", patch_size=PATCH_SIZE, image_size=TINY_TILE,
                                           vision_use_head=False)
        return {
            "text_config": tiny_text_config(token_ids),
            "vision_config": vision_config,
            "image_token_index": token_ids["image_token_id"],
            "video_token_index": token_ids["<video>"],
            "image_grid_pinpoints": [list(hw) for hw in TINY_GRID_PINPOINTS],
            "vision_aspect_ratio": VISION_ASPECT_RATIO,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "projector_hidden_act": "gelu",
            "tie_word_embeddings": False,
            "dtype": "float32",
        }

    def tiny_processor(self, tokenizer: Any) -> Any:
        """A ``LlavaOnevisionImageTextProcessor`` (``LlavaOnevisionProcessor`` without the video processor, which
        needs torchvision) of the released settings at the tiny tile size (PIL image processor) around
        ``tokenizer``, with the video processor's settings (``LlavaOnevisionVideoProcessor`` at the tile size):
        saved, it names ``LlavaOnevisionProcessor`` as a released checkpoint does."""
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": TINY_TILE, "width": TINY_TILE},
            image_grid_pinpoints=[list(hw) for hw in TINY_GRID_PINPOINTS],
            image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD), do_pad=True,
        )
        video = {"size": {"height": TINY_TILE, "width": TINY_TILE}, "image_mean": list(SIGLIP_MEAN),
                 "image_std": list(SIGLIP_STD)}
        return self.tiny_processor_around(
            tokenizer, image_processor, video, num_image_tokens=(TINY_TILE // PATCH_SIZE) ** 2,
            vision_feature_select_strategy="full", vision_aspect_ratio=VISION_ASPECT_RATIO,
            image_token=self.tokens.image, video_token="<video>")


LLAVA_ONEVISION = LlavaOnevisionFamily(
    model_type="llava_onevision",
    model_class_name="LlavaOnevisionForConditionalGeneration",
    processor_class="LlavaOnevisionProcessor",
    default_system_prompt=None,
    chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
    vision_defaults=LLAVA_ONEVISION_VISION,
    projector_modules=("multi_modal_projector", "image_newline"),
    tokens=ProcessorTokens(image="<image>", reserved=("<|im_start|>", "<|im_end|>")),
    image_processor_class="LlavaOnevisionImageProcessorPil",
    torchvision_video=True,
    video_refusal=TORCHVISION_VIDEO_REFUSAL,
)
