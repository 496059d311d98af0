"""torchrun worker for test_bad_data_training: register the datasets, record what every batch holds, train.

Usage: bad_data_worker.py REGISTRY_JSON MODEL_DIR SEEN_DIR [train_qwen flags...]

Each batch the padded collator builds (in whichever dataloader worker) is appended to
SEEN_DIR/<pid>.jsonl: the rank, the answers decoded from its labels, whether it is the
all-bad placeholder, and the bad samples it lists. That is exactly what reaches the model.
"""

import json
import os
import sys

from transformers import AutoTokenizer

import qwenvl.data as registry
from qwenvl.data import data_qwen
from qwenvl.train.train_qwen import close_distributed, train

registry_json, model_dir, seen_dir = sys.argv[1:4]
with open(registry_json) as handle:
    registry.data_dict.update(json.load(handle))
tokenizer = AutoTokenizer.from_pretrained(model_dir)
collate = data_qwen.DataCollatorForSupervisedDataset.__call__


def recording_collate(self, instances):
    batch = collate(self, instances)
    labels = batch["labels"]
    entry = {
        "rank": int(os.environ.get("RANK", 0)),
        "answers": [tokenizer.decode(row[row != data_qwen.IGNORE_INDEX]) for row in labels],
        "placeholder": "num_items_in_batch" in batch,
        "bad": [problem.message for problem in batch.get(data_qwen.BAD_SAMPLES_KEY, [])],
    }
    with open(os.path.join(seen_dir, f"{os.getpid()}.jsonl"), "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    return batch


data_qwen.DataCollatorForSupervisedDataset.__call__ = recording_collate
train(sys.argv[4:])
close_distributed()
