"""The second kind of family: chat layout, media expansion and image preprocessing follow the checkpoint's
Hugging Face processor (its chat template and image processor, the PIL variant where torchvision is absent),
with 1-D positions.

A Qwen family (``qwenvl/models/qwen2_vl.py`` ...) writes its own layout token by token and patchifies images
itself; a family of this kind asks the processor: ``processor.apply_chat_template`` renders the conversation,
``processor(text=..., images=...)`` expands each image token and makes the pixel values, and the model
computes its own (1-D) positions. ``qwenvl/data/hf_items.py`` turns a record into a training example this
way; a family of this kind only says what is specific to its model: the model and processor classes, the
image token, which modules are vision tower and projector, the hooks where its processor or model differs
(``HFProcessorFamily``'s docstring lists them) and the tiny test checkpoint. What several families share is here
once: the dummy vision pass (``black_image``, ``HFProcessorFamily.image_features``), anyres tiling
(``AnyresFamily``: LLaVA-NeXT, LLaVA-OneVision), and the tiny checkpoints' tower (``tiny_vision_config``; the LLM is
``qwenvl.models.base.tiny_text_config``) and processor (``HFProcessorFamily.tiny_processor_around``,
``reloaded_tokenizer``).

Every caller loads the processor with ``family.load_processor(path)``: ``AutoProcessor``, except where
transformers cannot build the released processor because its video processor needs torchvision (not installed):
InternVL, LLaVA-OneVision and SmolVLM then get the same processor without the video part
(``image_text_processor_class``), which saves folders naming the released class, as released checkpoints do.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import tempfile
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
        tokens (ProcessorTokens): the processor's image token and the chat's structure tokens.
        vision_module (str): the vision tower's module name (``vision_tower``; Idefics3: ``vision_model``).
        projector_modules (tuple[str, ...]): module names of the projector, anywhere in the model
            (``multi_modal_projector``; LLaVA-NeXT adds ``image_newline``, Idefics3 has ``connector``).
        image_processor_class (str): the PIL image processor class the tiny checkpoint saves (works without
            torchvision; ``AutoProcessor`` loads it back).
        flatten_refusal (str): why flattened batches / packing are refused for this family (start-up error).
        torchvision_video (bool): the released processor holds a video processor that needs torchvision
            (InternVL, LLaVA-OneVision, SmolVLM): ``load_processor`` falls back to the same processor without it
            (``image_text_processor_class``) where torchvision is missing, and the tiny checkpoint saves that one.
        video_refusal (str): why a video sample is refused (a counted bad sample, ``qwenvl.data.data_qwen``); ""
            where the model takes none.
        prefix_lm (ClassVar[bool]): a prefix-LM (PaliGemma): the prompt is the processor's prefix (attended
            bidirectionally, token type 0), the answer its suffix (token type 1, the learned part); items come from
            ``prefix_lm_inputs``, not from a chat template (``ProcessorItemBuilder.build_prefix_lm``).
        expands_image_text (ClassVar[bool]): the processor replaces each image token by a text that is not the
            token repeated (Gemma 3's ``\\n\\n<start_of_image>`` + soft tokens + ``<end_of_image>\\n\\n``,
            InternVL's ``<img>...</img>``, Idefics3's tiles): labels follow the processor's replacement offsets
            (``ProcessorItemBuilder.build_expanded``), a cut never falls before ``image_block_end``.
        media_rows_per_item (ClassVar[bool]): the processor returns one row per sample (Idefics3 / SmolVLM:
            pixel_values (1, images, 3, H, W)): ``collate_media`` gets one value per item of the batch, None where
            the item has no such key, so it can pad as one processor call of several samples pads. False: only
            the values present.
        language_module (ClassVar[str]): ``ModelFamily``'s (``language_model``); Idefics3 / SmolVLM: ``text_model``.
        selects_vision_features (ClassVar[bool]): ``get_image_features`` takes the config's
            ``vision_feature_layer`` and ``vision_feature_select_strategy`` (LLaVA-style); PaliGemma, Gemma 3 and
            Idefics3 take neither (``image_features``).
        media_keys (ClassVar[tuple[str, ...]]): the batch keys of the media this family takes.

    Hooks a family overrides where its model differs (defaults in brackets): ``processor_kwargs`` (none),
    ``processor_images`` (the sample's images as a list), ``collate_media`` (dim-0 concat), ``end_of_turn`` (the
    tokenizer's eos), ``image_block_end`` (the image token), ``fix_rendered`` (unchanged), ``prefix_lm_inputs``
    (prefix-LM only), ``dummy_vision_features`` (one black image of the tower's size), ``tiny_added_tokens`` (the
    image token), ``tiny_config_kwargs`` and ``tiny_processor`` (no default; ``tiny_processor_around`` builds it).
    """

    tokens: Any = field(default_factory=ProcessorTokens)
    vision_module: str = "vision_tower"
    projector_modules: tuple[str, ...] = ("multi_modal_projector",)
    image_processor_class: str = ""
    flatten_refusal: str = ("its model computes 1-D positions from the attention mask, so samples flattened into "
                            "one row would attend across their boundaries")
    torchvision_video: bool = False
    video_refusal: str = ""

    uses_processor_items: ClassVar[bool] = True
    rope_index = None  # 1-D positions: the model computes them
    prefix_lm: ClassVar[bool] = False
    expands_image_text: ClassVar[bool] = False
    media_rows_per_item: ClassVar[bool] = False
    selects_vision_features: ClassVar[bool] = True
    media_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)

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
        """``projector`` under a ``projector_modules`` path, ``vision_tower`` under the vision module, else ``llm``.

        Example:
            >>> LLAVA.classify_parameter("model.multi_modal_projector.linear_1.weight")
            'projector'
            >>> LLAVA.classify_parameter("model.vision_tower.vision_model.embeddings.patch_embedding.weight")
            'vision_tower'
        """
        projector = "|".join(re.escape(m) for m in self.projector_modules)
        if re.search(rf"(^|\.)({projector})(\.|$)", name):
            return PROJECTOR
        if re.search(rf"(^|\.){re.escape(self.vision_module)}\.", name):
            return VISION_TOWER
        return LLM

    # ------------------------------------------------------------ dummy pass
    def dummy_vision_features(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32,
                              device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """The LLM inputs of one black image of the tower's size, through the tower and the projector
        (``image_features``).

        Run on ranks whose micro-batch has no image (``QwenVLTrainer.compute_loss``), so every rank uses the
        tower and projector alike.

        Args:
            model (torch.nn.Module): the ``...ForConditionalGeneration`` (unwrapped; PEFT allowed).
            dtype (torch.dtype): the tower's dtype.
            device (torch.device | str): the tower's device.

        Returns:
            list[torch.Tensor]: the projected features, one (tokens, hidden) tensor per image.
        """
        return self.image_features(model, black_image(model.config.vision_config, dtype, device, 1))

    def image_features(self, model: torch.nn.Module, pixel_values: torch.Tensor, **kwargs: Any) -> list[torch.Tensor]:
        """``model.get_image_features(pixel_values=...)`` as one (tokens, hidden) tensor per image: with the config's
        feature layer and select strategy where the family ``selects_vision_features``.

        Args:
            model (torch.nn.Module): the ``...ForConditionalGeneration``.
            pixel_values (torch.Tensor): the images, as the model takes them.
            **kwargs (Any): further ``get_image_features`` arguments (``image_sizes``, ``pixel_attention_mask``...).

        Returns:
            list[torch.Tensor]: the projected features per image (a model that packs all images' features into one
            (tokens, hidden) tensor, as LLaVA-NeXT does, gives that tensor).
        """
        config = model.config
        if self.selects_vision_features:
            kwargs = {"vision_feature_layer": config.vision_feature_layer,
                      "vision_feature_select_strategy": config.vision_feature_select_strategy, **kwargs}
        output = model.get_image_features(pixel_values=pixel_values, **kwargs)
        features = output.pooler_output if hasattr(output, "pooler_output") else output
        return [features] if isinstance(features, torch.Tensor) and features.dim() == 2 else list(features)

    def unread_vision_parameters(self, model: torch.nn.Module) -> list[str]:
        """Trainable vision-tower parameters the LLM's image inputs do not depend on (the projector is always read).

        LLaVA-style models read a hidden layer before the tower's last (``vision_feature_layer`` -2) and skip its
        pooling head and final norm: those weights never get a gradient, so DDP without
        ``find_unused_parameters`` stops at step 2. Found exactly, not from names: one black image through
        ``dummy_vision_features`` (the path the model's image features take) and the gradient of their sum; a
        parameter the graph does not reach is unread.

        Args:
            model (torch.nn.Module): the ``...ForConditionalGeneration``, weights in memory (not ZeRO-3 partitioned).

        Returns:
            list[str]: parameter names, in ``named_parameters`` order (no ``.grad`` is written).

        Example:
            >>> LLAVA.unread_vision_parameters(tiny_llava)  # a 2-layer CLIP tower read at layer -2
            ['model.vision_tower.encoder.layers.1.self_attn.k_proj.weight', ...,
             'model.vision_tower.post_layernorm.bias']
        """
        tower = {name: param for name, param in model.named_parameters()
                 if param.requires_grad and self.classify_parameter(name) == VISION_TOWER}
        if not tower:
            return []
        reference = next(iter(tower.values()))
        features = self.dummy_vision_features(model, reference.dtype, reference.device)
        total = torch.stack([f.float().sum() for f in features]).sum()
        grads = torch.autograd.grad(total, list(tower.values()), allow_unused=True)  # no .grad is written
        return [name for name, grad in zip(tower, grads) if grad is None]

    # -------------------------------------------------------------- processor
    def vision_settings(self, checkpoint: str | Path | None = None) -> Any:
        """The released defaults (the processor itself holds the checkpoint's settings)."""
        return self.vision_defaults

    def processor_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of every ``processor(text=..., images=...)`` call that builds a training item
        (e.g. Gemma 3's ``do_pan_and_scan``); none by default."""
        return {}

    def processor_images(self, images: Sequence[Any]) -> Any:
        """The ``images=`` argument of the processor call that builds one sample's item: the list of its images
        (None when it has none) by default. LLaVA-OneVision nests it (``[images]``): its processor tiles the image
        of a single-image sample and gives each image of a multi-image sample one tile, knowing the images per
        sample only from the nesting (``batch_num_images``)."""
        return list(images) or None

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

    def prefix_lm_inputs(self, processor: Any, prompt: str, answer: str | None,
                         images: Sequence[Any]) -> dict[str, Any]:
        """A prefix-LM family's processor output for one prompt (prefix) and its answer (suffix; None: a generation
        prompt): ``input_ids``, ``attention_mask``, ``token_type_ids`` (1, L) and the media keys; only called when
        ``prefix_lm``.

        Raises:
            NotImplementedError: the family is not a prefix-LM.
        """
        raise NotImplementedError(f"{self.model_type}: not a prefix-LM family")

    def end_of_turn(self, tokenizer: Any) -> str | None:
        """The token that closes every answer and is learned with it (``close_answers``): the tokenizer's eos by
        default (LLaVA's ``</s>``); Gemma 3 overrides it (``<end_of_turn>``)."""
        return tokenizer.eos_token

    def image_block_end(self) -> str:
        """The last token of an image's tokens, which a cut at ``model_max_length`` must not fall before: the image
        token by default (``expands_image_text`` families name their block's closing token)."""
        return self.tokens.image

    def load_processor(self, path: str | Path, **kwargs: Any) -> Any:
        """The checkpoint's processor: ``AutoProcessor.from_pretrained(path, **kwargs)``.

        For a ``torchvision_video`` family where torchvision is missing (transformers then cannot build the
        released processor: its video processor needs it), the same processor without the video part, built
        from the folder's tokenizer, PIL image processor, settings and chat template
        (``image_text_processor_class``); it refuses videos naming torchvision and saves as the released class.

        Args:
            path (str | Path): checkpoint folder or hub id.
            **kwargs: passed to ``from_pretrained`` (``cache_dir`` ...).

        Returns:
            Any: the processor.

        Raises:
            ImportError: transformers' error for another missing package.
        """
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(path, **kwargs)
        except ImportError as error:
            if not (self.torchvision_video and needs_torchvision(error)):
                raise
        return image_text_processor_class(self.processor_class).from_pretrained(path, **kwargs)

    def fix_rendered(self, text: str, spans: list[tuple[int, int]],
                     end_of_turn: str | None) -> tuple[str, list[tuple[int, int]]]:
        """The rendered chat as the model was trained on it, before answers are closed (``close_answers``) and
        tokenized: unchanged by default. LLaVA-NeXT overrides it: its released Mistral template closes answers with
        a literal ``<\\s>`` (for ``</s>``), which becomes the end-of-turn token.

        Args:
            text (str): the rendered conversation.
            spans (list[tuple[int, int]]): the assistant turns' character spans (``answer_spans``).
            end_of_turn (str | None): ``end_of_turn(tokenizer)``.

        Returns:
            tuple[str, list[tuple[int, int]]]: the text and the spans in it.
        """
        return text, spans

    def tiny_added_tokens(self) -> tuple[str, ...]:
        """Special tokens the tiny checkpoint's tokenizer gets on top of the shipped Qwen one (its ids reach
        ``tiny_config_kwargs`` under the token string itself); the image token by default."""
        return (self.tokens.image,)

    def tiny_processor(self, tokenizer: Any) -> Any:
        """The processor a tiny checkpoint saves (its tokenizer has ``tiny_added_tokens``); see the family."""
        raise NotImplementedError(f"{self.model_type}: no tiny processor")

    def tiny_processor_around(self, tokenizer: Any, image_processor: Any, video: dict[str, Any] | None = None,
                              **settings: Any) -> Any:
        """A ``processor_class`` of ``tokenizer``, ``image_processor``, the family's chat template and ``settings``
        (``tiny_processor`` builds its pieces and calls this).

        A ``torchvision_video`` family gets ``image_text_processor_class(processor_class)`` (the released processor
        without its video processor), keeping ``video``, the video processor's settings, under its released type
        (``InternVLProcessor``: ``InternVLVideoProcessor``); saved, it names ``processor_class``.

        Args:
            tokenizer (Any): the tiny tokenizer (it knows ``tiny_added_tokens``).
            image_processor (Any): the PIL image processor (``image_processor_class``).
            video (dict[str, Any] | None): the video processor's settings (``torchvision_video`` families).
            **settings (Any): the processor's own settings (``image_seq_length``, ``image_token``...).

        Returns:
            Any: the processor.
        """
        import transformers

        if self.torchvision_video:
            settings["video_processor_config"] = {
                "video_processor_type": self.processor_class.removesuffix("Processor") + "VideoProcessor", **video}
            processor_type = image_text_processor_class(self.processor_class)
        else:
            processor_type = getattr(transformers, self.processor_class)
        return processor_type(image_processor=image_processor, tokenizer=tokenizer, chat_template=self.chat_template,
                              **settings)


def tiny_vision_config(model_type: str, **settings: Any) -> dict[str, Any]:
    """The tiny test checkpoints' vision tower: depth 2, width 32 (MLP 64), 2 heads, of ``model_type``
    (``clip_vision_model``, ``siglip_vision_model``...), with the family's ``settings`` (patch and image size...).

    Example:
        >>> tiny_vision_config("clip_vision_model", patch_size=14)["num_hidden_layers"]
        2
    """
    return {"model_type": model_type, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, **settings}


# Why a ``torchvision_video`` family refuses a video sample (its ``video_refusal``).
TORCHVISION_VIDEO_REFUSAL = "video training is not supported yet (its video processor needs torchvision, an optional GPU extra)"


def black_image(vision_config: Any, dtype: torch.dtype, device: torch.device | str, *leading: int,
                fill: float = 0.0) -> torch.Tensor:
    """Pixel values of black images at the tower's size, for a dummy vision pass.

    Args:
        vision_config (Any): ``model.config.vision_config``: ``image_size`` (a side, or (height, width) as
            InternVL's), ``num_channels`` (3 where absent).
        dtype (torch.dtype): the tower's dtype.
        device (torch.device | str): the tower's device.
        *leading (int): the leading dims (1: one image; 1, 5: one image of 5 tiles).
        fill (float): the value (a black pixel after normalisation: 0 for the LLaVA-style zeros, -1 where mean =
            std = 0.5 and zeros would be taken for padding, as Idefics3 does).

    Returns:
        torch.Tensor: (*leading, channels, height, width).

    Example:
        >>> black_image(SiglipVisionConfig(image_size=32), torch.float32, "cpu", 1).shape
        torch.Size([1, 3, 32, 32])
    """
    size = vision_config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    channels = int(getattr(vision_config, "num_channels", 3))
    return torch.full((*leading, channels, int(height), int(width)), fill, dtype=dtype, device=device)


def pad_tiles(values: list[torch.Tensor]) -> torch.Tensor:
    """Items' (images, tiles, 3, H, W) pixel values as one batch, zero-padded to the most tiles, as the
    processor pads the tiles of one call (the model keeps each image's real tiles, known from ``image_sizes``).

    Args:
        values (list[torch.Tensor]): one (images_i, tiles_i, 3, H, W) tensor per item.

    Returns:
        torch.Tensor: (sum of images_i, max tiles_i, 3, H, W).

    Example:
        >>> pad_tiles([torch.ones(1, 3, 3, 2, 2), torch.ones(2, 5, 3, 2, 2)]).shape
        torch.Size([3, 5, 3, 2, 2])
    """
    most = max(value.shape[1] for value in values)
    return torch.cat([torch.nn.functional.pad(v, (0, 0, 0, 0, 0, 0, 0, most - v.shape[1])) for v in values], dim=0)


@dataclass(frozen=True)
class AnyresFamily(HFProcessorFamily):
    """An HF-processor family that tiles images "anyres" (LLaVA-NeXT, LLaVA-OneVision): ``pixel_values`` (images,
    tiles, 3, H, W) zero-padded to the most tiles of the call, ``image_sizes`` (images, 2), the model unpadding each
    image's tiles and closing each feature row with ``image_newline``."""

    def collate_media(self, key: str, values: list[torch.Tensor]) -> torch.Tensor:
        """``pixel_values``: tiles zero-padded to the batch's most (``pad_tiles``); other keys (``image_sizes``,
        OneVision's ``batch_num_images``) concatenated, as one processor call over the samples makes them.

        Args:
            key (str): the item key.
            values (list[torch.Tensor]): the items' values, those that have the key.

        Returns:
            torch.Tensor: the batch value.
        """
        if key == "pixel_values":
            return pad_tiles(values)
        return torch.cat(values, dim=0)

    def dummy_vision_features(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32,
                              device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """The LLM inputs of one black square image of the tower's size, tiled as the processor tiles it (the
        whole image, then the tiles of the best grid resolution for its size), through tower and projector.

        Args:
            model (torch.nn.Module): the ``...ForConditionalGeneration`` (``get_image_features`` takes
                ``pixel_values`` (images, tiles, 3, H, W) and ``image_sizes``).
            dtype (torch.dtype): the tower's dtype.
            device (torch.device | str): the tower's device.

        Returns:
            list[torch.Tensor]: the image's projected features, (tokens, hidden).
        """
        from transformers.image_processing_utils import select_best_resolution

        size = int(model.config.vision_config.image_size)
        height, width = select_best_resolution((size, size), model.config.image_grid_pinpoints)
        tiles = 1 + (height // size) * (width // size)
        pixel_values = black_image(model.config.vision_config, dtype, device, 1, tiles)
        return self.image_features(model, pixel_values, image_sizes=torch.tensor([[size, size]], device=device),
                                   **self.tiled_feature_kwargs(device))

    def tiled_feature_kwargs(self, device: torch.device | str) -> dict[str, Any]:
        """Further ``get_image_features`` arguments of the dummy image (OneVision's ``batch_num_images``); none."""
        return {}


def reloaded_tokenizer(tokenizer: Any, **kwargs: Any) -> Any:
    """``tokenizer`` saved and loaded back with ``kwargs`` (named tokens: ``bos_token=``,
    ``extra_special_tokens=``), so a tiny checkpoint's tokenizer names its tokens as the released one does."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder, **kwargs)


# transformers' ImportError for a class whose backend is missing names it so (``requires_backends``).
TORCHVISION_MISSING = "requires the Torchvision library"
VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"  # a released checkpoint's video processor settings


def needs_torchvision(error: BaseException) -> bool:
    """True for transformers' error for a class that needs torchvision (not installed).

    Example:
        >>> needs_torchvision(ImportError("InternVLVideoProcessor requires the Torchvision library but it was not "
        ...                               "found in your environment"))
        True
    """
    return isinstance(error, ImportError) and TORCHVISION_MISSING in str(error)


@functools.cache  # one class per released processor class, so pickling finds it again
def image_text_processor_class(processor_class: str) -> type:
    """transformers' ``processor_class`` (e.g. ``InternVLProcessor``) without its video processor, for where
    torchvision is missing: ``<Name>ImageTextProcessor``, a subclass, so images and text are expanded exactly as
    the released processor does.

    - ``from_pretrained(path)`` builds it from the folder's pieces: ``AutoTokenizer``, ``AutoImageProcessor``
      (the PIL class without torchvision), the processor settings and chat template (``processor_config.json``,
      ``chat_template.jinja``); the video processor's settings are kept, not built.
    - ``save_pretrained`` writes the folder a released checkpoint has: ``processor_class`` is
      ``processor_class`` (processor and tokenizer config), the video settings kept under ``video_processor``, so
      ``AutoProcessor`` loads it with plain transformers where torchvision is installed.
    - a call with ``videos=``, or a chat with a video part, is refused, naming torchvision. The chat is rendered by
      ``ProcessorMixin.apply_chat_template``: ``SmolVLMProcessor``'s own override only adds video defaults read
      from its video processor.

    Args:
        processor_class (str): the transformers processor class (``InternVLProcessor``, ``LlavaOnevisionProcessor``,
            ``SmolVLMProcessor``).

    Returns:
        type: the processor class (importable as ``qwenvl.models.hf_family.<Name>ImageTextProcessor``).
    """
    import transformers
    from transformers import ProcessorMixin
    from transformers.utils import cached_file

    stock = getattr(transformers, processor_class)
    name = processor_class.removesuffix("Processor") + "ImageTextProcessor"
    signature = inspect.signature(stock.__init__)
    parameters = [p for key, p in signature.parameters.items() if key != "video_processor"]
    settings_names = {p.name for p in parameters} - {"self", "image_processor", "tokenizer", "kwargs"}
    refusal = f"{processor_class}'s video processor needs torchvision, which is not installed"

    class ImageTextProcessor(stock):  # type: ignore[valid-type, misc]
        def __init__(self, image_processor: Any, tokenizer: Any, **kwargs: Any) -> None:
            self.video_processor_config = kwargs.pop("video_processor_config", None)
            # The processor's attributes come from this class's signature (image processor, tokenizer): the
            # video processor passed on (None) is none of them.
            super().__init__(image_processor, tokenizer, None, **kwargs)

        def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any) -> Any:
            if videos is not None:
                raise ValueError(f"{name} takes images and text only, but found videos: {refusal}")
            return super().__call__(images=images, text=text, **kwargs)

        def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
            if has_video_part(conversation):
                raise ValueError(f"{name} takes images and text only, but found a video in the chat: {refusal}")
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

        def to_dict(self) -> dict[str, Any]:
            output = super().to_dict()
            output["processor_class"] = processor_class
            if self.video_processor_config is not None:
                output["video_processor"] = dict(self.video_processor_config)
            return output

        def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs: Any) -> Any:
            files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
            tokenizer_config = Path(save_directory) / "tokenizer_config.json"
            if tokenizer_config.is_file():  # the tokenizer names the processor class too
                config = json.loads(tokenizer_config.read_text(encoding="utf-8"))
                if config.get("processor_class") == name:
                    config["processor_class"] = processor_class
                    tokenizer_config.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
            return files

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> Any:
            path = str(pretrained_model_name_or_path)
            processor_dict, _ = stock.get_processor_dict(path, **kwargs)
            video = processor_dict.get("video_processor")
            if video is None:  # a released checkpoint keeps it in its own file
                video_file = cached_file(path, VIDEO_PROCESSOR_FILE, cache_dir=kwargs.get("cache_dir"),
                                         _raise_exceptions_for_missing_entries=False)
                video = json.loads(Path(video_file).read_text(encoding="utf-8")) if video_file else None
            settings = {key: value for key, value in processor_dict.items() if key in settings_names}
            return cls(transformers.AutoImageProcessor.from_pretrained(path, **kwargs),
                       transformers.AutoTokenizer.from_pretrained(path, **kwargs), video_processor_config=video,
                       **settings)

    # Its settings are the released class's (``to_dict`` saves them, ``from_pretrained`` passes them on).
    ImageTextProcessor.__init__.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    ImageTextProcessor.__name__ = ImageTextProcessor.__qualname__ = name
    ImageTextProcessor.__module__ = __name__
    ImageTextProcessor.__doc__ = f"``{processor_class}`` of images and text: no video processor (it needs torchvision)."
    return ImageTextProcessor


def has_video_part(conversation: Any) -> bool:
    """True where a chat (a list of messages, or a list of such lists) has a ``{"type": "video"}`` content part."""
    chats = conversation if conversation and isinstance(conversation[0], (list, tuple)) else [conversation]
    return any(isinstance(part, dict) and part.get("type") == "video"
               for chat in chats for message in chat
               for part in (message.get("content") if isinstance(message.get("content"), list) else []))


def __getattr__(name: str) -> Any:
    """``<Name>ImageTextProcessor`` (``image_text_processor_class``), made on first use; unpickling finds it here."""
    if name.endswith("ImageTextProcessor"):
        return image_text_processor_class(name.removesuffix("ImageTextProcessor") + "Processor")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
