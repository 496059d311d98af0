"""Settings that cannot work fail before any model weight is read, naming the flag (qwenvl/train/preflight.py).

Every run here points at a copy of the tiny checkpoint without its weights file: a check that
came after the model load would fail with the loader's "no weights" error instead of its own.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from qwenvl.train.argument import ConfigError
from qwenvl.train.train_qwen import train


@pytest.fixture(scope="module")
def weightless(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("weightless")
    for path in tiny_model_dir.iterdir():
        if not path.name.endswith(".safetensors"):
            shutil.copy(path, folder / path.name)
    return folder


def argv(model, output, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--dataset_use", "demo_text_only", "--tune_mm_llm", "True",
            "--output_dir", str(output), "--use_cpu", "True", "--report_to", "none", "--max_steps", "1", *extra]


def test_the_weightless_copy_fails_in_the_loader_when_every_setting_is_fine(weightless, tmp_path):
    with pytest.raises(OSError, match="model.safetensors|no file named"):
        train(argv(weightless, tmp_path))


@pytest.mark.parametrize("extra,message", [
    (["--dataset_use", "nope%50"], r"--dataset_use: unknown dataset 'nope' in --dataset_use; registered datasets: "),
    (["--dataset_use", "demo_text_only%0"], r"--dataset_use: .*sampling rate must be in \(0, 100\], got 0"),
    (["--eval_dataset_use", "nope"], r"--eval_dataset_use: unknown dataset 'nope'"),
    (["--report_to", "mlflow"], r"--report_to mlflow: the mlflow package is not installed; `pip install mlflow`"),
    (["--eval_strategy", "steps", "--eval_steps", "1"],
     r"--eval_strategy steps asks for evaluation but there is no eval set: give --eval_dataset_use"),
    (["--tune_mm_llm", "False"], r"nothing would train: every --tune_mm_llm / --tune_mm_mlp / --tune_mm_vision"),
    (["--max_pixels", "500", "--min_pixels", "100"], r"--max_pixels 500 is below one vision token for this model "
                                                      r"\(28x28 = 784 pixels\)"),
    (["--video_max_frame_pixels", "600", "--video_min_frame_pixels", "100"], r"--video_max_frame_pixels 600"),
    (["--data_packing", "True", "--pack_length", "0"], r"pack_length must be positive, got 0"),
    (["--attn_implementation", "fast"], r"--attn_implementation fast: expected one of"),
    (["--resume_from_checkpoint", "/nowhere/checkpoint-3"], r"--resume_from_checkpoint /nowhere/checkpoint-3: no such"),
])
def test_bad_settings_fail_before_the_model_loads(weightless, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        train(argv(weightless, tmp_path, *extra))


def test_packed_files_and_unpacked_datasets_are_not_mixed(weightless, tmp_path):
    packed = tmp_path / "mine_pack.json"
    packed.write_text('[[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]]')
    registry = tmp_path / "registry.yaml"
    registry.write_text(f"mine_pack:\n  annotation_path: {packed}\n  data_path: ''\n")
    with pytest.raises(ConfigError, match=r"--data_packing True: mine_pack are files from tools/pack_data\.py but "
                                          r"demo_text_only are not"):
        train(argv(weightless, tmp_path / "out", "--dataset_registry", str(registry), "--data_packing", "True",
                   "--dataset_use", "mine_pack,demo_text_only"))


def test_a_missing_model_folder_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"--model_name_or_path .*missing_model: no model config found"):
        train(argv(tmp_path / "missing_model", tmp_path / "out"))


def test_registry_file_with_a_missing_annotation_file(weightless, tmp_path):
    registry = tmp_path / "registry.yaml"
    registry.write_text("mine:\n  annotation_path: data/absent.json\n  data_path: data\n")
    with pytest.raises(ConfigError, match=r"--dataset_use: dataset 'mine': .*data/absent.json does not exist"):
        train(argv(weightless, tmp_path / "out", "--dataset_registry", str(registry), "--dataset_use", "mine"))


def test_registry_file_datasets_pass_the_checks(weightless, tmp_path):
    registry = tmp_path / "registry.json"
    registry.write_text('{"mine_json": {"annotation_path": "%s", "data_path": ""}}'
                        % (weightless.parents[0] / "nothing.json"))
    with pytest.raises(ConfigError, match=r"--dataset_use: dataset 'mine_json': .*nothing.json does not exist"):
        train(argv(weightless, tmp_path / "out", "--dataset_registry", str(registry), "--dataset_use", "mine_json"))
    with pytest.raises(ConfigError, match=r"--dataset_registry .*absent.yaml"):
        train(argv(weightless, tmp_path / "out", "--dataset_registry", str(tmp_path / "absent.yaml")))


def test_the_command_line_prints_the_error_without_a_traceback(weightless, tmp_path):
    import subprocess

    from tests.conftest import PYTHON, REPO_ROOT, python_env

    done = subprocess.run([PYTHON, "qwenvl/train/train_qwen.py", *argv(weightless, tmp_path, "--dataset_use", "nope")],
                          cwd=REPO_ROOT, env=python_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "train_qwen.py: error: --dataset_use: unknown dataset 'nope'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_the_package(weightless, tmp_path):
    with pytest.raises(ConfigError, match="--attn_implementation flash_attention_2: the flash_attn package is not"):
        train(argv(weightless, tmp_path, "--attn_implementation", "flash_attention_2"))
