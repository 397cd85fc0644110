"""Mapping between torch dtypes and the names/encodings the store format uses.

Zarr v3 has no bfloat16, so bf16 tensors are kept as their uint16 bit patterns and
the logical dtype is recorded next to them (spec/FORMAT.md, "Data types").
"""

import numpy as np
import torch

from modelstore.errors import InputError

_BY_NAME = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAME = {v: k for k, v in _BY_NAME.items()}
#: Every logical dtype name a store may record.
LOGICAL_DTYPES = tuple(_BY_NAME)
# How each logical dtype is laid out in a zarr array (bit-identical reinterpretation).
_STORAGE = {"bfloat16": "uint16"}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
VALUE_DTYPES = ("float16", "bfloat16", "float32")


def dtype_name(dtype: torch.dtype) -> str:
    """Name of a torch dtype in the store format."""
    try:
        return _NAME[dtype]
    except KeyError:
        raise InputError(f"tensors of dtype {dtype} are not supported; "
                         "convert the checkpoint to a float dtype") from None


def torch_dtype(name: str) -> torch.dtype:
    """Torch dtype of a store-format dtype name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise InputError(f"unknown dtype {name!r}; expected one of {', '.join(_BY_NAME)}") from None


def storage_dtype(name: str) -> str:
    """Numpy/zarr dtype used to hold values of logical dtype `name`."""
    return _STORAGE.get(name, name)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor in its storage dtype (bf16 -> uint16 bits)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16)
    return t.numpy()


def logical_view(t: torch.Tensor, name: str) -> torch.Tensor:
    """A storage-dtype tensor seen as logical dtype `name` (uint16 bits -> bf16), on any device."""
    return t.view(torch.bfloat16) if name == "bfloat16" else t


def from_numpy(a: np.ndarray, name: str) -> torch.Tensor:
    """Tensor of logical dtype `name` from its storage array (uint16 bits -> bf16)."""
    return logical_view(torch.from_numpy(np.ascontiguousarray(a)), name)


def output_dtype(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """What a loaded tensor is cast to: the requested float dtype for float tensors, else its own."""
    return requested if requested is not None and stored.is_floating_point else stored


def requested_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A load's dtype argument: a torch float dtype, its name ("float16", "bfloat16", "torch.float32"),
    or None / "auto" to keep each tensor's stored dtype.

    Raises:
        InputError: not a floating dtype.
    """
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        resolved = _BY_NAME.get(name)
        if resolved is None or not resolved.is_floating_point:
            raise InputError(f"dtype {dtype!r} is not a floating dtype; use float32, float16, bfloat16 or auto")
        return resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating dtype, not {dtype}")
    return dtype
