"""qwenvl/train/tracking.py: ``--report_to wandb`` runs (offline) carry the parameter and dataset summaries."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import transformers

from qwenvl.data import data_dict
from qwenvl.data.data_qwen import load_annotations
from qwenvl.train.train_qwen import train
from qwenvl.train.tracking import parameter_summary

_BLOCK = 32768  # wandb's run file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) records


def wandb_records(path: Path) -> list:
    """Protobuf records of an offline ``run-*.wandb`` file (the SDK no longer ships a Python reader)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    position, chunks, pending = 7, [], b""
    while position + 7 <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < 7:  # block trailer padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:  # full
            chunks.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            chunks.append(pending + chunk)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def key_of(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_parameter_summary_counts_by_module(tiny_model_dir):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for name, param in model.named_parameters():
        param.requires_grad_(".visual.merger." in name)
    merger = sum(p.numel() for p in model.model.visual.merger.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters()) - merger
    total = sum(p.numel() for p in model.parameters())
    assert parameter_summary(model) == {
        "params/total": total, "params/trainable": merger,
        "params/total/llm": total - merger - vision, "params/trainable/llm": 0,
        "params/total/vision_tower": vision, "params/trainable/vision_tower": 0,
        "params/total/projector": merger, "params/trainable/projector": merger,
    }


@pytest.mark.slow
def test_offline_wandb_run_logs_parameter_and_dataset_summaries(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    output = tmp_path / "run"
    train([
        "--model_name_or_path", str(tiny_model_dir), "--dataset_use", "demo_single_image%50,demo_text_only",
        "--eval_dataset_use", "demo_grounding", "--tune_mm_llm", "True", "--tune_mm_mlp", "True",
        "--output_dir", str(output), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--max_pixels", "16*28*28", "--min_pixels", "4*28*28", "--model_max_length", "1024", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "wandb", "--run_name", "tiny", "--attn_implementation", "sdpa",
        "--use_cpu", "True", "--dataloader_num_workers", "0",
    ])
    runs = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    records = wandb_records(runs[0])
    summary = {key_of(item): json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for item in r.summary.update}
    config = {key_of(item): json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}

    base = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    merger = sum(p.numel() for p in base.model.visual.merger.parameters())
    vision = sum(p.numel() for p in base.model.visual.parameters()) - merger
    llm = sum(p.numel() for p in base.parameters()) - merger - vision
    text_only = len(load_annotations(data_dict["demo_text_only"]["annotation_path"]))
    single = len(load_annotations(data_dict["demo_single_image"]["annotation_path"]))
    grounding = len(load_annotations(data_dict["demo_grounding"]["annotation_path"]))
    expected = {
        "params/trainable": llm + merger, "params/trainable/llm": llm, "params/trainable/projector": merger,
        "params/trainable/vision_tower": 0, "params/total/vision_tower": vision,
        "data/train_samples": single // 2 + text_only, "data/train/demo_single_image": single // 2,
        "data/train/demo_text_only": text_only, "data/eval_samples": grounding, "data/eval/demo_grounding": grounding,
    }
    for key, value in expected.items():
        assert summary.get(key) == value, key
        assert config.get(key) == value, key
    assert "projector (merger): trainable" in config["trainable_report"]
    history = {key_of(item) for r in records if r.WhichOneof("record_type") == "history" for item in r.history.item}
    assert "train/loss" in history  # the Trainer's own logging still goes through
