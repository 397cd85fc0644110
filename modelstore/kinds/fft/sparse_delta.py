"""Task kind `fft`: a fully fine-tuned task as a sparse delta against a base (PERU-FFT / Post-Pruning).

u = θt − θ* is computed in float32 against the base *as stored*, the k = round(m·N)
largest |u| are kept (globally over all selected tensors, or per tensor), and the
kept entries are written as gap-encoded indices plus values. Tensors that cannot
be expressed as a sparse delta (other shape, not in the base, not selected, not
floating point) are written dense unless they equal the base.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import threading
import warnings
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from modelstore._runtime.prefetch import map_ahead, read_ahead
from modelstore._runtime.progress import bar
from modelstore._runtime.threads import one_torch_thread
from modelstore._runtime.units import human_bytes, percent
from modelstore.errors import CorruptStoreError, InputError
from modelstore.format import dtypes
from modelstore.format.manifest import BaseEntry, TableEntry, TaskEntry
from modelstore.format.payload import PayloadReader, PayloadWriter, Segments
from modelstore.inputs.architectures import architecture_names
from modelstore.inputs.naming import match_names, renamer
from modelstore.inputs.selection import recorded_selector
from modelstore.inputs.sources import (
    Checkpoint,
    Renamed,
    TensorSource,
    match_task_names,
    read_rows,
    row_blocks,
)
from modelstore.kinds.base import BaseTensors, Edit, Replace, TaskKind
from modelstore.kinds.fft.budget import (
    Choice,
    DeltaProfile,
    candidates,
    choose,
    energy_of,
)
from modelstore.kinds.fft.candidates import Candidates, SpillError
from modelstore.kinds.fft.dare import dare_picker, seeded_positions
from modelstore.kinds.fft.topk import (
    Cut,
    WindowCounts,
    bracket,
    find_cut,
    kept_count,
    magnitude_bits,
)
from modelstore.kinds.fft.values import (
    MAX_GROUP_SIZE,
    QUANT_MAX,
    VALUE_DTYPES,
    VALUE_LIMITS,
    read_values,
    storage_dtype,
    value_writer,
)
from modelstore.options import Option

if TYPE_CHECKING:
    from typing_extensions import Unpack

GRANULARITIES = ("global", "per-tensor")
SPARSIFIERS = ("magnitude", "dare")
INDEX_DTYPES = ("uint32", "uint64")
#: Where a DARE task's kept positions come from: stored gap-coded, or re-drawn from each tensor's seed.
POSITIONS = ("stored", "seeded")
#: Deltas of a task are kept in memory between the top-k passes up to this size;
#: beyond it they are recomputed from the checkpoints on each pass (streaming).
CACHE_BYTES = int(os.environ.get("MODELSTORE_DELTA_CACHE_BYTES", 256 << 20))
#: Entries of u = θt − θ* computed at once (whole rows): small enough to stay in the CPU's cache.
BLOCK_ELEMENTS = 1 << 20
#: The global top-k counts from a sample of every SAMPLE_EVERY-th run of blocks (topk.find_cut) when a pass
#: has at least SAMPLED_FROM blocks; smaller tasks take the two plain counting passes.
SAMPLE_EVERY, SAMPLED_FROM = 8, 64
#: Blocks read one after another in a sample, at most (4 blocks: 8 MB of bf16 values).
SAMPLE_RUN = 4
#: A base array of at least this many chunks, longer than a run, is sampled chunk by chunk (bases of
#: over 2**34 parameters, whose chunks grow past CHUNK_ELEMENTS): a chunk is decoded whole however
#: little of it a run uses, so runs of every SAMPLE_EVERY-th 4M entries over 16M-entry chunks (70B)
#: would decode every other chunk, and over 32M-entry ones every chunk.
CHUNK_SAMPLED_FROM = 64
#: Blocks between raisings of a one-pass selection's floor (topk.WindowCounts.floor).
FLOOR_EVERY = 16
#: A task stored with no options: DARE at m = 5% with int4 values, 0.20 bits per parameter: 74.1
#: average accuracy on 8 MiniLM tasks, against 73.0 for the top-10% magnitudes with float16 values
#: (1.72 bits) and 74.2 for the originals (docs/results/frontier).
DEFAULT_SPARSIFY, DARE_KEEP, DEFAULT_VALUE_DTYPE = "dare", 0.05, "int4"
#: --sparsify magnitude's keep m when none is given (the top 10%).
MAGNITUDE_KEEP = 0.1


@dataclass(frozen=True)
class FFTOptions:
    """How a fully fine-tuned task is sparsified: keep fraction m, how entries are chosen (top-m
    magnitudes, or DARE's random drop), top-k granularity, and how the kept values are stored.
    FFTOptions() is the default representation; `resolved` fills in what the user left out."""

    keep: float = DARE_KEEP
    granularity: str = "global"
    value_dtype: str | None = DEFAULT_VALUE_DTYPE  # None: bfloat16 for bf16 tasks, float16 otherwise
    group_size: int = 128
    sparsify: str = DEFAULT_SPARSIFY
    seed: int = 0
    dare_q: float | None = None  # DAREx-q: kept values rescaled by 1/q instead of 1/keep
    budget: float | None = None  # bits per parameter: choose keep and value dtype (kinds/fft/budget.py)
    max_rel_error: float | None = None  # or: the fewest bits meeting this predicted relative error
    positions: str = "stored"  # "seeded": DARE's kept positions are re-drawn from the seed, not stored

    def validate(self) -> None:
        """Raise InputError naming the first bad option."""
        if not isinstance(self.keep, (int, float)) or not (0.0 < self.keep <= 1.0) or math.isnan(self.keep):
            raise InputError(f"--keep must be a fraction in (0, 1], got {self.keep!r} (0.1 keeps the top 10%)")
        if self.granularity not in GRANULARITIES:
            raise InputError(f"--granularity must be one of {', '.join(GRANULARITIES)}, not {self.granularity!r}")
        if self.value_dtype is not None and self.value_dtype not in VALUE_DTYPES:
            raise InputError(f"--value-dtype must be one of {', '.join(VALUE_DTYPES)}, not {self.value_dtype!r}")
        if not _whole(self.group_size) or not 1 <= self.group_size <= MAX_GROUP_SIZE:
            raise InputError(f"--group-size must be a whole number of values per scale in [1, {MAX_GROUP_SIZE}], "
                             f"got {self.group_size!r} (128 is usual)")
        if self.sparsify not in SPARSIFIERS:
            raise InputError(f"--sparsify must be one of {', '.join(SPARSIFIERS)}, not {self.sparsify!r}")
        if not _whole(self.seed) or not 0 <= self.seed < 1 << 62:
            raise InputError(f"--seed must be a whole number in [0, 2**62), got {self.seed!r}")
        if self.dare_q is not None and (not isinstance(self.dare_q, (int, float)) or isinstance(self.dare_q, bool)
                                        or not 0.0 < self.dare_q <= 1.0 or math.isnan(self.dare_q)):
            raise InputError(f"--dare-q must be a number in (0, 1], got {self.dare_q!r} (kept values scale by 1/q)")
        if self.dare_q is not None and self.sparsify != "dare":
            raise InputError("--dare-q rescales DARE's kept values; give it with --sparsify dare")
        if self.positions not in POSITIONS or self.positions == "seeded" and self.sparsify != "dare":
            raise InputError(f"--positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}; "
                             "seeded positions are DARE's: give them with --sparsify dare")
        if self.sparsify == "dare" and self.granularity != "global":
            raise InputError("--granularity applies to --sparsify magnitude; DARE drops each entry on its own")
        for flag, v, top in (("--budget", self.budget, math.inf), ("--max-rel-error", self.max_rel_error, 1.0)):
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= top
                                  or math.isnan(v) or math.isinf(v)):
                raise InputError(f"{flag} must be a positive number{' up to 1' if top == 1.0 else ''}, got {v!r}")
        if self.budget is not None and self.max_rel_error is not None:
            raise InputError("give --budget or --max-rel-error, not both")
        if self.budgeted and (self.sparsify != "magnitude" or self.granularity != "global"):
            raise InputError("--budget / --max-rel-error choose a global top-m; drop --sparsify dare and --granularity")

    @property
    def budgeted(self) -> bool:
        """Whether keep and the value dtype are chosen from the task's deltas (budget mode)."""
        return self.budget is not None or self.max_rel_error is not None

    @classmethod
    def resolved(cls, given: Mapping[str, Any]) -> FFTOptions:
        """The options the user gave (by name), the rest at their defaults: DARE unless a
        magnitude-only option is given (--granularity per-tensor, --budget, --max-rel-error), keep
        DARE_KEEP for DARE and MAGNITUDE_KEEP for magnitude, int4 values unless a budget chooses them."""
        budgeted = given.get("budget") is not None or given.get("max_rel_error") is not None
        magnitude_only = budgeted or given.get("granularity", "global") != "global"
        sparsify = given.get("sparsify") or ("magnitude" if magnitude_only else DEFAULT_SPARSIFY)
        defaults = {"sparsify": sparsify, "keep": DARE_KEEP if sparsify == "dare" else MAGNITUDE_KEEP,
                    "value_dtype": None if budgeted else DEFAULT_VALUE_DTYPE}
        return cls(**{**defaults, **given})


#: FFTOptions as the CLI, configs and `Store.add_task` see them.
FFT_DECLARED = (
    Option("keep", None, "fraction m of delta entries kept per task, in (0, 1] "
           f"[default: {DARE_KEEP} with dare, {MAGNITUDE_KEEP} with magnitude]", value_type=float),
    Option("granularity", "global", "top-m% over the whole model or within each tensor", choices=GRANULARITIES),
    Option("value_dtype", None, "how kept values are stored: floats, or int8/int4 with a float16 scale per group "
           f"[default: {DEFAULT_VALUE_DTYPE}; chosen by --budget/--max-rel-error]",
           choices=VALUE_DTYPES),
    Option("group_size", 128, "int8/int4 values: consecutive kept values of a tensor sharing one float16 scale"),
    Option("sparsify", None, "which entries are kept: DARE's random drop with probability 1-m and rescale by 1/m, "
           f"or the top-m magnitudes [default: {DEFAULT_SPARSIFY}; magnitude with --granularity per-tensor, "
           "--budget or --max-rel-error]", choices=SPARSIFIERS),
    Option("seed", 0, "--sparsify dare: seed of the random drop (tensor i draws from seed + i)"),
    Option("dare_q", None, "--sparsify dare: scale the kept values by 1/q instead of 1/m (DAREx-q), q in (0, 1] "
           "[default: m]", value_type=float),
    Option("positions", "stored", "--sparsify dare: store the kept positions, or re-draw them from the seed "
           "when the task is read (seeded: no positions stored, about half the bytes at int4)", choices=POSITIONS),
    Option("budget", None, "bits per parameter for the task: keep and the value dtype (among --value-dtype, "
           "else float16/bfloat16, int8, int4) are chosen for the least predicted weight-space error",
           value_type=float),
    Option("max_rel_error", None, "or: the fewest bits whose predicted relative error ||θ̂t − θt|| / ||θt|| "
           "is at most this", value_type=float),
)


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def plan(task: str, base: TensorSource, src: TensorSource, selected: Callable[[str], bool],
         left_out: Callable[[str], bool] = lambda name: False) -> list[tuple[str, str]]:
    """(name, "sparse" | "dense" | "base") for every tensor of the task (`src` seen under the base's
    names), base order first. "base": a non-floating buffer the base has and the task lacks (such as
    position_ids, which transformers versions save or not), taken from the base. A floating tensor
    the base has and the task lacks is not part of the task where `left_out(name)` says its
    architecture has no such tensor (a token classifier over a base with a pooler)."""
    have = set(src.names())
    out = []
    for name in base.names():
        if name not in have:
            if not base.dtype(name).is_floating_point:
                out.append((name, "base"))
            elif selected(name) and not left_out(name):
                raise InputError(f"task {task!r} lacks tensor {name!r} that the base has and its architecture "
                                 "(config.json) needs, or it has no config.json; give the complete checkpoint "
                                 "as a model directory")
            continue
        sparse = (selected(name) and src.shape(name) == base.shape(name)
                  and src.dtype(name).is_floating_point and base.dtype(name).is_floating_point)
        out.append((name, "sparse" if sparse else "dense"))
    reshaped = [n for n, kind in out if kind == "dense" and selected(n) and src.shape(n) != base.shape(n)]
    if reshaped and 2 * len(reshaped) > len(out):
        raise InputError(f"task {task!r}: {len(reshaped)} of {len(out)} tensors differ in shape from the base "
                         f"(e.g. {reshaped[0]!r}); is it a fine-tune of this pre-trained model?")
    known = set(base.names())
    out += [(n, "dense") for n in src.names() if n not in known]
    return out


@dataclass(frozen=True)
class FineTuneInput:
    """A full fine-tune as a kind writes it over a base: `source`, the task under the base's names
    where its tensors match one (inputs/naming.py) and its own tensors (a new head) as they are; `steps`,
    its `plan`; `entry(name, **fields)`, a table entry under the task's own name, recording the
    base's where they differ (spec section 7)."""

    source: TensorSource
    steps: list[tuple[str, str]]
    entry: Callable[..., TableEntry]


def fine_tune_input(task: str, source: Checkpoint, base: TensorSource, base_entry: BaseEntry) -> FineTuneInput:
    """The input handling every kind that stores a full fine-tune shares (fft and the 1-bit kinds).

    Raises:
        InputError: names match ambiguously, a selected tensor the base has is missing, or most
            tensors differ in shape from the base.
    """
    base_names = set(base.names())
    matched = match_task_names(source, list(base_names), f"task {task!r}")
    task_names = {b: t for t, b in matched.items()}
    # the task under the base's names where they match; its own tensors (a new head) as they are
    renamed = Renamed(source, {**{t: t for t in source.names() if t not in matched}, **task_names})
    own_name = renamer(matched)

    def entry(n: str, **fields: Unpack[TableEntry]) -> TableEntry:  # the task's own name, and the base's if it differs
        name = task_names.get(n) or (own_name(n) if n in base_names else n)
        named: TableEntry = {"name": name}
        if name != n and n in base_names:
            named["base"] = n
        return {**named, **fields}

    @functools.cache
    def covered() -> frozenset[str] | None:
        """The base tensors the task's architecture has a tensor for (None: unknown), asked only
        when the task lacks one."""
        arch = architecture_names(source.config_json)
        try:
            return None if arch is None else frozenset(match_names(arch, base_names, f"task {task!r}").values())
        except ValueError:  # names ambiguous between base tensors: nothing can be said
            return None

    def left_out(name: str) -> bool:
        """Whether the task's architecture has no tensor standing for base tensor `name`."""
        known = covered()
        return known is not None and name not in known

    return FineTuneInput(renamed, plan(task, base, renamed, recorded_selector(base_entry.get("selection")), left_out),
                         entry)


def check_finite(t: torch.Tensor, what: str) -> None:
    """Refuse NaN/Inf. A sum accumulated in float32 is finite for any finite tensor short of ~1e29
    magnitudes, so the exact element-wise test (7x the time) runs only when the cheap reduction
    says "maybe". A bfloat16 tensor's own sum accumulates in float32 and has its range (and is 6x
    the speed of asking for a float32 result)."""
    total = t.sum() if t.dtype == torch.bfloat16 else t.sum(dtype=torch.float32) if t.dtype.is_floating_point else None
    if total is not None and t.numel() and not bool(torch.isfinite(total)) \
            and not bool(torch.isfinite(t).all()):
        raise InputError(f"{what} has NaN or Inf values; fix the checkpoint before storing it")


def _plain_entry(n: str, **fields: Unpack[TableEntry]) -> TableEntry:
    return {"name": n, **fields}


def store_whole_or_same(out: PayloadWriter, task: str, name: str, source: TensorSource, base: TensorSource,
                        entry: Callable[..., TableEntry] | None = None, at: int = 0) -> int:
    """Write a tensor that is not compressed: a count-0 `sparse` entry (read: the base's tensor) when
    it equals the base's, else stored whole; `entry(name, **fields)` makes the table entry (the
    task's own name). `at`: the count-0 entry's start, where the task's `indices` stand (so that
    starts never go back, spec section 3). Returns 1 when stored whole."""
    make = entry or _plain_entry
    t = source.get(name)
    check_finite(t, f"task {task!r} tensor {name!r}")
    if name in base.names() and base.shape(name) == tuple(t.shape) and base.dtype(name) == t.dtype \
            and torch.equal(base.get(name), t):
        out.add(make(name, kind="sparse", shape=list(t.shape), dtype=dtypes.dtype_name(t.dtype), start=at, count=0))
        return 0
    out.add_dense(make(name)["name"], t, "dense")
    return 1


def _checked(task: str, blocks: Iterable[tuple[str, int, torch.Tensor]]) -> Iterator[torch.Tensor]:
    """The deltas of `blocks`, each refused if it holds NaN or Inf (before anything is chosen from them)."""
    for n, _, u in blocks:
        check_finite(u, f"task {task!r} tensor {n!r}")
        yield u


def _choose(task: str, opts: FFTOptions, default_dtype: str, source: TensorSource, deltas: _Deltas, total: int,
            dense: list[str]) -> Choice:
    """Budget mode: keep m and the value dtype from one profiling pass over the deltas (kinds/fft/budget.py)."""
    profile = DeltaProfile.measure(_checked(task, deltas.blocks()), total)
    params = sum(math.prod(source.shape(n)) for n in source.names())
    dense_bits = sum(math.prod(source.shape(n)) * source.dtype(n).itemsize * 8 for n in dense)
    value_dtypes = [opts.value_dtype] if opts.value_dtype else [default_dtype, "int8", "int4"]
    options = candidates(profile, energy_of(source, BLOCK_ELEMENTS), params, dense_bits, value_dtypes,
                         opts.group_size)
    return choose(options, opts.budget, opts.max_rel_error)


class _Deltas:
    """u = θt − θ* of the sparse tensors, pass after pass, in blocks of about BLOCK_ELEMENTS entries.

    A block is small enough that the chain convert, subtract, |.|, bit patterns, histogram stays
    in the CPU's cache (3-4x faster than whole tensors, measured), and is computed into one of a
    few reused float32 buffers: a block yielded is valid until the next is asked for. Blocks are
    computed in a worker thread one ahead of their consumer (reading θt and the base overlaps
    counting and selecting). The stored base is streamed front to back once per pass (each chunk
    decoded once); the first blocks are kept between passes while under a byte budget.
    """

    #: Block buffers in turn: the consumer's, the one queued, the one being computed.
    RING = 3

    def __init__(self, src: TensorSource, base: PayloadReader, names: list[str], budget: int):
        self.src, self.base, self.names = src, base, names
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self._cached, self._budget = 0, budget
        self._lock = threading.Lock()  # two passes may run at once (per-tensor cuts inside the write pass)
        self._bits = torch.empty(0, dtype=torch.int32)

    def count(self) -> int:
        """Blocks in one pass over every tensor."""
        return sum(len(row_blocks(self.src.shape(n), BLOCK_ELEMENTS)) for n in self.names)

    def blocks(self, names: list[str] | None = None, every: int = 1) -> Iterator[tuple[str, int, torch.Tensor]]:
        """(name, flat offset, u) for each block of the tensors `names` (all by default), in order;
        with `every` > 1, of every `every`-th run of `sample_run` blocks only (a sample spread over
        the model, in runs long enough that reading them reads little else: a page fault of a
        mapped checkpoint reads megabytes around it), or of every `every`-th chunk of the base
        where its chunks are longer (`_sampled`)."""
        return read_ahead(self._blocks(names, every), depth=self.RING - 2)

    @property
    def sample_run(self) -> int:
        """Blocks per run of a sample: up to SAMPLE_RUN, fewer when a pass has few blocks."""
        return max(1, min(SAMPLE_RUN, self.count() // 256))

    def _blocks(self, names: list[str] | None, every: int) -> Iterator[tuple[str, int, torch.Tensor]]:
        segments = self.base.stream(torch.device("cpu"), check=False)
        ring = [torch.empty(0) for _ in range(self.RING)]  # this pass's own
        j, turn, run = -1, 0, self.sample_run
        for name in self.names if names is None else names:
            e = self.base.entry_of(name)
            shape = self.src.shape(name)
            row = math.prod(shape[1:]) if shape else 1
            for r0, r1 in row_blocks(shape, BLOCK_ELEMENTS):
                j += 1
                offset, size = r0 * row, (r1 - r0) * row
                if every > 1 and not self._sampled(j, run, e["array"], e["start"] + offset, size, every):
                    continue
                with self._lock:
                    cached = self._cache.get((name, offset))
                    keep = cached is None and self._cached + size * 4 <= self._budget
                    if keep:
                        self._cached += size * 4
                if cached is not None:
                    yield name, offset, cached
                    continue
                if keep:
                    u = torch.empty(size)
                else:
                    turn = (turn + 1) % self.RING
                    if ring[turn].numel() < size:
                        ring[turn] = torch.empty(size)
                    u = ring[turn][:size]
                u.copy_(read_rows(self.src, name, r0, r1).reshape(-1))
                u.sub_(segments.get(e["array"], e["start"] + offset, size, e["dtype"]))
                if keep:
                    with self._lock:
                        self._cache[(name, offset)] = u  # complete before another pass can see it
                yield name, offset, u

    def _sampled(self, j: int, run: int, array: str, start: int, size: int, every: int) -> bool:
        """Whether a sample takes block `j`, of `size` elements at `start` of base array `array`:
        one of every `every`-th run of `run` blocks, or, where the array's chunks are longer than
        a run and it has at least CHUNK_SAMPLED_FROM of them (a sample still spread over the
        model), one of every `every`-th chunk that does not end in the next chunk."""
        chunk = self.base.chunk_len(array)
        if chunk <= run * BLOCK_ELEMENTS or self.base.array_len(array) < CHUNK_SAMPLED_FROM * chunk:
            return (j // run) % every == 0
        first = start // chunk
        return first % every == 0 and (start + size - 1) // chunk == first

    def at_least(self, lo: Callable[[], int],
                 wide: bool) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(name, positions, values, |u| bits) of the entries of each block whose |u| bits are at
        least `lo()` (asked anew for each block: the consumer may raise it as it counts), in order:
        positions in the tensor (int64 if `wide`, else int32), float32 values. Picked in a second
        worker thread from the blocks the first computes, so that on two cores reading, computing
        and picking (numpy's nonzero holds the GIL) overlap the consumer's counting."""
        blocks = read_ahead(self._blocks(None, 1), depth=self.RING - 2)
        return read_ahead(self._picked(blocks, lo, torch.int64 if wide else torch.int32))

    @staticmethod
    def _picked(blocks: Iterator[tuple[str, int, torch.Tensor]], lo: Callable[[], int],
                positions: torch.dtype) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        bits_buf, mask_buf = torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.bool)
        for name, offset, u in blocks:
            n = u.numel()
            if bits_buf.numel() < n:
                bits_buf, mask_buf = torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.bool)
            bits, mask = magnitude_bits(u, out=bits_buf[:n]), mask_buf[:n]
            np.greater_equal(bits.numpy(), np.int32(lo()), out=mask.numpy())  # 3x torch's compare
            idx = torch.from_numpy(np.flatnonzero(mask.numpy()))  # 4-5x torch's nonzero
            yield name, idx.to(positions).add_(offset), u[idx], bits[idx]

    def bits(self, names: list[str] | None = None, every: int = 1) -> Iterator[torch.Tensor]:
        """|u| bit patterns per block (one reused buffer, see `blocks`)."""
        for _, _, u in self.blocks(names, every):
            if self._bits.numel() < u.numel():
                self._bits = torch.empty(u.numel(), dtype=torch.int32)
            yield magnitude_bits(u, out=self._bits[:u.numel()])


def _global_cut(k: int, deltas: _Deltas, total: int, limit: int, wide: bool) -> tuple[Cut, Candidates | None]:
    """The exact global cut over the deltas, and, when it was found in one pass, every entry it
    may keep (else None: the writing pass recomputes the deltas).

    With enough blocks, a sample brackets the k-th largest first. One pass then keeps the entries
    at or above the bracket (positions and values) while it counts it, raising that floor as it
    counts, so the writing pass reads them instead of recomputing θt − θ* (two passes over the
    model fewer than counting, then selecting). When the bracket would hold over `limit` entries
    (or more than the temporary directory has room for), or the temporary file fails, the bracket
    is counted in one pass instead; when the pass finds fewer than k entries at or above it (the
    bracket missed), or there is no bracket, two plain counting passes run."""
    window = bracket(k, lambda: deltas.bits(every=SAMPLE_EVERY), total) if deltas.count() >= SAMPLED_FROM else None
    picked = Candidates(CACHE_BYTES, wide)
    if window is None or window.lo == 0 or window.expected > limit or not picked.room_for(window.expected):
        return find_cut(k, deltas.bits, window), None
    counts = WindowCounts(window)
    floor = [window.lo]  # raised as the pass counts: what lies below it is never kept
    try:
        for j, (name, positions, values, bits) in enumerate(deltas.at_least(lambda: floor[0], wide)):
            counts.add_picked(bits)
            picked.add(name, positions, values)
            if j % FLOOR_EVERY == FLOOR_EVERY - 1:
                floor[0] = counts.floor(k)
        cut = counts.cut(k)
        if cut is None and picked.count >= k:  # the k-th largest lies above the bracket: among those picked
            cut = find_cut(k, lambda: (magnitude_bits(v) for v in picked.all()))
    except SpillError as e:
        picked.close()
        warnings.warn(f"{e}; counting the top-k in two passes instead", stacklevel=2)
        return find_cut(k, deltas.bits, window), None
    except BaseException:
        picked.close()
        raise
    if cut is None:  # fewer than k at or above the bracket: it says nothing more
        picked.close()
        return find_cut(k, deltas.bits), None
    picked.rewind()
    return cut, picked


def _magnitude_picker(
        keeper: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(kept indices, their values) of each block of u: the top-m magnitudes a Cut's keeper selects."""

    def pick(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = keeper(magnitude_bits(u))
        return idx, u[idx]

    return pick


@dataclass(frozen=True)
class AddAt(Edit):
    """Kept entries of a sparse delta: float32(B[p]) + float32(v) at the positions p (v in its
    stored dtype until added: exact in float32)."""

    delta: torch.Tensor

    def new(self, base: torch.Tensor | None) -> torch.Tensor:
        assert base is not None
        return base.to(torch.float32) + self.delta.to(torch.float32)

    def part(self, start: int, stop: int) -> AddAt:
        assert self.positions is not None
        return dataclasses.replace(self, positions=self.positions[start:stop], delta=self.delta[start:stop])

    def adds_exactly(self, base: torch.Tensor, want: torch.dtype) -> bool:
        """Whether adding the values into `base` in dtype `want` is this edit's arithmetic: CPU adds
        in a 16-bit float dtype compute float32(a) + float32(b) and round once, so `index_add_` is
        bit-identical when neither the base nor the values are rounded to get to `want` (and 4x
        the speed of gather, add, scatter; int32 positions need no widening)."""
        return base.device.type == "cpu" and (
            want == torch.float32 or (base.dtype == want and self.delta.dtype == want))

    def apply_part(self, out: torch.Tensor, flat: torch.Tensor, dtype: torch.dtype | None) -> None:
        """As `Edit.apply_part`, by `index_add_` where `adds_exactly`."""
        if self.adds_exactly(flat, out.dtype):
            assert self.positions is not None
            out.index_add_(0, self.positions, self.delta.to(out.dtype))
        else:
            super().apply_part(out, flat, dtype)

    def write_at(self, flat: torch.Tensor, index: torch.Tensor, base: torch.Tensor | None, holds_base: bool) -> None:
        if holds_base and self.adds_exactly(flat, flat.dtype):
            flat.index_add_(0, index, self.delta.to(flat.dtype))
        else:
            super().write_at(flat, index, base, holds_base)


class SparseDelta(TaskKind):
    """PERU-FFT (on a merged base) or Post-Pruning (on θ0): top-m% of θt − θ* as a sparse delta."""

    name = "fft"
    title = "a full fine-tune"
    kept_label = "entries kept"
    original_label = "the full checkpoint"
    declared = FFT_DECLARED

    def make_options(self, given: dict[str, Any]) -> FFTOptions:
        opts = FFTOptions.resolved(given)
        opts.validate()
        return opts

    def base_id(self, bases: Collection[str], requested: str | None) -> str:
        """The merged base if the store has one, else θ0; `requested` picks one explicitly."""
        return requested or ("merged" if "merged" in bases else "pretrained")

    def check_entry(self, entry: TaskEntry) -> str | None:
        p = entry["params"]
        if p.get("value_dtype") not in VALUE_DTYPES or p.get("index_dtype") not in INDEX_DTYPES:
            return (f"value dtype {p.get('value_dtype')!r} or index dtype {p.get('index_dtype')!r} "
                    "is not one of the format's")
        if p["value_dtype"] in QUANT_MAX and not (_whole(p.get("group_size")) and p["group_size"] >= 1):
            return f"group size {p.get('group_size')!r} of quantized values is not a positive integer"
        if p.get("positions", "stored") not in POSITIONS or "positions" in p and p.get("sparsify") != "dare":
            return f"positions {p.get('positions')!r} are not one of {', '.join(POSITIONS)} of a DARE task"
        keep = p.get("keep")
        if "positions" in p and not (isinstance(keep, (int, float)) and not isinstance(keep, bool) and 0 < keep <= 1):
            return f"keep {keep!r} of seeded positions is not a fraction in (0, 1]"
        return None

    def check_table(self, table: list[TableEntry], entry: TaskEntry) -> str | None:
        """Quantized values: each non-empty sparse entry's `values` and `scales` segments hold its count
        (spec section 5); float values share the indices' slice. Seeded positions: each non-empty sparse
        entry, and only those, has a `seed` (a whole number in [0, 2**64))."""
        p = entry["params"]
        group = p.get("group_size", 1)
        seeded = p.get("positions") == "seeded"
        for t in table:
            if t["kind"] != "sparse":
                continue
            if "seed" in t and not (seeded and _whole(t["seed"]) and 0 <= t["seed"] < 1 << 64) \
                    or seeded and t["count"] and "seed" not in t:
                return (f"entry {t['name']!r} has seed {t.get('seed')!r} in a task whose positions are "
                        f"{p.get('positions', 'stored')}")
            c, seg = t["count"], t.get("segments", {})
            if not c:  # the base's tensor: nothing to read (a seeded entry has no indices to show a lost count)
                if any(n for _, n in seg.values()):
                    return f"entry {t['name']!r} has segments {seg} for no values"
                continue
            want = {} if p["value_dtype"] not in QUANT_MAX else {
                "values": (c + 1) // 2 if p["value_dtype"] == "int4" else c, "scales": -(-c // group)}
            if set(seg) != set(want) or any(seg[a][1] != n for a, n in want.items()):
                return f"entry {t['name']!r} has segments {seg} for {c} {p['value_dtype']} values"
            if "seed" in t and want and t["start"] != seg["values"][0]:  # the values' start: no slice of indices
                return f"entry {t['name']!r} starts at {t['start']}, not at its values' {seg['values'][0]}"
        return None

    def array_dtypes(self, entry: TaskEntry) -> dict[str, str]:
        p = entry["params"]
        return {"indices": p["index_dtype"], "values": storage_dtype(p["value_dtype"]), "scales": "float16"}

    def write(self, out: PayloadWriter, task: str, source: Checkpoint, base: TensorSource, base_entry: BaseEntry,
              options: FFTOptions, progress: bool) -> dict[str, Any]:
        # the store's own stored base: this kind has no extra_bases, so no WithOtherBases wraps it
        stored = cast(PayloadReader, base)
        with one_torch_thread():  # the stream's own threads share the cores (modelstore/_runtime/threads.py)
            return self._write(out, task, source, stored, base_entry, options, progress)

    def _write(self, out: PayloadWriter, task: str, checkpoint: Checkpoint, base: PayloadReader, base_entry: BaseEntry,
               opts: FFTOptions, progress: bool) -> dict[str, Any]:
        opts.validate()
        full_bytes = checkpoint.nbytes()
        given = fine_tune_input(task, checkpoint, base, base_entry)
        source, steps, entry = given.source, given.steps, given.entry
        sparse = [n for n, kind in steps if kind == "sparse"]
        value_dtype = opts.value_dtype or (
            "bfloat16" if sparse and all(source.dtype(n) == torch.bfloat16 for n in sparse) else "float16")
        sizes = {n: math.prod(source.shape(n)) for n in sparse}
        total = sum(sizes.values())
        deltas = _Deltas(source, base, sparse, CACHE_BYTES)
        chosen = None
        if opts.budgeted:
            chosen = _choose(task, opts, value_dtype, source, deltas, total,
                             [n for n, kind in steps if kind == "dense"])
            opts = dataclasses.replace(opts, keep=chosen.keep, value_dtype=chosen.value_dtype)
            value_dtype = chosen.value_dtype
        dare = opts.sparsify == "dare"
        index_dtype = "uint32" if max(sizes.values(), default=0) <= 1 << 32 else "uint64"
        picked = None  # the entries a one-pass selection may keep, read back by the writing pass
        if dare:  # about keep·N entries, at most N
            capacity, keeper = total, None
        elif opts.granularity == "global":
            k = kept_count(opts.keep, total)
            # one pass is worth it while the picked entries (8 bytes each) are fewer bytes than the task's values
            cut, picked = _global_cut(k, deltas, total, sum(sizes[n] * source.dtype(n).itemsize for n in sparse) // 8,
                                      max(sizes.values(), default=0) >= 1 << 31)
            keeper = cut.keeper()
            capacity = k
        else:
            capacity = sum(kept_count(opts.keep, s) for s in sizes.values())
            keeper = None
        if total and not capacity:
            raise InputError(f"--keep {opts.keep} keeps no entry of task {task!r} ({total} delta entries"
                             f"{' per tensor' if opts.granularity == 'per-tensor' else ''}); raise --keep")
        seeded = opts.positions == "seeded"  # no positions stored: each tensor's entry records its draw seed
        values = value_writer(out, value_dtype, index_dtype, capacity, len(sparse), opts.group_size, seeded)
        out.declare_dense("dense", ((source.shape(n), source.dtype(n)) for n, kind in steps if kind == "dense"))
        seeds = {n: opts.seed + i for i, n in enumerate(sparse)}

        def kept_entries() -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
            """(tensor, positions, values) kept of each part of each sparse tensor, in order, checked."""
            # one pass over the sparse tensors, the base streamed once (none when `picked` holds the entries)
            stream = deltas.blocks() if picked is None else iter(())
            for n in sparse:
                pick = dare_picker(opts.keep, seeds[n], opts.dare_q) if dare else _magnitude_picker(
                    keeper or find_cut(kept_count(opts.keep, sizes[n]), functools.partial(deltas.bits, [n])).keeper())
                blocks = len(row_blocks(source.shape(n), BLOCK_ELEMENTS))
                parts = picked.of(n) if picked is not None else (
                    (offset, u) for _, offset, u in itertools.islice(stream, blocks))
                for at, u in parts:  # at: the block's offset in the tensor, or each picked entry's position
                    if dare:
                        check_finite(u, f"task {task!r} tensor {n!r}")
                    idx, kept_values = pick(u)
                    # NaN/Inf have the largest magnitude bits, so any would be among the kept entries
                    if not kept_values.numel():
                        check_finite(u, f"task {task!r} tensor {n!r}")
                        continue
                    largest = float(kept_values.abs().max())  # NaN if any is NaN
                    if not math.isfinite(largest):
                        raise InputError(f"task {task!r} tensor {n!r} has NaN or Inf values; "
                                         "fix the checkpoint before storing it")
                    if largest > VALUE_LIMITS[value_dtype]:
                        raise InputError(f"task {task!r} tensor {n!r}: a delta exceeds the {value_dtype} range; "
                                         "use --value-dtype float32")
                    yield n, idx + at if isinstance(at, int) else at[idx], kept_values

        kept, dense_count = 0, 0
        # selecting in a worker overlaps encoding and dense tensors; read_ahead is a generator, closed below
        entries = cast(Generator[tuple[str, torch.Tensor, torch.Tensor], None, None], read_ahead(kept_entries()))
        try:
            ahead = next(entries, None)
            for n, kind in bar(steps, f"task {task}", progress):
                if kind == "base":
                    out.add(entry(n, kind="sparse", shape=list(base.shape(n)), dtype=dtypes.dtype_name(base.dtype(n)),
                                  start=values.position, count=0))
                    continue
                if kind == "sparse":
                    values.begin()
                    while ahead is not None and ahead[0] == n:
                        values.add(ahead[1], ahead[2])
                        ahead = next(entries, None)
                    fields = values.end()
                    if seeded:
                        fields["seed"] = seeds[n]
                    out.add(entry(n, kind="sparse", shape=list(source.shape(n)),
                                  dtype=dtypes.dtype_name(source.dtype(n)), **fields))
                    kept += fields["count"]
                    continue
                dense_count += store_whole_or_same(out, task, n, source, base, entry, values.position)
        finally:
            entries.close()  # stops the worker before the entries it reads are closed
            if picked is not None:
                picked.close()
        merge = base_entry.get("merge", {})
        params = {"keep": opts.keep, "granularity": opts.granularity, "value_dtype": value_dtype,
                  "index_dtype": index_dtype, "merge": merge}
        if value_dtype in QUANT_MAX:
            params["group_size"] = opts.group_size
        if dare:
            params.update(sparsify="dare", seed=opts.seed)
            if opts.dare_q is not None:  # absent: 1/keep, as every task written before dare_q
                params["dare_q"] = opts.dare_q
            if seeded:  # absent: stored, as every task written before seeded positions
                params["positions"] = "seeded"
        if chosen is not None:
            params["budget"] = {"bits_per_param": opts.budget, "max_rel_error": opts.max_rel_error,
                                "predicted_bits_per_param": chosen.bits_per_param,
                                "predicted_rel_error": chosen.rel_error}
        return {
            "method": "post-pruning" if merge.get("method", "none") == "none" else "peru-fft",
            "params": params,
            "kept": kept, "total": total, "dense_tensors": dense_count, "full_bytes": full_bytes,
        }

    describes_edits = True

    def edits(self, segments: Segments, table: list[TableEntry], entry: TaskEntry,
              device: torch.device) -> Iterator[Edit]:
        """Per sparse tensor its positions cumsum(gaps), or re-drawn from its seed, and values; dense tensors whole
        (spec: "Reading a task")."""
        p = entry["params"]
        def seeded(t: TableEntry) -> bool:  # check_table: a seeded task's sparse entry with values
            return t["kind"] == "sparse" and bool(t["count"]) and "seed" in t

        # their positions, re-drawn on the CPU, several tensors side by side
        drawn = map_ahead(lambda t: seeded_positions(p["keep"], t["seed"], math.prod(t["shape"]), t["count"],
                                                     BLOCK_ELEMENTS, f"task tensor {t['name']!r}"),
                          [t for t in table if seeded(t)])
        for t in table:
            name, shape, dtype = t["name"], tuple(t["shape"]), dtypes.torch_dtype(t["dtype"])
            s, c = t["start"], t["count"]
            if t["kind"] != "sparse":
                yield Replace(name, shape, dtype, None, segments.get(t["array"], s, c, t["dtype"]).view(shape))
                continue
            if seeded(t):
                pos = next(drawn).to(device)
                yield AddAt(name, shape, dtype, pos, read_values(segments, t, p), base_name=t.get("base"))
                continue
            # a count-0 entry (the base's tensor) may record start 0 after slices already read: nothing to read
            gaps = segments.get("indices", s, c, p["index_dtype"]) if c else torch.empty(0, dtype=torch.int32,
                                                                                        device=device)
            size = math.prod(shape)
            if size < 1 << 31:  # int32 positions: half the memory while the edit is held; `index` widens them
                # a gap past the tensor (damage) wraps negative here or ends past it: both are caught below
                pos = gaps.view(torch.int32) if gaps.dtype == torch.uint32 else gaps.to(torch.int32)
                pos.cumsum_(0)  # in place (the gaps are this read's own): 10x numpy's cumsum into fresh memory
            else:
                pos = torch.cumsum(gaps.to(torch.int64), 0)
            if c and (int(pos[-1]) >= size or int(pos.min()) < 0 or bool((pos[1:] <= pos[:-1]).any())):
                raise CorruptStoreError(f"task tensor {name!r}: a stored index lies outside the tensor or repeats "
                                        "one before it; the store is damaged")
            yield AddAt(name, shape, dtype, pos, read_values(segments, t, p) if c else torch.empty(0, device=device),
                        base_name=t.get("base"))

    def tensors(self, segments: Segments, table: list[TableEntry], base: BaseTensors, entry: TaskEntry,
                device: torch.device, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """Base + values at the kept positions, on `device`.

        Only the k kept entries are computed in float32 (float32(B[p]) + float32(v), rounded to the
        output dtype); every other entry is the base's own, which is what the float32 round trip
        of the whole tensor gives too, so the result is bit-identical at a fraction of the work.
        """
        for e in read_ahead(self.edits(segments, table, entry, device)):  # decoding overlaps applying
            yield e.name, e.applied(base.fresh(e.source) if e.uses_base else None, dtype)

    def setting(self, entry: TaskEntry) -> dict[str, Any]:
        p = entry["params"]
        return {"keep": p.get("keep"), "values": p.get("value_dtype"), "sparsify": p.get("sparsify", "magnitude")}

    def describe(self, info: Mapping[str, Any]) -> str:
        p = self.setting(cast(TaskEntry, info))
        return (f"{info['kept']} of {info['total']} entries kept ({p['sparsify']}, m = {p['keep']:g}, "
                f"{p['values']} values), {human_bytes(info['bytes'])} "
                f"({percent(info['ratio'])} of the full checkpoint)")


__all__ = ["SparseDelta", "FFTOptions", "FFT_DECLARED", "DEFAULT_SPARSIFY", "DARE_KEEP", "DEFAULT_VALUE_DTYPE",
           "MAGNITUDE_KEEP", "GRANULARITIES", "SPARSIFIERS", "plan", "check_finite",
           "store_whole_or_same", "FineTuneInput", "fine_tune_input"]
