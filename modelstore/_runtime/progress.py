"""Progress bars on a terminal, silence when piped.

Bars are huggingface_hub's tqdm, so its switches apply (`HF_HUB_DISABLE_PROGRESS_BARS=1`, or
`huggingface_hub.utils.disable_progress_bars()`), as they do to the Hub downloads beside them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from huggingface_hub.utils import are_progress_bars_disabled, tqdm

T = TypeVar("T")


def _drawn(enabled: bool) -> bool:
    return enabled and sys.stderr.isatty() and not are_progress_bars_disabled()


def bar(items: Iterable[T], label: str, enabled: bool, length: int | None = None) -> Iterator[T]:
    """Iterate `items`, drawing a bar on stderr only when `enabled`, stderr is a terminal and
    huggingface_hub's bars are on."""
    if not _drawn(enabled):
        yield from items
        return
    with tqdm(items, desc=label, total=length, file=sys.stderr, leave=False) as it:
        yield from it


@contextlib.contextmanager
def counter(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A function that advances a bar of `total` units (bytes) on stderr; a no-op when the bar is
    not drawn (as `bar`)."""
    if not _drawn(enabled):
        yield lambda n: None
        return
    with tqdm(total=total, desc=label, file=sys.stderr, unit="B", unit_scale=True, leave=False) as b:
        yield lambda n: b.update(n) and None
