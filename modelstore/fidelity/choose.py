"""Calibrated add-task: run the original on the calibration data, search the candidates
(fidelity.search; a LoRA task's ranks) or tune DARE's rescale, and describe what was chosen in the task's `fidelity`
record (spec/FORMAT.md). The store writes, reads back and discards candidates through the three
functions of `StoreSide`: every candidate is measured as stored, from its own payload, so the
record describes the bytes that are kept, not a prediction of them."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from modelstore.fidelity.data import Calibration
from modelstore.fidelity.metrics import agreement_low
from modelstore.fidelity.runner import Runner, Tensors
from modelstore.fidelity.search import (
    Q_FACTORS,
    TUNE_EXAMPLES,
    Outcome,
    Score,
    Setting,
    Target,
    Tried,
    Written,
    search,
    search_rank,
)
from modelstore.kinds import get_kind
from modelstore.kinds.lora import LoraAdapter


@dataclass
class StoreSide:
    """How the store writes a candidate (its entry and payload, unpublished; raises search.Skip
    when it cannot hold it), gives a written entry's tensors, and deletes a payload."""

    write: Callable[[Setting], tuple[dict[str, Any], str]]
    tensors: Callable[[dict[str, Any]], Tensors]
    discard: Callable[[str], None]


class _Trials:
    """search.Trials over the store and one Runner."""

    def __init__(self, side: StoreSide, runner: Runner):
        self.side, self.runner = side, runner
        self.filled: Written | None = None

    def write(self, setting: Setting) -> Written:
        entry, path = self.side.write(setting)
        return Written(setting, int(entry["bytes"]), int(entry.get("total") or 0), (entry, path))

    def measure(self, w: Written, examples: int | None = None, target: Target | None = None) -> Score:
        if self.filled is not w:
            self.runner.fill(self.side.tensors(w.handle[0]))
            self.filled = w
        return self.runner.score(examples, None if target is None else target.missed)

    def discard(self, w: Written) -> None:
        self.side.discard(w.handle[1])


def _setting_of(entry: dict[str, Any], setting: Setting) -> Setting:
    """The setting as stored: an fft task's value dtype resolved (None asks for the float default)."""
    if "sparsify" not in setting:
        return dict(setting)
    params = entry.get("params") or {}
    return {**setting, "value_dtype": params.get("value_dtype", setting.get("value_dtype"))}


def choose(task: str, calibration: Calibration, target: Target | None, runner: Runner,
           original: Tensors, side: StoreSide, *, full_bytes: int = 0, float_dtype: str = "float16",
           dare: Setting | None = None, dare_positions: str = "stored",
           ranks: Sequence[int] | None = None) -> tuple[dict[str, Any], str]:
    """The chosen candidate's entry (with its `fidelity` record) and payload path, not yet
    committed; every other candidate written is deleted.

    With `target`, the search of fidelity.search (with `ranks`, a LoRA task's: the smallest of
    them meeting it); else `dare` (an explicit DARE setting) with its rescale tuned on the
    calibration data (DAREx-q). `dare_positions`: how the search's DARE candidates keep their
    positions.
    """
    start = time.perf_counter()
    if target is not None and target.bound:
        target = replace(target, examples=runner.examples)
    runner.fill(original)
    runner.take_reference()
    trials = _Trials(side, runner)
    if target is not None and ranks is not None:
        outcome = search_rank(trials, target, ranks)
    elif target is not None:
        outcome = search(trials, target, float_dtype=float_dtype, full_bytes=full_bytes, dare_positions=dare_positions)
    else:
        assert dare is not None
        outcome = _tune_dare(trials, dare)
    entry, path = outcome.chosen.written.handle
    tried = [{**t.record(), "setting": _setting_of(t.written.handle[0], t.written.setting)} for t in outcome.tried]
    score = outcome.chosen.score
    entry["fidelity"] = {
        "metric": target.metric if target is not None else "dare-q",
        "target": target.value if target is not None else None,
        **({"bound": True} if target is not None and target.bound else {}),
        "met": outcome.chosen.met,
        "output": runner.kind,
        "agreement": score.agreement,
        # examples are the independent trials (a causal LM's tokens within a text are not)
        # an exact task is the original bit for bit: it agrees on any data, not only on these examples
        "agreement_low": 1.0 if get_kind(entry["kind"]).lossless and score.agreement == 1 else
        agreement_low(score.agreement, runner.examples),
        "mean_kl": score.mean_kl,
        "examples": runner.examples,
        **({"file_rows": calibration.file_rows} if calibration.file_rows else {}),
        **({"max_length": runner.max_length} if runner.max_length is not None else {}),
        "predictions": score.predictions,
        "calibration_sha256": calibration.sha256,
        "device": str(runner.device),
        "seconds": round(time.perf_counter() - start, 3),
        "setting": _setting_of(entry, outcome.chosen.written.setting),
        "candidates": tried,
    }
    f = entry["fidelity"]
    if f["metric"] == "agreement" and f["met"] and not f.get("bound") and f["agreement_low"] < f["target"] - FEW_GAP:
        warnings.warn(f"only {f['examples']} calibration examples: the agreement's 95% lower bound is "
                      f"{f['agreement_low']:.3g}, under the target {f['target']:g}; give more examples (256 or "
                      "more) for a promise on other data like them, or --bound", stacklevel=2)
    return entry, path


#: How far under an agreement target its 95% lower bound may lie before a write warns that the
#: calibration examples are too few to promise anything beyond them (2 examples: 0.43 at 0.99).
FEW_GAP = 0.05


def _tune_dare(trials: _Trials, dare: Setting) -> Outcome:
    """DARE at the user's keep and value dtype with q (the rescale 1/q) of least mean KL on the
    first TUNE_EXAMPLES examples, among 1/m and Q_FACTORS; measured on all the examples."""
    start = time.perf_counter()
    keep = dare["keep"]
    options: list[Written] = []
    try:
        for q in (None, *(min(1.0, float(f"{keep * f:.6g}")) for f in Q_FACTORS)):
            options.append(trials.write({**dare, **({"dare_q": q} if q is not None else {})}))
        tuning = [trials.measure(w, TUNE_EXAMPLES) for w in options]
        i = min(range(len(options)), key=lambda i: (tuning[i].mean_kl, i))
        best = options[i]
        score = trials.measure(best)
    except BaseException:
        for w in options:
            trials.discard(w)
        raise
    for w in options:
        if w is not best:
            trials.discard(w)
    chosen = Tried(best, score, True)
    others = [Tried(w, sc, False) for w, sc in zip(options, tuning) if w is not best]  # on the tuning examples
    return Outcome(chosen, [*others, chosen], time.perf_counter() - start)


def checkpoint_tensors(source: Any, device: torch.device) -> Tensors:
    """A checkpoint's tensors for Runner.fill, one at a time on `device`."""
    def tensors(check: Callable[[dict[str, tuple[int, ...]]], None]) -> Any:
        check({n: tuple(source.shape(n)) for n in source.names()})
        for n in source.names():
            yield n, source.get(n).to(device)
    return tensors


def adapted_tensors(adapter: LoraAdapter, base: Any, device: torch.device) -> Tensors:
    """The model a PEFT adapter makes of `base` (θ0), for Runner.fill: θ0 + s·B·A per adapted
    weight (computed in float64 on `device`, as merge_and_unload merges), its saved tensors in
    place of theirs, the rest θ0's."""
    updates = {m.target: m for m in adapter.modules.values()}
    saved = {s.target: s.tensor for s in adapter.saved.values()}
    names = list(dict.fromkeys([*base.names(), *saved]))

    def tensors(check: Callable[[dict[str, tuple[int, ...]]], None]) -> Any:
        check({n: tuple(saved[n].shape) if n in saved else tuple(base.shape(n)) for n in names})
        for n in names:
            if n in saved:
                yield n, saved[n].to(device)
            elif n in updates:
                t = base.get(n).to(device)
                yield n, (t.double() + updates[n].update(device)).to(t.dtype)
            else:
                yield n, base.get(n).to(device)
    return tensors


__all__ = ["StoreSide", "adapted_tensors", "checkpoint_tensors", "choose"]
