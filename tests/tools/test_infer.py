"""tools/infer.py: prompts equal the chat template, generation equals the model's own mrope path, exact-match table.

References are independent of tools/infer.py: the tokenizer's chat template
(with each <|image_pad|> expanded by hand) for the prompt, and the model's own
``get_rope_index`` (via ``mm_token_type_ids``) for positions and generation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from qwenvl.data.data_qwen import Conversation
from qwenvl.data.vision import VisionConfig, open_image, process_image
from qwenvl.train.argument import ModelArguments, TrainingArguments
from qwenvl.train.lora import apply_lora, merge_lora
from qwenvl.models.loading import load_image_processor
from tests.conftest import REPO_ROOT
from tools.infer import Prediction, Predictor, accuracy_table, main

DEMO = REPO_ROOT / "demo"
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 64 * 28 * 28
PIXEL_FLAGS = ["--min_pixels", "4*28*28", "--max_pixels", "64*28*28"]


@pytest.fixture(scope="module")
def predictor(tiny_model_dir) -> Predictor:
    return Predictor.from_pretrained(tiny_model_dir, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def template_ids(tokenizer, messages: list[dict], image_tokens: list[int]) -> list[int]:
    """The chat template's generation prompt, each <|image_pad|> repeated as the processor would."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = iter(image_tokens)
    ids: list[int] = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        ids.extend([token] * next(counts) if token == pad else [token])
    return ids


def image_tokens(path: str) -> int:
    cfg = VisionConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    _, (t, h, w) = process_image(open_image(path), cfg)
    return t * h * w // cfg.merge_size ** 2


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen2_model_dir"])
def test_prompt_equals_chat_template_and_model_rope(request, fixture):
    predictor = Predictor.from_pretrained(request.getfixturevalue(fixture), min_pixels=MIN_PIXELS,
                                          max_pixels=MAX_PIXELS)
    images = [str(DEMO / "images" / "two_shapes.jpg"), str(DEMO / "images" / "green_bar_tall.jpg")]
    conversation = Conversation("Be brief.", [("user", "<image>\nWhat is left?"), ("assistant", "A square."),
                                              ("user", "And here? <image>")])
    inputs = predictor.encode_prompt(conversation, images)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is left?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": [{"type": "text", "text": "And here? "}, {"type": "image"}]},
    ]
    expected = template_ids(predictor.tokenizer, messages, [image_tokens(p) for p in images])
    assert inputs["input_ids"][0].tolist() == expected

    mm_token_type_ids = (inputs["input_ids"] == predictor.encoder.image_pad_id).int()
    positions, _ = predictor.model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=mm_token_type_ids,
                                                         image_grid_thw=inputs["image_grid_thw"])
    assert torch.equal(inputs["position_ids"][1:], positions)  # (3, 1, L) mrope
    assert torch.equal(inputs["position_ids"][0, 0], torch.arange(len(expected)))  # text positions
    pixels = np.concatenate([process_image(open_image(p), predictor.vision_config)[0] for p in images])
    assert torch.equal(inputs["pixel_values"], torch.from_numpy(pixels))


@torch.no_grad()
def test_generation_equals_the_models_own_mrope_path(predictor):
    inputs = predictor.encode_prompt(Conversation(None, [("user", "<image>\nWhere is the blue square?")]),
                                     [str(DEMO / "images" / "two_shapes.jpg")])
    no_positions = {k: v for k, v in inputs.items() if k not in ("position_ids", "mm_token_type_ids")}
    mm_token_type_ids = (inputs["input_ids"] == predictor.encoder.image_pad_id).int()
    assert torch.equal(inputs["mm_token_type_ids"], mm_token_type_ids)  # what generation needs (Qwen3-VL)

    def step_logits(**kwargs) -> torch.Tensor:
        out = predictor.model.generate(**kwargs, max_new_tokens=4, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True)
        return torch.stack(out.logits)

    ours = step_logits(**inputs)
    reference = step_logits(**no_positions, mm_token_type_ids=mm_token_type_ids)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    flat = step_logits(**no_positions)  # 1-D positions: what the model does without either
    assert (flat - ours).abs().max() > 1e-3, "positions must matter, or this test proves nothing"


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["qwen3_vl", "qwen3_vl_moe"])
def test_qwen3_answers_and_generation_equals_the_models_own_mrope_path(tiny_dirs, model_type, capsys):
    """An image and a video (timestamped blocks): our positions generate what the model's own rule does."""
    folder = tiny_dirs[model_type]
    predictor = Predictor.from_pretrained(folder, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    conversation = Conversation(None, [("user", "<video>\nAnd the picture <image>: same shape?")])
    inputs = predictor.encode_prompt(conversation, [str(DEMO / "images" / "red_circle.jpg")],
                                     ["videos/red_square.mp4"], str(DEMO))
    ids = inputs["input_ids"][0].tolist()
    tokenizer = predictor.tokenizer
    assert tokenizer.decode(ids[:3]) == "<|im_start|>user\n"  # no default system prompt
    assert tokenizer.decode(ids).count(" seconds><|vision_start|>") == inputs["video_grid_thw"][0, 0].item()
    assert "second_per_grid_ts" not in inputs
    mm_token_type_ids = (inputs["input_ids"] == predictor.encoder.image_pad_id).int() + 2 * (
        inputs["input_ids"] == predictor.encoder.video_pad_id).int()
    assert torch.equal(inputs["mm_token_type_ids"], mm_token_type_ids)
    positions, _ = predictor.model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=mm_token_type_ids, image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs["video_grid_thw"].clone())
    assert torch.equal(inputs["position_ids"][1:], positions)

    def step_logits(**kwargs) -> torch.Tensor:
        out = predictor.model.generate(**kwargs, max_new_tokens=3, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True)
        return torch.stack(out.logits)

    reference = step_logits(**{k: v for k, v in inputs.items() if k != "position_ids"})
    torch.testing.assert_close(step_logits(**inputs), reference, atol=1e-5, rtol=0)
    main(["--model", str(folder), "--image", str(DEMO / "images" / "red_circle.jpg"), "--prompt", "What shape?",
          "--max_new_tokens", "4", *PIXEL_FLAGS])
    assert capsys.readouterr().out.strip()


def reference_answer(predictor: Predictor, question: str, image: str, max_new_tokens: int) -> str:
    """Greedy answer through the chat template and the model's own rope (not tools/infer.py's prompt code)."""
    tokenizer, model = predictor.tokenizer, predictor.model
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    ids = torch.tensor([template_ids(tokenizer, messages, [image_tokens(image)])])
    pixels, grid = process_image(open_image(image), predictor.vision_config)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.from_numpy(pixels),
                         image_grid_thw=torch.tensor([grid]), mm_token_type_ids=(ids == predictor.encoder.image_pad_id)
                         .int(), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    stops = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=False).strip()


def test_annotation_file_accuracy_table(tiny_model_dir, predictor, tmp_path, capsys):
    questions = [("images/red_circle.jpg", "What shape is this?"), ("images/blue_square.jpg", "What color?"),
                 ("images/five_dots.jpg", "How many dots?")]
    answers = [reference_answer(predictor, "\n" + q, str(DEMO / image), 6) for image, q in questions]
    assert all(answers), "empty answers would make the matches trivial"
    references = [answers[0], answers[1], answers[2] + " (not what the model says)"]
    samples = [{"image": image, "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                                  {"from": "gpt", "value": reference}]}
               for (image, q), reference in zip(questions, references)]
    annotation = tmp_path / "eval.json"
    annotation.write_text(json.dumps(samples))
    output = tmp_path / "predictions.jsonl"

    predictions = main(["--model", str(tiny_model_dir), "--annotation", str(annotation), "--data_path", str(DEMO),
                        "--max_new_tokens", "6", "--output", str(output), *PIXEL_FLAGS])
    printed = capsys.readouterr().out
    assert [p.prediction for p in predictions] == answers
    assert "| eval.json | 3 | 2 | 66.67% |" in printed and "| all | 3 | 2 | 66.67% |" in printed
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(x["index"], x["match"]) for x in lines] == [(0, True), (1, True), (2, False)]


def test_bad_sample_names_file_and_index(tiny_model_dir, tmp_path):
    annotation = tmp_path / "bad.jsonl"
    annotation.write_text(json.dumps({"image": "images/red_circle.jpg", "conversations": [
        {"from": "human", "value": "no tag here"}, {"from": "gpt", "value": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=rf"{annotation}:0: 0 <image> tag\(s\) in the conversation but 1 media"):
        main(["--model", str(tiny_model_dir), "--annotation", str(annotation), "--data_path", str(DEMO),
              "--max_new_tokens", "2", *PIXEL_FLAGS])


def test_dataset_entries_are_read_like_dataset_use(tiny_model_dir, tmp_path):
    """--dataset takes what --dataset_use takes (here a JSONL path), %N keeps training's subset, and a JSONL
    line that does not parse is named before anything is answered."""
    from qwenvl.data.chat import sample_indices

    samples = [{"conversations": [{"from": "human", "value": f"Say {n}."}, {"from": "gpt", "value": str(n)}]}
               for n in range(8)]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    predictions = main(["--model", str(tiny_model_dir), "--dataset", f"{path}%50", "--max_new_tokens", "1",
                        *PIXEL_FLAGS])
    assert [p.index for p in predictions] == sorted(sample_indices(8, 0.5, 42, str(path)))
    assert [p.reference for p in predictions] == [str(p.index) for p in predictions]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(samples[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=rf"{broken}:2: invalid JSON line"):
        main(["--model", str(tiny_model_dir), "--dataset", str(broken), "--max_new_tokens", "1", *PIXEL_FLAGS])


def test_lora_folder_answers_like_its_merged_checkpoint(tiny_model_dir, tokenizer, tmp_path, capsys):
    args = TrainingArguments(output_dir=str(tmp_path), lora_enable=True, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                             use_cpu=True, report_to=[])
    base = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = apply_lora(base, ModelArguments(tune_mm_mlp=True), args)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
    lora_dir = tmp_path / "lora"
    model.save_pretrained(lora_dir)
    tokenizer.save_pretrained(lora_dir)
    load_image_processor(str(tiny_model_dir)).save_pretrained(lora_dir)
    merged_dir = merge_lora(lora_dir, tmp_path / "merged")

    image = str(DEMO / "images" / "red_circle.jpg")
    answers = {}
    for name, folder in (("lora", lora_dir), ("merged", merged_dir), ("base", tiny_model_dir)):
        main(["--model", str(folder), "--image", image, "--prompt", "What shape is this?", "--max_new_tokens", "6",
              *PIXEL_FLAGS])
        answers[name] = capsys.readouterr().out.strip()
    assert answers["lora"] == answers["merged"] and answers["lora"]
    assert answers["lora"] != answers["base"], "the adapter should change the answer"


def test_exact_match_rules():
    assert Prediction("s", 0, " Red.\n", "Red.").matches()
    assert not Prediction("s", 0, "red.", "Red.").matches()
    assert Prediction("s", 0, "red.", "Red.").matches(ignore_case=True)
    assert not Prediction("s", 0, "Red", None).matches()
    table = accuracy_table([Prediction("a.json", 0, "Red", "Red"), Prediction("a.json", 1, "x|y", "Blue")])
    assert table.splitlines() == [
        "| source | index | match | prediction | reference |", "|---|---|---|---|---|",
        "| a.json | 0 | yes | Red | Red |", "| a.json | 1 | no | x\\|y | Blue |", "",
        "| source | samples | exact match | accuracy |", "|---|---|---|---|",
        "| a.json | 2 | 1 | 50.00% |", "| all | 2 | 1 | 50.00% |",
    ]
