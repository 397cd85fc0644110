"""Garbage collection: payload directories that no manifest references.

Writers leave such directories only when they are killed between writing a payload and publishing
it (a failed write deletes its own). They are removed here, and only once older than a grace
period, so a payload another writer is still writing or about to publish is never touched.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InputError
from .format.manifest import payload_paths
from .storage import Location

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in "0s", "90", "30m", "1h", "2d".

    Raises:
        InputError: not a duration.
    """
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise InputError(f"--grace takes a duration such as 0s, 30m, 1h or 2d, not {text!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


@dataclass
class GcReport:
    """Unreferenced payload directories removed (or, with dry_run, that would be), those kept because
    they are younger than the grace period, and the bytes freed."""

    removed: list[str] = field(default_factory=list)
    kept_young: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    grace_s: float = 0.0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data (`modelstore gc --json`)."""
        return asdict(self)


def collect(loc: Location, grace_s: float, dry_run: bool = False) -> GcReport:
    """Remove payload directories that the manifest does not reference and older than `grace_s`."""
    report = GcReport(grace_s=grace_s, dry_run=dry_run)
    live = payload_paths(loc.require_manifest())
    now = time.time()
    candidates = []
    for rel, newest in loc.payload_dirs():
        if rel in live:
            continue
        old = (loc.stages_locally or grace_s <= 0) if newest is None else now - newest >= grace_s
        (candidates if old else report.kept_young).append(rel)
    live = payload_paths(loc.require_manifest())  # a writer may have published one of them meanwhile
    report.removed = sorted(r for r in candidates if r not in live)
    report.bytes_freed = sum(loc.size_of(r) for r in report.removed)
    if not dry_run:
        loc.remove_committed(report.removed)
    report.kept_young.sort()
    return report


__all__ = ["parse_duration", "collect", "GcReport"]
