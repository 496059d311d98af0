"""qwenvl/train/argument.py: --help, abbreviations, old flags, config files, config paths, fp16 on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess

import pytest

from qwenvl.train.argument import ConfigError, load_config_file, parse_args
from tests.conftest import PYTHON, REPO_ROOT, python_env

BASE = ["--use_cpu", "True", "--report_to", "none"]


def as_dicts(parsed) -> list[dict]:
    """The three dataclasses as plain dicts (for equality)."""
    return [dataclasses.asdict(obj) for obj in parsed]


@pytest.mark.parametrize("command", [
    "qwenvl/train/train_qwen.py", "tools/pack_data.py", "tools/check_image.py", "tools/build_tiny_model.py",
    "tools/infer.py", "tools/merge_lora.py", "tools/preview.py", "tools/make_demo_data.py", "tools/make_demo_videos.py",
    "tools/plot_loss.py",
    *sorted(str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "bench").glob("*.py")),
])
def test_help_of_every_command(command):
    done = subprocess.run([PYTHON, command, "--help"], cwd=REPO_ROOT, env=python_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^usage: ", done.stdout, re.MULTILINE), done.stdout[:300]
    if command.endswith("train_qwen.py"):  # the %N that used to crash argparse's help formatting
        assert "name%N (keep a seeded N% of it)" in " ".join(done.stdout.split())


def test_abbreviated_flags_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown flag --learning_rat \(did you mean --learning_rate[ ?].*"
                                          "abbreviations are not accepted"):
        parse_args(["--learning_rat", "1e-5", "--output_dir", str(tmp_path), *BASE])
    with pytest.raises(ConfigError, match=r"unknown flag --tune_mm"):
        parse_args(["--tune_mm", "True", "--output_dir", str(tmp_path), *BASE])


@pytest.mark.parametrize("flags,attribute,value,note", [
    (["--evaluation_strategy", "steps", "--eval_steps", "5"], "eval_strategy", "steps",
     "--evaluation_strategy steps -> --eval_strategy steps"),
    (["--group_by_length", "True"], "train_sampling_strategy", "group_by_length",
     "--group_by_length -> --train_sampling_strategy group_by_length"),
    (["--group_by_length"], "train_sampling_strategy", "group_by_length",
     "--group_by_length -> --train_sampling_strategy group_by_length"),
    (["--save_safetensors", "True"], "save_strategy", "steps", "--save_safetensors: always on in transformers 5"),
    (["--warmup_ratio", "0.1"], "warmup_steps", 0.1, "--warmup_ratio 0.1 -> --warmup_steps 0.1"),
    (["--overwrite_output_dir"], "overwrite_output_dir", True, "--overwrite_output_dir: earlier checkpoints"),
])
def test_old_flags_are_translated_with_a_note(flags, attribute, value, note, tmp_path):
    _, _, training = parse_args(["--output_dir", str(tmp_path), *BASE, *flags])
    found = getattr(training, attribute)
    assert getattr(found, "value", found) == value
    assert any(line.startswith(note) for line in training.legacy_notes), training.legacy_notes


def test_logging_dir_becomes_tensorboards_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    _, _, training = parse_args(["--output_dir", str(tmp_path), *BASE, "--logging_dir", str(tmp_path / "tb")])
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tb")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")


def test_refused_old_flags_name_the_replacement(tmp_path):
    with pytest.raises(ConfigError, match="--save_safetensors False: transformers 5 always saves safetensors"):
        parse_args(["--output_dir", str(tmp_path), *BASE, "--save_safetensors", "False"])
    with pytest.raises(ConfigError, match="--evaluation_strategy epoch contradicts --eval_strategy steps"):
        parse_args(["--output_dir", str(tmp_path), *BASE, "--evaluation_strategy", "epoch", "--eval_strategy", "steps"])


def test_loss_is_logged_every_few_steps_by_default(tmp_path):
    _, _, training = parse_args(["--output_dir", str(tmp_path), *BASE])
    assert training.logging_steps == 10 and training.logging_first_step


def test_fp16_on_cpu_is_refused_up_front(tmp_path):
    with pytest.raises(ConfigError, match="--fp16: float16 mixed precision needs a CUDA"):
        parse_args(["--output_dir", str(tmp_path), *BASE, "--fp16", "True"])


def test_deepspeed_config_is_found_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, training = parse_args(["--output_dir", str(tmp_path), *BASE, "--deepspeed", "zero3.json"])
    assert training.deepspeed == str(REPO_ROOT / "zero3.json")
    _, _, training = parse_args(["--output_dir", str(tmp_path), *BASE, "--deepspeed", "zero2.json"])
    assert training.deepspeed == str(REPO_ROOT / "scripts" / "zero2.json")
    with pytest.raises(ConfigError, match=r"--deepspeed zero9\.json: no such file in the working directory .*"
                                          r"the project ships .*scripts/zero3_offload\.json"):
        parse_args(["--output_dir", str(tmp_path), *BASE, "--deepspeed", "zero9.json"])


FLAGS = [
    "--model_name_or_path", "/models/qwen", "--dataset_use", "demo_single_image%50,demo_text_only",
    "--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--max_pixels", "256*28*28", "--learning_rate", "2e-05",
    "--per_device_train_batch_size", "2", "--output_dir", "OUT", "--use_cpu", "True", "--report_to", "none",
    "--lora_enable", "True", "--lora_r", "16", "--lora_alpha", "32", "--lora_target_modules", "q_proj,v_proj",
    "--max_steps", "7", "--data_flatten", "True",
]
YAML = """\
model_name_or_path: /models/qwen
dataset_use: [demo_single_image%50, demo_text_only]
tune_mm_llm: true
tune_mm_mlp: true
max_pixels: 256*28*28
learning_rate: 2.0e-5
per_device_train_batch_size: 2
output_dir: OUT
use_cpu: true
report_to: none
max_steps: 7
data_flatten: true
lora:
  r: 16
  alpha: 32
  target_modules: [q_proj, v_proj]
"""


def test_a_yaml_config_equals_the_same_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(YAML.replace("OUT", str(tmp_path)))
    flags = [str(tmp_path) if value == "OUT" else value for value in FLAGS]
    assert as_dicts(parse_args([str(config)])) == as_dicts(parse_args(flags))


def test_a_json_config_and_a_flag_that_overrides_it(tmp_path):
    config = tmp_path / "run.json"
    settings = {"model_name_or_path": "/models/qwen", "dataset_use": "demo_text_only", "output_dir": str(tmp_path),
                "use_cpu": True, "report_to": "none", "learning_rate": 1e-3, "tune_mm_llm": True}
    config.write_text(json.dumps(settings))
    model, data, training = parse_args([str(config), "--learning_rate", "5e-4", "--dataset_use", "demo_video"])
    assert training.learning_rate == 5e-4 and data.dataset_use == "demo_video"
    assert model.tune_mm_llm and model.model_name_or_path == "/models/qwen"


def test_unknown_setting_in_a_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rat: 1e-5\n")
    with pytest.raises(ConfigError, match="run.yaml: unknown setting 'learning_rat'; did you mean learning_rate"):
        load_config_file(config)


def test_the_shipped_example_configs_parse(tmp_path):
    for path in sorted((REPO_ROOT / "examples").glob("*_sft.yaml")) + sorted((REPO_ROOT / "examples").glob("*_lora.yaml")):
        model, data, training = parse_args([str(path), "--bf16", "False", "--use_cpu", "True",
                                            "--output_dir", str(tmp_path)])
        assert data.dataset_use and model.model_name_or_path.startswith("Qwen/"), path
        assert training.deepspeed and os.path.isfile(training.deepspeed), path
