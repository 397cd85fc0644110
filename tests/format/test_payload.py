"""`array_problem` (modelstore.format.payload), read through zarr's public API: it passes the flat
arrays modelstore writes and names each departure from spec section 4 in their metadata."""

from __future__ import annotations

import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from modelstore.format.codecs import compressors
from modelstore.format.payload import array_problem

GOOD = {"shape": (10,), "chunks": (4,), "dtype": "float16", "compressors": compressors("values", 2), "fill_value": 0}


@pytest.mark.parametrize("kind", ["values", "indices", "raw", "words"])
def test_what_modelstore_writes_passes(kind, tmp_path):
    g = zarr.open_group(str(tmp_path), mode="w", zarr_format=3)
    assert array_problem(g.create_array("a", **{**GOOD, "compressors": compressors(kind, 2)}), "float16", 10) is None
    assert array_problem(g["a"], None, None) is None


@pytest.mark.parametrize("change, problem", [
    ({"shape": (2, 5), "chunks": (1, 5)}, "does not describe a flat, regularly chunked array"),
    ({"fill_value": 1}, "has fill value"),
    ({"compressors": [ZstdCodec(), Crc32cCodec()]}, "names other codecs"),
    ({"compressors": None}, "names other codecs"),
    ({"serializer": BytesCodec(endian="big")}, "is not little-endian"),
])
def test_each_departure_from_the_spec_is_named(change, problem, tmp_path):
    g = zarr.open_group(str(tmp_path), mode="w", zarr_format=3)
    assert (array_problem(g.create_array("a", **{**GOOD, **change}), None, None) or "").startswith(problem)


def test_dtype_count_and_format_are_checked(tmp_path):
    g = zarr.open_group(str(tmp_path / "v3"), mode="w", zarr_format=3)
    a = g.create_array("a", **GOOD)
    assert array_problem(a, "float32", 10) == "says float16, not float32"
    assert array_problem(a, "float16", 11) == "says 10 elements, not the manifest's 11"
    v2 = zarr.open_group(str(tmp_path / "v2"), mode="w", zarr_format=2)
    assert array_problem(v2.create_array("a", shape=(10,), chunks=(4,), dtype="float16", fill_value=0), None, None) \
        == "does not describe a flat, regularly chunked array"
