"""torchrun driver for tests/train/test_rank_sync.py: 10 optimizer steps per backend x data mix, in ONE launch.

    torchrun --nproc_per_node 2 tests/train/rank_sync_driver.py MODEL_DIR OUT_DIR PACK_FILE RUN [RUN ...]

``RUN`` is ``{backend}:{scenario}``, e.g. ``zero3:packed``: backend one of
``BACKENDS`` (DDP with find_unused_parameters off / on, DeepSpeed ZeRO-2, ZeRO-3,
ZeRO-3 with offload), scenario one of ``SCENARIOS`` or ``nan_guard``. Starting the
processes (torch, transformers, DeepSpeed) costs more than a tiny run, so every
run shares them, one after the other.

Each scenario is a fixed list of 2 x ``STEPS`` micro-batches; at step ``s``
rank 0 trains item ``2s`` and rank 1 item ``2s + 1`` (the Trainer's sequential
sampler, sharded by accelerate). The items are chosen so that the ranks hold
different media at most steps: text vs image, image vs video, an image and a
video vs neither, the all-bad placeholder batch, packed rows of mixed samples.

Each run trains a fresh copy of the tiny model (float32, SGD with the
per-module groups of ``QwenVLTrainer``, constant LR, no clipping; everything but
``embed_tokens`` and ``lm_head`` trains, the vision tower included, at
``VISION_TOWER_LR``) and rank 0 saves ``OUT_DIR/{backend}-{scenario}.pt`` (the
trained parameters after the last step) and ``.json`` (per rank: the length and
token sum of the input_ids of every micro-batch it trained, and how many times
the vision tower ran). The single-process reference lives in the test, built
from the same ``scenario_items`` and ``collator``.

``nan_guard`` trains the text_image items with a ``NonFiniteGuard`` and a
checkpoint every 2 steps; rank 1's loss is made NaN from step ``NAN_STEP``. Both
ranks must raise ``NonFiniteError`` at that step (else one waits for the other
forever); the ``.json`` holds each rank's message and ``global_step``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, SequentialSampler

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import qwenvl.data as registry  # noqa: E402
from qwenvl.data.data_qwen import (  # noqa: E402
    DataCollatorForSupervisedDataset,
    LazySupervisedDataset,
    Problem,
    load_annotations,
)
from qwenvl.data.data_qwen_packed import PackedDataCollatorForSupervisedDataset, PackedSupervisedDataset  # noqa: E402
from qwenvl.data.vision import VisionConfig  # noqa: E402
from qwenvl.train.argument import DataArguments, TrainingArguments  # noqa: E402
from qwenvl.train.distributed import init_deepspeed_distributed  # noqa: E402
from qwenvl.train.guards import NonFiniteError  # noqa: E402
from qwenvl.train.trainer import QwenVLTrainer, find_submodule  # noqa: E402
from qwenvl.train.train_qwen import close_distributed  # noqa: E402

STEPS = 10
LEARNING_RATE = 0.1
VISION_TOWER_LR = 1.0  # its gradients are ~100x smaller than the LLM's: make it move clearly in 10 steps
PIXELS = dict(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28, video_min_frame_pixels=4 * 28 * 28,
              video_max_frame_pixels=8 * 28 * 28, video_max_frames=4)
PACK_NAME = "rank_sync_pack"
BACKENDS = {  # name: TrainingArguments overrides
    "ddp": {"ddp_find_unused_parameters": False},
    "ddp_find_unused": {"ddp_find_unused_parameters": True},
    "ddp_micro_batch": {"ddp_find_unused_parameters": False, "loss_average": "micro_batch"},  # the original's weighting
    "ddp_default": {},  # find_unused_parameters left to QwenVLTrainer (decided False)
    "zero2": {"deepspeed": str(REPO_ROOT / "scripts" / "zero2.json")},
    "zero3": {"deepspeed": str(REPO_ROOT / "zero3.json")},
    "zero3_offload": {"deepspeed": str(REPO_ROOT / "scripts" / "zero3_offload.json")},
}

# Micro-batches in order: rank 0 trains item 2s, rank 1 item 2s + 1 at step s.
# (dataset, index) of a demo sample; None = a bad sample (the collator's all-bad placeholder batch).
T = "demo_text_only"
I = "demo_single_image"
V = "demo_video"  # 0, 1: one video; 2: two videos; 3: an image and a video
M = "demo_multi_image"
TEXT_IMAGE = [
    (T, 0), (I, 0),  (I, 1), (T, 1),  (T, 2), (T, 3),  (I, 2), (I, 3),  (None, 0), (I, 4),
    (I, 5), (T, 4),  (T, 5), (None, 1),  (M, 0), (T, 6),  (T, 7), (I, 6),  (I, 7), (M, 1),
]
IMAGE_VIDEO = [
    (I, 0), (V, 0),  (V, 1), (I, 1),  (V, 3), (I, 2),  (I, 3), (V, 3),  (V, 0), (V, 1),
    (M, 0), (V, 2),  (V, 3), (V, 3),  (I, 4), (V, 1),  (V, 2), (M, 1),  (I, 5), (I, 6),
]
# Groups of the packed file (samples as (dataset, index)), then the groups in training order.
PACK_GROUPS = [
    [(T, 0), (I, 0)],  # 0: text + image
    [(T, 1), (T, 2)],  # 1: text only
    [(V, 0), (T, 3)],  # 2: video + text
    [(I, 1), (V, 1)],  # 3: an image sample and a video sample
    [(V, 3)],          # 4: one sample with an image and a video
    [(T, 4)],          # 5: one text sample
    [(M, 0), (T, 5)],  # 6: two images + text
    [(V, 2), (I, 2)],  # 7: two videos + image
]
PACKED = [0, 1, 2, 3, 4, 5, 1, 6, 7, 5, 3, 4, 5, 2, 6, 0, 1, 7, 4, 4]
SCENARIOS = {"text_image": TEXT_IMAGE, "image_video": IMAGE_VIDEO, "packed": PACKED}
# ``{backend}:nan_guard``: text_image items, rank 1's loss made NaN at step NAN_STEP, a checkpoint every 2 steps.
NAN_STEP = 3


def write_pack_file(path: str | Path) -> Path:
    """Write ``PACK_GROUPS`` as a packed annotation file (a list of groups of samples, as tools/pack_data.py does)."""
    groups = [[load_annotations(registry.data_dict[name]["annotation_path"])[index] for name, index in group]
              for group in PACK_GROUPS]
    Path(path).write_text(json.dumps(groups))
    return Path(path)


def register_pack(pack_file: str | Path) -> None:
    """Register the packed file as ``PACK_NAME`` (media paths are relative to demo/)."""
    registry.data_dict[PACK_NAME] = {"annotation_path": str(pack_file),
                                     "data_path": registry.data_dict[I]["data_path"]}


def scenario_items(model_dir: str, scenario: str, pack_file: str | Path) -> list[Any]:
    """The 2 x STEPS dataset items of a scenario, in training order (``Problem`` for a bad sample)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = DataArguments(**PIXELS)
    vision = VisionConfig(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    if scenario == "packed":
        register_pack(pack_file)
        packed = PackedSupervisedDataset(tokenizer, args, vision, model_max_length=4096, dataset_use=PACK_NAME)
        groups = [packed[g] for g in range(len(packed))]
        return [groups[g] for g in PACKED]
    datasets: dict[str, LazySupervisedDataset] = {}
    items = []
    for name, index in SCENARIOS[scenario]:
        if name is None:
            items.append(Problem("demo_bad", "bad.json", index, "missing_media", "image 0: file not found"))
            continue
        if name not in datasets:
            datasets[name] = LazySupervisedDataset(tokenizer, args, vision, model_max_length=4096, dataset_use=name)
        items.append(datasets[name][index])
    return items


def collator(scenario: str, pad_token_id: int = 0):
    """The collator of a scenario: packed rows flattened (``data_packing``), the rest padded."""
    if scenario == "packed":
        return PackedDataCollatorForSupervisedDataset(pad_token_id)
    return DataCollatorForSupervisedDataset(pad_token_id)


def load_model(model_dir: str) -> torch.nn.Module:
    """The tiny model in float32; everything trains but embed_tokens and lm_head (big, and not what is tested)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa",
                                                               dtype=torch.float32)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    for name, param in model.named_parameters():
        param.requires_grad_(not ("embed_tokens" in name or "lm_head" in name))
    return model


def step_loss(model, batches: list[dict], average: str) -> torch.Tensor:
    """The loss of one global step over the ranks' micro-batches, by hand from the full logits.

    ``token`` (``--loss_average`` default): every learned token of the step weighs the same, the loss of one big
    batch; ``micro_batch`` (the original's): the mean of the micro-batches' own means.
    """
    sums, counts = [], []
    for batch in batches:
        batch = dict(batch)
        labels = batch.pop("labels")
        batch.pop("num_items_in_batch", None)  # the placeholder's own count
        logits = model(**batch).logits.float()
        targets = labels[..., 1:].reshape(-1)
        sums.append(F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), targets, ignore_index=-100,
                                    reduction="sum"))
        counts.append(int(targets.ne(-100).sum()))
    if average == "token":
        return torch.stack(sums).sum() / max(sum(counts), 1)
    return torch.stack([s / max(c, 1) for s, c in zip(sums, counts)]).mean()


def batch_signature(batch: dict) -> list[int]:
    """What identifies a micro-batch: [length, sum of input_ids]."""
    ids = batch["input_ids"]
    return [int(ids.shape[-1]), int(ids.sum())]


class Fixed(Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class RecordingTrainer(QwenVLTrainer):
    """Takes items in order (rank r gets item 2s + r at step s) and records each micro-batch it trains.

    ``inject_nan(rank)`` makes that rank's last hidden states (so its loss) NaN from step ``NAN_STEP`` on (test-only).
    """

    seen: list[list[int]]

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(self.train_dataset)

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen.append(batch_signature(inputs))
        return super().compute_loss(model, inputs, *args, **kwargs)

    def inject_nan(self, rank: int) -> None:
        def poison(module, args, output):
            # The LLM's last hidden states: every loss path (the model's own, the chunked one) reads them.
            if self.args.process_index == rank and self.state.global_step + 1 >= NAN_STEP:
                output.last_hidden_state = output.last_hidden_state * float("nan")
            return output

        find_submodule(self.model, "language_model").register_forward_hook(poison)


def train_run(model_dir: str, out_dir: Path, backend: str, scenario: str, items: list) -> None:
    run = f"{backend}-{scenario}"
    overrides = dict(BACKENDS[backend])
    guard = scenario == "nan_guard"
    if guard:
        overrides |= {"save_strategy": "steps", "save_steps": 2}
    # Arguments before the model: with ZeRO-3 they make from_pretrained partition the weights.
    args = TrainingArguments(
        output_dir=str(out_dir / run), per_device_train_batch_size=1, max_steps=STEPS,
        optim="sgd", learning_rate=LEARNING_RATE, vision_tower_lr=VISION_TOWER_LR, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, use_cpu=True, ddp_backend="gloo", report_to=[], logging_strategy="no",
        dataloader_num_workers=0, remove_unused_columns=False, seed=0, disable_tqdm=True,
        **({"save_strategy": "no"} | overrides),
    )
    init_deepspeed_distributed(args)  # --deepspeed only: deepspeed.comm up before ZeRO-3 builds the model
    model = load_model(model_dir)
    if scenario == "unused_param":  # a trainable weight the forward never uses
        model.unused_head = torch.nn.Linear(4, 4)
    vision_calls: list[int] = []
    hook = find_submodule(model, "visual").register_forward_hook(lambda *_: vision_calls.append(1))
    trainer = RecordingTrainer(model=model, args=args, train_dataset=Fixed(items), data_collator=collator(scenario))
    trainer.seen = []
    report: dict[str, Any] = {}
    if guard:
        trainer.inject_nan(rank=1)
        trainer.add_non_finite_guard()
        try:
            trainer.train()
        except NonFiniteError as error:
            report["error"] = str(error)
        report["global_step"] = trainer.state.global_step
    elif scenario == "unused_param":
        try:
            trainer.train()
        except RuntimeError as error:
            report["error"] = str(error)
        report["find_unused_parameters"] = args.ddp_find_unused_parameters
        report["global_step"] = trainer.state.global_step
    else:
        trainer.train()
    hook.remove()
    report |= {"seen": trainer.seen, "vision_calls": len(vision_calls), "engine": type(trainer.model_wrapped).__name__,
               "partitioned": all(hasattr(p, "ds_id") for p in model.parameters())}
    reports: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(reports, report)
    gather = contextlib.nullcontext()
    if "deepspeed" in overrides and report["partitioned"]:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
    with gather:
        params = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    if torch.distributed.get_rank() == 0:
        if not guard and scenario != "unused_param":
            torch.save(params, out_dir / f"{run}.pt")
        (out_dir / f"{run}.json").write_text(json.dumps(reports))
    torch.distributed.barrier()
    del trainer, model, args
    gc.collect()


def main(argv: list[str]) -> None:
    model_dir, out_dir, pack_file, runs = argv[0], Path(argv[1]), argv[2], argv[3:]
    torch.set_num_threads(1)
    items: dict[str, list] = {}
    # DDP runs first: once a DeepSpeed run has set up accelerate's process-wide state, a later run of the same
    # process would be wrapped by DeepSpeed again whatever its arguments (each report names its engine).
    for run in sorted(runs, key=lambda run: "deepspeed" in BACKENDS[run.split(":")[0]]):
        start = time.perf_counter()
        backend, scenario = run.split(":")
        source = "text_image" if scenario in ("nan_guard", "unused_param") else scenario
        if source not in items:
            items[source] = scenario_items(model_dir, source, pack_file)
        train_run(model_dir, out_dir, backend, scenario, items[source])
        if int(os.environ["RANK"]) == 0:
            print(f"rank_sync_driver: {run} done in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
    close_distributed()
