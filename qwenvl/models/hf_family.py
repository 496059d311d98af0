"""The second kind of family: chat layout, media expansion and image preprocessing follow the checkpoint's
Hugging Face processor (its chat template and image processor, the PIL variant where torchvision is absent),
with 1-D positions.

A Qwen family (``qwenvl/models/qwen2_vl.py`` ...) writes its own layout token by token and patchifies images
itself; a family of this kind asks the processor: ``processor.apply_chat_template`` renders the conversation,
``processor(text=..., images=...)`` expands each image token and makes the pixel values, and the model
computes its own (1-D) positions. ``qwenvl/data/hf_items.py`` turns a record into a training example this
way; a family of this kind only says what is specific to its model: the model and processor classes, the
image token, which modules are vision tower and projector, and the tiny test checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from qwenvl.models.base import LLM, PROJECTOR, VISION_TOWER, GridThw, ModelFamily, TokenIds


@dataclass(frozen=True)
class ProcessorTokens:
    """The media token of an HF-processor family and the token strings a turn's text may not hold.

    Attributes:
        image (str): the processor's image token (``<image>`` for LLaVA), written once per image by the chat
            template and expanded by the processor.
        reserved (tuple[str, ...]): tokens that structure the chat (bos/eos of the released tokenizer).
    """

    image: str = "<image>"
    reserved: tuple[str, ...] = ()

    def structure(self) -> tuple[str, ...]:
        """Tokens never allowed in a turn's text (``qwenvl.data.validation.check_record``). The image token is
        not among them: our ``<image>`` tag is what a record writes where an image goes."""
        return self.reserved

    def image_id(self, tokenizer: Any) -> int:
        """Id of the image token in ``tokenizer``.

        Raises:
            ValueError: the tokenizer does not know the token.
        """
        token_id = tokenizer.convert_tokens_to_ids(self.image)
        unk = getattr(tokenizer, "unk_token_id", None)
        if token_id is None or (unk is not None and token_id == unk):
            raise ValueError(f"expected the tokenizer to know the image token {self.image!r} but found it is not in "
                             f"the vocabulary")
        return int(token_id)


@dataclass(frozen=True)
class HFProcessorFamily(ModelFamily):
    """A family whose items come from the checkpoint's Hugging Face processor (see the module docstring).

    Attributes (besides ``ModelFamily``'s):
        image_processor_class (str): the PIL image processor class the tiny checkpoint saves (works without
            torchvision; ``AutoProcessor`` loads it back).
        projector_prefixes (tuple[str, ...]): module paths of the projector (``multi_modal_projector``).
        flatten_refusal (str): why flattened batches / packing are refused for this family (start-up error).
    """

    tokens: Any = field(default_factory=ProcessorTokens)
    image_processor_class: str = ""
    projector_prefixes: tuple[str, ...] = ("multi_modal_projector",)
    flatten_refusal: str = ("its model computes 1-D positions from the attention mask, so samples flattened into "
                            "one row would attend across their boundaries")

    uses_processor_items: ClassVar[bool] = True
    rope_index = None  # 1-D positions: the model computes them

    # ------------------------------------------------------------------ tokens
    def token_ids(self, tokenizer: Any) -> TokenIds:
        """Not used by this kind (no ``ChatEncoder``); kept so callers that ask get a clear error."""
        raise TypeError(f"the {self.model_type} family renders chats with its processor's chat template; it has no "
                        f"Qwen chat-token ids (use qwenvl.data.hf_items.ProcessorItemBuilder)")

    def video_text(self, grid_thw: GridThw, merge_size: int, timestamps: Sequence[float] | None = None) -> str:
        """Raises: ValueError: this family trains on images only."""
        raise ValueError(f"the {self.model_type} family takes no videos")

    def video_block_lengths(self, grid_thw: GridThw, merge_size: int) -> list[int]:
        """Raises: ValueError: this family trains on images only."""
        raise ValueError(f"the {self.model_type} family takes no videos")

    def position_ids(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Raises: TypeError: the model computes its own 1-D positions."""
        raise TypeError(f"the {self.model_type} family has 1-D positions, computed by its model")

    # ------------------------------------------------------------- parameters
    def classify_parameter(self, name: str) -> str:
        """``projector`` under a projector prefix, ``vision_tower`` under the vision module, else ``llm``.

        Example:
            >>> LLAVA.classify_parameter("model.multi_modal_projector.linear_1.weight")
            'projector'
            >>> LLAVA.classify_parameter("model.vision_tower.vision_model.embeddings.patch_embedding.weight")
            'vision_tower'
        """
        projector = "|".join(re.escape(m) for m in self.projector_prefixes)
        if re.search(rf"(^|\.)({projector})(\.|$)", name):
            return PROJECTOR
        if re.search(rf"(^|\.){re.escape(self.vision_module)}\.", name):
            return VISION_TOWER
        return LLM

    # ------------------------------------------------------------ dummy pass
    media_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)  # the batch keys of the media this family takes

    def dummy_vision_features(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32,
                              device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """The LLM inputs of one black image, through the tower and the projector (``model.get_image_features``).

        Run on ranks whose micro-batch has no image (``QwenVLTrainer.compute_loss``), so every rank uses the
        tower and projector alike.

        Args:
            model (torch.nn.Module): the ``...ForConditionalGeneration`` (unwrapped; PEFT allowed).
            dtype (torch.dtype): the tower's dtype.
            device (torch.device | str): the tower's device.

        Returns:
            list[torch.Tensor]: the projected features, one (tokens, hidden) tensor per image.
        """
        config = model.config
        size = int(config.vision_config.image_size)
        channels = int(getattr(config.vision_config, "num_channels", 3))
        pixel_values = torch.zeros(1, channels, size, size, dtype=dtype, device=device)
        output = model.get_image_features(pixel_values=pixel_values, vision_feature_layer=config.vision_feature_layer,
                                          vision_feature_select_strategy=config.vision_feature_select_strategy)
        features = output.pooler_output if hasattr(output, "pooler_output") else output
        return list(features)

    # -------------------------------------------------------------- processor
    def vision_settings(self, checkpoint: str | Path | None = None) -> Any:
        """The released defaults (the processor itself holds the checkpoint's settings)."""
        return self.vision_defaults

    def processor_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of every ``processor(text=..., images=...)`` call that builds a training item
        (e.g. Gemma 3's ``do_pan_and_scan``); none by default."""
        return {}

    def collate_media(self, key: str, values: list[torch.Tensor]) -> torch.Tensor:
        """One batch tensor from the items' values of a non-per-token key (``pixel_values``, ``image_sizes``...):
        concatenated on dim 0 by default (one row per image). A family whose processor returns one row per
        sample (e.g. (1, images, 3, H, W)) overrides this.

        Args:
            key (str): the item key.
            values (list[torch.Tensor]): the items' values, those that have the key.

        Returns:
            torch.Tensor: the batch value.
        """
        return torch.cat(values, dim=0)

    def tiny_added_tokens(self) -> tuple[str, ...]:
        """Special tokens the tiny checkpoint's tokenizer gets on top of the shipped Qwen one (its ids reach
        ``tiny_config_kwargs`` under the token string itself); the image token by default."""
        return (self.tokens.image,)

    def tiny_processor(self, tokenizer: Any) -> Any:
        """The processor a tiny checkpoint saves (its tokenizer gets the image token); see the family."""
        raise NotImplementedError(f"{self.model_type}: no tiny processor")
