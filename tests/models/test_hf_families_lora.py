"""LoRA, then merge, and ``tools/infer.py``'s prompt, on every HF-processor family (LLaVA's own runs are in
tests/train/test_hf_family_training.py and tests/tools/test_tools_hf_family.py).

Oracles, none of them the code under test:
- targets: every ``nn.Linear`` under the language model's module (``language_model`` / Idefics3's ``text_model``),
  found here by module path, never one of the tower or the projector;
- merging: the unmerged peft model's logits on an item of the family's own processor (the adapters' B matrices
  set to random values first, so the merge changes the weights);
- infer's prompt: the processor called here on the chat template's generation prompt, with the call settings each
  family's released use needs written by hand (Gemma 3: no pan-and-scan, the template writes the bos; OneVision:
  the sample's images nested, so two images get one tile each; PaliGemma: its prefix, image tokens first).
"""

from __future__ import annotations

import re
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from qwenvl.data.chat import Conversation
from qwenvl.models import FAMILIES
from qwenvl.train.argument import ModelArguments, TrainingArguments
from qwenvl.train.lora import apply_lora
from tests.conftest import REPO_ROOT

FAMILY_TYPES = [name for name, family in FAMILIES.items() if family.uses_processor_items and name != "llava"]
LLM_MODULE = re.compile(r"(^|\.)(language_model|text_model)\.")
IMAGES = REPO_ROOT / "demo" / "images"
# processor(...) settings of each family's released use, by hand (see the module docstring)
CALL_KWARGS = {"gemma3": {"do_pan_and_scan": False, "add_special_tokens": False}}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict:
    """model_type -> its tiny checkpoint, built on first use."""
    from tools.build_tiny_model import build_tiny_model

    built: dict = {}

    def get(model_type: str):
        if model_type not in built:
            built[model_type] = build_tiny_model(tmp_path_factory.mktemp(model_type), model_type=model_type, seed=0)
        return built[model_type]

    return get


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_infer_prompts_as_the_processor_and_generates(model_type, tiny_dirs):
    from tools.infer import Predictor

    family = FAMILIES[model_type]
    folder = tiny_dirs(model_type)
    predictor = Predictor.from_pretrained(folder)
    files = [IMAGES / "red_circle.jpg", IMAGES / "blue_square.jpg"]
    inputs = predictor.encode_prompt(Conversation(None, [("user", "<image>\n<image>\nWhich one is a circle?")]),
                                     [str(f) for f in files])
    processor = family.load_processor(folder)
    images = [Image.open(f).convert("RGB") for f in files]
    if model_type == "paligemma":
        expected = processor(text=["<image><image>Which one is a circle?"], images=[images], return_tensors="pt")
        expected.pop("labels")  # all -100 without a suffix: nothing a generation prompt passes to the model
    else:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": "Which one is a circle?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        expected = processor(text=text, images=[images] if model_type == "llava_onevision" else images,
                             return_tensors="pt", **CALL_KWARGS.get(model_type, {}))
    assert inputs.keys() == expected.keys()
    for key in expected:
        assert torch.equal(inputs[key], expected[key]), key
    if model_type == "llava_onevision":  # two images: one tile each, not tiled like a lone image
        assert inputs["pixel_values"].shape[:2] == (2, 1)
    answer = predictor.generate_ids(inputs, max_new_tokens=2)
    assert 1 <= len(answer) <= 2


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_lora_adapts_the_llm_only_and_merges_to_the_same_logits(model_type, tiny_dirs, tmp_path):
    from tools.merge_lora import main as merge_main

    family = FAMILIES[model_type]
    base = tiny_dirs(model_type)
    model = family.model_class().from_pretrained(base, dtype=torch.float32)
    llm_linears = {name for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and LLM_MODULE.search(name)}
    assert llm_linears
    peft_model = apply_lora(model, ModelArguments(tune_mm_mlp=True), TrainingArguments(
        output_dir=str(tmp_path / "run"), lora_enable=True, lora_r=4, lora_alpha=8,
        lora_target_modules="all-linear", use_cpu=True, report_to=[]))
    adapted = {re.sub(r"^base_model\.model\.", "", name) for name, module in peft_model.named_modules()
               if hasattr(module, "lora_A") and len(module.lora_A)}
    assert adapted == llm_linears
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    processor = family.load_processor(base)
    processor.save_pretrained(adapter_dir)

    merged_dir = merge_main(["--lora", str(adapter_dir), "--base_model", str(base), "--output_dir",
                             str(tmp_path / "merged")])
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert type(merged).__name__ == family.model_class_name
    image = Image.open(REPO_ROOT / "demo" / "images" / "red_circle.jpg").convert("RGB")
    if family.prefix_lm:  # PaliGemma: the prompt is the prefix
        inputs = processor(text="<image>What shape is this?", images=[image], return_tensors="pt")
    else:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]}]
        inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                           images=family.processor_images([image]), return_tensors="pt")
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=0, atol=1e-5)
        base_logits = family.model_class().from_pretrained(base, dtype=torch.float32).eval()(**inputs).logits
    assert (base_logits - expected).abs().max() > 1e-4  # the adapters changed the model: the merge was not trivial
