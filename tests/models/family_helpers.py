"""What the HF-processor family tests (tests/models/test_*_family.py) share: the chat cases written by hand, the
oracles built from them (the HF processor, answer spans found with ``str.find``, cross-entropy by hand), and the
checks every family runs the same way (the dummy pass, a padded batch, the training runs and their saved folder).

Plain functions: each test file passes its family, its processor, its model and its cases; its pytest fixtures
stay in the file. Nothing here reads the code under test to make an expected value.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import load_file

from qwenvl.data.chat import Problem
from qwenvl.data.data_qwen import LazySupervisedDataset, make_supervised_data_module
from qwenvl.models import PROJECTOR
from qwenvl.train.argument import ConfigError, DataArguments
from qwenvl.train.loss import compute_lm_loss
from qwenvl.train.train_qwen import train
from qwenvl.train.trainer import QwenVLTrainer
from tests.conftest import free_port, python_env

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "demo" / "images"
IGNORE = -100
DEMO_DATA = "demo_single_image,demo_multi_image,demo_text_only"
GROUNDING = "[0.531, 0.250, 0.844, 0.667]"  # the blue square of two_shapes.jpg, relative 0-1

Case = tuple[dict, list[dict], list[str]]  # (record, hand-written HF messages, image files)


def text(value: str) -> dict:
    """One text part of an HF chat message."""
    return {"type": "text", "text": value}


def chat_cases(single: tuple[str, str] = ("red_circle.jpg", "A red circle."),
               multi: tuple[str, str] = ("red_circle.jpg", "blue_square.jpg"),
               box: str = GROUNDING) -> dict[str, Case]:
    """The four cases every family's items are checked on: each record and its HF messages, written by hand.

    Args:
        single: the image of the single-image case and its answer.
        multi: the two images of the multi-image case.
        box: the first answer of the system + multi-turn grounding case, in the family's box format.

    Returns:
        ``{name: (record, messages, image files)}`` for single_image, multi_image, text_only and
        system_multi_turn_grounding, in that order.
    """
    image, answer = single
    return {
        "single_image": (
            {"image": image, "conversations": [
                {"from": "human", "value": "<image>\nWhat shape is this?"}, {"from": "gpt", "value": answer}]},
            [{"role": "user", "content": [{"type": "image"}, text("What shape is this?")]},
             {"role": "assistant", "content": [text(answer)]}],
            [image],
        ),
        "multi_image": (
            {"image": list(multi), "conversations": [
                {"from": "human", "value": "<image>\n<image>\nWhich one is a circle?"},
                {"from": "gpt", "value": "The first."}]},
            [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, text("Which one is a circle?")]},
             {"role": "assistant", "content": [text("The first.")]}],
            list(multi),
        ),
        "text_only": (
            {"conversations": [{"from": "human", "value": "What colour is grass?"},
                               {"from": "gpt", "value": "Green."}]},
            [{"role": "user", "content": [text("What colour is grass?")]},
             {"role": "assistant", "content": [text("Green.")]}],
            [],
        ),
        "system_multi_turn_grounding": (
            {"image": "two_shapes.jpg", "conversations": [
                {"from": "system", "value": "You are a careful assistant."},
                {"from": "human", "value": "<image>\nWhere is the blue square?"},
                {"from": "gpt", "value": box},
                {"from": "human", "value": "And what colour is the other shape?"},
                {"from": "gpt", "value": "Red."}]},
            [{"role": "system", "content": [text("You are a careful assistant.")]},
             {"role": "user", "content": [{"type": "image"}, text("Where is the blue square?")]},
             {"role": "assistant", "content": [text(box)]},
             {"role": "user", "content": [text("And what colour is the other shape?")]},
             {"role": "assistant", "content": [text("Red.")]}],
            ["two_shapes.jpg"],
        ),
    }


def absolute(record: dict) -> dict:
    """A copy of ``record`` whose images are absolute paths: the demo images are not next to the data file."""
    record = json.loads(json.dumps(record))
    if "image" in record:
        images = record["image"] if isinstance(record["image"], list) else [record["image"]]
        record["image"] = [str(IMAGES / name) for name in images]
    return record


def write_records(path: Path, records: Iterable[dict]) -> Path:
    """Write ``records`` (images made absolute) as a JSON data file at ``path``; returns ``path``."""
    path.write_text(json.dumps([absolute(record) for record in records]), encoding="utf-8")
    return path


def weightless_copy(source: Path, folder: Path) -> Path:
    """Every file of checkpoint ``source`` but its weights, copied into ``folder`` (made); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if not path.name.endswith(".safetensors"):
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


def family_dataset(processor, data_file: Path, family, **kwargs) -> LazySupervisedDataset:
    """The training dataset of ``data_file`` for an HF-processor family (``kwargs``: model_max_length, ...)."""
    return LazySupervisedDataset(processor.tokenizer, DataArguments(dataset_use=str(data_file)),
                                 family.vision_defaults.image_config(), family=family, processor=processor, **kwargs)


def video_dataset(processor, family, folder: Path, **kwargs) -> LazySupervisedDataset:
    """A dataset of one video record, ``folder``/video.json, which an image-only family must refuse."""
    path = folder / "video.json"
    path.write_text(json.dumps([{"video": "a.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Nothing."}]}]))
    return family_dataset(processor, path, family, **kwargs)


def images_of(files: Sequence[str]) -> list[Image.Image]:
    return [Image.open(IMAGES / f).convert("RGB") for f in files]


def oracle(processor, case: Case, nested: bool = False):
    """The rendered text of a case's messages and the HF processor's encoding of it with the case's images.

    Args:
        nested: the processor takes one list of images per sample (OneVision).

    Returns:
        ``(text, encoding)``.
    """
    _, messages, files = case
    images = images_of(files)
    rendered = processor.apply_chat_template(messages)
    return rendered, processor(text=rendered, images=([images] if nested else images) if files else None,
                               return_tensors="pt")


def answer_spans(rendered: str, messages: list[dict], close: str) -> list[tuple[int, int]]:
    """The character spans of each assistant answer + ``close`` in ``rendered``, found in order with ``str.find``."""
    spans, cursor = [], 0
    for message in messages:
        if message["role"] == "assistant":
            answer = message["content"][0]["text"] + close
            start = rendered.index(answer, cursor)
            spans.append((start, start + len(answer)))
            cursor = start + len(answer)
    return spans


def touches(spans: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether the character range [start, end) overlaps one of ``spans``."""
    return any(end > s and start < e for s, e in spans)


def assert_learned_text(tokenizer, labels: torch.Tensor, messages: list[dict], close: str, lead: str = "") -> None:
    """The learned labels decode to exactly the answers, each as ``lead + answer + close``."""
    answers = [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]
    assert tokenizer.decode(labels[labels != IGNORE]) == "".join(f"{lead}{a}{close}" for a in answers)


def image_runs(input_ids: torch.Tensor, image_id: int) -> list[int]:
    """Lengths of the runs of ``image_id`` in ``input_ids``."""
    runs, length = [], 0
    for token in [*input_ids.tolist(), None]:
        if token == image_id:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def without_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def cross_entropy_by_hand(model, batch: dict) -> torch.Tensor:
    """The mean next-token cross-entropy of the model's full logits over the batch's labels (-100 ignored)."""
    with torch.no_grad():
        logits = model(**without_labels(batch)).logits
    labels = batch["labels"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)


def assert_loss_is_cross_entropy(model, batch: dict) -> torch.Tensor:
    """The model's loss and the chunked hidden-state loss both equal cross-entropy by hand; returns the latter."""
    with torch.no_grad():
        loss = model(**batch).loss
        chunked, _ = compute_lm_loss(model, batch, impl="chunked", chunk_size=7)
    by_hand = cross_entropy_by_hand(model, batch)
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked, by_hand, rtol=1e-5, atol=1e-6)
    return by_hand


def assert_padded_rows_are_each_sample_alone(model, items: list[dict], collate: Callable) -> None:
    """In a padded batch (some row is padded), each row's logits are its sample's logits alone."""
    batch = collate(items)
    assert (batch["attention_mask"] == 0).any()  # some row is padded
    with torch.no_grad():
        logits = model(**without_labels(batch)).logits
        for row, item in enumerate(items):
            own = model(**without_labels(collate([item]))).logits[0]
            torch.testing.assert_close(logits[row, :len(item["input_ids"])], own, rtol=1e-4, atol=1e-4)


def assert_an_all_bad_batch_has_a_zero_loss(model, collate: Callable) -> None:
    batch = collate([Problem("d", "d.json", 0, "missing_media", "x")])
    batch.pop("bad_samples")
    with torch.no_grad():
        assert float(model(**batch).loss) == 0.0


def assert_data_module_refuses_flattening(processor, family, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_supervised_data_module(processor.tokenizer, DataArguments(dataset_use="demo_text_only", data_flatten=True),
                                    family.vision_defaults.image_config(), family=family, processor=processor)


def assert_training_is_refused(folder: Path, out: Path, extra: Sequence[str], message: str) -> None:
    """train() on ``folder`` (a weightless copy: nothing can load) with ``extra`` flags raises a ConfigError
    matching ``message`` at start-up."""
    with pytest.raises(ConfigError, match=message):
        train(["--model_name_or_path", str(folder), "--dataset_use", "demo_text_only", "--output_dir", str(out),
               "--use_cpu", "True", "--report_to", "none", "--max_steps", "1", "--tune_mm_llm", "True", *extra])


def projector_only_trainer(model, family, output_dir: Path) -> tuple[QwenVLTrainer, dict[str, torch.nn.Parameter]]:
    """The model with all but its projector frozen (LLM and tower frozen), in a one-process trainer.

    Returns:
        ``(trainer, {name: parameter})`` of the trainable (projector) parameters.
    """
    for name, param in model.named_parameters():
        param.requires_grad_(family.classify_parameter(name) == PROJECTOR)
    trainer = QwenVLTrainer(model=model, args=transformers.TrainingArguments(
        output_dir=str(output_dir), use_cpu=True, report_to=[], save_strategy="no"))
    return trainer, {n: p for n, p in model.named_parameters() if p.requires_grad}


def assert_dummy_pass(model, family, output_dir: Path, tower: torch.nn.Module,
                      batches: list[tuple[dict, list[int]]], seen: Callable = lambda args: 1) -> dict:
    """One process, LLM frozen: a text-only batch (the first of ``batches``) runs the tower and projector as a rank
    of a larger run would, with a zero projector gradient and the loss the model gives alone; an image batch runs
    the tower once for its own images.

    Args:
        tower: the module whose calls are recorded, each as ``seen(args)`` (1, or the tiles it gets).
        batches: ``(collated batch, the expected records of the tower's calls)``, the text-only batch first.

    Returns:
        the projector's parameters, ``{name: parameter}``.
    """
    trainer, projector = projector_only_trainer(model, family, output_dir)
    calls: list[int] = []
    handle = tower.register_forward_pre_hook(lambda module, args: calls.append(seen(args)))
    try:
        for index, (batch, expected_calls) in enumerate(batches):
            calls.clear()
            model.zero_grad()
            loss = trainer.compute_loss(model, dict(batch))
            assert calls == expected_calls
            if index == 0:
                loss.backward()
                assert all(p.grad is not None and not p.grad.any() for p in projector.values())
                assert torch.equal(loss, model(**batch).loss)
    finally:
        handle.remove()
    return projector


def sgd_args(model_dir: Path, output_dir: Path, *, max_steps: int, batch_size: int, model_max_length: int = 4096,
             dataset_use: str = DEMO_DATA, extra: Sequence[str] = ()) -> list[str]:
    """train_qwen's arguments for a short fp32 SGD run (LLM and projector trained, constant lr, no save steps)."""
    return ["--model_name_or_path", str(model_dir), "--dataset_use", dataset_use, "--use_cpu", "True",
            "--report_to", "none", "--max_steps", str(max_steps), "--learning_rate", "0.05", "--optim", "sgd",
            "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--weight_decay", "0", "--logging_steps", "1",
            "--save_strategy", "no", "--model_max_length", str(model_max_length), "--tune_mm_llm", "True",
            "--tune_mm_mlp", "True", "--seed", "3", "--dataloader_num_workers", "0", "--output_dir", str(output_dir),
            "--per_device_train_batch_size", str(batch_size), *extra]


def run_training(args: list[str], ranks: int) -> None:
    """Run qwenvl/train/train_qwen.py with ``args`` in one process (``ranks`` 1) or under torchrun, on CPU (gloo).

    Raises:
        AssertionError: the run exits non-zero (its stderr's end in the message).
    """
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                                      "--master_port", str(free_port())]
    result = subprocess.run([sys.executable, *launcher, "qwenvl/train/train_qwen.py", *args], capture_output=True,
                            text=True, timeout=600, cwd=REPO, env=python_env())
    assert result.returncode == 0, f"{ranks} rank(s): {result.stderr[-4000:]}"


def moved_parameters(run: Path, start: Path) -> set[str]:
    """The saved parameters of run folder ``run`` that differ from checkpoint ``start``'s (the same names)."""
    trained, initial = load_file(run / "model.safetensors"), load_file(start / "model.safetensors")
    assert trained.keys() == initial.keys()
    return {name for name in trained if not torch.equal(trained[name], initial[name])}


def assert_logged_steps(run: Path, steps: int) -> None:
    """The run's trainer_state.json has ``steps`` steps, each with a finite logged loss."""
    state = json.loads((run / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == steps and len(losses) == steps and all(np.isfinite(losses))


def assert_generates(model, processor, image: str = "red_circle.jpg", prompt: str = "What is it?",
                     nested: bool = False) -> dict:
    """Greedy generation of 3 tokens after a one-image prompt keeps the prompt; returns the processor's inputs."""
    messages = [{"role": "user", "content": [{"type": "image"}, text(prompt)]}]
    picture = Image.open(IMAGES / image).convert("RGB")
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       images=[[picture]] if nested else [picture], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(generated[0, :inputs["input_ids"].shape[1]], inputs["input_ids"][0])
    return inputs
