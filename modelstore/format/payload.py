"""Payloads: the flat chunked arrays and the tensor table of one base or task (spec sections 3-4).

Every base and task is a zarr group holding a few flat 1-D arrays plus a JSON table of offsets,
so opening one on an object store takes a handful of requests however many tensors the model
has. `PayloadWriter` is the one way such a group is written (dense, sparse and low-rank entries
alike), `PayloadReader` the one way it is read back and checked.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from typing import Any, TypeGuard, cast

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.storage import StorePath

from modelstore.errors import CorruptStoreError, StorageError, is_io_error
from modelstore.format import dtypes
from modelstore.format.chunks import ChunkError, Chunks, digest, empty, read_object
from modelstore.format.codecs import chunk_length, compressors
from modelstore.format.manifest import (
    ArrayInfo,
    PayloadFields,
    TableEntry,
    table_digest,
)


class FlatWriter:
    """Append numpy arrays to one flat zarr array, writing only whole, aligned chunks.

    `capacity` is an upper bound on the elements that will be appended; `close()`
    shrinks the array to what was written.
    """

    def __init__(self, group: zarr.Group, name: str, dtype: str, capacity: int, kind: str = "values"):
        self.dtype = np.dtype(dtype)
        self.chunk = chunk_length(capacity)
        # every chunk is written, even all-zero ones, so a missing chunk is always damage
        self.array = group.create_array(
            name, shape=(capacity,), chunks=(self.chunk,), dtype=self.dtype,
            compressors=compressors(kind, self.dtype.itemsize), fill_value=0,
            config={"write_empty_chunks": True},
        )
        self.name = name
        self.capacity = capacity
        self.written = 0
        self._trailers: list[int] = []
        self._buf = empty(self.chunk, self.dtype)
        self._spare: np.ndarray | None = None  # the buffer of the chunk being written, once free
        self._pending: Future[int] | None = None
        self._chunks = Chunks(self.array)
        self._fill = 0

    @property
    def position(self) -> int:
        """Elements appended so far: the offset the next append starts at."""
        return self.written + self._fill

    def append(self, a: np.ndarray) -> int:
        """Append `a` and return its start offset in the flat array."""
        start = self.position
        a = np.ascontiguousarray(a, dtype=self.dtype).reshape(-1)
        if start + a.size > self.capacity:
            raise AssertionError("FlatWriter capacity exceeded")
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
        """Hand the full buffer to the writer thread (encoding and writing a chunk overlap the
        caller's work on the next one) and go on in the other buffer."""
        if self._fill:
            self._collect()
            self._pending = _writer().submit(self._chunks.write, self.written // self.chunk, self._buf[:self._fill])
            spare = self._spare if self._spare is not None else empty(self.chunk, self.dtype)
            self._buf, self._spare = spare, self._buf
            self.written += self._fill
            self._fill = 0

    def _collect(self) -> None:
        """Wait for the chunk being written (raising its error); record its trailer."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._trailers.append(pending.result())

    def abandon(self) -> None:
        """Wait for the chunk being written, whatever its outcome (before its directory is deleted)."""
        if self._pending is not None:
            wait([self._pending])
            self._pending = None

    def close(self) -> ArrayInfo:
        """Write the tail and shrink the array to its content; return its count and digest."""
        self._flush()
        self._collect()
        if self.written != self.capacity:
            self.array.resize((self.written,))
        meta = read_object(self.array.store, f"{self.array.path}/zarr.json")
        assert meta is not None, "an array just written has no metadata"
        return {"count": self.written, "chunks_crc32c": digest(self._trailers), "zarr_json_sha256": sha256_of(meta)}


_WRITER: list[ThreadPoolExecutor] = []


def _writer() -> ThreadPoolExecutor:
    """The thread that encodes and writes chunks (one per process: chunk writes of each array
    stay in order, one at a time)."""
    if not _WRITER:
        _WRITER.append(ThreadPoolExecutor(1, thread_name_prefix="modelstore-write"))
    return _WRITER[0]


class PayloadWriter:
    """Write one base or task group: declare its arrays, add table entries, `finish()`.

    Dense tensors go to `<prefix>.<dtype>` arrays sized by `declare_dense`; other entry kinds
    append to arrays from `declare` and record their entry with `add`.
    """

    def __init__(self, path: str, group: zarr.Group):
        self.path = path
        self.group = group
        self.table: list[TableEntry] = []
        self._arrays: dict[str, FlatWriter] = {}

    def declare(self, name: str, dtype: str, capacity: int, kind: str = "values") -> FlatWriter:
        """A flat array `name` of logical dtype `dtype` holding at most `capacity` elements."""
        w = FlatWriter(self.group, name, dtypes.storage_dtype(dtype), capacity, kind=kind)
        self._arrays[name] = w
        return w

    def declare_dense(self, prefix: str, specs: Iterable[tuple[tuple[int, ...], torch.dtype]],
                      kind: str = "values") -> None:
        """Arrays `<prefix>.<dtype>` of array `kind` large enough for tensors of these (shape, dtype)."""
        capacity: dict[str, int] = {}
        for shape, dt in specs:
            d = dtypes.dtype_name(dt)
            capacity[d] = capacity.get(d, 0) + math.prod(shape)
        for d, n in capacity.items():
            self.declare(f"{prefix}.{d}", d, n, kind=kind)

    def add_dense(self, name: str, t: torch.Tensor, prefix: str, peft_name: str | None = None) -> TableEntry:
        """Store `t` whole in its dtype's `<prefix>.<dtype>` array; return its table entry (with
        `peft_name`, a LoRA task's name for it in the adapter)."""
        d = dtypes.dtype_name(t.dtype)
        array = f"{prefix}.{d}"
        start = self._arrays[array].append(dtypes.to_numpy(t))
        entry: TableEntry = {"name": name, "kind": "dense", "array": array, "shape": list(t.shape), "dtype": d,
                             "start": start, "count": t.numel()}
        if peft_name is not None:
            entry["peft_name"] = peft_name
        return self.add(entry)

    def add(self, entry: TableEntry) -> TableEntry:
        """Record a table entry whose data the caller appended to a declared array."""
        self.table.append(entry)
        return entry

    def abandon(self) -> None:
        """Wait for chunk writes still under way, so that nothing is written after the caller
        deletes the payload's directory."""
        for w in self._arrays.values():
            w.abandon()

    def finish(self) -> PayloadFields:
        """Close every array, write the table; return the fields every manifest entry has."""
        arrays = {name: w.close() for name, w in self._arrays.items()}
        # a table is JSON, but a TypedDict is not assignable to zarr's JSON alias
        self.group.attrs["tensors"] = cast(list[Any], self.table)
        stored = sum(w.array.nbytes_stored() for w in self._arrays.values())
        return {"path": self.path, "tensors": len(self.table), "table_sha256": table_digest(self.table),
                "arrays": arrays, "bytes": stored}


_ENTRY_KINDS = ("dense", "sparse", "lowrank", "bits", "words")
#: LoRA layouts: the base weight holds D (`linear`) or Dᵀ (spec section 6).
_LAYOUTS = ("linear", "fan_in_fan_out", "embedding")


def table_problem(table: list[Any], arrays: Mapping[str, Any] | None,
                  kinds: tuple[str, ...] = _ENTRY_KINDS) -> str | None:
    """What is inconsistent in a tensor table (spec section 3: types, dtypes, sizes, names, slices
    that do not tile their arrays in table order), or None. `kinds`: the entry kinds this payload
    may hold."""
    names: set[str] = set()
    ends: dict[str, tuple[int, str]] = {}  # per array: where the last non-empty slice ended, and whose
    for e in table:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or e.get("kind") not in _ENTRY_KINDS:
            return "an entry without a name or kind"
        problem = _entry_problem(e, kinds)
        if problem:
            return f"entry {e['name']!r} {problem}"
        if e["name"] in names:
            return f"tensor {e['name']!r} has two entries"
        names.add(e["name"])
        for a, (s, c) in slices_of(cast(TableEntry, e)).items():  # its fields checked above
            if not c:
                continue  # an empty slice reads nothing; its start is not used (earlier writers wrote 0)
            if arrays is not None and (a not in arrays or s + c > arrays[a]["count"]):
                return f"entry {e['name']!r} points past its array {a!r}"
            end, prev = ends.get(a, (0, ""))
            if s != end:
                after = f"the end of {prev!r}" if prev else "the array's start"
                return f"entry {e['name']!r} starts at {s} of array {a!r}, not at {after} ({end})"
            ends[a] = (s + c, e["name"])
    for a, info in (arrays or {}).items():
        if ends.get(a, (0, ""))[0] != info["count"]:
            return f"array {a!r} holds {info['count']} elements, its entries {ends.get(a, (0, ''))[0]}"
    return None


def _entry_problem(e: dict[str, Any], kinds: tuple[str, ...]) -> str | None:
    """What is wrong with one table entry on its own, or None."""
    if e["kind"] not in kinds:
        return f"is of kind {e['kind']!r}, which this payload does not hold"
    shape, start, count = e.get("shape"), e.get("start"), e.get("count")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape) or not _natural(start) \
            or not _natural(count) or e.get("dtype") not in dtypes.LOGICAL_DTYPES:
        return "has a bad shape, dtype or slice"
    size = math.prod(shape)
    if e["kind"] in ("dense", "words") and count != size or e["kind"] == "sparse" and count > size \
            or e["kind"] == "bits" and count != -(-size // 8):
        return f"has {count} elements for shape {shape}"
    if e["kind"] == "lowrank":
        dims = [e.get(k) for k in ("rank", "d_out", "d_in")]
        if not all(_natural(x) for x in dims) or e.get("layout") not in _LAYOUTS:
            return "has bad factor sizes or layout"
        q, d_out, d_in = (int(x) for x in dims)  # type: ignore[arg-type]
        if count != q * (d_out + d_in + 1) or shape != ([d_out, d_in] if e["layout"] == "linear" else [d_in, d_out]):
            return f"has {count} factor elements of rank {q} for shape {shape}"
        dropped = e.get("dropped", [])
        if not isinstance(dropped, list) or not all(isinstance(x, (int, float)) for x in dropped):
            return "has bad dropped singular values"
    if e["kind"] != "sparse" and not isinstance(e.get("array"), str):
        return "names no array"
    if e["kind"] == "dense" and e["array"].rpartition(".")[2] != e["dtype"]:
        return f"of dtype {e['dtype']} lies in array {e['array']!r}"
    if "base" in e and (e["kind"] not in ("sparse", "lowrank", "bits", "words") or not isinstance(e["base"], str)):
        return "names its base tensor badly"
    if e["kind"] in ("sparse", "lowrank", "bits") and (count or e["kind"] != "sparse") \
            and not dtypes.torch_dtype(e["dtype"]).is_floating_point:
        return f"changes a tensor of dtype {e['dtype']}, which is not floating point"
    segments = e.get("segments", {})
    if not isinstance(segments, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(_natural(x) for x in v) for v in segments.values()):
        return "has bad segments"
    return None


def base_problem(table: list[TableEntry], base: Mapping[str, tuple[list[int], str]], ordered: bool) -> str | None:
    """What is inconsistent between a task's table and a base it reads (name -> (shape, dtype), in
    base order), or None: every entry that reads the base (all but `dense` ones and `words` ones
    without `xor`) names a base tensor of its shape, a count-0 `sparse` entry (the base's tensor
    itself) and a `words` one also of its dtype, and, when `ordered` (the base is streamed in table
    order), in base order."""
    order = {n: i for i, n in enumerate(base)}
    last = ("", -1)
    for e in table:
        if e["kind"] == "dense" or e["kind"] == "words" and not e.get("xor"):
            continue
        src = e.get("base", e["name"])
        if src not in base:
            return f"entry {e['name']!r} applies to base tensor {src!r}, which the base lacks"
        shape, dtype = base[src]
        if list(shape) != e["shape"] or (e["kind"] == "sparse" and not e["count"] or e["kind"] == "words") \
                and dtype != e["dtype"]:
            return (f"entry {e['name']!r} has shape {e['shape']} ({e['dtype']}) "
                    f"against {list(shape)} ({dtype}) of the base")
        if ordered and order[src] <= last[1]:
            return f"entry {e['name']!r} comes after {last[0]!r} but its base tensor before"
        last = (e["name"], order[src])
    return None


def array_problem(arr: zarr.Array, dtype: str | None, count: int | None) -> str | None:
    """What in a flat array's metadata differs from spec section 4 (1-D, regular chunks, fill value
    0, codecs `bytes` little-endian[, `blosc`], `crc32c`), its storage `dtype` or the manifest's
    `count`, or None."""
    m = arr.metadata
    if m.zarr_format != 3 or len(m.shape) != 1 or not _regular_chunks(arr):
        return "does not describe a flat, regularly chunked array"
    if dtype is not None and arr.dtype != np.dtype(dtype):
        return f"says {arr.dtype}, not {dtype}"
    if count is not None and arr.shape[0] != count:
        return f"says {arr.shape[0]} elements, not the manifest's {count}"
    if m.fill_value != 0:
        return f"has fill value {m.fill_value!r}, not 0"
    codecs = list(m.codecs)
    if not (len(codecs) in (2, 3) and isinstance(codecs[0], BytesCodec) and isinstance(codecs[-1], Crc32cCodec)
            and (len(codecs) == 2 or isinstance(codecs[1], BloscCodec))):
        return "names other codecs than bytes[, blosc], crc32c"
    if arr.dtype.itemsize > 1 and (codecs[0].endian is None or codecs[0].endian.value != "little"):
        return "is not little-endian"
    return None


def _regular_chunks(arr: zarr.Array) -> bool:
    """Whether `arr`'s chunk grid is regular, of chunks of at least one element (zarr gives the
    chunks of regular grids only)."""
    try:
        return arr.chunks[0] >= 1
    except NotImplementedError:
        return False


def sha256_of(blob: bytes) -> str:
    """`sha256:<hex>` of bytes, as the manifest records digests."""
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _natural(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def slices_of(entry: TableEntry) -> dict[str, tuple[int, int]]:
    """(start, count) of each flat array a table entry's payload lives in: its own slice (of
    `indices` and `values` for sparse entries; `values` only for one with a `seed`, whose positions
    are re-drawn), then its `segments` (spec section 3), which add slices of further arrays or give
    `values` a slice of its own."""
    own = (entry["array"],) if entry["kind"] != "sparse" else ("values",) if "seed" in entry else ("indices", "values")
    out = {a: (entry["start"], entry["count"]) for a in own}
    out.update({a: (s, c) for a, (s, c) in entry.get("segments", {}).items()})
    return out


def arrays_of(entry: TableEntry) -> tuple[str, ...]:
    """The flat arrays a table entry's payload lives in."""
    return tuple(slices_of(entry))


def content_crc32(a: np.ndarray) -> int:
    """CRC-32 (zlib) of an array's little-endian content, as the manifest records it."""
    return zlib.crc32(np.ascontiguousarray(a).data.cast("B"))


class PayloadReader:
    """One base or task group, its table checked against the manifest's digest.

    It is also a TensorSource (names/shape/dtype/get) that reads one tensor at a time, which is
    how writers read a stored base with bounded memory.
    """

    def __init__(self, group: zarr.Group, entry: PayloadFields, what: str,
                 array_dtypes: Mapping[str, str] | None = None, kinds: tuple[str, ...] = ("dense",)):
        try:
            table = group.attrs.get("tensors")
        except Exception:  # unreadable attributes
            table = None
        if not isinstance(table, list) or table_digest(table) != entry["table_sha256"]:
            raise CorruptStoreError(f"{what}: the tensor table fails its checksum; the store is damaged")
        if entry.get("tensors", len(table)) != len(table):
            raise CorruptStoreError(f"{what}: the manifest counts {entry.get('tensors')} tensors, its table "
                                    f"{len(table)}; the store is damaged")
        self.group, self.entry, self.what = group, entry, what
        self.table: list[TableEntry] = table
        self._dtypes = dict(array_dtypes or {})
        self._opened: dict[str, zarr.Array] = {}
        self._readers: dict[str, Chunks] = {}
        problem = table_problem(table, entry.get("arrays"), kinds)
        if problem:
            raise CorruptStoreError(f"{what}: the tensor table is inconsistent ({problem}); the store is damaged")
        self._by_name = {e["name"]: e for e in table}
        for a in sorted({*entry.get("arrays", {}), *(a for e in table if e["count"] for a in arrays_of(e))}):
            self._array(a)  # every array's metadata checked before a tensor is read

    def _array(self, name: str) -> zarr.Array:
        """Flat array `name`, its metadata checked against its digest in the manifest (where recorded)
        and against what the table and the spec say it holds (opened once)."""
        if name in self._opened:
            return self._opened[name]
        info = self.entry.get("arrays", {}).get(name)
        want = self._dtypes.get(name) or name.rpartition(".")[2]
        # a logical dtype (bfloat16 stored as uint16), or the task's index dtype (uint32 / uint64)
        storage = dtypes.storage_dtype(want) if want in dtypes.LOGICAL_DTYPES else self._dtypes.get(name)
        try:
            arr = self._open(name, info.get("zarr_json_sha256") if info else None)
            problem = array_problem(arr, storage, info["count"] if info else None)
        except CorruptStoreError:
            raise
        except Exception as e:  # missing or unreadable zarr.json of the array
            self._unless_io(e, name)
            problem = "is missing or unreadable"
        if problem:
            raise CorruptStoreError(f"{self.what}: the metadata of array '{name}' {problem}; "
                                    "re-add this task or restore the store")
        self._opened[name] = arr
        return arr

    def _open(self, name: str, sha256: str | None) -> zarr.Array:
        """Array `name` of the group; with `sha256`, from the bytes of its zarr.json checked against it."""
        if sha256 is None:
            arr = self.group[name]
            if not isinstance(arr, zarr.Array):
                raise KeyError(name)
            return arr
        store, path = self.group.store, f"{self.group.path}/{name}"
        blob = read_object(store, f"{path}/zarr.json")
        if blob is None:
            raise KeyError(name)
        if sha256_of(blob) != sha256:
            raise CorruptStoreError(f"{self.what}: the metadata of array '{name}' fails its checksum; "
                                    "re-add this task or restore the store")
        meta = json.loads(blob)
        if not isinstance(meta, dict) or meta.get("node_type") != "array" or meta.get("zarr_format") != 3:
            raise ValueError("not a zarr v3 array")
        return zarr.Array.from_dict(StorePath(store, path), meta)

    # -- whole arrays ----------------------------------------------------------
    def read_flat(self, array: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """`array[start:stop]` in a buffer allocated once (see format.chunks)."""
        arr = self._array(array)
        stop = arr.shape[0] if stop is None else stop
        out = empty(stop - start, arr.dtype)
        self.read_into(array, start, stop, out)
        return out

    def read_into(self, array: str, start: int, stop: int, out: np.ndarray) -> None:
        """Elements [start, stop) of `array` into `out`; a damaged chunk becomes an error naming
        the tensors it holds, an unreachable storage a StorageError."""
        if stop <= start:
            return
        arr = self._array(array)
        try:
            self._chunks(array).read_into(start, stop, out)
            return
        except ChunkError as e:
            raise self._damaged(array, e.index, str(e)) from None
        except Exception as e:  # zarr's own path: a crc32c mismatch (ValueError) or a codec failure
            self._unless_io(e, array)
        chunk = arr.chunks[0]
        for c in range(start - start % chunk, stop, chunk):
            try:
                arr[c:c + chunk]
            except Exception as e:
                self._unless_io(e, array)
                raise self._damaged(array, c // chunk, f"chunk {c // chunk} fails its checksum") from None
        raise CorruptStoreError(f"{self.what}: array '{array}' could not be read")

    def chunk(self, array: str, index: int) -> np.ndarray:
        """Chunk `index` of `array` in a fresh buffer (the last cut to the array's length), decoded
        ahead of a reader taking chunks in order where the array allows (format.chunks)."""
        try:
            return self._chunks(array).decoded(index)
        except ChunkError as e:
            raise self._damaged(array, e.index, str(e)) from None
        except Exception as e:
            self._unless_io(e, array)
        c0 = index * self.chunk_len(array)
        return self.read_flat(array, c0, min(c0 + self.chunk_len(array), self.array_len(array)))  # names the damage

    def ahead(self, array: str, index: int) -> None:
        """Start decoding chunk `index` of `array` and the next ones (format.chunks), for a reader
        taking them in order that has other work before it reads them."""
        self._chunks(array).ahead(index)

    def _chunks(self, array: str) -> Chunks:
        if array not in self._readers:
            self._readers[array] = Chunks(self._array(array))
        return self._readers[array]

    def _damaged(self, array: str, index: int, what: str) -> CorruptStoreError:
        chunk = self.chunk_len(array)
        c = index * chunk
        hit = [e["name"] for e in self.table for a, (s, n) in slices_of(e).items()
               if a == array and n and e["count"] and s < c + chunk and s + n > c]
        return CorruptStoreError(
            f"{self.what}: {what} in array '{array}' (tensor {', '.join(hit[:3]) or '?'}"
            f"{' ...' if len(hit) > 3 else ''}); the stored bytes are damaged, re-add this task or restore the store")

    def _unless_io(self, e: Exception, array: str) -> None:
        """Raise a StorageError if reading failed for want of the storage, not because of damage."""
        if is_io_error(e) and not isinstance(e, FileNotFoundError):
            raise StorageError(f"{self.what}: could not read array '{array}' ({type(e).__name__}); "
                               "rerun when the location is reachable") from None

    def read_arrays(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every non-empty flat array, checked against the manifest's count and checksum, on `device`."""
        names = sorted({a for t in self.table if t["count"] for a in arrays_of(t)})
        out = {}
        for a in names:
            flat = self.read_flat(a)
            self._check_array(a, flat.size, partial(content_crc32, flat))
            out[a] = torch.from_numpy(flat).to(device)
        return out

    def verify(self) -> None:
        """Check every array against the manifest: each chunk's crc32c and the array's digest
        (version-2 arrays, without decoding), or its content's CRC-32 (version 1).

        Raises:
            CorruptStoreError: naming the damaged array (and tensors, for a damaged chunk).
        """
        for a, want in sorted(self.entry.get("arrays", {}).items()):
            if "chunks_crc32c" not in want:
                flat = self.read_flat(a) if want["count"] else np.empty(0)
                self._check_array(a, flat.size, partial(content_crc32, flat))
                continue
            size = self.array_len(a)
            try:
                self._chunks(a).verify(min(size, want["count"]))
            except ChunkError as e:
                raise self._damaged(a, e.index, str(e)) from None
            except Exception as e:
                self._unless_io(e, a)
                raise
            self._check_array(a, size, lambda: 0)

    def _check_array(self, array: str, size: int, content_crc: Callable[[], int]) -> None:
        """Raise unless `array`, read whole (`size` elements), matches the manifest's count and
        checksum: the digest of the chunks read (version 2) or `content_crc()` (version 1)."""
        want = self.entry.get("arrays", {}).get(array)
        if want is None:
            return
        if "chunks_crc32c" in want:
            chunks = self._chunks(array)
            sound = chunks.digest(-(-size // chunks.chunk)) == want["chunks_crc32c"]
        else:
            sound = content_crc() == want["crc32"]
        if size != want["count"] or not sound:
            raise CorruptStoreError(f"{self.what}: array '{array}' does not match the checksum recorded in the "
                                    "manifest (a chunk is missing or was replaced); re-add it or restore the store")

    def stream(self, device: torch.device, check: bool = True) -> Segments:
        """Sequential reads of this payload's arrays, each checked against the manifest as it ends
        (`check`; without it, skipped parts are not read: each chunk read still passes its crc32c)."""
        return Segments(self, device, check)

    def entry_of(self, name: str) -> TableEntry:
        """The table entry of tensor `name`."""
        return self._by_name[name]

    def chunk_len(self, array: str) -> int:
        """Elements per chunk of flat array `array` (asked for at every slice: zarr works it out anew)."""
        return self._chunks(array).chunk

    def array_len(self, array: str) -> int:
        """Elements of flat array `array`."""
        return self._chunks(array).length

    # -- one tensor at a time (TensorSource) -----------------------------------
    def names(self) -> list[str]:
        return list(self._by_name)

    def specs(self) -> dict[str, tuple[list[int], str]]:
        """Each tensor's shape and logical dtype name, in table order (what tables are checked against)."""
        return {e["name"]: (e["shape"], e["dtype"]) for e in self.table}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._by_name[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return dtypes.torch_dtype(self._by_name[name]["dtype"])

    def get(self, name: str) -> torch.Tensor:
        """A dense entry's tensor, read alone."""
        e = self._by_name[name]
        a = self.read_flat(e["array"], e["start"], e["start"] + e["count"])
        return dtypes.from_numpy(a, e["dtype"]).view(e["shape"])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a dense entry's tensor along its first dimension, read alone."""
        e = self._by_name[name]
        row = math.prod(e["shape"][1:])
        a = self.read_flat(e["array"], e["start"] + start * row, e["start"] + stop * row)
        return dtypes.from_numpy(a, e["dtype"]).view(stop - start, *e["shape"][1:])


class Segments:
    """Slices of a payload's flat arrays read front to back, one tensor at a time, so a load never
    holds a whole array. Each array's checksum (chunk digest, or a version-1 content CRC-32) is
    accumulated as it is read and compared with the manifest's when the array ends (`close` reads
    whatever a caller skipped), so missing, swapped or altered chunks are caught exactly as a
    whole-array read catches them."""

    def __init__(self, reader: PayloadReader, device: torch.device, check: bool = True):
        self.reader, self.device, self.check = reader, device, check
        self._pos: dict[str, int] = {}
        self._crc: dict[str, int] = {}
        self._tail: dict[str, np.ndarray] = {}  # per array: decoded elements from _pos on, up to a chunk end

    def ahead(self, array: str) -> None:
        """Start decoding `array` from where its reads will go on, while the caller does other work."""
        if array not in self._tail:
            self.reader.ahead(array, self._pos.get(array, 0) // self.reader.chunk_len(array))

    def get(self, array: str, start: int, count: int, dtype: str, borrow: bool = False) -> torch.Tensor:
        """`array[start:start+count]` as logical dtype `dtype` on the device: a fresh tensor, or with
        `borrow` (a caller that reads the slice and drops it) on the CPU possibly a view of the
        decoded chunk it lies in, which its neighbours share: no copy."""
        if not count:  # an empty slice reads nothing (earlier writers gave such entries start 0)
            return dtypes.from_numpy(empty(0, np.dtype(dtypes.storage_dtype(dtype))), dtype).to(self.device)
        pos = self._pos.get(array, 0)
        if start < pos:  # the table's order was checked (table_problem): a caller's mistake
            raise AssertionError(f"{array}: slices must be read in order ({start} < {pos})")
        if start > pos and self.check:
            self._take(array, pos, start)  # skipped, but checked
        elif start > pos:
            tail = self._tail.pop(array, None)
            if tail is not None and start - pos < tail.size:
                self._tail[array] = tail[start - pos:]
        flat = self._take(array, start, start + count, borrow)
        return dtypes.from_numpy(flat, dtype).to(self.device)

    def _take(self, array: str, start: int, stop: int, borrow: bool = False) -> np.ndarray:
        flat = self._read(array, start, stop, borrow)
        self._pos[array] = stop
        if not self.check:
            return flat
        want = self.reader.entry.get("arrays", {}).get(array)
        if want is not None and "crc32" in want and "chunks_crc32c" not in want:  # version 1: content CRC
            self._crc[array] = zlib.crc32(np.ascontiguousarray(flat).data.cast("B"), self._crc.get(array, 0))
        if want is not None and stop == want["count"]:
            self.reader._check_array(array, stop, lambda: self._crc.get(array, 0))
        return flat

    def _read(self, array: str, start: int, stop: int, borrow: bool = False) -> np.ndarray:
        """Elements [start, stop), continuing where the last read ended (or jumped to), in a fresh
        buffer: whole chunks decode straight into it; a chunk the slice ends inside is decoded once
        (format.chunks decodes the next ones meanwhile) and its unread rest serves the next slice
        (tensors do not end on chunk bounds). With `borrow`, a slice within that rest, or within
        one chunk, is a view of it."""
        reader = self.reader
        chunk, size = reader.chunk_len(array), reader.array_len(array)
        i, n = 0, stop - start
        if borrow:
            tail = self._tail.get(array)
            if (tail is None or not tail.size) and start // chunk == (stop - 1) // chunk and n < chunk:
                tail = self._chunk_tail(array, start, chunk, size)
            if tail is not None and n <= tail.size:
                self._tail[array] = tail[n:]
                return tail[:n]
        out = empty(n, reader._array(array).dtype)
        while i < n:
            tail = self._tail.pop(array, None)
            if tail is not None and tail.size:
                take = min(tail.size, n - i)
                out[i:i + take] = tail[:take]
                if take < tail.size:
                    self._tail[array] = tail[take:]
                i += take
                continue
            p = start + i
            if p % chunk == 0 and n - i >= chunk:
                cut = p + (n - i) // chunk * chunk
                reader.read_into(array, p, cut, out[i:i + cut - p])
                i += cut - p
                continue
            self._chunk_tail(array, p, chunk, size)
        return out

    def _chunk_tail(self, array: str, p: int, chunk: int, size: int) -> np.ndarray:
        """Decode the chunk element `p` lies in; its elements from `p` on become the array's tail."""
        c0 = p - p % chunk
        if min(c0 + chunk, size) <= p:
            raise CorruptStoreError(f"{self.reader.what}: array '{array}' ends before element {p}; "
                                    "the store is damaged")
        tail = self._tail[array] = self.reader.chunk(array, c0 // chunk)[p - c0:]
        return tail

    def close(self) -> None:
        """Read and check the parts of every started array that were not asked for."""
        for array, pos in list(self._pos.items()):
            want = self.reader.entry.get("arrays", {}).get(array)
            if want is not None and pos < want["count"]:
                self._take(array, pos, want["count"])


__all__ = ["FlatWriter", "PayloadWriter", "PayloadReader", "Segments", "arrays_of", "slices_of", "content_crc32",
           "table_problem", "base_problem", "array_problem", "sha256_of"]
