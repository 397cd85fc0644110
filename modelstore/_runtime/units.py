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


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """`"5GB"` -> 5_000_000_000, `"500MiB"`, `"123"` (bytes) as transformers' max_shard_size reads them.

    Raises:
        ValueError: not a size.
    """
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    digits = s.rstrip("KMGTIB")
    unit = s[len(digits):]
    try:
        value = float(digits)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 5GB, 500MiB)") from None
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"{text!r} is not a size (e.g. 5GB, 500MiB)")
    return int(value * _UNITS[unit])


__all__ = ["human_bytes", "percent", "parse_size"]
