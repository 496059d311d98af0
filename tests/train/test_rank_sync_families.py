"""Every model family enters the same modules in the same order whatever the batch holds (one process, CPU).

What DeepSpeed ZeRO-3 requires of every rank (tests/train/test_rank_sync.py checks it on
2 ranks for Qwen2.5-VL): the sequence of modules entered in forward, and in backward,
is the same for a text-only batch, an image batch, a video batch and an image+video
batch. Checked here at the level that differs between batches (``embed_tokens``, the
tower ``visual``, ``language_model``) for transformers' own Qwen2-VL, Qwen2.5-VL,
Qwen3-VL and Qwen3-VL-MoE, built from tiny configs. A backward entry is recorded, like
ZeRO-3 does, when the gradient of one of the module's output tensors arrives.

Also: the dummy passes leave the loss and the gradients exactly as the model makes them,
and reach every parameter of the tower (Qwen3-VL's deepstack mergers included), which is
what DDP needs from a rank whose batch has no media.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from qwenvl.models import family_for
from qwenvl.train.trainer import LLM, QwenVLTrainer, classify_parameter, vision_features_for_llm

IMAGE, VIDEO, VISION_START, VISION_END = 900, 901, 902, 903
TOP = ("embed_tokens", "visual", "language_model")
MODEL_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}


def tiny_model(model_type: str) -> torch.nn.Module:
    """A random tiny model of transformers' class for ``model_type`` (vocabulary 1000)."""
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=1000, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                rope_parameters=rope)
    qwen3_vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                        num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    configs = {
        "qwen2_vl": (transformers.Qwen2VLConfig, text,
                     dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2)),
        "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, text,
                       dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                            fullatt_block_indexes=[1])),
        "qwen3_vl": (transformers.Qwen3VLConfig, text | {"head_dim": 16, "rope_parameters": rope | {
            "mrope_interleaved": True}}, qwen3_vision),
        "qwen3_vl_moe": (transformers.Qwen3VLMoeConfig, text | {
            "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
            "rope_parameters": rope | {"mrope_interleaved": True}}, qwen3_vision),
    }
    config_class, text_config, vision_config = configs[model_type]
    config = config_class(text_config=text_config, vision_config=vision_config, **ids)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return getattr(transformers, MODEL_CLASSES[model_type])(config).eval()


def make_batch(model: torch.nn.Module, images: bool, videos: bool) -> dict:
    """Text, plus one 4x4-patch image and/or one 2-frame 4x4-patch video (4 LLM tokens each), labels on the text."""
    vision = model.config.vision_config
    features = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    generator = torch.Generator().manual_seed(1)
    ids = [5, 6, 7]
    batch: dict = {}
    if images:
        ids += [VISION_START] + [IMAGE] * 4 + [VISION_END]
        batch["pixel_values"] = torch.randn(16, features, generator=generator)
        batch["image_grid_thw"] = torch.tensor([[1, 4, 4]])
    if videos:
        ids += [VISION_START] + [VIDEO] * 4 + [VISION_END]
        batch["pixel_values_videos"] = torch.randn(16, features, generator=generator)
        batch["video_grid_thw"] = torch.tensor([[1, 4, 4]])
    ids += [8, 9, 10, 11]
    input_ids = torch.tensor([ids])
    labels = torch.where(input_ids < 900, input_ids, -100)
    batch |= {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}
    # The model computes the position ids itself: its processor's token types (1 image, 2 video).
    batch["mm_token_type_ids"] = (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()
    return batch


def trainer_for(model: torch.nn.Module, tmp_path) -> QwenVLTrainer:
    """A one-process QwenVLTrainer; the LLM is frozen, so its dummy passes run as on a rank of a larger run."""
    for name, param in model.named_parameters():
        param.requires_grad_(classify_parameter(name) != LLM)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no")
    return QwenVLTrainer(model=model, args=args)


def module_entries(trainer: QwenVLTrainer, model: torch.nn.Module, batch: dict) -> tuple[list, list, torch.Tensor]:
    """Forward and backward entries into ``TOP`` modules during ``compute_loss`` + backward, and the loss."""
    forward: list[str] = []
    backward: list[str] = []
    handles = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in TOP:
            continue

        def enter(module, args, leaf=leaf):
            forward.append(leaf)

        def leave(module, args, output, leaf=leaf):
            values = output.values() if isinstance(output, dict) else [output]
            tensors = [t for v in values for t in (v if isinstance(v, (list, tuple)) else [v])]
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(lambda grad, leaf=leaf: backward.append(leaf))

        # Registered before compute_loss, like DeepSpeed's hooks (registered when the engine is built).
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return forward, backward, loss


FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
KINDS = {"text": (False, False), "image": (True, False), "video": (False, True), "image+video": (True, True)}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_same_module_sequence_and_unchanged_loss_and_gradients_for_every_batch_kind(model_type, tmp_path):
    model = tiny_model(model_type)
    trainer = trainer_for(model, tmp_path)
    visual = {name: p for name, p in model.named_parameters() if classify_parameter(name) != LLM}
    sequences = {}
    for kind, (images, videos) in KINDS.items():
        batch = make_batch(model, images, videos)
        model.zero_grad()
        expected_loss = model(**batch).loss
        if expected_loss.requires_grad:  # text only: the model's loss depends on no trainable weight
            expected_loss.backward()
        expected_grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in visual.items()}
        model.zero_grad()
        forward, backward, loss = module_entries(trainer, model, batch)
        sequences[kind] = (forward, backward)
        assert torch.equal(loss, expected_loss), kind
        for name, param in visual.items():
            assert param.grad is not None, f"{kind}: the tower pass did not reach {name}"
            assert torch.equal(param.grad, expected_grads[name]), f"{kind}: {name}"
    assert sequences["text"][0] == ["embed_tokens", "visual", "visual", "language_model"]
    for kind, sequence in sequences.items():
        assert sequence == sequences["text"], f"{model_type}: {kind} enters modules in another order than text"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_dummy_input_is_one_merged_token_and_reaches_every_tower_output_the_llm_uses(model_type):
    model = tiny_model(model_type)
    visual = model.model.visual
    config = visual.config
    pixel_values, grid_thw = family_for(model.config).dummy_vision_input(config)
    assert grid_thw.tolist() == [[1, config.spatial_merge_size, config.spatial_merge_size]]
    assert pixel_values.shape == (config.spatial_merge_size ** 2,
                                  config.in_channels * config.temporal_patch_size * config.patch_size ** 2)
    features = vision_features_for_llm(visual(pixel_values, grid_thw=grid_thw))
    deepstack = len(getattr(visual, "deepstack_merger_list", []))
    assert len(features) == 1 + deepstack and deepstack == (2 if model_type.startswith("qwen3") else 0)
    assert all(f.shape == (1, model.config.text_config.hidden_size) for f in features)  # one LLM token each
