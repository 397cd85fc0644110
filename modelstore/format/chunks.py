"""Reading and writing whole chunks of a flat array without zarr's intermediate buffers.

zarr decodes each chunk into a fresh numpy buffer and copies it into another fresh output;
numpy asks the kernel for huge pages on every large allocation, which on hosts where transparent
huge pages are "madvise" with compaction costs ~2 s per GB of first touch (5-7x a plain page
fault; measured on the CI machine type). For the codec chains modelstore writes (spec section 4:
`bytes` little-endian, optionally `blosc`, then `crc32c`), this module fetches a window of chunk
objects concurrently from the array's store, checks each chunk's crc32c, and
decompresses it directly into the destination (a buffer the caller allocated once, with torch);
writes encode a chunk and put it without copies. Any other codec chain is read and written
through zarr, so stores written by other tools read the same. Remote chunk objects go through a
synchronous twin of the zarr store's fsspec filesystem: zarr runs its own store on a private event
loop, which no public zarr API lends out.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

import fsspec
import google_crc32c
import numpy as np
import torch
import zarr
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from numcodecs import Blosc, blosc
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.storage import FsspecStore, LocalStore

from modelstore._runtime.page_advice import Streak

#: Local compressed chunks decoded ahead of a reader taking an array's chunks one by one (`Chunks.decoded`).
AHEAD = 2
#: Chunk objects fetched at once: enough to keep an object store's connections busy, little memory
#: (fewer where chunks are longer than 8 MiB, so at most WINDOW_BYTES are held ahead of a reader).
WINDOW = 8
WINDOW_BYTES = 64 << 20


class ChunkError(Exception):
    """Chunk `index` of the array is missing or fails its crc32c."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"chunk {index} {reason}")
        self.index = index


def empty(count: int, dtype: np.dtype) -> np.ndarray:
    """An uninitialised numpy array whose memory torch allocated (see the module docstring)."""
    return torch.empty(count * dtype.itemsize, dtype=torch.uint8).numpy().view(dtype)


class Chunks:
    """Whole-chunk reads and writes of one flat array; `fast` says whether its codec chain is one
    this module codes itself (else both go through zarr)."""

    def __init__(self, array: zarr.Array):
        self.array = array
        self.chunk = int(array.chunks[0])
        self.dtype = np.dtype(array.dtype)
        codecs = list(array.metadata.codecs) if array.metadata.zarr_format == 3 else []
        compressor = codecs[1] if len(codecs) == 3 and isinstance(codecs[1], BloscCodec) else None
        endian = codecs[0].endian if codecs and isinstance(codecs[0], BytesCodec) else None
        self.compressed = compressor is not None
        self.fast = (len(codecs) in (2, 3) and isinstance(codecs[0], BytesCodec) and isinstance(codecs[-1], Crc32cCodec)
                     and (self.dtype.itemsize == 1 or (endian is not None and str(endian.value) == sys.byteorder))
                     and (len(codecs) == 2 or self.compressed))
        self._scratch: np.ndarray | None = None
        #: crc32c trailers of the chunks read so far, by chunk index (for the array digest)
        self.trailers: dict[int, int] = {}
        store = array.store
        self._root = str(store.root) if isinstance(store, LocalStore) else None
        self._objects = _Objects(store) if isinstance(store, FsspecStore) else None
        self.fast = self.fast and (self._root is not None or self._objects is not None)
        self._chunk_bytes = self.chunk * self.dtype.itemsize
        # local files are read one at a time into one buffer
        self._window = 1 if self._root else max(1, min(WINDOW, WINDOW_BYTES // self._chunk_bytes))
        self._raw = np.empty(0, np.uint8)
        self.length = int(array.shape[0])
        self._count = -(-self.length // self.chunk)  # chunks
        self._streak = Streak(self.length * self.dtype.itemsize)  # whole chunks' bytes
        self._ahead: dict[int, np.ndarray | None] = {}  # remote chunks fetched ahead of their reader
        self._decoding: dict[int, Future[np.ndarray]] = {}  # local chunks decoded ahead of `decoded`
        self._last = -2  # the last chunk read
        self._blosc = (Blosc(cname=compressor.cname.value, clevel=compressor.clevel, blocksize=compressor.blocksize,
                             shuffle=_SHUFFLES[compressor.shuffle.value]) if compressor is not None else None)

    def write(self, index: int, data: np.ndarray) -> int:
        """Chunk `index` := `data` (at most a chunk's elements; a short last chunk is padded with
        zeros, the fill value, as zarr stores it). Returns the chunk's crc32c trailer."""
        if not self.fast:
            raise ValueError("modelstore writes arrays with bytes[, blosc], crc32c codecs only")
        if data.size < self.chunk:
            data = np.concatenate([data, np.zeros(self.chunk - data.size, data.dtype)])
        encoded: bytes | np.ndarray = self._blosc.encode(data) if self._blosc is not None else data.view(np.uint8)
        value = google_crc32c.value(encoded)  # (which takes no memoryview)
        body = encoded if isinstance(encoded, bytes) else encoded.data
        crc = value.to_bytes(4, "little")
        if self._root:
            path = os.path.join(self._root, self._key(index))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.writev(fd, [body, crc])
            finally:
                os.close(fd)
        else:
            assert self._objects is not None  # a fast array's store is local or fsspec
            self._objects.put(self._key(index), bytes(body) + crc)
        return value

    def verify(self, count: int) -> None:
        """Fetch every chunk of the first `count` elements and check its crc32c, without decoding
        (recording the trailers `digest` combines).

        Raises:
            ChunkError: a chunk is missing or fails its crc32c.
        """
        for window in _windows(0, -(-count // self.chunk), self._window):
            for index, raw in zip(window, self._fetch(window)):
                self._check(index, raw)

    def digest(self, n: int) -> int | None:
        """crc32c of the first `n` chunks' trailers in chunk order (spec section 2), or None when a
        chunk among them has not been read through the fast path."""
        if any(i not in self.trailers for i in range(n)):
            return None
        return digest(self.trailers[i] for i in range(n))

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Elements [start, stop) into `out` (length stop - start).

        Raises:
            ChunkError: a chunk is missing or damaged (fast path).
            Exception: whatever zarr or the storage raise (the caller names it).
        """
        if not self.fast:
            out[:] = self.array[start:stop]
            return
        first, last = start // self.chunk, (stop - 1) // self.chunk
        self._advise_streak(first, last)
        self._last = last
        direct = self._root is not None and not self.compressed  # local raw chunks: read into `out`
        parallel = self._threaded
        pending: list[Future[None]] = []
        try:
            for window in _windows(first, last + 1, self._window):
                raws = None if direct or parallel else self._fetch(window)
                for j, index in enumerate(window):
                    c0 = index * self.chunk
                    lo, hi = max(start, c0), min(stop, c0 + self.chunk)
                    whole = lo == c0 and hi == c0 + self.chunk
                    dest = out[lo - start:hi - start] if whole else self._scratch_buffer()
                    decoded = self._decoding.pop(index, None)
                    if decoded is not None:  # decoded ahead by `decoded`
                        dest[:] = decoded.result()
                    elif parallel and whole:
                        pending.append(_decoders().submit(self._decode_file, index, dest))
                    elif parallel:
                        self._decode_file(index, dest)
                    elif raws is None:
                        self._read_file_into(index, dest.view(np.uint8))
                    else:
                        self._decode(index, raws[j], dest)
                    if not whole:
                        out[lo - start:hi - start] = dest[lo - c0:hi - c0]
        except BaseException:
            wait(pending)  # no decoding thread writes into `out` after it is handed back
            raise
        for f in pending:  # the first error, in chunk order
            f.result()

    def decoded(self, index: int) -> np.ndarray:
        """Chunk `index`'s elements (the last chunk cut to the array's length) in a fresh buffer
        the caller keeps. Where chunks are local and compressed, and the last chunk read was the one
        before, the next AHEAD chunks are decoded meanwhile in the decoding threads: a reader taking
        an array's chunks in order (tensors smaller than a chunk, decoded chunk by chunk) finds them
        ready.

        Raises:
            ChunkError: the chunk is missing or damaged (fast path).
            Exception: whatever zarr or the storage raise (the caller names it).
        """
        c0 = index * self.chunk
        n = min(self.chunk, self.length - c0)
        if not self._threaded:
            out = empty(n, self.dtype)
            self.read_into(c0, c0 + n, out)
            return out
        # only a reader taking chunks in order gets the next ones: one that jumps (a sample) gets what it asks
        last = min(index + AHEAD, self._count - 1) if index == self._last + 1 else index
        self._last = index
        self._advise_streak(index, last)
        for i in [i for i in self._decoding if i < index]:  # skipped: never asked for
            self._decoding.pop(i).cancel()
        mine = self._decoding.pop(index, None)
        self._submit(index + 1, last)
        return (mine.result() if mine is not None else self._decode_fresh(index))[:n]

    def ahead(self, index: int) -> None:
        """Start decoding chunk `index` and the AHEAD after it in the decoding threads, for a reader
        that will take chunks in order from `index` on but has other work first (local compressed
        chunks only; elsewhere nothing)."""
        if not self._threaded:
            return
        last = min(index + AHEAD, self._count - 1)
        self._advise_streak(index, last)
        self._submit(index, last)
        self._last = index - 1

    @property
    def _threaded(self) -> bool:
        """Whether chunks are local and compressed: decoded in the decoding threads."""
        return self.fast and self._root is not None and self.compressed

    def _submit(self, first: int, last: int) -> None:
        """Chunks first..last decoding in the decoding threads, those not already."""
        for i in range(first, last + 1):
            if i not in self._decoding:
                self._decoding[i] = _decoders().submit(self._decode_fresh, i)

    def _decode_fresh(self, index: int) -> np.ndarray:
        out = empty(self.chunk, self.dtype)
        self._decode_file(index, out)
        return out

    def _advise_streak(self, first: int, last: int) -> None:
        """Advise the local chunk files a streak of reads (chunks first..last) is about to reach."""
        if self._root:
            ahead = self._streak.read(first * self._chunk_bytes, (last + 1) * self._chunk_bytes)
            if ahead is not None and ahead[0] < ahead[1]:
                self._advise(*ahead)

    def _advise(self, start: int, stop: int) -> None:
        """Ask the kernel to read the local chunk files that begin in bytes [start, stop) of the
        array into the page cache in the background (modelstore/_runtime/page_advice.py: a streak's ranges
        follow one another, so each file is advised once per streak). A file that is missing is
        left to the read that needs it."""
        stop_index = min(-(-stop // self._chunk_bytes), self._count)
        for index in range(-(-start // self._chunk_bytes), stop_index):
            try:
                fd = os.open(os.path.join(self._root, self._key(index)), os.O_RDONLY)  # type: ignore[arg-type]
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def _decode_file(self, index: int, dest: np.ndarray) -> None:
        """A local compressed chunk read into this thread's buffer and decoded into `dest` (in the
        decoding threads: a blosc call outside the main thread is single-threaded, so chunks are
        decoded side by side instead)."""
        self._decode(index, self._read_file(index, _LOCAL), dest)

    def _scratch_buffer(self) -> np.ndarray:
        if self._scratch is None:
            self._scratch = empty(self.chunk, self.dtype)
        return self._scratch

    def _key(self, index: int) -> str:
        path, key = self.array.path, self.array.metadata.encode_chunk_key((index,))
        return f"{path}/{key}" if path else key

    def _fetch(self, indices: list[int]) -> list[np.ndarray]:
        """The chunk objects' bytes: a local file is read into one reused buffer (no event-loop round
        trip, no allocation per chunk); other stores' objects are fetched a window at a time,
        concurrently, reading ahead of a sequential reader (a load asks for one chunk per tensor)."""
        if self._root:
            return [self._read_file(i) for i in indices]
        if any(i not in self._ahead for i in indices):
            last = self._count - 1
            want = sorted(set(indices) | set(range(indices[-1] + 1, min(last, indices[0] + self._window - 1) + 1)))
            keep = {i: b for i, b in self._ahead.items() if i >= indices[0]}
            self._ahead = {**keep, **dict(zip(want, self._get(want)))}
        out = []
        for i in indices:
            buf = self._ahead.pop(i)
            if buf is None:
                raise ChunkError(i, "is missing")
            out.append(buf)
        return out

    def _get(self, indices: list[int]) -> list[np.ndarray | None]:
        """The chunk objects, fetched concurrently (None where one is missing)."""
        assert self._objects is not None  # a fast array's store is local or fsspec
        return list(_fetchers().map(self._objects.get, [self._key(i) for i in indices]))

    def _open(self, index: int) -> int:
        """A file descriptor of local chunk `index`, read-only."""
        try:
            return os.open(os.path.join(self._root, self._key(index)), os.O_RDONLY)  # type: ignore[arg-type]
        except FileNotFoundError:
            raise ChunkError(index, "is missing") from None

    def _read_file(self, index: int, local: threading.local | None = None) -> np.ndarray:
        """Chunk `index`'s file into a reused buffer: this object's, or `local`'s (one per thread)."""
        fd = self._open(index)
        holder = local if local is not None else self
        try:
            size = os.fstat(fd).st_size
            raw = getattr(holder, "_raw", None)
            if raw is None or raw.size < size:
                raw = holder._raw = empty(size + (size >> 3), np.dtype(np.uint8))
            got = os.readv(fd, [raw[:size].data])
        finally:
            os.close(fd)
        return raw[:got]

    def _read_file_into(self, index: int, target: np.ndarray) -> None:
        """An uncompressed local chunk copied straight into `target` from a private mapping of its
        file, as safetensors loads do: torch's copy runs in its threads, where a read() copies and
        faults the destination's pages in one thread. Its crc32c is checked. A committed chunk file
        is never rewritten (writers make new payload directories), so the mapping cannot shrink
        under the copy."""
        fd = self._open(index)
        try:
            size = os.fstat(fd).st_size
            if size != target.nbytes + 4:
                raise ChunkError(index, "does not decode to a whole chunk")
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE)
        finally:
            os.close(fd)
        with mapped:
            src = torch.frombuffer(mapped, dtype=torch.uint8, count=target.nbytes)
            torch.from_numpy(target).copy_(src)
            del src
            stored = int.from_bytes(mapped[target.nbytes:], "little")
        if google_crc32c.value(target) != stored:
            raise ChunkError(index, "fails its checksum")
        self.trailers[index] = stored

    def _check(self, index: int, raw: np.ndarray) -> np.ndarray:
        """The chunk's body, its crc32c checked (and its trailer recorded)."""
        body = raw[:-4]
        stored = int.from_bytes(raw[-4:].tobytes(), "little") if raw.size >= 4 else -1
        if google_crc32c.value(body) != stored:
            raise ChunkError(index, "fails its checksum")
        self.trailers[index] = stored
        return body

    def _decode(self, index: int, raw: np.ndarray, dest: np.ndarray) -> None:
        body = self._check(index, raw)
        target = dest.view(np.uint8)
        try:
            size = _blosc_size(body) if self.compressed else len(body)
            if size == target.nbytes:
                if self.compressed:
                    blosc.decompress(body, target)
                else:
                    target[:] = body
                return
        except Exception:  # a corrupt blosc stream that still matched its crc32c
            pass
        raise ChunkError(index, "does not decode to a whole chunk")


class _Objects:
    """The objects of a zarr FsspecStore, read and written through a synchronous twin of its
    filesystem (the same location and options), with zarr's FsspecStore's semantics: a missing
    object reads as None."""

    #: what zarr's FsspecStore reads as a missing object
    MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)

    def __init__(self, store: FsspecStore):
        fs = store.fs
        if isinstance(fs, AsyncFileSystemWrapper):  # a synchronous filesystem zarr wrapped
            fs = fs.sync_fs
        elif fs.asynchronous:  # an asynchronous instance of an async filesystem (s3fs): a synchronous one
            options = json.loads(fs.to_json())
            options["asynchronous"] = False
            fs = fsspec.AbstractFileSystem.from_json(json.dumps(options))
        self.fs = fs
        self.root = store.path.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    def get(self, key: str) -> np.ndarray | None:
        try:
            return np.frombuffer(self.fs.cat_file(self._path(key)), np.uint8)
        except self.MISSING:
            return None

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)


_LOCAL = threading.local()  # each decoding thread's file buffer
_DECODERS: list[ThreadPoolExecutor] = []
_FETCHERS: list[ThreadPoolExecutor] = []


def _fetchers() -> ThreadPoolExecutor:
    """The threads a window of remote chunk objects is fetched in, concurrently."""
    if not _FETCHERS:
        _FETCHERS.append(ThreadPoolExecutor(WINDOW, thread_name_prefix="modelstore-fetch"))
    return _FETCHERS[0]


def _decoders() -> ThreadPoolExecutor:
    """The threads local compressed chunks are decoded in (one per core, at most 4)."""
    if not _DECODERS:
        _DECODERS.append(ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="modelstore-decode"))
    return _DECODERS[0]


def read_object(store: Store, key: str) -> bytes | None:
    """Object `key` of a zarr store on a local disk or behind fsspec (None: there is none), read
    synchronously, as chunks are (no public zarr API reads an object synchronously).

    Raises:
        TypeError: another kind of zarr store (modelstore opens no other).
    """
    if isinstance(store, LocalStore):
        try:
            with open(os.path.join(store.root, key), "rb") as fh:
                return fh.read()
        except _Objects.MISSING:
            return None
    if isinstance(store, FsspecStore):
        raw = _Objects(store).get(key)
        return None if raw is None else raw.tobytes()
    raise TypeError(f"modelstore reads zarr stores on a local disk or through fsspec, not a {type(store).__name__}")


def digest(trailers: Iterable[int]) -> int:
    """An array's digest: crc32c over its chunks' crc32c trailers, 4 bytes little-endian each, in
    chunk order. Every chunk is checked against its trailer anyway, so this costs nothing to
    verify and catches swapped, replaced and missing chunks as a checksum of the content would."""
    return google_crc32c.value(b"".join(t.to_bytes(4, "little") for t in trailers))


def _blosc_size(body: np.ndarray) -> int:
    """Decompressed size from a blosc header (bytes 4-8), or -1 when there is no header."""
    return int.from_bytes(body[4:8].tobytes(), "little") if body.size >= 16 else -1


def _windows(first: int, stop: int, size: int) -> Iterator[list[int]]:
    for w in range(first, stop, size):
        yield list(range(w, min(stop, w + size)))


_SHUFFLES = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}

__all__ = ["Chunks", "ChunkError", "digest", "empty", "read_object", "WINDOW", "WINDOW_BYTES"]
