"""Model inputs named as the Hugging Face ecosystem names them: `org/name` or `org/name@revision`.

A path that exists is used as it is; otherwise a Hub model id is resolved with huggingface_hub's
`snapshot_download` to a local snapshot (weights, configs and tokenizer files only). Offline
(`HF_HUB_OFFLINE=1`) that is the local Hugging Face cache, so a machine without the Hub reads
models it downloaded before.
"""

from __future__ import annotations

import os
import re

from modelstore.errors import InputError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
#: What a model input needs from a Hub repository (not its other checkpoints' formats).
_PATTERNS = ["*.safetensors", "*.json", "*.bin", "*.txt", "*.model", "*.tiktoken"]


def is_hub_id(spec: str) -> bool:
    """Whether `spec` is shaped like a Hub model id (`org/name`, optionally `@revision`) and is not a local path."""
    return not os.path.exists(spec) and bool(_HUB_ID.match(spec))


def resolve_input(spec: str | os.PathLike[str]) -> str:
    """A local path for a model input: `spec` itself, or the snapshot of Hub id `org/name[@rev]`.

    Raises:
        InputError: the id is unknown, its revision does not exist, or (offline) it is not in the
            local cache.
    """
    spec = os.fspath(spec)
    if not is_hub_id(spec):
        return spec
    repo_id, _, revision = spec.partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    try:
        return snapshot_download(repo_id, revision=revision or None, allow_patterns=_PATTERNS)
    except RevisionNotFoundError:
        raise InputError(f"{spec}: the Hub repository {repo_id} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise _not_found(spec, "no such model on the Hub (or it is private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise _not_found(spec, "not in the local Hugging Face cache and the Hub cannot be reached "
                               "(HF_HUB_OFFLINE or no network); download it once online") from None
    except OSError as e:
        raise InputError(f"{spec}: could not download it from the Hub ({type(e).__name__}); "
                         "give a local path") from None


def _not_found(spec: str, hub: str) -> InputError:
    """`spec` is neither a local path nor a Hub model: a mistyped path (its first directory
    exists) is named as one, any other id gets both reasons."""
    first = spec.split("/")[0]
    if os.path.isdir(first):
        return InputError(f"no such file or directory: {spec} ({first}/ exists; as a Hub id: {hub})")
    return InputError(f"{spec}: no such file or directory, and as a Hub id: {hub}")


__all__ = ["is_hub_id", "resolve_input"]
