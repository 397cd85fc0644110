"""Declared options of merge methods and task kinds (the CLI, configs and the API derive from them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """One option of a merge method or task kind, declared once: the keyword, the config key, the
    CLI flag, the default and the help all come from here, so they cannot drift apart."""

    name: str
    """Keyword of the Python API (`modelstore.merge`, `build`, `Store.add_task`) and the key
    recorded in the store's manifest (e.g. `lam`)."""
    default: float | str | None
    help: str
    key: str = ""
    """Key in a build config (default: `name`; `lambda` for `lam`)."""
    flag: str = ""
    """CLI flag (default: `--` + key with `_` as `-`)."""
    choices: tuple[str, ...] = ()
    value_type: type | None = None
    """The value's type where the default (None) does not show it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", self.key or self.name)
        object.__setattr__(self, "flag", self.flag or "--" + self.key.replace("_", "-"))


__all__ = ["Option"]
