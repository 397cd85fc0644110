"""A second reader of modelstore stores, written from spec/FORMAT.md alone: numpy, json, hashlib and
zarr's own decoding, nothing of modelstore. tests/test_spec_reader.py compares what it reads with
`Store.load` bit for bit, so the spec says everything a reader needs and says it as the code does.

Tensors come back as numpy arrays in their logical dtype; bfloat16 ones (numpy has none) as their
uint16 bit patterns, with the dtype name beside them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import numpy as np
import zarr

Tensor = tuple[np.ndarray, str]  # (values, logical dtype); bfloat16 as uint16 bit patterns


class SpecError(Exception):
    """The store breaks a rule of the spec."""


def _sha256(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _canonical(x: Any) -> bytes:
    return json.dumps(x, sort_keys=True, separators=(",", ":")).encode()


# ---- dtypes (section 4) ---------------------------------------------------------------------------

def _to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def _from_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values cast to `dtype`, rounding to nearest even."""
    if dtype == "bfloat16":
        u = x.astype(np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return x.astype(np.dtype(dtype))


# ---- a payload: its table and flat arrays (sections 2-4) ------------------------------------------

class Payload:
    def __init__(self, root: str, entry: dict[str, Any]):
        self.dir, self.entry = os.path.join(root, entry["path"]), entry
        group = json.load(open(os.path.join(self.dir, "zarr.json")))
        self.table: list[dict[str, Any]] = group["attributes"]["tensors"]
        if _sha256(_canonical(self.table)) != entry["table_sha256"]:
            raise SpecError("table_sha256")
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            info = self.entry["arrays"][name]
            meta_path = os.path.join(self.dir, name, "zarr.json")
            if "zarr_json_sha256" in info and _sha256(open(meta_path, "rb").read()) != info["zarr_json_sha256"]:
                raise SpecError(f"zarr.json of {name}")
            meta = json.load(open(meta_path))
            codecs = [c["name"] for c in meta["codecs"]]
            if meta["fill_value"] != 0 or codecs[0] != "bytes" or codecs[-1] != "crc32c" \
                    or meta["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
                raise SpecError(f"metadata of {name}")
            a = zarr.open_array(os.path.join(self.dir, name), mode="r")[:]
            if a.shape != (info["count"],):
                raise SpecError(f"count of {name}")
            self._arrays[name] = a
        return self._arrays[name]

    def slice(self, name: str, start: int, count: int) -> np.ndarray:
        return self.array(name)[start:start + count]


def read_base(root: str, manifest: dict[str, Any], base_id: str) -> dict[str, Tensor]:
    """base[name] = data.<dtype>[start:start+count].reshape(shape) (section 4)."""
    p = Payload(root, manifest["bases"][base_id])
    return {e["name"]: (p.slice(e["array"], e["start"], e["count"]).reshape(e["shape"]), e["dtype"]) for e in p.table}


def read_manifest(root: str) -> dict[str, Any]:
    m = json.load(open(os.path.join(root, "manifest.json")))
    if m["format"] != "modelstore" or m["version"] > 2:
        raise SpecError("not a store this reader reads")
    if "checksum" in m and _sha256(_canonical({k: v for k, v in m.items() if k != "checksum"})) != m["checksum"]:
        raise SpecError("manifest checksum")
    return m


# ---- tasks (sections 5, 6, 10) --------------------------------------------------------------------

def read_task(root: str, task: str) -> dict[str, Tensor]:
    """Every tensor of `task`, in its stored dtype."""
    m = read_manifest(root)
    entry = m["tasks"][task]
    bases = {b: read_base(root, m, b) for b in entry.get("bases", [entry["base"]])}
    p = Payload(root, entry)
    reader = {"fft": _fft, "lora": _lora, "tall-mask": _bits, "emr": _bits, "bitdelta": _bits,
              "exact": _exact}[entry["kind"]]
    return reader(p, entry, bases)


def _dense(p: Payload, t: dict[str, Any]) -> Tensor:
    return p.slice(t["array"], t["start"], t["count"]).reshape(t["shape"]), t["dtype"]


def _fft(p: Payload, entry: dict[str, Any], bases: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    params, base, out = entry["params"], bases[entry["base"]], {}
    for t in p.table:
        if t["kind"] == "dense":
            out[t["name"]] = _dense(p, t)
            continue
        b, bdtype = base[t.get("base", t["name"])]
        if t["count"] == 0:
            out[t["name"]] = b, bdtype
            continue
        s, c = t["start"], t["count"]
        if params.get("positions") == "seeded":
            pos = _seeded_positions(t["seed"], params["keep"], math.prod(t["shape"]), c)
        else:
            pos = np.cumsum(p.slice("indices", s, c).astype(np.uint64)).astype(np.int64)
        vd = params["value_dtype"]
        if vd in ("int8", "int4"):
            (vs, vc), (ss, sc) = t["segments"]["values"], t["segments"]["scales"]
            raw = p.slice("values", vs, vc)
            if vd == "int4":
                nib = np.stack([raw & 0xF, raw >> 4], axis=1).reshape(-1)[:c].astype(np.int16)
                q = np.where(nib >= 8, nib - 16, nib)
            else:
                q = raw.astype(np.int16)
            scales = p.slice("scales", ss, sc).astype(np.float32)
            v = q.astype(np.float32) * scales[np.arange(c) // params["group_size"]]
        else:
            v = _to_f32(p.slice("values", s, c), vd)
        flat = _to_f32(b, bdtype).reshape(-1).copy()
        flat[pos] = flat[pos] + v
        out[t["name"]] = _from_f32(flat, t["dtype"]).reshape(t["shape"]), t["dtype"]
    return out


def _seeded_positions(seed: int, keep: float, size: int, count: int) -> np.ndarray:
    """Section 5 "Seeded positions": MT19937 seeded with seed mod 2**32 (numpy's RandomState), entry j
    kept when the low 24 bits of its 32-bit word are below float32(keep)·2**24."""
    words = np.random.RandomState(seed % 2**32).randint(0, 2**32, size=size, dtype=np.uint64)
    pos = np.flatnonzero((words & 0xFFFFFF) < float(np.float32(keep)) * 2**24)
    if pos.size != count:
        raise SpecError("seeded positions")
    return pos


def _lora(p: Payload, entry: dict[str, Any], bases: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    out = dict(bases["pretrained"])
    for t in p.table:
        if t["kind"] == "dense":
            out[t["name"]] = _dense(p, t)
            continue
        W, V = _factors(p, t)
        D = np.matmul(W, V.T)  # one float32 matrix product
        if t["layout"] != "linear":
            D = D.T
        b, bdtype = out[t["name"]]
        out[t["name"]] = _from_f32(_to_f32(b, bdtype) + D, t["dtype"]), t["dtype"]
    return out


def _factors(p: Payload, t: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(W = U ⊙ S, float32 products, V) of a lowrank entry (section 6)."""
    q, do, di = t["rank"], t["d_out"], t["d_in"]
    seg = p.slice(t["array"], t["start"], t["count"]).astype(np.float32)
    U, S, V = seg[:do * q].reshape(do, q), seg[do * q:do * q + q], seg[do * q + q:].reshape(di, q)
    return U * S, V


def lora_tolerance(root: str, task: str) -> dict[str, np.ndarray]:
    """Per lowrank tensor, how far two readers may differ (section 6): the roundings of a float32
    sum of q terms, q·2⁻²³·(|W|·|V|ᵀ), plus one rounding of the result."""
    m = read_manifest(root)
    p, out = Payload(root, m["tasks"][task]), {}
    for t in p.table:
        if t["kind"] == "lowrank":
            W, V = _factors(p, t)
            bound = t["rank"] * 2.0 ** -23 * (np.abs(W).astype(np.float64) @ np.abs(V).T.astype(np.float64))
            out[t["name"]] = bound if t["layout"] == "linear" else bound.T
    return out


def _bits(p: Payload, entry: dict[str, Any], bases: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    base, out = bases[entry["base"]], {}
    for t in p.table:
        if t["kind"] == "dense":
            out[t["name"]] = _dense(p, t)
            continue
        b, bdtype = base[t.get("base", t["name"])]
        if t["kind"] == "sparse":  # count 0: the base's tensor
            out[t["name"]] = b, bdtype
            continue
        n = math.prod(t["shape"])
        m = np.unpackbits(p.slice(t["array"], t["start"], t["count"]), bitorder="little")[:n].astype(bool)
        B = _to_f32(b, bdtype).reshape(-1)
        if entry["kind"] == "bitdelta":
            s = np.float32(t["scale"])
            x = B + np.where(m, s, -s)
        else:
            b0, b0dtype = bases["pretrained"][t.get("base", t["name"])]
            B0 = _to_f32(b0, b0dtype).reshape(-1)
            if entry["kind"] == "tall-mask":
                x = np.where(m, B, B0)
            else:  # emr
                x = np.where(m, B0 + np.float32(entry["params"]["scale"]) * (B - B0), B0)
        out[t["name"]] = _from_f32(x.astype(np.float32), t["dtype"]).reshape(t["shape"]), t["dtype"]
    return out


def _exact(p: Payload, entry: dict[str, Any], bases: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """Section 11: the words, XORed with the base tensor's bits where `xor`, as the tensor's bits."""
    base, out = bases[entry["base"]], {}
    for t in p.table:
        b, bdtype = base[t.get("base", t["name"])] if t.get("xor") or t["kind"] == "sparse" else (None, None)
        if t["kind"] == "sparse":  # count 0: the base's tensor
            out[t["name"]] = b, bdtype
            continue
        w = p.slice(t["array"], t["start"], t["count"])
        if t["xor"]:
            if bdtype != t["dtype"] or b.shape != tuple(t["shape"]):
                raise SpecError(f"{t['name']}: XOR against a base tensor of another shape or dtype")
            w = w ^ np.ascontiguousarray(b).reshape(-1).view(w.dtype)
        logical = np.dtype(np.uint16) if t["dtype"] == "bfloat16" else np.dtype(t["dtype"])
        out[t["name"]] = w.view(logical).reshape(t["shape"]), t["dtype"]
    return out
