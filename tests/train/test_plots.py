"""qwenvl/train/plots.py and tools/plot_loss.py: loss.png from the Trainer's log history."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

from qwenvl.train.plots import (
    DPI, EVAL_COLOR, FIGURE_SIZE, LR_COLOR, TRAIN_COLOR, LossCurves, LossPlotCallback, loss_curves, plot_log_history,
)
from tools.plot_loss import main as plot_loss_main


def history(train: list[float], eval_: dict[int, float] | None = None, every: int = 5) -> list[dict]:
    """A log history as the Trainer writes it: train logs every ``every`` steps (linear LR decay to 0), evals at the
    given steps, and the closing summary."""
    total = every * len(train)
    entries: list[dict] = []
    for index, loss in enumerate(train):
        step = every * (index + 1)
        entries.append({"loss": loss, "grad_norm": 1.0, "learning_rate": 1e-4 * (1 - step / total),
                        "epoch": step / total, "step": step})
        if eval_ and step in eval_:
            entries.append({"eval_loss": eval_[step], "eval_runtime": 0.5, "epoch": step / total, "step": step})
    entries.append({"train_runtime": 9.0, "train_loss": sum(train) / len(train), "epoch": 1.0, "step": total})
    return entries


def color_mask(png: Path, color: str) -> np.ndarray:
    """(height, width) bool: the pixels drawn in ``color`` (line centres are the exact colour)."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    target = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
    return np.abs(rgb - target).max(axis=-1) <= 8


def left_and_right_rows(mask: np.ndarray) -> tuple[float, float]:
    """Median pixel row of the curve in its leftmost and rightmost quarter of columns (row 0 is the top).

    The median over columns ignores the short legend sample drawn in the same colour."""
    columns = np.flatnonzero(mask.any(axis=0))
    rows = np.array([np.flatnonzero(mask[:, c]).mean() for c in columns])
    quarter = max(1, len(columns) // 4)
    return float(np.median(rows[:quarter])), float(np.median(rows[-quarter:]))


def test_loss_curves_keep_train_eval_and_lr_points():
    entries = history([3.0, float("nan"), 2.0], eval_={10: 2.5}) + [{"loss": 9.0}, {"loss": True, "step": 99}]
    assert loss_curves(entries) == LossCurves(
        train=[(5, 3.0), (15, 2.0)],  # NaN dropped; no step / a bool loss: not a point; train_loss summary not one
        eval=[(10, 2.5)],
        learning_rate=[(5, 1e-4 * (1 - 5 / 15)), (10, 1e-4 * (1 - 10 / 15)), (15, 0.0)])


def test_plot_draws_train_down_eval_up_and_lr_down(tmp_path):
    train = [3.0 * math.exp(-0.1 * i) + 0.2 for i in range(40)]  # falling
    eval_ = {50: 1.0, 100: 1.5, 150: 2.0, 200: 2.5}  # rising (overfitting)
    png = plot_log_history(history(train, eval_), tmp_path / "loss.png", title="run")
    assert png == tmp_path / "loss.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (int(FIGURE_SIZE[0] * DPI), int(FIGURE_SIZE[1] * DPI))
    train_mask, eval_mask, lr_mask = (color_mask(png, c) for c in (TRAIN_COLOR, EVAL_COLOR, LR_COLOR))
    assert train_mask.sum() > 500 and eval_mask.sum() > 100 and lr_mask.sum() > 500
    left, right = left_and_right_rows(train_mask)
    assert left < right - 100, (left, right)  # falls across the loss panel
    left, right = left_and_right_rows(eval_mask)
    assert left > right + 50, (left, right)  # rises
    left, right = left_and_right_rows(lr_mask)
    assert left < right - 50, (left, right)
    height = train_mask.shape[0]
    assert np.flatnonzero(lr_mask.any(axis=1)).min() > height * 0.55  # LR in the lower panel
    assert np.flatnonzero(train_mask.any(axis=1)).max() < height * 0.65  # losses in the upper one


def test_plot_of_a_rising_train_loss_without_eval(tmp_path):
    png = plot_log_history(history([0.5 + 0.05 * i for i in range(30)]), tmp_path / "loss.png")
    assert color_mask(png, EVAL_COLOR).sum() == 0  # no eval entries: no eval curve, no legend entry
    left, right = left_and_right_rows(color_mask(png, TRAIN_COLOR))
    assert left > right + 100, (left, right)


def test_nothing_drawn_before_the_first_loss(tmp_path):
    assert plot_log_history([{"train_runtime": 1.0, "step": 0}], tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


class TinyRegression(nn.Module):
    """A model the real Trainer can train: returns its loss like an HF model."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x, y):
        return {"loss": nn.functional.mse_loss(self.linear(x).squeeze(-1), y)}


class PlotSeenAtSave(TrainerCallback):
    """Registered after LossPlotCallback: at each save, the steps the loss.png on disk already shows."""

    def __init__(self):
        self.seen: list[tuple[int, float]] = []

    def on_save(self, args, state, control, **kwargs):
        png = Path(args.output_dir) / "loss.png"
        self.seen.append((state.global_step, png.stat().st_mtime_ns if png.is_file() else -1))


def test_callback_redraws_at_each_save_and_at_the_end(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=generator)
    rows = [{"x": x[i], "y": x[i].sum()} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=6, save_steps=3,
                             logging_steps=1, per_device_train_batch_size=4, learning_rate=0.05, save_strategy="steps",
                             disable_tqdm=True)
    probe = PlotSeenAtSave()
    trainer = Trainer(model=TinyRegression(), args=args, train_dataset=rows, callbacks=[LossPlotCallback(), probe])
    trainer.train()
    assert [step for step, _ in probe.seen] == [3, 6]
    assert all(mtime > 0 for _, mtime in probe.seen)  # drawn before the save's other callbacks ran
    final = tmp_path / "loss.png"
    assert final.stat().st_mtime_ns >= probe.seen[-1][1]
    assert color_mask(final, TRAIN_COLOR).sum() > 100
    assert not list(tmp_path.glob(".loss.png.partial"))


def test_callback_on_other_ranks_and_a_failure_to_draw(tmp_path, caplog):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state = TrainerState(is_world_process_zero=False)
    state.log_history = history([2.0, 1.0])
    LossPlotCallback().on_save(args, state, None)
    assert not (tmp_path / "loss.png").exists()  # rank != 0 draws nothing

    (tmp_path / "loss.png").mkdir()  # the PNG cannot replace a folder: the callback warns, training goes on
    state.is_world_process_zero = True
    with caplog.at_level(logging.WARNING, logger="qwenvl.train.plots"):
        LossPlotCallback().on_train_end(args, state, None)
    assert f"{tmp_path / 'loss.png'} not written: IsADirectoryError" in caplog.text


def write_state(folder: Path, entries: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": entries[-1]["step"], "log_history": entries}))


def test_tool_reads_the_newest_checkpoint_then_the_finished_run(tmp_path, capsys):
    run = tmp_path / "run"
    write_state(run / "checkpoint-2", history([3.0, 2.0]))
    write_state(run / "checkpoint-10", history([3.0, 2.0, 1.5, 1.0]))
    assert plot_loss_main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == (f"{run / 'loss.png'}  (from {run / 'checkpoint-10' / 'trainer_state.json'}"
                                               ": 5 log entries)")
    assert Image.open(run / "loss.png").size == (1000, 700)

    write_state(run, history([3.0, 2.0, 1.5, 1.0, 0.8]))  # trainer.save_state() at the end of training
    assert plot_loss_main([str(run), "--out", str(tmp_path / "other.png")]) == 0
    assert f"from {run / 'trainer_state.json'}: 6 log entries" in capsys.readouterr().out
    assert (tmp_path / "other.png").is_file()


def test_tool_errors_name_the_file(tmp_path, capsys):
    assert plot_loss_main([str(tmp_path / "missing")]) == 2
    assert "missing: no such folder" in capsys.readouterr().err
    assert plot_loss_main([str(tmp_path)]) == 2
    assert f"{tmp_path}: no trainer_state.json in the folder nor in a checkpoint-N folder" in capsys.readouterr().err
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"log_history": [')
    assert plot_loss_main([str(tmp_path)]) == 2
    assert f"{tmp_path / 'checkpoint-4' / 'trainer_state.json'}: not a readable trainer_state.json" in \
        capsys.readouterr().err
    write_state(tmp_path / "checkpoint-4", [{"train_runtime": 1.0, "step": 0}])
    assert plot_loss_main([str(tmp_path)]) == 1
    assert "has no train or eval loss logged yet" in capsys.readouterr().err
