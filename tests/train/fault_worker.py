"""Training worker for test_faults: a run that is SIGKILLed in the middle of saving checkpoint STEP.

Usage: fault_worker.py GO_FILE STEP FILE:FRACTION[,FILE:FRACTION...] [train_qwen flags...]

After optimizer step 1 the run waits until GO_FILE exists (so a test can act while it holds
``--output_dir``). When the Trainer has saved ``checkpoint-STEP`` (``on_save``), each FILE of that
folder is cut to FRACTION of its bytes (0 removes it), which is what the folder holds when the
process dies while writing those files, and the process then kills itself with SIGKILL: no
handler, no ``finally``, no flush runs, as when a node dies.
"""

import os
import signal
import sys
import time

from transformers import TrainerCallback

from qwenvl.train import train_qwen

go_file, kill_step, cuts = sys.argv[1], int(sys.argv[2]), [c.split(":") for c in sys.argv[3].split(",")]


class KillWhileSaving(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            while not os.path.exists(go_file):
                time.sleep(0.05)

    def on_save(self, args, state, control, **kwargs):
        if state.global_step != kill_step:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{kill_step}")
        for name, fraction in cuts:
            path = os.path.join(folder, name)
            if float(fraction) == 0:
                os.remove(path)
            else:
                os.truncate(path, int(os.path.getsize(path) * float(fraction)))
        print(f"killing myself in the middle of saving {folder}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


class FaultyTrainer(train_qwen.QwenVLTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(KillWhileSaving())


train_qwen.QwenVLTrainer = FaultyTrainer
train_qwen.train(sys.argv[4:])
