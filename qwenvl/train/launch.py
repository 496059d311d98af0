"""``python qwenvl/train/train_qwen.py --deepspeed ...`` without torchrun: run as a 1-process job.

DeepSpeed, FSDP and an explicit ``--ddp_backend`` all need a process group. torchrun (or the
``deepspeed`` launcher, or mpirun) says how to build one through the environment; a plain
``python`` start says nothing, and the libraries then fail in ways that do not name the cause:
DeepSpeed looks for MPI ("No module named mpi4py"), the Trainer says "fsdp only works in
distributed training", accelerate asks for a process group it never created ("Default process
group has not been initialized"). ``single_process_env`` writes the environment torchrun would
write for ``--nproc_per_node 1`` before ``TrainingArguments`` sets up the device, so such a
command trains on one process (one GPU), as users of ``python train.py --deepspeed`` expect.

Only the command line does this (``train_qwen.main`` calls ``allow_single_process``): a library
caller of ``parse_args``/``train`` (a notebook, a test) keeps its environment as it is, since the
variables stay in the process for good and turn every later run into a 1-process DDP run.
"""

from __future__ import annotations

import os
import socket
from typing import Any

# What a launcher leaves in the environment of its workers: torchrun / the deepspeed launcher / accelerate
# (RANK, LOCAL_RANK, WORLD_SIZE), Open MPI, MPICH / Intel MPI, MVAPICH.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


_ALLOWED = False


def allow_single_process(allowed: bool = True) -> None:
    """Let ``single_process_env`` write the environment (the command line's entry point calls it)."""
    global _ALLOWED
    _ALLOWED = allowed


def launched() -> bool:
    """Whether a launcher (torchrun, deepspeed, accelerate, mpirun) started this process."""
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def needs_process_group(training_args: Any) -> list[str]:
    """The flags of ``training_args`` that need a process group: ``--deepspeed``, ``--fsdp``, ``--ddp_backend``.

    Example:
        >>> needs_process_group(SimpleNamespace(deepspeed="zero3.json", fsdp="", ddp_backend=None))
        ['--deepspeed zero3.json']
    """
    flags = []
    if getattr(training_args, "deepspeed", None):
        flags.append(f"--deepspeed {training_args.deepspeed}")
    fsdp = getattr(training_args, "fsdp", None)
    if fsdp:
        value = fsdp if isinstance(fsdp, str) else " ".join(str(getattr(f, "value", f)) for f in fsdp)
        flags.append(f"--fsdp {value}".rstrip())
    if getattr(training_args, "ddp_backend", None):
        flags.append(f"--ddp_backend {training_args.ddp_backend}")
    return flags


def single_process_env(training_args: Any) -> str | None:
    """Without a launcher, set torchrun's 1-process environment when the flags need a process group.

    Sets ``RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1`` and a free
    ``MASTER_PORT`` (a ``MASTER_ADDR``/``MASTER_PORT`` already set is kept). Call it before the
    distributed state exists (``TrainingArguments.__post_init__``, before ``super().__post_init__()``).

    Args:
        training_args: ``TrainingArguments`` being initialised (``deepspeed``, ``fsdp``, ``ddp_backend``).

    Returns:
        a note for the start-up summary, or None when nothing was set (not allowed, see
        ``allow_single_process``; a launcher started this process; or no flag needs a process group).
    """
    flags = needs_process_group(training_args)
    if not _ALLOWED or not flags or launched():
        return None
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return (f"{', '.join(flags)} without torchrun: running as 1 process (RANK=0 WORLD_SIZE=1 MASTER_PORT="
            f"{os.environ['MASTER_PORT']}); for N GPUs use torchrun --nproc_per_node N qwenvl/train/train_qwen.py ...")
