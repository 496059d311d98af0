"""Training on bad data (issue 5): skipped, counted across ranks and workers, reported, capped; never NaN.

The 2-process run trains on a 30-sample set with 3 bad samples (10 %) and
records what every batch holds (tests/train/bad_data_worker.py): the model
must see each good sample exactly once per epoch and no bad one, the bad ones
must be reported per dataset, and tools/check_image.py must report exactly
the samples the run skipped.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

import qwenvl.data as registry
from qwenvl.data.data_qwen import BadSampleError, load_annotations, placeholder_batch
from qwenvl.train.bad_samples import BadDataError
from tests.conftest import PYTHON, REPO_ROOT, free_port, python_env
from tests.data.bad_catalog import CASES, ISSUE9_CASES, write_issue9_set, write_training_set

FLAGS = [
    "--dataset_use", "bad_mix_images,bad_mix_text",
    "--tune_mm_llm", "True", "--tune_mm_mlp", "True",
    "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
    "--learning_rate", "1e-3", "--weight_decay", "0.0",
    "--max_pixels", "64*28*28", "--min_pixels", "4*28*28", "--model_max_length", "256",
    "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "7",
    "--attn_implementation", "sdpa", "--use_cpu", "True",
]


@pytest.fixture(scope="module")
def training_set(tmp_path_factory) -> dict[str, dict]:
    return write_training_set(tmp_path_factory.mktemp("bad_mix"))


@pytest.fixture
def registered(training_set):
    for name, spec in training_set.items():
        registry.data_dict[name] = {"annotation_path": spec["annotation_path"], "data_path": spec["data_path"]}
    yield training_set
    for name in training_set:
        registry.data_dict.pop(name, None)


def expected_problems(training_set: dict) -> dict[tuple[str, int], tuple[str, str]]:
    """(dataset, index) -> (kind, message), written out by hand."""
    images, text = training_set["bad_mix_images"], training_set["bad_mix_text"]
    folder = images["data_path"]
    return {
        ("bad_mix_images", 7): ("missing_media",
                                f"{images['annotation_path']}:7: image 0: image file not found: {folder}/nope.jpg"),
        ("bad_mix_images", 13): ("bad_image", f"{images['annotation_path']}:13: image 0: cannot decode "
                                              f"{folder}/garbage.jpg: not an image format PIL can identify"),
        ("bad_mix_text", 4): ("bad_json", f"{text['annotation_path']}:4: line 5: invalid JSON line: "
                                          "Expecting value (column 20)"),
    }


# ------------------------------------------------------------------ 2 processes
@pytest.mark.slow
def test_two_process_run_trains_on_exactly_the_good_samples(training_set, registered, tiny_model_dir, tmp_path):
    registry_json = tmp_path / "registry.json"
    registry_json.write_text(json.dumps({name: {"annotation_path": spec["annotation_path"],
                                                "data_path": spec["data_path"]}
                                         for name, spec in training_set.items()}))
    seen_dir, output = tmp_path / "seen", tmp_path / "run"
    seen_dir.mkdir()
    command = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(REPO_ROOT / "tests" / "train" / "bad_data_worker.py"), str(registry_json), str(tiny_model_dir),
               str(seen_dir), "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(output),
               "--num_train_epochs", "2", "--dataloader_num_workers", "1", "--bad_sample_threshold", "0.15",
               "--ddp_backend", "gloo", *FLAGS]
    result = subprocess.run(command, cwd=REPO_ROOT, env=python_env(), capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    expected = expected_problems(training_set)

    # 1) what reached the model: every good sample once per epoch, never a bad one, never a substitute
    batches = [json.loads(line) for path in seen_dir.glob("*.jsonl") for line in path.read_text().splitlines()]
    assert {b["rank"] for b in batches} == {0, 1}
    answers = Counter(int(m.group(1)) for b in batches for a in b["answers"]
                      if (m := re.fullmatch(r"Sample (\d+): a green square\.<\|im_end\|>\n", a)))
    good = sorted(k for spec in training_set.values() for k in spec["good"].values())
    assert answers == {k: 2 for k in good}
    assert sum(len(b["answers"]) for b in batches if not b["placeholder"]) == 2 * len(good)
    # batch size 1: each bad sample makes a whole micro-batch bad, once per epoch
    placeholders = [b for b in batches if b["placeholder"]]
    assert Counter(m for b in placeholders for m in b["bad"]) == {message: 2 for _, message in expected.values()}
    assert all(b["answers"] == [""] for b in placeholders)

    # 2) reported: the file and the per-dataset totals on rank 0 after each epoch
    entries = [json.loads(line) for line in (output / "bad_samples.jsonl").read_text().splitlines()]
    assert {(e["dataset"], e["index"]): (e["kind"], e["message"]) for e in entries} == expected
    assert all(e["split"] == "train" and e["epoch"] == 1 for e in entries)
    for kind, message in expected.values():  # logged once for the whole run, by rank 0
        assert log.count(f"skipped bad sample ({kind}): {message}\n") == 1, message
    for epoch in (1, 2):
        block = (f"after epoch {epoch}: bad samples: 3 of 30 training samples skipped (10.00%)\n"
                 "  bad_mix_images: 2 of 20 (bad_image 1, missing_media 1)\n"
                 "  bad_mix_text: 1 of 10 (bad_json 1)\n")
        assert log.count(block) == 1, log[-5000:]

    # 3) training went on normally: 30 steps, every logged loss finite (placeholder steps are exactly 0)
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 30 and all(math.isfinite(loss) for loss in losses)

    # 4) tools/check_image.py with the same flags reports exactly the samples the run skipped
    from tools.check_image import main

    assert main(["bad_mix_images", "bad_mix_text", "--model_name_or_path", str(tiny_model_dir),
                 "--model_max_length", "256", "--max_pixels", "64*28*28", "--min_pixels", "4*28*28",
                 "--output_dir", str(tmp_path / "check"), "--no_progress"]) == 1
    found = [p for name in ("mix_images", "mix_text")
             for p in json.loads((tmp_path / "check" / f"{name}_problems.json").read_text())]
    assert {(p["dataset"], p["index"]): (p["kind"], p["message"]) for p in found} == expected


@pytest.mark.slow
def test_two_process_threshold_stops_every_rank_at_the_same_step(training_set, tiny_model_dir, tmp_path):
    """Every rank holds the same merged list, so all stop together: a failed run, not a hang."""
    registry_json = tmp_path / "registry.json"
    registry_json.write_text(json.dumps({name: {"annotation_path": spec["annotation_path"],
                                                "data_path": spec["data_path"]}
                                         for name, spec in training_set.items()}))
    (tmp_path / "seen").mkdir()
    command = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(REPO_ROOT / "tests" / "train" / "bad_data_worker.py"), str(registry_json), str(tiny_model_dir),
               str(tmp_path / "seen"), "--model_name_or_path", str(tiny_model_dir), "--output_dir",
               str(tmp_path / "run"), "--num_train_epochs", "1", "--dataloader_num_workers", "1",
               "--bad_sample_threshold", "0.05", "--ddp_backend", "gloo", *FLAGS]
    result = subprocess.run(command, cwd=REPO_ROOT, env=python_env(), capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    for rank in (0, 1):
        assert (f"[rank{rank}]: qwenvl.train.bad_samples.BadDataError: 2 of 30 training samples are bad (6.67%), "
                "more than --bad_sample_threshold 0.05") in log, log[-5000:]
    assert len((tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()) == 2


# ------------------------------------------------------------------ in process
def run_in_process(tiny_model_dir: Path, output: Path, *extra: str) -> None:
    from qwenvl.train.train_qwen import train

    train(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(output), "--max_steps", "30",
           "--dataloader_num_workers", "0", *FLAGS, *extra])


def test_threshold_stops_with_the_list(registered, tiny_model_dir, tmp_path):
    """3 of 30 bad with --bad_sample_threshold 0.05: the run stops as soon as a 2nd one is seen (2/30 > 5 %)."""
    expected = expected_problems(registered)
    with pytest.raises(BadDataError) as info:
        run_in_process(tiny_model_dir, tmp_path / "run", "--bad_sample_threshold", "0.05")
    message = str(info.value)
    entries = [json.loads(line) for line in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert len(entries) == 2
    listed = "\n".join(f"  [{e['kind']}] {e['message']}" for e in entries)
    assert message == (
        "2 of 30 training samples are bad (6.67%), more than --bad_sample_threshold 0.05; fix or drop them "
        "(tools/check_image.py lists them all), or raise the threshold. All of them are in "
        f"{tmp_path / 'run' / 'bad_samples.jsonl'}:\n{listed}")
    for entry in entries:
        assert expected[(entry["dataset"], entry["index"])] == (entry["kind"], entry["message"])


def test_error_policy_stops_at_the_first_bad_sample(registered, tiny_model_dir, tmp_path):
    expected = expected_problems(registered)
    text_path = registered["bad_mix_text"]["annotation_path"]
    # a JSONL line that does not parse stops the run before training starts
    with pytest.raises(ValueError, match=re.escape(f"{text_path}:5: invalid JSON line: Expecting value (column 20)")):
        run_in_process(tiny_model_dir, tmp_path / "a", "--bad_sample_policy", "error")
    # a bad image stops it at the first batch that holds one
    registry.data_dict["bad_mix_text"] = {"annotation_path": str(REPO_ROOT / "demo" / "text_only.jsonl"),
                                          "data_path": ""}
    with pytest.raises(BadSampleError) as info:
        run_in_process(tiny_model_dir, tmp_path / "b", "--bad_sample_policy", "error")
    assert (info.value.kind, str(info.value)) in {v for (name, _), v in expected.items() if name == "bad_mix_images"}


@pytest.mark.parametrize("flattened", [False, True], ids=["padded", "flattened"])
def test_all_bad_micro_batch_has_zero_loss_and_gradients(tiny_model_dir, flattened, tmp_path):
    """The placeholder of an all-bad micro-batch: loss exactly 0 (not NaN) and zero gradients, through the Trainer."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from qwenvl.train.argument import TrainingArguments
    from qwenvl.train.trainer import QwenVLTrainer

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", learning_rate=1e-3)
    trainer = QwenVLTrainer(model=model, args=args, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    batch = placeholder_batch(tokenizer.pad_token_id, flattened)
    assert trainer._get_num_items_in_batch([batch], "cpu") is None  # Qwen-VL does not take loss kwargs
    loss = trainer.training_step(model, dict(batch))
    assert loss.item() == 0.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    # a model that takes the Trainer's label count: a window of placeholders counts 0 labels, divided by 1
    trainer.model_accepts_loss_kwargs = True
    count = trainer._get_num_items_in_batch([batch, batch], "cpu")
    assert int(count) == 1
    assert trainer.training_step(model, dict(batch), num_items_in_batch=count).item() == 0.0


# ------------------------------------------------------------------ issue 9 classes
ISSUE9_FLAGS = ["--dataset_use", "issue9_json,issue9_jsonl", *FLAGS[2:]]


@pytest.fixture(scope="module")
def issue9_set(tmp_path_factory) -> dict[str, dict]:
    return write_issue9_set(tmp_path_factory.mktemp("issue9"))


@pytest.fixture
def issue9_registered(issue9_set):
    for name, spec in issue9_set.items():
        registry.data_dict[name] = {"annotation_path": spec["annotation_path"], "data_path": spec["data_path"]}
    yield issue9_set
    for name in issue9_set:
        registry.data_dict.pop(name, None)


def issue9_expected(issue9_set: dict) -> dict[tuple[str, int], tuple[str, str]]:
    return {(name, index): value for name, spec in issue9_set.items() for index, value in spec["bad"].items()}


def test_issue9_classes_are_skipped_counted_and_reported(issue9_registered, tiny_model_dir, tmp_path, capfd):
    """One run over one sample of each issue-9 class (8 of 18 bad): it finishes, every bad sample is listed."""
    from qwenvl.train.train_qwen import train

    output = tmp_path / "run"
    train(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(output), "--num_train_epochs", "1",
           "--dataloader_num_workers", "0", "--bad_sample_threshold", "1", *ISSUE9_FLAGS])
    expected = issue9_expected(issue9_registered)
    entries = [json.loads(line) for line in (output / "bad_samples.jsonl").read_text().splitlines()]
    assert {(e["dataset"], e["index"]): (e["kind"], e["message"]) for e in entries} == expected
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 18  # batch 1: every sample a step, the bad ones as zero-loss placeholders
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 18 and all(math.isfinite(loss) for loss in losses)
    logged = capfd.readouterr().err
    for kind, message in expected.values():
        assert logged.count(f"skipped bad sample ({kind}): {message}\n") == 1, message


@pytest.mark.parametrize("case_name", ISSUE9_CASES)
def test_issue9_error_policy_names_file_index_and_cause(case_name, issue9_registered, tiny_model_dir, tmp_path):
    """``--bad_sample_policy error``: the run stops at the bad sample with its file, index and real cause."""
    from qwenvl.train.train_qwen import train

    wanted = message_of(issue9_registered, case_name)
    (name, index), (kind, message) = next((key, value) for key, value in issue9_expected(issue9_registered).items()
                                          if value[1] == wanted)
    spec = issue9_registered[name]
    # a one-sample file holding only this case, so the first step meets it
    records = load_annotations(spec["annotation_path"], bad_lines="keep")
    single = tmp_path / ("single.jsonl" if name == "issue9_jsonl" else "single.json")
    if name == "issue9_jsonl":
        single.write_bytes(Path(spec["annotation_path"]).read_bytes().split(b"\n")[index] + b"\n")
    else:
        single.write_text(json.dumps([records[index]]))
    registry.data_dict["issue9_single"] = {"annotation_path": str(single), "data_path": spec["data_path"]}
    try:
        with pytest.raises(BadSampleError) as info:
            train(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "run"),
                   "--max_steps", "1", "--dataloader_num_workers", "0", "--bad_sample_policy", "error",
                   "--dataset_use", "issue9_single", *FLAGS[2:]])
    finally:
        registry.data_dict.pop("issue9_single", None)
    assert info.value.kind == kind
    assert str(info.value) == message.replace(f"{spec['annotation_path']}:{index}:", f"{single}:0:")


def message_of(issue9_set: dict, case_name: str) -> str:
    """The expected message of catalog case ``case_name`` in the issue-9 set."""
    case = next(c for c in CASES if c.name == case_name)
    folder = Path(issue9_set["issue9_json"]["data_path"])
    return next(m for spec in issue9_set.values() for _, m in spec["bad"].values()
                if m.endswith(": " + case.reason.format(D=folder)))


@pytest.mark.parametrize("dataset_use", ["issue9_json,issue9_json", "issue9_json%50,issue9_json%50",
                                         "issue9_jsonl,issue9_json%50,issue9_json"])
def test_dataset_named_twice_stops_the_run(dataset_use, issue9_registered, tiny_model_dir, tmp_path):
    from qwenvl.train.train_qwen import train

    first, second = [s for s in dataset_use.split(",") if s.startswith("issue9_json%") or s == "issue9_json"][:2]
    for policy in ("skip", "error"):
        with pytest.raises(ValueError) as info:
            train(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / policy),
                   "--max_steps", "1", "--dataloader_num_workers", "0", "--bad_sample_policy", policy,
                   "--dataset_use", dataset_use, *FLAGS[2:]])
        assert f"dataset 'issue9_json' is named twice in --dataset_use ({first!r} and {second!r}): each of its " \
               "samples would be trained twice; name it once (use issue9_json%N to keep N percent)" in str(info.value)


@pytest.mark.slow
def test_issue9_classes_in_a_two_process_run(issue9_set, tiny_model_dir, tmp_path):
    """2 ranks, 1 epoch over the issue-9 set: no rank dies (the surrogate once killed one), every good sample is
    trained once, every bad one is skipped, listed once and never reaches the model."""
    registry_json = tmp_path / "registry.json"
    registry_json.write_text(json.dumps({name: {"annotation_path": spec["annotation_path"],
                                                "data_path": spec["data_path"]} for name, spec in issue9_set.items()}))
    seen_dir, output = tmp_path / "seen", tmp_path / "run"
    seen_dir.mkdir()
    command = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(REPO_ROOT / "tests" / "train" / "bad_data_worker.py"), str(registry_json), str(tiny_model_dir),
               str(seen_dir), "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(output),
               "--num_train_epochs", "1", "--dataloader_num_workers", "0", "--bad_sample_threshold", "1",
               "--ddp_backend", "gloo", *ISSUE9_FLAGS]
    result = subprocess.run(command, cwd=REPO_ROOT, env=python_env(), capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    batches = [json.loads(line) for path in seen_dir.glob("*.jsonl") for line in path.read_text().splitlines()]
    assert {b["rank"] for b in batches} == {0, 1}
    answers = Counter(int(m.group(1)) for b in batches for a in b["answers"]
                      if (m := re.fullmatch(r"Sample (\d+): a green square\.<\|im_end\|>\n", a)))
    assert answers == {k: 1 for spec in issue9_set.values() for k in spec["good"].values()}
    expected = issue9_expected(issue9_set)
    assert Counter(m for b in batches for m in b["bad"]) == {message: 1 for _, message in expected.values()}
    entries = [json.loads(line) for line in (output / "bad_samples.jsonl").read_text().splitlines()]
    assert {(e["dataset"], e["index"]): (e["kind"], e["message"]) for e in entries} == expected
    for kind, message in expected.values():  # logged once for the whole run, by rank 0
        assert log.count(f"skipped bad sample ({kind}): {message}\n") == 1, message
