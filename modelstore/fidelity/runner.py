"""One resident model of a task's architecture, run on the calibration data: filled with the
original's weights once (its outputs kept as the reference), then with each candidate's, scored
against the reference. One model, filled in place tensor by tensor, so a 7B task on a GPU needs
its weights once, not once per candidate (a MoE whose experts transformers fuses as it loads them
is built anew for each, from the candidate's tensors).

The model runs in float32 on a CPU (bfloat16 matmuls are slow there without native support, and
the reference then reflects the weights, not rounding), in the checkpoint's dtype elsewhere.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from modelstore._runtime.progress import bar
from modelstore.errors import InputError, ModelStoreError
from modelstore.fidelity.data import Calibration, load_audio, load_image
from modelstore.fidelity.embeddings import (
    distinct,
    dual,
    embedded,
    matches,
    neighbours,
    pooling_of,
    real_positions,
    text_batch,
)
from modelstore.fidelity.metrics import TOP_TOKENS, Agreement, Coarse
from modelstore.fidelity.search import Score
from modelstore.inputs.architectures import (
    built_from,
    config_from_json,
    model_class,
    no_loading_bars,
    quiet_load_report,
    transformers_module,
)
from modelstore.serving.modules import ModuleTensors

#: What a model's class name says its outputs are: one prediction per text (classification;
#: multiple-choice: over the text's choices; a multi-label head's "multi-label" is one per label of
#: the text, a one-output head's "regression" none), per token of the text (token-classification),
#: per masked token (masked-lm: MASKED of the text's tokens), per next token of the text
#: (causal-lm), the answer's start and end in the context (question-answering), per frame of a
#: sound (ctc: a speech recognizer's characters or blank; frame-classification: an audio frame
#: classifier's classes, a diarization model's), per pixel of an image's label map (segmentation: on a
#: grid of at most GRID x GRID of its pixels), or per token of the output the original generates for
#: the text (seq2seq: encoder-decoder models, a Whisper's transcript of a sound, a
#: VisionEncoderDecoderModel's caption of an image).
OUTPUT_KINDS = {"ForSequenceClassification": "classification", "ForImageClassification": "classification",
                "ForImageClassificationWithTeacher": "classification", "ForNextSentencePrediction": "classification",
                "ForAudioFrameClassification": "frame-classification",
                "ForAudioClassification": "classification", "ForTokenClassification": "token-classification",
                "ForMultipleChoice": "multiple-choice", "ForXVector": "embedding",
                "ForCTC": "ctc", "ForSemanticSegmentation": "segmentation",
                "ForMaskedLM": "masked-lm", "ForQuestionAnswering": "question-answering",
                "ForCausalLM": "causal-lm", "LMHeadModel": "causal-lm", "ForConditionalGeneration": "seq2seq",
                "MTModel": "seq2seq", "EncoderDecoderModel": "seq2seq"}
#: The output kinds of models that read one text (or no text) per example, never a pair.
ONE_TEXT = ("token-classification", "causal-lm", "seq2seq", "ctc", "segmentation", "frame-classification",
            "embedding")
#: The most rows and columns of a semantic segmentation model's label map compared: every k-th of
#: each, the smallest k that leaves at most GRID (its outputs would otherwise fill memory).
GRID = 32
#: Tokens the original generates for each text of a seq2seq task (greedy), then compared token by token.
GENERATED_TOKENS = 32
#: The fraction of each text's tokens a masked LM is given masked (BERT's rate), drawn with the
#: text's index among the examples as the seed, so every run masks the same tokens.
MASKED = 0.15
#: The batch key of an extractive QA batch's windows: the index in the batch of each window's example.
#: A context too long for max_length is read, as transformers' QA pipeline reads it, in windows of
#: the question and a part of the context, neighbours sharing STRIDE of max_length's tokens.
WINDOWS = "overflow_to_sample_mapping"
STRIDE = 0.25
#: The batch key of a multiple-choice batch's [B, choices] mask of the choices each text has (a
#: batch's texts with fewer choices than its most are given empty ones, left out by the mask).
CHOICES = "choices_mask"
#: The batch key of a token classifier's batch's special tokens ([CLS], [SEP]): not predictions of
#: the task, whose labels they do not carry (transformers' token-classification pipeline skips them).
SPECIAL = "special_tokens_mask"
Check = Callable[[dict[str, tuple[int, ...]]], None]
#: (agreeing predictions, KL sum, predictions so far, all predictions) -> the target is out of reach
Missed = Callable[[int, float, int, int], bool]
Tensors = Callable[[Check], Iterator[tuple[str, torch.Tensor]]]


def output_kind(arch: str, config: Any) -> str | None:
    """What the predictions of a transformers class are (OUTPUT_KINDS; a bare model's, "...Model"
    or "...WithProjection", its embeddings' nearest neighbours: "embedding", also a dual encoder's,
    whose images with texts make it "zero-shot" (see modelstore.fidelity.embeddings)), None for other models (a
    "ForConditionalGeneration" class that is not an encoder-decoder is a causal LM reading images
    with its text where its config has a vision tower's, a LLaVA; else it reads something else;
    Marian's translation models are "MarianMTModel"). A sequence classifier's config tells a
    multi-label head (sigmoids) and a regression head (one output, as transformers reads
    num_labels=1) apart."""
    kind = next((k for suffix, k in OUTPUT_KINDS.items() if arch.endswith(suffix)), None)
    if kind == "seq2seq" and not getattr(config, "is_encoder_decoder", False):
        return "causal-lm" if _image_token(config) is not None else None
    bare = arch.endswith(("Model", "WithProjection")) and not getattr(config, "is_encoder_decoder", False)
    if kind is None and bare and (getattr(config, "vision_config", None) is None or _two_towers(config)):
        return "embedding"
    if kind == "classification":
        problem = getattr(config, "problem_type", None)
        if problem == "multi_label_classification":
            return "multi-label"
        if problem == "regression" or (problem is None and getattr(config, "num_labels", 2) == 1):
            return "regression"
    return kind


def _two_towers(config: Any) -> bool:
    """Whether `config` is a dual encoder's (CLIP's: a vision and a text tower, no image token)."""
    return getattr(config, "text_config", None) is not None and _image_token(config) is None


def _image_token(config: Any) -> int | None:
    """The token id a model of images with text (a LLaVA) holds each image's place with, None for
    other models."""
    if getattr(config, "vision_config", None) is None:
        return None
    token = getattr(config, "image_token_id", None)
    token = getattr(config, "image_token_index", None) if token is None else token
    return token if isinstance(token, int) else None


def check_rows(kind: str, pairs: object, choices: object, what: str) -> None:
    """Refuse data without second texts for a model that reads text pairs (extractive QA), second
    texts for a model of one text (a token classifier, an LM: they would be measured on inputs it
    never reads), without choices for a multiple-choice model, and choices for another.

    Raises:
        InputError: a question-answering model's data has no contexts, a one-text model's has
            second texts, a multiple-choice model's no choices, or another model's data has choices.
    """
    if kind == "question-answering" and pairs is None:
        raise InputError(f"{what}: an extractive QA model answers a question from a context; give both in every "
                         'row ("question" and "context", or "text" and "text_pair")')
    if kind in ONE_TEXT and pairs is not None:
        raise InputError(f"{what}: the rows give second texts (\"text_pair\", or a question's \"context\"), which a "
                         f"{kind} model does not read; give its rows a \"text\" only")
    if (kind == "multiple-choice") != (choices is not None):
        raise InputError(f"{what}: a multiple-choice model picks one of the choices after each text; give them in "
                         'every row ("choices", a list, or columns choice0, choice1 ...)' if choices is None else
                         f"{what}: the rows give choices, which only a multiple-choice model "
                         "(...ForMultipleChoice) reads")


def encode(preprocessor: Any, kind: str, texts: list[str], pairs: list[str] | None, max_length: int,
           first: int, images: list[Any] | None = None, audio: list[Any] | None = None,
           choices: list[list[str]] | None = None) -> dict[str, torch.Tensor]:
    """The tokenized batch of `texts` (and their second texts), padded to its longest; a masked
    LM's with MASKED of each text's tokens masked and their ids as its `labels` (-100 elsewhere, as
    transformers takes them). `first` is the first text's index among the examples, which seeds its mask.
    With `images` (paths or PIL images), those prepared by the image processor `preprocessor`; with
    `audio` (WAV paths or arrays of samples), those prepared by the feature extractor `preprocessor`
    (padded to the longest, or as Whisper's extractor pads every one: to its `n_samples` window).
    With `choices`, each text with each of its choices, [B, choices, L], and their mask (CHOICES)."""
    if images is not None and texts:  # a LLaVA's: each prompt holds its image's token, so is not cut
        token = getattr(preprocessor, "image_token", None)
        if missing := [k for k, t in enumerate(texts) if token and token not in t]:
            raise InputError(f"example {first + missing[0] + 1}: its text has no {token} where its image goes")
        return dict(preprocessor(images=[load_image(x) for x in images], text=texts, return_tensors="pt",
                                 padding=True))
    if images is not None:
        return dict(preprocessor(images=[load_image(x) for x in images], return_tensors="pt"))
    if audio is not None:
        rate = preprocessor.sampling_rate
        pad = {} if hasattr(preprocessor, "n_samples") else {"padding": True}  # Whisper's pads to its window
        return dict(preprocessor([load_audio(x, rate) for x in audio], sampling_rate=rate, return_tensors="pt", **pad))
    tokenizer = preprocessor
    if choices is not None:
        return _choices(tokenizer, texts, choices, max_length)
    if kind == "question-answering" and pairs is not None and getattr(tokenizer, "is_fast", False):
        return _windows(tokenizer, texts, pairs, max_length, first)
    enc = dict(tokenizer(texts, pairs, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                         return_special_tokens_mask=kind in ("masked-lm", "token-classification")))
    if kind == "token-classification":
        enc[SPECIAL] = enc[SPECIAL].bool()
    return _masked(enc, tokenizer, first) if kind == "masked-lm" else enc


def _choices(tokenizer: Any, texts: list[str], choices: list[list[str]], max_length: int) -> dict[str, torch.Tensor]:
    """Each text paired with each of its choices, as transformers' multiple-choice models take them
    ([B, choices, L]), a text with fewer choices than the batch's most given empty ones (CHOICES
    masks them out)."""
    n = max(map(len, choices))
    firsts = [t for t in texts for _ in range(n)]
    seconds = [c for cs in choices for c in cs + [""] * (n - len(cs))]
    enc = tokenizer(firsts, seconds, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    out = {k: v.view(len(texts), n, -1) for k, v in enc.items()}
    out[CHOICES] = torch.arange(n)[None] < torch.tensor([len(cs) for cs in choices])[:, None]
    return out


def _windows(tokenizer: Any, questions: list[str], contexts: list[str], max_length: int,
             first: int) -> dict[str, torch.Tensor]:
    """Each question with its context in windows of max_length tokens (see WINDOWS); every window
    keeps the whole question, so a question must leave more than the stride for its context.

    Raises:
        InputError: a question too long for max_length.
    """
    stride = int(max_length * STRIDE)
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    lengths = [len(x) for x in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    k = max(range(len(lengths)), key=lengths.__getitem__)
    if room - lengths[k] <= stride:
        raise InputError(f"example {first + k + 1}: its question has {lengths[k]} tokens, leaving its context no more "
                         f"than the {stride} tokens windows share of {max_length}; raise --max-length")
    return dict(tokenizer(questions, contexts, return_tensors="pt", padding=True, truncation="only_second",
                          max_length=max_length, stride=stride, return_overflowing_tokens=True))


def fitted_length(max_length: int, config: Any, tokenizer: Any) -> int:
    """`max_length`, or fewer tokens where the model has fewer positions (its config, or its text
    tower's) or its tokenizer says it reads fewer: a longer input would index past the model's
    position table."""
    configs = (config, getattr(config, "text_config", None))
    limits = [max_length] + [getattr(c, k, None) for c in configs for k in ("max_position_embeddings", "n_positions")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    return min(n for n in limits if isinstance(n, int) and 1 < n)


def inputs(model: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` as `model` takes it: without the QA windows' map or the choices' mask, and without
    the token types a BERT-style tokenizer adds where the model has none (a T5 or BART given such
    a tokenizer; transformers' pipelines drop them alike)."""
    drop = {WINDOWS, CHOICES, SPECIAL}
    if "token_type_ids" in batch and "token_type_ids" not in inspect.signature(model.forward).parameters:
        drop.add("token_type_ids")
    return {k: v for k, v in batch.items() if k not in drop}


def forward(model: Any, batch: Mapping[str, torch.Tensor]) -> Any:
    """`model`'s output on `batch` (its `inputs`)."""
    return model(**inputs(model, batch))


def examples_in(batch: Mapping[str, torch.Tensor]) -> int:
    """How many examples `batch` holds (an extractive QA example may take several windows)."""
    return int(batch[WINDOWS][-1]) + 1 if WINDOWS in batch else len(next(iter(batch.values())))


def _masked(enc: dict[str, torch.Tensor], tokenizer: Any, first: int) -> dict[str, torch.Tensor]:
    if tokenizer.mask_token_id is None:
        raise InputError("a masked LM predicts masked tokens, but its tokenizer has no mask token")
    text = ~(enc.pop(SPECIAL).bool() | ~enc["attention_mask"].bool())
    ids, labels = enc["input_ids"].clone(), torch.full_like(enc["input_ids"], -100)
    for k, row in enumerate(text):
        where = row.nonzero().flatten()
        if len(where):
            draw = torch.randperm(len(where), generator=torch.Generator().manual_seed(first + k))
            pick = where[draw[:max(1, round(MASKED * len(where)))]]
            labels[k, pick], ids[k, pick] = ids[k, pick], tokenizer.mask_token_id
    return {**enc, "input_ids": ids, "labels": labels}


@contextlib.contextmanager
def runs_on(data: str, model: str) -> Iterator[None]:
    """A model's failure on the user's data as a one-line InputError naming both (the data does
    not suit the model: a sound shorter than its convolutions take, an input it cannot read).

    Raises:
        InputError: the model raised RuntimeError, ValueError or IndexError.
    """
    try:
        yield
    except ModelStoreError:  # already said in one line (an unreadable image, a bad store)
        raise
    except (RuntimeError, ValueError, IndexError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{data}: running {model} on it failed ({why}); check that its examples suit the "
                         "model") from None


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' warnings held back (its errors still said)."""
    from transformers.utils import logging as transformers_logging
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def generated(model: Any, batch: Mapping[str, torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
    """`batch` with the decoder inputs of a seq2seq model's greedy output for it (its start token
    and the generated tokens but the last) and their mask: each position predicts the next token,
    up to and including the end-of-sequence token (padding after it is not predicted)."""
    with _transformers_quiet():  # not its notes on the generation settings its config also holds
        out = model.generate(**inputs(model, batch), max_new_tokens=tokens, do_sample=False, num_beams=1)
    eos = model.generation_config.eos_token_id
    ends = torch.isin(out[:, 1:], torch.tensor(eos if isinstance(eos, list) else [eos], device=out.device))
    # a position is real while no end-of-sequence token came before it
    real = (ends.cumsum(1) - ends.int()) == 0 if eos is not None else torch.ones_like(ends)
    return {**batch, "decoder_input_ids": out[:, :-1], "decoder_attention_mask": real.long()}


def rows_of(kind: str, out: Any, batch: Mapping[str, torch.Tensor],
            model: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One row of logits per prediction of a model whose outputs are `kind` (OUTPUT_KINDS), from
    its output `out` on `batch`, and the index in the batch of the text of each row. A multi-label
    head's rows are [0, logit] (softmax: the sigmoid's two outcomes); an extractive QA model's are
    its start logits, then its end logits, over the text's real tokens (padding: -inf), in each window
    of the text (WINDOWS); a CTC model's (of `model`) over the frames of each sound, not of its
    padding where the batch's attention mask tells them."""
    if kind == "question-answering":
        real = batch["attention_mask"].bool()
        ends = torch.stack([out.start_logits, out.end_logits]).masked_fill(~real, float("-inf"))
        texts = batch[WINDOWS] if WINDOWS in batch else torch.arange(len(real), device=real.device)
        return ends.flatten(0, 1), texts.repeat(2)
    logits = out.logits
    texts = torch.arange(len(logits), device=logits.device)
    if kind == "classification":
        return logits, texts
    if kind == "multiple-choice":  # the choices a text does not have: none
        return logits.masked_fill(~batch[CHOICES], float("-inf")), texts
    if kind == "segmentation":  # [B, classes, h, w] -> a row per pixel of the grid
        k = -(-max(logits.shape[2:]) // GRID)
        pixels = logits[:, :, ::k, ::k].flatten(2).transpose(1, 2)
        return pixels.flatten(0, 1), texts.repeat_interleave(pixels.shape[1])
    if kind == "multi-label":
        return (torch.stack([torch.zeros_like(logits), logits], -1).flatten(0, 1),
                texts.repeat_interleave(logits.shape[1]))
    if kind == "causal-lm":
        logits, where = logits[:, :-1], next_tokens(batch, model)
    elif kind == "masked-lm":
        where = batch["labels"] != -100
    elif kind in ("ctc", "frame-classification"):
        where = real_positions(model, batch, logits.shape[:2])
    elif kind == "token-classification":
        where = batch["attention_mask"].bool() & ~batch[SPECIAL] if SPECIAL in batch else batch["attention_mask"].bool()
    else:  # seq2seq
        where = batch["decoder_attention_mask"].bool()
    return logits[where], where.nonzero()[:, 0]


def next_tokens(batch: Mapping[str, torch.Tensor], model: Any = None) -> torch.Tensor:
    """Where a causal LM's outputs on `batch` predict a real token of its text: [B, L - 1], not
    padding, nor the tokens standing for an image of a model of images with text (`model`'s)."""
    where = batch["attention_mask"][:, 1:].bool()
    image = _image_token(getattr(model, "config", None))
    return where if image is None else where & (batch["input_ids"][:, 1:] != image)


def _tokenizer_file(name: str) -> bool:
    return name.startswith(("tokenizer", "vocab", "spiece", "merges", "sentencepiece"))


#: What a transformers model reads, by the name of its main input (models of other inputs are refused).
MODALITIES = {"input_ids": "text", "pixel_values": "image", "input_values": "audio", "input_features": "audio"}
#: What the rows of each modality give.
_ROWS = {"text": 'texts ("text")', "image": '"image" paths', "audio": '"audio" paths (WAV files)',
         "image-text": '"image" paths, each with its prompt in "text"'}


def modality(model: Any) -> str | None:
    """What a transformers model reads: "text", "image" (a ViT's, a CLIP vision tower's pixels),
    "image-text" (a LLaVA's images with its prompts), "audio" (a wav2vec2's samples, a Whisper's
    features), or None for another input."""
    reads = MODALITIES.get(getattr(model, "main_input_name", "input_ids"))
    return "image-text" if reads == "text" and _image_token(getattr(model, "config", None)) is not None else reads


def check_inputs(model: Any, given: str, what: str) -> None:
    """Refuse data of another modality (`given`: "text", "image", "image-text" or "audio") than
    `model` reads (a dual encoder reads all but sound), and models of other inputs.

    Raises:
        InputError: data `model` does not read, or a model of neither text, images nor sound.
    """
    reads = modality(model)
    if dual(model) and given in ("text", "image", "image-text"):  # a CLIP's images, texts, or images with texts
        return
    if reads is None:
        raise InputError(f"{what}: {type(model).__name__} reads {model.main_input_name}, neither text, images nor "
                         "sound; calibration and eval run models of those, so store it with explicit settings")
    if reads != given:
        noun = {"text": "text", "image": "images", "audio": "sound", "image-text": "images with text"}[reads]
        raise InputError(f"{what}: {type(model).__name__} reads {noun}; give its rows {_ROWS[reads]}")


def preprocessor_for(directory: str | None, stored: Callable[[], dict[str, bytes]], what: str,
                     inputs: str = "text") -> Any:
    """The tokenizer (for `inputs` "image": image processor, "audio": feature extractor) in model
    `directory`, else the one the store keeps with the base (see tokenizer_for); an image processor
    or feature extractor also as a part of the processor kept (a CLIP's, of images with texts).

    Raises:
        InputError: neither has one.
    """
    if inputs in ("text", "image-text"):
        return tokenizer_for(directory, stored, what, processor=inputs == "image-text")
    from transformers import AutoFeatureExtractor, AutoImageProcessor
    loader, noun = (AutoImageProcessor, "image processor") if inputs == "image" else (AutoFeatureExtractor,
                                                                                      "feature extractor")
    name = "preprocessor_config.json"
    try:
        with _transformers_quiet():  # not its note that a slower backend serves without torchvision
            if directory is not None and os.path.isfile(os.path.join(directory, name)):
                return loader.from_pretrained(directory)
            files = stored()
            whole = "processor_config.json"
            if name not in files and (whole in files or os.path.isfile(os.path.join(directory or "", whole))):
                part = getattr(tokenizer_for(directory, stored, what, processor=True),
                               "image_processor" if inputs == "image" else "feature_extractor", None)
                if part is not None:
                    return part
            if name not in files:
                raise InputError(f"neither {directory} nor the store has a{'n' * (noun[0] == 'i')} {noun} ({name}) "
                                 f"for {what}")
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, name), "wb") as fh:
                    fh.write(files[name])
                return loader.from_pretrained(d)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise InputError(f"{what}: its {noun} cannot be loaded: {(str(e).splitlines() or ['?'])[0]}") from None


def tokenizer_for(directory: str | None, stored: Callable[[], dict[str, bytes]], what: str,
                  processor: bool = False) -> Any:
    """The tokenizer (`processor`: the processor of images with text, a LLaVA's) in model
    `directory`, else the one the store keeps with the base (`stored()`: its files), set to pad
    after the text (a causal LM's positions stay those of the text).

    Raises:
        InputError: neither has one.
    """
    from transformers import AutoProcessor, AutoTokenizer
    loader, noun = (AutoProcessor, "processor of images with text") if processor else (AutoTokenizer, "tokenizer")

    def complete(names: Iterable[str]) -> bool:
        names = list(names)
        return any(map(_tokenizer_file, names)) and (
            not processor or bool({"processor_config.json", "preprocessor_config.json"} & set(names)))

    try:
        # transformers makes a tokenizer without a vocabulary (every word unknown) from a directory
        # holding only a config.json: a directory without tokenizer files has none
        if directory is None or not os.path.isdir(directory) or not complete(os.listdir(directory)):
            raise OSError
        with _transformers_quiet():
            tok = loader.from_pretrained(directory)
    except (OSError, ValueError, TypeError):
        files = stored()
        if not complete(files):
            raise InputError(f"neither {directory} nor the store has a {noun} for {what}") from None
        with tempfile.TemporaryDirectory() as d:
            for name, blob in files.items():
                with open(os.path.join(d, name), "wb") as fh:
                    fh.write(blob)
            with _transformers_quiet():
                tok = loader.from_pretrained(d)
    text = tok.tokenizer if processor else tok
    if text.pad_token is None:
        text.pad_token = text.eos_token or text.unk_token
    text.padding_side = "right"
    return tok


class Runner:
    """The task's architecture on `device`, run on `calibration` (see the module)."""

    def __init__(self, task: str, calibration: Calibration, config_json: str | None,
                 preprocessor: Callable[[str], Any],
                 device: torch.device, checkpoint_dtype: torch.dtype, progress: bool = False,
                 directory: str | None = None):
        transformers = transformers_module("add-task --calibration")
        if not config_json:
            raise InputError(f"task {task!r}: calibration runs the task's model, but neither its checkpoint nor the "
                             "store's base has a config.json; give the fine-tune as a transformers model directory")
        config = config_from_json(transformers, config_json, f"task {task!r}")
        arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        kind = "custom" if calibration.outputs is not None else output_kind(arch, config)
        if kind is None:
            raise InputError(f"task {task!r} is a {arch}, whose outputs are not class or token predictions; "
                             "calibration compares the predictions of sequence, multiple-choice, image, audio and "
                             "token classifiers, masked, causal (LLaVA too) and encoder-decoder LMs (Whisper and "
                             "captioners too), "
                             "extractive QA models, CTC speech recognizers, semantic segmentation models, bare "
                             "(embedding) models and dual encoders (CLIP) (in Python, Calibration(outputs=...) gives "
                             "another model's logits)")
        if kind == "regression":
            raise InputError(f"task {task!r} is a {arch} with one output (a regression head): it predicts no class "
                             "whose agreement could be promised; store it with explicit settings and measure how "
                             "far its outputs move with modelstore eval")
        check_rows(kind, calibration.pairs, calibration.choices, f"calibration {calibration.name}")
        if kind == "embedding" and len(calibration.inputs) < 2:
            raise InputError(f"calibration {calibration.name}: an embedding model's examples are compared by their "
                             "nearest neighbours among the others; give at least two")
        self.task, self.calibration, self.kind, self.device, self.progress = task, calibration, kind, device, progress
        self.anchors = torch.empty(0)
        self.checkpoint_dtype = checkpoint_dtype
        cls = model_class(transformers, None, config)
        self.cls, self.config = cls, config
        dtype = torch.float32 if device.type == "cpu" or not checkpoint_dtype.is_floating_point else checkpoint_dtype
        try:
            with no_loading_bars(), quiet_load_report(), torch.device(device):
                self.model = cls(config).to(dtype).eval()
        except (AttributeError, TypeError, ValueError, RuntimeError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise InputError(f"{cls.__name__} cannot be built from task {task!r}'s config: {why}") from None
        self.target = ModuleTensors(self.model)
        if self.target.fuses:  # built from each fill's tensors: until then it needs no memory
            self.model.to("meta")
        check_inputs(self.model, calibration.modality, f"calibration {calibration.name}")
        if kind == "embedding" and _two_towers(config) and not dual(self.model):
            raise InputError(f"task {task!r} is a {arch}, which neither matches images with texts nor embeds them "
                             "alone; store it with explicit settings")
        self.pooling = pooling_of(directory, self.model)
        if kind == "embedding" and self.pooling == "features" and calibration.modality == "image-text":
            self.kind = kind = "zero-shot"  # each image's match among the data's texts
        self.dtype = dtype
        self.batches = self._tokenized(preprocessor(calibration.modality))
        self.reference: list[torch.Tensor | Coarse] = []

    def _tokenized(self, preprocessor: Any) -> list[tuple[int, dict[str, torch.Tensor]]]:
        """(first example's index, batch) of the examples in order (so the first n examples are a
        prefix), each batch of texts padded to its own longest text, images and sounds in the model's
        dtype."""
        cal = self.calibration
        max_length = fitted_length(cal.max_length, self.model.config, preprocessor)
        #: the tokens each text was cut at (None: images or sounds, a LLaVA's prompts)
        self.max_length = max_length if cal.files is None or self.kind == "zero-shot" else None
        #: a dual encoder's texts, each image's match among which is predicted (zero-shot)
        self.texts = {} if self.kind != "zero-shot" else self._placed(
            text_batch(preprocessor, distinct(list(cal.texts)), max_length, self.model))
        out = []
        for i in range(0, len(cal.inputs), cal.batch_size):
            j = i + cal.batch_size
            pairs, images, audio = (None if x is None else list(x[i:j]) for x in (cal.pairs, cal.images, cal.audio))
            texts = [] if self.kind == "zero-shot" else list(cal.texts[i:j])  # its images alone: texts are apart
            if self.pooling == "features" and images is None:  # a dual encoder's texts, padded as it takes them
                enc = text_batch(preprocessor, texts, max_length, self.model)
            else:
                choices = None if cal.choices is None else [list(c) for c in cal.choices[i:j]]
            enc = encode(preprocessor, self.kind, texts, pairs, max_length, i, images, audio, choices)
            out.append((i, self._placed(enc)))
        if self.kind == "causal-lm" and not any(bool(next_tokens(b, self.model).any()) for _, b in out):
            raise InputError(f"calibration {cal.name}: no text of two tokens or more to predict")
        if self.kind == "masked-lm" and not any(bool((b["labels"] != -100).any()) for _, b in out):
            raise InputError(f"calibration {cal.name}: no text has a token to mask")
        return out

    def _placed(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` on the device, its images and sounds in the model's dtype."""
        return {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}

    @property
    def examples(self) -> int:
        return len(self.calibration.inputs)

    def fill(self, tensors: Tensors) -> None:
        """Copy a task's tensors into the model: `tensors(check)` yields them after calling `check`
        with their names and shapes (every one is placed and checked before any is written). A
        model whose checkpoints transformers converts as it loads them (a MoE's experts fused into
        one tensor) is built anew from them instead, as load_model builds it."""
        if self.target.fuses:  # checkpoint tensors become others as transformers loads them: load them so
            tensors_of = dict(tensors(lambda shapes: None))
            self.model = None  # freed before the next is built
            self.model = built_from(self.cls, self.config, tensors_of, f"task {self.task!r}", dtype=self.dtype,
                                    device=self.device)
            return
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

    def _rows(self, batch: Mapping[str, torch.Tensor], first: int, texts: torch.Tensor) -> torch.Tensor:
        """One row of logits per prediction of the current model on `batch` (its first example the
        `first`-th; `texts`: a dual encoder's features of the texts its images are matched with)."""
        if self.kind == "custom":
            assert self.calibration.outputs is not None
            return self.calibration.outputs(self.model, dict(batch))
        if self.kind == "embedding":
            return neighbours(embedded(self.model, batch, self.pooling), self.anchors, first)
        if self.kind == "zero-shot":
            return matches(self.model, batch, texts)
        return rows_of(self.kind, forward(self.model, batch), batch, self.model)[0]

    def _run(self, examples: int | None, label: str) -> Iterator[tuple[int, torch.Tensor]]:
        todo = [(i, b) for i, b in self.batches if examples is None or i < examples]
        with torch.inference_mode():
            texts = embedded(self.model, self.texts, "features") if self.texts else torch.empty(0)  # once a model
            for j, (first, batch) in enumerate(bar(todo, label, self.progress, length=len(todo))):
                yield j, self._rows(batch, first, texts)

    def take_reference(self) -> None:
        """Run the model (filled with the original) and keep its outputs as the reference (for a
        seq2seq task, on the output it generates for each text, which every candidate is then run on;
        for an embedding model, its embeddings, among which every candidate's neighbours are found).

        Raises:
            InputError: the original fails on the calibration data (a sound shorter than its
                convolutions take, say): the data does not suit the model.
        """
        with runs_on(f"calibration {self.calibration.name}", "the original model"):
            if self.kind == "seq2seq":
                with torch.inference_mode():
                    self.batches = [(i, generated(self.model, b, GENERATED_TOKENS)) for i, b in self.batches]
            if self.kind == "embedding":  # every example's neighbours are among the original's embeddings
                with torch.inference_mode():
                    own = [embedded(self.model, b, self.pooling) for _, b in self.batches]
                self.anchors = torch.cat(own)  # the original's rows follow from them: it is run once
                originals: Iterator[torch.Tensor] = (neighbours(e, self.anchors, i)
                                                      for (i, _), e in zip(self.batches, own))
            else:
                originals = (rows for _, rows in self._run(None, "calibration: original"))
            self.reference = []
            for rows in originals:
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


__all__ = ["CHOICES", "GENERATED_TOKENS", "GRID", "MASKED", "OUTPUT_KINDS", "STRIDE", "WINDOWS", "Runner",
           "check_inputs", "encode", "examples_in", "fitted_length", "forward", "generated", "modality", "check_rows",
           "next_tokens", "output_kind", "preprocessor_for", "rows_of", "runs_on", "tokenizer_for"]
