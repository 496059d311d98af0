"""PaliGemma (``google/paligemma-3b-pt-448``, ``-pt-224``) and PaliGemma 2 (``google/paligemma2-3b-pt-224``):
``PaliGemmaForConditionalGeneration`` + ``PaliGemmaProcessor``.

A SigLIP-So400m/14 tower, one linear projector and a Gemma (PaliGemma 2: Gemma 2) LLM. Each image is resized
(bicubic, no crop, aspect ratio not kept) to the checkpoint's square size, 224, 448 or 896, normalised to
[-1, 1]; the processor writes ``image_seq_length`` ``<image>`` tokens per image: (size / 14)^2, i.e. 256 at 224,
1024 at 448, 4096 at 896.

A prefix-LM, not a chat model: no chat template, no system prompt, no turns. A sample is one prompt (the
prefix) and one answer (the suffix), built exactly as the processor builds them for training,
``processor(text=prefix, images=..., suffix=answer)``::

    <image> x N, <bos>, prompt, "\\n" | answer, <eos>
    token_type_ids   0 ... 0          | 1 ... 1        (labels: the suffix only)

The model attends bidirectionally over the prefix (images and prompt) and causally over the suffix; it builds
that mask from ``token_type_ids``, which every batch carries (padding: type 0, masked out by the attention
mask). How a record maps (``qwenvl.data.hf_items.prefix_lm_turns``):

- one user turn + one assistant answer: the user text, its ``<image>`` tags removed, is the prompt (pieces
  between tags stripped and joined with a space), the answer the suffix. The images go first, in tag order,
  wherever the tags are: the processor's layout. A task prefix such as ``caption en`` or ``detect cat`` is
  simply the prompt.
- several images in one sample: supported (the processor takes a list of images per prompt and writes each
  image's block, all before ``<bos>``; the released checkpoints were pretrained on one).
- text only: supported; the processor refuses a call without images, so the item is what it builds for the
  same text without the image block (its tokenizer call: ``<bos>`` + prompt + ``\\n``, paired with answer +
  ``<eos>``).
- a system turn, or more than one user turn / answer: a counted bad sample (``unsupported_layout``) naming
  what the sample has. ``--train_on_prompt`` is refused (a prompt token attends to the token it would
  predict).

Grounding: PaliGemma answers with location tokens, ``<locYYYY>`` (1024 bins, 0000-1023 across the image's
height or width), four per box in the order y_min, x_min, y_max, x_max, then the label, e.g.
``<loc0256><loc0128><loc0768><loc0896> cat`` (``detect cat``; several boxes joined by `` ; ``); segmentation
adds 16 ``<segNNN>`` tokens (128 codes). The processor adds these 1152 tokens to its tokenizer; write them in
answers as they are (``grounding_range`` 1024: relative to the image, in bins). No video. Flattened batches
and packing are refused (the prefix mask is built per padded row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qwenvl.models.base import VisionSettings
from qwenvl.models.hf_family import HFProcessorFamily, ProcessorTokens, tiny_vision_config

IMAGE_SIZE = 224  # paligemma(2)-3b-pt-224; -448 / -896 checkpoints carry their own size in their processor
PATCH_SIZE = 14
SIGLIP_MEAN = (0.5, 0.5, 0.5)  # SigLIP normalises to [-1, 1]
SIGLIP_STD = (0.5, 0.5, 0.5)
LOC_TOKENS = 1024  # <loc0000> ... <loc1023>, added by PaliGemmaProcessor
SEG_TOKENS = 128  # <seg000> ... <seg127>, added by PaliGemmaProcessor

# Not a released file (PaliGemma checkpoints ship no chat template): renders one user message as the text the
# processor takes for generation, its images first, then its text (the ``prefix_lm_turns`` rule); the processor
# adds <bos> after the images and "\n" after the prompt. Anything else is refused.
PALIGEMMA_PROMPT_TEMPLATE = (
    "{% if messages | length != 1 or messages[0]['role'] != 'user' %}"
    "{{ raise_exception('PaliGemma is a prefix-LM: render one user message (the prompt); the answer is the "
    "processor suffix') }}{% endif %}"
    "{% for content in messages[0]['content'] | selectattr('type', 'equalto', 'image') %}<image>{% endfor %}"
    "{{ messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | map('trim') "
    "| join(' ') }}"
)

PALIGEMMA_VISION = VisionSettings(
    patch_size=PATCH_SIZE, merge_size=1, temporal_patch_size=1, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
    min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE,
    video_min_pixels=IMAGE_SIZE * IMAGE_SIZE, video_max_pixels=IMAGE_SIZE * IMAGE_SIZE,
)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class PaliGemmaFamily(HFProcessorFamily):
    """PaliGemma 1 and 2: one square resize per image, prefix (bidirectional) + suffix (causal, learned)."""

    grounding_range = 1024  # <locYYYY> bins across the image (y_min, x_min, y_max, x_max)
    prefix_lm = True
    selects_vision_features = False  # the tower's last hidden state, every patch

    def processor_images(self, images: Sequence[Any]) -> Any:
        """``[images]``: the one prompt's images nested (the processor pairs images with prompts by the nesting)."""
        return [list(images)] if images else None

    def prefix_lm_inputs(self, processor: Any, prompt: str, answer: str | None,
                         images: Sequence[Any]) -> dict[str, Any]:
        """What ``PaliGemmaProcessor`` builds from ``prompt`` (prefix) and ``answer`` (suffix): for training, or
        for generation when ``answer`` is None (the prefix alone, as the processor is called to generate).

        With images: ``processor(text=<image> x n + prompt, images=[images], suffix=answer)``. Text only (the
        processor requires images): its tokenizer call for the same text, ``<bos>`` + prompt + ``\\n`` (paired
        with answer + ``<eos>``), which is the processor's output without the image block.

        Args:
            processor (Any): the checkpoint's ``PaliGemmaProcessor``.
            prompt (str): the prompt, without image tags.
            answer (str | None): the answer; None for a generation prompt.
            images (Sequence[Any]): PIL images (any number).

        Returns:
            dict[str, Any]: ``input_ids``, ``attention_mask`` (1, L), ``token_type_ids`` (1, L) with an answer;
            ``pixel_values`` (n, 3, H, W) with images. The processor's own ``labels`` are dropped (the builder
            makes them).
        """
        if images:
            suffix = {} if answer is None else {"suffix": [answer]}
            encoded = processor(text=[self.tokens.image * len(images) + prompt], images=self.processor_images(images),
                                return_tensors="pt", **suffix, **self.processor_kwargs())
        else:
            tokenizer = processor.tokenizer
            pair = {} if answer is None else {"text_pair": [answer + tokenizer.eos_token],
                                              "return_token_type_ids": True}
            encoded = tokenizer([tokenizer.bos_token + prompt + "\n"], return_tensors="pt", **pair)
        return {key: value for key, value in encoded.items() if key != "labels"}

    def tiny_config_kwargs(self, token_ids: dict[str, int]) -> dict[str, Any]:
        """PaliGemmaConfig kwargs: SigLIP tower depth 2, width 32, at 224/14 (256 image tokens); a Gemma LLM of
        hidden 64, 2 layers, 4 heads of 16, one kv head (the released PaliGemma 1 shape, at toy width).

        The vocabulary is the shipped Qwen tokenizer's plus ``<image>`` plus the 1024 ``<loc>`` and 128 ``<seg>``
        tokens the processor adds after it, rounded up to a multiple of 64 (Qwen's 151,936 would not hold them).

        Example:
            >>> PALIGEMMA.tiny_config_kwargs(ids)["text_config"]["vocab_size"]  # <image> = 151669
            152832
        """
        vocab_size = _round_up(token_ids["image_token_id"] + 1 + LOC_TOKENS + SEG_TOKENS, 64)
        hidden = 64
        text_config = {
            "model_type": "gemma",  # PaliGemma 1; PaliGemma 2: gemma2
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "bos_token_id": token_ids["bos_token_id"],
            "eos_token_id": token_ids["eos_token_id"],
            "pad_token_id": token_ids["pad_token_id"],
            "dtype": "float32",
        }
        vision_config = tiny_vision_config("siglip_vision_model", patch_size=PATCH_SIZE, image_size=IMAGE_SIZE,
                                           vision_use_head=False)
        return {
            "text_config": text_config,
            "vision_config": vision_config,
            "image_token_index": token_ids["image_token_id"],
            "vocab_size": vocab_size,
            "projection_dim": hidden,  # the projector maps the tower's width onto the LLM's
            "hidden_size": hidden,
            "tie_word_embeddings": True,
            "dtype": "float32",
        }

    def tiny_processor(self, tokenizer: Any) -> Any:
        """A ``PaliGemmaProcessor`` of the released pt-224 settings around ``tokenizer`` (which knows
        ``<image>``). The shipped Qwen tokenizer has no bos token: its ``<|endoftext|>`` (the Qwen configs'
        ``bos_token_id``) becomes it; the processor adds the ``<loc>`` / ``<seg>`` tokens."""
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        if tokenizer.bos_token is None:
            tokenizer.bos_token = "<|endoftext|>"
        image_processor = SiglipImageProcessorPil(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=list(SIGLIP_MEAN),
            image_std=list(SIGLIP_STD), resample=3, image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        )
        return self.tiny_processor_around(tokenizer, image_processor)


PALIGEMMA = PaliGemmaFamily(
    model_type="paligemma",
    model_class_name="PaliGemmaForConditionalGeneration",
    processor_class="PaliGemmaProcessor",
    default_system_prompt=None,
    chat_template=PALIGEMMA_PROMPT_TEMPLATE,
    vision_defaults=PALIGEMMA_VISION,
    tokens=ProcessorTokens(image="<image>", reserved=("<bos>", "<eos>")),
    image_processor_class="SiglipImageProcessorPil",
    flatten_refusal=("its prefix-LM attention (bidirectional over each prompt, from token_type_ids) is built per "
                     "padded row, so samples flattened into one row would attend across their boundaries"),
)
