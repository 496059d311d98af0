"""torchrun driver for tests/train/test_vision_sync.py: one SGD step where ranks hold different media.

    torchrun --standalone --nproc_per_node 2 tests/train/vision_sync_driver.py MODEL_DIR OUT_DIR

Runs, all in one launch (starting the processes costs more than the runs):

- ``ddp_find_unused_0`` / ``ddp_find_unused_1``: DDP with ``find_unused_parameters``
  off / on; rank 0 gets a text-only sample, rank 1 an image and a video.
- ``zero3``: DeepSpeed ZeRO-3 (``zero3.json``, every weight partitioned); rank 0
  gets an image only, rank 1 an image and a video, so the ranks differ in how
  many times the model itself calls the vision tower.

Each run trains a fresh copy of the tiny model for one step (SGD, no
clipping, everything trainable, the vision tower included) and rank 0 saves
``OUT_DIR/{run}.pt`` (the parameters after the step) and ``OUT_DIR/{run}.json``
(per rank: the batch keys and how many times the vision tower ran).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from qwenvl.data.data_qwen import DataCollatorForSupervisedDataset, LazySupervisedDataset  # noqa: E402
from qwenvl.data.vision import VisionConfig  # noqa: E402
from qwenvl.train.argument import DataArguments, TrainingArguments  # noqa: E402
from qwenvl.train.trainer import QwenVLTrainer, find_submodule  # noqa: E402

LEARNING_RATE = 0.1
# (dataset, index) per rank, rank 0 first.
TEXT_VS_MEDIA = (("demo_text_only", 0), ("demo_video", 3))
IMAGE_VS_IMAGE_AND_VIDEO = (("demo_single_image", 0), ("demo_video", 3))
RUNS = {  # name: (samples, TrainingArguments overrides)
    "ddp_find_unused_0": (TEXT_VS_MEDIA, {"ddp_find_unused_parameters": False}),
    "ddp_find_unused_1": (TEXT_VS_MEDIA, {"ddp_find_unused_parameters": True}),
    "zero3": (IMAGE_VS_IMAGE_AND_VIDEO, {"deepspeed": str(REPO_ROOT / "zero3.json")}),
}


def global_batch(model_dir: str, samples: tuple = TEXT_VS_MEDIA) -> list[dict]:
    """The samples of the global batch, in rank order."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = DataArguments(max_pixels=16 * 28 * 28, min_pixels=4 * 28 * 28)
    vision = VisionConfig(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    return [LazySupervisedDataset(tokenizer, args, vision, dataset_use=name)[index] for name, index in samples]


class Fixed(Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class RecordingTrainer(QwenVLTrainer):
    """Takes samples in order (rank r gets sample r) and records what each rank saw."""

    seen: list[list[str]]

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(self.train_dataset)

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen.append(sorted(k for k, v in inputs.items() if v is not None))
        return super().compute_loss(model, inputs, *args, **kwargs)


def train_one_step(model_dir: str, out_dir: Path, run: str) -> None:
    samples, overrides = RUNS[run]
    # Arguments before the model: with ZeRO-3 they make from_pretrained partition the weights.
    args = TrainingArguments(
        output_dir=str(out_dir / run), per_device_train_batch_size=1, max_steps=1,
        optim="sgd", learning_rate=LEARNING_RATE, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, use_cpu=True, ddp_backend="gloo", report_to=[], save_strategy="no",
        logging_strategy="no", dataloader_num_workers=0, remove_unused_columns=False, seed=0, disable_tqdm=True,
        **overrides,
    )
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa",
                                                               dtype=torch.float32)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    model.requires_grad_(True)
    vision_calls = []
    find_submodule(model, "visual").register_forward_hook(lambda *_: vision_calls.append(1))
    trainer = RecordingTrainer(model=model, args=args, train_dataset=Fixed(global_batch(model_dir, samples)),
                               data_collator=DataCollatorForSupervisedDataset(pad_token_id=0))
    trainer.seen = []
    trainer.train()
    report = {"rank": int(os.environ["RANK"]), "keys": trainer.seen, "vision_calls": len(vision_calls),
              "partitioned": all(hasattr(p, "ds_id") for p in model.parameters())}
    reports = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(reports, report)
    gather = contextlib.nullcontext()
    if "deepspeed" in overrides:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
    with gather:
        params = {name: p.detach().clone() for name, p in model.named_parameters()}
    if torch.distributed.get_rank() == 0:
        torch.save(params, out_dir / f"{run}.pt")
        (out_dir / f"{run}.json").write_text(json.dumps(reports))
    torch.distributed.barrier()


def main() -> None:
    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    for run in RUNS:
        if run == "zero3":
            if importlib.util.find_spec("deepspeed") is None:
                continue
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's own view of the process group
        train_one_step(model_dir, out_dir, run)


if __name__ == "__main__":
    main()
