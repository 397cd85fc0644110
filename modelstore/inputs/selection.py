"""Which tensors are merged and sparsified: the include / exclude regexes of a base.

A store records its selection in the base entry (`selection`), so every task added later is
split the same way: selected tensors become merged / sparse deltas, the others are kept whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from modelstore.errors import InputError


def selector(include: str | None, exclude: str | None) -> Callable[[str], bool]:
    """Whether a tensor name is selected: `re.search(include)` and not `re.search(exclude)`.

    Raises:
        InputError: a pattern is not a valid regular expression.
    """
    pats = []
    for flag, pat in (("--include", include), ("--exclude", exclude)):
        try:
            pats.append(re.compile(pat) if pat else None)
        except re.error as e:
            raise InputError(f"{flag} {pat!r} is not a valid regular expression: {e}") from None
    inc, exc = pats
    return lambda n: (inc is None or inc.search(n) is not None) and (exc is None or exc.search(n) is None)


def recorded_selector(selection: Mapping[str, str | None] | None) -> Callable[[str], bool]:
    """The selector a base entry's `selection` field records (everything, when absent)."""
    selection = selection or {}
    return selector(selection.get("include"), selection.get("exclude"))


__all__ = ["selector", "recorded_selector"]
