"""The Store: one object that reads a store and, opened with mode "a", writes it.

A store is a zarr v3 hierarchy on any fsspec location plus `manifest.json`, the single object
that lists bases and tasks. Writers put a payload under a fresh directory and replace the
manifest last, so readers never see a partial task. What a task *is* (a sparse delta, LoRA
factors) is its kind's business (modelstore.kinds); the Store moves payloads between the
storage layer and the kinds.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from itertools import chain
from typing import Any, Literal, NamedTuple, TypeVar, cast, overload

import torch

from modelstore._runtime.prefetch import read_ahead
from modelstore._runtime.progress import bar
from modelstore._runtime.units import parse_size
from modelstore.errors import (
    ConflictError,
    CorruptStoreError,
    InputError,
    TaskExistsError,
    TaskNotFoundError,
)
from modelstore.fidelity.choose import StoreSide, adapted_tensors, checkpoint_tensors, choose
from modelstore.fidelity.data import Calibration, as_calibration
from modelstore.fidelity.runner import Runner, Tensors, preprocessor_for
from modelstore.fidelity.search import Setting, Skip, Target
from modelstore.format import dtypes
from modelstore.format.codecs import BASE_CODECS
from modelstore.format.manifest import (
    BaseEntry,
    BaseFields,
    Manifest,
    TableEntry,
    TaskEntry,
    new_manifest,
    now,
    same_content,
    task_bases,
)
from modelstore.format.paths import base_dir, check_task_name, task_dir
from modelstore.format.payload import (
    PayloadFields,
    PayloadReader,
    PayloadWriter,
    Segments,
)
from modelstore.inputs.sources import Checkpoint, TensorSource, open_checkpoint
from modelstore.inputs.vocabulary import vocabulary_differs
from modelstore.kinds import (
    AdapterInput,
    LoraOptions,
    StoredAdapter,
    TaskKind,
    WithOtherBases,
    checkpoint_kind,
    get_kind,
)
from modelstore.kinds.base import Edit, Replace
from modelstore.serving import switching
from modelstore.serving.modules import ModuleTensors, Placement
from modelstore.storage import Location
from modelstore.storage.garbage import GcReport, collect, parse_duration
from modelstore.storage.integrity import (
    CheckReport,
    check_store,
    payload_reader,
    read_model_files,
    write_model_files,
)
from modelstore.storage.transaction import Transactions
from modelstore.storage.transfer import SyncReport, sync

TensorSpec = tuple[str, tuple[int, ...], torch.dtype]
Read = TypeVar("Read")
Entry = TypeVar("Entry", TaskEntry, BaseEntry)
#: The file a task keeps its fine-tune's config.json as (spec section 2), beside its payload.
TASK_CONFIG = "config.json"
#: Bases up to this size are kept on the device from the second load of a task on that base, so
#: later loads read only their task's arrays (a one-shot load streams it and never holds the base
#: beside its result); larger ones are always streamed from storage into each load's output, so a
#: load needs about the model's memory once, not twice. `open(..., cache_base=True)` keeps it from
#: the first load, `cache_base=False` never.
BASE_CACHE_BYTES = int(os.environ.get("MODELSTORE_BASE_CACHE_BYTES", 4 << 30))
#: The agreement a calibrated add-task meets when the user names no target.
DEFAULT_AGREEMENT = 0.99


class Store:
    """An open store. Use `modelstore.open(url)` (read) or `modelstore.open(url, mode="a")` (read and write).

    From the second load on a base (up to $MODELSTORE_BASE_CACHE_BYTES), the base is kept on its
    device, so each further load reads only its task's arrays; a one-shot load streams it.
    """

    def __init__(self, url: str | os.PathLike[str], mode: str = "r",
                 storage_options: Mapping[str, Any] | None = None, *, cache_base: bool | None = None,
                 _create: bool = False):
        if mode not in ("r", "a"):
            raise InputError(f"mode must be 'r' or 'a', not {mode!r}")
        url = os.fspath(url)
        self.mode = mode
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.cache_base = cache_base
        self.loc = Location(url, storage_options, read_only=(mode == "r"), create=_create)
        if _create:  # the manifest is first published with the store's first commit (its base)
            if self.loc.read_manifest() is not None:
                raise InputError(f"{url} already holds a store; "
                                 "add tasks with `modelstore add-task` or remove it first")
            self.manifest: Manifest = new_manifest()
        else:
            self.manifest = self.loc.require_manifest()
        #: (base id, payload path, device) -> the base kept on that device
        self._bases: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
        #: (base id, payload path, device) of bases streamed once: the next load keeps them
        self._streamed: set[tuple[str, str, str]] = set()
        self._txn = Transactions(self.loc)  # this writer's payloads in flight

    @classmethod
    def create(cls, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Store:
        """A new, empty store at `url`, open for writing.

        Raises:
            InputError: `url` already holds a store.
        """
        return cls(url, mode="a", storage_options=storage_options, _create=True)

    # -- listing ---------------------------------------------------------------
    def tasks(self) -> list[str]:
        """Names of the committed tasks now (the manifest is read again), sorted."""
        self._refresh()
        return sorted(self.manifest["tasks"])

    def entry(self, task: str) -> TaskEntry:
        """The manifest entry of `task`, as last read (by `tasks` or a read of the task's tensors);
        a task not in it is looked for again in the current manifest before it is reported missing.

        Raises:
            TaskNotFoundError: the store has no such task.
        """
        if task not in self.manifest["tasks"]:
            self._refresh()
        return self._task_entry(task)

    def _task_entry(self, task: str, before: Manifest | None = None) -> TaskEntry:
        """`task`'s entry in the manifest; `before`, the manifest as read before, tells a task
        another writer removed meanwhile from one never there."""
        try:
            return self.manifest["tasks"][task]
        except KeyError:
            if before is not None and task in before["tasks"]:
                raise TaskNotFoundError(f"{self.url}: task {task!r} was removed by another writer") from None
            raise TaskNotFoundError(f"{self.url} has no task {task!r}; `modelstore ls {self.url}` lists them") from None

    def table(self, task: str) -> list[TableEntry]:
        """The tensor table of `task` (spec section 3), checked against the manifest's digest."""
        return self._reading_task(task, lambda e: self._payload(e, f"task {task!r}", get_kind(e["kind"])).table)

    def kind(self, task: str) -> TaskKind:
        """The task kind that wrote `task` (modelstore.kinds)."""
        return get_kind(self.entry(task)["kind"])

    def info(self, task: str | None = None) -> dict[str, Any]:
        """Summary of the store now (the manifest is read again), or of one task as `entry` gives it
        (method, parameters, kept count, bytes on disk)."""
        if task is not None:
            e: dict[str, Any] = dict(self.entry(task))
            e["name"] = task
            e["ratio"] = e["bytes"] / e["full_bytes"] if e.get("full_bytes") else None
            return e
        self._refresh()
        bases = {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in self.manifest["bases"].items()}
        task_bytes = sum(e["bytes"] for e in self.manifest["tasks"].values())
        base_bytes = sum(b["bytes"] for b in self.manifest["bases"].values())
        full = sum(e.get("full_bytes") or 0 for e in self.manifest["tasks"].values())
        return {"url": self.url, "format_version": self.manifest["version"], "bases": bases,
                "tasks": self.tasks(), "writers": self.loc.slot.writers,
                "generation": self.manifest.get("generation", 0),
                "bytes": base_bytes + task_bytes, "base_bytes": base_bytes,
                "task_bytes": task_bytes, "full_bytes": full,
                "ratio": (base_bytes + task_bytes) / full if full else None}

    # -- reading ---------------------------------------------------------------
    def _payload(self, entry: PayloadFields, what: str, kind: TaskKind | None = None,
                 bases: Mapping[str, _BaseTensors] | None = None) -> PayloadReader:
        specs = {b: base.specs() for b, base in (bases or {}).items()}
        return payload_reader(self.loc, entry, what, kind, specs)

    def _reading_task(self, task: str, read: Callable[[TaskEntry], Read]) -> Read:
        """`_reading` of task `task`."""
        return self._reading(lambda before: self._task_entry(task, before), read)

    def _reading(self, find: Callable[[Manifest], Entry], read: Callable[[Entry], Read]) -> Read:
        """`read(entry)` of the entry `find` picks from the store's manifest as it is now (`find`
        gets the one read before), for a Store that lives while other processes write: the
        manifest is read again first, and once more if the payload vanished meanwhile (another
        writer replaced or removed it between the two reads). So a read never serves a replaced
        payload, and never calls a store damaged that is only newer than this object.

        Raises:
            TaskNotFoundError: no such task in the current manifest.
            CorruptStoreError: the payload the current manifest lists is damaged or missing.
        """
        before = self.manifest
        self._refresh()
        entry = find(before)
        try:
            return read(entry)
        except CorruptStoreError:
            before = self.manifest
            self._refresh()
            if find(before)["path"] == entry["path"]:
                raise
        return read(find(before))

    def _base_entry(self, base_id: str) -> BaseEntry:
        b = self.manifest["bases"].get(base_id)
        if b is None:
            raise CorruptStoreError(f"{self.url}: base {base_id!r} is not in the manifest")
        return b

    def _stored_base(self, base_id: str) -> PayloadReader:
        """The base as a TensorSource read tensor by tensor (bounded memory, for writers)."""
        return self._payload(self._base_entry(base_id), f"base {base_id!r}")

    def base(self, base_id: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The base tensors (stored dtypes) on `device`, read once per open store, device and
        payload (a base another writer replaced is read again)."""
        device = torch.device(device)
        return self._reading(lambda before: self._base_entry(base_id), lambda e: self._base(base_id, e, device))

    def _base(self, base_id: str, entry: BaseEntry, device: torch.device) -> dict[str, torch.Tensor]:
        key = (base_id, entry["path"], str(device))
        if key not in self._bases:
            payload = self._payload(entry, f"base {base_id!r}")
            arrays = payload.read_arrays(device)
            tensors = {e["name"]: dtypes.logical_view(arrays[e["array"]][e["start"]:e["start"] + e["count"]],
                                                      e["dtype"]).view(e["shape"]) for e in payload.table}
            for k in [k for k in self._bases if k[0] == base_id and k[2] == key[2]]:  # a replaced payload's
                del self._bases[k]
            self._bases[key] = tensors
        return self._bases[key]

    def _kept_base(self, base_id: str, device: torch.device) -> dict[str, torch.Tensor] | None:
        """The base kept on `device` if it is the manifest's payload, else None (reads nothing)."""
        return self._bases.get((base_id, self._base_entry(base_id)["path"], str(device)))

    @overload
    def load(self, task: str, device: str | torch.device = ..., dtype: torch.dtype | str | None = ...,
             merged: Literal[True] = ...) -> dict[str, torch.Tensor]: ...

    @overload
    def load(self, task: str, device: str | torch.device = ..., dtype: torch.dtype | str | None = ...,
             *, merged: Literal[False]) -> StoredAdapter: ...

    def load(self, task: str, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
             merged: bool = True) -> dict[str, torch.Tensor] | StoredAdapter:
        """The full weights of `task` as a state dict on `device`.

        Args:
            task: a task name of this store.
            device: where the tensors are made; only the compressed payload crosses to it.
            dtype: None or "auto" keeps each tensor's stored dtype; a float dtype (or its name,
                "float16", "bfloat16", "float32") casts the floating tensors.
            merged: False returns a LoRA task's factors instead (a `StoredAdapter`: low-rank
                updates U·diag(S)·Vᵀ and whole tensors), to serve the base unmerged.

        Raises:
            TaskNotFoundError: no such task.
            CorruptStoreError: a stored byte fails its checksum.
            InputError: `dtype` is not a floating dtype, or merged=False for a kind without factors.
        """
        dtype = dtypes.requested_dtype(dtype)
        device = torch.device(device)
        return self._reading_task(task, lambda e: self._load(task, e, device, dtype, merged))

    def _load(self, task: str, entry: TaskEntry, device: torch.device, dtype: torch.dtype | None,
              merged: bool) -> dict[str, torch.Tensor] | StoredAdapter:
        kind = get_kind(entry["kind"])
        if not merged and not kind.has_unmerged:
            raise InputError(f"task {task!r} is {kind.title}; merged=False applies to tasks kept as factors "
                             "(LoRA tasks) only")
        if merged:
            return dict(self._tensors(task, entry, device, dtype))
        payload = self._payload(entry, f"task {task!r}", kind)
        segments = payload.stream(device)
        adapter = kind.unmerged(segments, payload.table, entry, device)
        segments.close()
        return adapter

    def tensors(self, task: str, device: str | torch.device = "cpu",
                dtype: torch.dtype | str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """`task`'s full weights one tensor at a time (what `load` collects), so a caller writing
        them out (export) or copying them into a model never holds the model twice. The task is
        the one the store holds when the first tensor is asked for.

        Raises:
            TaskNotFoundError, CorruptStoreError, InputError: as `load`.
        """
        device, want = torch.device(device), dtypes.requested_dtype(dtype)
        self.entry(task)  # a missing task is reported here, not at the first tensor

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            yield from self._reading_task(task, lambda e: _started(self._tensors(task, e, device, want)))

        return stream()

    def _tensors(self, task: str, entry: TaskEntry, device: torch.device, dtype: torch.dtype | None,
                 check: Callable[[dict[str, tuple[int, ...]]], None] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
        """The task's tensors one at a time: its arrays and (unless cached) its base are streamed.
        `check` sees the names and shapes that will come before the first tensor is made."""
        kind = get_kind(entry["kind"])
        bases = {b: _BaseTensors(self, b, device) for b in task_bases(entry)}
        try:
            payload = self._payload(entry, f"task {task!r}", kind, bases)  # its table checked against them
        except BaseException:
            for b in bases.values():
                b.abandon()
            raise
        base = bases[entry["base"]]
        base.others = bases
        if check is not None:
            check(output_shapes(kind, payload.table, base.specs()))
        segments = payload.stream(device)
        try:
            yield from kind.tensors(segments, payload.table, base, entry, device, dtype)
            segments.close()
            for b in bases.values():
                b.close()
        except CorruptStoreError as e:
            raise CorruptStoreError(f"{self.url}: task {task!r}: {e}" if self.url not in str(e) else str(e)) from None

    def _cached_base(self, base_id: str, device: torch.device) -> dict[str, torch.Tensor] | None:
        """The base kept on `device`, reading it now if the cache policy keeps it, else None (the
        caller streams it): by default a small base is kept from its second use on a device."""
        entry = self._base_entry(base_id)
        if self._kept_base(base_id, device) is None:
            if self.cache_base is None:
                key = (base_id, entry["path"], str(device))
                if (entry.get("nbytes") or 0) > BASE_CACHE_BYTES or key not in self._streamed:
                    self._streamed.add(key)  # the next load on this base keeps it
                    return None
            elif not self.cache_base:
                return None
        return self._base(base_id, entry, device)

    def collect_garbage(self, grace: str | float = "1h", dry_run: bool = False, force: bool = False) -> GcReport:
        """Remove payload directories no manifest references (left by writers killed before their
        commit) that are older than `grace` ("30m", "1h", or seconds) and that no writer at work
        holds a lease on, and killed writers' leftovers; never a referenced one. A grace under 10
        minutes needs `force` (a dry run deletes nothing and needs none).

        Returns:
            What was removed, what was kept as younger than `grace` or leased, and the bytes freed.

        Raises:
            InputError: a read-only store, `grace` is not a duration, or is under 10 minutes without `force`.
        """
        if not dry_run:
            self._require_writable()
        grace_s = parse_duration(grace) if isinstance(grace, str) else float(grace)
        return collect(self.loc, grace_s, dry_run, force)

    def check(self) -> CheckReport:
        """Read every base and task back and verify it (checksums, tables, sizes), without the originals.

        Returns:
            The sound and the damaged bases and tasks, with what is wrong with each.
        """
        manifest = self.loc.require_manifest()

        def load(task: str) -> None:  # as `load` reads it (the same checks, the same decoding), dropped
            for _ in self._tensors(task, manifest["tasks"][task], torch.device("cpu"), None):
                pass

        return check_store(self.loc, manifest, load)

    def load_into(self, model: torch.nn.Module, task: str, strict: bool = True) -> torch.nn.Module:
        """Copy `task`'s weights into `model` in place, on the model's device.

        Tensors are made and copied one at a time, so the model's memory is never needed twice.
        Each task tensor goes to the model tensor of its name, or of its name with a first
        component stripped or added (a `bert.…` classifier task into a `bert.…` model over a base
        saved as `…`, as add-task matched them); a buffer the model does not keep in its state dict
        (transformers 5's position_ids) is left to the model. Tied weights (one tensor under two
        names, like GPT-2's lm_head and wte) are written once, and a tied name the store lacks is
        not missing.

        Args:
            strict: also require every tensor of the model to get one (False leaves the model's
                tensors the task lacks as they are).

        Raises:
            InputError: a task tensor has no place in the model or another shape there (nothing is
                written), or with `strict` a model tensor gets none.
        """
        target = ModuleTensors(model)
        switching.forget(model)

        def copy(entry: TaskEntry) -> None:
            written: set[str] = set()
            placed: list[Placement] = []  # set by the check, before the first tensor is made
            with torch.no_grad():
                for name, t in self._tensors(task, entry, target.device, None,
                                             lambda shapes: placed.append(target.fit(task, shapes, strict,
                                                                                     shapes=shapes))):
                    dst_name = placed[0].model_name(name)
                    dst = None if dst_name is None else target.claim(task, dst_name, t.shape, written)
                    if dst is not None:  # one tensor at a time
                        dst.copy_(t)

        self._reading_task(task, copy)
        return model

    def switch(self, model: torch.nn.Module, task: str, strict: bool = True,
               resident: int | str = 0) -> torch.nn.Module:
        """Make `model` hold `task`'s weights in place, rewriting only the entries tasks change.

        The model (on any one device, float32/float16/bfloat16) then equals `load(task, dtype=its
        dtype)` bit for bit, its tensors placed as `load_into` places them. The switch puts back the
        entries the previous task changed (it kept their old values: memory of the order of the
        entries tasks change, never a copy of the model), rewrites the tensors whose base differs
        when `task` sits on another base, and writes `task`'s changes. The first switch of a model
        (or of one moved or cast since) writes the whole base first, like `load_into`, and so does
        the first switch after a `load_into`; weights changed in place by other means are not
        noticed, so write them through the store.

        `resident` (bytes, or a size such as "2GB") keeps the writes of recently switched tasks on the
        model's device, most recently used first, within that budget (the model's own, across
        stores): switching back to one reads nothing from the store and costs only the scattered
        writes. A task costs positions (8 bytes) + its base's and its own values (2 × the model's
        dtype) per changed entry; a task over the budget is not kept.

        Not thread-safe for one model: a switch mutates its parameters, so never run it during a
        forward pass or another switch of the same model. Different models may switch at once.

        Raises:
            InputError: the task's tensors do not fit the model (see `load_into`), or `resident`
                is not a size.
            TaskNotFoundError: no such task.
        """
        try:
            budget = parse_size(resident)
        except ValueError as e:
            raise InputError(f"resident: {e}") from None
        # the source names the task by its current payload, so no switch state serves a replaced one
        self._reading_task(task, lambda e: switching.switch(
            model, lambda device: _SwitchSource(self, task, e, device), strict, budget))
        return model

    # -- writing ---------------------------------------------------------------
    def _commit(self, change: Callable[[Manifest], Manifest], payload: str | None = None) -> Manifest:
        """Publish `change`, vouching for `payload`, this writer's own directory (Transactions.commit)."""
        self._require_writable()
        self.manifest = self._txn.commit(change, payload, create=not self.manifest["bases"])
        return self.manifest

    def _require_writable(self) -> None:
        if self.mode != "a":
            raise InputError(f"{self.url} is open read-only; open it with modelstore.open(url, mode=\"a\") to write")

    def _write_base(self, base_id: str, specs: Sequence[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]],
                    fields: BaseFields, files: Mapping[str, str] | None = None) -> BaseEntry:
        """Stream `tensors` (in `specs` order) into a new base `base_id` and commit it.

        `fields` are the base entry's descriptive fields (kind, merge, selection, source, codec...);
        `files` the model's tokenizer and generation files (name -> local path), kept with it.

        Raises:
            ConflictError: the store got a different `base_id` base meanwhile.
        """
        self._require_writable()
        out = self._txn.new_payload(base_dir(base_id))

        def fill(out: PayloadWriter) -> BaseEntry:
            out.declare_dense("data", ((shape, dt) for _, shape, dt in specs),
                              kind=BASE_CODECS[fields.get("codec", "lz4")])
            for name, t in tensors:
                out.add_dense(name, t, "data")
            kept = write_model_files(self.loc, out.path, files or {})
            nbytes = sum(math.prod(s) * dt.itemsize for _, s, dt in specs)
            entry: BaseEntry = {**fields, **out.finish(), "nbytes": nbytes, "created": now()}
            if kept:
                entry["files"] = kept
            return entry

        entry = self._txn.written(out, fill)

        def change(m: Manifest) -> Manifest:
            if base_id in m["bases"]:
                raise ConflictError(f"{self.url} got a {base_id} base from another writer meanwhile; "
                                    "open the store again and add tasks to it")
            m["bases"][base_id] = entry
            return m

        self._commit(change, out.path)
        return entry

    def add_pretrained(self, path: str | os.PathLike[str], progress: bool = False) -> BaseEntry:
        """Keep θ0 in a store built with a merge (LoRA tasks sit on it).

        Raises:
            InputError: `path` is not the model the store was built from (fingerprint differs).
        """
        ck = open_checkpoint(os.fspath(path))
        first = next(iter(self.manifest["bases"].values()), None)
        want = first.get("source", {}).get("fingerprint") if first is not None else None
        if want is not None and want != ck.fingerprint():
            raise InputError(f"{path} is not the pre-trained model this store was built from (fingerprint differs)")
        fields = base_fields(ck, "pretrained", {"method": "none"}, [], None, None)
        codec = first.get("codec") if first is not None else None
        if codec is not None:  # the store's base codec choice holds for θ0 too
            fields["codec"] = codec
        return self._write_base("pretrained", [(n, ck.shape(n), ck.dtype(n)) for n in ck.names()],
                                ((n, ck.get(n)) for n in bar(ck.names(), "pretrained base", progress)),
                                fields, ck.side_files)

    def model_files(self, base_id: str) -> dict[str, bytes]:
        """The tokenizer and generation files kept with base `base_id` (name -> content), checked.

        Raises:
            CorruptStoreError: a file is missing or fails its checksum.
        """
        return self._reading(lambda before: self._base_entry(base_id),
                             lambda e: read_model_files(self.loc, e, f"base {base_id!r}"))

    def task_files(self, task: str) -> dict[str, bytes]:
        """The tokenizer and generation files that serve `task`: its own, kept with it where its
        fine-tune's vocabulary differs from the base's (tokens added), else its base's; checked.

        Raises:
            CorruptStoreError: a file is missing or fails its checksum.
        """
        def read(entry: TaskEntry) -> dict[str, bytes]:
            own = {n: b for n, b in read_model_files(self.loc, entry, f"task {task!r}").items() if n != TASK_CONFIG}
            return own or read_model_files(self.loc, self._base_entry(entry["base"]), f"base {entry['base']!r}")

        return self._reading_task(task, read)

    def _own_tokenizer(self, source: Any, base_id: str) -> dict[str, bytes]:
        """The fine-tune's tokenizer and generation files (name -> content) where they hold
        another vocabulary than base `base_id`'s (inputs.vocabulary), else none.

        Raises:
            InputError: a file of the fine-tune cannot be read.
        """
        side: Mapping[str, str] = getattr(source, "side_files", None) or {}
        files = {}
        for name, path in side.items():
            try:
                with open(path, "rb") as fh:
                    files[name] = fh.read()
            except OSError as e:
                raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
        return files if files and vocabulary_differs(files, self.model_files(base_id)) else {}

    def task_config(self, task: str) -> str | None:
        """The text of the config.json `task` was fine-tuned with (its architecture, labels, problem
        type), kept with it and checked; its base's for tasks that keep none (written before tasks
        kept one, or from an input without one); None when neither has one.

        Raises:
            CorruptStoreError: the task's config.json is missing or fails its checksum.
        """
        def read(entry: TaskEntry) -> str | None:
            own = read_model_files(self.loc, entry, f"task {task!r}").get(TASK_CONFIG)
            return own.decode() if own is not None else self._base_entry(entry["base"]).get("config_json")

        return self._reading_task(task, read)

    def _write_task(self, name: str, kind: TaskKind, source: Any, options: Any, *, base: str | None = None,
                    source_info: Mapping[str, str], overwrite: bool = False, progress: bool = False) -> TaskEntry:
        """Write task `name` with task kind `kind` from its input `source`, and commit it.

        The kind compresses `source` against the base it chooses (`base` when the user picked
        one); `add_task` and `add_lora_task` are this with their kind's input and options.

        Args:
            name: the task's name.
            kind: a registered task kind (modelstore.kinds.get_kind).
            source: the kind's input (a Checkpoint for full fine-tunes, an AdapterInput for LoRA).
            options: the kind's options (FFTOptions, LoraOptions).
            base: "merged" or "pretrained", if the kind lets the user choose.
            source_info: the input's path and fingerprint, recorded in the entry.
            overwrite: replace an existing task of that name.
            progress: draw a progress bar on a terminal.

        Returns:
            The task's manifest entry.

        Raises:
            InputError: a bad input or option, or a base the store lacks.
            TaskExistsError: the task exists and not `overwrite`.
        """
        written = self._write_task_payload(name, kind, source, options, base=base, source_info=source_info,
                                           overwrite=overwrite, progress=progress)
        return self._commit_task(name, *written, overwrite=overwrite)

    def _write_task_payload(self, name: str, kind: TaskKind, source: Any, options: Any, *, base: str | None = None,
                            source_info: Mapping[str, str], overwrite: bool = False,
                            progress: bool = False) -> TaskPayload:
        """`_write_task` up to its commit: the payload written and sealed, leased (gc leaves it
        alone) until `_commit_task` or `_discard_payload`. Several may be written for one name,
        each read back with `_tensors(name, payload.entry, ...)` before one is committed.
        `overwrite=False` refuses a name the store has before anything is written."""
        self._require_writable()
        check_task_name(name)
        self._refresh()
        self._check_new_task(name, overwrite)
        bases = self.manifest["bases"]
        base_id = kind.base_id(bases, base)
        ids = list(dict.fromkeys([base_id, *kind.extra_bases]))
        for b in ids:
            if b not in bases:
                hint = "; add it once with --pretrained PATH (the model the store was built from)" \
                    if b == "pretrained" else ""
                raise InputError(f"{self.url} has no {b} base, which {kind.title} reads{hint}; it has: "
                                 f"{', '.join(bases) or 'none'}")
        base_entry = bases[base_id]
        stored = self._stored_base(base_id) if len(ids) == 1 else \
            WithOtherBases(self._stored_base(base_id), {b: self._stored_base(b) for b in ids[1:]})
        # its config.json, and its tokenizer where it added tokens: checked before anything is written
        config = {**task_config_file(source), **self._own_tokenizer(source, base_id)}
        out = self._txn.new_payload(task_dir(name))
        fields = self._txn.written(out, lambda out: {
            **kind.write(out, name, source, stored, base_entry, options, progress), **out.finish(),
            **({"files": write_model_files(self.loc, out.path, config)} if config else {})})
        # the kind's own TaskEntry fields (its write returns them as a plain dict) and the payload's
        entry = cast(TaskEntry, {"kind": kind.name, "base": base_id, **fields, "source": dict(source_info)})
        if len(ids) > 1:
            entry["bases"] = ids
        return TaskPayload(entry, out.path, {b: bases[b] for b in ids})

    def _commit_task(self, name: str, entry: TaskEntry, payload: str, used_bases: Mapping[str, BaseEntry],
                     overwrite: bool = False) -> TaskEntry:
        """Commit `payload` (from `_write_task_payload`) as task `name` with manifest entry `entry`;
        if that fails it is deleted, unless the publish may have happened. Its lease ends either way.

        Raises:
            ConflictError: a base of `used_bases` (those it was written against) changed meanwhile.
            TaskExistsError: another writer added task `name` meanwhile and not `overwrite`.
        """
        def change(m: Manifest) -> Manifest:
            for b, was in used_bases.items():
                now_base = m["bases"].get(b)
                if now_base is None or now_base["path"] != was["path"] or not same_content(now_base, was):
                    raise ConflictError(f"{self.url}: the {b} base changed while task {name!r} was written against "
                                        "it; add the task again")
            if name in m["tasks"] and not overwrite:
                raise TaskExistsError(f"{self.url}: another writer added a task {name!r} meanwhile; pass "
                                      "--overwrite to replace it, or choose another name")
            m["tasks"][name] = entry
            return m

        self._commit(change, payload)
        return entry

    def _discard_payload(self, payload: str) -> None:
        """Delete `payload`, written by `_write_task_payload` and not committed, ending its lease."""
        self._txn.discard(payload)

    def add_task(self, name: str, path: str | os.PathLike[str] | Checkpoint, *, kind: str | None = None,
                 keep: float | None = None, granularity: str | None = None, value_dtype: str | None = None,
                 group_size: int | None = None, sparsify: str | None = None, seed: int | None = None,
                 base: str | None = None, pretrained: str | os.PathLike[str] | None = None,
                 overwrite: bool = False, progress: bool = False,
                 calibration: Calibration | str | os.PathLike[str] | None = None, min_agreement: float | None = None,
                 max_kl: float | None = None, device: str | torch.device | None = None,
                 max_examples: int | None = 256, max_length: int = 256, bound: bool = False,
                 **options: Any) -> TaskEntry:
        """Add a fully fine-tuned model as task `name`: by default a DARE drop of its delta to the base
        with int4 values (PERU-FFT); `kind` picks another way to keep it (`modelstore.kinds`).

        Args:
            name: the task's name (letters, digits, '.', '_', '-').
            path: the fine-tuned checkpoint (HF directory, .safetensors, .bin/.pt) or an open Checkpoint.
            kind: "fft" (a sparse delta, the default), "tall-mask", "emr", "bitdelta" or "exact"
                (spec/FORMAT.md); with `calibration`, chosen by it.
            keep: fft: fraction m of delta entries kept, in (0, 1] (default 0.05 with DARE, 0.1 with
                magnitude).
            granularity: fft: "global" (top-m% of the whole model, the default) or "per-tensor".
            value_dtype: fft: "float16", "bfloat16", "float32", or "int8" / "int4" with a float16 scale
                per `group_size` values (default int4; with `budget`/`max_rel_error` chosen by them).
            group_size: fft with int8/int4 values: consecutive kept values sharing a scale (default 128).
            sparsify: fft: "dare" (random drop, rescaled by 1/m: the default) or "magnitude" (top-m: the
                default with granularity "per-tensor", `budget` or `max_rel_error`).
            seed: fft with "dare": the drop's seed (default 0).
            dare_q: fft with "dare": kept values rescaled by 1/q instead of 1/keep (DAREx-q).
            positions: fft with "dare": "stored" (the default) or "seeded", no positions stored, a
                load re-draws them from the seed (about half the bytes at int4); allowed beside a
                calibration target, which then writes every DARE candidate so.
            base: "merged" or "pretrained" when the store has both (default: merged).
            pretrained: the pre-trained model, for a kind that reads θ0 (tall-mask, emr) in a store
                that keeps none yet; checked against the model the store was built from.
            overwrite: replace an existing task of that name.
            progress: draw a progress bar on a terminal.
            calibration: the task's own inputs (a `Calibration`, or a JSON-lines / CSV file with a
                "text" field): the original and candidate representations (fft magnitude and DARE
                at several m and value dtypes, the 1-bit kinds, exact) run on them, and the
                cheapest meeting `min_agreement` (default 0.99) or `max_kl` is kept, with a
                `fidelity` record in its entry. With `sparsify="dare"` and no target, DARE's
                rescale is tuned on them instead (DAREx-q). The checkpoint must be a transformers
                model whose predictions docs/evaluation.md lists (or give `Calibration(outputs=...)`).
            min_agreement: with `calibration`: top-1 agreement with the original to meet.
            max_kl: with `calibration`: or the mean KL(original || stored) to stay under.
            device: with `calibration`: where the models run (default "cpu").
            max_examples: with a calibration file: its examples used (spread evenly over a longer file).
            max_length: with a calibration file: tokens kept of each example (fewer where the
                model has fewer positions).
            bound: with `calibration` and `min_agreement`: the agreement's one-sided 95% lower
                bound over the calibration examples must meet it, not the agreement measured (a
                promise for more data like it; at 0.99, 256 examples allow only the exact kind).
            **options: the options of other kinds by keyword (e.g. tall-mask's `tall_lambda`).

        Returns:
            The task's manifest entry.

        Raises:
            InputError: a bad option, checkpoint or calibration data, or an option `kind` does not
                take; TaskExistsError: the task exists and not `overwrite`.
        """
        fft = {"keep": keep, "granularity": granularity, "value_dtype": value_dtype, "group_size": group_size,
               "sparsify": sparsify, "seed": seed}
        given = {**{n: v for n, v in fft.items() if v is not None}, **options}
        if calibration is not None:
            target = calibration_target(min_agreement, max_kl, given, bound)
            return self._add_calibrated(name, path, kind, given, as_calibration(calibration, max_examples, max_length),
                                        target, device, base, pretrained, overwrite, progress)
        if min_agreement is not None or max_kl is not None or device is not None or bound:
            raise InputError("--min-agreement, --max-kl, --bound and --device apply with --calibration FILE")
        k = checkpoint_kind(kind or "fft")
        opts = k.parse_options(given)
        check_task_name(name)
        ck = path if isinstance(path, Checkpoint) else open_checkpoint(os.fspath(path))
        if pretrained is not None and "pretrained" not in self.manifest["bases"]:
            self.add_pretrained(pretrained, progress)
        return self._write_task(name, k, ck, opts, base=base, source_info=source_info(ck),
                                overwrite=overwrite, progress=progress)

    def _add_calibrated(self, name: str, path: str | os.PathLike[str] | Checkpoint, kind: str | None,
                        given: dict[str, Any], calibration: Calibration, target: Target | None,
                        device: str | torch.device | None, base: str | None,
                        pretrained: str | os.PathLike[str] | None, overwrite: bool, progress: bool) -> TaskEntry:
        """add_task with `calibration` (see there): candidates are written as payloads of `name`,
        measured as stored, and the chosen one committed; the others are deleted."""
        self._require_writable()
        if kind is not None:
            raise InputError("--kind is chosen by --calibration; drop it (or drop --calibration)")
        check_task_name(name)
        self._refresh()
        self._check_new_task(name, overwrite)
        ck = path if isinstance(path, Checkpoint) else open_checkpoint(os.fspath(path))
        fft = checkpoint_kind("fft")
        options = fft.parse_options(given)  # a bad option is named before any work
        dare = None
        if target is None:  # DAREx-q: the user's DARE setting, its rescale tuned
            dare = {"kind": "fft", "keep": options.keep, **given}
        if pretrained is not None and "pretrained" not in self.manifest["bases"]:
            self.add_pretrained(pretrained, progress)
        fft_base = fft.base_id(self.manifest["bases"], base)
        config = task_config_file(ck).get(TASK_CONFIG)
        config_json = config.decode() if config else self._base_entry(fft_base).get("config_json")
        runner = self._runner(name, calibration, config_json, os.path.dirname(ck.path) if os.path.isfile(ck.path)
                              else ck.path, fft_base, device, ck, progress)
        dev, main_dtype = runner.device, runner.checkpoint_dtype
        info = source_info(ck)
        bases = self.manifest["bases"]

        def write(setting: Setting) -> TaskPayload:
            k = checkpoint_kind(setting["kind"])
            wanted = base if "sparsify" in setting else None
            try:
                ids = {k.base_id(bases, wanted), *k.extra_bases}
            except InputError:
                raise Skip from None
            if any(b not in bases for b in ids):
                raise Skip
            opts = k.parse_options({key: v for key, v in setting.items() if key != "kind" and v is not None})
            return self._write_task_payload(name, k, ck, opts, base=wanted, source_info=info, overwrite=overwrite)

        return self._choose_and_commit(name, calibration, target, runner, checkpoint_tensors(ck, dev), write,
                                       overwrite, full_bytes=ck.nbytes(), dare=dare, dare_positions=options.positions,
                                       float_dtype="bfloat16" if main_dtype == torch.bfloat16 else "float16")

    def _choose_and_commit(self, name: str, calibration: Calibration, target: Target | None, runner: Runner,
                           original: Tensors, write: Callable[[Setting], TaskPayload], overwrite: bool,
                           **how: Any) -> TaskEntry:
        """Commit the candidate `choose` keeps (`how`: its search) among those `write` makes as
        unpublished payloads of `name`, each read back and run by `runner` against `original`;
        the others are deleted."""
        used: dict[str, dict[str, BaseEntry]] = {}  # payload -> the bases it was written against

        def written(setting: Setting) -> tuple[dict[str, Any], str]:
            payload = write(setting)
            used[payload.path] = payload.bases
            return cast(dict[str, Any], payload.entry), payload.path

        def tensors(entry: dict[str, Any]) -> Tensors:
            return lambda check: self._tensors(name, cast(TaskEntry, entry), runner.device, None, check)

        side = StoreSide(written, tensors, self._discard_payload)
        entry, payload = choose(name, calibration, target, runner, original, side, **how)
        return self._commit_task(name, cast(TaskEntry, entry), payload, used[payload], overwrite)

    def _runner(self, name: str, calibration: Calibration, config_json: str | None, directory: str, base_id: str,
                device: str | torch.device | None, weights: TensorSource, progress: bool) -> Runner:
        """The model calibration runs task `name` in, on `device`, prepared as `weights` (most of
        whose tensors' dtype it takes off the CPU), with the tokenizer or image processor in the
        input's `directory`, else the one base `base_id` keeps.

        Raises:
            InputError: a bad device, or a model or data calibration cannot run (Runner).
        """
        try:
            dev = torch.device(device or "cpu")
        except (RuntimeError, TypeError):
            raise InputError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
        if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
            raise InputError(f"--device {device}: this machine's torch sees {torch.cuda.device_count()} CUDA "
                             "device(s); use --device cpu or another index")

        def preprocessor(inputs: str) -> Any:  # asked for once the architecture is known to give predictions
            return preprocessor_for(directory, lambda: self.model_files(base_id), f"task {name!r}", inputs)

        floats = Counter(weights.dtype(n) for n in weights.names() if weights.dtype(n).is_floating_point)
        main_dtype = floats.most_common(1)[0][0] if floats else torch.float32  # the most tensors' dtype
        return Runner(name, calibration, config_json, preprocessor, dev, main_dtype, progress, directory)

    def add_lora_task(self, name: str, adapter: str | os.PathLike[str], *, rank: int | None = None,
                      energy: float | None = None, pretrained: str | os.PathLike[str] | None = None,
                      overwrite: bool = False, progress: bool = False,
                      calibration: Calibration | str | os.PathLike[str] | None = None,
                      min_agreement: float | None = None, max_kl: float | None = None,
                      device: str | torch.device | None = None, max_examples: int | None = 256,
                      max_length: int = 256, bound: bool = False) -> TaskEntry:
        """Add a PEFT LoRA adapter as task `name`: rank-q SVD factors of each update, on θ0 (PERU-LoRA).

        Args:
            name: the task's name.
            adapter: a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
            rank: keep q of each update (default 16); q >= r stores the adapter exactly.
            energy: instead of `rank`, per module the smallest q keeping this fraction of the
                squared Frobenius norm.
            pretrained: the pre-trained model, needed once if the store keeps no θ0 (it was built
                with a merge); checked against the fingerprint of the model the store was built from.
            overwrite: replace an existing task of that name.
            progress: draw a progress bar on a terminal.
            calibration: the task's own inputs (as add_task takes them): the adapter's model
                (θ0's architecture, from the config.json θ0 keeps) and the task at ranks 1, 2, 4...
                up to the adapter's run on them, and the smallest rank meeting `min_agreement`
                (default 0.99) or `max_kl` is kept, with a `fidelity` record in its entry; the
                adapter's own rank when none below does.
            min_agreement, max_kl, device, max_examples, max_length, bound: with `calibration`, as
                add_task takes them.

        Returns:
            The task's manifest entry.

        Raises:
            LoraError: the adapter is not plain LoRA (DoRA, biases...) or does not fit the base.
            InputError: a bad option; TaskExistsError: the task exists and not `overwrite`.
        """
        if calibration is None and (min_agreement is not None or max_kl is not None or device is not None or bound):
            raise InputError("--min-agreement, --max-kl, --bound and --device apply with --calibration FILE")
        if calibration is not None and (rank is not None or energy is not None):
            raise InputError(f"--{'rank' if rank is not None else 'energy'} is chosen by --calibration; drop one "
                             "of them")
        # read and checked before anything is written
        cal = None if calibration is None else as_calibration(calibration, max_examples, max_length)
        target = None if calibration is None else calibration_target(min_agreement, max_kl, {}, bound)
        opts = LoraOptions(rank, energy).resolved()
        check_task_name(name)
        self._refresh()
        self._check_new_task(name, overwrite)
        source = AdapterInput.read(adapter)  # validated before anything is written
        if "pretrained" not in self.manifest["bases"]:
            if pretrained is None:
                raise InputError(f"{self.url} keeps no pre-trained base (θ0), which LoRA tasks sit on; "
                                 "pass --pretrained PATH (the model this store was built from) once")
            self.add_pretrained(pretrained, progress)
        source = source.with_model_config(self._base_entry("pretrained").get("config_json"))
        if cal is not None:
            return self._add_lora_calibrated(name, source, cal, target, device, overwrite, progress)
        return self._write_task(name, get_kind("lora"), source, opts, base=None, source_info=source.source_info(),
                                overwrite=overwrite, progress=progress)

    def _add_lora_calibrated(self, name: str, source: AdapterInput, calibration: Calibration, target: Target | None,
                             device: str | torch.device | None, overwrite: bool, progress: bool) -> TaskEntry:
        """add_lora_task with `calibration` (see there): each rank written as a payload of `name`,
        measured as stored; the chosen one committed, the others deleted."""
        assert target is not None  # no option that _target reads as DARE's
        self._require_writable()
        base = self._stored_base("pretrained")
        adapter = source.resolved(base, self._base_entry("pretrained").get("config_json"))
        config_json = source.config_json or self._base_entry("pretrained").get("config_json")
        runner = self._runner(name, calibration, config_json, source.path, "pretrained", device, base, progress)
        kind, info = get_kind("lora"), source.source_info()
        largest = max(m.r for m in adapter.modules.values())
        ranks = sorted({*(2 ** i for i in range(largest.bit_length()) if 2 ** i < largest), largest})

        def write(setting: Setting) -> TaskPayload:
            return self._write_task_payload(name, kind, source, LoraOptions(rank=setting["rank"]), source_info=info,
                                            overwrite=overwrite)

        return self._choose_and_commit(name, calibration, target, runner,
                                       adapted_tensors(adapter, base, runner.device), write, overwrite, ranks=ranks)

    def remove(self, name: str) -> None:
        """Remove task `name`: its manifest entry first, then its arrays.

        Raises:
            TaskNotFoundError: no such task.
        """
        check_task_name(name)

        def change(m: Manifest) -> Manifest:
            if m["tasks"].pop(name, None) is None:
                raise TaskNotFoundError(f"{self.url} has no task {name!r}")
            return m

        self._commit(change)

    def _refresh(self) -> None:
        """Re-read the manifest: other writers may have committed since it was read (before a write,
        and before a read of tensors: `_reading`)."""
        if self.manifest["bases"]:  # else a new store whose first commit is still to come
            self.manifest = self.loc.require_manifest()

    def _check_new_task(self, name: str, overwrite: bool) -> None:
        if name in self.manifest["tasks"] and not overwrite:
            raise TaskExistsError(f"{self.url} already has a task {name!r}; pass --overwrite to replace it")

    def sync_to(self, dst: str | os.PathLike[str], *, tasks: Sequence[str] | None = None, delete: bool = False,
                dry_run: bool = False, dst_options: Mapping[str, Any] | None = None,
                on_bytes: Callable[[int], None] | None = None) -> SyncReport:
        """Copy this store's tasks (all, or `tasks`) and their bases to `dst`; see `modelstore.sync`."""
        return sync(self.url, os.fspath(dst), tasks=tasks, delete=delete, dry_run=dry_run,
                    src_options=self.storage_options or None, dst_options=dst_options, on_bytes=on_bytes)


class TaskPayload(NamedTuple):
    """A task's payload written and sealed but not committed (`Store._write_task_payload`)."""

    entry: TaskEntry  #: the manifest entry its commit publishes
    path: str  #: its directory, leased until it is committed or discarded
    bases: dict[str, BaseEntry]  #: the base entries it was written against; its commit needs them unchanged


#: fft options that say how a chosen candidate is stored, not which: given with a target, they
#: apply to every candidate the search writes.
STORAGE_MODES = ("positions",)


def calibration_target(min_agreement: float | None, max_kl: float | None, given: Mapping[str, Any],
                       bound: bool = False) -> Target | None:
    """The calibration target from add_task's keywords: None for DARE's rescale tuning (an
    explicit DARE setting and no target), else min_agreement 0.99 when neither is given; with
    `bound`, min_agreement is what the agreement's 95% lower bound must meet.

    Raises:
        InputError: both targets, a value out of range, `bound` without min_agreement, or fft
            options beside a target (other than STORAGE_MODES, which apply to every candidate).
    """
    if min_agreement is not None and max_kl is not None:
        raise InputError("give --min-agreement or --max-kl, not both")
    if bound and min_agreement is None:
        raise InputError("--bound applies to --min-agreement X: give the agreement whose 95% lower bound must meet X")
    if min_agreement is not None and not (isinstance(min_agreement, (int, float)) and 0 < min_agreement <= 1):
        raise InputError(f"--min-agreement must be a fraction in (0, 1], got {min_agreement!r} (0.99 is usual)")
    if max_kl is not None and not (isinstance(max_kl, (int, float)) and 0 < max_kl < math.inf):
        raise InputError(f"--max-kl must be a positive number, got {max_kl!r}")
    if min_agreement is None and max_kl is None and given.get("sparsify") == "dare":
        if "dare_q" in given:
            raise InputError("--dare-q is what --calibration tunes for --sparsify dare; give one of them")
        return None
    chosen = [k for k in given if k not in STORAGE_MODES]
    if chosen:
        flag = "--" + chosen[0].replace("_", "-")
        raise InputError(f"{flag} is chosen by --calibration; drop it, or give --sparsify dare without a target "
                         "to tune DARE's rescale on the calibration data")
    return Target(min_agreement=min_agreement if max_kl is None else None, max_kl=max_kl, bound=bound) \
        if (min_agreement is not None or max_kl is not None) else Target(min_agreement=DEFAULT_AGREEMENT)


class _BaseTensors:
    """The base of one load: from the cache (cloned per tensor) or streamed from storage.
    `fill_cache=False` uses the cache only if it is already there (never reads the base into it).

    A streamed base is read ahead in a worker thread, in base order (the order tensors are asked
    for; a tensor not asked for is read and dropped): reading and decoding the next tensors
    overlaps the caller's work on this one (decoding the task, applying it), which is most of a
    cold load's time on two cores. Its Segments are touched by the worker alone until `close`
    has stopped it."""

    def __init__(self, store: Store, base_id: str, device: torch.device, fill_cache: bool = True):
        self.others: dict[str, _BaseTensors] = {}
        self._cached = store._cached_base(base_id, device) if fill_cache else store._kept_base(base_id, device)
        if self._cached is None:
            reader = store._stored_base(base_id)
            self._segments = reader.stream(device)
            self._specs = reader.specs()
            self._stream = read_ahead(_read_all(self._segments, reader.table))
        else:
            self._specs = {n: (list(t.shape), dtypes.dtype_name(t.dtype)) for n, t in self._cached.items()}
        self._names = list(self._specs)

    def names(self) -> list[str]:
        return self._names

    def specs(self) -> dict[str, tuple[list[int], str]]:
        """Each base tensor's shape and dtype, in base order (what a task's table is checked against)."""
        return self._specs

    def fresh(self, name: str) -> torch.Tensor:
        return self.view(name).clone() if self._cached is not None else self.view(name)

    def view(self, name: str) -> torch.Tensor:
        """Base tensor `name` to read only (the cached tensor itself), asked for in base order."""
        if self._cached is not None:
            return self._cached[name]
        for n, t in self._stream:
            if n == name:
                return t
        raise AssertionError(f"base tensor {name!r} asked for out of order")

    def other(self, base_id: str) -> _BaseTensors:
        return self.others[base_id]

    def close(self) -> None:
        if self._cached is None:
            self._stream.close()  # the worker stops; the rest is read and checked here
            self._segments.close()

    def abandon(self) -> None:
        """Stop reading (a load that failed before it began)."""
        if self._cached is None:
            self._stream.close()


def _read_all(segments: Segments, table: list[TableEntry]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a base's table from its segments, in order (refers to no _BaseTensors, so
    an abandoned load's worker does not keep its consumer alive)."""
    for e in table:
        yield e["name"], segments.get(e["array"], e["start"], e["count"], e["dtype"]).view(e["shape"])


class _SwitchSource:
    """Task `task` of `store` as a switch reads it (switching.SwitchSource), on `device`. Its
    storage is opened on first use: a switch to a resident task reads nothing."""

    def __init__(self, store: Store, task: str, entry: TaskEntry, device: torch.device):
        self.store, self.task, self.device, self.entry = store, task, device, entry
        self.kind = get_kind(self.entry["kind"])
        self.base_id = self.entry["base"]
        self.base_key = f"{store.url}#{store._base_entry(self.base_id)['path']}"
        self.task_key = f"{store.url}#{self.entry['path']}"

    @cached_property
    def payload(self) -> PayloadReader:
        return self.store._payload(self.entry, f"task {self.task!r}", self.kind)

    @cached_property
    def _base(self) -> PayloadReader:
        return self.store._stored_base(self.base_id)

    @cached_property
    def _dtypes(self) -> dict[str, torch.dtype]:
        return {e["name"]: dtypes.torch_dtype(e["dtype"]) for e in self._base.table}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return output_shapes(self.kind, self.payload.table, self._base.specs())

    def base_dtype(self, name: str) -> torch.dtype | None:
        return self._dtypes.get(name)

    def base_names(self) -> list[str]:
        return list(self._dtypes)

    def base_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        base = _BaseTensors(self.store, self.base_id, self.device, fill_cache=False)
        for name in base.names():
            yield name, base.view(name)
        base.close()

    def base_values(self, name: str, positions: torch.Tensor | None) -> torch.Tensor:
        """From the base kept in CPU memory when the cache policy keeps it, else read from storage."""
        cached = self.store._cached_base(self.base_id, torch.device("cpu"))
        t = cached[name] if cached is not None else self._base.get(name)
        return (t if positions is None else t.reshape(-1)[positions.cpu()]).to(self.device)

    def edits(self) -> Iterator[Edit]:
        if not self.kind.describes_edits:  # its tensors whole: correct, at the cost of a load
            for name, t in self.store._tensors(self.task, self.entry, self.device, None):
                yield Replace(name, tuple(t.shape), t.dtype, None, t)
            return
        segments = self.payload.stream(self.device)
        yield from self.kind.edits(segments, self.payload.table, self.entry, self.device)
        segments.close()


def task_config_file(source: Any) -> dict[str, bytes]:
    """{TASK_CONFIG: its bytes} for an input with a config.json (a model directory), else {}.

    Raises:
        InputError: the config.json is not a JSON object.
    """
    text = getattr(source, "config_json", None)
    if text is None:
        return {}
    try:
        ok = isinstance(json.loads(text), dict)
    except ValueError:
        ok = False
    if not ok:
        raise InputError(f"{source.path}: config.json is not a JSON object; fix it or give the weights alone")
    return {TASK_CONFIG: text.encode()}


def _started(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """`tensors` with its first item made now (so a read that fails opening its payload fails here)."""
    first = next(tensors, None)
    return iter(()) if first is None else chain([first], tensors)


def env_storage_options(storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """$MODELSTORE_STORAGE_OPTIONS (a JSON object) updated with `storage_options`: the environment
    gives defaults that explicit options override, in the CLI (`-o`) as in `load`.

    Raises:
        InputError: the variable is set but is not a JSON object.
    """
    env = os.environ.get("MODELSTORE_STORAGE_OPTIONS")
    try:
        opts = json.loads(env) if env else {}
    except ValueError:
        opts = None
    if not isinstance(opts, dict):
        raise InputError("$MODELSTORE_STORAGE_OPTIONS is not a JSON object; set it like '{\"anon\": true}'")
    return {**opts, **(storage_options or {})}


def output_shapes(kind: TaskKind, table: list[TableEntry],
                  base: Mapping[str, tuple[list[int], str]]) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor a task of `kind` with `table` makes over a base of `base`'s tensors
    (name -> (shape, dtype)), by name in the order they come: its table's shape, else the base's."""
    own = {t["name"]: tuple(t["shape"]) for t in table}
    return {n: own[n] if n in own else tuple(base[n][0]) for n in kind.output_names(table, list(base))}


def serving_store(store: str | os.PathLike[str] | Store | None,
                  storage_options: Mapping[str, Any] | None = None) -> Store:
    """The store serving code names (`modelstore.load`, `load_model`): an open Store, a URL opened
    with `storage_options` over $MODELSTORE_STORAGE_OPTIONS, or $MODELSTORE_URL when None.

    Raises:
        InputError: no store given and $MODELSTORE_URL unset, or storage options with an open Store.
    """
    if store is None:
        store = os.environ.get("MODELSTORE_URL")
        if not store:
            raise InputError("no store given and $MODELSTORE_URL is not set; pass store=... or set it")
    if isinstance(store, Store):
        if storage_options:
            raise InputError("storage_options apply to a store given by URL; this Store is already open")
        return store
    return Store(store, storage_options=env_storage_options(storage_options))


def source_info(ck: Checkpoint) -> dict[str, str]:
    """Path and fingerprint of an input checkpoint, as entries record them."""
    return {"path": os.path.abspath(ck.path), "fingerprint": ck.fingerprint()}


def base_fields(ck: Checkpoint, kind: str, merge: Mapping[str, Any], merged_tasks: list[str],
                include: str | None, exclude: str | None) -> BaseFields:
    """Descriptive fields of a base made from pre-trained checkpoint `ck` (spec: BASE ENTRY)."""
    return {"kind": kind, "merge": dict(merge), "merged_tasks": merged_tasks,
            "selection": {"include": include, "exclude": exclude}, "source": source_info(ck),
            "config_json": ck.config_json}


__all__ = ["Store", "env_storage_options", "serving_store", "source_info", "base_fields"]
