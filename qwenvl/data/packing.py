"""Exact token lengths of every sample, counted once and cached, and first-fit-decreasing packing.

Counting (``TokenCounter``, qwenvl/data/token_count.py) reads image headers and video container
metadata, never pixels, and equals ``len(dataset[i]["input_ids"])``. ``count_lengths`` counts the
samples of an ``AnnotationSet`` with ``workers`` processes and keeps the counts next to each source's
annotation store (``AnnotationStore.save_lengths``), under a name derived from everything a count
depends on (tokenizer, chat layout, pixel and frame flags, ``model_max_length``, counting code): the
first process of a node counts while the others wait on a file lock, later runs read the cached
arrays (memory-mapped). Users: online packing (``--data_packing True`` on an unpacked dataset),
``--train_sampling_strategy group_by_length`` and ``tools/pack_data.py``.

Cached values per row: the length (``>= 0``), ``BAD`` (the dataset rejects the sample), or
``UNCOUNTED`` (not counted yet, or a transient I/O / unexpected error that the next run counts again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from filelock import FileLock

from qwenvl.data.annotations import AnnotationSet, AnnotationStore
from qwenvl.data.sources import Source, resolve_sources
from qwenvl.data.token_count import TokenCount, TokenCounter
from qwenvl.data.validation import unexpected_reason

logger = logging.getLogger(__name__)

UNCOUNTED = -1
BAD = -2
UNEXPECTED = "unexpected_error"  # kind of a sample whose counting raised an exception no check expected
NOT_CACHED = ("io_error", UNEXPECTED)  # counted again by the next run
CHUNK = 64  # samples per task sent to a counting process


# ----------------------------------------------------------------------- counting
def count_one(counter: TokenCounter, index: int, record: Any, data_path: str, where: str) -> TokenCount:
    """``counter.count``; any exception no check expected is this sample's ``unexpected_error``.

    One odd sample must not stop a count of millions: it is reported with the exception's type and
    message (never cached, so a fixed bug recounts it).
    """
    try:
        return counter.count(record, data_path, where, index)
    except Exception as exc:  # noqa: BLE001 - reported as the sample's problem
        return TokenCount(0, 0, UNEXPECTED, unexpected_reason(exc))


# What a pool process needs: the work function, its state and how to read job k. Set before the pool
# starts (fork inherits it; spawn receives it through the initializer).
_worker_state: tuple[Callable[[Any, Any], Any], Any, Callable[[int], Any]] | None = None


def _init_worker(work: Callable[[Any, Any], Any], state: Any, fetch: Callable[[int], Any]) -> None:
    global _worker_state
    _worker_state = (work, state, fetch)


def _run_range(bounds: tuple[int, int]) -> list[Any]:
    work, state, fetch = _worker_state
    return [work(state, job) for job in map(fetch, range(*bounds))]


def map_jobs(work: Callable[[Any, Any], Any], state: Any, num_jobs: int, fetch: Callable[[int], Any], workers: int,
             desc: str, progress: bool | None = None, chunk: int = CHUNK) -> Iterator[Any]:
    """``work(state, fetch(k))`` for every job ``k``, in ``workers`` processes when that helps, with a progress
    bar on terminals. Shared by the token counts (training, tools/pack_data.py) and tools/check_image.py.

    Args:
        work: a module-level function (picklable), e.g. ``count_job``.
        state: what ``work`` needs besides the job (a ``TokenCounter``, a validator), sent to each process once.
        num_jobs: how many jobs.
        fetch: job number -> job; called in the pool's processes, so records are read there (a store is
            picklable and memory-mapped).
        workers: processes (1 = here).
        desc: progress bar label.
        progress: the progress bar (tqdm, on stderr): None = on terminals only, True = always, False = never.
        chunk: jobs per task sent to a process.

    Yields:
        the results, in no particular order when ``workers > 1``.
    """
    from tqdm import tqdm

    bar = tqdm(total=num_jobs, desc=desc, unit="sample", disable=None if progress is None else not progress,
               mininterval=0.5, file=sys.stderr)
    try:
        if workers <= 1 or num_jobs < 2 * chunk:
            for k in range(num_jobs):
                yield work(state, fetch(k))
                bar.update()
            return
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        ranges = [(start, min(start + chunk, num_jobs)) for start in range(0, num_jobs, chunk)]
        with multiprocessing.get_context(method).Pool(workers, initializer=_init_worker,
                                                      initargs=(work, state, fetch)) as pool:
            for results in pool.imap_unordered(_run_range, ranges):
                yield from results
                bar.update(len(results))
    finally:
        bar.close()


def count_job(counter: TokenCounter, job: tuple[int, Any, str, str]) -> tuple[int, TokenCount]:
    """``(index, count_one(counter, *job))`` for ``map_jobs``."""
    return job[0], count_one(counter, *job)


def count_jobs(
    counter: TokenCounter, num_jobs: int, fetch: Callable[[int], tuple[int, Any, str, str]], workers: int,
    desc: str, progress: bool = True,
) -> Iterator[tuple[int, TokenCount]]:
    """Count ``num_jobs`` samples (``map_jobs``); ``fetch(k)`` gives ``(index, record, data_path, where)``, where
    ``index`` is yielded back and ``where`` names the annotation file in rejection reasons.

    Yields:
        ``(index, TokenCount)``, in no particular order when ``workers > 1``.
    """
    return map_jobs(count_job, counter, num_jobs, fetch, workers, desc, None if progress else False)


def lengths_name(counter: TokenCounter) -> str:
    """Name of the cached length arrays for this counter's settings (any change counts again)."""
    digest = hashlib.sha256(json.dumps(counter.settings(), sort_keys=True, default=str).encode()).hexdigest()
    return f"tokens-{digest[:20]}"


@dataclass
class StoreJobs:
    """Job k of a store: its row ``rows[k]`` (picklable: the store pickles as its path)."""

    store: AnnotationStore
    rows: np.ndarray

    def __call__(self, k: int) -> tuple[int, Any, str, str]:
        row = int(self.rows[k])
        return row, self.store[row], self.store.source.data_path, self.store.source.location


@dataclass
class Lengths:
    """Exact lengths of the kept samples of an ``AnnotationSet`` (``count_lengths``).

    Attributes:
        length: (n,) int64: tokens of each sample as training builds it (after ``model_max_length``),
            ``BAD`` for a sample the dataset rejects.
        full_length: (n,) int64: tokens before the ``model_max_length`` cut (0 for a rejected sample).
        counted: samples counted by this call (the rest came from the cache).
        seconds: time spent counting (and waiting for another process's count).
    """

    length: np.ndarray
    full_length: np.ndarray
    counted: int
    seconds: float

    @property
    def bad(self) -> np.ndarray:
        """Positions of the samples the dataset rejects."""
        return np.flatnonzero(self.length == BAD)

    @property
    def truncated(self) -> int:
        """Samples cut to ``model_max_length`` on text."""
        return int(((self.length >= 0) & (self.full_length > self.length)).sum())


def _store_lengths(store: AnnotationStore, rows: np.ndarray, counter: TokenCounter, name: str, workers: int,
                   progress: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(length, full_length) of ``rows`` of one store, counting (and caching) the rows not cached yet."""

    def cached() -> tuple[np.ndarray | None, np.ndarray | None]:
        return store.load_lengths(name), store.load_lengths(name + ".full")

    length, full = cached()
    if length is not None and full is not None and not (length[rows] == UNCOUNTED).any():
        return np.asarray(length[rows]), np.asarray(full[rows]), 0
    os.makedirs(os.path.dirname(store.lengths_path(name)) or ".", exist_ok=True)
    with FileLock(store.lengths_path(name) + ".lock"):  # one process per node counts; the others wait here
        length, full = cached()  # another process may have counted while this one waited
        length = np.full(len(store), UNCOUNTED, np.int64) if length is None else np.array(length)
        full = np.zeros(len(store), np.int64) if full is None else np.array(full)
        missing = rows[length[rows] == UNCOUNTED]
        retry: list[int] = []  # rows whose failure was transient: counted again next run
        if len(missing):
            logger.info("counting the exact tokens of %d samples of %s with %d process(es) (cached for later runs)",
                        len(missing), store.source.describe(), workers)
            for row, count in count_jobs(counter, len(missing), StoreJobs(store, missing), workers,
                                         f"counting {store.source.name}", progress):
                if count.kind in NOT_CACHED:
                    retry.append(row)
                    continue
                length[row] = count.length if count.ok else BAD
                full[row] = count.full_length
            store.save_lengths(name + ".full", full)
            store.save_lengths(name, length)  # last: a complete pair is what readers check for
        for row in retry:  # this run: treated as rejected (loading it reports the real cause)
            length[row] = BAD
        return length[rows], full[rows], len(missing)


def count_lengths(annotations: AnnotationSet, counter: TokenCounter, workers: int = 1,
                  progress: bool = True) -> Lengths:
    """Exact lengths of every kept sample of ``annotations``, from the per-source cache or counted now.

    Args:
        annotations: the dataset's ``AnnotationSet``.
        counter: a ``TokenCounter`` with training's tokenizer, family and flags.
        workers: counting processes (the samples of a node are counted by one process group).
        progress: progress bar while counting (terminals only).

    Returns:
        ``Lengths`` in the set's sample order.
    """
    start = time.perf_counter()
    name = lengths_name(counter)
    lengths, fulls, counted = [], [], 0
    for store, kept in zip(annotations.stores, annotations.kept):
        rows = np.arange(len(store), dtype=np.int64) if kept is None else np.asarray(kept, dtype=np.int64)
        length, full, n = _store_lengths(store, rows, counter, name, workers, progress)
        lengths.append(length)
        fulls.append(full)
        counted += n
    return Lengths(np.concatenate(lengths), np.concatenate(fulls), counted, time.perf_counter() - start)


def default_workers() -> int:
    """Counting processes when ``--count_workers`` is 0: the node's cores (one process group counts per node)."""
    return max(1, min(32, os.cpu_count() or 1))


# ------------------------------------------------------------------------ packing
def is_packed_file(path: str) -> bool:
    """A file written by tools/pack_data.py: a JSON list whose first item is a list of samples."""
    if path.endswith(".jsonl") or not os.path.isfile(path):
        return False
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    return head.startswith(b"[") and head[1:].lstrip().startswith(b"[")


def offline_packed(dataset_use: str | list[Source]) -> bool:
    """Whether ``--data_packing True`` trains on files from tools/pack_data.py (True) or packs now (False).

    Args:
        dataset_use: the flag's value, or its resolved sources.

    Raises:
        ValueError: some sources are packed files and others are not (pack all of them, or none).
    """
    sources = resolve_sources(dataset_use) if isinstance(dataset_use, str) else dataset_use
    packed = [source for source in sources if source.kind == "json" and is_packed_file(source.location)]
    if packed and len(packed) != len(sources):
        plain = [source.name for source in sources if source not in packed]
        raise ValueError(
            f"--data_packing True: {', '.join(s.name for s in packed)} are files from tools/pack_data.py but "
            f"{', '.join(plain)} are not; give only packed files (their groups are used as written), or only "
            f"unpacked datasets (packed when training starts, --pack_length tokens per row)"
        )
    return bool(packed)


def first_fit_decreasing(lengths: Sequence[int], capacity: int,
                         tie_seed: int | tuple[int, ...] | None = None) -> list[list[int]]:
    """Pack items into bins of ``capacity``: longest first, each into the first bin with room.

    A segment tree over the bins' free space finds the first bin with room in
    O(log n), so 1M samples pack in seconds. Items longer than ``capacity`` get
    a bin of their own.

    Args:
        lengths: item sizes (>= 0).
        capacity: bin size.
        tie_seed: None: items of equal length in index order; else in an order seeded by it (which
            same-length items share a bin changes with the seed, the bins' lengths do not).

    Returns:
        bins as lists of item indices, in the order the bins were opened; items
        within a bin in the order they were placed (longest first).

    Example:
        >>> first_fit_decreasing([3, 7, 5, 2, 9], capacity=10)
        [[4], [1, 0], [2, 3]]
    """
    sizes = np.asarray(lengths, dtype=np.int64)
    ties = np.arange(len(sizes)) if tie_seed is None else np.random.default_rng(tie_seed).permutation(len(sizes))
    order = np.lexsort((ties, -sizes)).tolist()
    sizes_list = sizes.tolist()
    size = 1
    while size < max(1, len(sizes_list)):
        size *= 2
    free = [-1] * (2 * size)  # max free space below each node; -1 = no open bin there
    slot_bin: list[int] = []  # tree slot -> index in bins
    bins: list[list[int]] = []
    for item in order:
        length = sizes_list[item]
        if length > capacity:
            bins.append([item])
            continue
        if free[1] >= length:
            node = 1
            while node < size:
                node = 2 * node if free[2 * node] >= length else 2 * node + 1
        else:
            node = size + len(slot_bin)
            slot_bin.append(len(bins))
            bins.append([])
            free[node] = capacity
        bins[slot_bin[node - size]].append(item)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


@dataclass
class PackPlan:
    """Bins of sample positions: bin ``b`` is ``members[offsets[b]:offsets[b + 1]]`` (flat arrays, no lists).

    Attributes:
        members: (n,) int64 sample positions, bin after bin.
        offsets: (bins + 1,) int64.
        tokens: (bins,) int64 real tokens per bin.
        pack_length: the bin capacity.
        oversize: samples longer than ``pack_length`` (each alone in its bin).
    """

    members: np.ndarray
    offsets: np.ndarray
    tokens: np.ndarray
    pack_length: int
    oversize: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def bin(self, b: int) -> np.ndarray:
        """Sample positions of bin ``b``."""
        return self.members[self.offsets[b]:self.offsets[b + 1]]

    @property
    def fill(self) -> float:
        """Real tokens over the bins' room (an oversize bin counts its own length)."""
        room = np.maximum(self.tokens, self.pack_length).sum()
        return float(self.tokens.sum() / room) if room else 0.0

    def digest(self) -> str:
        """sha256 of the bins, to check that every rank holds the same ones."""
        digest = hashlib.sha256(self.members.tobytes())
        digest.update(self.offsets.tobytes())
        return digest.hexdigest()


def cached_plan(lengths: np.ndarray, pack_length: int, seed: int | tuple[int, ...],
                store: AnnotationStore) -> PackPlan:
    """``plan_bins``, computed by one process per node and kept next to ``store`` (the dataset's first
    source; keyed by the lengths, the capacity and the seed, and removed with that store when it is
    rebuilt); the other processes wait and load it. 1M samples take seconds to plan, 10M a minute or
    two: once per node, and never again when the run restarts.
    """
    digest = hashlib.sha256(np.ascontiguousarray(lengths, dtype=np.int64).tobytes())
    digest.update(f"{pack_length}:{seed}".encode())
    path = f"{store.path[:-len('.arrow')]}.plan-{digest.hexdigest()[:24]}.npz"
    folder = os.path.dirname(path) or "."

    def load() -> PackPlan | None:
        try:
            with np.load(path) as saved:
                return PackPlan(saved["members"], saved["offsets"], saved["tokens"], pack_length,
                                int(saved["oversize"]))
        except (OSError, ValueError, KeyError):
            return None

    plan = load()
    if plan is not None:
        return plan
    os.makedirs(folder, exist_ok=True)
    with FileLock(path + ".lock"):
        plan = load()
        if plan is None:
            plan = plan_bins(lengths, pack_length, seed)
            temporary = f"{path}.tmp-{os.getpid()}.npz"
            np.savez(temporary, members=plan.members, offsets=plan.offsets, tokens=plan.tokens,
                     oversize=np.int64(plan.oversize))
            os.replace(temporary, path)
    return plan


def plan_bins(lengths: np.ndarray, pack_length: int, seed: int | tuple[int, ...]) -> PackPlan:
    """First-fit-decreasing bins of ``lengths`` (``BAD`` samples weigh 0: loading them reports them).

    Args:
        lengths: ``Lengths.length`` of the dataset's samples.
        pack_length: bin capacity in tokens.
        seed: orders samples of equal length (same seed, same bins on every rank); ``(seed, epoch)``
            gives each epoch other bins of the same lengths.

    Returns:
        the ``PackPlan``; every sample is in exactly one bin.
    """
    sizes = np.where(lengths == BAD, 0, lengths).astype(np.int64)
    bins = first_fit_decreasing(sizes, pack_length, tie_seed=seed)
    counts = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    members = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=int(offsets[-1]))
    tokens = np.add.reduceat(sizes[members], offsets[:-1]) if len(bins) else np.zeros(0, np.int64)
    return PackPlan(members, offsets, tokens.astype(np.int64), pack_length, int((sizes > pack_length).sum()))
