"""Qwen3-VL, dense (``qwen3_vl``) and MoE (``qwen3_vl_moe``).

What differs from Qwen2.5-VL (reference: the released checkpoints and transformers'
Qwen3-VL processor, video processor and model):

- images: patch 16, merge 2, so one LLM token per 32x32 pixels; mean/std 0.5;
- chat: no default system prompt (a system turn only when the conversation has one);
- videos: frames sampled at ``fps`` within [min_frames, max_frames] (``frame_indices``);
  each temporal patch of ``temporal_patch_size`` frames is written as its timestamp text
  ``<{t:.1f} seconds>`` (the mean time of the patch's first and last frame,
  ``video_timestamps``) followed by its own ``<|vision_start|>`` + pads + ``<|vision_end|>``;
  frame size from the video's total pixel budget (``video_frame_size``);
- position ids: ``rope2d.get_rope_index_3`` (each video split into per-patch blocks);
- the vision tower feeds the LLM at several depths through ``visual.deepstack_merger_list``:
  projector, like ``visual.merger``;
- MoE: experts are fused tensors (no per-expert Linear), so LoRA defaults to the attention
  projections; the router load-balancing loss is switched on in the config.

The released layout writes a video as the timestamped blocks alone. transformers 4.57's
processor (which the released checkpoints and upstream fine-tuning use) replaces the chat
template's whole ``<|vision_start|><|video_pad|><|vision_end|>`` with them; 5.x replaces only
the pad and so leaves an extra ``<|vision_start|>`` ... ``<|vision_end|>`` around them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qwenvl.data.rope2d import get_rope_index_3
from qwenvl.models.base import GridThw, ModelFamily, VisionSettings, tiny_text_config
from qwenvl.models.qwen2_vl import tiny_top_config

# The released Qwen3-VL preprocessor_config.json / video_preprocessor_config.json values.
QWEN3_VISION = VisionSettings(
    patch_size=16,
    merge_size=2,
    temporal_patch_size=2,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    min_pixels=65536,  # 64 tokens of 32x32
    max_pixels=16777216,  # 16384 tokens
    video_min_pixels=4096,
    video_max_pixels=25165824,  # summed over the sampled frames
    video_fps=2.0,
    video_min_frames=4,
    video_max_frames=768,
)

# Our own Jinja text for the released Qwen3-VL layout (tools are not rendered): a system turn
# only when the first message is one; user turns render text, image and video parts (with
# "Picture n: " / "Video n: " under add_vision_id); assistant turns render their text.
QWEN3_CHAT_TEMPLATE = (
    "{%- set counts = namespace(image=0, video=0) -%}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0].content is string -%}{{- messages[0].content -}}"
    "{%- else -%}{%- for part in messages[0].content -%}"
    "{%- if 'text' in part -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' or message.role == 'assistant' -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- else -%}{%- for part in message.content -%}"
    "{%- if message.role == 'user' and (part.type == 'image' or 'image' in part or 'image_url' in part) -%}"
    "{%- set counts.image = counts.image + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + counts.image|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif message.role == 'user' and (part.type == 'video' or 'video' in part) -%}"
    "{%- set counts.video = counts.video + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + counts.video|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def frame_indices(
    total_frames: int, video_fps: float, target_fps: float, min_frames: int, max_frames: int
) -> np.ndarray:
    """Frames to decode, the Qwen3-VL video processor's rule.

    ``n = int(total_frames / video_fps * target_fps)`` clamped to ``[min_frames, max_frames]``
    and to ``total_frames``; indices ``= round(linspace(0, total_frames - 1, n))`` (halves to
    even). Unlike the Qwen2.5-VL rule nothing is de-duplicated: ``n`` indices come back.

    Args:
        total_frames (int): frames in the video.
        video_fps (float): the video's frame rate.
        target_fps (float): frames to sample per second of video (``--video_fps``, 2).
        min_frames (int): fewest frames (4 in the released processor).
        max_frames (int): most frames (768).

    Returns:
        np.ndarray: (n,) int64 frame indices, sorted.

    Raises:
        ValueError: ``total_frames`` < 1, a non-positive fps, or ``min_frames`` > ``max_frames``.

    Example:
        >>> frame_indices(30, 10.0, 2.0, 4, 768).tolist()  # 3 s at 2 fps: 6 frames
        [0, 6, 12, 17, 23, 29]
        >>> frame_indices(3, 10.0, 2.0, 4, 768).tolist()  # never more than the video has
        [0, 1, 2]
    """
    if total_frames < 1 or not video_fps > 0 or not target_fps > 0:
        raise ValueError(
            "expected total_frames >= 1, video_fps > 0 and target_fps > 0 but found "
            f"{total_frames}, {video_fps}, {target_fps}"
        )
    if not 1 <= min_frames <= max_frames:
        raise ValueError(f"expected 1 <= min_frames <= max_frames but found {min_frames}, {max_frames}")
    n = int(total_frames / video_fps * target_fps)
    n = min(max(n, min_frames), max_frames, total_frames)
    return np.linspace(0, total_frames - 1, n).round().astype(np.int64)


def video_timestamps(indices: Sequence[int] | np.ndarray, video_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds of each temporal patch: the mean time of its first and last frame.

    A frame count that is not a multiple of ``temporal_patch_size`` is padded with the last
    frame, as the video processor pads the pixels.

    Args:
        indices (Sequence[int] | np.ndarray): sampled frame indices (``frame_indices``).
        video_fps (float): the video's frame rate.
        temporal_patch_size (int): frames per temporal patch (2).

    Returns:
        list[float]: one time per temporal patch, ``ceil(len(indices) / temporal_patch_size)``.

    Raises:
        ValueError: no indices or a non-positive fps.

    Example:
        >>> video_timestamps([0, 5, 10, 15], 10.0)  # patches (0, 5) and (10, 15)
        [0.25, 1.25]
        >>> video_timestamps([0, 5, 10], 10.0)  # an odd count: the last patch is (10, 10)
        [0.25, 1.0]
    """
    frames = [int(i) for i in indices]
    if not frames or not video_fps > 0:
        raise ValueError(f"expected frame indices and video_fps > 0 but found {frames}, {video_fps}")
    frames += [frames[-1]] * (-len(frames) % temporal_patch_size)
    seconds = [i / video_fps for i in frames]
    return [(seconds[k] + seconds[k + temporal_patch_size - 1]) / 2 for k in range(0, len(seconds), temporal_patch_size)]


def video_frame_size(
    num_frames: int, height: int, width: int, factor: int = 32, temporal_patch_size: int = 2,
    min_pixels: int = QWEN3_VISION.video_min_pixels, max_pixels: int = QWEN3_VISION.video_max_pixels,
) -> tuple[int, int]:
    """Resized frame (height, width) of a Qwen3-VL video: the pixel budget covers all frames.

    Sides are rounded to multiples of ``factor``; when ``frames x height x width`` (frames
    rounded to a multiple of ``temporal_patch_size``) leaves ``[min_pixels, max_pixels]``, the
    frame is scaled by one factor so that the whole clip fits.

    Args:
        num_frames (int): sampled frames (at least ``temporal_patch_size``).
        height (int): frame height in pixels.
        width (int): frame width in pixels.
        factor (int): patch_size * merge_size (32).
        temporal_patch_size (int): frames per temporal patch (2).
        min_pixels (int): fewest pixels of the whole clip (video ``size.shortest_edge``).
        max_pixels (int): most pixels of the whole clip (video ``size.longest_edge``).

    Returns:
        tuple[int, int]: (height, width), multiples of ``factor``.

    Raises:
        ValueError: fewer frames than ``temporal_patch_size`` or an aspect ratio over 200.

    Example:
        >>> video_frame_size(8, 480, 640, max_pixels=8 * 64 * 32 * 32)  # 64 tokens per frame at most
        (192, 288)
    """
    if num_frames < temporal_patch_size:
        raise ValueError(f"expected at least {temporal_patch_size} frames but found {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"expected an aspect ratio of at most 200 but found {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_patch_size) * temporal_patch_size
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class Qwen3VLFamily(ModelFamily):
    """Qwen3-VL dense or MoE (``moe``): timestamped per-patch video blocks, deepstack projector."""

    moe: bool = False
    rope_index = staticmethod(get_rope_index_3)  # whole-video grids; time is in the timestamp text
    grounding_range = 1000  # boxes and points relative 0-1000 (SPEC 13)

    def video_text(self, grid_thw: GridThw, merge_size: int, timestamps: Sequence[float] | None = None) -> str:
        """Per temporal patch: ``<{t:.1f} seconds>`` + ``<|vision_start|>`` + pads x (h*w/merge**2) + ``<|vision_end|>``.

        Raises:
            ValueError: ``timestamps`` missing or not one per temporal patch.

        Example:
            >>> QWEN3_VL.video_text((2, 2, 2), 2, [0.25, 1.25])
            '<0.2 seconds><|vision_start|><|video_pad|><|vision_end|><1.2 seconds><|vision_start|><|video_pad|><|vision_end|>'
        """
        lengths = self.video_block_lengths(grid_thw, merge_size)
        if timestamps is None or len(timestamps) != len(lengths):
            raise ValueError(
                f"expected one timestamp per temporal patch ({len(lengths)}) but found "
                f"{None if timestamps is None else len(timestamps)}"
            )
        block = self.tokens.vision_start + self.tokens.video_pad * lengths[0] + self.tokens.vision_end
        return "".join(f"<{seconds:.1f} seconds>{block}" for seconds in timestamps)

    def video_frames(
        self, num_frames: int, fps: float, height: int, width: int, data_args: Any,
        settings: VisionSettings | None = None,
    ) -> tuple[np.ndarray, int, int, list[float]]:
        """The Qwen3-VL video processor's plan: ``--video_fps`` frames per second within
        ``--video_min_frames``..``--video_max_frames``; the frame size from the clip's pixel budget
        ``--video_min_pixels``..``--video_max_pixels`` (None: the checkpoint's video processor
        config); one timestamp per temporal patch.

        Raises:
            ValueError: an aspect ratio over 200, or fewer frames than a temporal patch.

        Example:
            >>> from types import SimpleNamespace  # the DataArguments fields read here, at their defaults
            >>> args = SimpleNamespace(video_fps=2.0, video_min_frames=4, video_max_frames=8,
            ...                        video_min_pixels=None, video_max_pixels=None)
            >>> indices, height, width, seconds = QWEN3_VL.video_frames(12, 12.0, 84, 112, args)
            >>> indices.tolist(), height, width, [round(s, 3) for s in seconds]
            ([0, 4, 7, 11], 96, 128, [0.167, 0.75])
        """
        settings = settings or self.vision_defaults
        indices = frame_indices(num_frames, fps, float(data_args.video_fps), int(data_args.video_min_frames),
                                int(data_args.video_max_frames))
        low = data_args.video_min_pixels if data_args.video_min_pixels is not None else settings.video_min_pixels
        high = data_args.video_max_pixels if data_args.video_max_pixels is not None else settings.video_max_pixels
        tps = settings.temporal_patch_size
        frames = max(len(indices), tps)  # a shorter clip is padded with its last frame
        resized_h, resized_w = video_frame_size(frames, height, width, settings.factor, tps, int(low), int(high))
        return indices, resized_h, resized_w, video_timestamps(indices, fps, tps)

    def video_block_lengths(self, grid_thw: GridThw, merge_size: int) -> list[int]:
        """t blocks of h*w / merge**2 pads."""
        t, h, w = (int(x) for x in grid_thw)
        return [h * w // merge_size**2] * t

    def configure_router_aux_loss(self, config: Any, coef: float | None) -> bool:
        """MoE: make the model return router logits and add ``coef`` x load-balancing loss to its loss.

        Args:
            config (Any): the model config (``text_config`` holds the MoE settings).
            coef (float | None): ``--router_aux_loss_coef``; None keeps the checkpoint's value.

        Returns:
            bool: True for the MoE model, False for the dense one (nothing changed).
        """
        if not self.moe:
            return False
        config.text_config.output_router_logits = True
        if coef is not None:
            config.text_config.router_aux_loss_coef = float(coef)
        return True

    def tiny_video_preprocessor_config(self) -> dict[str, Any]:
        """The released ``video_preprocessor_config.json`` values."""
        settings = self.vision_defaults
        return {
            "size": {"shortest_edge": settings.video_min_pixels, "longest_edge": settings.video_max_pixels},
            "patch_size": settings.patch_size,
            "temporal_patch_size": settings.temporal_patch_size,
            "merge_size": settings.merge_size,
            "image_mean": list(settings.image_mean),
            "image_std": list(settings.image_std),
            "fps": settings.video_fps,
            "min_frames": settings.video_min_frames,
            "max_frames": settings.video_max_frames,
            "do_sample_frames": True,
            "processor_class": self.processor_class,
            "video_processor_type": "Qwen3VLVideoProcessor",
        }

    def tiny_config_kwargs(self, token_ids: dict[str, int]) -> dict[str, Any]:
        """Config kwargs of the released structure at toy width.

        Text: hidden 64, 2 layers, 4 heads of 16, 2 kv heads, interleaved mrope (the released
        [24, 20, 20] of 64 scaled to [4, 2, 2] of 8); MoE: 4 experts of width 32, top 2, every
        layer sparse, router aux loss coefficient 0.001 (off until training turns it on).
        Vision: depth 3, width 32, deepstack after blocks 0 and 1 (as many as LLM layers they
        feed), merger to the text width, a 16x16 learned position grid.

        Example:
            >>> ids = dict.fromkeys(["image_token_id", "video_token_id", "vision_start_token_id",
            ...     "vision_end_token_id", "bos_token_id", "eos_token_id", "pad_token_id"], 0)
            >>> QWEN3_VL_MOE.tiny_config_kwargs(ids)["text_config"]["num_experts"]
            4
        """
        text_config = tiny_text_config(
            token_ids, model_type=None, head_dim=16, use_cache=True, attention_bias=False,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True,
                             "rope_theta": 5000000.0},
        )
        if self.moe:
            text_config.update({
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "output_router_logits": False,
                "router_aux_loss_coef": 0.001,
                "tie_word_embeddings": False,  # as the top-level config: lm_head is its own matrix
            })
        vision_config = {
            "depth": 3,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_channels": 3,
            "hidden_act": "gelu_pytorch_tanh",
            "patch_size": self.vision_defaults.patch_size,
            "spatial_merge_size": self.vision_defaults.merge_size,
            "temporal_patch_size": self.vision_defaults.temporal_patch_size,
            "out_hidden_size": text_config["hidden_size"],
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [0, 1],
        }
        return tiny_top_config(text_config, vision_config, token_ids)


QWEN3_VL = Qwen3VLFamily(
    model_type="qwen3_vl",
    model_class_name="Qwen3VLForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    default_system_prompt=None,
    chat_template=QWEN3_CHAT_TEMPLATE,
    vision_defaults=QWEN3_VISION,
    projector_modules=("merger", "deepstack_merger_list"),
)

QWEN3_VL_MOE = Qwen3VLFamily(
    model_type="qwen3_vl_moe",
    model_class_name="Qwen3VLMoeForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    default_system_prompt=None,
    chat_template=QWEN3_CHAT_TEMPLATE,
    vision_defaults=QWEN3_VISION,
    projector_modules=("merger", "deepstack_merger_list"),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),  # experts are fused tensors, not Linear layers
    moe=True,
)
