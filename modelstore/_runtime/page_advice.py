"""Asking the kernel to read local files ahead of a reader that streams through them, and only then.

A cold read that takes a file piece by piece waits on the disk for each piece in turn;
posix_fadvise(WILLNEED) over the next tens of megabytes has the kernel fetch them in the
background with many requests in flight (a cold 13.9 GB checkpoint read in 2 MB blocks: 23.7 s
by page faults, 9.0 s with 64 MB advised ahead; a cold load spent 70% of its time faulting chunk
files in one by one). A reader that skips, such as a sample's runs of a few megabytes, must not be
read ahead: what it skips would be read for nothing. So a `Streak` watches the byte ranges a reader
takes and names bytes to advise only once more than STREAK_BYTES were read one after another, as
far ahead as the streak is long, up to ADVISE_BYTES.
"""

from __future__ import annotations

import os

#: Bytes read one after another before reading ahead starts (more than a sample's run).
STREAK_BYTES = 16 << 20
#: Bytes the kernel is asked to read ahead of the range being read, at most.
ADVISE_BYTES = 64 << 20


class Streak:
    """Read-ahead advice for one reader of one byte space (a file, or an array of chunk files):
    call `read(start, stop)` before reading bytes [start, stop); once the reads stream, it gives
    the bytes to advise, each byte once: those of the read about to happen not yet asked for (a
    large read is then fetched with many requests in flight, not faulted in piece by piece) and as
    many beyond it as the streak is long, up to ADVISE_BYTES. It holds no reference to its reader
    (a reader that held a callback holding the reader would live until the garbage collector
    ran, with its buffers)."""

    def __init__(self, end: int):
        self._end = end
        self._from, self._to, self._length = 0, -1, 0  # the last read's start; the streak's end and length
        self._advised = 0  # bytes of this streak before this offset were advised

    def read(self, start: int, stop: int) -> tuple[int, int] | None:
        """Note a read of bytes [start, stop) about to happen. Returns None while the reads do not
        stream, else the bytes to advise now (an empty range where they were advised before)."""
        if 0 <= self._to and self._from <= start <= self._to:  # continues the streak (reads may overlap)
            self._length += max(0, stop - self._to)
            self._to = max(self._to, stop)
        else:  # the first read, a skip ahead, or a new pass from further back: its pages may be gone since
            self._length, self._to, self._advised = stop - start, stop, start
        self._from = start
        ahead = min(self._length - STREAK_BYTES, ADVISE_BYTES)
        if ahead <= 0:
            return None
        first, last = max(start, self._advised), min(stop + ahead, self._end)  # this read's own bytes too: at once
        self._advised = max(self._advised, last)
        return first, max(first, last)


def advise_file(fd: int, start: int, stop: int) -> None:
    """Have the kernel read bytes [start, stop) of an open file into the page cache in the background."""
    os.posix_fadvise(fd, start, stop - start, os.POSIX_FADV_WILLNEED)


__all__ = ["Streak", "STREAK_BYTES", "ADVISE_BYTES", "advise_file"]
