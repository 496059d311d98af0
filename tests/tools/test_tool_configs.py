"""``--config`` for the tools, and the media settings a run saves with its model (issue 19).

Oracles: training's own parse of the same config files (``parse_args``) and its dataset's items; image grids
worked out by hand from the demo image sizes (centre crop, the max-size cap, then smart_resize to multiples of
28 pixels: 14-pixel patches, merged 2 x 2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qwenvl.data.chat import Conversation
from qwenvl.data.data_qwen import LazySupervisedDataset
from qwenvl.data.media_settings import MEDIA_SETTINGS_FILE, read_media_settings, save_media_settings
from qwenvl.data.vision import VisionConfig
from qwenvl.models import family_for
from qwenvl.models.loading import load_image_processor
from qwenvl.train.argument import DataArguments, parse_args
from tests.conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples" / "vlm_config"
RED_CIRCLE = str(REPO_ROOT / "demo" / "images" / "red_circle.jpg")  # 320 x 240


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def crop_files(tmp_path) -> list[str]:
    """A train file naming the demo datasets and a collator file that centre-crops to at most 224 pixels."""
    train = write_yaml(tmp_path / "train_config.yaml", "dataset_use: [demo_single_image, demo_multi_image]\n"
                                                        "learning_rate: 1.0e-4\nper_device_train_batch_size: 2\n"
                                                        "model_max_length: 4096\n")
    collator = write_yaml(tmp_path / "vlm_collator_config.yaml",
                          "image_processing: {convert_to_rgb: true, resize_mode: crop, max_size: 224}\n")
    return [str(train), str(collator)]


def test_pack_data_reads_the_config_files_as_training_does(tiny_model_dir, crop_files, tmp_path, capsys):
    from tools.pack_data import main

    config_flags = [flag for path in crop_files for flag in ("--config", path)]
    common = ["--model_name_or_path", str(tiny_model_dir), "--cache_dir", str(tmp_path), "--pack_length", "16384"]
    (packed,) = main([*config_flags, *common, "--output", str(tmp_path / "crop_pack.json")])
    printed = capsys.readouterr().err
    assert f"--image_max_size 224 (from {crop_files[1]})" in printed
    assert "--image_resize_mode 'crop'" in printed
    assert "not used by this tool: learning_rate, per_device_train_batch_size" in printed
    assert packed.sources == ["demo_single_image", "demo_multi_image"]  # the train file's dataset_use

    # Oracle: training's items under training's parse of the same files.
    _, data_args, training_args = parse_args([*crop_files, "--output_dir", str(tmp_path / "out")])
    assert (data_args.image_resize_mode, data_args.image_max_size) == ("crop", 224)
    processor = load_image_processor(str(tiny_model_dir))
    cfg = VisionConfig.from_image_processor(processor, data_args.min_pixels, data_args.max_pixels,
                                            data_args.image_resize_mode, data_args.image_max_size)
    from transformers import AutoTokenizer

    dataset = LazySupervisedDataset(AutoTokenizer.from_pretrained(tiny_model_dir), data_args, cfg,
                                    model_max_length=training_args.model_max_length,
                                    family=family_for("qwen2_5_vl"))
    assert packed.tokens == sum(len(dataset[i]["input_ids"]) for i in range(len(dataset)))

    (plain,) = main(["demo_single_image", "demo_multi_image", *common, "--output", str(tmp_path / "plain.json"),
                     "--model_max_length", "4096"])
    assert plain.tokens > packed.tokens  # without the files the images are not cropped: the config was applied


def test_a_flag_wins_over_the_config_files(tiny_model_dir, crop_files, tmp_path, capsys):
    from tools.pack_data import main

    common = ["--model_name_or_path", str(tiny_model_dir), "--cache_dir", str(tmp_path), "--pack_length", "16384"]
    (filed,) = main(["--config", crop_files[0], "--config", crop_files[1], *common, "--output", str(tmp_path / "a.json")])
    (flagged,) = main(["--config", crop_files[0], "--config", crop_files[1], "--image_max_size", "168", *common,
                       "--output", str(tmp_path / "b.json")])
    (plain,) = main(["demo_single_image", "demo_multi_image", "--image_resize_mode", "crop", "--image_max_size", "168",
                     "--model_max_length", "4096", *common, "--output", str(tmp_path / "c.json")])
    assert flagged.tokens == plain.tokens < filed.tokens  # 168 pixels (the flag), not the file's 224
    assert f"--image_max_size 224 (from {crop_files[1]}; the command line's value wins)" in capsys.readouterr().err


def test_a_bad_key_is_refused_as_training_refuses_it(tmp_path, capsys):
    from tools.check_image import main

    bad = write_yaml(tmp_path / "bad_collator.yaml", "image_processing: {resize_mod: crop}\n")
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(bad), "demo_single_image"])
    assert stop.value.code == 2
    assert (f"config file {bad}: image_processing.resize_mod: unknown key; did you mean resize_mode?"
            in capsys.readouterr().err)


def test_inputs_are_required_without_a_train_file(capsys, tmp_path):
    from tools.check_image import main

    collator = write_yaml(tmp_path / "c.yaml", "image_processing: {resize_mode: crop, max_size: 112}\n")
    with pytest.raises(SystemExit):
        main(["--config", str(collator)])
    assert "no INPUT given, and no --config train file sets dataset_use" in capsys.readouterr().err


def test_the_row_flags_of_a_collator_file_reach_the_tools(tmp_path, capsys):
    from tools.check_image import main

    rows = tmp_path / "vqa.jsonl"
    rows.write_text(json.dumps({"image_path": RED_CIRCLE, "query": "Shape?", "response": "A circle."}) + "\n",
                    encoding="utf-8")
    collator = write_yaml(tmp_path / "vlm_collator_config.yaml",
                          "dataset_columns: {image_column: image_path, question_column: query, "
                          "answer_column: response}\n")
    assert main([str(rows), "--output_dir", str(tmp_path / "without"), "--no_progress"]) == 1  # no conversations
    assert main(["--config", str(collator), str(rows), "--output_dir", str(tmp_path / "with"), "--no_progress"]) == 0
    valid = json.loads((tmp_path / "with" / "vqa_valid.json").read_text())
    assert valid[0]["conversations"] == [{"from": "human", "value": "<image>\nShape?"},
                                         {"from": "gpt", "value": "A circle."}]


# ------------------------------------------------------------------ media settings saved with the model
def test_media_settings_round_trip_and_refuse_other_keys(tmp_path):
    args = DataArguments(image_resize_mode="stretch", image_max_size=224, video_max_duration=3.5,
                         video_min_frames=8, video_max_frames=8)
    from qwenvl.data.media_settings import media_values

    save_media_settings(media_values(args), tmp_path)
    saved = read_media_settings(tmp_path)
    assert (saved["image_resize_mode"], saved["image_max_size"], saved["video_max_duration"]) == ("stretch", 224, 3.5)
    assert (saved["video_min_frames"], saved["video_max_frames"], saved["max_pixels"]) == (8, 8, 576 * 28 * 28)
    assert read_media_settings(tmp_path / "nothing_saved") == {}
    (tmp_path / MEDIA_SETTINGS_FILE).write_text('{"learning_rate": 1}', encoding="utf-8")
    with pytest.raises(ValueError, match="media_settings.json: expected media flags .* but found learning_rate"):
        read_media_settings(tmp_path)


def test_infer_preprocesses_as_the_run_saved_unless_a_flag_says_otherwise(tiny_model_dir, tmp_path):
    from tools.infer import Predictor

    def grid(folder: Path, **media) -> list[int]:
        predictor = Predictor.from_pretrained(folder, media=media)
        inputs = predictor.encode_prompt(Conversation(None, [("user", "<image>\nShape?")]), [RED_CIRCLE])
        return inputs["image_grid_thw"][0].tolist()

    # 320 x 240, keep_aspect, no cap: smart_resize to 308 x 252 -> 22 x 18 patches.
    assert grid(tiny_model_dir) == [1, 18, 22]
    folder = tmp_path / "run"
    shutil.copytree(tiny_model_dir, folder)
    save_media_settings({"image_resize_mode": "crop", "image_max_size": 112}, folder)
    # The centre 240 x 240 square, capped at 112 x 112 (a multiple of 28 already): 8 x 8 patches.
    assert grid(folder) == [1, 8, 8]
    # A flag over the saved value: stretched to 56 x 56, 4 x 4 patches.
    assert grid(folder, image_resize_mode="stretch", image_max_size=56) == [1, 4, 4]


def test_infer_takes_config_files_and_their_datasets(tiny_model_dir, tmp_path, capsys):
    from tools.infer import main

    train = write_yaml(tmp_path / "train_config.yaml", "eval_dataset_use: demo_single_image\n"
                                                        "dataset_use: demo_grounding\nlearning_rate: 1.0e-4\n")
    predictions = main(["--model", str(tiny_model_dir), "--config", str(train), "--max_samples", "1",
                        "--max_new_tokens", "2"])
    assert [(p.source, p.index) for p in predictions] == [("demo_single_image", 0)]  # eval set first
    assert "not used by this tool: learning_rate" in capsys.readouterr().err
