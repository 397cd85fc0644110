"""One resident model of a task's architecture, run on the calibration data: filled with the
original's weights once (its outputs kept as the reference), then with each candidate's, scored
against the reference. One model, filled in place tensor by tensor, so a 7B task on a GPU needs
its weights once, not once per candidate.

The model runs in float32 on a CPU (bfloat16 matmuls are slow there without native support, and
the reference then reflects the weights, not rounding), in the checkpoint's dtype elsewhere.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from modelstore._runtime.progress import bar
from modelstore.errors import InputError
from modelstore.fidelity.data import Calibration
from modelstore.fidelity.metrics import TOP_TOKENS, Agreement, Coarse
from modelstore.fidelity.search import Score
from modelstore.inputs.architectures import (
    config_from_json,
    model_class,
    no_loading_bars,
    quiet_load_report,
    transformers_module,
)
from modelstore.serving.modules import ModuleTensors

#: What a model's class name says its outputs are: one prediction per text (classification), per
#: token of the text (token-classification), per next token of the text (causal-lm), or per token of
#: the output the original generates for the text (seq2seq: encoder-decoder models only).
OUTPUT_KINDS = {"ForSequenceClassification": "classification", "ForTokenClassification": "token-classification",
                "ForCausalLM": "causal-lm", "LMHeadModel": "causal-lm", "ForConditionalGeneration": "seq2seq",
                "MTModel": "seq2seq"}
#: Tokens the original generates for each text of a seq2seq task (greedy), then compared token by token.
GENERATED_TOKENS = 32
Check = Callable[[dict[str, tuple[int, ...]]], None]
#: (agreeing predictions, KL sum, predictions so far, all predictions) -> the target is out of reach
Missed = Callable[[int, float, int, int], bool]
Tensors = Callable[[Check], Iterator[tuple[str, torch.Tensor]]]


def output_kind(arch: str, config: Any) -> str | None:
    """What the predictions of a transformers class are (OUTPUT_KINDS), None for other models (a
    "ForConditionalGeneration" class that is not an encoder-decoder reads images or speech; Marian's
    translation models are "MarianMTModel")."""
    kind = next((k for suffix, k in OUTPUT_KINDS.items() if arch.endswith(suffix)), None)
    return None if kind == "seq2seq" and not getattr(config, "is_encoder_decoder", False) else kind


def generated(model: Any, batch: Mapping[str, torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
    """`batch` with the decoder inputs of a seq2seq model's greedy output for it (its start token
    and the generated tokens but the last) and their mask: each position predicts the next token,
    up to and including the end-of-sequence token (padding after it is not predicted)."""
    out = model.generate(**batch, max_new_tokens=tokens, do_sample=False, num_beams=1)
    eos = model.generation_config.eos_token_id
    ends = torch.isin(out[:, 1:], torch.tensor(eos if isinstance(eos, list) else [eos], device=out.device))
    # a position is real while no end-of-sequence token came before it
    real = (ends.cumsum(1) - ends.int()) == 0 if eos is not None else torch.ones_like(ends)
    return {**batch, "decoder_input_ids": out[:, :-1], "decoder_attention_mask": real.long()}


def rows_of(kind: str, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One row of logits per prediction of a model whose outputs are `kind` (OUTPUT_KINDS) on `batch`."""
    if kind == "classification":
        return logits
    if kind == "token-classification":
        return logits[batch["attention_mask"].bool()]
    if kind == "seq2seq":
        return logits[batch["decoder_attention_mask"].bool()]
    return logits[:, :-1][batch["attention_mask"][:, 1:].bool()]  # causal-lm: positions predicting a real token


def _tokenizer_file(name: str) -> bool:
    return name.startswith(("tokenizer", "vocab", "spiece", "merges", "sentencepiece"))


def tokenizer_for(directory: str | None, stored: Callable[[], dict[str, bytes]], what: str) -> Any:
    """The tokenizer in model `directory`, else the one the store keeps with the base (`stored()`:
    its files), set to pad after the text (a causal LM's positions stay those of the text).

    Raises:
        InputError: neither has one.
    """
    from transformers import AutoTokenizer
    try:
        # transformers makes a tokenizer without a vocabulary (every word unknown) from a directory
        # holding only a config.json: a directory without tokenizer files has none
        if directory is None or not os.path.isdir(directory) or not any(map(_tokenizer_file, os.listdir(directory))):
            raise OSError
        tok = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError):
        files = stored()
        if not any(map(_tokenizer_file, files)):
            raise InputError(f"neither {directory} nor the store has a tokenizer for {what}") from None
        with tempfile.TemporaryDirectory() as d:
            for name, blob in files.items():
                with open(os.path.join(d, name), "wb") as fh:
                    fh.write(blob)
            tok = AutoTokenizer.from_pretrained(d)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


class Runner:
    """The task's architecture on `device`, run on `calibration` (see the module)."""

    def __init__(self, task: str, calibration: Calibration, config_json: str | None, tokenizer: Callable[[], Any],
                 device: torch.device, checkpoint_dtype: torch.dtype, progress: bool = False):
        transformers = transformers_module("add-task --calibration")
        if not config_json:
            raise InputError(f"task {task!r}: calibration runs the task's model, but neither its checkpoint nor the "
                             "store's base has a config.json; give the fine-tune as a transformers model directory")
        config = config_from_json(transformers, config_json, f"task {task!r}")
        arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        kind = "custom" if calibration.outputs is not None else output_kind(arch, config)
        if kind is None:
            raise InputError(f"task {task!r} is a {arch}, whose outputs are not predictions of text; calibration "
                             "compares the predictions of sequence and token classifiers, causal LMs and "
                             "encoder-decoder LMs (in Python, Calibration(outputs=...) gives another model's logits)")
        self.task, self.calibration, self.kind, self.device, self.progress = task, calibration, kind, device, progress
        cls = model_class(transformers, None, config)
        dtype = torch.float32 if device.type == "cpu" or not checkpoint_dtype.is_floating_point else checkpoint_dtype
        try:
            with no_loading_bars(), quiet_load_report(), torch.device(device):
                self.model = cls(config).to(dtype).eval()
        except (AttributeError, TypeError, ValueError, RuntimeError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise InputError(f"{cls.__name__} cannot be built from task {task!r}'s config: {why}") from None
        self.target = ModuleTensors(self.model)
        self.batches = self._tokenized(tokenizer())
        self.reference: list[torch.Tensor | Coarse] = []

    def _tokenized(self, tokenizer: Any) -> list[tuple[int, dict[str, torch.Tensor]]]:
        """(first example's index, batch) of the texts in order (so the first n examples are a
        prefix), each batch padded to its own longest text."""
        cal = self.calibration
        out = []
        for i in range(0, len(cal.texts), cal.batch_size):
            enc = tokenizer(list(cal.texts[i:i + cal.batch_size]), return_tensors="pt", padding=True,
                            truncation=True, max_length=cal.max_length)
            out.append((i, {k: v.to(self.device) for k, v in enc.items()}))
        if self.kind == "causal-lm" and not any(int(b["attention_mask"][:, 1:].sum()) for _, b in out):
            raise InputError(f"calibration {cal.name}: no text of two tokens or more to predict")
        return out

    @property
    def examples(self) -> int:
        return len(self.calibration.texts)

    def fill(self, tensors: Tensors) -> None:
        """Copy a task's tensors into the model: `tensors(check)` yields them after calling `check`
        with their names and shapes (every one is placed and checked before any is written)."""
        placed = []
        written: set[str] = set()

        def check(shapes: dict[str, tuple[int, ...]]) -> None:
            placed.append(self.target.fit(self.task, shapes, strict=True, shapes=shapes))

        with torch.no_grad():
            for name, t in tensors(check):
                dst_name = placed[0].model_name(name)
                dst = None if dst_name is None else self.target.claim(self.task, dst_name, t.shape, written)
                if dst is not None:
                    dst.copy_(t)

    def _rows(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One row of logits per prediction of the current model on `batch`."""
        if self.kind == "custom":
            assert self.calibration.outputs is not None
            return self.calibration.outputs(self.model, dict(batch))
        return rows_of(self.kind, self.model(**batch).logits, batch)

    def _run(self, examples: int | None, label: str) -> Iterator[tuple[int, torch.Tensor]]:
        todo = [(i, b) for i, b in self.batches if examples is None or i < examples]
        with torch.inference_mode():
            for j, (_, batch) in enumerate(bar(todo, label, self.progress, length=len(todo))):
                yield j, self._rows(batch)

    def take_reference(self) -> None:
        """Run the model (filled with the original) and keep its outputs as the reference (for a
        seq2seq task, on the output it generates for each text, which every candidate is then run on)."""
        if self.kind == "seq2seq":
            with torch.inference_mode():
                self.batches = [(i, generated(self.model, b, GENERATED_TOKENS)) for i, b in self.batches]
        self.reference = []
        for _, rows in self._run(None, "calibration: original"):
            logp = rows.double().log_softmax(-1)
            self.reference.append(Coarse.of(logp) if logp.shape[-1] > TOP_TOKENS else logp.float())

    def score(self, examples: int | None = None, missed: Missed | None = None) -> Score:
        """The current model's outputs against the reference on the first `examples` (None: all),
        stopped (an incomplete Score) as soon as `missed(agree, kl_sum, rows, all rows)` says so."""
        acc = Agreement()
        total = sum(len(r.index) if isinstance(r, Coarse) else len(r) for r in self.reference)
        for j, rows in self._run(examples, "calibration: candidate"):
            acc.add(self.reference[j], rows)
            if missed is not None and acc.rows < total and missed(acc.agree, acc.kl, acc.rows, total):
                return Score(acc.agreement, acc.mean_kl, acc.rows, complete=False)
        return Score(acc.agreement, acc.mean_kl, acc.rows)


__all__ = ["GENERATED_TOKENS", "OUTPUT_KINDS", "Runner", "generated", "output_kind", "rows_of", "tokenizer_for"]
