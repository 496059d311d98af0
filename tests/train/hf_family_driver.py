"""torchrun driver for tests/train/test_hf_family_training.py: ``train()`` of an HF-processor family checkpoint
(LLaVA & co.) under FSDP, DeepSpeed ZeRO-2 and ZeRO-3, one run after the other in ONE launch.

    torchrun --nproc_per_node 2 tests/train/hf_family_driver.py OUT_DIR RUN=STEPS [RUN=STEPS ...] -- TRAIN_FLAGS

``RUN`` is one of ``VARIANTS``. Starting the processes (torch, transformers, DeepSpeed) costs more than a tiny
run, so the runs share them and the process group. The FSDP run goes first: once a DeepSpeed run has set up
accelerate's process-wide state, a later run of the same process would be wrapped by DeepSpeed again whatever
its arguments (tests/train/rank_sync_driver.py). On CPU accelerate runs ``--fsdp`` as DDP (and says so).

Each run writes ``OUT_DIR/RUN`` (the saved model, ``trainer_state.json``) and rank 0 ``OUT_DIR/RUN.json``: per
rank, how many times the vision tower ran on real pixels and on the dummy black image
(``QwenVLTrainer.compute_loss``: a rank whose micro-batch has no image runs the tower on it, so ZeRO-3's module
trace is the same on every rank). A dummy call is told apart by its input: the processor normalises every real
image (mean subtracted), so only the dummy's pixel values are all zero.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from transformers import MODEL_MAPPING, AutoConfig  # noqa: E402

from qwenvl.train.train_qwen import close_distributed, train  # noqa: E402

VARIANTS = {  # the flags of each run (on top of TRAIN_FLAGS)
    "fsdp": ["--fsdp", "full_shard auto_wrap", "--fsdp_config", str(REPO_ROOT / "scripts" / "fsdp_config.json")],
    "zero2": ["--deepspeed", str(REPO_ROOT / "scripts" / "zero2.json")],
    "zero3": ["--deepspeed", str(REPO_ROOT / "zero3.json")],
}


def tower_class(model_dir: str) -> type:
    """The class of the checkpoint's vision tower (``CLIPVisionModel`` for LLaVA-1.5), from its vision config."""
    return MODEL_MAPPING[type(AutoConfig.from_pretrained(model_dir).vision_config)]


def main(argv: list[str]) -> None:
    split = argv.index("--")
    out_dir, runs, flags = Path(argv[0]), argv[1:split], argv[split + 1:]
    tower = tower_class(flags[flags.index("--model_name_or_path") + 1])
    calls = {"real": 0, "dummy": 0}

    def count(module: torch.nn.Module, args: tuple) -> None:
        # Training calls only: the start-up probe of the unread tower layers (freeze_unread_vision) runs the
        # dummy image once through the model in eval mode, as from_pretrained leaves it.
        if isinstance(module, tower) and module.training and args and isinstance(args[0], torch.Tensor):
            calls["dummy" if not args[0].any() else "real"] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    environment = dict(os.environ)
    for run in sorted(runs, key=lambda run: run.split("=")[0] != "fsdp"):
        name, steps = run.split("=")
        calls.update(real=0, dummy=0)
        train([*flags, *VARIANTS[name], "--max_steps", steps, "--output_dir", str(out_dir / name)])
        # TrainingArguments(fsdp=...) exports ACCELERATE_USE_FSDP / FSDP_*: a later run's from_pretrained would load
        # as under FSDP (weights on rank 0 only).
        os.environ.clear()
        os.environ.update(environment)
        reports: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(reports, dict(calls))
        if torch.distributed.get_rank() == 0:
            (out_dir / f"{name}.json").write_text(json.dumps(reports))
        torch.distributed.barrier()
    handle.remove()


if __name__ == "__main__":
    main(sys.argv[1:])
    close_distributed()
