"""DDP step time with ``find_unused_parameters`` on (transformers' default) and off (what QwenVLTrainer decides).

    python bench/ddp_step.py                       # tiny Qwen2.5-VL, 2 CPU processes (gloo), 12 steps each
    python bench/ddp_step.py --steps 30 --nproc 2 --model /path/to/Qwen2.5-VL

Each row is one torchrun launch of ``--nproc`` processes training the same micro-batches (demo images and
text-only samples mixed, so the dummy vision passes run) through ``QwenVLTrainer``: every parameter trains.
With ``find_unused_parameters=True`` DDP walks the autograd graph after each forward to look for parameters
that will get no gradient; the dummy vision passes make every trainable parameter take part, so the walk
finds nothing. The time per optimizer step is the median after ``--warmup`` steps, rank 0's; the ratio is
against the ``True`` row of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

DATASETS = "demo_single_image,demo_text_only"


def worker(model_dir: str, find_unused: bool, steps: int, warmup: int) -> None:
    """One DDP run (a torchrun process); rank 0 prints its step times as JSON."""
    import torch
    import transformers
    from transformers import AutoTokenizer, TrainerCallback

    from qwenvl.data.data_qwen import DataCollatorForSupervisedDataset, LazySupervisedDataset
    from qwenvl.models.loading import load_image_processor
    from qwenvl.data.vision import VisionConfig
    from qwenvl.train.argument import DataArguments, TrainingArguments
    from qwenvl.train.trainer import QwenVLTrainer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vision = VisionConfig.from_image_processor(load_image_processor(model_dir), 16 * 28 * 28, 64 * 28 * 28)
    dataset = LazySupervisedDataset(tokenizer, DataArguments(dataset_use=DATASETS), vision, model_max_length=1024)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, max_steps=steps + warmup, optim="sgd",
        learning_rate=1e-3, use_cpu=True, ddp_backend="gloo", report_to=[], logging_strategy="no",
        save_strategy="no", dataloader_num_workers=0, remove_unused_columns=False, seed=0, disable_tqdm=True,
        ddp_find_unused_parameters=find_unused,
    )
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa",
                                                                            dtype=torch.float32)
    model.config.use_cache = model.config.text_config.use_cache = False
    times: list[float] = []

    class StepTimes(TrainerCallback):
        start = 0.0

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    trainer = QwenVLTrainer(model=model, args=args, train_dataset=dataset,
                            data_collator=DataCollatorForSupervisedDataset(tokenizer.pad_token_id),
                            callbacks=[StepTimes()])
    trainer.train()
    if args.process_index == 0:
        print(json.dumps({"find_unused": find_unused, "seconds": statistics.median(times[warmup:]),
                          "steps": len(times) - warmup}))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2, help="processes (ranks) per run")
    parser.add_argument("--model", default=None, help="a Qwen2.5-VL folder (default: a tiny one built here)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        spec = json.loads(args._worker)
        worker(**spec)
        return
    model_dir = args.model
    if model_dir is None:
        from tools.build_tiny_model import build_tiny_model

        model_dir = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", model_type="qwen2_5_vl"))
    rows = []
    for find_unused in (True, False):
        spec = {"model_dir": model_dir, "find_unused": find_unused, "steps": args.steps, "warmup": args.warmup}
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                               "--master_port", str(free_port()), __file__, "--_worker", json.dumps(spec)],
                              capture_output=True, text=True, env=env, cwd=REPO_ROOT)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            rows.append({"find_unused": find_unused, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        rows.append(json.loads(lines[-1]))
    print(f"DDP, {args.nproc} processes (gloo, 1 thread each), batch 1 per rank, {DATASETS}, float32, every "
          "parameter trains")
    print(f"{'find_unused_parameters':<24} {'s/step':>8} {'steps':>6} {'vs True':>8}")
    base = next((row for row in rows if "error" not in row), None)
    for row in rows:
        if "error" in row:
            print(f"{str(row['find_unused']):<24} failed: {row['error']}")
            continue
        print(f"{str(row['find_unused']):<24} {row['seconds']:>8.3f} {row['steps']:>6} "
              f"{base['seconds'] / row['seconds']:>7.2f}x")


if __name__ == "__main__":
    main()
