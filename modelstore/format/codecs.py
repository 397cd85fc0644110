"""Which codecs each kind of flat array is written with (spec/FORMAT.md, section 4).

Every chunk ends in a crc32c, so a damaged chunk is always detected; the compressor before it
is chosen per kind of array: bit-shuffled zstd for gap-coded indices (small integers), byte-shuffled
zstd for values and dense tensors.
"""

from __future__ import annotations

from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec

#: Elements per chunk: 2 Mi elements make 4-8 MB objects, few requests, bounded decode memory.
CHUNK_ELEMENTS = 1 << 21
ARRAY_KINDS = ("indices", "values")


def compressors(kind: str, itemsize: int) -> list[BytesBytesCodec]:
    """Codec chain after the bytes serializer for an array of `kind` ("indices" or "values")."""
    if kind not in ARRAY_KINDS:
        raise ValueError(f"unknown array kind {kind!r}")
    shuffle = "bitshuffle" if kind == "indices" else "shuffle"
    clevel = 5 if kind == "indices" else 3
    return [BloscCodec(cname="zstd", clevel=clevel, shuffle=shuffle, typesize=itemsize), Crc32cCodec()]


__all__ = ["CHUNK_ELEMENTS", "ARRAY_KINDS", "compressors"]
