"""Where things live in a store, and which names may become paths (spec/FORMAT.md, section 1).

Every path a writer creates comes from here, so the rules are checked in one place.
"""

from __future__ import annotations

import re
import uuid

from modelstore.errors import InputError

MANIFEST = "manifest.json"
GROUP_META = "zarr.json"
TASKS = "tasks"
BASES = "bases"
BASE_IDS = ("merged", "pretrained")

TASK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: Names a task may not take: files of the store's own that a task directory would collide with.
RESERVED_NAMES = frozenset({GROUP_META, MANIFEST})
MAX_TASK_NAME = 128
_PAYLOAD_DIR_RE = re.compile(r"[0-9a-f]{16}")


def check_task_name(name: str) -> str:
    """Return `name` if it is a safe task name.

    Raises:
        InputError: the name could escape its directory or is not a plain file name.
    """
    if isinstance(name, str) and name in RESERVED_NAMES:
        raise InputError(f"invalid task name {name!r}: it is the name of a store file; choose another name")
    if not isinstance(name, str) or not TASK_NAME_RE.fullmatch(name) or len(name) > MAX_TASK_NAME or ".." in name:
        raise InputError(
            f"invalid task name {name!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit "
            f"(at most {MAX_TASK_NAME} characters, no '..')"
        )
    return name


def task_dir(name: str) -> str:
    """`tasks/<name>`: the parent of every payload directory of task `name`."""
    return f"{TASKS}/{check_task_name(name)}"


def base_dir(base_id: str) -> str:
    """`bases/<id>`: the parent of every payload directory of base `base_id`."""
    if base_id not in BASE_IDS:
        raise InputError(f"unknown base {base_id!r}; bases are {', '.join(BASE_IDS)}")
    return f"{BASES}/{base_id}"


def new_payload_dir(parent: str) -> str:
    """A fresh `<parent>/<16 hex digits>` that no manifest references yet."""
    return f"{parent}/{uuid.uuid4().hex[:16]}"


def is_payload_dir(child: str) -> bool:
    """Whether a directory name under a task or base parent is one a writer made."""
    return bool(_PAYLOAD_DIR_RE.fullmatch(child))


__all__ = ["MANIFEST", "GROUP_META", "BASE_IDS", "check_task_name", "task_dir", "base_dir", "new_payload_dir",
           "is_payload_dir"]
