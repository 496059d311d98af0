"""Supervised data for Qwen-VL: annotation records -> token ids, labels, position ids, pixels.

Flow (each step a function that can be called alone):
annotation file -> records -> ``parse_conversation`` -> media (``vision``/``video``)
-> ``ChatEncoder.encode`` (``qwenvl/data/chat.py``, the family's layout) -> the family's
position ids -> collators. Everything model-specific comes from the family
(``qwenvl.models``), found from the checkpoint's config.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from qwenvl.data.annotations import AnnotationSet, record_stats
from qwenvl.data.packing import Lengths, PackPlan, cached_plan, count_lengths, default_workers, offline_packed
from qwenvl.data.chat import (  # noqa: F401 - re-exported: users and tools import them from here
    BAD_SAMPLES_KEY,
    IGNORE_INDEX,
    IMAGE_TAG,
    VIDEO_TAG,
    BadRecord,
    BadSampleError,
    ChatEncoder,
    Conversation,
    ConversationError,
    Problem,
    SampleError,
    SampleRef,
    encode_sample,
    fit_max_length,
    load_annotations,
    parse_conversation,
    sample_images,
    sample_indices,
    sample_videos,
)
from qwenvl.data.hf_items import ProcessorDataCollator, ProcessorItemBuilder
from qwenvl.data.token_count import TokenCounter
from qwenvl.data.validation import check_record, load_video_checked, unexpected_reason, with_io_retries
from qwenvl.data.vision import (
    ImageError,
    VisionConfig,
    is_transient_io_error,
    num_vision_tokens,
    open_image,
    process_image,
)
from qwenvl.models import DEFAULT_MODEL_TYPE, ModelFamily, VisionSettings, family_for
from qwenvl.models.qwen2_vl import DEFAULT_SYSTEM_PROMPT  # noqa: F401 - Qwen2/2.5-VL's, kept for old imports

logger = logging.getLogger(__name__)


def resolve_family(family: ModelFamily | None, model_type: str | None) -> ModelFamily:
    """``family`` when given, else the family registered for ``model_type`` (``qwen2_5_vl`` when neither).

    Raises:
        ValueError: an unknown ``model_type`` (the message lists the supported ones).

    Example:
        >>> resolve_family(None, "qwen3_vl").model_type
        'qwen3_vl'
    """
    return family if family is not None else family_for(model_type or DEFAULT_MODEL_TYPE)


class LazySupervisedDataset(Dataset):
    """Samples from the registry, tokenised and processed on access.

    Args:
        tokenizer: the checkpoint's tokenizer.
        data_args: ``DataArguments`` (``dataset_use``, pixel and frame limits).
        vision_config: patch geometry and normalisation (``VisionConfig``).
        model_type: a registered ``model_type``, resolved with ``family_for`` when ``family``
            is None (kept for callers from before families existed).
        model_max_length: longer samples are truncated on text only, or rejected.
        seed: seeds the ``%N`` subsets (same subset on every rank).
        tokens_per_second: from the model's vision config (Qwen2.5-VL video rope).
        dataset_use: overrides ``data_args.dataset_use`` (e.g. for an eval set).
        bad_sample_policy: ``"error"`` raises ``BadSampleError`` for a bad sample (and
            ``ValueError`` for a JSONL line that does not parse); ``"skip"`` returns a
            ``Problem`` in its place (logged at debug level once per process; training's
            ``BadSampleMonitor`` logs it once per run) that the collators drop and
            report, never another sample. Training passes ``--bad_sample_policy``.
        io_retries: retries of transient I/O errors (EIO, ESTALE, timeouts) per sample
            before it counts as bad (``io_error``).
        io_backoff: seconds before the first retry; doubles each time.
        family: the checkpoint's ``ModelFamily`` (``family_for(model.config)``): chat layout,
            video rule, position ids. Wins over ``model_type``.
        vision_settings: the checkpoint's processor settings (``family.vision_settings(path)``),
            the defaults of ``--video_min_pixels``/``--video_max_pixels`` for Qwen3-VL; None =
            the family's released defaults.
        processor: the checkpoint's ``AutoProcessor``; required by (and only used for) the HF-processor
            families (``family.uses_processor_items``, e.g. LLaVA), whose items it builds
            (``qwenvl/data/hf_items.py``).
    """

    def __init__(
        self,
        tokenizer: Any,
        data_args: Any,
        vision_config: VisionConfig,
        model_type: str = DEFAULT_MODEL_TYPE,
        model_max_length: int = 512,
        seed: int = 42,
        tokens_per_second: float = 2,
        dataset_use: str | None = None,
        bad_sample_policy: str = "error",
        io_retries: int = 3,
        io_backoff: float = 0.5,
        family: ModelFamily | None = None,
        vision_settings: VisionSettings | None = None,
        processor: Any = None,
    ):
        super().__init__()
        if bad_sample_policy not in ("error", "skip"):
            raise ValueError(f"bad_sample_policy should be one of 'error' or 'skip' but found {bad_sample_policy!r}")
        self.bad_sample_policy = bad_sample_policy
        self.io_retries, self.io_backoff = io_retries, io_backoff
        self._logged_bad: set[int] = set()  # samples already logged by this process
        self.data_args = data_args
        self.vision_config = vision_config
        self.family = resolve_family(family, model_type)
        self.model_type = self.family.model_type
        self.vision_settings = vision_settings
        self.tokenizer, self.seed = tokenizer, seed
        train_on_prompt = getattr(data_args, "train_on_prompt", False)
        self.processor_items: ProcessorItemBuilder | None = None
        if self.family.uses_processor_items:  # the checkpoint's processor renders and expands (hf_items.py)
            if processor is None:
                raise ValueError(f"the {self.family.model_type} family builds its items with the checkpoint's "
                                 f"processor: pass processor=family.load_processor(checkpoint)")
            self.processor_items = ProcessorItemBuilder(processor, self.family, train_on_prompt)
        else:
            self.encoder = ChatEncoder(tokenizer, self.family, train_on_prompt=train_on_prompt)
        self._exact: Lengths | None = None
        self.tokens_per_second = tokens_per_second
        self.model_max_length = model_max_length
        use = dataset_use if dataset_use is not None else data_args.dataset_use
        # Records stay in a memory-mapped Arrow store shared by the ranks and workers of a node, built once
        # per source and cached (qwenvl/data/annotations.py); records[i] is parsed on access, refs[i] made on
        # demand. Sources: registry names, .json/.jsonl files, Hugging Face datasets (qwenvl/data/sources.py).
        self.annotations = AnnotationSet(use, seed, bad_lines="keep" if bad_sample_policy == "skip" else "raise")
        self.records: Sequence[Any] = self.annotations
        self.refs: Sequence[SampleRef] = self.annotations.refs

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> list[int]:
        """Exact length of every sample (``exact_lengths``; a rejected sample counts 1), for length grouping:
        counted from image headers and video metadata once and cached, no item built."""
        return np.maximum(self.exact_lengths().length, 1).tolist()

    def rough_lengths(self) -> np.ndarray:
        """Rough length of every sample (text words + 256 per image + 512 per video; 1 for a bad record):
        read from the annotation store, nothing counted, no record parsed."""
        return self.annotations.rough_lengths()

    def item_lengths(self) -> tuple[np.ndarray, bool]:
        """Tokens of every item without counting anything: (lengths, exact?). Exact when ``exact_lengths``
        already ran, else the store's rough lengths (for the start-up summary's tokens per step)."""
        if self._exact is not None:
            return np.maximum(self._exact.length, 0), True
        return self.rough_lengths(), False

    def token_counter(self) -> TokenCounter:
        """A ``TokenCounter`` that counts exactly what this dataset builds (same tokenizer, family and flags)."""
        return TokenCounter(self.tokenizer, self.data_args, self.vision_config, self.model_max_length,
                            self.io_retries, self.io_backoff, family=self.family, settings=self.vision_settings)

    def exact_lengths(self) -> Lengths:
        """Every sample's ``len(input_ids)`` (``BAD`` for a sample this dataset rejects), from the per-source
        cache next to the annotation store, or counted now with ``--count_workers`` processes (one process
        group per node counts; the others wait and read its result). See ``qwenvl/data/packing.py``."""
        if self._exact is None:
            workers = getattr(self.data_args, "count_workers", 0) or default_workers()
            self._exact = count_lengths(self.annotations, self.token_counter(), workers)
            logger.info("exact token counts of %d samples ready in %.1f s (%d counted by this process with %d "
                        "worker(s); the rest from the cache, or counted by another process of this node)",
                        len(self._exact.length), self._exact.seconds, self._exact.counted, workers)
        return self._exact

    def samples_per_dataset(self) -> dict[str, int]:
        """Kept samples per dataset name (without a ``SampleRef`` per sample)."""
        return self.annotations.samples_per_dataset()

    def bad(self, i: int, reason: str, kind: str = "invalid") -> BadSampleError:
        ref = self.refs[i]
        return BadSampleError(ref.annotation_path, ref.index, reason, kind)

    # ------------------------------------------------------------- media
    def load_images(self, i: int, images: list) -> tuple[list[np.ndarray], list[tuple[int, int, int]]]:
        """Decode and patchify a sample's images."""
        pixels, grids = [], []
        for number, source in enumerate(images):
            try:
                pv, grid = process_image(open_image(source, self.refs[i].data_path), self.vision_config)
            except ImageError as exc:
                raise self.bad(i, f"image {number}: {exc}", exc.kind) from None
            pixels.append(pv)
            grids.append(grid)
        return pixels, grids

    def load_videos(self, i: int, videos: list) -> tuple[list[np.ndarray], list[Any]]:
        """Decode, sample and patchify a sample's videos by the family's rule.

        Returns:
            tuple[list[np.ndarray], list[Any]]: pixel values and ``VideoPlan`` (grid, seconds per
            grid step, timestamps) of each video.
        """
        pixels, plans = [], []
        ref = self.refs[i]
        for number, source in enumerate(videos):
            try:
                pv, plan = load_video_checked(source, number, ref.data_path, self.data_args, self.vision_config,
                                              ref.annotation_path, ref.index, self.family, self.vision_settings)
            except BadSampleError as exc:
                raise self.bad(i, exc.reason, exc.kind) from None
            pixels.append(pv)
            plans.append(plan)
        return pixels, plans

    # ------------------------------------------------------------- items
    def __getitem__(self, i: int) -> dict[str, Any] | Problem:
        return self.load_sample(i)

    def load_sample(self, i: int) -> dict[str, Any] | Problem:
        """``get_item`` with transient I/O retries and the bad-sample policy.

        Returns:
            the item; under ``skip`` a ``Problem`` for a bad sample (never another sample).

        Any other exception (a bug, or an input no check foresaw) is, under ``skip``, the
        sample's ``unexpected_error`` (type and message; the traceback is logged once), so one
        odd sample cannot kill one rank of a distributed run; under ``error`` it propagates
        with a note naming the file and index.

        Raises:
            BadSampleError: a bad sample under ``error``; an I/O error that outlived
                the retries is kind ``io_error``.
        """
        ref = self.refs[i]
        try:
            try:
                return with_io_retries(lambda: self.get_item(i), self.io_retries, self.io_backoff,
                                       f"{ref.annotation_path}:{ref.index}")
            except (BadSampleError, MemoryError):
                raise
            except Exception as exc:
                if isinstance(exc, OSError) and is_transient_io_error(exc):
                    raise self.bad(i, f"I/O error after {self.io_retries + 1} attempts: {exc}", "io_error") from None
                if self.bad_sample_policy == "error":
                    exc.add_note(f"while loading sample {ref.annotation_path}:{ref.index}")
                    raise
                if i not in self._logged_bad:
                    logger.warning("unexpected error on %s:%s", ref.annotation_path, ref.index, exc_info=True)
                raise self.bad(i, unexpected_reason(exc), "unexpected_error") from None
        except BadSampleError as exc:
            if self.bad_sample_policy == "error":
                raise
            problem = Problem.from_error(exc, ref.dataset)
            if i not in self._logged_bad:  # the Trainer's BadSampleMonitor logs it once for the whole run
                self._logged_bad.add(i)
                logger.debug("skipping bad sample (%s): %s", problem.kind, problem.message)
            return problem

    def get_item(self, i: int) -> dict[str, Any]:
        """The training example for sample ``i``.

        Returns:
            dict with ``input_ids`` (L,), ``labels`` (L,), ``position_ids`` (3, L),
            and when present ``pixel_values`` (N, 3 * 2 * patch**2), ``image_grid_thw`` (n, 3),
            ``pixel_values_videos``, ``video_grid_thw``, and ``second_per_grid_ts`` (one float
            per video) for families whose model takes it (Qwen2.5-VL).

        Raises:
            BadSampleError: the message names the annotation file and index.
        """
        ref = self.refs[i]
        try:
            checked = check_record(self.records[i], ref.annotation_path, ref.index, self.family)
        except BadSampleError as exc:
            raise self.bad(i, exc.reason, exc.kind) from None
        conversation, images, videos = checked.conversation, checked.images, checked.videos
        if self.processor_items is not None:
            return self.processor_item(i, conversation, images, videos)
        image_pixels, image_grids = self.load_images(i, images)
        video_pixels, plans = self.load_videos(i, videos) if videos else ([], [])
        video_grids = [plan.grid_thw for plan in plans]
        merge = self.vision_config.merge_size
        # Shared with tools/pack_data.py's token counter, so its counts equal len(input_ids) here.
        try:
            input_ids, labels = encode_sample(
                self.encoder,
                conversation,
                [num_vision_tokens(g, merge) for g in image_grids],
                [self.family.video_block_lengths(g, merge) for g in video_grids],
                self.model_max_length,
                [plan.timestamps for plan in plans],
            )
        except SampleError as exc:
            raise self.bad(i, exc.reason, exc.kind) from None

        ids = torch.from_numpy(input_ids)
        item: dict[str, Any] = {"input_ids": ids, "labels": torch.from_numpy(labels)}
        image_grid = torch.tensor(image_grids, dtype=torch.long) if image_grids else None
        video_grid = torch.tensor(video_grids, dtype=torch.long) if video_grids else None
        seconds = [plan.second_per_grid_t for plan in plans]
        position_ids, _ = self.family.position_ids(
            ids[None], self.encoder.token_ids, merge, image_grid_thw=image_grid, video_grid_thw=video_grid,
            second_per_grid_ts=seconds or None, tokens_per_second=self.tokens_per_second,
        )
        item["position_ids"] = position_ids[:, 0]  # (3, L)
        if image_pixels:
            item["pixel_values"] = torch.from_numpy(np.concatenate(image_pixels))
            item["image_grid_thw"] = image_grid
        if video_pixels:
            item["pixel_values_videos"] = torch.from_numpy(np.concatenate(video_pixels))
            item["video_grid_thw"] = video_grid
            if self.family.uses_second_per_grid_ts:
                item["second_per_grid_ts"] = seconds
        return item

    def processor_item(self, i: int, conversation: Conversation, images: list, videos: list) -> dict[str, Any]:
        """The example of an HF-processor family: ``ProcessorItemBuilder.build`` on the decoded images.

        Raises:
            BadSampleError: a video (these families train on images), an image that does not open, or the
                builder's ``SampleError``.
        """
        if videos:
            reason = self.family.video_refusal  # an HF-processor family's: why, where it says
            raise self.bad(i, f"{len(videos)} video(s), but the {self.family.model_type} family takes images only"
                           + (f": {reason}" if reason else ""), "unsupported_media")
        opened = []
        for number, source in enumerate(images):
            try:
                opened.append(open_image(source, self.refs[i].data_path))
            except ImageError as exc:
                raise self.bad(i, f"image {number}: {exc}", exc.kind) from None
        try:
            return self.processor_items.build(conversation, opened, self.model_max_length)
        except SampleError as exc:
            raise self.bad(i, exc.reason, exc.kind) from None

    def truncate(self, i: int, input_ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cut a too-long sample on text only; refuse to cut through a vision block (``fit_max_length``)."""
        try:
            return fit_max_length(input_ids, labels, self.encoder.vision_end_id, self.model_max_length)
        except SampleError as exc:
            raise self.bad(i, exc.reason, exc.kind) from None


# ------------------------------------------------------------------ collators
def split_bad(instances: Sequence[Any]) -> tuple[list[dict], list[Problem]]:
    """Separate real items from the ``Problem`` (or None) entries of skipped bad samples.

    Example:
        >>> split_bad([item, Problem("d", "d.json", 3, "missing_media", "..."), None])
        ([item], [Problem(dataset='d', annotation_path='d.json', index=3, kind='missing_media', reason='...')])
    """
    good = [x for x in instances if isinstance(x, dict)]
    problems = [x for x in instances if isinstance(x, Problem)]
    return good, problems


def placeholder_batch(pad_token_id: int, flattened: bool) -> dict[str, Any]:
    """Stand-in for a micro-batch whose samples were all bad: one pad token, nothing to learn.

    Every rank must still run forward and backward (DDP/ZeRO collectives), so an
    empty micro-batch cannot simply be dropped. Its loss must be exactly 0: the
    model's mean cross-entropy over zero labels is NaN, so the batch carries
    ``num_items_in_batch=1`` and the model's loss becomes ``sum over no tokens / 1``,
    0 with zero gradients (the Trainer's own count, when it passes one, wins).

    Returns:
        input_ids (1, 1), labels (1, 1) = -100, position_ids (3, 1, 1) padded or
        (4, 1, 1) flattened, attention_mask (1, 1) when padded, num_items_in_batch 1.
    """
    batch: dict[str, Any] = {
        "input_ids": torch.full((1, 1), pad_token_id, dtype=torch.long),
        "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((4 if flattened else 3, 1, 1), dtype=torch.long),
        "num_items_in_batch": 1,
    }
    if not flattened:
        batch["attention_mask"] = torch.ones((1, 1), dtype=torch.long)
    return batch


def _with_problems(batch: dict[str, Any], problems: list[Problem]) -> dict[str, Any]:
    if problems:
        batch[BAD_SAMPLES_KEY] = problems
    return batch


def _collate_vision(instances: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Concatenate pixels and grids of all samples, in batch order."""
    batch: dict[str, torch.Tensor] = {}
    for pixels_key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        present = [x for x in instances if x.get(pixels_key) is not None]
        if present:
            batch[pixels_key] = torch.cat([x[pixels_key] for x in present], dim=0)
            batch[grid_key] = torch.cat([x[grid_key] for x in present], dim=0)
    seconds = [s for x in instances for s in (x.get("second_per_grid_ts") or [])]
    if seconds:
        batch["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    return batch


@dataclass
class DataCollatorForSupervisedDataset:
    """Pad a list of samples into one batch (right padding).

    input_ids are padded with the pad id, labels with -100, position_ids with 1;
    ``attention_mask`` marks real tokens. Nothing is truncated here: the dataset
    already enforced ``model_max_length`` without cutting vision blocks.
    Skipped bad samples (``Problem`` entries) are dropped and listed under
    ``batch["bad_samples"]``; when all are bad the batch is ``placeholder_batch``.
    """

    pad_token_id: int

    def __call__(self, instances: Sequence[dict | Problem]) -> dict[str, torch.Tensor]:
        instances, problems = split_bad(instances)
        if not instances:
            return _with_problems(placeholder_batch(self.pad_token_id, flattened=False), problems)
        longest = max(len(x["input_ids"]) for x in instances)
        size = len(instances)
        input_ids = torch.full((size, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((size, longest), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.ones((3, size, longest), dtype=torch.long)
        attention_mask = torch.zeros((size, longest), dtype=torch.long)
        for row, x in enumerate(instances):
            length = len(x["input_ids"])
            input_ids[row, :length] = x["input_ids"]
            labels[row, :length] = x["labels"]
            position_ids[:, row, :length] = x["position_ids"]
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,  # (3, B, L)
                 "attention_mask": attention_mask}
        batch.update(_collate_vision(instances))
        return _with_problems(batch, problems)


def flatten_instances(instances: Sequence[dict | Problem], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Concatenate samples into one row with 4-row position ids (no padding, no mask).

    Row 0 of ``position_ids`` restarts at 0 for every sample: transformers finds
    the sequence boundaries from it (flash-attention varlen, or a block-diagonal
    mask for sdpa/eager). Rows 1-3 are the mrope ids. The first label of every
    sample is -100 so the shifted loss never predicts across a boundary.
    Skipped bad samples are dropped and listed as in ``DataCollatorForSupervisedDataset``
    (``pad_token_id`` fills the placeholder when all are bad).

    Returns:
        input_ids (1, T), labels (1, T), position_ids (4, 1, T), plus vision keys.
    """
    instances, problems = split_bad(instances)
    if not instances:
        return _with_problems(placeholder_batch(pad_token_id, flattened=True), problems)
    input_ids = torch.cat([x["input_ids"] for x in instances])[None]
    labels = torch.cat([x["labels"] for x in instances]).clone()
    starts = np.cumsum([0] + [len(x["input_ids"]) for x in instances[:-1]])
    labels[torch.from_numpy(starts)] = IGNORE_INDEX
    text_positions = torch.cat([torch.arange(len(x["input_ids"])) for x in instances])[None]  # (1, T)
    mrope = torch.cat([x["position_ids"] for x in instances], dim=1)  # (3, T)
    position_ids = torch.cat([text_positions, mrope], dim=0)[:, None]  # (4, 1, T)
    batch = {"input_ids": input_ids, "labels": labels[None], "position_ids": position_ids}
    batch.update(_collate_vision(instances))
    return _with_problems(batch, problems)


@dataclass
class FlattenedDataCollatorForSupervisedDataset:
    """All samples of a micro-batch in one row; see ``flatten_instances``."""

    pad_token_id: int = 0  # only fills the placeholder of an all-bad micro-batch

    def __call__(self, instances: Sequence[dict | Problem]) -> dict[str, torch.Tensor]:
        return flatten_instances(instances, self.pad_token_id)


# ------------------------------------------------------------- packed files
@dataclass(frozen=True)
class PackedSampleRef(SampleRef):
    """A sample inside a packed file: ``index`` is the group, ``position`` the sample within it."""

    position: int = 0


class PackedSupervisedDataset(LazySupervisedDataset):
    """Groups of a packed file; item ``g`` is the list of group ``g``'s sample items.

    Takes the same arguments as ``LazySupervisedDataset`` (``bad_sample_policy``,
    ``io_retries`` and ``io_backoff`` included); ``%N`` in ``dataset_use`` keeps
    N percent of the groups. Each sample is loaded with ``load_sample``, so under
    ``skip`` a bad sample becomes a ``Problem`` inside its group, which the
    collator drops and reports; the rest of the group still trains.

    Nothing per sample is held in Python: groups stay in the annotation store, sample ``i`` (numbered
    group after group) is found from an array of group offsets, and a group is parsed when one of its
    samples is loaded. The groups' sizes and rough lengths are read once and cached next to the store.

    Raises:
        ValueError: an item of the file is not a non-empty list of samples (the
            file was not written by ``tools/pack_data.py``); the message names
            the file and the item.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        # The parent reads the sources and the %N subsets; its records are our groups.
        super().__init__(*args, **kwargs)
        sizes, rough = [], []
        self._source_starts = [0]  # source k holds groups _source_starts[k]..[k+1]
        for store, kept in zip(self.annotations.stores, self.annotations.kept):
            store_sizes, store_rough = _group_stats(store)
            sizes.append(store_sizes if kept is None else store_sizes[kept])
            rough.append(store_rough if kept is None else store_rough[kept])
            self._source_starts.append(self._source_starts[-1] + len(sizes[-1]))
        self._group_rough = np.concatenate(rough)
        self._offsets = np.zeros(len(self.annotations) + 1, dtype=np.int64)  # group g: samples offsets[g]..[g+1]
        np.cumsum(np.concatenate(sizes), out=self._offsets[1:])
        self._parsed: tuple[int, list] | None = None  # the last group parsed (its samples load one after another)
        self.records = _PackedSamples(self, "record")  # one entry per sample, so the parent's get_item works
        self.refs = _PackedSamples(self, "ref")
        self.groups = _GroupMembers(self._offsets)  # group -> indices into records

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, g: int) -> list[dict[str, Any] | Problem]:
        """The items of group ``g``, each as ``LazySupervisedDataset.load_sample`` builds it."""
        return [self.load_sample(i) for i in self.groups[g]]

    def locate_sample(self, i: int) -> tuple[int, int]:
        """(group, position in the group) of sample ``i``."""
        if not 0 <= i < self._offsets[-1]:
            raise IndexError(f"sample {i} out of range (0..{self._offsets[-1] - 1})")
        g = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return g, i - int(self._offsets[g])

    def sample_record(self, i: int) -> Any:
        """Record of sample ``i`` (its group parsed once while its samples load)."""
        g, position = self.locate_sample(i)
        if self._parsed is None or self._parsed[0] != g:
            self._parsed = (g, self.annotations[g])
        return self._parsed[1][position]

    def sample_ref(self, i: int) -> PackedSampleRef:
        """Where sample ``i`` comes from: the packed file, its group (``index``) and ``position``."""
        g, position = self.locate_sample(i)
        ref = self.annotations.ref(g)
        return PackedSampleRef(ref.dataset, ref.annotation_path, ref.data_path, ref.index, position)

    @property
    def lengths(self) -> list[int]:
        """Rough length of every group: the sum of its samples' rough lengths (the store's ``record_stats`` rule)."""
        return self._group_rough.tolist()

    def item_lengths(self) -> tuple[np.ndarray, bool]:
        """Rough length of every group (not counted exactly)."""
        return self._group_rough, False

    def samples_per_dataset(self) -> dict[str, int]:
        """Samples (not groups) per dataset name."""
        counts: dict[str, int] = {}
        starts = self._source_starts
        for number, source in enumerate(self.annotations.sources):
            samples = int(self._offsets[starts[number + 1]] - self._offsets[starts[number]])
            counts[source.name] = counts.get(source.name, 0) + samples
        return counts

    def bad(self, i: int, reason: str, kind: str = "invalid") -> BadSampleError:
        """Error for sample ``i``: ``{pack file}:{group}: sample {position} of the group: {reason}``."""
        ref = self.refs[i]
        return BadSampleError(ref.annotation_path, ref.index, f"sample {ref.position} of the group: {reason}", kind)


def _group_stats(store: Any) -> tuple[np.ndarray, np.ndarray]:
    """(samples, rough length) of every group of a packed file's store, read once and cached next to it.

    Raises:
        ValueError: a row is not a non-empty list of samples (naming the file and the row).
    """
    sizes, rough = store.load_lengths("group-samples"), store.load_lengths("group-rough")
    if sizes is not None and rough is not None:
        return np.asarray(sizes), np.asarray(rough)
    sizes, rough = np.zeros(len(store), np.int64), np.zeros(len(store), np.int64)
    for row in range(len(store)):
        group = store[row]
        if not isinstance(group, list) or not group:
            found = "an empty list" if isinstance(group, list) else f"a {type(group).__name__}"
            raise ValueError(
                f"{store.source.location}:{row}: expected a group (a non-empty list of samples) but found {found}; "
                f"with --data_packing True, --dataset_use must name files written by tools/pack_data.py "
                f"(dataset {store.source.name!r})"
            )
        sizes[row] = len(group)
        rough[row] = sum(record_stats(sample)[4] for sample in group)
    store.save_lengths("group-rough", rough)
    store.save_lengths("group-samples", sizes)
    return sizes, rough


class _PackedSamples(Sequence):
    """``dataset.records[i]`` / ``dataset.refs[i]`` of a packed dataset, made on access."""

    def __init__(self, dataset: PackedSupervisedDataset, what: str):
        self._dataset, self._what = dataset, what

    def __len__(self) -> int:
        return int(self._dataset._offsets[-1])

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        return self._dataset.sample_record(i) if self._what == "record" else self._dataset.sample_ref(i)


class _GroupMembers(Sequence):
    """``dataset.groups[g]``: the sample indices of group ``g`` (a range)."""

    def __init__(self, offsets: np.ndarray):
        self._offsets = offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, g: int) -> range:  # type: ignore[override]
        if not 0 <= g < len(self):
            raise IndexError(f"group {g} out of range (0..{len(self) - 1})")
        return range(int(self._offsets[g]), int(self._offsets[g + 1]))


class OnlinePackedDataset(LazySupervisedDataset):
    """Any dataset packed when training starts (``--data_packing True`` on unpacked sources).

    Every sample's exact length comes from ``exact_lengths`` (cached counts); the samples are
    put into first-fit-decreasing bins of ``pack_length`` tokens, samples of equal length ordered
    by ``seed``, so every rank computes the same bins (checked across ranks when a process group
    is up). Item ``g`` is the list of bin ``g``'s sample items, which
    ``PackedDataCollatorForSupervisedDataset`` flattens into one row; every sample is in exactly one
    bin. Each epoch (``set_epoch``, called by ``qwenvl.train.trainer.EpochCallback``) reorders the
    samples of equal length by ``(seed, epoch)``: other rows of the same lengths, so the number of
    bins never changes; the Trainer's sampler shuffles the bins' order.

    Samples the count rejects weigh 0 in the bins: under ``skip`` loading them gives their
    ``Problem`` (reported as any skipped sample); under ``error`` the first one is raised here,
    before training starts, with its file, index and cause.

    Args:
        *args, **kwargs: as ``LazySupervisedDataset``.
        pack_length: bin capacity in tokens (None = ``model_max_length``).

    Raises:
        BadSampleError: under ``error``, a sample the dataset rejects.
        RuntimeError: the ranks computed different bins (their counts differ).
    """

    def __init__(self, *args: Any, pack_length: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pack_length = int(pack_length or self.model_max_length)
        counts = self.exact_lengths()
        if self.bad_sample_policy == "error":
            for i in counts.bad[:1]:
                self.load_sample(int(i))  # raises the sample's own error (file, index, cause)
        start = time.perf_counter()
        self.epoch = 0
        self.plan: PackPlan = cached_plan(counts.length, self.pack_length, self.seed, self.annotations.stores[0])
        self.groups = _BinMembers(self)  # bin -> sample indices (the guard names a bad step's samples)
        check_same_on_every_rank(self.plan.digest(), "the online packing bins")
        logger.info(
            "online packing: %d samples into %d bins of %d tokens, fill %.2f%% (%d real tokens), in %.2f s; "
            "%d truncated to model_max_length, %d longer than pack_length (alone in a bin), %d rejected by the "
            "count (skipped and reported when reached)",
            len(counts.length), len(self.plan), self.pack_length, 100 * self.plan.fill, int(self.plan.tokens.sum()),
            time.perf_counter() - start, counts.truncated, self.plan.oversize, len(counts.bad),
        )

    def __len__(self) -> int:
        return len(self.plan)

    def set_epoch(self, epoch: int) -> None:
        """Bins of ``epoch``: samples of equal length reordered by ``(seed, epoch)`` (epoch 0: by ``seed``).

        Called in every process before the epoch's DataLoader iterator (and its workers) starts; the
        plan is cached next to the store like the first one. With ``--dataloader_persistent_workers``
        the workers keep the bins they started with.

        Raises:
            RuntimeError: the new bins differ in number (cannot happen: only equal lengths trade places).
        """
        if epoch == self.epoch:
            return
        counts = self.exact_lengths()
        seed = self.seed if epoch == 0 else (self.seed, epoch)
        plan = cached_plan(counts.length, self.pack_length, seed, self.annotations.stores[0])
        if len(plan) != len(self.plan):
            raise RuntimeError(f"epoch {epoch}: {len(plan)} bins instead of {len(self.plan)}")
        self.plan, self.epoch = plan, epoch
        logger.info("online packing: bins of epoch %d", epoch)

    def __getitem__(self, g: int) -> list[dict[str, Any] | Problem]:
        """The items of bin ``g``, each as ``LazySupervisedDataset.load_sample`` builds it."""
        return [self.load_sample(i) for i in self.groups[g]]

    @property
    def lengths(self) -> list[int]:
        """Real tokens of every bin (``--train_sampling_strategy group_by_length`` groups bins)."""
        return np.maximum(self.plan.tokens, 1).tolist()

    def item_lengths(self) -> tuple[np.ndarray, bool]:
        """Real tokens of every bin, exact."""
        return self.plan.tokens, True


class _BinMembers(Sequence):
    """``dataset.groups[b]``: the sample indices of bin ``b`` of the dataset's current ``PackPlan``."""

    def __init__(self, dataset: OnlinePackedDataset):
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset.plan)

    def __getitem__(self, b: int) -> list[int]:  # type: ignore[override]
        if not 0 <= b < len(self):
            raise IndexError(f"bin {b} out of range (0..{len(self) - 1})")
        return self._dataset.plan.bin(b).tolist()


def check_same_on_every_rank(digest: str, what: str) -> None:
    """Raise on every rank when the ranks of the process group (if any) hold different ``digest`` values.

    Raises:
        RuntimeError: naming the ranks that disagree with rank 0.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    differ = [rank for rank, value in enumerate(digests) if value != digests[0]]
    if differ:
        raise RuntimeError(f"{what} differ between ranks (ranks {differ} disagree with rank 0): their token counts "
                           f"differ, e.g. a media file readable on one node only")
    logger.info("%s are the same on all %d ranks", what, len(digests))


@dataclass
class PackedDataCollatorForSupervisedDataset:
    """Flatten every sample of every group in the micro-batch into one row (``flatten_instances``).

    Items may be groups (lists of sample items, from ``PackedSupervisedDataset``)
    or single sample items (an unpacked eval set), so one collator serves both.
    ``Problem`` entries of skipped bad samples are dropped and reported by
    ``flatten_instances``.

    Example:
        >>> batch = PackedDataCollatorForSupervisedDataset()([[a, b], [c]])  # == flatten_instances([a, b, c])
        >>> batch["position_ids"].shape  # (4, 1, len(a) + len(b) + len(c))
    """

    pad_token_id: int = 0  # only fills the placeholder of an all-bad micro-batch

    def __call__(self, instances: Sequence[Any]) -> dict[str, torch.Tensor]:
        samples = [s for x in instances for s in (x if isinstance(x, list) else [x])]
        return flatten_instances(samples, self.pad_token_id)


def make_supervised_data_module(
    tokenizer: Any,
    data_args: Any,
    vision_config: VisionConfig,
    model_type: str | None = None,
    model_max_length: int = 512,
    seed: int = 42,
    tokens_per_second: float = 2,
    family: ModelFamily | None = None,
    vision_settings: VisionSettings | None = None,
    processor: Any = None,
) -> dict[str, Any]:
    """Train dataset, optional eval dataset and the collator the flags ask for.

    Args:
        tokenizer: the checkpoint's tokenizer.
        data_args: ``DataArguments``.
        vision_config: patch geometry and normalisation.
        model_type: resolved with ``family_for`` when ``family`` is None (``qwen2_5_vl`` when both are None).
        model_max_length: ``--model_max_length``.
        seed: seeds the ``%N`` subsets.
        tokens_per_second: the vision config's (Qwen2.5-VL video positions).
        family: the checkpoint's ``ModelFamily`` (``family_for(model.config)``).
        vision_settings: the checkpoint's ``VisionSettings`` (``family.vision_settings(path)``).
        processor: the checkpoint's ``AutoProcessor`` (HF-processor families only).

    Returns:
        ``{"train_dataset", "eval_dataset", "data_collator"}`` for ``Trainer(**module)``.
    """
    family = resolve_family(family, model_type)
    common = dict(
        tokenizer=tokenizer, data_args=data_args, vision_config=vision_config, family=family,
        model_max_length=model_max_length, seed=seed, tokens_per_second=tokens_per_second,
        vision_settings=vision_settings, processor=processor,
    )
    policy = getattr(data_args, "bad_sample_policy", "error")  # --bad_sample_policy (default skip)
    packing = getattr(data_args, "data_packing", False)
    if not packing:
        train_dataset: Dataset = LazySupervisedDataset(**common, bad_sample_policy=policy)
    elif offline_packed(data_args.dataset_use):  # files from tools/pack_data.py: their groups as written
        train_dataset = PackedSupervisedDataset(**common, bad_sample_policy=policy)
    else:  # packed now, from the cached exact counts
        train_dataset = OnlinePackedDataset(**common, bad_sample_policy=policy,
                                            pack_length=getattr(data_args, "pack_length", None))
    eval_use = getattr(data_args, "eval_dataset_use", None)
    eval_dataset = LazySupervisedDataset(**common, dataset_use=eval_use, bad_sample_policy=policy) if eval_use else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    flatten = getattr(data_args, "data_flatten", False) or packing
    collator_cls: type = FlattenedDataCollatorForSupervisedDataset if flatten else DataCollatorForSupervisedDataset
    if packing:  # items are groups (offline or online bins): flattens each group's samples
        collator_cls = PackedDataCollatorForSupervisedDataset
    if family.uses_processor_items:  # 1-D families: padded batches only (preflight refuses flattening/packing)
        if flatten:
            raise ValueError(f"--data_flatten / --data_packing: not supported for the {family.model_type} family: "
                             f"{family.flatten_refusal}")
        collator = ProcessorDataCollator(pad_id, family)
        return {"train_dataset": train_dataset, "eval_dataset": eval_dataset, "data_collator": collator}
    return {"train_dataset": train_dataset, "eval_dataset": eval_dataset, "data_collator": collator_cls(pad_id)}
