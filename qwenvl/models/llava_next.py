"""LLaVA-NeXT / LLaVA-1.6 (``llava-hf/llava-v1.6-mistral-7b-hf``): ``LlavaNextForConditionalGeneration`` +
``LlavaNextProcessor``.

What differs for a user from LLaVA-1.5 (``qwenvl/models/llava.py``):

- Images are tiled ("anyres"): the image processor picks the best of ``image_grid_pinpoints`` (released:
  336 x 672, 672 x 336, 672 x 672, 1008 x 336, 336 x 1008) for the image's size, resizes and pads the image to it
  and cuts it into 336 x 336 tiles; a 336 x 336 resize of the whole image goes first. ``pixel_values`` are
  (images, tiles, 3, 336, 336), zero-padded to the most tiles of the call, and ``image_sizes`` (images, 2) holds
  each image's original (height, width), from which the model knows how many tiles are real.
- Image tokens per image vary with its size: 576 for the whole-image tile plus the tiles' features with the
  padding cut off (``unpad``), one ``image_newline`` token closing each row of features (a 640 x 480 image: the
  672 x 672 grid, 576 + 36 x 48 + 36 = 2340 tokens). The processor writes exactly as many ``<image>`` tokens as
  the model makes features.
- ``image_newline`` (a learned vector of the LLM's width) trains with the projector (``--tune_mm_mlp``), as in
  LLaVA-NeXT's own training.
- Chat layout: the released Mistral one, ``[INST] <image>\\n{question} [/INST] {answer}</s> ``; a system turn is
  written as ``<<SYS>>\\n{system}\\n<</SYS>>\\n\\n`` before the first ``[INST]``; no default system prompt.
  The released llava-hf template file writes a literal ``<\\s> `` after each answer (a typo for ``</s>``): taken
  as it is, the model would learn the text ``<\\s>`` and then the eos that training adds. A ``<\\s>`` closing an
  answer is read as the eos instead (``fix_rendered``), so such a checkpoint trains exactly as with ``</s>``; a
  ``<\\s>`` anywhere else stays text.
- Grounding boxes in answers: relative 0-1 of the image (``[x1, y1, x2, y2]``), as LLaVA-1.5.
- Multi-image: yes (each image tiled alike); video: no (a video sample is a counted bad sample); flattened
  batches / packing: refused at start-up (1-D positions from the attention mask).

A batch (``collate_media``) pads every item's tiles with zeros to the most tiles in the batch, as the
processor pads tiles within one call, so a batch of our items equals ``processor(text=[t1, t2], images=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwenvl.models.base import VisionSettings, tiny_text_config
from qwenvl.models.hf_family import AnyresFamily, ProcessorTokens
from qwenvl.models.llava import (
    CLIP_PROCESSOR_SETTINGS,
    IMAGE_SIZE,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PATCH_SIZE,
    tiny_llava_config,
)

# The released llava-hf LLaVA-NeXT Mistral layout, each answer closed by the tokenizer's eos.
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' }}{% generation %}{{ message['content'][0]['text'] + eos_token }}{% endgeneration %}{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
)

# What the released llava-hf Mistral template writes after each answer in place of ``</s>`` (``fix_rendered``).
TYPO_EOS = "<\\s>"

# (height, width) of the tiled resolutions of the released checkpoint.
IMAGE_GRID_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

LLAVA_NEXT_VISION = VisionSettings(
    patch_size=PATCH_SIZE, merge_size=1, temporal_patch_size=1, image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD, min_pixels=IMAGE_SIZE * IMAGE_SIZE,
    max_pixels=max(h * w for h, w in IMAGE_GRID_PINPOINTS), video_min_pixels=IMAGE_SIZE * IMAGE_SIZE,
    video_max_pixels=IMAGE_SIZE * IMAGE_SIZE,
)


# The tiny checkpoint tiles at a third of the released size (112-pixel tiles of 8 x 8 patches, the released
# pinpoints / 3): the same tiling, unpadding and newline rule, sequences a ninth as long, so tests stay fast.
TINY_TILE = IMAGE_SIZE // 3
TINY_GRID_PINPOINTS = tuple((h // 3, w // 3) for h, w in IMAGE_GRID_PINPOINTS)


@dataclass(frozen=True)
class LlavaNextFamily(AnyresFamily):
    """LLaVA-NeXT: anyres tiles per image, ``image_sizes``, a newline token per feature row (module docstring)."""

    grounding_range = 1  # boxes [x1, y1, x2, y2] as fractions of the image, as LLaVA-1.5

    def fix_rendered(self, text: str, spans: list[tuple[int, int]],
                     end_of_turn: str | None) -> tuple[str, list[tuple[int, int]]]:
        """A literal ``<\\s>`` closing an answer (the released template's typo for ``</s>``) becomes ``end_of_turn``
        (the eos), the spans moved with it; a ``<\\s>`` elsewhere stays.

        Args:
            text (str): the rendered conversation.
            spans (list[tuple[int, int]]): the assistant turns' character spans.
            end_of_turn (str | None): the eos; None leaves the text as it is.

        Returns:
            tuple[str, list[tuple[int, int]]]: the text and the spans in it.

        Example:
            >>> LLAVA_NEXT.fix_rendered("[INST] Hi [/INST] Yo<\\s> ", [(17, 24)], "</s>")
            ('[INST] Hi [/INST] Yo</s> ', [(17, 24)])
        """
        if not end_of_turn:
            return text, spans
        pieces, fixed, shift, last = [], [], 0, 0
        for start, end in spans:
            stop = start + len(text[start:end].rstrip())
            if text[start:stop].endswith(TYPO_EOS):
                pieces.append(text[last:stop - len(TYPO_EOS)] + end_of_turn)
                last = stop
                fixed.append((start + shift, end + shift + len(end_of_turn) - len(TYPO_EOS)))
                shift += len(end_of_turn) - len(TYPO_EOS)
            else:
                fixed.append((start + shift, end + shift))
        pieces.append(text[last:])
        return "".join(pieces), fixed

    def tiny_config_kwargs(self, token_ids: dict[str, int]) -> dict[str, Any]:
        """LlavaNextConfig kwargs: LLaVA-1.5's (``tiny_llava_config``) on 112-pixel tiles (``TINY_TILE``), the
        released pinpoints / 3; a Qwen2 LLM of hidden 64, 2 layers.

        Example:
            >>> LLAVA_NEXT.tiny_config_kwargs(ids)["image_grid_pinpoints"][0]
            [112, 224]
        """
        return tiny_llava_config(token_ids, TINY_TILE, text_config=tiny_text_config(token_ids),  # released: mistral
                                 image_grid_pinpoints=[list(hw) for hw in TINY_GRID_PINPOINTS])

    def tiny_processor(self, tokenizer: Any) -> Any:
        """A ``LlavaNextProcessor`` of the released settings at the tiny tile size (PIL image processor) around
        ``tokenizer``."""
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": TINY_TILE}, crop_size={"height": TINY_TILE, "width": TINY_TILE},
            image_grid_pinpoints=[list(hw) for hw in TINY_GRID_PINPOINTS], image_mean=list(OPENAI_CLIP_MEAN),
            image_std=list(OPENAI_CLIP_STD), do_pad=True,
        )
        return self.tiny_processor_around(tokenizer, image_processor, image_token=self.tokens.image,
                                          **CLIP_PROCESSOR_SETTINGS)


LLAVA_NEXT = LlavaNextFamily(
    model_type="llava_next",
    model_class_name="LlavaNextForConditionalGeneration",
    processor_class="LlavaNextProcessor",
    default_system_prompt=None,
    chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
    vision_defaults=LLAVA_NEXT_VISION,
    projector_modules=("multi_modal_projector", "image_newline"),
    tokens=ProcessorTokens(image="<image>", reserved=("<s>", "</s>")),
    image_processor_class="LlavaNextImageProcessorPil",
)
