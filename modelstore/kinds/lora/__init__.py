"""PERU-LoRA: read PEFT LoRA adapters, truncate their updates to rank q, export them as PEFT adapters."""

from modelstore.kinds.lora.adapter import (
    LoraAdapter,
    LoraError,
    LoraModule,
    SavedTensor,
    read_adapter,
    resolve_names,
)
from modelstore.kinds.lora.peft_export import write_peft_adapter
from modelstore.kinds.lora.svd import LowRank, compress_adapter, truncated_svd

__all__ = [
    "LoraAdapter",
    "LoraError",
    "LoraModule",
    "LowRank",
    "SavedTensor",
    "compress_adapter",
    "read_adapter",
    "resolve_names",
    "truncated_svd",
    "write_peft_adapter",
]
