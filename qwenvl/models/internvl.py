"""InternVL 2.5 / 3 in the Hugging Face layout (``OpenGVLab/InternVL3-1B-hf``, ``-2B-hf``, ``-8B-hf``, ...):
``InternVLForConditionalGeneration`` + ``InternVLProcessor``.

An InternViT tower (448 x 448, patch 14), a pixel-shuffle projector (``multi_modal_projector``: each 2 x 2 block
of patch features is folded into one vector, then LayerNorm + two linears) and a Qwen2.5 (or InternLM/Llama)
LLM. What differs for a user:

- Images are tiled ("dynamic resolution"): the image processor (``GotOcr2ImageProcessor``, the PIL variant
  where torchvision is absent) picks the grid of 448 x 448 tiles (1 to ``max_patches`` = 12 released) whose
  aspect ratio is closest to the image's, resizes the image to it and cuts it, then adds a 448 x 448 thumbnail
  of the whole image when there is more than one tile. ``pixel_values`` are (tiles, 3, 448, 448), the tiles of
  every image of the call one after the other; a batch concatenates the items' tiles on dim 0, which is what
  the processor returns for the same samples in one call.
- Image tokens: ``<img>`` + 256 ``<IMG_CONTEXT>`` per tile + ``</img>`` (32 x 32 patches, pixel-shuffled 2 x 2),
  so an image costs 256 to 3328 tokens with the released settings. The chat template writes ``<IMG_CONTEXT>``
  once where the image part sits; the processor expands it.
- Chat layout: the released ``-hf`` template, Qwen2-style ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` with
  images inline where they sit in the turn. It has no default system prompt (the remote-code InternVL chat
  template adds its Chinese "书生·万象" one; the ``-hf`` checkpoints do not). Learned: each answer and its
  ``<|im_end|>``.
- Grounding: InternVL's own format, ``<ref>object</ref><box>[[x1, y1, x2, y2]]</box>``, boxes relative 0-1000
  of the image (``grounding_range``).
- Multi-image: yes (each image tiled alike). Video: no; the released processor samples video frames with
  torchvision, and our items are images only (a video sample is a counted bad sample naming the reason).
  Flattened batches / packing: refused at start-up (1-D positions computed from the attention mask).
- Without torchvision, transformers cannot build an ``InternVLProcessor`` (its video processor needs it):
  ``INTERNVL.load_processor`` then builds ``InternVLImageTextProcessor``, the same processor without the video
  part, from the folder's tokenizer, PIL image processor and chat template
  (``qwenvl.models.hf_family.image_text_processor_class``). Folders are saved as released: the tiny checkpoints
  (``tools/build_tiny_model.py``) and trained runs name ``InternVLProcessor`` and keep the video processor's
  settings, so plain ``AutoProcessor`` loads them where torchvision is installed.

The remote-code InternVL2 / 2.5 (``model_type`` ``internvl_chat``, ``InternVLChatModel``) is refused before any
weight loads, naming the ``-hf`` checkpoints to use instead (``qwenvl/models/loading.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from qwenvl.models.base import VisionSettings, tiny_text_config
from qwenvl.models.hf_family import (
    TORCHVISION_VIDEO_REFUSAL,
    HFProcessorFamily,
    ProcessorTokens,
    reloaded_tokenizer,
    tiny_vision_config,
)

START_IMAGE = "<img>"
END_IMAGE = "</img>"
CONTEXT_IMAGE = "<IMG_CONTEXT>"  # the processor's image token: one per feature
VIDEO = "<video>"
# The released tokenizer's extra special tokens, in its order (grounding: <ref>...</ref><box>[[...]]</box>).
ADDED_TOKENS = (START_IMAGE, END_IMAGE, CONTEXT_IMAGE, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
# The names InternVLProcessor reads from its tokenizer (tokenizer.start_image_token ...).
NAMED_TOKENS = {"start_image_token": START_IMAGE, "end_image_token": END_IMAGE, "context_image_token": CONTEXT_IMAGE,
                "video_token": VIDEO}

# The released OpenGVLab/InternVL3-*-hf chat template (transformers' conversion script): every turn
# <|im_start|>{role}\n ... <|im_end|>\n, an image as <IMG_CONTEXT>\n where it sits, no default system prompt.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)

IMAGE_SIZE = 448  # the released tile
PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 0.5  # pixel shuffle: 2 x 2 patches -> one token
IMAGE_SEQ_LENGTH = int((IMAGE_SIZE // PATCH_SIZE) ** 2 * DOWNSAMPLE_RATIO ** 2)  # 256 tokens per tile
MAX_PATCHES = 12
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The tiny test checkpoint: 56 x 56 tiles (4 x 4 patches -> 4 tokens per tile), at most 4 tiles + thumbnail.
TINY_IMAGE_SIZE = 56
TINY_MAX_PATCHES = 4
TINY_IMAGE_SEQ_LENGTH = int((TINY_IMAGE_SIZE // PATCH_SIZE) ** 2 * DOWNSAMPLE_RATIO ** 2)

INTERNVL_VISION = VisionSettings(
    patch_size=PATCH_SIZE, merge_size=2, temporal_patch_size=1, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=(MAX_PATCHES + 1) * IMAGE_SIZE * IMAGE_SIZE,
    video_min_pixels=IMAGE_SIZE * IMAGE_SIZE, video_max_pixels=IMAGE_SIZE * IMAGE_SIZE,
)

@dataclass(frozen=True)
class InternVLFamily(HFProcessorFamily):
    """InternVL (``-hf``): tiles + thumbnail per image, ``<img>`` + 256 ``<IMG_CONTEXT>`` per tile + ``</img>``,
    pixel-shuffle projector, boxes relative 0-1000 (see the module docstring)."""

    grounding_range: ClassVar[int | None] = 1000  # <box>[[x1, y1, x2, y2]]</box> relative 0-1000
    # The processor replaces <IMG_CONTEXT> by <img> + the context tokens + </img>: labels follow its replacement
    # offsets (qwenvl/data/hf_items.py).
    expands_image_text: ClassVar[bool] = True

    def image_block_end(self) -> str:
        """``</img>``: a cut at ``model_max_length`` never falls before it."""
        return END_IMAGE

    def tiny_added_tokens(self) -> tuple[str, ...]:
        """The released tokenizer's InternVL tokens (image block and grounding) and ``<video>``."""
        return (*ADDED_TOKENS, VIDEO)

    def tiny_config_kwargs(self, token_ids: dict[str, int]) -> dict[str, Any]:
        """InternVLConfig kwargs: an InternViT of depth 2, width 32 at 56/14 (4 tokens per tile after the pixel
        shuffle); a Qwen2 LLM of hidden 64, 2 layers, the shipped vocabulary.

        Example:
            >>> INTERNVL.tiny_config_kwargs(ids)["image_seq_length"]
            4
        """
        vision_config = tiny_vision_config(
            "internvl_vision", image_size=[TINY_IMAGE_SIZE, TINY_IMAGE_SIZE], patch_size=[PATCH_SIZE, PATCH_SIZE],
            use_absolute_position_embeddings=True, layer_scale_init_value=0.1,
        )
        return {
            "text_config": tiny_text_config(token_ids),  # InternVL3-1B/2B/8B-hf: Qwen2.5
            "vision_config": vision_config,
            "image_token_id": token_ids[CONTEXT_IMAGE],
            "image_seq_length": TINY_IMAGE_SEQ_LENGTH,
            "downsample_ratio": DOWNSAMPLE_RATIO,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",  # CLS dropped
            "tie_word_embeddings": False,
            "dtype": "float32",
        }

    def tiny_processor(self, tokenizer: Any) -> Any:
        """An ``InternVLImageTextProcessor`` around ``tokenizer`` (which must know the InternVL tokens), the
        tokens named as the released tokenizer names them (``start_image_token`` ...), with a
        ``GotOcr2ImageProcessorPil`` of the released settings at the tiny 56 x 56 tile and ``max_patches`` 4, and
        the video processor's settings (``InternVLVideoProcessor`` at that tile): saved, it names
        ``InternVLProcessor`` as a released checkpoint does."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        tokenizer = reloaded_tokenizer(tokenizer, extra_special_tokens=dict(NAMED_TOKENS))
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD), crop_to_patches=False, min_patches=1, max_patches=TINY_MAX_PATCHES,
        )  # crop_to_patches False as released: InternVLProcessor turns it on for every call
        video = {"size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, "image_mean": list(IMAGENET_MEAN),
                 "image_std": list(IMAGENET_STD)}
        return self.tiny_processor_around(tokenizer, image_processor, video, image_seq_length=TINY_IMAGE_SEQ_LENGTH)


INTERNVL = InternVLFamily(
    model_type="internvl",
    model_class_name="InternVLForConditionalGeneration",
    processor_class="InternVLProcessor",
    default_system_prompt=None,
    chat_template=INTERNVL_CHAT_TEMPLATE,
    vision_defaults=INTERNVL_VISION,
    tokens=ProcessorTokens(image=CONTEXT_IMAGE, reserved=("<|im_start|>", "<|im_end|>", "<|endoftext|>", START_IMAGE,
                                                          END_IMAGE, CONTEXT_IMAGE)),
    image_processor_class="GotOcr2ImageProcessorPil",
    torchvision_video=True,
    video_refusal=TORCHVISION_VIDEO_REFUSAL,
)
