"""Idefics3 (``HuggingFaceM4/Idefics3-8B-Llama3``) and SmolVLM / SmolVLM2 (``HuggingFaceTB/SmolVLM-256M-Instruct``,
``HuggingFaceTB/SmolVLM2-2.2B-Instruct``): ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration``.

Both are one design: a SigLIP-style tower (``model.vision_model``), a pixel-shuffle connector (``model.connector``:
``scale_factor``\\ :sup:`2` neighbouring patches folded into one token, then one linear layer) and a Llama LLM
(``model.text_model``). What differs for a user:

- Image layout (image splitting): the image processor resizes each image so its longest edge is ``size``
  (Idefics3: 1456, SmolVLM-256M: 2048), rounds it up to a multiple of ``max_image_size`` (364 / 512) and cuts it
  into rows x cols tiles of that size, plus the whole image at that size (the global image). The processor writes,
  per image, ``<fake_token_around_image><row_r_col_c>`` + ``image_seq_len`` ``<image>`` tokens for every tile
  (a newline after each row), then ``\\n<fake_token_around_image><global-img>`` + ``image_seq_len`` ``<image>`` +
  ``<fake_token_around_image>``; an image no larger than one tile (or ``do_image_splitting`` False) is the
  global block alone. ``image_seq_len`` = (image_size / patch_size)\\ :sup:`2` / scale_factor\\ :sup:`2`: 169 for
  Idefics3, 64 for SmolVLM-256M; a 1456 x 1092 image is 4 x 3 tiles + 1, 13 x 169 = 2197 image tokens.
- ``pixel_values`` are (1, images, 3, H, W) per sample and ``pixel_attention_mask`` (1, images, H, W); a batch
  pads every sample to the most images of the batch with all-zero images (the model drops them), as one
  processor call of several samples does (``collate_media``).
- Chat layout (the released template): ``User:<image>question<end_of_utterance>\\nAssistant: answer
  <end_of_utterance>\\n`` after Idefics3's ``<|begin_of_text|>`` / SmolVLM's ``<|im_start|>``; a system turn is
  ``System: ...<end_of_utterance>\\n``. Every answer is closed by ``<end_of_utterance>``, which is learned with it.
  No default system prompt.
- Grounding: neither model has a box format of its own; boxes are read as fractions 0-1 of the image (LLaVA's).
- Video: refused (a counted bad sample). SmolVLM2's video processor needs torchvision, and in transformers 5.23
  ``SmolVLMProcessor`` cannot even be built without it: ``SMOLVLM.load_processor`` then builds
  ``SmolVLMImageTextProcessor``, the same processor without the video part, from the folder's tokenizer, PIL
  image processor and chat template (``qwenvl.models.hf_family.image_text_processor_class``); saved folders
  (tiny checkpoint, trained runs) name ``SmolVLMProcessor`` as released ones do. ``SmolVLMProcessor`` needs the
  package ``num2words`` (requirements.txt). Idefics3's processor takes images only and needs no torchvision.
- Packing / flattened batches: refused at start-up (the model computes 1-D positions from the attention mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qwenvl.models.base import VisionSettings, tiny_text_config
from qwenvl.models.hf_family import (
    TORCHVISION_VIDEO_REFUSAL,
    HFProcessorFamily,
    ProcessorTokens,
    black_image,
    tiny_vision_config,
)

# The released layout (Idefics3-8B-Llama3; SmolVLM2 adds the ``<video>`` part); answers end with <end_of_utterance>.
_TURNS = (
    "{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% VIDEO %}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_CHAT_TEMPLATE = "<|begin_of_text|>" + _TURNS.replace("{% VIDEO %}", "")
SMOLVLM_CHAT_TEMPLATE = "<|im_start|>" + _TURNS.replace(
    "{% VIDEO %}", "{% elif line['type'] == 'video' %}{{ '<video>' }}")

FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
ROW_COL_TOKENS = tuple(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))  # up to 6 x 6 tiles
IMAGENET_STANDARD = (0.5, 0.5, 0.5)  # both processors' image_mean and image_std

# Released geometry: Idefics3-8B-Llama3 (SigLIP so400m/14 at 364, scale 2) and SmolVLM-256M (patch 16 at 512, scale 4).
IDEFICS3_VISION = VisionSettings(
    patch_size=14, merge_size=2, temporal_patch_size=1, image_mean=IMAGENET_STANDARD, image_std=IMAGENET_STANDARD,
    min_pixels=364 * 364, max_pixels=1456 * 1456, video_min_pixels=364 * 364, video_max_pixels=364 * 364,
)
SMOLVLM_VISION = VisionSettings(
    patch_size=16, merge_size=4, temporal_patch_size=1, image_mean=IMAGENET_STANDARD, image_std=IMAGENET_STANDARD,
    min_pixels=512 * 512, max_pixels=2048 * 2048, video_min_pixels=512 * 512, video_max_pixels=512 * 512,
)

# The tiny checkpoints: tiles of TINY_TILE pixels, images at most TINY_LONGEST_EDGE (2 x 2 tiles + global).
TINY_TILE = {"idefics3": 28, "smolvlm": 32}
TINY_PATCH = {"idefics3": 7, "smolvlm": 8}
TINY_SCALE = {"idefics3": 2, "smolvlm": 2}
TINY_TILES_PER_SIDE = 2


@dataclass(frozen=True)
class Idefics3Family(HFProcessorFamily):
    """Idefics3 / SmolVLM: split images (tiles + a global image), ``pixel_attention_mask``, pixel-shuffle connector."""

    grounding_range = 1  # no box format of their own: fractions of the image, as LLaVA-1.5
    expands_image_text = True  # an <image> becomes fake/row-col/global tokens and newlines, not <image> repeated
    language_module = "text_model"
    media_rows_per_item = True
    selects_vision_features = False

    def end_of_turn(self, tokenizer: Any) -> str | None:
        """``<end_of_utterance>``: the template closes every turn with it (the tokenizer's eos may be another)."""
        return END_OF_UTTERANCE

    def image_block_end(self) -> str:
        """``<fake_token_around_image>``: the last token of an image's block (after its global image)."""
        return FAKE_TOKEN

    # ----------------------------------------------------------------- batch
    def collate_media(self, key: str, values: list[torch.Tensor | None]) -> torch.Tensor:
        """One row per item, as one processor call of the batch's samples: (items, images, ...) with each item's
        images first and all-zero images (mask 0) after them, up to the most images of any item; spatial sizes
        padded (bottom/right, zeros) to the largest. An item without images is a row of zero images.

        Args:
            key (str): ``pixel_values`` (1, n, 3, H, W) or ``pixel_attention_mask`` (1, n, H, W).
            values (list[torch.Tensor | None]): one per item (``media_rows_per_item``), None where it has none.

        Returns:
            torch.Tensor: (items, max n, ...).

        Example:
            >>> SMOLVLM.collate_media("pixel_attention_mask", [torch.ones(1, 2, 4, 4), None]).shape
            torch.Size([2, 2, 4, 4])
        """
        present = [v for v in values if v is not None]
        trailing = [max(v.shape[dim] for v in present) for dim in range(2, present[0].dim())]
        batch = torch.zeros((len(values), max(v.shape[1] for v in present), *trailing), dtype=present[0].dtype)
        for row, value in enumerate(values):
            if value is not None:
                batch[(row, slice(0, value.shape[1]), *(slice(0, s) for s in value.shape[2:]))] = value[0]
        return batch

    # ------------------------------------------------------------ dummy pass
    def dummy_vision_features(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32,
                              device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """The LLM inputs of one black tile through ``vision_model`` and ``connector`` (``get_image_features``).

        A black image normalised with mean = std = 0.5 is -1 everywhere: an all-zero one would be taken for padding
        and dropped by the model.

        Returns:
            list[torch.Tensor]: one (image_seq_len, hidden) tensor.
        """
        size = int(model.config.vision_config.image_size)
        mask = torch.ones((1, 1, size, size), dtype=torch.bool, device=device)
        return self.image_features(model, black_image(model.config.vision_config, dtype, device, 1, 1, fill=-1.0),
                                   pixel_attention_mask=mask)

    # ------------------------------------------------------------ tiny model
    def tiny_added_tokens(self) -> tuple[str, ...]:
        """The image structure tokens, ``<end_of_utterance>``, Idefics3's ``<|begin_of_text|>`` (the shipped Qwen
        tokenizer has SmolVLM's ``<|im_start|>``) and SmolVLM2's ``<video>``."""
        own = ("<|begin_of_text|>",) if self.model_type == "idefics3" else ("<video>",)
        return (FAKE_TOKEN, self.tokens.image, END_OF_UTTERANCE, GLOBAL_IMAGE_TOKEN, *ROW_COL_TOKENS, *own)

    def tiny_config_kwargs(self, token_ids: dict[str, int]) -> dict[str, Any]:
        """Config kwargs: a 2-layer tower of width 32 on tiles of 28 (Idefics3, patch 7) / 32 (SmolVLM, patch 8)
        pixels, scale factor 2 (4 image tokens per tile), and a Qwen2 LLM of hidden 64, 2 layers.

        Example:
            >>> SMOLVLM.tiny_config_kwargs(ids)["vision_config"]["image_size"]
            32
        """
        text_config = tiny_text_config(token_ids, max_position_embeddings=4096)  # released: llama
        vision_config = tiny_vision_config(f"{self.model_type}_vision", patch_size=TINY_PATCH[self.model_type],
                                           image_size=TINY_TILE[self.model_type])
        return {"text_config": text_config, "vision_config": vision_config, "scale_factor": TINY_SCALE[self.model_type],
                "image_token_id": token_ids["image_token_id"], "tie_word_embeddings": False, "dtype": "float32"}

    def tiny_image_seq_len(self) -> int:
        """``<image>`` tokens per tile of the tiny checkpoint: (tile / patch)^2 / scale^2."""
        side = TINY_TILE[self.model_type] // TINY_PATCH[self.model_type]
        return side * side // TINY_SCALE[self.model_type] ** 2

    def tiny_processor(self, tokenizer: Any) -> Any:
        """The processor of the released kind around ``tokenizer`` (which must know the image tokens), image
        splitting on, at the tiny tile size, with the PIL image processor. SmolVLM: ``SmolVLMImageTextProcessor``
        (``SmolVLMProcessor`` without its torchvision-only video processor) keeping the video processor's settings
        (``SmolVLMVideoProcessor`` at the tile size); saved, it names ``SmolVLMProcessor``."""
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        tile = TINY_TILE[self.model_type]
        settings = {"size": {"longest_edge": TINY_TILES_PER_SIDE * tile}, "max_image_size": {"longest_edge": tile},
                    "image_mean": list(IMAGENET_STANDARD), "image_std": list(IMAGENET_STANDARD),
                    "do_image_splitting": True}
        if self.model_type == "idefics3":
            image_processor, video = Idefics3ImageProcessorPil(**settings), None
        else:
            image_processor = SmolVLMImageProcessorPil(**settings)
            video = {"size": {"longest_edge": tile}, "max_image_size": {"longest_edge": tile},
                     "image_mean": list(IMAGENET_STANDARD), "image_std": list(IMAGENET_STANDARD)}
        return self.tiny_processor_around(tokenizer, image_processor, video, image_seq_len=self.tiny_image_seq_len())


_RESERVED = (FAKE_TOKEN, GLOBAL_IMAGE_TOKEN, END_OF_UTTERANCE, *ROW_COL_TOKENS)

IDEFICS3 = Idefics3Family(
    model_type="idefics3",
    model_class_name="Idefics3ForConditionalGeneration",
    processor_class="Idefics3Processor",
    default_system_prompt=None,
    chat_template=IDEFICS3_CHAT_TEMPLATE,
    vision_defaults=IDEFICS3_VISION,
    vision_module="vision_model",
    projector_modules=("connector",),
    tokens=ProcessorTokens(image="<image>", reserved=("<|begin_of_text|>", *_RESERVED)),
    image_processor_class="Idefics3ImageProcessorPil",
)

SMOLVLM = Idefics3Family(
    model_type="smolvlm",
    model_class_name="SmolVLMForConditionalGeneration",
    processor_class="SmolVLMProcessor",
    default_system_prompt=None,
    chat_template=SMOLVLM_CHAT_TEMPLATE,
    vision_defaults=SMOLVLM_VISION,
    vision_module="vision_model",
    projector_modules=("connector",),
    # <video> is not reserved: it is the records' video tag, and a video sample is refused for its video (the reason)
    tokens=ProcessorTokens(image="<image>", reserved=("<|im_start|>", *_RESERVED)),
    image_processor_class="SmolVLMImageProcessorPil",
    torchvision_video=True,
    video_refusal=TORCHVISION_VIDEO_REFUSAL,
)
