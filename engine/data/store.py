"""Annotation records as columns in one memory-mapped file, built once and cached beside the annotation file.

A JSON annotation file of a few hundred thousand records becomes about a
gigabyte of Python objects, and every DataLoader worker forked from a rank
slowly copies the pages it touches (reference counts, the garbage collector),
so a node holds it dozens of times. Here a dataset parses its file once into
numpy columns (numbers as arrays, texts as one UTF-8 buffer plus offsets) and
writes them to one file; every later start maps that file read-only. The pages
are the operating system's page cache: a rank and all its workers (and every
rank on the node) share one copy, and nothing writes to them.

The cache file sits beside the annotation file (``.<name>.<kind>.cache``), or,
when that folder is read-only, under ``$BLIP2_ENGINE_CACHE`` (default
``~/.cache/blip2-engine/records``). It is keyed by the source's size, mtime
and a hash of its first and last MiB, and by the parser's version: a changed
file is parsed again. It is written to a temporary file and moved into place
(``os.replace``) under a file lock, so several ranks starting at once parse the
file once and never read a half-written cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"B2ECOLS1"
ALIGN = 64
_HEAD = struct.Struct("<8sQ")  # magic, header length


# --------------------------------------------------------------------------- text columns


class Texts:
    """A column of strings: UTF-8 bytes end to end plus ``n + 1`` offsets. ``texts[i]`` decodes one."""

    __slots__ = ("data", "offsets")

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        o = self.offsets
        return self.data[o[i]:o[i + 1]].tobytes().decode("utf-8")

    def lengths(self) -> np.ndarray:
        """Byte length of every entry (0 = empty)."""
        return np.diff(self.offsets)

    def all(self) -> List[str]:
        """Every entry decoded (one pass over the buffer; for checks, not per sample)."""
        buf, o = self.data.tobytes(), self.offsets.tolist()
        return [buf[o[i]:o[i + 1]].decode("utf-8") for i in range(len(o) - 1)]

    @staticmethod
    def encode(texts: Iterable[str]) -> Tuple[np.ndarray, np.ndarray]:
        parts = [t.encode("utf-8") for t in texts]
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        return np.frombuffer(b"".join(parts), dtype=np.uint8), offsets


def text_columns(name: str, texts: Iterable[str]) -> Dict[str, np.ndarray]:
    data, offsets = Texts.encode(texts)
    return {f"{name}.data": data, f"{name}.offsets": offsets}


def texts(columns: Dict[str, np.ndarray], name: str) -> Texts:
    return Texts(columns[f"{name}.data"], columns[f"{name}.offsets"])


def id_hashes(ids: Iterable[str]) -> np.ndarray:
    """A stable 64-bit hash per id (duplicates are found by sorting these, then confirmed on the strings)."""
    return np.array([int.from_bytes(hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest(), "little")
                     for i in ids], dtype=np.uint64)


def duplicate_rows(hashes: np.ndarray, rows: np.ndarray, ids: "Texts") -> List[Tuple[int, int]]:
    """(first, repeat) pairs of rows (of ``rows``) whose ids are equal, ordered by the repeat: found by sorting
    the rows' id ``hashes`` (one per column row), confirmed on the strings (a hash collision is no duplicate).
    Each repeat is paired with the first row of its id in file order."""
    h = hashes[rows]
    order = np.argsort(h, kind="stable")  # equal ids stay in file order: the first of a run is the original
    hs = h[order]
    first: Dict[int, int] = {}
    pairs = []
    for k in (np.flatnonzero(hs[1:] == hs[:-1]) + 1).tolist():
        j = first.get(k - 1, k - 1)
        first[k] = j
        a, b = int(rows[order[j]]), int(rows[order[k]])
        if ids[a] == ids[b]:
            pairs.append((a, b))
    return sorted(pairs, key=lambda p: p[1])


# --------------------------------------------------------------------------- the file


def _pad(n: int) -> int:
    return (-n) % ALIGN


def write_columns(path: str, columns: Dict[str, np.ndarray], meta: dict) -> None:
    """Write ``columns`` and ``meta`` to ``path`` atomically (a temporary file in the same folder, then
    ``os.replace``)."""
    layout, offset = {}, 0
    for name, arr in columns.items():
        arr = np.ascontiguousarray(arr)
        columns[name] = arr
        layout[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset}
        offset += arr.nbytes + _pad(arr.nbytes)
    header = json.dumps({"meta": meta, "columns": layout}).encode("utf-8")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # readable like any file the user writes (mkstemp makes it private)
        with os.fdopen(fd, "wb") as f:
            f.write(_HEAD.pack(MAGIC, len(header)))
            f.write(header)
            f.write(b"\0" * _pad(_HEAD.size + len(header)))
            for arr in columns.values():
                f.write(memoryview(arr.reshape(-1).view(np.uint8)) if arr.nbytes else b"")
                f.write(b"\0" * _pad(arr.nbytes))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_columns(path: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """``(meta, columns)`` of a file written by :func:`write_columns`; the columns are read-only views of one
    shared memory map. Raises ValueError for a file that is not one (or is cut short)."""
    size = os.path.getsize(path)
    if size < _HEAD.size:
        raise ValueError(f"{path} is too short")
    # A plain ndarray over the map: slices of an np.memmap are memmaps too, and much slower to make.
    mm = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    magic, n = _HEAD.unpack(mm[:_HEAD.size].tobytes())
    if magic != MAGIC or _HEAD.size + n > size:
        raise ValueError(f"{path} is not a column file of this engine")
    head = json.loads(mm[_HEAD.size:_HEAD.size + n].tobytes())
    start = _HEAD.size + n + _pad(_HEAD.size + n)
    columns = {}
    for name, c in head["columns"].items():
        dtype, shape = np.dtype(c["dtype"]), tuple(c["shape"])
        lo = start + c["offset"]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if lo + nbytes > size:
            raise ValueError(f"{path} is cut short (column {name})")
        columns[name] = mm[lo:lo + nbytes].view(dtype).reshape(shape)
    return head["meta"], columns


# --------------------------------------------------------------------------- the cache


def source_key(file: str) -> dict:
    """What identifies the version of an annotation file: size, mtime and a hash of its first and last MiB."""
    st = os.stat(file)
    h = hashlib.blake2b(digest_size=16)
    with open(file, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "hash": h.hexdigest()}


def fallback_dir() -> str:
    return os.environ.get("BLIP2_ENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "blip2-engine",
                                                                "records")


def cache_paths(file: str, kind: str) -> List[str]:
    """Where the cache of ``file`` may live, in order: beside it, then the user's cache folder."""
    folder, name = os.path.split(os.path.abspath(file))
    tag = hashlib.blake2b(os.path.abspath(file).encode("utf-8"), digest_size=8).hexdigest()
    return [os.path.join(folder, f".{name}.{kind}.cache"),
            os.path.join(fallback_dir(), f"{name}.{tag}.{kind}.cache")]


@contextlib.contextmanager
def locked(path: str):
    """An exclusive lock between processes (and nodes, where the file system supports it) on ``path``; the
    writers of cached files (this module, the synthetic dataset) take it."""
    import fcntl  # here, not at the top: POSIX only, and only a writer of the cache takes the lock

    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _valid(path: str, meta_key: dict) -> Optional[Tuple[dict, Dict[str, np.ndarray]]]:
    try:
        meta, columns = read_columns(path)
    except (OSError, ValueError, KeyError):
        return None
    return (meta, columns) if meta.get("key") == meta_key else None


class CachedColumns:
    """The columns of one annotation file, memory-mapped from its cache (``path``; None when no cache could be
    written and the columns live in this process's memory). Pickles as its path, so a spawned worker maps the
    same file instead of receiving a copy."""

    def __init__(self, meta: dict, columns: Dict[str, np.ndarray], path: Optional[str], built: bool):
        self.meta, self.columns, self.path, self.built = meta, columns, path, built

    def __reduce__(self):
        if self.path is None:
            return CachedColumns, (self.meta, self.columns, None, self.built)
        return _reopen, (self.path, self.meta, self.built)


def _reopen(path: str, meta: dict, built: bool) -> "CachedColumns":
    got = _valid(path, meta["key"])
    if got is None:
        raise ValueError(f"the record cache {path} changed or vanished while the run was using it; start again")
    return CachedColumns(got[0], got[1], path, built)


def cached_columns(file: str, kind: str, version: int,
                   build: Callable[[], Tuple[dict, Dict[str, np.ndarray]]]) -> CachedColumns:
    """The columns of annotation ``file``: from its cache when that matches the file and ``kind``/``version``
    of the parser, else ``build()`` (-> meta, columns), written to the cache for the next start."""
    try:
        key = {"kind": kind, "version": version, "source": source_key(file)}
    except OSError:  # missing or unreadable: the parser says so, naming the file and the fix
        meta, columns = build()
        return CachedColumns(meta, columns, None, built=True)
    candidates = cache_paths(file, kind)
    for path in candidates:
        got = _valid(path, key)
        if got is not None:
            return CachedColumns(got[0], got[1], path, built=False)
    for path in candidates:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with locked(path + ".lock"):
                got = _valid(path, key)  # another process built it while this one waited
                if got is not None:
                    return CachedColumns(got[0], got[1], path, built=False)
                meta, columns = build()
                meta = dict(meta, key=key)
                write_columns(path, columns, meta)
        except OSError as e:
            log.info("cannot write the record cache %s (%s)%s", path, e,
                     "; trying the next place" if path != candidates[-1] else "")
            continue
        got = _valid(path, key)
        if got is not None:
            log.info("parsed %s once into %s (%.1f MB); later starts map it", file, path,
                     os.path.getsize(path) / 1e6)
            return CachedColumns(got[0], got[1], path, built=True)
    log.warning("no writable place for the record cache of %s (tried %s); the records stay in this process's "
                "memory and are parsed again at the next start", file, ", ".join(candidates))
    meta, columns = build()
    return CachedColumns(dict(meta, key=key), columns, None, built=True)
