"""qwenvl/data/__init__.py: the registry, data_list and %N sampling."""

from __future__ import annotations

import json
import subprocess

import pytest

import qwenvl.data as registry
from qwenvl.data import data_list, parse_sampling_rate
from qwenvl.data.data_qwen import sample_indices
from tests.conftest import PYTHON, REPO_ROOT, free_port, python_env


def test_data_list_returns_copies_with_rates():
    configs = data_list(["demo_single_image%50", "demo_text_only"])
    assert [c["sampling_rate"] for c in configs] == [0.5, 1.0]
    assert configs[0]["annotation_path"] == registry.DEMO_SINGLE_IMAGE["annotation_path"]
    configs[0]["annotation_path"] = "changed"
    assert registry.DEMO_SINGLE_IMAGE["annotation_path"] != "changed"
    assert "sampling_rate" not in registry.DEMO_SINGLE_IMAGE


@pytest.mark.parametrize("spec,message", [
    ("demo_single_image%0", "sampling rate must be in \\(0, 100\\], got 0"),
    ("demo_single_image%150", "sampling rate must be in \\(0, 100\\], got 150"),
    ("demo_single_image%x", "sampling rate 'x' is not a number"),
    ("no_such_dataset", "unknown dataset 'no_such_dataset'"),
])
def test_bad_entries_are_errors_listing_registered_names(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        data_list([spec])
    assert "demo_single_image" in str(info.value) and "demo_text_only" in str(info.value)


def test_parse_rate_with_fraction():
    assert parse_sampling_rate("ds%12.5") == ("ds", 0.125)


def test_sampling_is_seeded_and_depends_on_name():
    first = sample_indices(1000, 0.1, seed=42, name="a")
    assert len(first) == 100 and first == sorted(first)
    assert sample_indices(1000, 0.1, seed=42, name="a") == first
    assert sample_indices(1000, 0.1, seed=43, name="a") != first
    assert sample_indices(1000, 0.1, seed=42, name="b") != first


def test_two_ranks_keep_the_same_subset(tiny_model_dir, tmp_path):
    """torchrun with 2 processes (each with its own hash seed): both ranks keep the same seeded subset."""
    command = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(REPO_ROOT / "tests" / "data" / "subset_worker.py"), str(tiny_model_dir), str(tmp_path)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=python_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    single = [i for name, i in rank0 if name == "demo_single_image"]
    text = [i for name, i in rank0 if name == "demo_text_only"]
    assert len(single) == 12 // 2 and len(text) == int(8 * 0.4)
    assert rank0 == rank1
    assert single == sample_indices(12, 0.5, seed=1234, name="demo_single_image")


@pytest.mark.parametrize("names, first, second", [
    (["demo_video", "demo_video"], "demo_video", "demo_video"),
    (["demo_video%50", "demo_video%50"], "demo_video%50", "demo_video%50"),
    (["demo_text_only", "demo_video%30", " demo_video"], "demo_video%30", "demo_video"),
])
def test_dataset_named_twice_is_an_error(names, first, second):
    """Issue 9: every sample of a dataset named twice was trained twice, silently."""
    with pytest.raises(ValueError) as info:
        data_list(names)
    assert str(info.value) == (f"dataset 'demo_video' is named twice in --dataset_use ({first!r} and {second!r}): "
                               "each of its samples would be trained twice; name it once (use demo_video%N to keep "
                               "N percent)")
    assert [c["name"] for c in data_list(["demo_video", "demo_text_only"])] == ["demo_video", "demo_text_only"]
