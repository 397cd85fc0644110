"""Building a store: inputs -> merge -> base, then each task -> its kind -> the store."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from modelstore._runtime.progress import bar
from modelstore.errors import InputError, StoreNotFoundError
from modelstore.fidelity.data import Calibration, as_calibration
from modelstore.format.codecs import BASE_CODECS
from modelstore.format.paths import check_task_name
from modelstore.inputs.selection import selector
from modelstore.inputs.sources import (
    Checkpoint,
    as_base_named,
    open_checkpoint,
    read_rows,
    row_blocks,
)
from modelstore.kinds import checkpoint_kind
from modelstore.kinds.fft.sparse_delta import check_finite
from modelstore.merging import get_method, mergeable, method_class
from modelstore.store import Store, base_fields, calibration_target


def _stats_option(merge: str, tasks: Mapping[str, Any], stats: Mapping[str, str] | None) -> dict[str, Any]:
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


#: Entries of a tensor merged at once by a rowwise merge method (a few MB per task, cache-sized).
MERGE_BLOCK_ELEMENTS = 1 << 20
#: Base entry fields that must match for a build to resume an interrupted one (rather than refuse).
_RESUME_FIELDS = ("kind", "merge", "merged_tasks", "selection", "source", "merged_sources")


def _resume(store: str | os.PathLike[str], storage_options: Mapping[str, Any] | None, base_id: str,
            fields: Mapping[str, Any]) -> Store | None:
    """The store at `store` open for writing if it is this build interrupted after its base, None if
    there is no store there.

    Raises:
        InputError: a different store is there.
    """
    try:
        existing = Store(store, mode="a", storage_options=storage_options)
    except StoreNotFoundError:
        return None
    have = existing.manifest["bases"].get(base_id)
    same = have is not None and all(have.get(k) == fields.get(k) for k in _RESUME_FIELDS if k != "source") \
        and have.get("source", {}).get("fingerprint") == fields["source"]["fingerprint"]
    if not same:
        raise InputError(f"{store} already holds a store built from other inputs or settings; add tasks with "
                         "`modelstore add-task`, or build into a new location")
    return existing


def build(store: str | os.PathLike[str], pretrained: str | os.PathLike[str],
          tasks: Mapping[str, str | os.PathLike[str]], *, merge: str | None = None, kind: str = "fft",
          keep: float | None = None, granularity: str | None = None, value_dtype: str | None = None,
          kind_options: Mapping[str, Any] | None = None, include: str | None = None,
          exclude: str | None = None, stats: Mapping[str, str] | None = None,
          merge_options: Mapping[str, Any] | None = None, base_codec: str = "lz4",
          calibration: Mapping[str, str | os.PathLike[str] | Calibration] | None = None,
          min_agreement: float | None = None, max_kl: float | None = None, device: str | torch.device | None = None,
          max_examples: int | None = 256, max_length: int = 256, bound: bool = False,
          storage_options: Mapping[str, Any] | None = None,
          progress: bool = False, **options: Any) -> Store:
    """Make a new store: merge the task models into one base, then store each task with its kind
    (by default its sparse delta, PERU-FFT).

    >>> store = modelstore.build("out/store", "bert-base", {"sst2": "ft/sst2", "mnli": "ft/mnli"}, keep=0.1)
    >>> store = modelstore.build("out/emr", "bert-base", {"sst2": "ft/sst2", "mnli": "ft/mnli"}, kind="emr")

    Args:
        store: where the new store goes (a path or fsspec URL); it must not hold a store yet.
        pretrained: the pre-trained checkpoint θ0.
        tasks: task name -> fully fine-tuned checkpoint.
        merge: the merge method that makes the shared base ("none": Post-Pruning, θ* = θ0); default
            the kind's own (`emr` for kind "emr"), else "task-arithmetic".
        kind: how each task is kept: "fft", "tall-mask", "emr" or "bitdelta" (see `Store.add_task`);
            tall-mask and emr keep θ0 as a second base.
        keep, granularity, value_dtype: fft: how each task's delta is sparsified (see `Store.add_task`).
        kind_options: the kind's other options by keyword (`group_size`, `sparsify`, `seed`,
            `tall_lambda`).
        include, exclude: regexes choosing which tensors are merged and sparsified.
        stats: task -> statistics file, for `fisher` / `regmean` (docs/merging.md).
        merge_options: the merge method's options; options that do not collide with build's own
            may also be passed as keywords (e.g. `lam=0.3`). TIES' own granularity goes here.
        base_codec: how the base's values are written: "lz4" (bit-shuffled lz4: 25% smaller for
            bf16, 12% for float32) or "none" (uncompressed: a load reads the base straight into
            its output, as safetensors does, instead of decoding it).
        calibration: task -> its calibration data (a file or a `Calibration`): that task is stored
            at the fewest bytes meeting `min_agreement` / `max_kl` on it (see `Store.add_task`;
            `device`, `max_examples`, `max_length` and `bound` as there); the other tasks with the
            settings above.
        storage_options: fsspec options of the store's location.
        progress: draw progress bars on a terminal.

    Returns:
        The new store, open for writing.

    Raises:
        InputError: a bad option or input, or `store` already holds a different store; checked
            before anything is written. Rerunning an interrupted build resumes it: the committed
            base is kept when it was made from the same inputs and settings, and the missing
            tasks are added.
    """
    task_kind = checkpoint_kind(kind)
    if base_codec not in BASE_CODECS:
        raise InputError(f"unknown base codec {base_codec!r}; use one of {', '.join(BASE_CODECS)}")
    fft = {"keep": keep, "granularity": granularity, "value_dtype": value_dtype}
    given = {**{k: v for k, v in fft.items() if v is not None}, **(kind_options or {})}
    task_kind.parse_options(given)  # refused now, before anything is written
    merge = merge or task_kind.default_merge or "task-arithmetic"
    for name in tasks:
        check_task_name(name)
    calibration = dict(calibration or {})
    if unknown := [n for n in calibration if n not in tasks]:
        raise InputError(f"--calibration {unknown[0]}=...: no --task {unknown[0]} to calibrate")
    if (min_agreement is not None or max_kl is not None or bound) and not calibration:
        raise InputError("--min-agreement / --max-kl / --bound need --calibration NAME=FILE for the tasks they apply "
                         "to")
    if calibration:
        calibration_target(min_agreement, max_kl, {}, bound)  # a bad target is refused before the base is written
    # read now: bad data stores nothing
    cals = {n: as_calibration(c, max_examples, max_length) for n, c in calibration.items()}

    def add(out: Store, name: str, ck: Checkpoint, overwrite: bool = False) -> None:
        if name in cals:
            out.add_task(name, ck, base=base_id, overwrite=overwrite, progress=progress, calibration=cals[name],
                         min_agreement=min_agreement, max_kl=max_kl, device=device, bound=bound)
        else:
            out.add_task(name, ck, kind=kind, base=base_id, overwrite=overwrite, progress=progress, **given)

    selected = selector(include, exclude)
    method = get_method(merge, **{**task_kind.merge_defaults.get(merge, {}), **(merge_options or {}), **options,
                                  **_stats_option(merge, tasks, stats)})
    base_ck = open_checkpoint(os.fspath(pretrained))
    task_cks = {name: open_checkpoint(os.fspath(path)) for name, path in tasks.items()}
    base_id = "pretrained" if merge == "none" else "merged"
    # the kind refuses a base it cannot use (from its name: the base is not written yet)
    task_kind.base_id({base_id}, base_id)
    keep_theta0 = "pretrained" in task_kind.extra_bases and base_id != "pretrained"  # θ0 next to θ*
    srcs = [as_base_named(ck, base_ck.names(), f"task {name!r}") for name, ck in task_cks.items()]
    if merge != "none" and not srcs:
        raise InputError(f"merge method {merge!r} needs at least one --task; use `modelstore init` for a base only")
    have = [set(s.names()) for s in srcs]
    names = [n for n in base_ck.names() if selected(n) and mergeable(
        base_ck.shape(n), base_ck.dtype(n), [s.shape(n) if n in h else None for s, h in zip(srcs, have)])]
    fields = base_fields(base_ck, base_id, method.parameters(), list(tasks) if merge != "none" else [],
                         include, exclude)
    fields["codec"] = base_codec
    fields["merged_sources"] = {n: ck.fingerprint() for n, ck in task_cks.items()} if merge != "none" else {}
    out = _resume(store, storage_options, base_id, fields)
    if out is not None:  # an interrupted build of the same store: keep its base, add what is missing
        if keep_theta0 and "pretrained" not in out.manifest["bases"]:
            out.add_pretrained(pretrained, progress)
        for name, ck in task_cks.items():
            done = out.manifest["tasks"].get(name)
            if done is None or done.get("source", {}).get("fingerprint") != ck.fingerprint():
                add(out, name, ck, overwrite=done is not None)
        return out
    method.prepare(base_ck, srcs, names)
    merged = set(names)
    out = Store.create(store, storage_options)

    def merged_rows(n: str, t0: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        """θ* of tensor `n` (of rows [r0, r1) for a rowwise method), computed in float32."""
        ts = []
        for tname, s in zip(task_cks, srcs):
            t = s.get(n) if rows is None else read_rows(s, n, *rows)
            check_finite(t, f"task {tname!r} tensor {n!r}")
            ts.append(t.to(torch.float32))
        return method.merge(n, t0.to(torch.float32), ts).to(t0.dtype)

    def base_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for n in bar(base_ck.names(), "base", progress):
            t0 = base_ck.get(n)
            check_finite(t0, f"pretrained tensor {n!r}")
            if n in merged and merge != "none":
                if method.rowwise and t0.dim():  # in blocks: memory for a block of each task, not a tensor
                    out = torch.empty_like(t0)
                    for r0, r1 in row_blocks(tuple(t0.shape), MERGE_BLOCK_ELEMENTS):
                        out[r0:r1] = merged_rows(n, t0[r0:r1], (r0, r1))
                    t0 = out
                else:
                    t0 = merged_rows(n, t0, None)
            yield n, t0

    specs = [(n, base_ck.shape(n), base_ck.dtype(n)) for n in base_ck.names()]
    out._write_base(base_id, specs, base_tensors(), fields, base_ck.side_files)
    if keep_theta0:
        out.add_pretrained(pretrained, progress)
    for name, ck in task_cks.items():
        add(out, name, ck)
    return out


def init(store: str | os.PathLike[str], pretrained: str | os.PathLike[str], *, base_codec: str = "lz4",
         storage_options: Mapping[str, Any] | None = None, progress: bool = False) -> Store:
    """Make a store that holds only the pre-trained θ0 (for Post-Pruning or LoRA tasks added later);
    `base_codec` as for `build`.

    Raises:
        InputError: a bad checkpoint, or `store` already holds a store.
    """
    return build(store, pretrained, {}, merge="none", base_codec=base_codec, storage_options=storage_options,
                 progress=progress)


__all__ = ["build", "init"]
