"""Numbers as people read them in messages: byte counts and ratios."""

from __future__ import annotations


def human_bytes(n: float | None) -> str:
    """`1234567` -> "1.2 MB" (decimal units); None -> "-"."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def percent(r: float | None) -> str:
    """`0.053` -> "5.3%"; None -> "-"."""
    return "-" if r is None else f"{100 * r:.1f}%"


__all__ = ["human_bytes", "percent"]
