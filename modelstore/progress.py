"""Progress bars on a terminal, silence when piped."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import click

T = TypeVar("T")


def bar(items: Iterable[T], label: str, enabled: bool, length: int | None = None) -> Iterator[T]:
    """Iterate `items`, drawing a bar on stderr only when `enabled` and stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield from items
        return
    with click.progressbar(items, label=label, length=length, file=sys.stderr, show_pos=True) as it:
        yield from it


@contextlib.contextmanager
def counter(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A function that advances a bar of `total` units (bytes) on stderr; a no-op when not
    `enabled` or when stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as b:
        yield b.update
