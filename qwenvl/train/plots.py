"""Loss plots: ``output_dir/loss.png`` (train loss, eval loss, learning rate over steps).

The picture is drawn from the Trainer's log history (``state.log_history``, the
list that ``trainer_state.json`` keeps), so a resumed run plots its whole
history and ``tools/plot_loss.py OUTPUT_DIR`` draws the same picture after the
fact. ``LossPlotCallback`` redraws it on rank 0 at every save and at the end of
training; a plot that cannot be drawn is a warning, never a failed run.

Drawn with matplotlib's object API and its Agg canvas (no pyplot, no display,
no global state).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

try:  # a declared dependency; an environment without it loses the picture, never the run
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError:  # pragma: no cover - exercised only in environments without matplotlib
    FigureCanvasAgg = Figure = None

logger = logging.getLogger(__name__)

PLOT_FILE = "loss.png"
TRAINER_STATE = "trainer_state.json"
# (width, height) in inches at DPI: the PNG is 1000 x 700 pixels
FIGURE_SIZE = (10.0, 7.0)
DPI = 100
TRAIN_COLOR = "#1f77b4"  # blue
EVAL_COLOR = "#d62728"  # red
LR_COLOR = "#2ca02c"  # green


@dataclass
class LossCurves:
    """The points of the three curves, each a list of ``(step, value)`` in log order.

    Attributes:
        train: ``loss`` of the periodic training logs (not the run's closing ``train_loss`` average).
        eval: ``eval_loss`` of the evaluations.
        learning_rate: ``learning_rate`` of the periodic training logs.
    """

    train: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float]] = field(default_factory=list)
    learning_rate: list[tuple[int, float]] = field(default_factory=list)


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (a NaN/inf loss would wreck the scale)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def loss_curves(log_history: list[dict[str, Any]]) -> LossCurves:
    """Split a Trainer log history into the train-loss, eval-loss and learning-rate curves.

    Entries without a ``step`` and values that are not finite numbers are left out.

    Args:
        log_history: ``trainer.state.log_history`` (or the ``log_history`` of ``trainer_state.json``).

    Returns:
        The three curves.

    Example:
        >>> loss_curves([{"loss": 2.0, "learning_rate": 1e-3, "step": 5}, {"eval_loss": 1.5, "step": 5},
        ...              {"train_loss": 1.9, "step": 5}])
        LossCurves(train=[(5, 2.0)], eval=[(5, 1.5)], learning_rate=[(5, 0.001)])
    """
    curves = LossCurves()
    for entry in log_history:
        step = entry.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        for key, points in (("loss", curves.train), ("eval_loss", curves.eval),
                            ("learning_rate", curves.learning_rate)):
            value = _finite(entry.get(key))
            if value is not None:
                points.append((step, value))
    return curves


def plot_log_history(log_history: list[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path | None:
    """Draw ``log_history`` as a PNG: losses on top (train, eval), learning rate below, both over steps.

    The file is written next to ``path`` first and renamed over it, so a reader never sees half a PNG.

    Args:
        log_history: the Trainer's log history.
        path: the PNG to write.
        title: the figure's title (e.g. the output folder).

    Returns:
        ``path``, or None when the history holds no loss yet (nothing is written).

    Raises:
        ImportError: matplotlib is not installed.
        OSError: the file cannot be written.
    """
    if Figure is None:
        raise ImportError("drawing loss.png needs matplotlib: pip install 'matplotlib>=3.11,<3.12'")
    curves = loss_curves(log_history)
    if not curves.train and not curves.eval:
        return None
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    FigureCanvasAgg(figure)
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for points, color, label, marker in ((curves.train, TRAIN_COLOR, "train loss", None),
                                         (curves.eval, EVAL_COLOR, "eval loss", "o")):
        if points:
            steps, values = zip(*points)
            # a single point draws no line: mark it
            loss_axes.plot(steps, values, color=color, label=label, linewidth=1.5,
                           marker=marker or ("o" if len(points) == 1 else None), markersize=4)
    loss_axes.set_ylabel("loss")
    loss_axes.grid(True, alpha=0.3)
    # above the axes, so the legend never covers the curves
    loss_axes.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False)
    if curves.learning_rate:
        steps, values = zip(*curves.learning_rate)
        lr_axes.plot(steps, values, color=LR_COLOR, linewidth=1.5,
                     marker="o" if len(steps) == 1 else None, markersize=4)
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(True, alpha=0.3)
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, format="png")
    os.replace(partial, path)
    return path


def find_trainer_state(folder: str | os.PathLike) -> Path:
    """The ``trainer_state.json`` to plot for ``folder``: the folder's own, else its newest checkpoint's.

    ``folder`` may also be a checkpoint folder or the JSON file itself.

    Args:
        folder: an ``--output_dir``, a ``checkpoint-N`` folder or a ``trainer_state.json``.

    Returns:
        The path of the file.

    Raises:
        FileNotFoundError: neither the folder nor any ``checkpoint-N`` in it has a ``trainer_state.json``.
    """
    folder = Path(folder)
    if folder.is_file():
        return folder
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected an --output_dir or a checkpoint-N folder)")
    own = folder / TRAINER_STATE
    if own.is_file():
        return own
    newest = get_last_checkpoint(str(folder))
    if newest is not None and (Path(newest) / TRAINER_STATE).is_file():
        return Path(newest) / TRAINER_STATE
    raise FileNotFoundError(f"{folder}: no {TRAINER_STATE} in the folder nor in a checkpoint-N folder in it "
                            "(is it an --output_dir with at least one save?)")


def read_log_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``log_history`` list of a ``trainer_state.json``.

    Args:
        path: the JSON file.

    Returns:
        Its ``log_history``.

    Raises:
        ValueError: the file is not JSON, or has no ``log_history`` list (the message names the file).
    """
    try:
        state = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable trainer_state.json ({exc})") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ValueError(f"{path}: expected a JSON object with a 'log_history' list, found "
                         f"{type(history if isinstance(state, dict) else state).__name__}")
    return history


class LossPlotCallback(TrainerCallback):
    """Redraw ``output_dir/loss.png`` on rank 0 at every save and at the end of training.

    Add it with ``trainer.add_callback(LossPlotCallback())``. A failure to draw is logged as a warning.
    """

    def _draw(self, args: Any, state: Any) -> None:
        if not state.is_world_process_zero:
            return
        try:
            plot_log_history(state.log_history, Path(args.output_dir) / PLOT_FILE, title=str(args.output_dir))
        except Exception as exc:  # noqa: BLE001 - a picture must never stop (or lose) a training run
            logger.warning("%s not written: %s: %s", Path(args.output_dir) / PLOT_FILE, type(exc).__name__, exc)

    def on_save(self, args, state, control, **kwargs):
        self._draw(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._draw(args, state)
