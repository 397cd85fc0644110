"""Read model checkpoints one tensor at a time.

A source never loads a whole model: safetensors files are opened lazily and
PyTorch state-dict files are memory-mapped (`torch.load(mmap=True,
weights_only=True)`), so building a store from a checkpoint larger than RAM works.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from typing import Protocol

import torch
from safetensors import safe_open

from modelstore._runtime.shard_reads import ShardReader
from modelstore.errors import InputError
from modelstore.inputs.hub import resolve_input

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
#: Files of a model directory that a complete export needs besides weights and config.json.
SIDE_FILES = ("tokenizer*.json", "tokenizer.model", "spiece.model", "*.tiktoken", "special_tokens_map.json",
              "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "generation_config.json",
              "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja")
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


class TensorSource(Protocol):
    """What every reader of named tensors offers (checkpoints, in-memory dicts, store bases)."""

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> torch.Tensor: ...
    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` along its first dimension, read alone."""
        ...


def row_blocks(shape: tuple[int, ...], elements: int) -> list[tuple[int, int]]:
    """Row ranges of a tensor of `shape`, each about `elements` entries (whole rows, at least one):
    how a large tensor is worked on piece by piece."""
    if not shape:
        return [(0, 1)]
    row = math.prod(shape[1:])
    per = max(1, elements // max(row, 1))
    return [(r, min(shape[0], r + per)) for r in range(0, shape[0], per)] or [(0, 0)]


def read_rows(src: TensorSource, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of tensor `name` (a 0-d tensor as one row of one entry)."""
    return src.get(name).reshape(1) if not src.shape(name) else src.rows(name, start, stop)


class Renamed:
    """A TensorSource view of `src` under other names ({new name: src name}), e.g. a fine-tune
    seen under its base's names for merging (modelstore.inputs.naming)."""

    def __init__(self, src: TensorSource, names: Mapping[str, str]):
        self.src, self._names = src, dict(names)

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.src.shape(self._names[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.src.dtype(self._names[name])

    def get(self, name: str) -> torch.Tensor:
        return self.src.get(self._names[name])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.src.rows(self._names[name], start, stop)


def match_task_names(src: TensorSource, base_names: list[str], what: str) -> dict[str, str]:
    """task name -> base name for `src`'s tensors that stand for a base tensor (modelstore.inputs.naming).

    Raises:
        InputError: a tensor's name is ambiguous between base tensors, or two match one.
    """
    from modelstore.inputs.naming import match_names
    try:
        return match_names(src.names(), base_names, what)
    except ValueError as e:
        raise InputError(f"{e}; rename the checkpoint's tensors to the base model's") from None


def as_base_named(src: TensorSource, base_names: list[str], what: str) -> Renamed:
    """`src` under the base's names: its tensors that match a base tensor (for merging)."""
    return Renamed(src, {b: t for t, b in match_task_names(src, base_names, what).items()})


class DictSource:
    """A TensorSource over an in-memory state dict."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._t = dict(tensors)

    def names(self) -> list[str]:
        return list(self._t)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._t[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._t[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._t[name][start:stop]


class Checkpoint:
    """A model checkpoint on local disk: HF directory, safetensors file(s) or a state-dict file."""

    def __init__(self, path: str, files: list[str], config_json: str | None,
                 side_files: Mapping[str, str] | None = None):
        self.path = path
        self.files = files
        self.config_json = config_json
        #: The model directory's tokenizer and generation files, name -> path (kept with a base).
        self.side_files = dict(side_files or {})
        self._where: dict[str, int] = {}
        self._state_dicts: dict[int, dict[str, torch.Tensor]] = {}  # per pickle file, loaded once
        self._opened: dict[int, safe_open] = {}  # per safetensors file
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._offsets: dict[str, int] = {}  # safetensors tensors: where their data begins in the file
        self._readers: dict[int, ShardReader] = {}
        for i, f in enumerate(files):
            if f.endswith(".safetensors"):
                for name, (shape, dtype, offset) in _safetensors_header(f).items():
                    self._add(name, i, shape, dtype)
                    self._offsets[name] = offset
            else:
                sd = self._pickle(i)
                for name, t in sd.items():
                    if not isinstance(t, torch.Tensor):
                        raise InputError(f"{f}: entry {name!r} is not a tensor; give a plain state dict")
                    self._add(name, i, tuple(t.shape), t.dtype)
        if not self._where:
            raise InputError(f"{self.path}: the checkpoint holds no tensors; give the model's weights")

    def _add(self, name: str, i: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if name in self._where:
            raise InputError(f"{self.path}: tensor {name!r} appears in two shards; the checkpoint is inconsistent")
        self._where[name] = i
        self._meta[name] = (shape, dtype)

    def _pickle(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self._state_dicts:
            f = self.files[i]
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for bad pickles
                raise InputError(f"{f}: not a loadable PyTorch state dict ({type(e).__name__}); "
                                 "only weights_only files are read, convert it to safetensors") from None
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            if not isinstance(sd, dict):
                raise InputError(f"{f}: holds a {type(sd).__name__}, not a state dict")
            self._state_dicts[i] = sd
        return self._state_dicts[i]

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        i = self._where[name]
        f = self.files[i]
        if f.endswith(".safetensors"):
            if i not in self._opened:
                self._opened[i] = safe_open(f, framework="pt")
            return self._opened[i].get_tensor(name)
        return self._pickle(i)[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name`, read without the rest of it (from safetensors files
        a view of modelstore's own map, read ahead while the reads stream: modelstore/_runtime/shard_reads.py)."""
        i = self._where[name]
        if name in self._offsets:
            if i not in self._readers:
                self._readers[i] = ShardReader(self.files[i])
            shape, dtype = self._meta[name]
            return self._readers[i].rows(self._offsets[name], shape, dtype, start, stop)
        return self._pickle(i)[name][start:stop]

    def nbytes(self) -> int:
        """Bytes the tensors take uncompressed: the size of a full copy of the model."""
        return sum(math.prod(s) * d.itemsize for s, d in self._meta.values())

    def fingerprint(self) -> str:
        """Cheap identity of the input: sha256 over each file's name and size, its safetensors
        header, and 16 blocks of 64 KiB spread evenly over its tensor data (whole contents for
        pickle files). Checkpoints of one architecture share headers; the sampled data tells
        them apart without reading gigabytes."""
        h = hashlib.sha256()
        for f in self.files:
            size = os.path.getsize(f)
            h.update(os.path.basename(f).encode() + b"\0" + str(size).encode() + b"\0")
            with open(f, "rb") as fh:
                if not f.endswith(".safetensors"):
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
                    continue
                (n,) = struct.unpack("<Q", fh.read(8))
                h.update(fh.read(n))
                start, span = 8 + n, max(0, size - 8 - n)
                for i in range(_SAMPLES):
                    fh.seek(start + span * i // _SAMPLES)
                    h.update(fh.read(min(_SAMPLE_BYTES, span)))
        return "sha256:" + h.hexdigest()


def _safetensors_header(path: str) -> dict[str, tuple[tuple[int, ...], torch.dtype, int]]:
    """name -> (shape, dtype, byte offset of its data in the file), checked against the file's size."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    data = os.path.getsize(path) - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise InputError(f"{path}: tensor {name!r} has no header entry; the file is malformed")
        code = info.get("dtype")
        dt = _ST_DTYPES.get(code) if isinstance(code, str) else None
        if dt is None:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) \
                or not isinstance(offsets, list) or len(offsets) != 2 \
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
            raise InputError(f"{path}: tensor {name!r} has no valid shape or data offsets; the file is malformed")
        if offsets[1] - offsets[0] != math.prod(shape) * dt.itemsize:
            raise InputError(f"{path}: tensor {name!r} has data offsets {offsets}, not the "
                             f"{math.prod(shape) * dt.itemsize} bytes its shape {shape} of {info['dtype']} takes; "
                             "the file is malformed, write it again")
        if offsets[0] < 0 or offsets[1] > data:
            raise InputError(f"{path}: tensor {name!r} (data offsets {offsets}) lies outside the {data}-byte data "
                             "section; the file is truncated or malformed, write it again")
        out[name] = (tuple(shape), dt, 8 + n + offsets[0])
    _check_tiling(path, {name: (o - 8 - n, math.prod(s) * d.itemsize) for name, (s, d, o) in out.items()}, data)
    return out


def _check_tiling(path: str, spans: Mapping[str, tuple[int, int]], data: int) -> None:
    """Refuse tensors whose bytes overlap, or data bytes no tensor owns: the format lays tensors end
    to end over the whole data section (the safetensors library refuses anything else), and a reader
    of offsets trusting an overlap would hand two tensors the same bytes."""
    end, last = 0, None
    for name, (start, size) in sorted(spans.items(), key=lambda kv: kv[1]):
        if start < end:
            raise InputError(f"{path}: tensors {last!r} and {name!r} overlap (data bytes [{start}, {end})); "
                             "the file is malformed, write it again")
        if start > end:
            raise InputError(f"{path}: data bytes [{end}, {start}) before tensor {name!r} belong to no tensor; "
                             "the file is malformed, write it again")
        end, last = start + size, name
    if end != data:
        raise InputError(f"{path}: the last {data - end} bytes of the data section belong to no tensor; "
                         "the file is malformed, write it again")


def _shards(index_path: str) -> list[str]:
    try:
        with open(index_path) as fh:
            weight_map = json.load(fh)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{index_path}: not a valid shard index ({e})") from None
    root = os.path.dirname(index_path)
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise InputError(f"{index_path}: shard path {shard!r} leaves the model directory")
        full = os.path.join(root, shard)
        if not os.path.isfile(full):
            raise InputError(f"{index_path}: shard {shard} is missing")
        files.append(full)
    return files


def open_checkpoint(path: str) -> Checkpoint:
    """Open an HF model directory, a .safetensors file, a .bin/.pt state-dict file, or a Hub model
    id `org/name[@revision]` (modelstore.inputs.hub)."""
    path = resolve_input(path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "adapter_config.json")):
            raise InputError(f"{path} is a PEFT adapter, not a full model; add it with --lora")
        config = None
        if os.path.isfile(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as fh:
                config = fh.read()
        side = {f: os.path.join(path, f) for f in sorted(os.listdir(path))
                if any(fnmatch.fnmatchcase(f, p) for p in SIDE_FILES) and os.path.isfile(os.path.join(path, f))}
        for single, index in (("model.safetensors", "model.safetensors.index.json"),
                              ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            if os.path.isfile(os.path.join(path, single)):
                return Checkpoint(path, [os.path.join(path, single)], config, side)
            if os.path.isfile(os.path.join(path, index)):
                return Checkpoint(path, _shards(os.path.join(path, index)), config, side)
        raise InputError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                         "in this directory")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file or directory")
    if path.endswith(".safetensors"):
        return Checkpoint(path, [path], None)
    if path.endswith(_PICKLE_SUFFIXES):
        return Checkpoint(path, [path], None)
    raise InputError(f"{path}: unknown checkpoint type; give an HF model directory, a .safetensors file "
                     "or a .bin/.pt state dict")
