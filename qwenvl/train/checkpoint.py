"""Load Trainer checkpoints of Qwen-VL back into the model: resume and best-model selection.

transformers 5.x builds Qwen-VL with ``model.language_model.*`` / ``model.visual.*``
modules but saves checkpoints in the released layout (``model.layers.*``,
``visual.*``): ``save_pretrained`` reverts its key conversion and
``from_pretrained`` applies it again. The Trainer's resume and
``load_best_model_at_end`` paths load a checkpoint with a plain
``model.load_state_dict(..., strict=False)`` and no conversion
(huggingface/transformers#43701, open in 5.23): only ``lm_head`` loads, every
other weight silently stays what it was, and a resumed run continues from the
wrong weights. ``load_checkpoint_weights`` renames the saved keys with the same
conversion ``save_pretrained`` used, then loads.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file
from transformers.core_model_loading import revert_weight_conversion
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME


def saved_to_model_keys(model: torch.nn.Module) -> dict[str, str]:
    """Map each key as ``save_pretrained`` writes it to the key of ``model.state_dict()``.

    Computed by running the model's own save-time conversion on its state dict
    and matching tensors by identity (renaming keeps the tensor objects).

    Example:
        >>> saved_to_model_keys(qwen2_5_vl)["model.layers.0.mlp.up_proj.weight"]
        'model.language_model.layers.0.mlp.up_proj.weight'
    """
    state = model.state_dict()
    names_by_tensor = {id(tensor): name for name, tensor in state.items()}
    reverted = revert_weight_conversion(model, dict(state))
    return {saved: names_by_tensor[id(tensor)] for saved, tensor in reverted.items() if id(tensor) in names_by_tensor}


def checkpoint_weight_files(folder: str) -> list[str] | None:
    """The safetensors files of a checkpoint folder (one file or the shards of an index), or None."""
    single = os.path.join(folder, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        return [os.path.join(folder, shard) for shard in shards]
    return None


def load_checkpoint_weights(model: torch.nn.Module, folder: str) -> torch.nn.modules.module._IncompatibleKeys:
    """Load a checkpoint folder's safetensors weights (saved layout) into ``model``, shard by shard.

    Args:
        model: the (unwrapped) model being trained.
        folder: a ``checkpoint-*`` folder written by ``save_pretrained``.

    Returns:
        missing and unexpected keys, in the model's naming, like ``load_state_dict``.

    Raises:
        FileNotFoundError: the folder has no ``model.safetensors`` nor an index of shards.
    """
    files = checkpoint_weight_files(folder)
    if files is None:
        raise FileNotFoundError(f"{folder} holds neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}")
    key_map = saved_to_model_keys(model)
    missing = set(model.state_dict())
    unexpected: list[str] = []
    for path in files:
        state = {key_map.get(key, key): tensor for key, tensor in load_file(path, device="cpu").items()}
        result = model.load_state_dict(state, strict=False)
        unexpected.extend(result.unexpected_keys)
        missing -= state.keys()
        del state
    return torch.nn.modules.module._IncompatibleKeys(sorted(missing), unexpected)
