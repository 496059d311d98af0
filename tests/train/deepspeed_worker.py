"""torchrun worker for test_deepspeed.py: one ``train()`` per DeepSpeed config, all in one launch.

Starting torchrun, torch, transformers and DeepSpeed costs far more than three
tiny runs, so the runs share the processes (and the process group).

Usage:
    torchrun --nproc_per_node 2 tests/train/deepspeed_worker.py OUTPUT_ROOT NAME=CONFIG [NAME=CONFIG ...] -- TRAIN_FLAGS
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qwenvl.train.train_qwen import close_distributed, train  # noqa: E402


def main(argv: list[str]) -> None:
    split = argv.index("--")
    output_root, runs, flags = Path(argv[0]), argv[1:split], argv[split + 1:]
    for run in runs:
        name, config = run.split("=", 1)
        train(flags + ["--deepspeed", config, "--output_dir", str(output_root / name)])


if __name__ == "__main__":
    main(sys.argv[1:])
    close_distributed()
