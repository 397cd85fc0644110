"""The fast chunk path (modelstore.format.chunks) codes chunks exactly as zarr does, for every kind
of flat array modelstore writes: what it writes zarr decodes bit for bit, and what zarr writes it
decodes bit for bit, on a local directory (files read straight) and through fsspec stores (the
window of concurrent fetches): memory:// (a synchronous filesystem zarr wraps) and moto's S3 server
(an asynchronous one)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import zarr

from modelstore.format.chunks import Chunks, read_object
from modelstore.format.codecs import compressors

CHUNK = 1000
COUNT = 3 * CHUNK + 123  # a short last chunk


def _data(case: str, rng: np.random.Generator) -> np.ndarray:
    """Content like modelstore's: weights, delta values, gap-coded indices, packed bits, XORed words."""
    if case == "lz4 base":
        return rng.standard_normal(COUNT).astype(np.float32)
    if case == "lz4 base bf16":  # bfloat16 is stored as its uint16 bit patterns
        return (rng.standard_normal(COUNT).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    if case == "none base":
        return rng.standard_normal(COUNT).astype(np.float16)
    if case == "indices":
        return rng.integers(0, 40, COUNT).astype(np.uint32)
    if case == "values":
        return (rng.standard_normal(COUNT) * 1e-3).astype(np.float16)
    if case == "values int8":
        return rng.integers(-127, 128, COUNT).astype(np.int8)
    if case == "bits":
        return rng.integers(0, 256, COUNT).astype(np.uint8)
    if case == "words":  # XORed float32 words: mostly zero high bytes
        return np.where(rng.random(COUNT) < 0.1, rng.integers(-(2**20), 2**20, COUNT), 0).astype(np.int32)
    raise AssertionError(case)


KINDS = {"lz4 base": "values", "lz4 base bf16": "values", "none base": "raw", "indices": "indices",
         "values": "values", "values int8": "values", "bits": "values", "words": "words"}


def _create(where: str, tmp_path, dtype: np.dtype, kind: str, request) -> zarr.Array:
    if where == "local":
        store: zarr.storage.StoreLike = str(tmp_path / "g")
    elif where == "memory":
        store = zarr.storage.FsspecStore.from_url(f"memory://chunks-{uuid.uuid4().hex}")
    else:
        store = zarr.storage.FsspecStore.from_url(f"s3://models/chunks-{uuid.uuid4().hex}",
                                                  storage_options=request.getfixturevalue("s3_server"))
    group = zarr.open_group(store, mode="w", zarr_format=3)
    return group.create_array("a", shape=(COUNT,), chunks=(CHUNK,), dtype=dtype,
                              compressors=compressors(kind, dtype.itemsize), fill_value=0,
                              config={"write_empty_chunks": True})


@pytest.mark.parametrize("where", ["local", "memory", "s3"])
@pytest.mark.parametrize("case", list(KINDS))
def test_fast_path_codes_chunks_as_zarr_does(case, where, tmp_path, request):
    data = _data(case, np.random.default_rng(len(case)))
    n_chunks = -(-COUNT // CHUNK)

    ours = _create(where, tmp_path / "ours", data.dtype, KINDS[case], request)
    writer = Chunks(ours)
    assert writer.fast  # else both directions below would be zarr against itself
    for i in range(n_chunks):
        writer.write(i, data[i * CHUNK:(i + 1) * CHUNK])
    np.testing.assert_array_equal(zarr.open_array(ours.store, path=ours.path, mode="r")[:].view(np.uint8),
                                  data.view(np.uint8))

    theirs = _create(where, tmp_path / "theirs", data.dtype, KINDS[case], request)
    theirs[:] = data
    for array in (ours, theirs):
        reader = Chunks(array)
        out = np.full(COUNT, 7, data.dtype)
        reader.read_into(0, COUNT, out)
        np.testing.assert_array_equal(out.view(np.uint8), data.view(np.uint8))
        part = np.empty(2 * CHUNK, data.dtype)  # starts and ends inside chunks
        reader.read_into(CHUNK // 2, CHUNK // 2 + part.size, part)
        np.testing.assert_array_equal(part.view(np.uint8), data[CHUNK // 2:CHUNK // 2 + part.size].view(np.uint8))
    assert Chunks(ours).fast and Chunks(theirs).fast


@pytest.mark.parametrize("where", ["local", "memory", "s3"])
def test_read_object_reads_the_bytes_zarr_wrote(where, tmp_path, request):
    """The metadata bytes whose sha256 the manifest records are the ones zarr's own store holds."""
    array = _create(where, tmp_path, np.dtype(np.float32), "values", request)
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync  # the reference: zarr's own (asynchronous) read of its store
    key = f"{array.path}/zarr.json"
    want = sync(array.store.get(key, prototype=default_buffer_prototype()))
    assert want is not None and read_object(array.store, key) == want.to_bytes()
    assert read_object(array.store, f"{array.path}/no-such-object") is None
    with pytest.raises(TypeError, match="not a MemoryStore"):
        read_object(zarr.storage.MemoryStore(), key)
