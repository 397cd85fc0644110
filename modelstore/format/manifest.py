"""The manifest and tensor tables as typed records, their checks and the table digest.

`manifest.json` is the commit point of a store (spec/FORMAT.md, section 2): a task exists exactly
when it is a key of `tasks`. The records stay plain dicts on the wire; the TypedDicts name their
fields for readers of the code and for type checkers.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NotRequired, TypedDict

from modelstore.errors import CorruptStoreError, FormatVersionError, StoreNotFoundError
from modelstore.format.paths import BASES, TASK_NAME_RE, TASKS, is_payload_dir

FORMAT_NAME = "modelstore"
FORMAT_VERSION = 2
#: Names of the model files a base keeps (plain file names: they become paths).
MODEL_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ArrayInfo(TypedDict, total=False):
    """What the manifest records per flat array: its element count and a checksum, the digest of
    its chunks' crc32c trailers (version 2) or the CRC-32 of its content (version 1)."""

    count: int
    chunks_crc32c: int
    crc32: int
    zarr_json_sha256: str  # sha256 of the array's zarr.json bytes (absent in earlier stores)


class TableEntry(TypedDict, total=False):
    """One tensor of a base or task (spec section 3); kinds add their own fields."""

    name: str
    kind: str  # "dense" | "sparse" | "lowrank"
    shape: list[int]
    dtype: str
    array: str  # the flat array of a dense or lowrank entry
    start: int
    count: int
    base: str  # a sparse entry's base tensor, when its name differs
    segments: dict[str, Any]  # slices of further arrays: name -> [start, count]
    scale: float  # a bitdelta entry's scale
    seed: int  # a sparse entry of a task with seeded positions: the seed its positions are drawn from
    peft_name: str  # a LoRA task's dense entry: its name in the adapter


class PayloadFields(TypedDict):
    """Fields every base and task entry has, written by the payload writer."""

    path: str
    tensors: int
    table_sha256: str
    arrays: dict[str, ArrayInfo]
    bytes: int


class BaseFields(TypedDict, total=False):
    """A base's fields besides its payload's (PayloadFields)."""

    files: dict[str, dict[str, Any]]  # tokenizer / generation files kept with it: name -> sha256, bytes
    kind: str
    merge: dict[str, Any]
    merged_tasks: list[str]
    selection: dict[str, str | None]
    source: dict[str, str]
    config_json: str | None
    codec: str  # "none": its arrays are uncompressed (build's base_codec); absent: "lz4"
    nbytes: int
    created: str
    merged_sources: dict[str, str]  # a merged base's task checkpoints: name -> fingerprint


class BaseEntry(PayloadFields, BaseFields):
    """A base: θ0 (`pretrained`) or the merge θ* (`merged`)."""


class FidelityCandidate(TypedDict):
    """One setting a calibrated add-task evaluated: its bytes and how close it came to the original."""

    setting: dict[str, Any]  # {"kind": ..., fft: "sparsify", "keep", "value_dtype", "dare_q"}
    bytes: int
    agreement: float
    mean_kl: float
    met: bool


class FidelityRecord(TypedDict):
    """How a calibrated add-task chose a task's setting and how close the stored task came to the
    original on the calibration data (spec section 2, "Fidelity record"; readers ignore it)."""

    metric: str  # "agreement" | "kl" | "dare-q" (the tuned DARE rescale only)
    target: float | None  # min agreement or max mean KL; None for "dare-q"
    met: bool
    output: str  # one of OUTPUTS
    agreement: float  # top-1 agreement with the original
    agreement_low: NotRequired[float]  # its one-sided 95% lower bound (records of later writers)
    bound: NotRequired[bool]  # true: the target is of agreement_low, not of agreement
    mean_kl: float  # mean KL(original || stored) per prediction
    examples: int
    file_rows: NotRequired[int]  # the calibration file's rows the examples were spread over (records of later writers)
    max_length: NotRequired[int]  # the tokens each text was cut at (text data; records of later writers)
    predictions: int
    calibration_sha256: str
    device: str
    seconds: float
    setting: dict[str, Any]
    candidates: list[FidelityCandidate]


class TaskEntry(PayloadFields, total=False):
    """A task: its kind (a key of the task-kind registry), the base it sits on, and what the kind records."""

    kind: str
    base: str
    bases: list[str]  # every base the task reads, `base` first; absent: [base]
    method: str
    params: dict[str, Any]
    source: dict[str, str]
    kept: int
    total: int
    dense_tensors: int
    full_bytes: int
    adapter_config: dict[str, Any]
    files: dict[str, dict[str, Any]]  # the model's config files kept with it: name -> sha256, bytes
    fidelity: FidelityRecord  # a calibrated add-task's choice (informative)


class WriterInfo(TypedDict):
    """Who published a manifest: a writer can tell whether a commit whose answer it lost won."""

    id: str
    txn: str
    time: str


class Manifest(TypedDict, total=False):
    format: str
    version: int
    created: str
    bases: dict[str, BaseEntry]
    tasks: dict[str, TaskEntry]
    generation: int
    writer: WriterInfo
    checksum: str


def now() -> str:
    """UTC time stamp, to the second, as the manifest records it."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def new_manifest() -> Manifest:
    """The manifest of an empty store."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "created": now(), "bases": {}, "tasks": {}}


def manifest_checksum(m: Mapping[str, Any]) -> str:
    """sha256 of the manifest without its `checksum` field, in canonical JSON (spec section 2)."""
    body = {k: v for k, v in m.items() if k != "checksum"}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(m: Manifest) -> bytes:
    """The manifest's bytes as written, with its checksum set, and its version raised to 2 once
    it lists a version-2 array (which a version-1 reader could not check)."""
    entries = [*m["bases"].values(), *m["tasks"].values()]
    if any("chunks_crc32c" in a for e in entries for a in e.get("arrays", {}).values()):
        m["version"] = max(m.get("version", 1), 2)
    m["checksum"] = manifest_checksum(m)
    return json.dumps(m, indent=1, sort_keys=True).encode()


def parse_manifest(blob: bytes, url: str) -> Manifest:
    """Parse and check a manifest's bytes (see `check_manifest`)."""
    try:
        m = json.loads(blob)
    except ValueError:
        raise CorruptStoreError(f"{url}: manifest.json is not valid JSON; the store is damaged") from None
    return check_manifest(m, url)


def check_manifest(m: Any, url: str) -> Manifest:
    """`m` as a Manifest, if it is one this version reads and every field a reader acts on is sound.

    Raises:
        StoreNotFoundError: not a modelstore manifest.
        FormatVersionError: written by a newer format version.
        CorruptStoreError: its checksum fails, or a field is missing or out of range.
    """
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise StoreNotFoundError(f"{url} is not a modelstore store (its manifest.json is not ours)")
    v = m.get("version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise FormatVersionError(f"{url} has store format version {v}, newer than this modelstore reads "
                                 f"(version {FORMAT_VERSION}); upgrade modelstore")
    if "checksum" not in m and not _unsealed_v1(m):
        raise CorruptStoreError(f"{url}: manifest.json has no checksum, which only a version-1 manifest may lack; "
                                "the store is damaged (restore it, or `modelstore sync` a good copy over it)")
    if "checksum" in m and m["checksum"] != manifest_checksum(m):
        raise CorruptStoreError(f"{url}: manifest.json fails its checksum; the store is damaged (restore it, "
                                "or `modelstore sync` a good copy over it)")
    damaged = _manifest_problem(m)
    if damaged:
        raise CorruptStoreError(f"{url}: manifest.json is damaged ({damaged}); restore it from a good copy")
    return m  # type: ignore[return-value]


def _unsealed_v1(m: dict[str, Any]) -> bool:
    """Whether `m` may lack its checksum: only version-1 writers left it out, and they recorded no
    version-2 array (`seal` raises the version of a manifest that lists one), so a checksum deleted
    from a later manifest, even with its version lowered, is caught."""
    if m.get("version") != 1:
        return False
    entries = [e for key in ("bases", "tasks") if isinstance(m.get(key), dict) for e in m[key].values()]
    return not any(isinstance(e, dict) and isinstance(e.get("arrays"), dict)
                   and any(isinstance(a, dict) and "chunks_crc32c" in a for a in e["arrays"].values())
                   for e in entries)


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's structure, or None."""
    if not isinstance(m.get("bases"), dict) or not isinstance(m.get("tasks"), dict):
        return "no bases or tasks"
    if not isinstance(m.get("generation", 0), int):
        return "generation is not a number"
    for base_id, b in m["bases"].items():
        problem = _payload_problem(b, f"{BASES}/{base_id}")
        if problem:
            return f"base {base_id!r}: {problem}"
    for name, t in m["tasks"].items():
        problem = _payload_problem(t, f"{TASKS}/{name}") if TASK_NAME_RE.fullmatch(name) else "a bad name"
        bases = t.get("bases", [t.get("base")])
        if problem is None and (not isinstance(t.get("kind"), str) or t.get("base") not in m["bases"]
                                or not isinstance(bases, list) or not bases or bases[0] != t.get("base")
                                or not all(isinstance(b, str) and b in m["bases"] for b in bases)):
            problem = "no kind, or a base the store lacks"
        if problem is None and not isinstance(t.get("params"), dict):
            problem = "no params"
        if problem is None and "fidelity" in t:
            problem = fidelity_problem(t["fidelity"])
            problem = problem and f"fidelity record: {problem}"
        if problem:
            return f"task {name!r}: {problem}"
    return None


def _payload_problem(e: Any, parent: str) -> str | None:
    if not isinstance(e, dict):
        return "not an object"
    path = e.get("path")
    if not isinstance(path, str) or path.rpartition("/")[0] != parent or not is_payload_dir(path.rpartition("/")[2]):
        return f"path {path!r} is not a payload directory of {parent}"
    if not isinstance(e.get("table_sha256"), str) or not isinstance(e.get("bytes", 0), int):
        return "no table digest"
    arrays = e.get("arrays")
    if not isinstance(arrays, dict) or not all(
            isinstance(a, dict) and _count(a.get("count"))
            and (isinstance(a.get("chunks_crc32c"), int) or isinstance(a.get("crc32"), int))
            for a in arrays.values()):
        return "array counts or checksums missing"
    files = e.get("files", {})
    if not isinstance(files, dict) or not all(
            isinstance(n, str) and MODEL_FILE_RE.match(n) and isinstance(f, dict) and isinstance(f.get("sha256"), str)
            and _count(f.get("bytes")) for n, f in files.items()):
        return "bad model file records"
    return None


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _number(x: Any) -> bool:
    """A finite JSON number (not a bool) that is >= 0."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _fraction(x: Any) -> bool:
    return _number(x) and x <= 1


def _setting(x: Any) -> bool:
    return isinstance(x, dict) and isinstance(x.get("kind"), str)


SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
METRICS = ("agreement", "kl", "dare-q")
#: The outputs writers record (spec: "Fidelity record"); a reader takes any name, for later writers'.
OUTPUTS = ("classification", "multi-label", "multiple-choice", "token-classification", "masked-lm",
           "question-answering", "causal-lm", "seq2seq", "ctc", "frame-classification", "segmentation", "embedding",
           "zero-shot", "custom")
#: field -> (its test, what it must be): the fields of a fidelity record, and of each of its candidates.
_Fields = dict[str, tuple[Callable[[Any], bool], str]]
_CANDIDATE_FIELDS: _Fields = {
    "setting": (_setting, "an object naming its kind"), "bytes": (_count, "a byte count"),
    "agreement": (_fraction, "a fraction in [0, 1]"), "mean_kl": (_number, "a finite number >= 0"),
    "met": (lambda x: isinstance(x, bool), "true or false")}
_FIDELITY_FIELDS: _Fields = {
    "metric": (lambda x: x in METRICS, f"one of {', '.join(METRICS)}"),
    "target": (lambda x: x is None or _number(x), "a finite number >= 0 or null"),
    "output": (lambda x: isinstance(x, str) and bool(x), f"a name (such as {', '.join(OUTPUTS)})"),
    "examples": (_count, "a count"), "predictions": (_count, "a count"),
    "calibration_sha256": (lambda x: isinstance(x, str) and bool(SHA256_RE.match(x)), "64 lowercase hex digits"),
    "device": (lambda x: isinstance(x, str), "a string"), "seconds": (_number, "a finite number >= 0"),
    "candidates": (lambda x: isinstance(x, list), "a list"),
    **{k: v for k, v in _CANDIDATE_FIELDS.items() if k != "bytes"}}  # the stored setting's own measures


def _fields_problem(record: Any, fields: _Fields) -> str | None:
    if not isinstance(record, dict):
        return "not an object"
    for field, (sound, want) in fields.items():
        if field not in record:
            return f"{field} missing"
        if not sound(record[field]):
            return f"{field} {record[field]!r} is not {want}"
    return None


def fidelity_problem(record: Any) -> str | None:
    """What is wrong with a task's fidelity record (spec section 2), naming the field, or None.
    Fields the record has beyond these are allowed (a later writer's)."""
    problem = _fields_problem(record, _FIDELITY_FIELDS)
    if problem:
        return problem
    metric, target = record["metric"], record["target"]
    if (target is None) != (metric == "dare-q") or (metric == "agreement" and not _fraction(target)):
        return f"target {target!r} does not suit metric {metric!r}"
    low = record.get("agreement_low", 0.0)
    if not _fraction(low) or low > record["agreement"]:
        return f"agreement_low {low!r} is not a fraction at most the agreement"
    if "file_rows" in record and not (_count(record["file_rows"]) and record["file_rows"] > record["examples"]):
        return f"file_rows {record['file_rows']!r} is not a count of more than the examples"
    if "max_length" in record and not (_count(record["max_length"]) and record["max_length"] >= 2):
        return f"max_length {record['max_length']!r} is not a count of at least 2"
    if "bound" in record and (record["bound"] is not True or metric != "agreement" or "agreement_low" not in record):
        return f"bound {record['bound']!r} is not true on an agreement target with its agreement_low"
    for i, c in enumerate(record["candidates"]):
        problem = _fields_problem(c, _CANDIDATE_FIELDS)
        if problem:
            return f"candidates[{i}]: {problem}"
    return None


def task_bases(entry: TaskEntry) -> list[str]:
    """Every base a task reads: its `base`, then the others its `bases` lists (spec section 2)."""
    return list(entry.get("bases", [entry["base"]]))


def table_digest(table: object) -> str:
    """sha256 of a tensor table in canonical JSON, recorded in the manifest and checked on read
    (`table`: any JSON value, as a damaged store may hold one)."""
    blob = json.dumps(table, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def payload_paths(m: Manifest | None) -> set[str]:
    """Every payload directory the manifest references (none for no manifest)."""
    if m is None:
        return set()
    return {e["path"] for e in [*m["bases"].values(), *m["tasks"].values()]}


def same_content(a: PayloadFields | BaseEntry | TaskEntry, b: PayloadFields | BaseEntry | TaskEntry) -> bool:
    """Whether two entries hold the same tensors: same table digest and the same count and checksum
    of every array, wherever their directories are."""
    return a.get("table_sha256") == b.get("table_sha256") and a.get("arrays") == b.get("arrays")


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "ArrayInfo", "TableEntry", "PayloadFields", "BaseEntry", "TaskEntry",
           "WriterInfo", "Manifest", "FidelityRecord", "FidelityCandidate", "fidelity_problem", "now", "new_manifest",
           "check_manifest", "parse_manifest", "manifest_checksum",
           "seal", "task_bases", "table_digest", "same_content", "payload_paths"]
