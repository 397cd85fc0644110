"""The entries a one-pass top-k may keep, held for its writing pass instead of recomputed.

A pass over u = θt − θ* that knows, from a sample, the bracket of bit patterns holding the k-th
largest |u| keeps every entry at or above the bracket: its position and float32 value, tensor by
tensor in order. That is a little more than the k entries kept (keep·N and the ties at the cut,
against the 2·N values of θt and θ* a second pass would read again); past a memory budget they go to an unnamed
temporary file (TMPDIR), which disappears with the process however it ends.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from modelstore.format.chunks import empty


class SpillError(OSError):
    """The temporary file of picked entries could not be written or read (a full disk, say)."""


class Candidates:
    """Positions and float32 values of picked entries, per tensor, read back in the order added."""

    def __init__(self, budget: int, wide: bool = False):
        self._budget = budget
        self._pos = torch.int64 if wide else torch.int32  # positions inside a tensor
        self.entry_bytes = self._pos.itemsize + 4
        self._records: list[tuple[str, int]] = []  # (tensor, entries) per add, in order
        self._held: list[tuple[torch.Tensor, torch.Tensor]] = []  # the first records' data
        self._bytes = 0
        self._file: io.BufferedRandom | None = None
        self._writer: ThreadPoolExecutor | None = None  # file writes overlap the pass that picks
        self._pending: Future[None] | None = None
        self._cursor = 0
        self.count = 0

    def room_for(self, count: int) -> bool:
        """Whether `count` entries fit: past the memory budget, in half the temporary directory's
        free space."""
        spill = count * self.entry_bytes - self._budget
        return spill <= 0 or spill <= shutil.disk_usage(tempfile.gettempdir()).free // 2

    def add(self, name: str, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Entries of tensor `name` (after its earlier ones): positions in it and float32 values."""
        n = positions.numel()
        if not n:
            return
        self._records.append((name, n))
        self.count += n
        positions = positions.to(self._pos)
        size = n * (positions.element_size() + 4)
        if self._file is None and self._bytes + size <= self._budget:
            self._held.append((positions, values.to(torch.float32, copy=True)))
            self._bytes += size
            return
        if self._file is None:
            try:
                self._file = tempfile.TemporaryFile(prefix="modelstore-candidates-")
            except OSError as e:
                raise SpillError(f"cannot make a temporary file in {tempfile.gettempdir()}: {e}") from e
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="modelstore-candidates")
        self._wait()  # one write in flight: bounded memory
        assert self._writer is not None
        self._pending = self._writer.submit(self._write, positions, values.to(torch.float32))

    def _write(self, *arrays: torch.Tensor) -> None:
        assert self._file is not None
        for a in arrays:
            self._file.write(a.numpy().data.cast("B"))

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                pending.result()
            except OSError as e:
                raise SpillError(f"cannot write to a temporary file in {tempfile.gettempdir()}: {e}") from e

    def rewind(self) -> None:
        """Read from the first record again."""
        self._wait()
        self._cursor = 0
        if self._file is not None:
            self._file.flush()
            self._file.seek(0)

    def of(self, name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(positions, values) of tensor `name`, asked for in the order tensors were added
        (a tensor with none yields nothing)."""
        while self._cursor < len(self._records) and self._records[self._cursor][0] == name:
            i = self._cursor
            self._cursor += 1
            yield self._record(i)

    def all(self) -> Iterator[torch.Tensor]:
        """The values of every record, in order (for counting passes)."""
        self.rewind()
        for i in range(len(self._records)):
            yield self._record(i)[1]
        self.rewind()

    def _record(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i < len(self._held):
            return self._held[i]
        n = self._records[i][1]
        assert self._file is not None
        pos = empty(n, np.dtype(np.int64 if self._pos == torch.int64 else np.int32))
        values = empty(n, np.dtype(np.float32))
        for a in (pos, values):
            if self._file.readinto(a.data.cast("B")) != a.nbytes:
                raise SpillError("the temporary file of picked entries was cut short")
        return torch.from_numpy(pos), torch.from_numpy(values)

    def close(self) -> None:
        """Drop the file (waiting for a write in flight)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer, self._pending = None, None
        if self._file is not None:
            self._file.close()
            self._file = None


__all__ = ["Candidates", "SpillError"]
