"""Loading what a checkpoint holds: the model class of its family and its image processor.

Training (``qwenvl/train/train_qwen.py``), LoRA merging and the tools all load through here,
so none of them imports the training entry point for a helper.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from huggingface_hub import constants, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id

from qwenvl.models import FAMILIES, family_for

# Seconds the hub may take to answer one HEAD request before it counts as unreachable (no retries).
HUB_PROBE_TIMEOUT = 5.0


# Remote-code checkpoints users bring (config.json with auto_map): what to use instead.
REMOTE_CODE_HINTS = {
    "internvl_chat": "InternVL2/2.5's remote code (InternVLChatModel) is not supported. The HF-native InternVL "
                     "checkpoints are the `*-hf` ones, e.g. OpenGVLab/InternVL3-2B-hf (model_type internvl, loaded "
                     "without trust_remote_code)" + ("; use one of them" if "internvl" in FAMILIES
                                                     else "; they are not supported yet either"),
    "phi3_v": "Phi-3-Vision's remote code (Phi3VForCausalLM) is not supported, and there is no HF-native Phi-3-Vision "
              "checkpoint to use instead",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or is of a model type this project does not train."""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` can only mean a hub repository: no such local path, and shaped like ``org/name``.

    Example:
        >>> is_hub_id("Qwen/Qwen2.5-VL-3B-Instruct"), is_hub_id("/data/missing_model")
        (True, False)
    """
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_unreachable(repo_id: str, timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """Why the hub (``HF_ENDPOINT``) cannot be reached now, or None when it answers (any HTTP status).

    One HEAD request of the repository's ``config.json``, ``timeout`` seconds, no retries (the
    hub client retries a refused connection for about 30 s before it says so).
    """
    request = urllib.request.Request(hf_hub_url(repo_id, "config.json"), method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:  # it answered: 401 gated, 404 unknown, ... the hub client says which
        return None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{constants.ENDPOINT} cannot be reached ({reason})"
    return None


def cached_snapshot(repo_id: str, cache_dir: str | None = None) -> Path | None:
    """The local snapshot folder of a hub model whose ``config.json`` is in the Hugging Face cache, else None."""
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    return Path(found).parent if isinstance(found, str) else None


def missing_weights(folder: Path) -> list[str]:
    """Weight files a checkpoint folder lacks: ``model.safetensors`` (or ``pytorch_model.bin``), or the shards its
    ``*.index.json`` lists. Empty when complete."""
    if (folder / "model.safetensors").is_file() or (folder / "pytorch_model.bin").is_file():
        return []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = folder / index
        if path.is_file():
            shards = sorted(set(json.loads(path.read_text(encoding="utf-8")).get("weight_map", {}).values()))
            return [shard for shard in shards if not (folder / shard).is_file()]
    return ["model.safetensors"]


def resolve_checkpoint(name_or_path: str, cache_dir: str | None = None) -> tuple[str, Path, str | None]:
    """Where a checkpoint's files come from, found in seconds: a local folder, the local HF cache, or the hub.

    A hub id is looked up in the local Hugging Face cache first. Under ``HF_HUB_OFFLINE=1`` it must
    be there. Otherwise the hub is asked once (``hub_unreachable``): when it does not answer, a fully
    cached snapshot is used as a local folder (nothing waits on the network later); when it answers,
    loading goes on from the hub id (downloads, updates) as transformers does.

    Args:
        name_or_path: ``--model_name_or_path``.
        cache_dir: ``--cache_dir`` (None: the default HF cache).

    Returns:
        (what to load from: ``name_or_path`` or a snapshot folder; the local ``config.json`` to read,
        downloaded when needed; a note for the log when a cached snapshot replaces the hub id, else None).

    Raises:
        CheckpointError: no such folder, no ``config.json``, a hub model neither cached nor reachable (or
            offline), a cached snapshot without its weights while the hub is unreachable.
    """
    if not is_hub_id(name_or_path):
        folder = Path(name_or_path).expanduser()
        if not folder.is_dir():
            raise CheckpointError(f"no model config found ({folder} is not a folder, and not a hub id like "
                                  "Qwen/Qwen2.5-VL-3B-Instruct)")
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"no model config found ({folder} holds no config.json; a checkpoint folder has "
                                  "config.json, the weights and the tokenizer / processor files)")
        return name_or_path, folder / "config.json", None
    snapshot = cached_snapshot(name_or_path, cache_dir)
    cache = cache_dir or constants.HF_HUB_CACHE
    fetch = (f"download it where the hub is reachable (`hf download {name_or_path}`, into the same cache), or give "
             "a local folder holding config.json")
    if constants.HF_HUB_OFFLINE:
        if snapshot is None:
            raise CheckpointError(f"no model config found: {name_or_path} is not in the local Hugging Face cache "
                                  f"({cache}) and HF_HUB_OFFLINE=1 forbids downloading; {fetch}")
        return name_or_path, snapshot / "config.json", None
    reason = hub_unreachable(name_or_path)
    if reason is not None:
        if snapshot is None:
            raise CheckpointError(f"no model config found: {name_or_path} is not in the local Hugging Face cache "
                                  f"({cache}) and {reason}; {fetch}")
        absent = missing_weights(snapshot)
        if absent:
            raise CheckpointError(f"{name_or_path} is only partly in the local Hugging Face cache ({snapshot} lacks "
                                  f"{', '.join(absent[:3])}) and {reason}; {fetch}")
        return str(snapshot), snapshot / "config.json", (
            f"{name_or_path}: {reason}; using the cached snapshot {snapshot} (HF_HUB_OFFLINE=1 skips this check)")
    if snapshot is not None:
        return name_or_path, snapshot / "config.json", None
    try:
        config_file = hf_hub_download(name_or_path, "config.json", cache_dir=cache_dir)
    except (OSError, ValueError) as exc:  # unknown or gated repository, no config.json in it
        raise CheckpointError(f"no model config found ({str(exc).splitlines()[0]})") from None
    return name_or_path, Path(config_file), None


def check_model_type(config: dict[str, Any]) -> str:
    """The ``model_type`` of a raw ``config.json`` when this project trains it.

    Raises:
        CheckpointError: a remote-code checkpoint (``auto_map``; InternVL2, Phi-3-V: naming what to use
            instead) or any other model type, naming the supported ones.

    Example:
        >>> check_model_type({"model_type": "qwen2_5_vl"})
        'qwen2_5_vl'
    """
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return model_type
    hint = REMOTE_CODE_HINTS.get(model_type)
    if hint is None and config.get("auto_map"):
        classes = sorted({str(v).split(".")[-1] for v in config["auto_map"].values() if isinstance(v, str)})
        hint = f"it is remote code (config.json auto_map: {', '.join(classes)}), which is not supported"
    if hint is not None:
        raise CheckpointError(f"model_type {model_type!r}: {hint}; supported model types: {', '.join(FAMILIES)}")
    raise CheckpointError(f"model_type {model_type!r} is not supported (yet); supported model types: "
                          f"{', '.join(FAMILIES)}")


def model_class_for(config: Any) -> type:
    """The model class of the checkpoint's family, from its config's ``model_type`` (never its path).

    Raises:
        ValueError: the model type is not supported (the message lists the supported ones).

    Example:
        >>> model_class_for(AutoConfig.from_pretrained("tiny_model/qwen3_vl_moe")).__name__
        'Qwen3VLMoeForConditionalGeneration'
    """
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    try:
        family = family_for(config)
    except ValueError:
        raise ValueError(f"model_type {model_type!r} is not supported; expected one of {', '.join(FAMILIES)}") from None
    return family.model_class()


def load_image_processor(path: str, cache_dir: str | None = None) -> Any:
    """The checkpoint's image processor; the PIL backend when torchvision is missing."""
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(path, cache_dir=cache_dir)
    except (ImportError, ValueError, OSError):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(path, cache_dir=cache_dir)
