"""Which representation of a task to keep: the cheapest candidate whose outputs on the calibration
data meet the target, found with few evaluations.

A candidate is a setting (a dict: {"kind": "fft", "sparsify", "keep", "value_dtype"[, "dare_q"]},
or {"kind": "tall-mask"} ...). `Trials.write` writes it (its bytes are then known exactly, without
a forward pass) and `Trials.measure` runs it, stopping as soon as the target is out of reach
(`Target.missed`: most candidates a search runs miss); each is measured in full at most once. The
search assumes what the frontier measured: within one sparsifier and value dtype, fidelity grows
with keep m; and that DARE at m beats magnitude at m on small dense deltas, magnitude on deltas
whose few large entries matter, so both are searched.

1. For DARE and magnitude with int4 values (the cheapest values, within noise of float16 on every
   task measured), bisection over KEEPS finds the smallest m meeting the target.
2. DAREx-q (Deng et al., ICLR 2025): at the largest m below DARE's, the rescale 1/q is tuned
   (q = m·f over Q_FACTORS, by mean KL on the first examples), and kept if it meets the target;
   then the next m down, while it does.
3. Every other setting that is written cheaper than the best so far is measured: int8 and float
   values at smaller m (per sparsifier and dtype, from the largest m down, stopping at the first
   that misses), and the 1-bit kinds (skipped when the best already costs less than a bit mask).
4. The exact kind when nothing met the target, or when the best costs more than EXACT_ABOVE of the
   checkpoint: it meets any target (its outputs are the original's) and is measured like the rest.

A LoRA task's candidates are its ranks q (PERU-LoRA keeps each update's best rank-q part, so its
outputs come nearer the adapter's as q grows): `search_rank` bisects over them.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from modelstore.fidelity.metrics import agreement_low

#: keep fractions m searched (DARE: of the changed entries; magnitude: of all entries): steps of
#: about 1.5x, since bytes grow with m and a coarser step pays up to its ratio over the m needed;
#: a bisection runs log2(17) ~ 4 of them.
KEEPS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.007, 0.01, 0.015, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5)
#: DAREx-q: q = m·f for f in these (f > 1 shrinks the rescale 1/m; the unbiased 1/m is f = 1).
Q_FACTORS = (0.8, 1.25, 1.6, 2.5, 4.0)
#: Examples the DAREx-q rescale is tuned on.
TUNE_EXAMPLES = 64
#: The exact kind is tried when the best candidate costs more than this fraction of the checkpoint.
EXACT_ABOVE = 0.1
MASK_KINDS = ("tall-mask", "emr", "bitdelta")
Setting = dict[str, Any]
#: The exact kind's setting: its outputs are the original's (its weights are), so it meets any
#: target, whatever rounding noise a measurement of it shows (a GEMM's result may depend on where
#: its operands lie in memory: a KL of 1e-17 between two runs of the same weights).
EXACT: Setting = {"kind": "exact"}


class Skip(Exception):
    """The store cannot hold this candidate (a base its kind reads is missing)."""


@dataclass
class Written:
    """A candidate written to storage (not published)."""

    setting: Setting
    bytes: int
    #: entries the kind considered (an fft task's `total`), for the bit-mask bound
    total: int
    handle: Any = None


@dataclass
class Score:
    agreement: float
    mean_kl: float
    #: predictions compared: all of the calibration data's, or fewer when the measurement stopped as
    #: soon as the target could no longer be met (`complete` False)
    predictions: int
    complete: bool = True


class Trials(Protocol):
    """What the search runs candidates with (the store writes them, the runner measures them)."""

    def write(self, setting: Setting) -> Written:
        """Write the candidate; raise Skip when the store cannot hold it."""
        ...

    def measure(self, w: Written, examples: int | None = None, target: Target | None = None) -> Score:
        """Its outputs against the original's on the calibration data (the first `examples`),
        stopping once `target` cannot be met whatever the rest gives (`Target.missed`)."""
        ...

    def discard(self, w: Written) -> None:
        """Delete a candidate that was not chosen."""
        ...


@dataclass(frozen=True)
class Target:
    """min_agreement: top-1 agreement at least this; or max_kl: mean KL at most this. With
    `bound`, the agreement's one-sided 95% lower bound over `examples` independent examples
    (metrics.agreement_low) must be at least min_agreement: a promise for more data like it."""

    min_agreement: float | None = None
    max_kl: float | None = None
    bound: bool = False
    examples: int = 0

    def _agreement(self, agreement: float) -> float:
        return agreement_low(agreement, self.examples) if self.bound else agreement

    def met(self, s: Score) -> bool:
        if not s.complete:
            return False
        if self.max_kl is not None:
            return s.mean_kl <= self.max_kl
        assert self.min_agreement is not None
        return self._agreement(s.agreement) >= self.min_agreement

    def missed(self, agree: int, kl_sum: float, rows: int, total: int) -> bool:
        """Whether a candidate whose first `rows` of `total` predictions agree `agree` times with a
        KL sum of `kl_sum` misses the target however the rest come out (KL terms are >= 0, and at
        best every remaining prediction agrees): most candidates a search runs miss, and this ends
        their measurement early without changing any verdict."""
        if self.max_kl is not None:
            return kl_sum / total > self.max_kl
        assert self.min_agreement is not None
        return self._agreement((agree + total - rows) / total) < self.min_agreement

    @property
    def metric(self) -> str:
        return "kl" if self.max_kl is not None else "agreement"

    @property
    def value(self) -> float:
        v = self.max_kl if self.max_kl is not None else self.min_agreement
        assert v is not None
        return v


@dataclass
class Tried:
    written: Written
    score: Score
    met: bool

    def record(self) -> dict[str, Any]:
        return {"setting": self.written.setting, "bytes": self.written.bytes, "agreement": self.score.agreement,
                "mean_kl": self.score.mean_kl, "met": self.met, "predictions": self.score.predictions}


@dataclass
class Outcome:
    chosen: Tried
    tried: list[Tried]
    seconds: float


def fft_setting(sparsify: str, keep: float, value_dtype: str | None, dare_q: float | None = None,
                positions: str = "stored") -> Setting:
    """An fft candidate (value_dtype None: the task's float default; `positions` applies to DARE,
    "seeded" storing none of its positions)."""
    s: Setting = {"kind": "fft", "sparsify": sparsify, "keep": keep, "value_dtype": value_dtype}
    if dare_q is not None:
        s["dare_q"] = dare_q
    if sparsify == "dare" and positions != "stored":
        s["positions"] = positions
    return s


class _Search:
    def __init__(self, trials: Trials, target: Target, float_dtype: str = "float16", full_bytes: int = 0,
                 dare_positions: str = "stored"):
        self.trials, self.target, self.float_dtype, self.full_bytes = trials, target, float_dtype, full_bytes
        self.fft = functools.partial(fft_setting, positions=dare_positions)
        self.tried: list[Tried] = []
        self.best: Tried | None = None
        self.cache: dict[str, Tried | Written | None] = {}

    def _key(self, s: Setting) -> str:
        return repr(sorted(s.items()))

    def _write(self, s: Setting) -> Written | None:
        key = self._key(s)
        if key not in self.cache:
            try:
                self.cache[key] = self.trials.write(s)
            except Skip:
                self.cache[key] = None
        got = self.cache[key]
        return got.written if isinstance(got, Tried) else got

    def run(self, s: Setting, only_if_cheaper: bool = False) -> Tried | None:
        """The candidate measured (once), None when the store cannot hold it or, with
        `only_if_cheaper`, it costs no less than the best so far."""
        key = self._key(s)
        got = self.cache.get(key)
        if isinstance(got, Tried):
            return got
        w = self._write(s)
        if w is None:
            return None
        if only_if_cheaper and self.best is not None and w.bytes >= self.best.written.bytes:
            return None
        exact = s == EXACT  # measured whole: it meets any target
        score = self.trials.measure(w, target=None if exact else self.target)
        t = Tried(w, score, self.target.met(score) or exact)
        self.cache[key] = t
        self.tried.append(t)
        if t.met and (self.best is None or w.bytes < self.best.written.bytes):
            self.best = t
        return t

    def smallest(self, values: Sequence[Any], setting: Callable[[Any], Setting]) -> int | None:
        """Index into `values` (ascending) of the smallest whose candidate meets the target
        (bisection), or None."""
        lo, hi = 0, len(values)
        while lo < hi:
            mid = (lo + hi) // 2
            t = self.run(setting(values[mid]))
            if t is not None and t.met:
                hi = mid
            else:
                lo = mid + 1
        return lo if lo < len(values) else None

    def ranks(self, ranks: Sequence[int]) -> None:
        """The smallest LoRA rank meeting the target; the largest, measured whole, when none does."""
        def setting(q: int) -> Setting:
            return {"kind": "lora", "rank": q}

        if self.smallest(ranks, setting) is None:  # the bisection measured the largest last
            last = next(t for t in self.tried if t.written.setting == setting(ranks[-1]))
            last.score = self.trials.measure(last.written)  # whole: its measurement may have stopped early
            self.best = last

    def tuned_dare(self, keep: float) -> Tried | None:
        """DARE at `keep` with q tuned on the first examples (None when 1/m does as well there),
        measured on them all."""
        scored = []
        for q in (None, *(min(1.0, float(f"{keep * f:.6g}")) for f in Q_FACTORS)):
            w = self._write(self.fft("dare", keep, "int4", q))
            if w is not None:
                scored.append((self.trials.measure(w, TUNE_EXAMPLES).mean_kl, q is None, w))
        if not scored:
            return None
        _, plain, w = min(scored, key=lambda x: (x[0], not x[1]))  # a tie goes to plain 1/m
        return None if plain else self.run(w.setting)

    def search(self) -> None:
        found: dict[str, int] = {}  # per sparsifier, the index of its smallest m met (len(KEEPS): none)
        for sparsify in ("dare", "magnitude"):
            i = self.smallest(KEEPS, functools.partial(self.fft, sparsify, value_dtype="int4"))
            found[sparsify] = len(KEEPS) if i is None else i
        # DAREx-q below DARE's smallest m (all of KEEPS when none met the target)
        i = found["dare"]
        while i > 0:
            i -= 1
            t = self.tuned_dare(KEEPS[i])
            if t is None or not t.met:
                break
        for sparsify in ("dare", "magnitude"):
            for dtype in ("int8", self.float_dtype):
                for j in range(found[sparsify] - 1, -1, -1):
                    t = self.run(self.fft(sparsify, KEEPS[j], dtype), only_if_cheaper=True)
                    if t is not None and not t.met:
                        break
        if self.best is None or self.best.written.bytes > self.best.written.total / 8:
            for kind in MASK_KINDS:
                self.run({"kind": kind}, only_if_cheaper=True)
        if self.best is None or self.best.written.bytes > EXACT_ABOVE * self.full_bytes:
            self.run(dict(EXACT), only_if_cheaper=True)


def search(trials: Trials, target: Target, *, float_dtype: str, full_bytes: int, dare_positions: str = "stored",
           seconds: Callable[[], float] = time.perf_counter) -> Outcome:
    """The cheapest measured candidate meeting `target` (see the module); every other written
    candidate is discarded. `float_dtype` is the float value dtype of the task's fft candidates,
    `full_bytes` the checkpoint's size, and `dare_positions` how DARE candidates keep their
    positions (the user's storage choice, not searched: "seeded" halves their bytes, and costs
    a load the re-drawing).

    Raises:
        RuntimeError: not even the exact kind could be written (it always can: a bug).
    """
    return _searched(trials, _Search(trials, target, float_dtype, full_bytes, dare_positions), _Search.search, seconds)


def search_rank(trials: Trials, target: Target, ranks: Sequence[int],
                seconds: Callable[[], float] = time.perf_counter) -> Outcome:
    """The smallest LoRA rank of `ranks` (ascending; the last keeps each update whole) whose
    candidate meets `target`, by bisection; the last, its record saying the target was not met,
    when none does. Every other written candidate is discarded."""
    return _searched(trials, _Search(trials, target), lambda s: s.ranks(ranks), seconds)


def _searched(trials: Trials, s: _Search, run: Callable[[_Search], None], seconds: Callable[[], float]) -> Outcome:
    """`run(s)`, then every candidate written but the best discarded (all of them on an error)."""
    start = seconds()
    try:
        run(s)
        if s.best is None:
            raise RuntimeError("no candidate met the target, not even the exact kind")
    except BaseException:
        for w in _all_written(s):
            trials.discard(w)
        raise
    best = s.best
    written = _all_written(s)
    for w in written:
        if w is not best.written:
            trials.discard(w)
    return Outcome(best, s.tried, seconds() - start)


def _all_written(s: _Search) -> Sequence[Written]:
    out = []
    for v in s.cache.values():
        w = v.written if isinstance(v, Tried) else v
        if w is not None:
            out.append(w)
    return out


__all__ = ["KEEPS", "Q_FACTORS", "Outcome", "Score", "Setting", "Skip", "Target", "Trials", "Tried", "Written",
           "fft_setting", "search", "search_rank"]
