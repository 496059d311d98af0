"""3D rotary position ids (M-RoPE) for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (SPEC section 8).

Text tokens get the same index on all three rows (temporal, height, width),
counting up. A vision block -- a maximal run of ``<|image_pad|>`` or
``<|video_pad|>`` tokens -- that starts at index ``s`` gets rows
``(s + t_index, s + h_index, s + w_index)`` over its
``(t, h / merge, w / merge)`` grid, h/w row-major. Text after a block resumes
at (largest index used so far) + 1; Qwen3-VL (each video split into one block
per temporal patch) resumes at ``s + max(h, w) / merge``, as its model does.

The work is vectorised over tokens: Python only loops over samples and over
vision blocks, so a 32k-token sequence costs a handful of tensor ops.
"""

import functools
from collections.abc import Callable, Sequence

import torch

__all__ = ["get_rope_index_2", "get_rope_index_25", "get_rope_index_3"]

# Default special-token ids of the Qwen2-VL / Qwen2.5-VL / Qwen3-VL tokenizers.
IMAGE_TOKEN_ID = 151655  # <|image_pad|>
VIDEO_TOKEN_ID = 151656  # <|video_pad|>
VISION_START_TOKEN_ID = 151652  # <|vision_start|>

_TEXT, _IMAGE, _VIDEO = 0, 1, 2
_NAMES = {_IMAGE: "image", _VIDEO: "video"}

# (modality, grid t, index of the video in the batch) -> temporal index per grid step
TemporalIndexFn = Callable[[int, int, int], tuple[int, ...]]
GridThw = torch.Tensor | Sequence[Sequence[int]] | None


def get_rope_index_25(
    spatial_merge_size: int,
    input_ids: torch.Tensor,
    image_grid_thw: GridThw = None,
    video_grid_thw: GridThw = None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
    vision_start_token_id: int = VISION_START_TOKEN_ID,
    tokens_per_second: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL position ids: video time steps are scaled by seconds per grid step.

    For a video, ``t_index = floor(grid_index * second_per_grid_t * tokens_per_second)``;
    images always use ``t_index = 0``.

    Args:
        spatial_merge_size (int): patches merged per side by the vision merger (2).
        input_ids (torch.Tensor): (batch, seq) token ids.
        image_grid_thw (GridThw): (num_images, 3) ``(t, h, w)`` patch grid per image,
            in order of appearance over the whole batch. ``None`` when there are no images.
        video_grid_thw (GridThw): (num_videos, 3) patch grid per video, in order.
        second_per_grid_ts (torch.Tensor | Sequence[float] | None): (num_videos,) seconds
            covered by one temporal grid step of each video; ``None`` means 1.0 each.
        attention_mask (torch.Tensor | None): (batch, seq), 1 for real tokens, 0 for padding.
            Positions count real tokens only; padding positions are filled with 1.
        image_token_id (int): id of ``<|image_pad|>``.
        video_token_id (int): id of ``<|video_pad|>``.
        vision_start_token_id (int): id of ``<|vision_start|>``. Kept for signature
            compatibility with the original; blocks are found from the pad tokens alone.
        tokens_per_second (int): temporal position ids per second of video (config value, 2).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``position_ids`` (3, batch, seq) long and
        ``mrope_position_deltas`` (batch, 1) long, where
        ``delta = max position + 1 - number of real tokens``.

    Raises:
        ValueError: if the number of image / video blocks differs from the number of grids,
            if a block's length is not ``t * h * w / spatial_merge_size**2``, or if
            ``second_per_grid_ts`` has fewer entries than there are videos.

    Example:
        >>> ids = torch.tensor([[5, 151655, 151655, 151655, 151655, 6]])
        >>> pos, delta = get_rope_index_25(2, ids, image_grid_thw=torch.tensor([[1, 4, 4]]))
        >>> pos[:, 0].tolist()
        [[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]]
        >>> delta.tolist()
        [[-2]]
    """
    if second_per_grid_ts is None:
        seconds: torch.Tensor | Sequence[float] = ()
    elif isinstance(second_per_grid_ts, torch.Tensor):
        seconds = second_per_grid_ts.reshape(-1).cpu()
    else:
        seconds = second_per_grid_ts

    def temporal_index(modality: int, t: int, video_idx: int) -> tuple[int, ...]:
        if modality == _IMAGE:
            return (0,) * t
        if second_per_grid_ts is None:
            second_per_grid_t: float | torch.Tensor = 1.0
        elif video_idx < len(seconds):
            second_per_grid_t = seconds[video_idx]
        else:
            raise ValueError(
                f"second_per_grid_ts should have one entry per video but found {len(seconds)} "
                f"entries while input_ids has at least {video_idx + 1} video blocks"
            )
        # Same float expression as the original, so the floor lands on the same integers.
        return tuple((torch.arange(t) * second_per_grid_t * tokens_per_second).long().tolist())

    return _get_rope_index(
        spatial_merge_size,
        input_ids,
        image_grid_thw,
        video_grid_thw,
        attention_mask,
        temporal_index,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
    )


def get_rope_index_2(
    spatial_merge_size: int,
    input_ids: torch.Tensor,
    image_grid_thw: GridThw = None,
    video_grid_thw: GridThw = None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
    vision_start_token_id: int = VISION_START_TOKEN_ID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL position ids: ``t_index`` is the temporal grid index, for images and videos.

    Args:
        spatial_merge_size (int): patches merged per side by the vision merger (2).
        input_ids (torch.Tensor): (batch, seq) token ids.
        image_grid_thw (GridThw): (num_images, 3) ``(t, h, w)`` patch grid per image, in order.
        video_grid_thw (GridThw): (num_videos, 3) patch grid per video, in order.
        second_per_grid_ts (torch.Tensor | Sequence[float] | None): ignored (Qwen2-VL does
            not scale time); accepted so the three variants share one call signature.
        attention_mask (torch.Tensor | None): (batch, seq), 1 for real tokens, 0 for padding.
            Padding positions are filled with 1.
        image_token_id (int): id of ``<|image_pad|>``.
        video_token_id (int): id of ``<|video_pad|>``.
        vision_start_token_id (int): id of ``<|vision_start|>``; unused, see
            :func:`get_rope_index_25`.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``position_ids`` (3, batch, seq) long and
        ``mrope_position_deltas`` (batch, 1) long.

    Raises:
        ValueError: if the number of blocks differs from the number of grids or a block's
            length is not ``t * h * w / spatial_merge_size**2``.

    Example:
        >>> ids = torch.tensor([[5] + [151656] * 3 + [6]])  # one video of 3 frames, 1x1 merged
        >>> pos, _ = get_rope_index_2(2, ids, video_grid_thw=torch.tensor([[3, 2, 2]]))
        >>> pos[:, 0].tolist()
        [[0, 1, 2, 3, 4], [0, 1, 1, 1, 4], [0, 1, 1, 1, 4]]
    """

    def temporal_index(modality: int, t: int, video_idx: int) -> tuple[int, ...]:
        return tuple(range(t))

    return _get_rope_index(
        spatial_merge_size,
        input_ids,
        image_grid_thw,
        video_grid_thw,
        attention_mask,
        temporal_index,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
    )


def get_rope_index_3(
    spatial_merge_size: int,
    input_ids: torch.Tensor,
    image_grid_thw: GridThw = None,
    video_grid_thw: GridThw = None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
    vision_start_token_id: int = VISION_START_TOKEN_ID,
    tokens_per_second: float | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-VL position ids, the rule of ``Qwen3VLModel.get_rope_index``.

    Qwen3-VL writes a timestamp before every temporal patch of a video
    (``<0.5 seconds><vision_start> pads <vision_end><1.5 seconds><vision_start> ...``), so a
    video with grid ``(t, h, w)`` is ``t`` blocks of grid ``(1, h, w)``. A block starting at
    ``s`` gets rows ``(s + t_index, s + h_index, s + w_index)`` and the text after it resumes at
    ``s + max(h, w) / spatial_merge_size`` (for ``t = 1`` blocks that is the largest index + 1,
    the Qwen2-VL rule). Time is carried by the timestamp text, not by the temporal row.

    Args:
        spatial_merge_size (int): patches merged per side by the vision merger (2).
        input_ids (torch.Tensor): (batch, seq) token ids.
        image_grid_thw (GridThw): (num_images, 3) ``(t, h, w)`` patch grid per image, in order.
        video_grid_thw (GridThw): (num_videos, 3) patch grid per video (whole video), in order.
        second_per_grid_ts (torch.Tensor | Sequence[float] | None): ignored; accepted so the
            variants share one call signature.
        attention_mask (torch.Tensor | None): (batch, seq), 1 for real tokens, 0 for padding.
            Padding positions are filled with 1.
        image_token_id (int): id of ``<|image_pad|>``.
        video_token_id (int): id of ``<|video_pad|>``.
        vision_start_token_id (int): id of ``<|vision_start|>``; unused, see
            :func:`get_rope_index_25`.
        tokens_per_second (float | None): ignored (a Qwen2.5-VL setting); accepted so callers
            can pass the same keyword arguments to every variant.
        mm_token_type_ids (torch.Tensor | None): (batch, seq) 0 text, 1 image, 2 video, as
            transformers' Qwen3-VL processor returns it. When given, blocks are found from it
            (like the model does) instead of from the pad token ids.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``position_ids`` (3, batch, seq) long and
        ``mrope_position_deltas`` (batch, 1) long, ``max position + 1 - number of real tokens``.

    Raises:
        ValueError: if the number of blocks differs from the number of grids (one per image,
            one per temporal patch of a video) or a block's length is not
            ``t * h * w / spatial_merge_size**2``, or ``mm_token_type_ids`` has another shape
            than ``input_ids``.

    Example:
        >>> ids = torch.tensor([[5, 151656, 7, 151656, 6]])  # 2 patches separated by a timestamp
        >>> pos, _ = get_rope_index_3(2, ids, video_grid_thw=torch.tensor([[2, 2, 2]]))
        >>> pos[:, 0].tolist()
        [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    """
    if video_grid_thw is not None:
        video_grid_thw = torch.as_tensor(video_grid_thw).reshape(-1, 3)
        video_grid_thw = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)  # (patches, 3)
        video_grid_thw[:, 0] = 1
    if mm_token_type_ids is not None and mm_token_type_ids.shape != input_ids.shape:
        raise ValueError(
            f"mm_token_type_ids should have the shape of input_ids {tuple(input_ids.shape)} "
            f"but found {tuple(mm_token_type_ids.shape)}"
        )

    def temporal_index(modality: int, t: int, video_idx: int) -> tuple[int, ...]:
        return tuple(range(t))

    return _get_rope_index(
        spatial_merge_size,
        input_ids,
        image_grid_thw,
        video_grid_thw,
        attention_mask,
        temporal_index,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        token_types=mm_token_type_ids,
        resume_after_spatial=True,
    )


def _grid_rows(grid_thw: GridThw) -> list[list[int]]:
    if grid_thw is None:
        return []
    if isinstance(grid_thw, torch.Tensor):
        return grid_thw.reshape(-1, 3).tolist()
    return [list(map(int, row)) for row in grid_thw]


@functools.lru_cache(maxsize=512)
def _block_offsets(t_index: tuple[int, ...], grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
    """(3, t * grid_h * grid_w) rows (t_index, h_index, w_index) minus the token's offset in the block.

    Added to the running text position ``s + j`` of the block's j-th token this gives
    ``s + (t_index, h_index, w_index)``. Cached: callers must not modify the result.
    """
    t = len(t_index)
    temporal = torch.tensor(t_index, dtype=torch.long).view(t, 1, 1).expand(t, grid_h, grid_w)
    height = torch.arange(grid_h).view(1, grid_h, 1).expand(t, grid_h, grid_w)
    width = torch.arange(grid_w).view(1, 1, grid_w).expand(t, grid_h, grid_w)
    rows = torch.stack([temporal, height, width]).reshape(3, -1)  # (3, t * h * w)
    return (rows - torch.arange(rows.shape[1])).to(device)


def _count_blocks(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_id: int) -> int:
    """Number of maximal runs of ``token_id`` over the real tokens of all samples (error path only).

    ``input_ids`` may also be token types (0 text, 1 image, 2 video) with ``token_id`` 1 or 2.
    """
    count = 0
    for b in range(input_ids.shape[0]):
        ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
        is_pad = (ids == token_id).to(torch.int8)
        count += int((torch.diff(is_pad, prepend=is_pad.new_zeros(1)) == 1).sum())
    return count


def _get_rope_index(
    spatial_merge_size: int,
    input_ids: torch.Tensor,
    image_grid_thw: GridThw,
    video_grid_thw: GridThw,
    attention_mask: torch.Tensor | None,
    temporal_index: TemporalIndexFn,
    *,
    image_token_id: int,
    video_token_id: int,
    token_types: torch.Tensor | None = None,
    resume_after_spatial: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared body of the ``get_rope_index_*`` variants.

    ``token_types`` (batch, seq) 0 text / 1 image / 2 video, when given, marks the vision tokens
    instead of the pad ids. ``resume_after_spatial`` selects the Qwen3-VL rule: text after a
    block starting at ``s`` resumes at ``s + max(grid_h, grid_w)`` and the delta is the real
    maximum + 1 - n; otherwise text resumes after the largest index used.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids should be (batch, seq) but found shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask should have the shape of input_ids {tuple(input_ids.shape)} "
            f"but found {tuple(attention_mask.shape)}"
        )
    batch, seq = input_ids.shape
    device = input_ids.device
    token_ids = {_IMAGE: image_token_id, _VIDEO: video_token_id}
    grids = {_IMAGE: _grid_rows(image_grid_thw), _VIDEO: _grid_rows(video_grid_thw)}
    used = {_IMAGE: 0, _VIDEO: 0}

    def mismatch(modality: int) -> ValueError:
        name = _NAMES[modality]
        if token_types is None:
            found = _count_blocks(input_ids, attention_mask, token_ids[modality])
        else:
            found = _count_blocks(token_types, attention_mask, modality)
        return ValueError(
            f"expected one {name} block (a run of {name} pad tokens, id {token_ids[modality]}) per row "
            f"of {name}_grid_thw, i.e. {len(grids[modality])} blocks, but found {found} in input_ids"
        )

    # Padding keeps position 1, as in the original; without a mask every slot is written.
    make = torch.empty if attention_mask is None else torch.ones
    position_ids = make(3, batch, seq, dtype=torch.long, device=device)  # (3, batch, seq)
    deltas = []
    for b in range(batch):
        ids = input_ids[b]  # (seq,)
        keep = None
        if attention_mask is not None:
            keep = attention_mask[b].bool()  # (seq,)
            ids = ids[keep]  # (n,)
        n = ids.shape[0]
        # 0 text, 1 image pad, 2 video pad
        if token_types is None:
            modality = (ids == image_token_id).to(torch.int8) + (ids == video_token_id).to(torch.int8) * 2  # (n,)
        else:
            modality = token_types[b] if keep is None else token_types[b][keep]
            modality = modality.to(torch.int8)  # (n,)
        run_modality, run_length = torch.unique_consecutive(modality, return_counts=True)

        # Per vision block: where it ends, how far the position jumps past it, and its
        # offsets from a plain token count.
        block_ends: list[int] = []
        block_jumps: list[int] = []
        block_offsets: list[torch.Tensor] = []
        start = 0
        for kind, length in zip(run_modality.tolist(), run_length.tolist(), strict=True):
            if kind != _TEXT:
                k = used[kind]
                if k >= len(grids[kind]):
                    raise mismatch(kind)
                used[kind] += 1
                t, h, w = grids[kind][k]
                grid_h, grid_w = h // spatial_merge_size, w // spatial_merge_size
                if t * grid_h * grid_w != length:
                    name = _NAMES[kind]
                    raise ValueError(
                        f"{name} {k} (sample {b}, tokens {start}:{start + length} of the real tokens) "
                        f"has grid (t, h, w) = {(t, h, w)}, so expected "
                        f"t * h * w / {spatial_merge_size}**2 = {t * grid_h * grid_w} {name} pad tokens "
                        f"but found {length}"
                    )
                t_index = temporal_index(kind, t, k)
                if resume_after_spatial:
                    advance = max(grid_h, grid_w)  # Qwen3-VL: the temporal row does not move text on
                else:
                    advance = max(max(t_index), grid_h - 1, grid_w - 1) + 1  # largest index used + 1
                block_ends.append(start + length)
                block_jumps.append(advance - length)
                block_offsets.append(_block_offsets(t_index, grid_h, grid_w, device))
            start += length

        # Running position: token index plus the jumps of the blocks already passed. Inside a
        # block that is s + j; adding the block offsets turns it into s + (t, h, w) index.
        positions = torch.arange(n, device=device)  # (n,)
        if block_ends:
            jumps = torch.zeros(n + 1, dtype=torch.long, device=device)  # (n + 1,)
            jumps[torch.tensor(block_ends, device=device)] = torch.tensor(block_jumps, device=device)
            positions += jumps[:n].cumsum(0)
        # Write straight into the output where we can: few full passes over a long sequence.
        out = position_ids[:, b] if keep is None else torch.empty(3, n, dtype=torch.long, device=device)
        out.copy_(positions.expand(3, n))  # (3, n)
        if block_offsets:
            vision = torch.nonzero(modality).view(-1)  # (num vision tokens,), block after block
            out.index_add_(1, vision, torch.cat(block_offsets, dim=1))
        if keep is not None:
            position_ids[:, b, keep] = out
        if resume_after_spatial and n:
            deltas.append(int(out.max()) + 1 - n)  # a block's temporal row may reach past its advance
        else:
            # max position + 1 - n: every block moves the next position on by its jump.
            deltas.append(sum(block_jumps))

    for kind in (_IMAGE, _VIDEO):
        if used[kind] != len(grids[kind]):
            raise mismatch(kind)
    return position_ids, torch.tensor(deltas, dtype=torch.long, device=device).view(batch, 1)
