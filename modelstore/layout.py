"""The on-store layout: paths, codecs, and flat chunked arrays (spec/FORMAT.md).

Every tensor payload lives in a few flat 1-D zarr arrays per task or base, with a
JSON table of offsets, so opening a task on an object store takes a handful of
requests however many tensors the model has.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

FORMAT_NAME = "modelstore"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHUNK_ELEMENTS = 1 << 21  # 2 Mi elements: 4-8 MB objects, few requests, bounded decode memory


def compressors(kind: str, itemsize: int) -> list:
    """Codec chain after the bytes serializer: Blosc then a crc32c checksum on every chunk."""
    shuffle = "bitshuffle" if kind == "indices" else "shuffle"
    clevel = 5 if kind == "indices" else 3
    return [BloscCodec(cname="zstd", clevel=clevel, shuffle=shuffle, typesize=itemsize), Crc32cCodec()]


class FlatWriter:
    """Append numpy arrays to one flat zarr array, writing only whole, aligned chunks.

    `capacity` is an upper bound on the elements that will be appended; `close()`
    shrinks the array to what was written.
    """

    def __init__(self, group: zarr.Group, name: str, dtype: str, capacity: int, kind: str = "values"):
        self.dtype = np.dtype(dtype)
        self.chunk = max(1, min(CHUNK_ELEMENTS, capacity))
        # every chunk is written, even all-zero ones, so a missing chunk is always damage
        self.array = group.create_array(
            name, shape=(capacity,), chunks=(self.chunk,), dtype=self.dtype,
            compressors=compressors(kind, self.dtype.itemsize), fill_value=0,
            config={"write_empty_chunks": True},
        )
        self.name = name
        self.capacity = capacity
        self.written = 0
        self.crc32 = 0
        self._buf = np.empty(self.chunk, dtype=self.dtype)
        self._fill = 0

    def append(self, a: np.ndarray) -> int:
        """Append `a` and return its start offset in the flat array."""
        start = self.written + self._fill
        a = np.ascontiguousarray(a, dtype=self.dtype).reshape(-1)
        if start + a.size > self.capacity:
            raise AssertionError("FlatWriter capacity exceeded")
        self.crc32 = zlib.crc32(memoryview(a).cast("B"), self.crc32) if a.size else self.crc32
        pos = 0
        while pos < a.size:
            take = min(self.chunk - self._fill, a.size - pos)
            self._buf[self._fill:self._fill + take] = a[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == self.chunk:
                self._flush()
        return start

    def _flush(self) -> None:
        if self._fill:
            self.array[self.written:self.written + self._fill] = self._buf[:self._fill]
            self.written += self._fill
            self._fill = 0

    def close(self) -> int:
        """Write the tail and shrink the array to its content; return the element count."""
        self._flush()
        if self.written != self.capacity:
            self.array.resize((self.written,))
        return self.written


def close_all(writers: Iterable[FlatWriter]) -> dict[str, dict[str, Any]]:
    """Close `writers`; return what the manifest records per array: element count and CRC-32
    of its little-endian content, so a reader can tell a missing or altered chunk."""
    return {w.name: {"count": w.close(), "crc32": w.crc32} for w in writers}


def content_crc32(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


def array_nbytes(group: zarr.Group) -> int:
    """Bytes on disk of all chunks of the arrays in `group` (metadata excluded)."""
    total = 0
    for _, arr in group.arrays():
        total += arr.nbytes_stored()
    return total
