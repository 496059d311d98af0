"""What every model family provides: the interface the data pipeline, trainer and tools ask.

A family (``qwenvl/models/<name>.py``) owns everything specific to one generation of
Qwen-VL: the model class, the special tokens, the chat layout, how an image or a video
becomes tokens, the vision geometry and normalisation, the position-id rule, which
parameters are LLM / vision tower / projector, the LoRA target defaults, the dummy vision
input that keeps ranks in step and the tiny test configuration. Nothing else in the
package should compare ``model_type`` strings or spell token strings.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from qwenvl.data.vision import VisionConfig

LLM, VISION_TOWER, PROJECTOR = "llm", "vision_tower", "projector"

GridThw = Sequence[int]


@dataclass(frozen=True)
class TokenIds:
    """Ids of the special tokens, read from a tokenizer (``SpecialTokens.ids``)."""

    im_start: int
    im_end: int
    end_of_text: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int


@dataclass(frozen=True)
class SpecialTokens:
    """The token strings of the chat and vision layout (the same for every Qwen-VL generation so far)."""

    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"
    end_of_text: str = "<|endoftext|>"
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"
    image_pad: str = "<|image_pad|>"
    video_pad: str = "<|video_pad|>"

    def structure(self) -> tuple[str, ...]:
        """Every token that structures the chat or a vision block, ``<|vision_pad|>`` included (no family
        writes it, but the model would still treat it as a vision token): never allowed in a turn's text.

        Example:
            >>> "<|vision_pad|>" in SpecialTokens().structure()
            True
        """
        return tuple(vars(self).values()) + ("<|vision_pad|>",)

    def ids(self, tokenizer: Any) -> TokenIds:
        """Look every token up in ``tokenizer``; never a hard-coded number.

        Args:
            tokenizer (Any): a Hugging Face tokenizer.

        Returns:
            TokenIds: one id per token.

        Raises:
            ValueError: a token is not in the vocabulary (names the token).

        Example:
            >>> SpecialTokens().ids(tokenizer).image_pad
            151655
        """
        unk = getattr(tokenizer, "unk_token_id", None)
        found: dict[str, int] = {}
        for name, token in vars(self).items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or (unk is not None and token_id == unk):
                raise ValueError(
                    f"expected the tokenizer to know the token {token!r} but found it is not in the "
                    f"vocabulary; is this a Qwen-VL tokenizer?"
                )
            found[name] = int(token_id)
        return TokenIds(**found)


@dataclass(frozen=True)
class VisionSettings:
    """Image and video processor settings of a checkpoint (``preprocessor_config.json``).

    Pixel limits are in pixels: ``min_pixels``/``max_pixels`` per image,
    ``video_min_pixels``/``video_max_pixels`` per video (per frame for Qwen2/2.5-VL, summed
    over the sampled frames for Qwen3-VL, as each model's video processor counts them).
    """

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    min_pixels: int
    max_pixels: int
    video_min_pixels: int
    video_max_pixels: int
    rescale_factor: float = 1 / 255
    video_fps: float | None = None
    video_min_frames: int = 4
    video_max_frames: int = 768

    @property
    def factor(self) -> int:
        """Image sides are multiples of this: one LLM token per ``factor x factor`` pixels."""
        return self.patch_size * self.merge_size

    def image_config(self, min_pixels: int | None = None, max_pixels: int | None = None) -> VisionConfig:
        """The ``VisionConfig`` the image code takes, optionally with other pixel limits.

        Example:
            >>> QWEN3_VL.vision_defaults.image_config(max_pixels=1024 * 32 * 32).factor
            32
        """
        return VisionConfig(
            patch_size=self.patch_size,
            merge_size=self.merge_size,
            temporal_patch_size=self.temporal_patch_size,
            image_mean=self.image_mean,
            image_std=self.image_std,
            rescale_factor=self.rescale_factor,
            min_pixels=self.min_pixels if min_pixels is None else int(min_pixels),
            max_pixels=self.max_pixels if max_pixels is None else int(max_pixels),
        )

    def updated(self, processor_config: dict[str, Any], video_config: dict[str, Any] | None = None) -> VisionSettings:
        """These settings overridden by what a checkpoint's processor config files say.

        Args:
            processor_config (dict[str, Any]): ``preprocessor_config.json``: ``patch_size``,
                ``merge_size``, ``temporal_patch_size``, ``image_mean``, ``image_std``,
                ``rescale_factor`` and the pixel limits as ``size`` {``shortest_edge``,
                ``longest_edge``} or ``min_pixels``/``max_pixels``.
            video_config (dict[str, Any] | None): ``video_preprocessor_config.json`` (same
                keys, plus ``fps``, ``min_frames``, ``max_frames``), when the checkpoint has one.

        Returns:
            VisionSettings: a new object; keys that are absent keep their value.
        """
        image = _limits(processor_config)
        changes: dict[str, Any] = {}
        for key in ("patch_size", "merge_size", "temporal_patch_size"):
            if processor_config.get(key) is not None:
                changes[key] = int(processor_config[key])
        for key in ("image_mean", "image_std"):
            if processor_config.get(key) is not None:
                changes[key] = tuple(float(x) for x in processor_config[key])
        if processor_config.get("rescale_factor") is not None:
            changes["rescale_factor"] = float(processor_config["rescale_factor"])
        changes.update({name: value for name, value in zip(("min_pixels", "max_pixels"), image) if value})
        if video_config:
            video = _limits(video_config)
            changes.update({name: value for name, value in zip(("video_min_pixels", "video_max_pixels"), video)
                            if value})
            if video_config.get("fps") is not None:
                changes["video_fps"] = float(video_config["fps"])
            for key, name in (("min_frames", "video_min_frames"), ("max_frames", "video_max_frames")):
                if video_config.get(key) is not None:
                    changes[name] = int(video_config[key])
        return replace(self, **changes)


def _limits(config: dict[str, Any]) -> tuple[int | None, int | None]:
    """(min, max) pixels of a processor config: ``size`` wins over ``min_pixels``/``max_pixels``."""
    size = config.get("size") or {}
    low = size.get("shortest_edge", config.get("min_pixels"))
    high = size.get("longest_edge", config.get("max_pixels"))
    return (int(low) if low else None), (int(high) if high else None)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when the file does not exist."""
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def tiny_text_config(token_ids: dict[str, int], model_type: str | None = "qwen2", **overrides: Any) -> dict[str, Any]:
    """The tiny test checkpoints' LLM: a Qwen2 of hidden 64, 2 layers, 4 heads (head_dim 16), 2 kv heads, over the
    shipped Qwen tokenizer's vocabulary (151,936 rows: the released embedding size, padded past the tokenizer).

    Args:
        token_ids (dict[str, int]): ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` of the tokenizer.
        model_type (str | None): the ``model_type`` key (``qwen2`` for a family whose released LLM is another:
            LLaVA's Llama, InternVL's Qwen2.5); None leaves it out (the top config knows its text config's type).
        **overrides (Any): keys to change or add (``max_position_embeddings``, Qwen2-VL's mrope
            ``rope_parameters``...).

    Returns:
        dict[str, Any]: the text config as a dict.

    Example:
        >>> tiny_text_config(ids, max_position_embeddings=4096)["max_position_embeddings"]
        4096
    """
    config: dict[str, Any] = {} if model_type is None else {"model_type": model_type}
    config.update({
        "vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "bos_token_id": token_ids["bos_token_id"], "eos_token_id": token_ids["eos_token_id"],
        "pad_token_id": token_ids["pad_token_id"], "dtype": "float32",
    })
    config.update(overrides)
    return config


@dataclass(frozen=True)
class ModelFamily(ABC):
    """One Qwen-VL generation. Subclasses fill the fields and the abstract methods.

    Attributes:
        model_type (str): ``config.model_type`` this family serves.
        model_class_name (str): the transformers class to load, e.g.
            ``Qwen2_5_VLForConditionalGeneration``.
        processor_class (str): the transformers processor class of released checkpoints.
        default_system_prompt (str | None): system turn written when a conversation has none;
            None writes no system turn.
        chat_template (str): Jinja template that renders the released layout (written into
            tiny checkpoints; the released checkpoints ship their own).
        vision_defaults (VisionSettings): the released processor settings, used where the
            checkpoint has no processor config.
        lora_targets (tuple[str, ...]): default ``--lora_target_modules`` (LLM linear layers).
        projector_modules (tuple[str, ...]): children of ``visual`` that are the projector.
        uses_second_per_grid_ts (bool): the model takes ``second_per_grid_ts`` for videos (and its
            position ids scale video time by it and ``tokens_per_second``).
        tokens (SpecialTokens): token strings.
        rope_index (ClassVar): the position-id rule (see ``position_ids``), set by each subclass.
        grounding_range (ClassVar): the frame of grounding boxes in answers: None = absolute pixels of
            the resized image, N = 0..N relative (see ``grounding_scale``).
    """

    model_type: str
    model_class_name: str
    processor_class: str
    default_system_prompt: str | None
    chat_template: str
    vision_defaults: VisionSettings
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    projector_modules: tuple[str, ...] = ("merger",)
    uses_second_per_grid_ts: bool = False
    tokens: SpecialTokens = field(default_factory=SpecialTokens)
    vision_module: str = "visual"
    # The position-id rule, a ``qwenvl.data.rope2d.get_rope_index_*`` function (set in the subclass:
    # ``rope_index = staticmethod(get_rope_index_2)``); ``position_ids`` calls it.
    rope_index: ClassVar[Callable[..., tuple[torch.Tensor, torch.Tensor]]]
    # The frame of grounding coordinates in answers (``(x1,y1),(x2,y2)`` or ``"bbox_2d": [...]``): None =
    # absolute pixels of the resized image the model sees (Qwen2.5-VL); N = relative, 0..N across the
    # image's width and height (Qwen2-VL and Qwen3-VL: 1000). ``grounding_scale`` turns it into pixels.
    grounding_range: ClassVar[int | None] = None
    # False: the family writes its own chat layout (``ChatEncoder``) and Qwen vision blocks. True: its items come
    # from the checkpoint's Hugging Face processor (``qwenvl/models/hf_family.py``, ``qwenvl/data/hf_items.py``).
    uses_processor_items: ClassVar[bool] = False
    # The batch keys of the media the model takes (the trainer's dummy vision passes stand in for missing ones).
    media_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_values_videos")
    # The LLM submodule the model calls with ``inputs_embeds=`` (where the trainer's dummy vision pass attaches).
    language_module: ClassVar[str] = "language_model"

    # ------------------------------------------------------------------ model
    def model_class(self) -> type:
        """The transformers model class (imported on demand).

        Example:
            >>> family_for("qwen3_vl_moe").model_class().__name__
            'Qwen3VLMoeForConditionalGeneration'
        """
        import transformers

        return getattr(transformers, self.model_class_name)

    def configure_router_aux_loss(self, config: Any, coef: float | None) -> bool:
        """Turn the MoE router load-balancing loss on in ``config`` (dense families: nothing to do).

        Returns:
            bool: whether the model adds an aux loss to its loss.
        """
        return False

    def token_ids(self, tokenizer: Any) -> TokenIds:
        """Ids of this family's special tokens in ``tokenizer`` (see ``SpecialTokens.ids``)."""
        return self.tokens.ids(tokenizer)

    # ------------------------------------------------------------ chat layout
    def system_text(self, system: str | None = None) -> str:
        """The system turn: ``system`` when given, else the default prompt, else nothing.

        Example:
            >>> family_for("qwen3_vl").system_text(), family_for("qwen2_5_vl").system_text()
            ('', '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n')
        """
        text = self.default_system_prompt if system is None else system
        return "" if text is None else self.turn_text("system", text)

    def turn_text(self, role: str, content: str) -> str:
        """``<|im_start|>{role}\\n{content}<|im_end|>\\n``."""
        return f"{self.tokens.im_start}{role}\n{content}{self.tokens.im_end}\n"

    def generation_prompt(self) -> str:
        """What opens the answer at inference: ``<|im_start|>assistant\\n``."""
        return f"{self.tokens.im_start}assistant\n"

    def chat_text(self, turns: Sequence[tuple[str, str]], system: str | None = None,
                  add_generation_prompt: bool = False) -> str:
        """A whole conversation in the released layout; turn contents are used as they are.

        Args:
            turns (Sequence[tuple[str, str]]): (role, content) pairs, roles ``user``/``assistant``.
            system (str | None): system prompt; None uses the family's default (or none).
            add_generation_prompt (bool): end with an open assistant turn.

        Returns:
            str: the text to tokenize.
        """
        text = self.system_text(system) + "".join(self.turn_text(role, content) for role, content in turns)
        return text + (self.generation_prompt() if add_generation_prompt else "")

    def image_text(self, grid_thw: GridThw, merge_size: int) -> str:
        """An image as text: ``<|vision_start|>`` + pad x (t*h*w / merge**2) + ``<|vision_end|>``.

        Example:
            >>> family_for("qwen2_5_vl").image_text((1, 4, 4), 2).count("<|image_pad|>")
            4
        """
        t, h, w = (int(x) for x in grid_thw)
        return self.tokens.vision_start + self.tokens.image_pad * (t * h * w // merge_size**2) + self.tokens.vision_end

    @abstractmethod
    def video_text(self, grid_thw: GridThw, merge_size: int, timestamps: Sequence[float] | None = None) -> str:
        """A video as text, pads expanded (see the family)."""

    @abstractmethod
    def video_block_lengths(self, grid_thw: GridThw, merge_size: int) -> list[int]:
        """Pad tokens of each vision block a video is written as, in order."""

    def video_frames(
        self, num_frames: int, fps: float, height: int, width: int, data_args: Any,
        settings: VisionSettings | None = None,
    ) -> tuple[np.ndarray, int, int, list[float]] | None:
        """This family's own video sampling, or None for the Qwen2/2.5-VL rule of ``qwenvl.data.video`` (SPEC 7).

        Args:
            num_frames (int): frames in the video (container metadata).
            fps (float): its frame rate.
            height (int): frame height in pixels.
            width (int): frame width in pixels.
            data_args (Any): ``DataArguments`` (the video flags).
            settings (VisionSettings | None): the checkpoint's processor settings; None = released defaults.

        Returns:
            tuple[np.ndarray, int, int, list[float]] | None: (frame indices, resized height,
            resized width, seconds of each temporal patch), or None.
        """
        return None

    # -------------------------------------------------------------- grounding
    def grounding_scale(self, width: int, height: int) -> tuple[float, float]:
        """Pixels of the resized ``width`` x ``height`` image per unit of an answer's grounding coordinate (x, y).

        Example:
            >>> family_for("qwen2_5_vl").grounding_scale(644, 476), family_for("qwen3_vl").grounding_scale(640, 480)
            ((1.0, 1.0), (0.64, 0.48))
        """
        if self.grounding_range is None:
            return 1.0, 1.0
        return width / self.grounding_range, height / self.grounding_range

    def grounding_frame(self) -> str:
        """The grounding coordinate frame in words, for reports.

        Example:
            >>> family_for("qwen3_vl").grounding_frame()
            'relative 0-1000 of the image'
        """
        if self.grounding_range is None:
            return "absolute pixels of the resized image"
        return f"relative 0-{self.grounding_range} of the image"

    # -------------------------------------------------------------- positions
    def position_ids(
        self,
        input_ids: torch.Tensor,
        token_ids: TokenIds,
        spatial_merge_size: int,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
        attention_mask: torch.Tensor | None = None,
        tokens_per_second: float = 2,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's ``rope_index`` rule with the tokenizer's ids.

        ``second_per_grid_ts`` and ``tokens_per_second`` reach the rule only when the family
        ``uses_second_per_grid_ts`` (Qwen2.5-VL's absolute video time); the others ignore them.

        Args:
            input_ids (torch.Tensor): (batch, seq) token ids.
            token_ids (TokenIds): the tokenizer's special-token ids.
            spatial_merge_size (int): patches merged per side by the vision merger.
            image_grid_thw (torch.Tensor | None): (num_images, 3) patch grids, in order.
            video_grid_thw (torch.Tensor | None): (num_videos, 3) patch grids, in order.
            second_per_grid_ts (torch.Tensor | Sequence[float] | None): (num_videos,) seconds per
                temporal grid step.
            attention_mask (torch.Tensor | None): (batch, seq), 0 for padding.
            tokens_per_second (float): the vision config's ``tokens_per_second``.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: (3, batch, seq) mrope position ids and (batch, 1) deltas.
        """
        time_scale = {"tokens_per_second": tokens_per_second} if self.uses_second_per_grid_ts else {}
        return self.rope_index(
            spatial_merge_size, input_ids, image_grid_thw, video_grid_thw,
            second_per_grid_ts if self.uses_second_per_grid_ts else None, attention_mask,
            image_token_id=token_ids.image_pad, video_token_id=token_ids.video_pad,
            vision_start_token_id=token_ids.vision_start, **time_scale,
        )

    def mm_token_type_ids(self, input_ids: torch.Tensor, token_ids: TokenIds) -> torch.Tensor:
        """0 text, 1 image pad, 2 video pad: what transformers' processors return as ``mm_token_type_ids``.

        Example:
            >>> family.mm_token_type_ids(torch.tensor([[7, ids.image_pad, ids.video_pad]]), ids).tolist()
            [[0, 1, 2]]
        """
        return (input_ids == token_ids.image_pad).int() + 2 * (input_ids == token_ids.video_pad).int()

    # ------------------------------------------------------------- parameters
    def classify_parameter(self, name: str) -> str:
        """``llm``, ``vision_tower`` or ``projector`` for a parameter name (PEFT/DDP prefixes allowed).

        Example:
            >>> family_for("qwen3_vl").classify_parameter("model.visual.deepstack_merger_list.0.norm.weight")
            'projector'
        """
        vision = re.escape(self.vision_module)
        projector = "|".join(re.escape(m) for m in self.projector_modules)
        if re.search(rf"(^|\.){vision}\.({projector})(\.|$)", name):
            return PROJECTOR
        if re.search(rf"(^|\.){vision}\.", name):
            return VISION_TOWER
        return LLM

    def dummy_vision_input(
        self, vision_config: Any, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A black image of one merged token, for a vision pass on ranks whose batch has none.

        Every vision parameter (patch embedding, position embedding, blocks, merger and any
        deepstack merger) is on the path from this input to the tower's outputs.

        Args:
            vision_config (Any): ``model.config.vision_config`` (``patch_size``,
                ``temporal_patch_size``, ``spatial_merge_size``, ``in_channels``).
            dtype (torch.dtype): dtype of the pixel values (the tower's).
            device (torch.device | str): where to put both tensors.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: ``pixel_values`` (merge**2,
            in_channels * temporal_patch_size * patch_size**2) zeros and ``grid_thw`` (1, 3)
            long ``[[1, merge, merge]]``.

        Example:
            >>> pixels, grid = family_for("qwen3_vl").dummy_vision_input(config.vision_config)
            >>> tuple(pixels.shape), grid.tolist()
            ((4, 1536), [[1, 2, 2]])
        """
        merge, patch = int(vision_config.spatial_merge_size), int(vision_config.patch_size)
        features = int(getattr(vision_config, "in_channels", 3)) * int(vision_config.temporal_patch_size) * patch**2
        pixel_values = torch.zeros(merge * merge, features, dtype=dtype, device=device)
        grid_thw = torch.tensor([[1, merge, merge]], dtype=torch.long, device=device)
        return pixel_values, grid_thw

    # ------------------------------------------------------------- processor
    def vision_settings(self, checkpoint: str | Path | None = None) -> VisionSettings:
        """The processor settings of a checkpoint folder, the released defaults where it is silent.

        Reads ``preprocessor_config.json`` and, when present, ``video_preprocessor_config.json``
        (or the ``image_processor`` / ``video_processor`` sections of ``processor_config.json``).

        Args:
            checkpoint (str | Path | None): the model folder; None gives the released defaults.

        Returns:
            VisionSettings: patch geometry, mean/std, pixel and frame limits.
        """
        if checkpoint is None:
            return self.vision_defaults
        folder = Path(checkpoint)
        combined = read_json(folder / "processor_config.json") or {}
        image = read_json(folder / "preprocessor_config.json") or combined.get("image_processor") or {}
        video = read_json(folder / "video_preprocessor_config.json") or combined.get("video_processor")
        return self.vision_defaults.updated(image, video)

    def tiny_preprocessor_config(self) -> dict[str, Any]:
        """``preprocessor_config.json`` of a tiny checkpoint: the released image processor values."""
        settings = self.vision_defaults
        return {
            "min_pixels": settings.min_pixels,
            "max_pixels": settings.max_pixels,
            "size": {"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels},
            "patch_size": settings.patch_size,
            "temporal_patch_size": settings.temporal_patch_size,
            "merge_size": settings.merge_size,
            "do_resize": True,
            "resample": 3,  # bicubic
            "do_rescale": True,
            "rescale_factor": settings.rescale_factor,
            "do_normalize": True,
            "image_mean": list(settings.image_mean),
            "image_std": list(settings.image_std),
            "do_convert_rgb": True,
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": self.processor_class,
        }

    def tiny_video_preprocessor_config(self) -> dict[str, Any] | None:
        """``video_preprocessor_config.json`` of a tiny checkpoint, or None when released ones have none."""
        return None

    @abstractmethod
    def tiny_config_kwargs(self, token_ids: dict[str, int]) -> dict[str, Any]:
        """Keyword arguments of the config class for a toy-width model of the released structure."""
