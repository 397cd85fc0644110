"""Build settings as a YAML file (`modelstore build STORE --config store.yaml`), mergekit-style.

```yaml
pretrained: ./bert-base
tasks: {sst2: ./ft/sst2, mnli: ./ft/mnli}
merge: {method: ties, lambda: 1.0, density: 0.2}
keep: 0.1
calibration: {sst2: ./data/sst2-val.jsonl}   # optional: each task stored at the fewest bytes
min_agreement: 0.99                           # that agree with it this often on its data
```

The keys are those of `modelstore build`'s flags (snake_case); `merge` is a method name or a
mapping of `method` and that method's options under their declared keys (modelstore.merging);
`kind` names the task kind and the task kinds' declared options are keys too (modelstore.kinds).
Paths are used as written, relative to the working directory, like the flags'. Every unknown key
is refused with its name, so a typo never falls back to a default silently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from modelstore.errors import InputError
from modelstore.kinds import KINDS
from modelstore.merging import method_class

#: The task kinds' declared options, by config key.
KIND_KEYS = {o.key: o for k in KINDS for o in k.declared}
#: Keys of calibrated builds (Store.add_task's keywords of the same names).
FIDELITY_KEYS = ("min_agreement", "max_kl", "device", "max_examples", "max_length", "bound")
TOP_KEYS = ("pretrained", "tasks", "merge", "kind", *KIND_KEYS, "include", "exclude", "stats", "base_codec",
            "calibration", *FIDELITY_KEYS)


@dataclass
class BuildConfig:
    """The settings of one `build`, from a config file, flags or both."""

    pretrained: str | None = None
    tasks: dict[str, str] = field(default_factory=dict)
    merge: str | None = None  # None: the kind's default merge, else task-arithmetic
    merge_options: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, str] = field(default_factory=dict)
    kind: str = "fft"
    kind_options: dict[str, Any] = field(default_factory=dict)  # by option name (`keep`, `tall_lambda`...)
    include: str | None = None
    exclude: str | None = None
    base_codec: str = "lz4"
    calibration: dict[str, str] = field(default_factory=dict)  # task -> calibration data file
    fidelity: dict[str, Any] = field(default_factory=dict)  # FIDELITY_KEYS given

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `modelstore.build` after `store`."""
        if self.pretrained is None:
            raise InputError("no pre-trained model: pass --pretrained PATH or set `pretrained:` in the config")
        return {"pretrained": self.pretrained, "tasks": dict(self.tasks), "merge": self.merge,
                "merge_options": dict(self.merge_options), "stats": dict(self.stats), "kind": self.kind,
                "kind_options": dict(self.kind_options), "include": self.include, "exclude": self.exclude,
                "base_codec": self.base_codec, "calibration": dict(self.calibration), **self.fidelity}


def _mapping(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, (str, os.PathLike))
                                                 for k, v in value.items()):
        raise InputError(f"{where} must map names to paths, e.g. {{sst2: ./ft/sst2}}")
    return {k: os.fspath(v) for k, v in value.items()}


def merge_options_from_keys(method: str, given: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A method's options given under their config keys (`lambda`), as keywords (`lam`).

    Raises:
        InputError: a key the method does not declare, named with the method's keys.
    """
    declared = {o.key: o for o in method_class(method).declared}
    out = {}
    for key, value in given.items():
        if key not in declared:
            known = ", ".join(declared) or "none"
            raise InputError(f"{where}: merge method {method!r} has no option {key!r}; its options: {known}")
        out[declared[key].name] = value
    return out


def parse_config(doc: Any, where: str) -> BuildConfig:
    """A BuildConfig from a parsed YAML document; `where` names it in errors."""
    if not isinstance(doc, Mapping):
        raise InputError(f"{where}: a build config is a mapping of {', '.join(TOP_KEYS)}")
    unknown = [k for k in doc if k not in TOP_KEYS]
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(TOP_KEYS)}")
    cfg = BuildConfig()
    if "pretrained" in doc:
        if not isinstance(doc["pretrained"], (str, os.PathLike)):
            raise InputError(f"{where}: pretrained must be a path")
        cfg.pretrained = os.fspath(doc["pretrained"])
    if "tasks" in doc:
        cfg.tasks = _mapping(doc["tasks"], f"{where}: tasks")
    if "stats" in doc:
        cfg.stats = _mapping(doc["stats"], f"{where}: stats")
    if "calibration" in doc:
        cfg.calibration = _mapping(doc["calibration"], f"{where}: calibration")
    cfg.fidelity = {k: doc[k] for k in FIDELITY_KEYS if k in doc}
    merge = doc.get("merge")
    if isinstance(merge, Mapping):
        options = dict(merge)
        method = options.pop("method", None)
        if not isinstance(method, str):
            raise InputError(f"{where}: merge needs a `method:` (e.g. task-arithmetic)")
        cfg.merge, cfg.merge_options = method, merge_options_from_keys(method, options, where)
    elif isinstance(merge, str):
        method_class(merge)  # an unknown method is named now
        cfg.merge = merge
    elif merge is not None:
        raise InputError(f"{where}: merge must be a method name or a mapping with `method:` and its options")
    for key in ("kind", "include", "exclude", "base_codec"):
        if key in doc:
            setattr(cfg, key, doc[key])
    cfg.kind_options = {KIND_KEYS[k].name: v for k, v in doc.items() if k in KIND_KEYS}
    return cfg


def load_config(path: str | os.PathLike[str]) -> BuildConfig:
    """Read a build config file.

    Raises:
        InputError: unreadable file, not YAML, or an unknown key.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except OSError as e:
        raise InputError(f"cannot read config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path} is not valid YAML{at}; check its indentation and quoting") from None
    return parse_config(doc, path)


__all__ = ["BuildConfig", "load_config", "parse_config", "merge_options_from_keys", "TOP_KEYS", "KIND_KEYS",
           "FIDELITY_KEYS"]
