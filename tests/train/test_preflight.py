"""Settings that cannot work fail before any model weight is read, naming the flag (qwenvl/train/preflight.py).

Every run here points at a copy of the tiny checkpoint without its weights file: a check that
came after the model load would fail with the loader's "no weights" error instead of its own.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

import pytest

from qwenvl.models import FAMILIES
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


# ------------------------------------------------------------------ issue 18: packed files, checkpoints, the hub
PACKED = '[[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]]'


def test_a_packed_file_without_data_packing_is_refused_naming_file_and_flag(weightless, tmp_path):
    packed = tmp_path / "mine_pack.json"
    packed.write_text(PACKED)
    with pytest.raises(ConfigError, match=re.escape(
            f"--dataset_use {packed}: {packed} holds groups of samples written by tools/pack_data.py; add "
            "--data_packing True to train on its groups as written (or give the unpacked annotation file)")):
        train(argv(weightless, tmp_path / "out", "--dataset_use", str(packed)))
    with pytest.raises(ConfigError, match=re.escape(
            f"--eval_dataset_use {packed}: {packed} holds groups of samples written by tools/pack_data.py; "
            "evaluation reads samples: give the unpacked annotation file")):
        train(argv(weightless, tmp_path / "out", "--eval_dataset_use", str(packed)))


SUPPORTED = "supported model types: " + ", ".join(FAMILIES)


@pytest.mark.parametrize("config,message", [
    ({"model_type": "internvl_chat", "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"}},
     "model_type 'internvl_chat': InternVL2/2.5's remote code (InternVLChatModel) is not supported. The HF-native "
     "InternVL checkpoints are the `*-hf` ones, e.g. OpenGVLab/InternVL3-2B-hf (model_type internvl, loaded without "
     "trust_remote_code)" + ("; use one of them; " if "internvl" in FAMILIES else "; they are not supported yet either; ")
     + SUPPORTED),
    ({"model_type": "phi3_v", "auto_map": {"AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"}},
     "model_type 'phi3_v': Phi-3-Vision's remote code (Phi3VForCausalLM) is not supported, and there is no "
     "HF-native Phi-3-Vision checkpoint to use instead; " + SUPPORTED),
    ({"model_type": "my_vlm", "auto_map": {"AutoConfig": "configuration_my.MyConfig",
                                           "AutoModel": "modeling_my.MyModel"}},
     "model_type 'my_vlm': it is remote code (config.json auto_map: MyConfig, MyModel), which is not supported; "
     + SUPPORTED),
    ({"model_type": "mllama"}, "model_type 'mllama' is not supported (yet); " + SUPPORTED),
    ({"model_type": "kosmos-2"}, "model_type 'kosmos-2' is not supported (yet); " + SUPPORTED),
])
def test_unsupported_checkpoints_are_refused_by_their_model_type(tmp_path, config, message):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="^" + re.escape(f"--model_name_or_path {folder}: {message}") + "$"):
        train(argv(folder, tmp_path / "out"))


def test_a_folder_without_config_json_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=re.escape(f"--model_name_or_path {tmp_path / 'empty'}: no model config "
                                                    f"found ({tmp_path / 'empty'} holds no config.json")):
        train(argv(tmp_path / "empty", tmp_path / "out"))


def hub_cache(root, repo_id: str, files) -> None:
    """A Hugging Face hub cache holding ``files`` as the snapshot of ``repo_id`` (the layout huggingface_hub reads)."""
    folder = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in files:
        shutil.copy(path, snapshot / path.name)


HUB_SCRIPT = """
import json, sys, time
from qwenvl.train.preflight import PreflightError, check_model
from types import SimpleNamespace
out = {}
for name in sys.argv[2:]:
    args = SimpleNamespace(model_name_or_path=name)
    start = time.perf_counter()
    try:
        check_model(args, cache_dir=sys.argv[1])
        out[name] = ["ok", args.model_name_or_path, time.perf_counter() - start]
    except PreflightError as exc:
        out[name] = ["error", str(exc), time.perf_counter() - start]
print("RESULT" + json.dumps(out))
"""


def run_hub_script(cache, names, offline: bool) -> tuple[dict, str]:
    import subprocess

    from tests.conftest import PYTHON, REPO_ROOT, python_env

    env = {k: v for k, v in python_env().items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # loopback, nothing listens: refused at once
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([PYTHON, "-c", HUB_SCRIPT, str(cache), *names], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT", 1)[1]), done.stderr


def test_hub_ids_resolve_from_the_cache_and_fail_fast_when_the_hub_is_unreachable(tiny_model_dir, tmp_path):
    cache = tmp_path / "hub"
    hub_cache(cache, "org/cached", sorted(tiny_model_dir.iterdir()))
    hub_cache(cache, "org/config_only", [tiny_model_dir / "config.json"])
    names = ["org/missing", "org/cached", "org/config_only"]
    online, log = run_hub_script(cache, names, offline=False)
    assert "Retrying" not in log
    status, message, seconds = online["org/missing"]
    assert status == "error" and seconds < 5, online
    assert message == (f"--model_name_or_path org/missing: no model config found: org/missing is not in the local "
                       f"Hugging Face cache ({cache}) and http://127.0.0.1:9 cannot be reached ([Errno 111] Connection "
                       "refused); download it where the hub is reachable (`hf download org/missing`, into the same "
                       "cache), or give a local folder holding config.json")
    snapshot = cache / "models--org--cached" / "snapshots" / ("0" * 40)
    assert online["org/cached"][:2] == ["ok", str(snapshot)]  # later loads read the folder: no network wait
    assert f"org/cached: http://127.0.0.1:9 cannot be reached ([Errno 111] Connection refused); using the cached " \
           f"snapshot {snapshot}" in log
    status, message, _ = online["org/config_only"]
    assert status == "error" and "org/config_only is only partly in the local Hugging Face cache" in message
    assert "lacks model.safetensors" in message

    offline, log = run_hub_script(cache, ["org/missing", "org/cached"], offline=True)
    assert offline["org/missing"][0] == "error" and offline["org/missing"][2] < 5
    assert "and HF_HUB_OFFLINE=1 forbids downloading" in offline["org/missing"][1]
    assert offline["org/cached"][:2] == ["ok", "org/cached"]  # transformers reads the cache itself offline
