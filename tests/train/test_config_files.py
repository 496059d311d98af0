"""Config files as users of config-driven VLM pipelines write them (qwenvl/train/config_files.py).

Each test fails if its key were ignored: the parsed flag, the labels, the pixel sizes, the frame
indices or the rendered chat text are compared with values worked out by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl.data.chat import IGNORE_INDEX, ChatEncoder, Conversation
from qwenvl.data.sources import resolve_source, set_row_format
from qwenvl.data.annotations import open_store
from qwenvl.data.video import VideoMeta, plan_video
from qwenvl.data.vision import VisionConfig, image_grid_thw, pre_resize, process_image
from qwenvl.models import family_for
from qwenvl.train.argument import ConfigError, DataArguments, parse_args
from qwenvl.train.config_files import check_modalities, check_run, media_counts
from tests.conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples" / "vlm_config"

# The four files exactly as ../shared/VLM_CONFIG_FORMAT.md shows them.
FORMAT_MODEL = """\
model_classes:
  "Qwen/Qwen2-VL-2B-Instruct":       {model_class: Qwen2VLForConditionalGeneration, processor_class: Qwen2VLProcessor, import_path: transformers}
  "llava-hf/llava-1.5-7b-hf":        {model_class: LlavaForConditionalGeneration, processor_class: LlavaProcessor, import_path: transformers}
  "OpenGVLab/InternVL2-2B":          {model_class: InternVLChatModel, processor_class: InternVLChatProcessor, import_path: transformers}
  "google/paligemma-3b-pt-448":      {model_class: PaliGemmaForConditionalGeneration, processor_class: PaliGemmaProcessor, import_path: transformers}
  "microsoft/Phi-3-vision-128k-instruct": {model_class: Phi3VForCausalLM, processor_class: Phi3VProcessor, import_path: transformers}
loading_params:   {torch_dtype: "torch.bfloat16", device_map: auto, trust_remote_code: true}
processor_params: {trust_remote_code: true}
"""
FORMAT_COLLATOR = """\
dataset_columns:
  image_column: image
  question_column: question
  answer_column: answer
  video_column: video
  context_column: null
data_processing: {image_data: true, video_data: false}
message_format:
  system_prompt: "Answer briefly."
  training_messages:
    - role: user
      content:
        - {type: text, text: "{system_prompt}"}
        - {type: image}
        - {type: text, text: "{question_column}"}
    - role: assistant
      content:
        - {type: text, text: "{answer_column}"}
image_processing: {convert_to_rgb: true, resize_mode: keep_aspect, max_size: null}
video_processing:
  enabled: true
  frame_extraction: {library: decord, sampling_strategy: uniform, num_frames: 8}
  file_processing: {convert_to_rgb: true, max_duration: null}
text_processing: {padding: true, truncation: true, max_length: 2048, add_generation_prompt: false}
label_masking:
  mask_pad_token: true
  mask_image_token: true
  mask_input_tokens: false
  ignore_index: -100
"""
FORMAT_TRAIN = """\
per_device_train_batch_size: 8
per_device_eval_batch_size: 8
gradient_accumulation_steps: 2
learning_rate: 1.0e-05
num_train_epochs: 1.0
logging_steps: 0.1
eval_steps: 0.1
save_steps: 0.1
save_total_limit: 2
gradient_checkpointing: true
bf16: true
fp16: false
group_by_length: true
remove_unused_columns: false
dataloader_pin_memory: false
report_to: ["wandb"]
run_name: my_run
"""
FORMAT_PEFT = """\
task_type: CAUSAL_LM
r: 64
target_modules: all-linear
lora_alpha: 16
lora_dropout: 0.05
bias: none
use_rslora: false
use_dora: false
"""


@pytest.fixture(autouse=True)
def reset_row_format(monkeypatch):
    """The row format is process-wide (set by parse_args): every test starts and ends without one; the
    video backend a file's frame_extraction.library sets ($QWENVL_VIDEO_BACKEND) is put back after each."""
    monkeypatch.delenv("QWENVL_VIDEO_BACKEND", raising=False)
    set_row_format()
    yield
    set_row_format()


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def format_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "configs"
    folder.mkdir()
    for name, text in (("vlm_model_config.yaml", FORMAT_MODEL), ("vlm_collator_config.yaml", FORMAT_COLLATOR),
                       ("train_config.yaml", FORMAT_TRAIN), ("peft_config.yaml", FORMAT_PEFT)):
        write(folder, name, text)
    return folder


# ------------------------------------------------------------------ several files
def test_the_four_format_files_as_written_become_our_flags(tmp_path):
    folder = format_folder(tmp_path)
    model, data, training = parse_args([str(folder), "--output_dir", str(tmp_path / "out"),
                                        "--model_name_or_path", "Qwen/Qwen2-VL-2B-Instruct", "--use_cpu", "True"])
    assert (training.lora_enable, training.lora_r, training.lora_alpha, training.lora_dropout) == (True, 64, 16, 0.05)
    assert (training.lora_target_modules, training.lora_bias, training.use_rslora, training.use_dora) == \
        ("all-linear", "none", False, False)
    assert training.bf16 and not training.fp16 and model.trust_remote_code
    assert training.model_max_length == 2048 and data.train_on_prompt
    assert (data.video_min_frames, data.video_max_frames, data.image_data, data.video_data) == (8, 8, True, False)
    assert json.loads(data.dataset_columns) == {"image": "image", "question": "question", "answer": "answer",
                                                "video": "video"}
    assert json.loads(data.message_format)["system_prompt"] == "Answer briefly."
    assert (training.logging_steps, training.eval_steps, training.save_steps) == (0.1, 0.1, 0.1)
    assert training.train_sampling_strategy == "group_by_length" and training.activation_checkpointing
    assert training.config_origins["lora_alpha"] == str(folder / "peft_config.yaml")
    assert "lora_r" not in training.config_origins  # 64 is the default: only non-default values are listed
    assert training.config_origins["model_max_length"] == str(folder / "vlm_collator_config.yaml")
    assert training.config_origins["bf16"] == str(folder / "vlm_model_config.yaml")
    assert training.config_origins["model_name_or_path"] == "command line"
    assert any("device_map 'auto' ignored" in note for note in training.config_notes)
    assert sorted(kinds for _, kinds in training.config_files) == [("collator",), ("model",), ("peft",), ("train",)]


def test_files_in_any_order_later_files_then_flags_override(tmp_path):
    first = write(tmp_path, "a.yaml", "learning_rate: 1.0e-3\nlora_alpha: 32\n")
    second = write(tmp_path, "b.yaml", "learning_rate: 2.0e-3\n")
    peft = write(tmp_path, "p.yaml", "lora:\n  task_type: CAUSAL_LM\n  r: 4\n  lora_alpha: 8\n")
    base = ["--output_dir", str(tmp_path / "out")]
    _, _, one = parse_args([str(first), str(peft), "--config", str(second), *base])
    assert (one.learning_rate, one.lora_alpha, one.lora_r, one.lora_enable) == (2e-3, 8, 4, True)
    assert one.config_origins["learning_rate"] == str(second) and one.config_origins["lora_alpha"] == str(peft)
    _, _, two = parse_args(["--config", str(peft), *base, "--config", str(first), "--learning_rate", "5e-4"])
    assert (two.learning_rate, two.lora_alpha) == (5e-4, 32)
    assert two.config_origins["learning_rate"] == f"command line (over {first})"


def test_peft_keys_at_top_level_equal_the_lora_section(tmp_path):
    top = write(tmp_path, "top.yaml", FORMAT_PEFT)
    nested = write(tmp_path, "nested.yaml", "lora:\n" + "".join(f"  {line}\n" for line in FORMAT_PEFT.splitlines()))
    keys = ("lora_enable", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_bias", "use_dora")
    parsed = [parse_args([str(path), "--output_dir", str(tmp_path)])[2] for path in (top, nested)]
    assert [tuple(getattr(t, k) for k in keys) for t in parsed] == [(True, 64, 16, 0.05, "all-linear", "none",
                                                                    False)] * 2


@pytest.mark.parametrize("text, message", [
    ("task_type: SEQ_CLS\nr: 8\n", r"task_type: 'SEQ_CLS' is not supported: the Qwen-VL language models are causal"),
    ("r: 8\nmodules_to_save: [visual.merger]\n", r"modules_to_save: not supported: .*--tune_mm_mlp True"),
    ("r: 8\nlora_alfa: 16\n", r"unknown setting 'lora_alfa'; did you mean lora_alpha\?"),
    ("lora:\n  task_type: CAUSAL_LM\n  bias: some\n", r"lora.bias: expected none, all or lora_only, found 'some'"),
    ("learning_rat: 1e-5\n", r"unknown setting 'learning_rat'; did you mean learning_rate\?"),
    ("dataset_text_field: text\n", r"unknown setting 'dataset_text_field'; in this project: nothing: samples are"),
    ("image_processing: {resize_mod: crop}\n", r"image_processing.resize_mod: unknown key; did you mean resize_mode\?"),
    ("label_masking: {mask_input_token: false}\n", r"did you mean mask_input_tokens\?"),
    ("label_masking: {ignore_index: -1}\n", r"ignore_index: -1 is not supported: labels that are not learned are -100"),
    ("label_masking: {mask_image_token: false}\n", r"mask_image_token: False is not supported: image and video tokens"),
    ("text_processing: {add_generation_prompt: true}\n", r"add_generation_prompt: True is not supported"),
    ("image_processing: {resize_mode: squash}\n", r"resize_mode: expected one of keep_aspect, crop, stretch"),
    ("image_processing: {resize_mode: stretch}\n", r"image_resize_mode stretch needs image_max_size"),
    ("loading_params: {torch_dtype: auto}\n", r"torch_dtype: 'auto': expected torch.bfloat16"),
    ("video_processing: {frame_extraction: {sampling_strategy: random, num_frames: 4}}\n",
     r"sampling_strategy: expected uniform .* found 'random'"),
    ("message_format:\n  training_messages:\n    - {role: user, content: '{question_column} {quesiton}'}\n"
     "    - {role: assistant, content: '{answer_column}'}\n", r"unknown placeholder \{quesiton\}; placeholders are"),
])
def test_a_bad_or_misspelt_key_is_refused_naming_the_fix(tmp_path, text, message):
    path = write(tmp_path, "c.yaml", text)
    with pytest.raises(ConfigError, match=message):
        parse_args([str(path), "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("flag, message", [
    ("--dataset_text_field", r"unknown flag --dataset_text_field \(in this project: nothing"),
    ("--mask_input_tokens", r"unknown flag --mask_input_tokens \(in this project: --train_on_prompt"),
    ("--learning_rat", r"unknown flag --learning_rat \(did you mean --learning_rate\?\)"),
])
def test_a_misspelt_flag_gets_a_close_flag_or_its_name_here_never_an_unrelated_one(tmp_path, flag, message):
    with pytest.raises(ConfigError, match=message) as caught:
        parse_args(["--output_dir", str(tmp_path), flag, "x"])
    assert "--dataset_use?" not in str(caught.value) and "include_num_input_tokens_seen" not in str(caught.value)


# ------------------------------------------------------------------ model file
def test_model_classes_are_checked_against_the_checkpoint_family(tiny_model_dir, tmp_path):
    def run_check(entry: str, *flags: str):
        path = write(tmp_path, "model.yaml", f"model_classes:\n  \"{tiny_model_dir}\": {entry}\n")
        model, data, training = parse_args([str(path), "--output_dir", str(tmp_path), *flags])
        return check_run(model, data, training)

    lines = run_check("{model_class: Qwen2_5_VLForConditionalGeneration, processor_class: Qwen2_5_VLProcessor}")
    assert lines == [f"model_classes ({tmp_path / 'model.yaml'}): {tiny_model_dir} -> "
                     "Qwen2_5_VLForConditionalGeneration (qwen2_5_vl), checked"]
    with pytest.raises(ConfigError, match="model_class Qwen2VLForConditionalGeneration does not fit .*model_type is "
                                          "qwen2_5_vl, which loads as Qwen2_5_VLForConditionalGeneration"):
        run_check("{model_class: Qwen2VLForConditionalGeneration}")
    with pytest.raises(ConfigError, match="import_path 'my_models.qwen': a config file must not import code"):
        run_check("{model_class: Qwen2_5_VLForConditionalGeneration, import_path: my_models.qwen}")
    with pytest.raises(ConfigError, match="code from my_models.qwen is not supported"):
        run_check("{model_class: Qwen2_5_VLForConditionalGeneration, import_path: my_models.qwen}",
                  "--trust_remote_code", "True")


# ------------------------------------------------------------------ label masking
def test_train_on_prompt_learns_the_prompt_but_never_the_image_tokens(tokenizer, tmp_path):
    path = write(tmp_path, "collator.yaml", "label_masking: {mask_input_tokens: false}\n")
    _, data, _ = parse_args([str(path), "--output_dir", str(tmp_path)])
    assert data.train_on_prompt
    conversation = Conversation(None, [("user", "<image>\nWhat shape?"), ("assistant", "A circle.")])
    default_ids, default_labels = ChatEncoder(tokenizer).encode(conversation, [4], [])
    encoder = ChatEncoder(tokenizer, train_on_prompt=data.train_on_prompt)
    ids, labels = encoder.encode(conversation, [4], [])
    assert np.array_equal(ids, default_ids)
    vision = np.isin(ids, [encoder.vision_start_id, encoder.vision_end_id, encoder.image_pad_id])
    assert int(vision.sum()) == 6  # start, 4 pads, end
    assert (labels[vision] == IGNORE_INDEX).all() and np.array_equal(labels[~vision], ids[~vision])
    # the default learns only the answer turn: "A circle.<|im_end|>\n"
    assert tokenizer.decode(default_ids[default_labels != IGNORE_INDEX]) == "A circle.<|im_end|>\n"


# ------------------------------------------------------------------ images
def test_resize_modes_give_exact_sizes_before_smart_resize():
    assert pre_resize(480, 640, "keep_aspect", 224) == (168, 224, None)
    assert pre_resize(480, 640, "keep_aspect", None) == (480, 640, None)
    assert pre_resize(480, 640, "crop", 224) == (224, 224, (80, 0, 560, 480))
    assert pre_resize(480, 640, "crop", None) == (480, 480, (80, 0, 560, 480))
    assert pre_resize(480, 640, "stretch", 112) == (112, 112, None)
    image = Image.new("RGB", (640, 480), (0, 200, 0))
    image.paste((255, 0, 0), (0, 0, 80, 480))  # stripes that the centre crop removes
    image.paste((0, 0, 255), (560, 0, 640, 480))
    expected = {"keep_aspect": (1, 12, 16), "crop": (1, 16, 16), "stretch": (1, 8, 8)}  # 168x224, 224x224, 112x112
    for mode, size in (("keep_aspect", 224), ("crop", 224), ("stretch", 112)):
        cfg = VisionConfig(resize_mode=mode, max_size=size)
        pixels, grid = process_image(image, cfg)
        assert grid == expected[mode] == image_grid_thw(480, 640, cfg), mode  # counting agrees with training
        assert pixels.shape == (grid[1] * grid[2], 3 * 2 * 14 * 14)
    green, _ = process_image(Image.new("RGB", (480, 480), (0, 200, 0)), VisionConfig(resize_mode="crop", max_size=224))
    assert np.array_equal(process_image(image, VisionConfig(resize_mode="crop", max_size=224))[0], green)


def test_image_processing_keys_reach_the_vision_config(tmp_path, image_processor):
    path = write(tmp_path, "collator.yaml", "image_processing: {resize_mode: crop, max_size: 224}\n")
    _, data, _ = parse_args([str(path), "--output_dir", str(tmp_path)])
    cfg = VisionConfig.from_image_processor(image_processor, data.min_pixels, data.max_pixels,
                                            data.image_resize_mode, data.image_max_size)
    assert (cfg.resize_mode, cfg.max_size, image_grid_thw(480, 640, cfg)) == ("crop", 224, (1, 16, 16))


# ------------------------------------------------------------------ videos
def test_uniform_num_frames_gives_evenly_spaced_frames_rounded_to_the_temporal_patch(tmp_path):
    path = write(tmp_path, "collator.yaml", "video_processing:\n  frame_extraction: {sampling_strategy: uniform, "
                                            "num_frames: 7}\n  file_processing: {max_duration: 5}\n")
    _, data, training = parse_args([str(path), "--output_dir", str(tmp_path)])
    assert (data.video_min_frames, data.video_max_frames, data.video_max_duration) == (8, 8, 5.0)
    assert any("uniform 7 frame(s) -> --video_min_frames 8 --video_max_frames 8" in n for n in training.config_notes)
    meta = VideoMeta(100, 10.0, 56, 56)  # 10 s at 10 fps; max_duration keeps the first 5 s = frames 0..49
    plan = plan_video(meta, data, VisionConfig())
    assert plan.indices.tolist() == [0, 7, 14, 21, 28, 35, 42, 49]  # floor(linspace(0, 49, 8))
    assert plan.grid_thw[0] == 4 and plan.second_per_grid_t == 2 / (8 / 5.0)
    qwen3 = plan_video(meta, data, VisionConfig(patch_size=16), family_for("qwen3_vl"))
    assert qwen3.indices.tolist() == [0, 7, 14, 21, 28, 35, 42, 49]  # round(linspace(0, 49, 8)): 7.0, 14.0, ...
    whole = plan_video(meta, DataArguments(video_min_frames=8, video_max_frames=8), VisionConfig())
    assert whole.indices.tolist() == [0, 14, 28, 42, 56, 70, 84, 99]


# ------------------------------------------------------------------ rows and templates
def test_dataset_columns_and_message_format_render_each_row(tmp_path, tokenizer):
    shutil.copy(REPO_ROOT / "demo" / "images" / "red_circle.jpg", tmp_path / "red.jpg")
    rows = [{"image_path": "red.jpg", "query": "What shape?", "response": "A circle.", "note": "A drawing."}]
    data_file = tmp_path / "vqa.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    collator = write(tmp_path, "collator.yaml", """\
dataset_columns: {image_column: image_path, question_column: query, answer_column: response, context_column: note}
message_format:
  system_prompt: "Answer briefly."
  training_messages:
    - role: user
      content:
        - {type: text, text: "{system_prompt} "}
        - {type: image}
        - {type: text, text: "{context_column} {question_column}"}
    - role: assistant
      content: [{type: text, text: "{answer_column}"}]
""")
    parse_args([str(collator), "--output_dir", str(tmp_path), "--dataset_use", str(data_file)])
    record = open_store(resolve_source(str(data_file)))[0]
    assert record == {"image": "red.jpg", "conversations": [
        {"from": "human", "value": "Answer briefly. <image>A drawing. What shape?"},
        {"from": "gpt", "value": "A circle."}]}
    from qwenvl.data.chat import parse_conversation

    ids, _ = ChatEncoder(tokenizer).encode(parse_conversation(record), [1], [])
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAnswer briefly. "
        "<|vision_start|><|image_pad|><|vision_end|>A drawing. What shape?<|im_end|>\n<|im_start|>assistant\n"
        "A circle.<|im_end|>\n")


def test_both_modalities_on_video_takes_precedence_in_a_one_media_part_template(tmp_path, caplog):
    rows = [{"image_path": "red.jpg", "video_path": "clip.mp4", "query": "What moves?", "response": "A dot."},
            {"image_path": "red.jpg", "video_path": None, "query": "What shape?", "response": "A circle."},
            {"image_path": None, "video_path": "clip.mp4", "query": "What moves?", "response": "A dot."},
            {"image_path": None, "video_path": None, "query": "Hi?", "response": "Hello."}]
    data_file = write(tmp_path, "mixed.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    collator = write(tmp_path, "collator.yaml", """\
dataset_columns: {image_column: image_path, video_column: video_path, question_column: query, answer_column: response}
data_processing: {image_data: true, video_data: true}   # both on: video takes precedence
message_format:
  training_messages:
    - role: user
      content: [{type: image}, {type: text, text: "{question_column}"}]
    - role: assistant
      content: [{type: text, text: "{answer_column}"}]
""")
    parse_args([str(collator), "--output_dir", str(tmp_path), "--dataset_use", str(data_file)])
    with caplog.at_level("WARNING"):
        store = open_store(resolve_source(str(data_file)))
    assert store[0] == {"video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>What moves?"}, {"from": "gpt", "value": "A dot."}]}
    assert store[1] == {"image": "red.jpg", "conversations": [
        {"from": "human", "value": "<image>What shape?"}, {"from": "gpt", "value": "A circle."}]}
    assert store[2]["video"] == "clip.mp4" and store[2]["conversations"][0]["value"] == "<video>What moves?"
    assert store[3].kind == "tag_mismatch"
    assert "message_format has a {type: image} part but the row has no image or video" in store[3].reason
    assert store.images_left_out == 1
    assert "1 row(s) hold images and a video but message_format has one media part: each trains on its video" \
        in caplog.text
    set_row_format()


def test_a_template_placeholder_without_a_column_names_it(tmp_path):
    data_file = write(tmp_path, "qa.jsonl", json.dumps({"q": "Hi?", "a": "Hello."}) + "\n")
    collator = write(tmp_path, "collator.yaml", "dataset_columns: {question_column: q, answer_column: a}\n"
                     "message_format:\n  training_messages:\n    - {role: user, content: '{context_column}{question_column}'}"
                     "\n    - {role: assistant, content: '{answer_column}'}\n")
    parse_args([str(collator), "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"message_format uses \{context_column\} but .* has no 'context' column; "
                                         r"its columns: q, a"):
        open_store(resolve_source(str(data_file)))


def test_a_modality_turned_off_refuses_its_samples_with_counts(tmp_path):
    collator = write(tmp_path, "collator.yaml", "data_processing: {image_data: true, video_data: false}\n")
    model, data, training = parse_args([str(collator), "--output_dir", str(tmp_path),
                                        "--dataset_use", "demo_text_only,demo_video"])
    assert media_counts("demo_text_only,demo_video") == {"demo_text_only": (8, 0, 0), "demo_video": (4, 1, 4)}
    with pytest.raises(ConfigError, match=rf"demo_video has 4 of 4 samples with videos but video_data is off "
                                          rf"\({collator}\): those samples would be dropped"):
        check_run(model, data, training)
    assert check_modalities(True, False, {"demo_text_only": (8, 0, 0)}) == [
        "demo_text_only: 8 samples, 0 with images, 0 with videos"]


# ------------------------------------------------------------------ the example folder trains
def test_the_example_files_train_the_demo_data(tiny_model_dir, tmp_path, capfd):
    from qwenvl.train.train_qwen import train

    output = tmp_path / "run"
    train([str(EXAMPLES), "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(output),
           "--max_steps", "4", "--dataloader_num_workers", "0", "--count_workers", "1"])
    summary = capfd.readouterr().err
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4]  # 0.25 of 4 steps
    media = json.loads((output / "media_settings.json").read_text())  # what inference will preprocess with
    assert (media["image_resize_mode"], media["image_max_size"], media["max_pixels"], media["min_pixels"]) == \
        ("keep_aspect", 448, 64 * 28 * 28, 4 * 28 * 28)
    assert (media["video_min_frames"], media["video_max_frames"]) == (8, 8)  # uniform num_frames: 8
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["bias"]) == (8, 16, "none")
    assert "logging every 0.25 of the run = every 1 step(s) of 4; saving every 0.5 of the run = every 2 step(s)" \
        in summary
    assert f"set by {EXAMPLES / 'peft_config.yaml'}: lora_alpha=16, lora_enable=True, lora_r=8, " \
           "lora_target_modules=all-linear" in summary
    assert f"model_classes ({EXAMPLES / 'vlm_model_config.yaml'}): Qwen/Qwen2.5-VL-3B-Instruct -> " \
           "Qwen2_5_VLForConditionalGeneration (qwen2_5_vl), checked" in summary
    assert "LoRA r=8 alpha=16 dropout=0.05 on all-linear = down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj " \
           "of the language model" in summary


def test_help_names_the_config_option_and_the_new_flags():
    from qwenvl.train.argument import build_parser

    text = " ".join(build_parser().format_help().split())
    for flag in ("--config FILE_OR_FOLDER", "--train_on_prompt", "--image_resize_mode", "--video_max_duration",
                 "--dataset_columns", "--message_format", "--lora_bias", "--trust_remote_code", "--image_data"):
        assert flag in text, flag
