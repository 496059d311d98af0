"""Gemma 3 (``google/gemma-3-4b-it``, ``-12b-it``, ``-27b-it``): ``Gemma3ForConditionalGeneration`` with its processor.

A SigLIP So400m/14 tower at 896 x 896, an average-pool + linear projector and the Gemma 3 LLM. Each image is
resized (not cropped, aspect ratio not kept) to 896 x 896 and becomes 256 soft tokens (64 x 64 patches pooled
4 x 4). The chat template writes ``<start_of_image>`` where the image part sits; the processor expands it to
``\\n\\n<start_of_image>`` + 256 x ``<image_soft_token>`` + ``<end_of_image>\\n\\n`` and marks the soft tokens in
``token_type_ids``, which the model uses to let an image's tokens attend to each other both ways (the rest is
causal; sliding-window layers keep their window). Pan-and-scan (extra crops of a long image) is off, as in the
released processor config; a family object built with ``pan_and_scan=True`` turns it on (no command-line flag).

Chat layout: the released Gemma 3 template, ``<bos><start_of_turn>user\\n{system}\\n\\n{question}<end_of_turn>\\n
<start_of_turn>model\\n{answer}<end_of_turn>\\n`` (a system prompt is folded into the first user turn; there is
no default one). Learned: each answer and its ``<end_of_turn>``, not the newline after it, as Google's own
fine-tuning library builds targets (``gemma.gm.data.Seq2SeqTask``: ``ANSWER = '{}<end_of_turn>'``): generation
stops at ``<end_of_turn>``, so the newline is never generated. The template writes ``<bos>``, so the processor
is called without adding special tokens (the released tokenizer would add a second ``<bos>``).

Grounding: Gemma 3 has no box format of its own; answers hold boxes relative 0-1000 of the image (the square it
is resized to). No video. Flattened batches and packing are refused (``flatten_refusal``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from qwenvl.models.base import VisionSettings
from qwenvl.models.hf_family import HFProcessorFamily, ProcessorTokens, reloaded_tokenizer, tiny_vision_config

# The released google/gemma-3-*-it chat template (system folded into the first user turn, roles alternating,
# images written as <start_of_image> where the image part sits, each turn closed by <end_of_turn>\n).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}"
    "{%- set role = \"model\" -%}"
    "{%- else -%}"
    "{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception(\"Invalid content type\") }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)

BOS, END_OF_TURN, START_OF_TURN = "<bos>", "<end_of_turn>", "<start_of_turn>"
BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"

IMAGE_SIZE = 896  # SigLIP So400m/14 at 896
PATCH_SIZE = 14
MM_TOKENS_PER_IMAGE = 256
GEMMA3_MEAN = GEMMA3_STD = (0.5, 0.5, 0.5)

GEMMA3_VISION = VisionSettings(
    patch_size=PATCH_SIZE, merge_size=4, temporal_patch_size=1, image_mean=GEMMA3_MEAN, image_std=GEMMA3_STD,
    min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE,
    video_min_pixels=IMAGE_SIZE * IMAGE_SIZE, video_max_pixels=IMAGE_SIZE * IMAGE_SIZE,
)

# The tiny test checkpoint: 32 x 32 images, 8 x 8 patches of 4, pooled 2 x 2 into 16 soft tokens.
TINY_IMAGE_SIZE, TINY_PATCH_SIZE, TINY_MM_TOKENS = 32, 4, 16


@dataclass(frozen=True)
class Gemma3Family(HFProcessorFamily):
    """Gemma 3: one 896 x 896 image = 256 soft tokens in a ``<start_of_image>...<end_of_image>`` block, attended
    bidirectionally (``token_type_ids``); answers closed by ``<end_of_turn>``; boxes relative 0-1000.

    Attributes (besides ``HFProcessorFamily``'s):
        pan_and_scan (bool): let the processor add pan-and-scan crops of long images (off, as released).
    """

    pan_and_scan: bool = False

    grounding_range: ClassVar[int | None] = 1000
    # The processor replaces <start_of_image> by a text (newlines, boi, soft tokens, eoi): labels follow its
    # replacement offsets (qwenvl/data/hf_items.py).
    expands_image_text: ClassVar[bool] = True
    selects_vision_features: ClassVar[bool] = False  # tower, pool, norm, projection: no feature layer to pick

    def processor_kwargs(self) -> dict[str, Any]:
        """Pan-and-scan as the family says; no special tokens added (the template writes ``<bos>``)."""
        return {"do_pan_and_scan": self.pan_and_scan, "add_special_tokens": False}

    def end_of_turn(self, tokenizer: Any) -> str:
        """``<end_of_turn>``: what closes (and is learned with) every answer; the tokenizer's eos is ``<eos>``."""
        return END_OF_TURN

    def image_block_end(self) -> str:
        """``<end_of_image>``: a cut at ``model_max_length`` never falls before it."""
        return EOI

    def tiny_added_tokens(self) -> tuple[str, ...]:
        """Gemma 3's chat and image tokens, added to the shipped Qwen tokenizer."""
        return (BOS, START_OF_TURN, END_OF_TURN, BOI, EOI, SOFT)

    def tiny_config_kwargs(self, token_ids: dict[str, int]) -> dict[str, Any]:
        """Gemma3Config kwargs: a SigLIP tower of depth 2, width 32 at 32/4 (16 soft tokens per image); a Gemma 3
        text model of hidden 64, 2 layers (one sliding-window of 32, one global), vocab 151936.

        Example:
            >>> GEMMA3.tiny_config_kwargs(ids)["mm_tokens_per_image"]
            16
        """
        text_config = {
            "model_type": "gemma3_text",
            "vocab_size": 151936,  # the shipped Qwen tokenizer; released: 262208
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 32,  # shorter than the test samples, so the window is exercised
            "layer_types": ["sliding_attention", "full_attention"],
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
            "bos_token_id": token_ids[BOS],
            "eos_token_id": token_ids["eos_token_id"],
            "pad_token_id": token_ids["pad_token_id"],
            "dtype": "float32",
        }
        vision_config = tiny_vision_config("siglip_vision_model", patch_size=TINY_PATCH_SIZE,
                                           image_size=TINY_IMAGE_SIZE, vision_use_head=False)
        return {
            "text_config": text_config,
            "vision_config": vision_config,
            "mm_tokens_per_image": TINY_MM_TOKENS,
            "boi_token_index": token_ids[BOI],
            "eoi_token_index": token_ids[EOI],
            "image_token_index": token_ids[SOFT],
            "tie_word_embeddings": True,
            "dtype": "float32",
        }

    def tiny_processor(self, tokenizer: Any) -> Any:
        """A ``Gemma3Processor`` around ``tokenizer`` (which must know the Gemma tokens), named as Gemma's
        tokenizer names them (``bos_token``, ``boi_token``, ``eoi_token``, ``image_token``), with a
        ``Gemma3ImageProcessorPil`` at the tiny tower's 32 x 32 and the released normalisation."""
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        tokenizer = reloaded_tokenizer(tokenizer, bos_token=BOS, extra_special_tokens={
            "boi_token": BOI, "eoi_token": EOI, "image_token": SOFT})
        image_processor = Gemma3ImageProcessorPil(
            size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_mean=list(GEMMA3_MEAN),
            image_std=list(GEMMA3_STD), do_pan_and_scan=False,
        )
        return self.tiny_processor_around(tokenizer, image_processor, image_seq_length=TINY_MM_TOKENS)


GEMMA3 = Gemma3Family(
    model_type="gemma3",
    model_class_name="Gemma3ForConditionalGeneration",
    processor_class="Gemma3Processor",
    default_system_prompt=None,
    chat_template=GEMMA3_CHAT_TEMPLATE,
    vision_defaults=GEMMA3_VISION,
    tokens=ProcessorTokens(image=BOI, reserved=(BOS, "<eos>", START_OF_TURN, END_OF_TURN, BOI, EOI, SOFT)),
    image_processor_class="Gemma3ImageProcessorPil",
    flatten_refusal=("its images attend bidirectionally within their block (token_type_ids) and its model "
                     "computes 1-D positions from the attention mask, so samples flattened into one row would "
                     "attend across their boundaries"),
)
