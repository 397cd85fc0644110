"""A task's own inputs: the calibration data add-task chooses a representation on, and the data
`modelstore eval` measures one on. One reader for both, so a file that calibrates a task also
checks it.

A file is JSON lines (`{"text": ..., "label": ...}`) or CSV with a `text` column (and optionally
`label`), told apart by its extension (`.csv`); labels are optional and ignored by calibration.
A pair task's rows give its second text too: `text_pair` (an entailment or paraphrase classifier's
second sentence, as transformers' text-classification pipeline takes it), or `question` and
`context` in place of `text` and `text_pair` (an extractive QA model's, as SQuAD names them).
An image model's rows name an `image` file instead (relative to the data file's folder), read with
Pillow and prepared by the model's image processor; a speech model's rows an `audio` file (WAV, at
the sampling rate of the model's feature extractor), prepared by its feature extractor. A model
of images with text (a LLaVA) takes rows of both, `image` and `text` (its prompt). A multiple-choice
model's rows give their `choices` after their `text` (its context or question): a JSON list of
strings, or the columns `choice0`, `choice1` ... (SWAG's `ending0` ... also do), at least two.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from modelstore.errors import InputError

#: A function of (model, tokenized batch) giving [batch, classes] logits, for a model whose head
#: lives outside its checkpoint (a frozen head over a bare encoder).
OutputsFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
#: The fields of a row that name an input file instead of giving a text: an image, a sound.
FILES = ("image", "audio")
#: The columns of a multiple-choice row's choices, numbered from 0 (a JSON row may give a "choices" list).
_CHOICE = re.compile(r"^(?:choice|ending)(\d+)$")


def _choices(row: dict[str, Any]) -> list[Any] | None:
    """A row's choices: its "choices" list, or its choice0 (ending0) ... columns that are not
    empty, in order of their number; None without either."""
    if "choices" in row:
        return row["choices"] if isinstance(row["choices"], list) else [row["choices"]]
    numbered = sorted((int(m.group(1)), v) for k, v in row.items()
                      if (m := _CHOICE.match(str(k))) and v not in (None, ""))
    return [v for _, v in numbered] or None


def _row(row: Any) -> dict[str, Any] | None:
    """The row's fields (SQuAD's question and context as text and text_pair when it has no text),
    or None without a text string or a file's path (FILES)."""
    if not isinstance(row, dict):
        return None
    file = next((f for f in FILES if row.get(f) not in (None, "")), None)
    if row.get("text") in (None, "") and row.get("question") in (None, "") and file is not None:
        named = {file: row[file], **({"label": row["label"]} if row.get("label") not in (None, "") else {})}
        return named if isinstance(row[file], str) else None
    names = ("text", "text_pair") if row.get("text") not in (None, "") else ("question", "context")
    out = {k: row[n] for k, n in zip(("text", "text_pair"), names) if row.get(n) not in (None, "")}
    if row.get("label") not in (None, ""):
        out["label"] = row["label"]
    if file == "image":  # a model of images with text (a LLaVA's)
        out["image"] = row["image"]
    choices = _choices(row)
    if choices is not None:
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices) or "text_pair" in out:
            return None
        out["choices"] = choices
    return out if all(isinstance(out.get(k, ""), str) for k in ("text_pair", "image")) and isinstance(
        out.get("text"), str) else None


def _empty(line: Any, i: int) -> str | None:
    """Why a row with an empty text is refused, or None for another bad row."""
    try:
        row = line if isinstance(line, dict) else json.loads(line)
    except ValueError:
        return None
    if isinstance(row, dict) and row.get("text") == "" and not any(row.get(k) for k in ("question", *FILES)):
        return f"{'row' if isinstance(line, dict) else 'line'} {i} has an empty \"text\"; give every row a text"
    return None


def _rows(path: str, flag: str) -> list[dict[str, Any]]:
    what = ('a "text" string (and optionally a "text_pair" one, or "choices", a list of two strings or more), '
            '"question" and "context" strings, or an "image" or "audio" path')
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:  # a byte-order mark (Excel, PowerShell) is dropped
            if path.lower().endswith(".csv"):
                reader = csv.DictReader(fh)
                if reader.fieldnames is None or not {"text", "question", *FILES} & set(reader.fieldnames):
                    raise InputError(f"{flag} {path}: a CSV file needs a \"text\" (or \"question\", \"image\" or "
                                     "\"audio\") column")
                lines: Any = enumerate(reader, 2)
                bad = f"row {{}} has no {what}"
            else:
                bad = f"line {{}} is not a JSON object with {what} (JSON lines, or CSV with a .csv name)"
                lines = ((i, line) for i, line in enumerate(fh, 1) if line.strip())
            rows = []
            for i, line in lines:
                try:
                    row = _row(line if isinstance(line, dict) else json.loads(line))
                except ValueError:
                    row = None
                if row is None:
                    raise InputError(f"{flag} {path}: {_empty(line, i) or bad.format(i)}")
                rows.append(row)
            return rows
    except OSError as e:
        raise InputError(f"{flag} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InputError(f"{flag} {path}: not UTF-8 text (JSON lines, or CSV with a .csv name)") from None


def _modality(texts: Sequence[str], images: object, audio: object) -> str:
    if images is not None:
        return "image-text" if texts else "image"
    return "audio" if audio is not None else "text"


class Examples(NamedTuple):
    """A data file's texts, their second texts (None: single texts) and labels (None: unlabeled);
    for image or audio data its files' paths (`texts` empty but for images with texts); for a
    multiple-choice model the choices after each text."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[int] | list[list[int]] | None
    images: list[str] | None = None
    audio: list[str] | None = None
    choices: list[list[str]] | None = None

    @property
    def inputs(self) -> list[str]:
        """The examples: the files of image or audio data, else the texts."""
        return self.images or self.audio or self.texts

    @property
    def modality(self) -> str:
        """What the examples are: "image", "image-text", "audio" or "text"."""
        return _modality(self.texts, self.images, self.audio)


def read_data(path: str, label2id: dict[str, int] | None = None, flag: str = "--data",
              labels: bool = True, multi_hot: int | None = None) -> Examples:
    """Texts, second texts and (when every row has one and `labels`) labels of a data file, or its
    images' paths (see the module). With `multi_hot` (a multi-label head's number of labels), a
    label is a list of that many 0/1 values, one per label (transformers' multi-label targets).

    Raises:
        InputError: the file is missing or unreadable, has no examples, a row has no text, some
            rows have a second text (or a file) and some not, or a label is unknown.
    """
    rows = _rows(path, flag)
    if not rows:
        raise InputError(f"{flag} {path}: no examples")
    labelled: list[int] | list[list[int]] | None = None
    if labels:
        labelled = _labels(rows, label2id, path, flag) if multi_hot is None else _multi_hot(rows, multi_hot, path, flag)
    folder = os.path.dirname(os.path.abspath(path))
    for file in FILES:
        named, texted = [file in row for row in rows], ["text" in row for row in rows]
        paths = [os.path.join(folder, row[file]) for row in rows] if all(named) else []
        if paths and all(texted) and file == "image":  # images with texts (a LLaVA's prompts)
            return Examples([row["text"] for row in rows], None, labelled, paths)
        if paths and not any(texted):
            return Examples([], None, labelled, *((paths, None) if file == "image" else (None, paths)))
        if any(named):
            raise InputError(f"{flag} {path}: some rows name an {file} file and some do not, or some give a text "
                             "with it and some not; give one kind of input")
    for key, what in (("text_pair", "a second text (text_pair or context)"), ("choices", "choices")):
        given = [key in row for row in rows]
        if any(given) and not all(given):
            raise InputError(f"{flag} {path}: some rows have {what} and some do not; give them in every row or in "
                             "none")
    texts = [row["text"] for row in rows]
    if "choices" in rows[0]:
        return Examples(texts, None, labelled, choices=[row["choices"] for row in rows])
    return Examples(texts, [row["text_pair"] for row in rows] if "text_pair" in rows[0] else None, labelled)


def _multi_hot(rows: list[dict[str, Any]], n: int, path: str, flag: str) -> list[list[int]] | None:
    """Each row's multi-label target, a list of `n` values 0 or 1; None where no row has one."""
    given = ["label" in row for row in rows]
    if not any(given):
        return None
    if not all(given):
        raise InputError(f"{flag} {path}: some rows have a label and some do not; label all or none")
    out = []
    for i, row in enumerate(rows, 1):
        label = row["label"]
        if not (isinstance(label, list) and len(label) == n and all(
                not isinstance(v, bool) and isinstance(v, (int, float)) and v in (0, 1) for v in label)):
            raise InputError(f"{flag} {path}: row {i} has label {label!r}; a multi-label model's label is a list of "
                             f"{n} values 0 or 1, one per label")
        out.append([int(v) for v in label])
    return out


def _labels(rows: list[dict[str, Any]], label2id: dict[str, int] | None, path: str, flag: str) -> list[int] | None:
    labels: list[int | None] = []
    for i, row in enumerate(rows, 1):
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, (int, str, type(None))):
            raise InputError(f"{flag} {path}: row {i} has label {label!r}; a label is a class index or name")
        if isinstance(label, str):
            if label.lstrip("-").isdigit() and not (label2id and label in label2id):
                label = int(label)  # a CSV's numbers are text
            elif not label2id or label not in label2id:
                raise InputError(f"{flag} {path}: row {i} has label {label!r}, which the model's label2id lacks")
            else:
                label = label2id[label]
        labels.append(label)
    has = [lab is not None for lab in labels]
    if any(has) and not all(has):
        raise InputError(f"{flag} {path}: some rows have a label and some do not; label all or none")
    return [lab for lab in labels if lab is not None] if all(has) else None


@dataclass
class Calibration:
    """Inputs of a task that add-task runs the original and each candidate on, to keep the cheapest
    candidate that still behaves like the original (labels are not needed).

    >>> cal = modelstore.Calibration.from_file("sst2-val.jsonl")
    >>> store.add_task("sst2", "ckpt/", calibration=cal, min_agreement=0.99)

    Args:
        texts: the inputs.
        pairs: their second texts, for a model of text pairs (an entailment classifier's
            hypotheses, an extractive QA model's contexts after its questions in `texts`).
        images: an image model's inputs instead of texts: image files' paths or PIL images; with
            `texts` too, one per image, a model of images with text (a LLaVA: each text its
            prompt, holding the processor's image token).
        audio: a speech model's inputs instead of texts: WAV files' paths or 1-d float arrays at
            the sampling rate of the model's feature extractor.
        choices: a multiple-choice model's choices after each text (its context or question), at
            least two each.
        outputs: for a model whose head is not in its checkpoint, a function of (model, tokenized
            batch) giving [batch, classes] logits; by default the model's own logits (a sequence
            classifier's classes, a causal LM's next tokens).
        max_length: tokens kept of each text.
        batch_size: texts run at once.
        name: what messages call the data.
    """

    texts: Sequence[str] = ()
    outputs: OutputsFn | None = None
    max_length: int = 256
    batch_size: int = 32
    name: str = "<texts>"
    sha256: str = field(default="")
    pairs: Sequence[str] | None = field(default=None, kw_only=True)
    images: Sequence[Any] | None = field(default=None, kw_only=True)
    audio: Sequence[Any] | None = field(default=None, kw_only=True)
    choices: Sequence[Sequence[str]] | None = field(default=None, kw_only=True)
    #: the rows of the file the examples were spread over, when it had more than were used (None: all used)
    file_rows: int | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self.texts = list(self.texts)
        self.images, self.audio = (None if x is None else list(x) for x in (self.images, self.audio))
        if self.files is not None:
            what = "image" if self.audio is None else "sound"
            prompted = self.audio is None and len(self.texts) == len(self.files)  # an image-text model's
            if not self.files or (self.texts and not prompted) or self.pairs is not None \
                    or None not in (self.images, self.audio) or not all(isinstance(t, str) for t in self.texts):
                raise InputError(f"calibration {self.name}: needs at least one {what}, and {what}s only (or "
                                 "images each with a text)")
            if not self.sha256:
                texts = json.dumps(self.texts, ensure_ascii=False).encode() if self.texts else b""
                self.sha256 = hashlib.sha256(texts + b"".join(map(self.digest, self.files))).hexdigest()
        elif not self.texts or not all(isinstance(t, str) for t in self.texts):
            raise InputError(f"calibration {self.name}: needs at least one text, and texts only")
        elif not all(t.strip() for t in self.texts):
            raise InputError(f"calibration {self.name}: text {[bool(t.strip()) for t in self.texts].index(False) + 1} "
                             "is empty; give every example a text (an empty one measures nothing of the task)")
        if self.choices is not None:
            self.choices = [list(c) for c in self.choices]
            if len(self.choices) != len(self.texts) or self.pairs is not None or self.files is not None or not all(
                    len(c) >= 2 and all(isinstance(t, str) for t in c) for c in self.choices):
                raise InputError(f"calibration {self.name}: needs two choices (strings) or more for each text, and "
                                 "no second texts or files with them")
        if self.pairs is not None:
            self.pairs = list(self.pairs)
            if len(self.pairs) != len(self.texts) or not all(isinstance(t, str) for t in self.pairs):
                raise InputError(f"calibration {self.name}: needs one second text (a string) per text, "
                                 f"got {len(self.pairs)} for {len(self.texts)}")
        if not all(isinstance(n, int) for n in (self.max_length, self.batch_size)) or self.max_length < 2 \
                or self.batch_size < 1:
            raise InputError("calibration: --max-length must be an integer of at least 2, and batch_size of at least 1")
        if not self.sha256:
            inputs = self.texts if self.pairs is None and self.choices is None else [self.texts, self.pairs or
                                                                                      self.choices]
            self.sha256 = hashlib.sha256(json.dumps(inputs, ensure_ascii=False).encode()).hexdigest()

    @property
    def files(self) -> list[Any] | None:
        """The images or sounds of image or audio data (None: texts)."""
        return self.images if self.images is not None else self.audio  # type: ignore[return-value]

    @property
    def inputs(self) -> Sequence[Any]:
        """The examples: the images or sounds of image or audio data, else the texts."""
        return self.texts if self.files is None else self.files

    @property
    def modality(self) -> str:
        """What the examples are: "image", "image-text", "audio" or "text"."""
        return _modality(self.texts, self.images, self.audio)

    @property
    def digest(self) -> Callable[[Any], bytes]:
        """The SHA-256 of one of the data's images or sounds."""
        return image_digest if self.images is not None else audio_digest

    @classmethod
    def from_file(cls, path: str, *, max_examples: int | None = 256, max_length: int = 256,
                  batch_size: int = 32) -> Calibration:
        """`max_examples` examples (None: all) of a JSON-lines or CSV data file (see the module):
        of a file with more rows, rows spread evenly over it (spread), since a file sorted by
        label, source or date would otherwise calibrate on its first kind of rows only.

        Raises:
            InputError: the file is missing, unreadable, empty or has a row without text.
        """
        if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
            raise InputError(f"--max-examples must be an integer of at least 1, got {max_examples!r}")
        none = Examples([], None, None)
        texts, pairs, _, images, audio, choices = read_data(path, None, "--calibration", labels=False) if path else none
        try:
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256")
        except OSError as e:
            raise InputError(f"--calibration {path}: {e.strerror or e}") from None
        rows = len(images or audio or texts)
        keep = spread(rows, max_examples)
        texts = [texts[i] for i in keep] if texts else []
        pairs, images, audio = (None if x is None else [x[i] for i in keep] for x in (pairs, images, audio))
        choices = None if choices is None else [choices[i] for i in keep]
        for x in images or ():  # the files' contents are the data too
            digest.update(image_digest(x))
        for x in audio or ():
            digest.update(audio_digest(x))
        return cls(texts, max_length=max_length, batch_size=batch_size, name=path, sha256=digest.hexdigest(),
                   pairs=pairs, images=images, audio=audio, choices=choices,
                   file_rows=rows if len(keep) < rows else None)


def spread(rows: int, examples: int | None) -> list[int]:
    """The indices of `examples` rows (None: all) spread evenly over `rows`: row ⌊i·rows/examples⌋
    of each i < examples (spec section 2, "Fidelity record"), every row when there are no more."""
    if examples is None or rows <= examples:
        return list(range(rows))
    return [i * rows // examples for i in range(examples)]


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise InputError("image inputs are read with Pillow: pip install pillow") from None
    return Image


def _file_digest(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").digest()
    except OSError as e:
        raise InputError(f"{what} {os.fspath(path)}: {e.strerror or e}") from None


def image_digest(image: Any) -> bytes:
    """The SHA-256 of an image file's bytes, or of a PIL image's mode, size and pixels.

    Raises:
        InputError: the file cannot be read.
    """
    if isinstance(image, (str, os.PathLike)):
        return _file_digest(image, "image")
    if not isinstance(image, _pil().Image):
        raise InputError(f"calibration images are file paths or PIL images, not {type(image).__name__}")
    return hashlib.sha256(f"{image.mode} {image.size}".encode() + image.tobytes()).digest()


def load_image(image: Any) -> Any:
    """`image` (a file's path or a PIL image) as an RGB PIL image.

    Raises:
        InputError: the file is missing or not an image Pillow reads.
    """
    pil = _pil()
    if isinstance(image, (str, os.PathLike)):
        try:
            with pil.open(image) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:  # Pillow's UnidentifiedImageError is an OSError
            raise InputError(f"image {os.fspath(image)}: {getattr(e, 'strerror', None) or e}") from None
    return image.convert("RGB")


def audio_digest(sound: Any) -> bytes:
    """The SHA-256 of a sound file's bytes, or of a float array's samples (as float32).

    Raises:
        InputError: the file cannot be read, or the sound is neither a path nor an array.
    """
    if isinstance(sound, (str, os.PathLike)):
        return _file_digest(sound, "audio")
    return hashlib.sha256(_samples(sound).tobytes()).digest()


def _samples(sound: Any) -> np.ndarray:
    if isinstance(sound, torch.Tensor):
        sound = sound.detach().cpu().numpy()
    if not isinstance(sound, np.ndarray) or sound.ndim != 1 or not np.issubdtype(sound.dtype, np.floating) \
            or not len(sound):
        raise InputError("calibration sounds are WAV files' paths or 1-d float arrays of samples (at least one), not "
                         f"{type(sound).__name__} of shape {getattr(sound, 'shape', '?')}")
    return np.ascontiguousarray(sound, dtype=np.float32)


#: WAV sample formats read: (format tag, bits per sample) -> numpy dtype; 1 is integer PCM, 3 float.
_WAV: dict[tuple[int, int], np.dtype[Any]] = {
    (1, 8): np.dtype("u1"), (1, 16): np.dtype("<i2"), (1, 32): np.dtype("<i4"), (3, 32): np.dtype("<f4"),
    (3, 64): np.dtype("<f8")}


def load_audio(sound: Any, rate: int) -> np.ndarray:
    """`sound` (a WAV file's path, or an array of samples taken to be at `rate`) as float32 mono
    samples in [-1, 1] (channels averaged).

    Raises:
        InputError: the file is missing, not a WAV file of PCM or float samples, or not at `rate`.
    """
    if not isinstance(sound, (str, os.PathLike)):
        return _samples(sound)
    name = os.fspath(sound)
    try:
        with open(name, "rb") as fh:
            blob = fh.read()
    except OSError as e:
        raise InputError(f"audio {name}: {e.strerror or e}") from None
    chunks: dict[bytes, bytes] = {}
    at = 12
    while blob[:4] == b"RIFF" and blob[8:12] == b"WAVE" and at + 8 <= len(blob):
        tag, size = blob[at:at + 4], struct.unpack("<I", blob[at + 4:at + 8])[0]
        chunks.setdefault(tag, blob[at + 8:at + 8 + size])
        at += 8 + size + size % 2
    fmt, data = chunks.get(b"fmt "), chunks.get(b"data")
    head = struct.unpack("<HHIIHH", fmt[:16]) if fmt is not None and len(fmt) >= 16 else None
    if head is None or data is None:
        raise InputError(f"audio {name}: not a WAV file; convert it, e.g. ffmpeg -i IN -ar {rate} OUT.wav")
    tag, channels, file_rate, _, _, bits = head
    if tag == 0xFFFE and fmt is not None and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the format is its sub-format's
        tag = struct.unpack("<H", fmt[24:26])[0]
    dtype = _WAV.get((tag, bits))
    if dtype is None or channels < 1:
        raise InputError(f"audio {name}: WAV samples of format {tag}, {bits} bits are not read; convert it to 16-bit "
                         f"PCM, e.g. ffmpeg -i IN -ar {rate} OUT.wav")
    if file_rate != rate:
        raise InputError(f"audio {name}: sampled at {file_rate} Hz, and the model's feature extractor takes {rate} "
                         f"Hz; resample it, e.g. ffmpeg -i IN -ar {rate} OUT.wav")
    whole = len(data) // (dtype.itemsize * channels) * dtype.itemsize * channels
    if not whole:
        raise InputError(f"audio {name}: the file holds no samples")
    x = np.frombuffer(data[:whole], dtype).reshape(-1, channels).astype(np.float64)
    if dtype.kind == "u":
        x = (x - 128) / 128
    elif dtype.kind == "i":
        x /= 2.0 ** (bits - 1)
    return x.mean(1).astype(np.float32)


def as_calibration(calibration: Calibration | str | os.PathLike[str], max_examples: int | None = 256,
                   max_length: int = 256) -> Calibration:
    """`calibration`, or the Calibration of the file it names (`max_examples` of its examples spread
    over it, each of at most `max_length` tokens)."""
    if isinstance(calibration, Calibration):
        return calibration
    return Calibration.from_file(os.fspath(calibration), max_examples=max_examples, max_length=max_length)


__all__ = ["FILES", "Calibration", "Examples", "OutputsFn", "as_calibration", "audio_digest", "image_digest",
           "load_audio", "load_image", "read_data", "spread"]
