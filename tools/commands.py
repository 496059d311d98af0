"""The console commands of an installed checkout (``pip install -e .``; see pyproject.toml).

Each command runs one tool's ``main`` with the command line, as ``python tools/<tool>.py`` does, and
exits 0 when it returns, or with the status it returns when that is a number (``check_image.py``
returns 1 when it found bad samples). ``pack_data.py``, ``infer.py`` and ``merge_lora.py`` return
their results for callers in Python; a console script would print such a value and exit 1, hence
these wrappers. A tool is imported only when its command runs, so one command does not pay for the
imports of the others.
"""

from __future__ import annotations

import importlib


def _run(module: str) -> int:
    """Run ``module.main()`` on ``sys.argv[1:]``.

    Args:
        module: the tool's module, e.g. ``"tools.pack_data"``.

    Returns:
        The exit status: ``main``'s when it is an int, else 0.
    """
    result = importlib.import_module(module).main()
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def pack() -> int:
    """``qwenvl-pack``: tools/pack_data.py."""
    return _run("tools.pack_data")


def check() -> int:
    """``qwenvl-check``: tools/check_image.py."""
    return _run("tools.check_image")


def infer() -> int:
    """``qwenvl-infer``: tools/infer.py."""
    return _run("tools.infer")


def merge() -> int:
    """``qwenvl-merge``: tools/merge_lora.py."""
    return _run("tools.merge_lora")


def preview() -> int:
    """``qwenvl-preview``: tools/preview.py."""
    return _run("tools.preview")


def plot_loss() -> int:
    """``qwenvl-plot-loss``: tools/plot_loss.py."""
    return _run("tools.plot_loss")
