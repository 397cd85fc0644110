"""Validation of names that become paths in a store."""

import re

from .errors import InputError

TASK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_TASK_NAME = 128


def check_task_name(name: str) -> str:
    """Return `name` if it is a safe task name, else raise InputError."""
    if not isinstance(name, str) or not TASK_NAME_RE.fullmatch(name) or len(name) > MAX_TASK_NAME or ".." in name:
        raise InputError(
            f"invalid task name {name!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit "
            f"(at most {MAX_TASK_NAME} characters, no '..')"
        )
    return name
