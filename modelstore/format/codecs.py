"""Which codecs each kind of flat array is written with (spec/FORMAT.md, section 4).

Every chunk ends in a crc32c, so a damaged chunk is always detected. The compressor before it is
chosen per kind of array by what it buys, measured on model data (tools/bench_scale): gap-coded
indices (small integers) compress to 0.10-0.28 of their bytes with byte-shuffled zstd (keep 0.3 to
0.01), at level 1 as small as at level 3 or smaller and encoded 1.6-3x as fast; in 1 MiB blosc
blocks (INDEX_BLOCK_BYTES) they encode at ~2 GB/s and decode at ~5 GB/s; weights and delta values
compress about as well with bit-shuffled lz4 as with zstd (0.755 against 0.738 of bf16 weights,
0.88 of fp32 ones, better than zstd's 0.90) but decode at 5-7 GB/s instead of 1-1.8 and encode
14x faster, which is what a load and an add-task wait on.
The XORed words of exact tasks ("words") take the indices' codec: blosc's byte shuffle splits each
1 MiB block into byte planes (the high bytes, nearly all zero after the XOR, then the low ones), and
zstd at level 1 makes a real MiniLM fine-tune 0.321 of its float32 bytes (0.174 of bf16), as small
as byte planes of whole tensors (0.321 / 0.174) and smaller than zstd 3 (0.323 / 0.178), bit
shuffling (0.337 / 0.204) or lz4 (0.372 / 0.273); the unshuffle in C decodes at 2.2 GB/s where
whole-tensor planes decode at 2.4 GB/s but need a join at 1.4 GB/s (tools/bench_exact --codecs;
decode speeds on two float32 encoder layers, one thread, best of 10).
A base may instead be written uncompressed (`base_codec="none"`, array kind "raw": crc32c only):
compression saves 25% of a bf16 base and 12% of a float32 one, but every load of a task decodes
its whole base, and reading raw chunks straight into the output is what safetensors does.
Readers take the codecs from each array's zarr metadata, so stores written with other codecs read
the same.
"""

from __future__ import annotations

from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec

#: Elements per chunk: 2 Mi elements make 4-8 MB objects, few requests, bounded decode memory.
CHUNK_ELEMENTS = 1 << 21
#: Chunks per array at most: an array's chunk objects share one folder (`c/<i>`), and the Hugging
#: Face Hub recommends under 10,000 files per folder. Chunks grow past CHUNK_ELEMENTS from arrays
#: of 2**21 x 8192 elements on (a base of ~17B bf16 parameters); smaller stores are unchanged.
MAX_CHUNKS = 8192


def chunk_length(capacity: int) -> int:
    """Elements per chunk of a flat array of `capacity` elements: CHUNK_ELEMENTS, doubled until the
    array has at most MAX_CHUNKS chunks, and never longer than the array."""
    n = CHUNK_ELEMENTS
    while n * MAX_CHUNKS < capacity:
        n *= 2
    return max(1, min(n, capacity))


#: Bytes per blosc block of an `indices` chunk. Left to blosc, zstd at level 1 gets 32 KiB blocks, and
#: each block's zstd call sets up a fresh context (which also asks the CPU for its features: a trap
#: to the hypervisor on a virtual machine): 256 calls per 8 MB chunk. 1 MiB blocks decode gap-coded
#: indices at 4.9 GB/s instead of 1.4, encode at 2.0 instead of 0.97, and come out 1.7% smaller
#: (one thread, this machine type). lz4 has no such setup and blosc's own blocks serve it as well.
INDEX_BLOCK_BYTES = 1 << 20

ARRAY_KINDS = ("indices", "values", "raw", "words")
#: A base's codec choice (`build(base_codec=...)`) -> the kind of array its tensors are written as.
BASE_CODECS = {"lz4": "values", "none": "raw"}


def compressors(kind: str, itemsize: int) -> list[BytesBytesCodec]:
    """Codec chain after the bytes serializer for an array of `kind` ("indices", "values", "raw" or "words")."""
    if kind not in ARRAY_KINDS:
        raise ValueError(f"unknown array kind {kind!r}")
    if kind == "raw":
        return [Crc32cCodec()]
    if kind in ("indices", "words"):
        blosc = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=itemsize, blocksize=INDEX_BLOCK_BYTES)
    else:
        blosc = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=itemsize)
    return [blosc, Crc32cCodec()]


__all__ = ["ARRAY_KINDS", "BASE_CODECS", "CHUNK_ELEMENTS", "INDEX_BLOCK_BYTES", "MAX_CHUNKS", "chunk_length",
           "compressors"]
