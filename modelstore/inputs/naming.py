"""Matching a fine-tune's tensor names to the base's.

A task model often wraps the pre-trained one: a BertForSequenceClassification saves `bert.encoder...`
over a BertModel saved as `encoder...`, and a PEFT adapter names `base_model.model.<module>`. A
task tensor matches the base tensor of the same name, else the one whose name is its own with the
first component stripped, or with one component added in front. Zero matches means the tensor is
the task's own (a new head); several are an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class NameMatcher:
    """Candidates among `base_names` for a task's tensor name (see the module docstring)."""

    def __init__(self, base_names: Iterable[str]):
        self.names = set(base_names)
        self._by_tail: dict[str, list[str]] = {}
        for base in self.names:
            _, sep, tail = base.partition(".")
            if sep:
                self._by_tail.setdefault(tail, []).append(base)

    def candidates(self, name: str) -> list[str]:
        """The base names `name` may stand for: itself alone if the base has it, else the others."""
        if name in self.names:
            return [name]
        stripped = name.partition(".")[2]
        return sorted(({stripped} & self.names) | set(self._by_tail.get(name, ())))


def match_names(names: Iterable[str], base_names: Iterable[str], what: str, of: str = "base") -> dict[str, str]:
    """task name -> base name for every task tensor that matches one base tensor (or the tensors of
    what `of` names: a model's, when a task is written into one).

    Raises:
        ValueError: a name matches several base tensors, or two names match one (`what` names the
            input in the message).
    """
    matcher = NameMatcher(base_names)
    out: dict[str, str] = {}
    taken: dict[str, str] = {}
    for n in names:
        found = matcher.candidates(n)
        if len(found) > 1:
            raise ValueError(f"{what}: tensor {n!r} is ambiguous between {of} tensors {found}")
        if not found:
            continue
        if found[0] in taken:
            raise ValueError(f"{what}: tensors {taken[found[0]]!r} and {n!r} both match {of} tensor {found[0]!r}")
        out[n] = taken[found[0]] = found[0]
    return out


def renamer(mapping: dict[str, str]) -> Callable[[str], str]:
    """base name -> task-style name, following how the matched names differ (a prefix added or
    stripped), for base tensors the task lacks but its loaded state dict must have."""
    added = {t[: len(t) - len(b) - 1] for t, b in mapping.items() if t != b and t.endswith("." + b)}
    stripped = any(t != b and b.endswith("." + t) for t, b in mapping.items())
    if len(added) == 1 and not stripped:
        prefix = next(iter(added))
        return lambda b: f"{prefix}.{b}"
    if stripped and not added:
        return lambda b: b.partition(".")[2] or b
    return lambda b: b


__all__ = ["NameMatcher", "match_names", "renamer"]
