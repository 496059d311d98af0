"""torchrun worker for test_registry: each rank builds the dataset and writes which samples it kept."""

import json
import os
import sys

import torch.distributed as dist
from transformers import AutoTokenizer

from qwenvl.data.data_qwen import LazySupervisedDataset
from qwenvl.data.vision import VisionConfig
from qwenvl.train.argument import DataArguments

model_dir, out_dir = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
dataset = LazySupervisedDataset(AutoTokenizer.from_pretrained(model_dir),
                                DataArguments(dataset_use="demo_single_image%50,demo_text_only%40"),
                                VisionConfig(), seed=1234)
kept = [[ref.dataset, ref.index] for ref in dataset.refs]
with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as handle:
    json.dump(kept, handle)
dist.barrier()
dist.destroy_process_group()
