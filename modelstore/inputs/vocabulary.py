"""Whether a fine-tune's tokenizer files give another vocabulary than its base's.

A fine-tune that added tokens (and resized its embeddings) is served with its own tokenizer: with
the base's, its new tokens would be split into word pieces the model was not trained on, and the
stored task would not behave like the original. A fine-tune saved with the base's tokenizer keeps
none of its own: transformers rewrites tokenizer_config.json and the layout of tokenizer.json on
every save, so files are compared by what they hold, not byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

#: Files whose bytes are a vocabulary (or its merges), written the same by every save.
VOCABULARY_FILES = ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model")


def _json(blob: bytes) -> Any:
    try:
        return json.loads(blob)
    except ValueError:
        return None


def _tokens(blob: bytes) -> Any:
    """A tokenizer.json's vocabulary: its model (vocabulary, merges) and added tokens, with the
    ids and contents of the added tokens only (their flags vary between versions' saves)."""
    data = _json(blob)
    if not isinstance(data, dict):
        return blob
    added = data.get("added_tokens")
    # sorted by their text: a token without an id (None) must not be ordered against ids
    ids = sorted(((t.get("id"), t.get("content")) for t in added if isinstance(t, dict)), key=repr) \
        if isinstance(added, list) else added
    return data.get("model"), ids


def vocabulary_differs(task: Mapping[str, bytes], base: Mapping[str, bytes]) -> bool:
    """Whether the `task`'s tokenizer files (name -> content) hold a vocabulary `base`'s do not: a
    vocabulary file new or changed, tokens added, or tokenizer.json's vocabulary or added tokens
    changed. Settings files (tokenizer_config.json, special_tokens_map.json) do not count alone."""
    for name, blob in task.items():
        if name == "tokenizer.json":
            if name not in base or _tokens(blob) != _tokens(base[name]):
                return True
        elif name == "added_tokens.json":
            if _json(blob) not in ({}, None) and _json(blob) != _json(base.get(name, b"{}")):
                return True
        elif name in VOCABULARY_FILES or name.endswith(".tiktoken"):
            if base.get(name) != blob:
                return True
    return False


__all__ = ["VOCABULARY_FILES", "vocabulary_differs"]
