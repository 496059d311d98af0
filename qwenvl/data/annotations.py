"""Annotation store: a source's records converted once into a memory-mapped Arrow file.

Every rank and DataLoader worker of a node maps the same file, so the records live once in
the OS page cache instead of once per process as Python objects (about 2.7 KB per sample).
The file is built by one process per node (a file lock; the others wait) and published when
complete: written aside, synced, its ``.meta`` (row count, byte size) renamed into place before
it, so a process killed while converting leaves a temporary that is never read (and is removed by
the next build) and a store whose size is not its ``.meta``'s is rebuilt. It is rebuilt when the
content of the source's files, the column mapping or this code change, and the build then removes
the older stores of the same source (``remove_stale_stores``) unless a running process still reads
them.

The store is keyed on the files' content (sha256). Hashing a large file at every start would
cost seconds, so ``{name}-{identity}.files.json`` keeps each file's hash with its stat signature
(size, mtime, ctime, inode, device): while the signature is unchanged the hash is reused. A file
edited and given its old mtime back (``os.utime``) still has a new ctime, which no user can set,
so it is hashed again and seen; a ``touch`` or a copy of the same bytes is hashed again and finds
its store (no conversion).

Layout of ``{cache_dir}/{name}-{key}.arrow`` (Arrow IPC stream, readable with
``datasets.Dataset.from_file``), one row per sample in source order:

============== ============== ====================================================
column         type           content
============== ============== ====================================================
record         large_binary   the record as UTF-8 JSON text (a JSONL line as written)
media          list<binary>   inline image bytes of mapped Hugging Face rows, else null
bad            bool           the row is a problem (a JSONL line that does not parse, ...)
num_images     int32          ``len(sample_images(record))``
num_videos     int32          ``len(sample_videos(record))``
text_chars     int64          characters in the turns' text
text_words     int32          whitespace-separated words in the turns' text
rough_length   int64          words + 256 per image + 512 per video (1 without turns)
============== ============== ====================================================

One JSON column rather than a nested Arrow schema: records differ in shape (``image`` a
string or a list, ``from``/``value`` or ``role``/``content``, extra keys), and reading one
row back is faster as ``json.loads`` of its bytes than as a nested Arrow row (``bench/annotations.py``
measures both).

Example:
    >>> store = open_store(resolve_source("demo/text_only.jsonl"))
    >>> len(store), store[0]["conversations"][1]["value"]
    (8, 'Green.')
"""

from __future__ import annotations

import bisect
import codecs
import glob
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

try:
    import fcntl

    _SHARED, _EXCLUSIVE_NOW = fcntl.LOCK_SH, fcntl.LOCK_EX | fcntl.LOCK_NB
except ImportError:  # not a Unix system: stale stores are removed without the in-use check
    fcntl = None
    _SHARED = _EXCLUSIVE_NOW = 0

from qwenvl.data.chat import (
    BadRecord,
    SampleRef,
    iter_jsonl,
    jsonl_bad_record,
    jsonl_line_error,
    load_annotations,
    sample_images,
    sample_indices,
    sample_videos,
)
from qwenvl.data.sources import (
    IMAGES_LEFT_OUT,
    RowError,
    Source,
    SourceError,
    data_uri,
    iter_batches,
    make_record,
    resolve_mapping,
    resolve_sources,
    source_columns,
)
from qwenvl.data.vision import media_file_problem

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the layout changes (the code hash below catches the rest)
CACHE_ENV = "QWENVL_ANNOTATION_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "qwenvl", "annotations")
ROWS_PER_BATCH = 8192
_INLINE = "$inline"  # placeholder {"$inline": k} for the k-th inline image of a row (bytes in ``media``)
_WS = re.compile(r"[ \t\n\r]*")
_CODE_FILES = ("annotations.py", "sources.py", "chat.py")  # chat.py: JSONL lines, media counts
_KEY_CHARS = 24  # hex characters of cache_key
# A signature recorded less than this after its file last changed is not trusted (the file hashed
# again): a change in the same timestamp tick as the recorded one would keep mtime and ctime.
_RACY_NS = 2_000_000_000


def default_cache_dir() -> str:
    """``$QWENVL_ANNOTATION_CACHE``, else ``~/.cache/qwenvl/annotations``."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


# ------------------------------------------------------------------ cache key
def file_signature(path: str) -> list[int]:
    """What changes whenever a file's content may have: [size, mtime_ns, ctime_ns, inode, device].

    ``ctime`` is set by the kernel at every write and at every ``os.utime``: an edit whose old mtime
    was put back still changes it.
    """
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def content_hash(path: str) -> str:
    """sha256 of a file's bytes, hex (about 1.3 GB/s).

    Example:
        >>> len(content_hash("demo/text_only.jsonl"))
        64
    """
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _code_hash() -> str:
    digest = hashlib.sha256(str(FORMAT_VERSION).encode())
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _CODE_FILES:
        with open(os.path.join(here, name), "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


def _identity(source: Source) -> dict[str, Any]:
    """What names a source regardless of its files' content: kind, location, split and mapping."""
    return {
        "kind": source.kind,
        "location": source.location if source.kind == "hub" else os.path.abspath(source.location),
        "split": source.split,
        "columns": sorted(source.columns.items()),
        "system_prompt": source.system_prompt,
        **({"template": source.template} if source.template is not None else {}),
    }


def source_identity(source: Source) -> str:
    """Hex id of a source that survives changes of its files and of this code (recorded in a store's ``.meta``).

    Stores with the same identity and another ``cache_key`` are older versions of the same
    records: ``remove_stale_stores`` deletes them. A changed mapping is another identity: two
    registry entries may read one file with two mappings in the same run.
    """
    return hashlib.sha256(json.dumps(_identity(source), sort_keys=True).encode()).hexdigest()[:24]


def cache_key(source: Source, cache_dir: str | None = None) -> str:
    """Hex key of a source's store: its files' content hashes, kind, location, split, mapping and this code.

    ``%N`` and the name are not part of it: the store holds every record, and subsets are
    taken when it is opened. The hashes come from ``file_hashes`` (reused while the files'
    signatures are unchanged).
    """
    files = [os.path.abspath(f) for f in source.files]
    material = {
        "code": _code_hash(),
        **_identity(source),
        "files": [[f, h] for f, h in zip(files, file_hashes(source, cache_dir or default_cache_dir()))],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:_KEY_CHARS]


def store_path(source: Source, cache_dir: str | None = None) -> str:
    """Where the store of ``source`` lives: ``{cache_dir}/{readable name}-{cache_key}.arrow``."""
    cache_dir = cache_dir or default_cache_dir()
    return os.path.join(cache_dir, f"{_readable(source)}-{cache_key(source, cache_dir)}.arrow")


def hashes_path(source: Source, cache_dir: str) -> str:
    """Where the content hashes of ``source``'s files are kept with their signatures (``file_hashes``)."""
    return os.path.join(cache_dir, f"{_readable(source)}-{source_identity(source)}.files.json")


def file_hashes(source: Source, cache_dir: str) -> list[str]:
    """The content hash of each of ``source``'s files, reused from ``hashes_path`` while their signatures hold.

    A recorded hash is reused when the file's ``file_signature`` is the recorded one and the file
    had last changed at least 2 s before that signature was taken (else a change within the same
    timestamp tick could go unseen). Otherwise the files are hashed again, by one process per cache
    folder (a file lock; a process killed while hashing leaves a lock the kernel has released), and
    the record is replaced atomically.

    Returns:
        hex sha256 per file, in ``source.files`` order.
    """
    from filelock import FileLock

    files = [os.path.abspath(f) for f in source.files]
    path = hashes_path(source, cache_dir)
    hashes = _recorded_hashes(path, files)
    if hashes is not None:
        return hashes
    os.makedirs(cache_dir, exist_ok=True)
    with FileLock(path + ".lock"):
        hashes = _recorded_hashes(path, files)  # another process may have hashed them meanwhile
        if hashes is not None:
            return hashes
        for leftover in glob.glob(glob.escape(path) + ".tmp-*"):  # of a killed process: none is written now
            _remove_file(leftover)
        checked_ns = time.time_ns()
        signatures = [file_signature(f) for f in files]  # before reading: a later change alters them
        hashes = [content_hash(f) for f in files]
        record = {"checked_ns": checked_ns, "files": [[f, *sig, h] for f, sig, h in zip(files, signatures, hashes)]}
        _publish_json(path, record)
    return hashes


def _recorded_hashes(path: str, files: list[str]) -> list[str] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
        entries = {entry[0]: entry for entry in record["files"]}
        hashes = []
        for file in files:
            entry = entries[file]
            signature = file_signature(file)
            if entry[1:6] != signature or max(signature[1], signature[2]) > record["checked_ns"] - _RACY_NS:
                return None
            hashes.append(entry[6])
        return hashes
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _publish_json(path: str, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` atomically: a temporary of this process, synced, then renamed over it."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        _remove_file(temporary)


def _sync_dir(directory: str) -> None:
    """Make the renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _readable(source: Source) -> str:
    return re.sub(r"[^\w.-]+", "_", os.path.basename(source.location.rstrip("/")) or source.name)[:60]


# ------------------------------------------------------------------ record statistics
def record_stats(record: Any) -> tuple[int, int, int, int, int]:
    """(num_images, num_videos, text_chars, text_words, rough_length) of one record.

    ``rough_length`` is the rule ``LazySupervisedDataset.lengths`` uses: words in the turns
    plus 256 per image and 512 per video, 1 for a record without a list of turns.

    Example:
        >>> record_stats({"image": "a.jpg", "conversations": [{"from": "human", "value": "<image> hi there"},
        ...               {"from": "gpt", "value": "yo"}]})
        (1, 0, 18, 4, 260)
    """
    if not isinstance(record, dict):
        return 0, 0, 0, 0, 1
    images, videos = len(sample_images(record)), len(sample_videos(record))
    turns = record.get("conversations")
    if not isinstance(turns, list):
        return images, videos, 0, 0, 1
    texts = [str(t.get("value", t.get("content", ""))) for t in turns if isinstance(t, dict)]
    words = sum(len(text.split()) for text in texts)
    return images, videos, sum(len(text) for text in texts), words, words + 256 * images + 512 * videos


# ------------------------------------------------------------------ conversion
class _Writer:
    """Accumulates rows and writes them as Arrow record batches of ``ROWS_PER_BATCH``."""

    def __init__(self, path: str, metadata: dict[str, str]):
        import pyarrow as pa

        self.pa = pa
        self.schema = pa.schema([
            ("record", pa.large_binary()), ("media", pa.list_(pa.large_binary())), ("bad", pa.bool_()),
            ("num_images", pa.int32()), ("num_videos", pa.int32()), ("text_chars", pa.int64()),
            ("text_words", pa.int32()), ("rough_length", pa.int64()),
        ], metadata=metadata)
        self.sink = pa.OSFile(path, "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.columns: list[list] = [[] for _ in self.schema.names]
        self.rows = 0
        self.bad_rows: list[int] = []
        self.num_bad = 0
        self.any_media = False
        self.images_left_out = 0  # rows whose images gave way to their video (``sources.media_slot``)

    def note(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` without ``make_record``'s note, which is counted."""
        if record.pop(IMAGES_LEFT_OUT, 0):
            self.images_left_out += 1
        return record

    def add(self, text: bytes, record: Any, media: list[bytes] | None = None) -> None:
        stats = record_stats(record)
        for column, value in zip(self.columns, (text, media, False, *stats)):
            column.append(value)
        self.any_media = self.any_media or bool(media)
        self._advance()

    def add_bad(self, problem: dict[str, Any]) -> None:
        for column, value in zip(self.columns, (json.dumps({"$bad": problem}).encode(), None, True, 0, 0, 0, 0, 1)):
            column.append(value)
        if len(self.bad_rows) < 1000:
            self.bad_rows.append(self.rows)
        self.num_bad += 1
        self._advance()

    def _advance(self) -> None:
        self.rows += 1
        if len(self.columns[0]) >= ROWS_PER_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.columns[0]:
            arrays = [self.pa.array(column, type=f.type) for column, f in zip(self.columns, self.schema)]
            self.writer.write_batch(self.pa.record_batch(arrays, schema=self.schema))
            self.columns = [[] for _ in self.schema.names]

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self.sink.flush()
        os.fsync(self.sink.fileno())
        self.sink.close()


def _dumps(record: Any) -> bytes:
    try:
        return json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: keep it as a \\u escape, as in the source file
        return json.dumps(record).encode("utf-8")


def _split_inline(record: dict[str, Any]) -> tuple[dict[str, Any], list[bytes] | None]:
    """Move inline image bytes out of a mapped record into a list; ``{"$inline": k}`` marks their places."""
    media: list[bytes] = []

    def out(value: Any) -> Any:
        if isinstance(value, bytes):
            media.append(value)
            return {_INLINE: len(media) - 1}
        return value

    for key in ("image", "images"):
        if key in record:
            value = record[key]
            record[key] = [out(v) for v in value] if isinstance(value, list) else out(value)
    return record, media or None


class _Fallback(Exception):
    """The streaming JSON reader met something unusual; ``load_annotations`` decides (and words the error)."""


def _iter_json_list(path: str, chunk_bytes: int = 1 << 24) -> Iterator[tuple[bytes, Any]]:
    """(element text, element) of a JSON list, holding only ``chunk_bytes`` of text and one element at a time.

    Raises:
        _Fallback: not a list, broken JSON or UTF-8, trailing data: the caller lets
            ``load_annotations`` read the file (it raises the usual error, or handles the case).
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as handle:
        state = {"buf": "", "eof": False}

        def more(keep_from: int) -> None:
            data = handle.read(chunk_bytes)
            try:
                text = utf8.decode(data, final=not data)
            except UnicodeDecodeError:
                raise _Fallback from None
            state["buf"] = state["buf"][keep_from:] + text
            state["eof"] = not data

        def skip_ws(pos: int) -> int:
            while True:
                pos = _WS.match(state["buf"], pos).end()
                if pos < len(state["buf"]) or state["eof"]:
                    return pos
                more(pos)
                pos = 0

        more(0)
        if state["buf"].startswith("\ufeff"):
            state["buf"] = state["buf"][1:]
        pos = skip_ws(0)
        if state["buf"][pos:pos + 1] != "[":
            raise _Fallback  # one object, not JSON, or empty
        pos = skip_ws(pos + 1)
        if state["buf"][pos:pos + 1] == "]":
            raise _Fallback  # an empty list: load_annotations says so
        while True:
            try:
                element, end = decoder.raw_decode(state["buf"], pos)
                if end >= len(state["buf"]) and not state["eof"]:  # a number cut at the chunk's end?
                    raise json.JSONDecodeError("incomplete", state["buf"], end)
            except json.JSONDecodeError:
                if state["eof"]:
                    raise _Fallback from None
                more(pos)
                pos = 0
                continue
            yield state["buf"][pos:end].encode("utf-8"), element
            after = skip_ws(end)
            char = state["buf"][after:after + 1]
            if char == "]":
                if skip_ws(after + 1) < len(state["buf"]):
                    raise _Fallback  # data after the list
                return
            if char != ",":
                raise _Fallback
            pos = skip_ws(after + 1)
            if state["buf"][pos:pos + 1] in ("]", ""):
                raise _Fallback  # a trailing comma


class _Adder:
    """Adds records of a JSON source to a writer: as written, or through the source's column mapping.

    JSON records differ in their keys, so a mapping is resolved as if its columns existed and
    checked at the end (``finish``): a mapped key that no record has is an error.
    """

    def __init__(self, source: Source, writer: _Writer):
        self.source, self.writer = source, writer
        self.mapping = None
        self.keys: set[str] = set()

    def __call__(self, text: bytes | None, record: Any) -> None:
        if not self.source.mapped or not isinstance(record, dict):
            self.writer.add(text if text is not None else _dumps(record), record)
            return
        self.keys.update(record)
        if self.mapping is None:
            self.mapping = resolve_mapping(self.source, list(dict.fromkeys([*record, *self.source.columns.values()])))
        try:
            record, media = _split_inline(self.writer.note(make_record(record, self.mapping)))
        except RowError as exc:
            self.writer.add_bad({"reason": exc.reason, "kind": exc.kind})
            return
        self.writer.add(_dumps(record), record, media)

    def finish(self) -> None:
        """Raise ``resolve_mapping``'s error for a mapped key that no record has (the message lists the keys seen)."""
        if self.mapping is not None:
            resolve_mapping(self.source, sorted(self.keys))


class _Restart(Exception):
    """The streaming reader gave up on a file that ``load_annotations`` reads: convert these records instead."""

    def __init__(self, records: list):
        super().__init__("restart")
        self.records = records


def _convert_json(source: Source, writer: _Writer) -> None:
    path = source.location
    missing = media_file_problem(path, "annotation")
    if missing is not None:
        raise ValueError(missing)
    add = _Adder(source, writer)
    if source.kind == "jsonl":
        for line_no, raw, record, detail in iter_jsonl(path):
            if detail is None:
                add(raw, record)
            else:
                bad = jsonl_bad_record(line_no, detail)
                writer.add_bad({"reason": bad.reason, "kind": bad.kind, "line": line_no, "detail": detail})
        if not writer.rows:
            load_annotations(path, bad_lines="keep")  # raises "the annotation file is empty"
        add.finish()
        return
    try:
        for text, record in _iter_json_list(path):
            add(text, record)
        add.finish()
    except _Fallback:
        # load_annotations raises the error, worded as before; or reads a case the stream reader leaves to it
        raise _Restart(load_annotations(path, bad_lines="keep")) from None


def _convert_hf(source: Source, writer: _Writer) -> None:
    mapping = resolve_mapping(source, source_columns(source))
    for rows in iter_batches(source):
        for row in rows:
            try:
                record, media = _split_inline(writer.note(make_record(row, mapping)))
            except RowError as exc:
                writer.add_bad({"reason": exc.reason, "kind": exc.kind})
                continue
            writer.add(_dumps(record), record, media)


def build_store(source: Source, path: str) -> None:
    """Convert every record of ``source`` into the Arrow file ``path``, published atomically.

    Written into ``{path}.tmp-{pid}`` and synced; then the ``.meta`` (rows, byte size, identity) is
    renamed into place, then the store: a kill at any point leaves either no store or a whole one
    (``store_complete``), never a partial file under the store's name.

    A JSON list is read as a stream (one element at a time); a JSON file that is one object
    (or that the stream reader does not follow) is read whole by ``load_annotations``.

    Raises:
        ValueError: the annotation file's errors, as ``load_annotations`` words them.
        SourceError: a bad Hugging Face source or column mapping.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    metadata = {"source": source.location, "kind": source.kind, "split": str(source.split),
                "columns": json.dumps(source.columns), "format_version": str(FORMAT_VERSION)}
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        writer = _Writer(temporary, metadata)
        try:
            if source.kind in ("json", "jsonl"):
                _convert_json(source, writer)
            else:
                _convert_hf(source, writer)
        except _Restart as restart:
            writer.close()
            writer = _Writer(temporary, metadata)
            add = _Adder(source, writer)
            for record in restart.records:
                add(None, record)
            add.finish()
        writer.close()
        if writer.rows == 0:
            raise SourceError(f"{source.describe()}: the dataset holds no samples")
        meta = {"rows": writer.rows, "bytes": os.path.getsize(temporary), "num_bad": writer.num_bad,
                "bad_rows": writer.bad_rows, "any_media": writer.any_media, "identity": source_identity(source),
                "images_left_out": writer.images_left_out}
        if writer.images_left_out:
            logger.warning("%s: %d row(s) hold images and a video but message_format has one media part: each "
                           "trains on its video (data_processing with both modalities on: video takes precedence); "
                           "their images are left out", source.describe(), writer.images_left_out)
        _publish_json(path + ".meta", meta)  # before the store: a store never lacks its .meta
        os.replace(temporary, path)
        _sync_dir(os.path.dirname(path) or ".")
    finally:
        _remove_file(temporary)


def store_complete(path: str) -> bool:
    """Whether ``path`` is a whole store: its ``.meta`` parses and records the file's byte size.

    A store cut short (a copy that stopped, a disk that filled, a crash before the data reached
    the disk) fails this and is rebuilt instead of read.
    """
    try:
        with open(path + ".meta", encoding="utf-8") as handle:
            meta = json.load(handle)
        return isinstance(meta, dict) and meta.get("bytes") == os.path.getsize(path)
    except (OSError, ValueError):
        return False


def open_store(source: Source, cache_dir: str | None = None) -> "AnnotationStore":
    """The store of ``source``, built first if no valid one is cached (one process per cache folder builds).

    After a build, the older stores of the same source are removed (``remove_stale_stores``).

    Args:
        source: from ``sources.resolve_source``.
        cache_dir: where stores live; ``default_cache_dir()`` when None.

    Returns:
        the opened, memory-mapped store.

    Raises:
        ValueError: the annotation file cannot be read (``load_annotations``'s messages).
        SourceError: a bad Hugging Face source or column mapping (named, with the columns that exist).
    """
    for _ in range(2):
        try:
            return AnnotationStore(_built_store(source, cache_dir), source)
        except FileNotFoundError:
            # Removed between the check and the open: the source's files changed since its key was
            # computed, and another process built the new store and cleaned up. Look again.
            continue
    return AnnotationStore(_built_store(source, cache_dir), source)


def _built_store(source: Source, cache_dir: str | None) -> str:
    """The path of the store of ``source`` as its files are now, built (and older ones removed) if absent."""
    from filelock import FileLock, Timeout

    path = store_path(source, cache_dir)
    if store_complete(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = FileLock(path + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process to convert %s into %s", source.describe(), path)
        lock.acquire()
    try:
        if not store_complete(path):
            if os.path.exists(path):
                logger.warning("%s is not a whole store (its size is not the one its .meta records): rebuilding it",
                               path)
            logger.info("converting %s into %s (once; later runs reuse it)", source.describe(), path)
            build_store(source, path)
            try:
                remove_stale_stores(source, path)
            except OSError as exc:  # a cleanup that fails must not fail the run
                logger.warning("could not remove the older stores of %s: %s", source.describe(), exc)
    finally:
        lock.release()
    return path


# ------------------------------------------------------------------ stale stores
def _flock(handle: Any, operation: int) -> bool | None:
    """``fcntl.flock``: True when taken, False when another open file holds it (``LOCK_NB``), None without flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(handle.fileno(), operation)
        return True
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock (some network mounts)
        return None


def remove_stale_stores(source: Source, path: str) -> list[str]:
    """Delete the older stores of ``source`` next to its store ``path``; call with ``path``'s build lock held.

    A store is older when its ``.meta`` records the same ``source_identity`` under another key (the
    files or this code changed since). Its files go: the ``.arrow``, ``.meta``, the ``save_lengths``
    arrays (``<store>.<name>.npy``), leftovers of killed builds, and its ``.lock`` when that lock can
    be taken. Also removed: this key's leftover temporaries of killed builds (the lock held by the
    caller means no other process is writing one). Stores of other sources, stores written before
    identities were recorded, and stores some live process has open are kept.

    Every ``AnnotationStore`` holds a shared ``flock`` on its file while it lives, so a store still
    read by a running job (whose DataLoader workers may open it again by path) is left for a later
    build. Where the file system has no ``flock``, stores are removed anyway: on Linux, removing a
    file only drops its name; a process that has it memory-mapped keeps reading valid pages until
    it unmaps it.

    Args:
        source: the source whose store was just built.
        path: that store.

    Returns:
        the paths removed.
    """
    directory, name = os.path.split(path)
    identity = source_identity(source)
    store_name = re.compile(re.escape(_readable(source)) + r"-[0-9a-f]{%d}\.arrow" % _KEY_CHARS)
    names = sorted(os.listdir(directory))
    removed = [os.path.join(directory, n) for n in names if n.startswith((f"{name}.tmp-", f"{name}.meta.tmp-"))]
    for leftover in removed:
        _remove_file(leftover)
    for other in names:
        if other == name or not store_name.fullmatch(other):
            continue
        try:
            with open(os.path.join(directory, other + ".meta"), encoding="utf-8") as handle:
                if json.load(handle).get("identity") != identity:
                    continue  # another source whose file has the same name, or a store from before identities
        except (OSError, ValueError):
            continue
        removed += _remove_store(directory, other, names)
    if removed:
        logger.info("removed %d files of older stores of %s from %s", len(removed), source.describe(), directory)
    return removed


def _remove_store(directory: str, name: str, names: list[str]) -> list[str]:
    """Remove store ``name`` and its side files unless a process is building or reading it; the paths removed."""
    store = os.path.join(directory, name)
    stem = name[:-len(".arrow")]
    # Opened for writing: on NFS, flock is emulated with POSIX locks and an exclusive one needs a writable file.
    try:
        lock = open(store + ".lock", "r+b")
    except FileNotFoundError:
        lock = None
    except PermissionError:
        return []  # another user's store: not ours to check or remove
    try:
        locked = _flock(lock, _EXCLUSIVE_NOW) if lock is not None else None
        if locked is False:
            return []  # a process is building or checking it
        try:
            handle = open(store, "r+b")
        except FileNotFoundError:
            return []  # another process removed it first
        except PermissionError:
            return []
        with handle:
            if _flock(handle, _EXCLUSIVE_NOW) is False:
                logger.info("keeping %s: a running process reads it", store)
                return []
            # The store first: open_store checks its name. Readers waiting for a shared lock see the
            # file unlinked (st_nlink 0) once this lock is released and look for the new store.
            removed = [store] + [os.path.join(directory, n) for n in names
                                 if n.startswith(f"{stem}.") and n != name and n != f"{name}.lock"]
            for file in removed:
                _remove_file(file)
        if locked:  # held by us: no process builds this key now (a waiter on the old inode at worst
            # builds it once more, into its own temporary renamed into place: nothing is corrupted)
            _remove_file(store + ".lock")
            removed.append(store + ".lock")
        return removed
    finally:
        if lock is not None:
            lock.close()


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------ reading
class AnnotationStore:
    """Read-only, memory-mapped records of one source; ``store[i]`` parses record ``i`` on demand.

    Picklable (it pickles as its path), so spawned DataLoader workers map the same file.

    Attributes:
        source: what the records came from.
        path: the Arrow file.
        num_bad: rows that are problems (``store[i]`` is a ``BadRecord`` for them).
        bad_rows: the first 1000 of those rows.
    """

    def __init__(self, path: str, source: Source):
        self.path, self.source = path, source
        self._open()

    def _open(self) -> None:
        import pyarrow as pa

        # A shared lock for the store's lifetime: remove_stale_stores leaves a store that is read.
        handle = open(self.path, "rb")
        if _flock(handle, _SHARED) and os.fstat(handle.fileno()).st_nlink == 0:
            handle.close()  # removed as stale while this process waited for the lock
            raise FileNotFoundError(f"{self.path}: removed as an older store of {self.source.describe()}")
        self._handle = handle
        self._mmap = pa.memory_map(self.path)
        self.table = pa.ipc.open_stream(self._mmap).read_all()  # zero-copy views into the mapping
        meta_path = self.path + ".meta"
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
        if self.table.num_rows != meta["rows"]:
            raise ValueError(f"{self.path}: {self.table.num_rows} rows, its .meta records {meta['rows']}: a damaged "
                             "store; delete it and its .meta to rebuild it")
        self.num_bad, self.bad_rows, self.any_media = meta["num_bad"], meta["bad_rows"], meta["any_media"]
        self.images_left_out = int(meta.get("images_left_out", 0))  # rows that train on their video only
        self._chunks = []  # per record batch: (offsets (n+1,) int64, data bytes)
        starts = [0]
        for chunk in self.table.column("record").chunks:
            _, offsets, data = chunk.buffers()
            offsets = np.frombuffer(offsets, dtype=np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
            self._chunks.append((offsets, memoryview(data)))
            starts.append(starts[-1] + len(chunk))
        self._starts = starts
        self._bad = self._media = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.source = state["path"], state["source"]
        self._open()

    def __len__(self) -> int:
        return self.table.num_rows

    def raw(self, i: int) -> bytes:
        """Row ``i``'s record as stored (UTF-8 JSON text)."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.source.describe()}: index {i} out of range (0..{len(self) - 1})")
        chunk = bisect.bisect_right(self._starts, i) - 1
        offsets, data = self._chunks[chunk]
        j = i - self._starts[chunk]
        return bytes(data[offsets[j]:offsets[j + 1]])

    def is_bad(self, i: int) -> bool:
        """Whether row ``i`` is a problem row."""
        if not self.num_bad:
            return False
        if self._bad is None:
            self._bad = self.table.column("bad").to_numpy()
        return bool(self._bad[i])

    def __getitem__(self, i: int) -> Any:
        """Record ``i`` as ``load_annotations`` would give it (a ``BadRecord`` for a problem row)."""
        record = json.loads(self.raw(i))
        if self.is_bad(i):
            problem = record["$bad"]
            return BadRecord(problem["reason"], problem["kind"])
        if self.any_media and isinstance(record, dict):
            media = self.table.column("media")[i].as_py()
            if media:
                for key in ("image", "images"):
                    value = record.get(key)
                    if isinstance(value, list):
                        record[key] = [_inline(v, media) for v in value]
                    elif value is not None:
                        record[key] = _inline(value, media)
        return record

    def column(self, name: str) -> np.ndarray:
        """A numeric column (``num_images``, ``num_videos``, ``text_chars``, ``text_words``, ``rough_length``)."""
        return self.table.column(name).to_numpy()

    def check_bad_lines(self) -> None:
        """Raise the error ``load_annotations(bad_lines="raise")`` raises for the first bad JSONL line, if any.

        Raises:
            ValueError: ``"{path}:{line}: invalid JSON line: {detail}"``.
        """
        for row in self.bad_rows:
            problem = json.loads(self.raw(row))["$bad"]
            if problem.get("kind") == "bad_json":
                raise jsonl_line_error(self.source.location, problem["line"], problem["detail"])

    # ---- exact lengths: a hook for token counts computed elsewhere (token_count.TokenCounter)
    def lengths_path(self, name: str) -> str:
        """Where a per-row array called ``name`` (e.g. ``tokens-{hash of tokenizer and vision settings}``) is kept."""
        safe = re.sub(r"[^\w.-]+", "_", name)
        return f"{self.path[:-len('.arrow')]}.{safe}.npy"

    def save_lengths(self, name: str, values: Sequence[int] | np.ndarray) -> None:
        """Store one int per row (e.g. exact token counts) next to the store, atomically.

        Raises:
            ValueError: ``values`` does not have one entry per row.
        """
        array = np.asarray(values, dtype=np.int64)
        if array.shape != (len(self),):
            raise ValueError(f"save_lengths: expected {len(self)} values, got shape {array.shape}")
        temporary = f"{self.lengths_path(name)}.tmp-{os.getpid()}.npy"
        try:
            with open(temporary, "wb") as handle:
                np.save(handle, array)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.lengths_path(name))  # a reader sees the old array or the whole new one
        finally:
            _remove_file(temporary)

    def load_lengths(self, name: str) -> np.ndarray | None:
        """The array ``save_lengths(name, ...)`` stored (memory-mapped), or None."""
        path = self.lengths_path(name)
        return np.load(path, mmap_mode="r") if os.path.exists(path) else None


def _inline(value: Any, media: list[bytes]) -> Any:
    if isinstance(value, dict) and _INLINE in value:
        return data_uri(media[value[_INLINE]])
    return value


# ------------------------------------------------------------------ several sources
class AnnotationSet:
    """The kept samples of every ``--dataset_use`` source, in order; a drop-in for the record list and refs.

    ``annotations[i]`` is a record, ``annotations.refs[i]`` its ``SampleRef``; nothing per
    sample is held in Python (the ``%N`` subsets are int64 arrays).

    Args:
        dataset_use: the flag's value (``"a%50,b.jsonl"``) or a list of entries.
        seed: seeds ``%N`` exactly as ``sample_indices`` does.
        bad_lines: ``"raise"`` (a JSONL line that does not parse is an error, naming file:line)
            or ``"keep"`` (it becomes a ``BadRecord``, reported when the sample is loaded).
        cache_dir: where stores live (``default_cache_dir()`` when None).

    Raises:
        SourceError, ValueError: as ``resolve_sources`` and ``open_store``.

    Example:
        >>> annotations = AnnotationSet("demo_text_only%50", seed=42)
        >>> len(annotations), annotations.refs[0].dataset
        (4, 'demo_text_only')
    """

    def __init__(self, dataset_use: str | list[str], seed: int, bad_lines: str = "raise",
                 cache_dir: str | None = None, registry: dict[str, dict] | None = None):
        if bad_lines not in ("raise", "keep"):
            raise ValueError(f"bad_lines should be one of 'raise' or 'keep' but found {bad_lines!r}")
        self.sources = resolve_sources(dataset_use, registry)
        self.stores: list[AnnotationStore] = []
        self.kept: list[np.ndarray | None] = []  # None: every row
        counts = [0]
        for source in self.sources:
            store = open_store(source, cache_dir)
            if bad_lines == "raise":
                store.check_bad_lines()
            kept = None
            if source.sampling_rate < 1.0:
                kept = np.asarray(sample_indices(len(store), source.sampling_rate, seed, source.name), dtype=np.int64)
            self.stores.append(store)
            self.kept.append(kept)
            size = len(store) if kept is None else len(kept)
            counts.append(counts[-1] + size)
            logger.info("dataset %s: %d of %d samples (%s)", source.name, size, len(store), source.location)
            if store.images_left_out:
                logger.warning("dataset %s: %d row(s) train on their video, their images left out (message_format "
                               "has one media part; both modalities on: video takes precedence)", source.name,
                               store.images_left_out)
        self._starts = counts
        if counts[-1] == 0:
            raise SourceError(f"--dataset_use {dataset_use} holds no samples")
        self.refs = _Refs(self)

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(source number, row in that source's store) of sample ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range (0..{len(self) - 1})")
        number = bisect.bisect_right(self._starts, i) - 1
        offset = i - self._starts[number]
        kept = self.kept[number]
        return number, int(kept[offset]) if kept is not None else offset

    def __getitem__(self, i: int) -> Any:
        number, row = self.locate(i)
        return self.stores[number][row]

    def samples_per_dataset(self) -> dict[str, int]:
        """Kept samples per dataset name, without making a ``SampleRef`` per sample (``bad_samples`` counts)."""
        counts: dict[str, int] = {}
        for number, source in enumerate(self.sources):
            counts[source.name] = counts.get(source.name, 0) + self._starts[number + 1] - self._starts[number]
        return counts

    def ref(self, i: int) -> SampleRef:
        """Where sample ``i`` comes from: dataset name, annotation path, media folder, row in the source."""
        number, row = self.locate(i)
        source = self.sources[number]
        return SampleRef(source.name, source.location, source.data_path, row)

    def rough_lengths(self) -> np.ndarray:
        """(len(self),) int64: ``LazySupervisedDataset.lengths``'s rough length of every kept sample, no item built."""
        parts = []
        for store, kept in zip(self.stores, self.kept):
            column = store.column("rough_length")
            parts.append(column if kept is None else column[kept])
        return np.concatenate(parts)

    def lengths(self, name: str) -> np.ndarray | None:
        """Exact per-sample lengths saved as ``name`` by ``AnnotationStore.save_lengths`` for every source, or None."""
        parts = []
        for store, kept in zip(self.stores, self.kept):
            column = store.load_lengths(name)
            if column is None:
                return None
            parts.append(np.asarray(column if kept is None else column[kept]))
        return np.concatenate(parts)


class _Refs(Sequence):
    """``annotations.refs[i]``: a ``SampleRef`` made on demand (a list of them would cost ~150 bytes a sample)."""

    def __init__(self, annotations: AnnotationSet):
        self._annotations = annotations

    def __len__(self) -> int:
        return len(self._annotations)

    def __getitem__(self, i: int) -> SampleRef:  # type: ignore[override]
        return self._annotations.ref(i)
