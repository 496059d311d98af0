"""``sdpa_packed``: PyTorch SDPA that trains flattened rows without a dense T x T mask.

A flattened or packed micro-batch is one row holding several samples, their
boundaries given by the text position ids (row 0 of the 4-row ids restarts at 0
for every sample, SPEC 9). With ``sdpa`` or ``eager`` transformers turns those
boundaries into a dense boolean (T x T) block-diagonal mask: 256 MiB at 16k
tokens, 1 GiB at 32k, and SDPA cannot use its fused causal kernels with an
arbitrary mask, so a long row costs quadratic memory and time.

``sdpa_packed`` is registered through transformers' public ``AttentionInterface``
and ``AttentionMaskInterface``:

- its mask function builds no mask when the batch has no padding (a flattened
  row, or a single unpadded sample), and transformers' own SDPA mask otherwise
  (padded batches are unchanged);
- its attention function then finds the samples of the row from the position
  ids (a position that is not the previous one plus 1 starts a sample, the rule
  transformers itself uses) and runs causal SDPA on each sample's slice, so no
  token attends across a boundary and no T x T tensor is ever built.

Everything else (padded batches, the vision tower, which splits its own
sequences, generation with a cache) goes to transformers' ``sdpa`` unchanged.
Loss and gradients equal the padded batch's (tests/train/test_attention.py);
``bench/packed_attention.py`` measures it against the dense mask.

Select it with ``--attn_implementation sdpa_packed`` (the default when
flash-attn is not installed). Saved models keep ``sdpa`` in their config, so
they load anywhere without this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SDPA_PACKED = "sdpa_packed"


def sample_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each sample in one flattened row, from its text position ids.

    A sample starts wherever a position is not the previous one plus 1 (and at 0).

    Args:
        position_ids: (1, seq) or (seq,) text position ids.

    Returns:
        half-open spans covering the row, in order.

    Example:
        >>> sample_bounds(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
        [(0, 3), (3, 5), (5, 9)]
    """
    row = position_ids.reshape(-1)
    starts = torch.nonzero(row[1:] != row[:-1] + 1).flatten() + 1
    edges = [0, *starts.tolist(), row.numel()]
    return list(zip(edges[:-1], edges[1:]))


def packed_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask when nothing is padded (the attention finds the samples itself); else transformers' SDPA mask."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def packed_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA per sample of a flattened row; transformers' ``sdpa`` for everything else.

    Args:
        query: (batch, heads, seq, head_dim); key/value: (batch, kv_heads, seq, head_dim).
        attention_mask: None for an unpadded batch (``packed_sdpa_mask``), else a 4-D mask.
        position_ids: (batch, seq) text position ids (the decoder passes them for packing).

    Returns:
        (attn_output of shape (batch, seq, heads, head_dim), None), like ``sdpa_attention_forward``.
    """
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    packed = (
        attention_mask is None and causal and position_ids is not None and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == position_ids.shape[-1] and query.shape[2] > 1
    )
    bounds = sample_bounds(position_ids) if packed else []
    if len(bounds) <= 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    pieces = [
        F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            dropout_p=dropout if module.training else 0.0, scale=scaling, is_causal=end - start > 1,
            enable_gqa=gqa,
        )
        for start, end in bounds
    ]
    output = torch.cat(pieces, dim=2)  # (1, heads, seq, head_dim)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(SDPA_PACKED, packed_sdpa_attention_forward)
AttentionMaskInterface.register(SDPA_PACKED, packed_sdpa_mask)
