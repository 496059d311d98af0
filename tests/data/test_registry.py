"""qwenvl/data/__init__.py: the registry, data_list and %N sampling."""

from __future__ import annotations

import json
import subprocess

import pytest

import qwenvl.data as registry
from qwenvl.data import data_list, parse_sampling_rate
from qwenvl.data.data_qwen import sample_indices
from tests.conftest import PYTHON, REPO_ROOT, python_env


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


_SUBSET_SCRIPT = """
import json, os, sys
from qwenvl.data.data_qwen import sample_indices
print(json.dumps({"rank": os.environ["RANK"], "kept": sample_indices(5000, 0.37, seed=7, name="my_ds")}))
"""


def test_two_ranks_keep_the_same_subset():
    """Two separate processes (different hash seeds, like two ranks) agree on the subset."""
    outputs = []
    for rank in ("0", "1"):
        env = python_env() | {"RANK": rank, "PYTHONHASHSEED": str(100 + int(rank))}
        result = subprocess.run([PYTHON, "-c", _SUBSET_SCRIPT], env=env, cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True, timeout=120)
        outputs.append(json.loads(result.stdout))
    assert len(outputs[0]["kept"]) == int(5000 * 0.37)
    assert outputs[0]["kept"] == outputs[1]["kept"]
