"""Draw the loss plot of a training run: train loss, eval loss and learning rate over steps.

Reads ``trainer_state.json`` of OUTPUT_DIR (written at the end of training) or,
while a run is still going or was stopped, of its newest ``checkpoint-N``, and
writes ``OUTPUT_DIR/loss.png`` (the same picture training draws at each save).

Usage:
    python tools/plot_loss.py output/demo
    python tools/plot_loss.py output/demo/checkpoint-20 --out /tmp/loss.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python tools/plot_loss.py` from a checkout
    sys.path.insert(0, str(_REPO_ROOT))

from qwenvl.train.plots import PLOT_FILE, find_trainer_state, plot_log_history, read_log_history  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="plot_loss.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", metavar="OUTPUT_DIR",
                        help="a training --output_dir, a checkpoint-N folder in it, or a trainer_state.json")
    parser.add_argument("--out", default=None,
                        help=f"the PNG to write (default: {PLOT_FILE} in OUTPUT_DIR, or beside the JSON file given)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write the plot; print its path.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        0 when written; 1 when the history holds no loss yet; 2 for a missing or unreadable state file.
    """
    args = build_parser().parse_args(argv)
    try:
        state_file = find_trainer_state(args.output_dir)
        history = read_log_history(state_file)
    except (FileNotFoundError, ValueError) as exc:
        print(f"plot_loss.py: error: {exc}", file=sys.stderr)
        return 2
    target = Path(args.out) if args.out else (
        Path(args.output_dir) if Path(args.output_dir).is_dir() else state_file.parent) / PLOT_FILE
    written = plot_log_history(history, target, title=str(args.output_dir))
    if written is None:
        print(f"plot_loss.py: {state_file} has no train or eval loss logged yet: nothing drawn", file=sys.stderr)
        return 1
    print(f"{written}  (from {state_file}: {len(history)} log entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
