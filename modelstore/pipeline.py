"""The write pipelines: inputs -> merge -> base, then each task -> sparse delta -> store."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .errors import InputError
from .fft import FFTOptions, check_finite, write_task
from .merging import get_method, mergeable, method_class
from .names import check_task_name
from .progress import bar
from .sources import Checkpoint, open_checkpoint
from .store import Store
from .writer import StoreWriter, write_base


def selector(include: str | None, exclude: str | None) -> Callable[[str], bool]:
    """Which tensor names are merged and sparsified: re.search(include) and not re.search(exclude)."""
    pats = []
    for flag, pat in (("--include", include), ("--exclude", exclude)):
        try:
            pats.append(re.compile(pat) if pat else None)
        except re.error as e:
            raise InputError(f"{flag} {pat!r} is not a valid regular expression: {e}") from None
    inc, exc = pats
    return lambda n: (inc is None or inc.search(n) is not None) and (exc is None or exc.search(n) is None)


def _stats_option(merge: str, tasks: Mapping[str, str], stats: Mapping[str, str] | None) -> dict[str, Any]:
    """Per-task statistics files as the method's data option (`fishers` / `grams`), in task order."""
    if not stats:
        return {}
    wanted = method_class(merge).data_options
    if not wanted:
        raise InputError(f"merge method {merge!r} uses no statistics; drop --stats")
    unknown = sorted(set(stats) - set(tasks))
    if unknown:
        raise InputError(f"--stats names {unknown[0]!r}, which is not a --task")
    missing = [t for t in tasks if t not in stats]
    if missing:
        raise InputError(f"merge method {merge!r} needs statistics for every task; --stats lacks {missing[0]!r}")
    return {wanted[0]: [stats[t] for t in tasks]}


def _source_info(ck: Checkpoint) -> dict[str, Any]:
    return {"path": os.path.abspath(ck.path), "fingerprint": ck.fingerprint()}


def _base_info(ck: Checkpoint, kind: str, merge: dict[str, Any], merged_tasks: list[str],
               include: str | None, exclude: str | None) -> dict[str, Any]:
    """Manifest fields of a base made from pre-trained checkpoint `ck` (spec: BASE ENTRY)."""
    return {"kind": kind, "merge": merge, "merged_tasks": merged_tasks,
            "selection": {"include": include, "exclude": exclude}, "source": _source_info(ck),
            "config_json": ck.config_json}


def build(store: str, pretrained: str, tasks: Mapping[str, str], *, merge: str = "task-arithmetic",
          keep: float = 0.1, granularity: str = "global", value_dtype: str | None = None,
          include: str | None = None, exclude: str | None = None, stats: Mapping[str, str] | None = None,
          merge_options: Mapping[str, Any] | None = None, storage_options: Mapping[str, Any] | None = None,
          progress: bool = False, **options: Any) -> Store:
    """Make a new store: merge the task models into one base, then store each task's sparse delta.

    >>> store = modelstore.build("out/store", "bert-base", {"sst2": "ft/sst2", "mnli": "ft/mnli"}, keep=0.1)

    `merge="none"` stores θ0 as the base (Post-Pruning). Options of the merge method go in
    `merge_options` or, when they do not collide with build's own (e.g. `lam=0.3`), as keywords;
    `granularity` is the top-k granularity of the deltas, TIES' own is `merge_options={"granularity": ...}`.
    `stats` maps each task to its statistics file for `fisher` / `regmean` (see docs/merging.md).
    """
    opts = FFTOptions(keep, granularity, value_dtype)
    opts.validate()
    for name in tasks:
        check_task_name(name)
    selected = selector(include, exclude)
    method = get_method(merge, **{**(merge_options or {}), **options, **_stats_option(merge, tasks, stats)})
    base_ck = open_checkpoint(pretrained)
    task_cks = {name: open_checkpoint(path) for name, path in tasks.items()}
    base_id = "pretrained" if merge == "none" else "merged"
    srcs = list(task_cks.values())
    if merge != "none" and not srcs:
        raise InputError(f"merge method {merge!r} needs at least one --task; use `modelstore init` for a base only")
    have = [set(s.names()) for s in srcs]
    names = [n for n in base_ck.names() if selected(n) and mergeable(
        base_ck.shape(n), base_ck.dtype(n), [s.shape(n) if n in h else None for s, h in zip(srcs, have)])]
    method.prepare(base_ck, srcs, names)
    merged = set(names)
    w = StoreWriter(store, storage_options, create=True)

    def base_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for n in bar(base_ck.names(), "base", progress):
            t0 = base_ck.get(n)
            check_finite(t0, f"pretrained tensor {n!r}")
            if n in merged and merge != "none":
                ts = []
                for tname, s in task_cks.items():
                    t = s.get(n)
                    check_finite(t, f"task {tname!r} tensor {n!r}")
                    ts.append(t.to(torch.float32))
                t0 = method.merge(n, t0.to(torch.float32), ts).to(t0.dtype)
            yield n, t0

    specs = [(n, base_ck.shape(n), base_ck.dtype(n)) for n in base_ck.names()]
    write_base(w, base_id, specs, base_tensors(), _base_info(base_ck, base_id, method.parameters(),
                                                             list(tasks) if merge != "none" else [], include, exclude))
    stored = w.reopen("a").stored_base(base_id)
    for name, ck in task_cks.items():
        write_task(w, name, ck, base_id, stored, selected, opts, source_info=_source_info(ck),
                   full_bytes=ck.nbytes(), progress=progress)
    return w.reopen("r")


def init(store: str, pretrained: str, *, storage_options: Mapping[str, Any] | None = None,
         progress: bool = False) -> Store:
    """Make a store that holds only the pre-trained θ0 (for Post-Pruning or LoRA tasks added later)."""
    return build(store, pretrained, {}, merge="none", storage_options=storage_options, progress=progress)


def add_task(store: str, name: str, path: str, *, keep: float = 0.1, granularity: str = "global",
             value_dtype: str | None = None, base: str | None = None, overwrite: bool = False,
             storage_options: Mapping[str, Any] | None = None, progress: bool = False) -> Store:
    """Add one fully fine-tuned task to an existing store against its current base.

    The base and the other tasks are not rewritten. `base` picks "merged" or
    "pretrained" when the store has both (default: merged if present).
    """
    opts = FFTOptions(keep, granularity, value_dtype)
    opts.validate()
    w = StoreWriter(store, storage_options)
    w.check_new_task(name, overwrite)
    bases = w.manifest["bases"]
    base_id = base or ("merged" if "merged" in bases else "pretrained")
    if base_id not in bases:
        raise InputError(f"{store} has no {base_id} base; it has: {', '.join(bases) or 'none'}")
    sel = bases[base_id].get("selection", {})
    ck = open_checkpoint(path)
    stored = w.reopen("a").stored_base(base_id)
    write_task(w, name, ck, base_id, stored, selector(sel.get("include"), sel.get("exclude")), opts,
               source_info=_source_info(ck), full_bytes=ck.nbytes(), overwrite=overwrite, progress=progress)
    return w.reopen("r")


def add_lora_task(store: str, name: str, adapter: str, *, rank: int | None = None, energy: float | None = None,
                  pretrained: str | None = None, overwrite: bool = False,
                  storage_options: Mapping[str, Any] | None = None, progress: bool = False) -> Store:
    """Add a PEFT LoRA adapter as task `name`: rank-q SVD factors of each update, on θ0 (PERU-LoRA).

    `rank=q` (default 16) or `energy=E` (per module, the smallest q keeping a fraction E of the
    squared Frobenius norm). A store without θ0 (built with a merge) needs `pretrained` once: it
    is checked against the fingerprint of the model the store was built from and stored.
    """
    from .lora.task import check_rank_energy, write_lora_task
    rank, energy = check_rank_energy(rank, energy)
    w = StoreWriter(store, storage_options)
    w.check_new_task(name, overwrite)
    if "pretrained" not in w.manifest["bases"]:
        if pretrained is None:
            raise InputError(f"{store} keeps no pre-trained base (θ0), which LoRA tasks sit on; "
                             "pass --pretrained PATH (the model this store was built from) once")
        _add_pretrained_base(w, pretrained, progress)
    stored = w.reopen("a").stored_base("pretrained")
    write_lora_task(w, name, adapter, stored, rank=rank, energy=energy, overwrite=overwrite, progress=progress,
                    source_info={"path": os.path.abspath(adapter), "fingerprint": _adapter_fingerprint(adapter)})
    return w.reopen("r")


def _add_pretrained_base(w: StoreWriter, path: str, progress: bool) -> None:
    ck = open_checkpoint(path)
    want = next(iter(w.manifest["bases"].values()), {}).get("source", {}).get("fingerprint")
    got = ck.fingerprint()
    if want is not None and want != got:
        raise InputError(f"{path} is not the pre-trained model this store was built from (fingerprint differs)")
    write_base(w, "pretrained", [(n, ck.shape(n), ck.dtype(n)) for n in ck.names()],
               ((n, ck.get(n)) for n in bar(ck.names(), "pretrained base", progress)),
               _base_info(ck, "pretrained", {"method": "none"}, [], None, None))


def _adapter_fingerprint(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    for f in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        full = os.path.join(path, f)
        if os.path.isfile(full):
            with open(full, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return "sha256:" + h.hexdigest()


def remove_task(store: str, name: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove a task: its manifest entry first, then its arrays."""
    StoreWriter(store, storage_options).remove_task(name)
