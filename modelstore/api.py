"""The free functions of the public API: each opens a Store and calls one of its methods."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from modelstore.format.paths import check_task_name
from modelstore.store import Store, serving_store


def open_store(url: str | os.PathLike[str], mode: str = "r", storage_options: Mapping[str, Any] | None = None,
               *, cache_base: bool | None = None) -> Store:
    """Open a store at a local path or fsspec URL (`s3://`, `memory://`, `hf://`...).

    >>> store = modelstore.open("s3://bucket/store", storage_options={"anon": False})
    >>> sd = store.load("sst2", device="cuda")

    Args:
        url: the store's location.
        mode: "r" to read, "a" to read and write (add_task, add_lora_task, remove, sync_to).
        storage_options: fsspec options of the location (endpoint_url, credentials...).
        cache_base: keep each base on its device from the first load (True), never (False: each
            load streams the base from storage into its output, needing the model's memory once),
            or from the second load on a base of at most $MODELSTORE_BASE_CACHE_BYTES, 4 GiB by
            default (None: a one-shot load never holds the base beside its result).

    Raises:
        StoreNotFoundError: no store there. FormatVersionError: written by a newer modelstore.
    """
    return Store(url, mode=mode, storage_options=storage_options, cache_base=cache_base)


def load(task: str, store: str | os.PathLike[str] | Store | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype | str | None = None, *,
         storage_options: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Load one task's full weights; `store` defaults to $MODELSTORE_URL, and a store given by URL
    opens with `storage_options` over $MODELSTORE_STORAGE_OPTIONS (see env_storage_options).

    >>> sd = modelstore.load("sst2", device="cuda")

    Raises:
        InputError: no store given and $MODELSTORE_URL unset, or storage options with an open Store.
        TaskNotFoundError: no such task.
    """
    return serving_store(store, storage_options).load(check_task_name(task), device=device, dtype=dtype)


def add_task(store: str | os.PathLike[str], name: str, path: str | os.PathLike[str], *, kind: str | None = None,
             keep: float | None = None, granularity: str | None = None, value_dtype: str | None = None,
             base: str | None = None, pretrained: str | os.PathLike[str] | None = None, overwrite: bool = False,
             storage_options: Mapping[str, Any] | None = None, progress: bool = False, **options: Any) -> Store:
    """Add one fully fine-tuned task to the store at `store`; see `Store.add_task` (`**options`: the
    other options of `kind`, e.g. `group_size`, `sparsify`, `seed`, `tall_lambda`, and the calibration
    keywords `calibration`, `min_agreement`, `max_kl`, `device`, `max_examples`, `max_length`).

    >>> modelstore.add_task("store", "qnli", "ft/qnli", keep=0.05, value_dtype="int8")
    >>> modelstore.add_task("store", "sst2", "ft/sst2", calibration="sst2-val.jsonl", min_agreement=0.99)

    Returns:
        The store, open for writing, with the task committed.
    """
    s = open_store(store, mode="a", storage_options=storage_options)
    s.add_task(name, path, kind=kind, keep=keep, granularity=granularity, value_dtype=value_dtype, base=base,
               pretrained=pretrained, overwrite=overwrite, progress=progress, **options)
    return s


def add_lora_task(store: str | os.PathLike[str], name: str, adapter: str | os.PathLike[str], *,
                  rank: int | None = None, energy: float | None = None,
                  pretrained: str | os.PathLike[str] | None = None, overwrite: bool = False,
                  storage_options: Mapping[str, Any] | None = None, progress: bool = False,
                  **calibrated: Any) -> Store:
    """Add a PEFT LoRA adapter to the store at `store` (PERU-LoRA); see `Store.add_lora_task`
    (`**calibrated`: `calibration`, `min_agreement`, `max_kl`, `device`, `max_examples`, `max_length`).

    >>> modelstore.add_lora_task("store", "sst2-lora", "adapters/sst2", rank=4)

    Returns:
        The store, open for writing, with the task committed.
    """
    s = open_store(store, mode="a", storage_options=storage_options)
    s.add_lora_task(name, adapter, rank=rank, energy=energy, pretrained=pretrained, overwrite=overwrite,
                    progress=progress, **calibrated)
    return s


def remove_task(store: str | os.PathLike[str], name: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove task `name` from the store at `store`: its manifest entry first, then its arrays.

    Raises:
        TaskNotFoundError: no such task.
    """
    open_store(store, mode="a", storage_options=storage_options).remove(name)


__all__ = ["open_store", "load", "add_task", "add_lora_task", "remove_task"]
