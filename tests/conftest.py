"""Shared fixtures: a tiny random Qwen-VL checkpoint built locally with the real Qwen tokenizer."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Annotation stores of the tests' files go to a folder of this run, not the user's cache.
os.environ.setdefault("QWENVL_ANNOTATION_CACHE", tempfile.mkdtemp(prefix="qwenvl-annotations-"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL checkpoint folder (model, tokenizer, image processor)."""
    from tools.build_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), model_type="qwen2_5_vl", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2-VL checkpoint folder."""
    from tools.build_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2_vl"), model_type="qwen2_vl", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3-VL (dense) checkpoint folder."""
    from tools.build_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen3_vl"), model_type="qwen3_vl", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_moe_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3-VL MoE checkpoint folder."""
    from tools.build_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen3_vl_moe"), model_type="qwen3_vl_moe", seed=0)


@pytest.fixture(scope="session")
def tiny_dirs(request: pytest.FixtureRequest) -> dict[str, Path]:
    """One tiny checkpoint folder per family (model_type -> folder), each built once per session."""
    names = {"qwen2_vl": "tiny_qwen2_model_dir", "qwen2_5_vl": "tiny_model_dir", "qwen3_vl": "tiny_qwen3_model_dir",
             "qwen3_vl_moe": "tiny_qwen3_moe_model_dir"}
    return {model_type: request.getfixturevalue(name) for model_type, name in names.items()}


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def image_processor(tiny_model_dir):
    from qwenvl.models.loading import load_image_processor

    return load_image_processor(str(tiny_model_dir))


FOUR_DEMO_KINDS = ("demo_single_image", "demo_text_only", "demo_multi_image", "demo_grounding")


def demo_items(tokenizer, image_processor, names: tuple[str, ...]) -> list[dict]:
    """The first sample of each named demo dataset, built by ``LazySupervisedDataset`` (pixels 16-64 x 28 x 28)."""
    from qwenvl.data.data_qwen import LazySupervisedDataset
    from qwenvl.data.vision import VisionConfig
    from qwenvl.train.argument import DataArguments

    cfg = VisionConfig.from_image_processor(image_processor, 16 * 28 * 28, 64 * 28 * 28)
    dataset = LazySupervisedDataset(tokenizer, DataArguments(dataset_use=",".join(sorted(set(names)))), cfg,
                                    model_max_length=4096)
    first = {r.dataset: i for i, r in reversed(list(enumerate(dataset.refs)))}
    return [dataset[first[name]] for name in names]


def python_env() -> dict:
    """Environment for subprocesses (torchrun, tools): repo importable, offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


PYTHON = sys.executable


def kill_tree(process) -> None:
    """SIGKILL a launched command and every process under it, like a node that dies.

    torchrun starts each worker in its own session, so killing the launcher's process
    group would leave the workers running (and writing checkpoints) as orphans.
    """
    import psutil

    try:
        parent = psutil.Process(process.pid)
        victims = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=60)
    process.wait(timeout=60)


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun master (tests run in parallel)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
