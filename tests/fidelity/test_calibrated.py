"""Calibrated add-task on small real transformers classifiers: a task whose few large delta entries
carry it (magnitude must win) and one of small dense deltas (DARE must win); the recorded
agreement recomputed here one text at a time; the exact fallback; bad calibration data refused
before anything is stored."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from click.testing import CliRunner
from conftest import TEXTS, make_tokenizer, tiny_bert_config

import modelstore
from modelstore.cli import main
from modelstore.fidelity import metrics

WORDS = " ".join(TEXTS).split()


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(n)]


def _jsonl(path, texts) -> str:
    """A JSON-lines file of `texts` (strings, or whole rows as dicts)."""
    with open(path, "w") as fh:
        for t in texts:
            fh.write(json.dumps(t if isinstance(t, dict) else {"text": t}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """A pre-trained 3-label BERT classifier (wide FFN: its dense layers sum 2048 activations) and
    two fine-tunes saved with the tokenizer: "spiky" (60 large changes) and "dense" (every entry
    of both FFN output layers moved a little, the same way per output row)."""
    from transformers import BertForSequenceClassification
    root = tmp_path_factory.mktemp("cal")
    tok = make_tokenizer("bert")
    cfg = tiny_bert_config(vocab_size=len(tok), hidden_size=32, intermediate_size=2048, num_labels=3,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    torch.manual_seed(0)
    m = BertForSequenceClassification(cfg).eval()
    sd0 = {k: v.detach().clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    spiky, dense = dict(sd0), dict(sd0)
    for k in ("classifier.weight", "bert.encoder.layer.1.output.dense.weight"):
        flat = sd0[k].clone().view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[:30]
        flat[idx] += torch.randn(30, generator=g) * 3.0
        spiky[k] = flat.view(sd0[k].shape)
    for layer in (0, 1):
        k = f"bert.encoder.layer.{layer}.output.dense.weight"
        w = sd0[k]
        dense[k] = w + 0.002 * torch.randn(w.shape[0], 1, generator=g) * (1 + 0.1 * torch.rand(w.shape, generator=g))
    out = {"cfg": cfg, "tok": tok}
    for name, sd in (("pre", sd0), ("spiky", spiky), ("dense", dense)):
        m.load_state_dict(sd)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    out["cal"] = _jsonl(root / "cal.jsonl", _texts(128, 0))
    out["held"] = _texts(128, 1)
    return out


def _store(classifiers, tmp_path) -> modelstore.Store:
    url = str(tmp_path / "s")
    modelstore.init(url, classifiers["pre"])
    return modelstore.open(url, mode="a")


def _independent(original: str, model, texts: list[str], tok) -> tuple[float, float]:
    """Agreement and mean KL of `model` against the original, one text at a time, no padding."""
    from transformers import BertForSequenceClassification
    ref = BertForSequenceClassification.from_pretrained(original).eval()
    agree, kl = 0, 0.0
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            p = ref(**enc).logits[0].double().log_softmax(-1)
            q = model(**enc).logits[0].double().log_softmax(-1)
            agree += int(p.argmax() == q.argmax())
            kl += float((p.exp() * (p - q)).sum())
    return agree / len(texts), kl / len(texts)


def _payload_dirs(store: modelstore.Store, task: str) -> list[str]:
    root = os.path.join(store.url, "tasks", task)
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []


@pytest.mark.parametrize("task, sparsify, target, positions", [("spiky", "magnitude", 0.99, "stored"),
                                                               ("dense", "dare", 0.95, "stored"),
                                                               ("dense", "dare", 0.95, "seeded")])
def test_the_choice_follows_the_delta_and_its_record_is_what_a_forward_pass_measures(
        classifiers, tmp_path, task, sparsify, target, positions):
    s = _store(classifiers, tmp_path)
    storage = {} if positions == "stored" else {"positions": positions}  # a storage mode, allowed with a target
    entry = s.add_task(task, classifiers[task], calibration=classifiers["cal"], min_agreement=target, **storage)
    f = entry["fidelity"]
    assert entry["kind"] == "fft" and f["setting"]["sparsify"] == sparsify, f["candidates"]
    assert entry["params"].get("positions", "stored") == positions
    assert all(c["setting"].get("positions", "stored") == positions for c in f["candidates"]
               if c["setting"].get("sparsify") == "dare")
    assert f["metric"] == "agreement" and f["target"] == target and f["met"] and f["agreement"] >= target
    assert f["examples"] == f["predictions"] == 128 and f["output"] == "classification" and f["device"] == "cpu"
    assert f["calibration_sha256"] == __import__("hashlib").sha256(open(classifiers["cal"], "rb").read()).hexdigest()
    # the chosen candidate is the cheapest of those tried that met the target, and it is what is stored
    met = [c for c in f["candidates"] if c["met"]]
    # a candidate that met the target was measured on every text; most misses are cut short
    assert all(c["predictions"] == 128 for c in met)
    assert any(c["predictions"] < 128 for c in f["candidates"] if not c["met"])
    assert min(c["bytes"] for c in met) == entry["bytes"]
    assert all(c["bytes"] >= entry["bytes"] for c in met)
    # its recorded agreement and KL, recomputed from the stored task
    stored = modelstore.load_model(task, modelstore.open(s.url))
    texts = [json.loads(line)["text"] for line in open(classifiers["cal"])]
    agreement, kl = _independent(classifiers[task], stored, texts, classifiers["tok"])
    assert abs(agreement - f["agreement"]) <= 1 / 128  # padding may move a near-tie
    assert f["mean_kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
    # on texts it was not chosen on, it still agrees with the original about as well
    held, _ = _independent(classifiers[task], stored, classifiers["held"], classifiers["tok"])
    assert held >= target - 0.05
    # only the chosen payload is left, and the store checks clean
    assert _payload_dirs(s, task) == [entry["path"].rsplit("/", 1)[-1]]
    assert modelstore.open(s.url).check().ok


def test_an_unreachable_target_is_met_by_the_exact_kind(classifiers, tmp_path):
    s = _store(classifiers, tmp_path)
    entry = s.add_task("spiky", classifiers["spiky"], calibration=classifiers["cal"], max_kl=1e-15)
    f = entry["fidelity"]
    assert entry["kind"] == "exact" and f["setting"] == {"kind": "exact"} and f["met"]
    assert f["metric"] == "kl" and f["mean_kl"] < 1e-12 and f["agreement"] == 1
    assert len(f["candidates"]) > 1 and not any(c["met"] for c in f["candidates"][:-1])
    from safetensors.torch import load_file
    want = load_file(os.path.join(classifiers["spiky"], "model.safetensors"))
    got = modelstore.open(s.url).load("spiky")
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_an_unreachable_bound_is_met_by_the_exact_kind_on_any_data(classifiers, tmp_path):
    """`--min-agreement 1 --bound`: no lossy candidate's bound can reach 1, and the exact task's
    bound is 1, not the sampling bound of 128 examples: it is the original bit for bit."""
    s = _store(classifiers, tmp_path)
    r = CliRunner().invoke(main, ["add-task", s.url, "hard", classifiers["dense"], "--calibration",
                                  classifiers["cal"], "--min-agreement", "1", "--bound"])
    assert r.exit_code == 0, r.output
    f = modelstore.open(s.url).entry("hard")["fidelity"]
    assert f["setting"] == {"kind": "exact"} and f["met"] and f["agreement"] == 1 and f["agreement_low"] == 1
    assert not any(c["met"] for c in f["candidates"][:-1])
    assert metrics.agreement_low(1.0, f["examples"]) < 1
    info = CliRunner().invoke(main, ["info", s.url, "hard"]).output
    assert "target of the 95% bound >= 1, met; bit for bit: agrees on any data" in info


def test_dare_rescale_tuned_on_the_calibration_data(classifiers, tmp_path):
    s = _store(classifiers, tmp_path)
    entry = s.add_task("dense", classifiers["dense"], calibration=classifiers["cal"], sparsify="dare", keep=0.05,
                       value_dtype="int4", seed=3)
    f = entry["fidelity"]
    assert f["metric"] == "dare-q" and f["target"] is None and f["setting"]["keep"] == 0.05
    assert entry["params"]["seed"] == 3 and entry["params"]["value_dtype"] == "int4"
    # 1/m and every q tried: the chosen one has the least KL on the tuning examples
    from modelstore.fidelity.search import Q_FACTORS
    assert len(f["candidates"]) == 1 + len(Q_FACTORS) and f["candidates"][-1]["met"]
    assert entry["params"].get("dare_q") == f["setting"].get("dare_q")  # None: 1/m was best
    assert len(_payload_dirs(s, "dense")) == 1


def test_the_cli_calibrates_and_info_shows_the_promise(classifiers, tmp_path):
    s = _store(classifiers, tmp_path)
    r = CliRunner().invoke(main, ["add-task", s.url, "spiky", classifiers["spiky"], "--calibration",
                                  classifiers["cal"], "--min-agreement", "0.99", "--max-examples", "64", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["task"] == "spiky" and out["fidelity"]["examples"] == 64 and out["fidelity"]["met"]
    f = out["fidelity"]
    # 64 of the file's 128 rows, spread over it (every other one), not its first 64
    assert f["file_rows"] == 128
    texts = [json.loads(line)["text"] for line in open(classifiers["cal"])]
    stored = modelstore.load_model("spiky", modelstore.open(s.url))
    _, kl = _independent(classifiers["spiky"], stored, texts[::2], classifiers["tok"])
    assert f["mean_kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
    assert f["agreement_low"] == pytest.approx(metrics.agreement_low(f["agreement"], 64))
    assert f["agreement_low"] < f["agreement"]
    info = CliRunner().invoke(main, ["info", s.url, "spiky"])
    assert "fidelity: agreement" in info.output, info.output
    assert "on 64 calibration examples of the 128 rows of its file" in info.output, info.output
    assert f"met; 95% lower bound {f['agreement_low']:.4g}) on 64" in info.output


def test_build_calibrates_the_tasks_it_is_given_data_for(classifiers, tmp_path):
    url = str(tmp_path / "b")
    r = CliRunner().invoke(main, ["build", url, "--pretrained", classifiers["pre"], "--task",
                                  f"spiky={classifiers['spiky']}", "--task", f"dense={classifiers['dense']}",
                                  "--calibration", f"spiky={classifiers['cal']}", "--min-agreement", "0.99"])
    assert r.exit_code == 0, r.output
    s = modelstore.open(url)
    assert s.entry("spiky")["fidelity"]["met"] and "fidelity" not in s.entry("dense")


@pytest.mark.parametrize("content, what", [
    ("", "no examples"),
    ("\x00\x9f\x92 not text", "not UTF-8"),
    ('{"txt": "a cat"}\n', 'not a JSON object with a "text"'),
    ('{"text": "a cat"}\n{"text": ""}\n', 'line 2 has an empty "text"'),
])
def test_bad_calibration_data_is_one_line_and_stores_nothing(classifiers, tmp_path, content, what):
    s = _store(classifiers, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content.encode("utf-8", "surrogateescape") if "\x9f" not in content else content.encode("latin-1"))
    r = CliRunner().invoke(main, ["add-task", s.url, "dense", classifiers["dense"], "--calibration", str(bad)])
    assert r.exit_code == 1 and what in r.output and r.output.count("\n") == 1, r.output
    assert modelstore.open(s.url).tasks() == [] and _payload_dirs(s, "dense") == []


def test_build_refuses_a_bad_target_before_writing_and_a_flag_replaces_the_files(classifiers, tmp_path):
    """A target out of range is refused before the base is merged and written (nothing on disk);
    `--max-kl` on the command line replaces the config file's `min_agreement`, as flags override
    the file."""
    url = tmp_path / "b"
    r = CliRunner().invoke(main, ["build", str(url), "--pretrained", classifiers["pre"], "--task",
                                  f"spiky={classifiers['spiky']}", "--calibration", f"spiky={classifiers['cal']}",
                                  "--min-agreement", "1.5"])
    assert r.exit_code == 1 and "--min-agreement must be a fraction in (0, 1]" in r.output, r.output
    assert r.output.count("\n") == 1 and not url.exists()
    cfg = tmp_path / "store.yaml"
    cfg.write_text(json.dumps({"pretrained": classifiers["pre"], "tasks": {"spiky": classifiers["spiky"]},
                               "calibration": {"spiky": classifiers["cal"]}, "min_agreement": 0.97}))
    r = CliRunner().invoke(main, ["build", str(url), "--config", str(cfg), "--max-kl", "0.05"])
    assert r.exit_code == 0, r.output
    f = modelstore.open(str(url)).entry("spiky")["fidelity"]
    assert f["metric"] == "kl" and f["target"] == 0.05 and f["met"]


def test_too_few_examples_to_promise_anything_are_warned_of(classifiers, tmp_path):
    """4 examples that all agree meet 0.99, but promise nothing beyond them (bound 0.6): the
    write goes through, saying so on stderr in one line; 128 examples do not warn."""
    s = _store(classifiers, tmp_path)
    few = _jsonl(tmp_path / "few.jsonl", _texts(4, 0))
    r = CliRunner().invoke(main, ["add-task", s.url, "few", classifiers["spiky"], "--calibration", few])
    assert r.exit_code == 0, r.output
    f = modelstore.open(s.url).entry("few")["fidelity"]
    assert f["met"] and f["agreement_low"] < 0.94
    assert f"Warning: only 4 calibration examples: the agreement's 95% lower bound is {f['agreement_low']:.3g}" \
        in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = CliRunner().invoke(main, ["add-task", s.url, "many", classifiers["spiky"], "--calibration", classifiers["cal"]])
    assert r.exit_code == 0 and "Warning" not in r.stderr, r.stderr


def test_a_byte_order_mark_is_read_past(classifiers, tmp_path):
    """Excel and PowerShell start UTF-8 files with a byte-order mark: the first column is still
    `text`, the first line still JSON, and the texts (and so the file's record) are the same."""
    from modelstore.fidelity.data import read_data
    rows = _texts(6, 0)
    plain, marked = tmp_path / "plain.csv", tmp_path / "marked.csv"
    plain.write_text("text\n" + "".join(f'"{t}"\n' for t in rows), encoding="utf-8")
    marked.write_text("text\n" + "".join(f'"{t}"\n' for t in rows), encoding="utf-8-sig")
    jsonl = tmp_path / "marked.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8-sig")
    assert marked.read_bytes().startswith(b"\xef\xbb\xbf") and jsonl.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_data(str(marked)).texts == read_data(str(plain)).texts == read_data(str(jsonl)).texts == rows


def test_text_pairs_for_a_model_of_one_text_are_refused(classifiers, tmp_path):
    """A token classifier reads one text: rows with second texts (or QA rows) are data for
    another model, refused in one line before anything is written."""
    from transformers import BertForTokenClassification
    torch.manual_seed(0)
    for name in ("pre", "ft"):
        BertForTokenClassification(classifiers["cfg"]).save_pretrained(tmp_path / name)
        classifiers["tok"].save_pretrained(tmp_path / name)
    url = str(tmp_path / "tok")
    modelstore.init(url, str(tmp_path / "pre"))
    for row in ({"text": "a cat", "text_pair": "a dog"}, {"question": "a cat?", "context": "a dog"}):
        bad = tmp_path / "pairs.jsonl"
        bad.write_text(json.dumps(row) + "\n")
        r = CliRunner().invoke(main, ["add-task", url, "t", str(tmp_path / "ft"), "--calibration", str(bad)])
        assert r.exit_code == 1 and "which a token-classification model does not read" in r.output, r.output
        assert r.output.count("\n") == 1 and modelstore.open(url).tasks() == []


def test_calibration_of_a_model_without_predictions_is_refused(classifiers, tmp_path):
    """BERT's pre-training class has two heads (masked tokens and next sentence): no one kind of
    prediction to promise."""
    from transformers import BertForPreTraining
    torch.manual_seed(0)
    BertForPreTraining(classifiers["cfg"]).save_pretrained(tmp_path / "pt")
    url = str(tmp_path / "bare")
    modelstore.init(url, str(tmp_path / "pt"))
    r = CliRunner().invoke(main, ["add-task", url, "pt", str(tmp_path / "pt"), "--calibration", classifiers["cal"]])
    assert r.exit_code == 1 and "BertForPreTraining, whose outputs are not class or token" in r.output, r.output
    assert r.output.count("\n") == 1 and modelstore.open(url).tasks() == []


def test_options_that_calibration_chooses_are_refused(classifiers, tmp_path):
    s = _store(classifiers, tmp_path)
    for kwargs, what in [({"keep": 0.05}, "--keep is chosen by --calibration"),
                         ({"kind": "exact"}, "--kind is chosen by --calibration"),
                         ({"min_agreement": 1.5}, "--min-agreement must be a fraction"),
                         ({"min_agreement": 0.9, "max_kl": 0.1}, "not both")]:
        with pytest.raises(modelstore.InputError, match=what):
            s.add_task("dense", classifiers["dense"], calibration=classifiers["cal"], **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(modelstore.InputError, match="--device cuda:0: this machine's torch sees 0 CUDA"):
            s.add_task("dense", classifiers["dense"], calibration=classifiers["cal"], device="cuda:0")
    with pytest.raises(modelstore.InputError, match="apply with --calibration"):
        s.add_task("dense", classifiers["dense"], min_agreement=0.9)
    assert s.tasks() == []


def test_a_checkpoint_without_tokenizer_files_is_calibrated_with_the_bases(classifiers, tmp_path):
    """transformers makes a vocabulary-less tokenizer from a directory holding only config.json;
    calibration must not run on it (every word unknown) but on the tokenizer the base keeps."""
    import shutil
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(classifiers["spiky"], f), bare / f)
    s = _store(classifiers, tmp_path)
    with_files = s.add_task("a", classifiers["spiky"], calibration=classifiers["cal"], max_kl=1e-15)["fidelity"]
    without = s.add_task("b", str(bare), calibration=classifiers["cal"], max_kl=1e-15)["fidelity"]
    assert [c["mean_kl"] for c in without["candidates"]] == pytest.approx(
        [c["mean_kl"] for c in with_files["candidates"]], rel=1e-6, abs=1e-12)


def _perturbed(m, seed: int, scale: float) -> None:
    """A fine-tune of `m` in place: every float matrix moved by noise of `scale`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in m.state_dict().values():
            if v.dtype.is_floating_point and v.dim() == 2:
                v.add_(torch.randn(v.shape, generator=g) * scale)


def _calibrated_pair(m, tok, tmp_path, scale: float, task: str, texts: list) -> tuple[str, str, dict]:
    """`m` saved as the pre-trained model and, _perturbed by `scale`, as its fine-tune (both with
    `tok`); the fine-tune added to a store of the first with calibration on `texts` at agreement
    0.9. Returns the store's url, the calibration file and the task's fidelity record."""
    for name in ("pre", "ft"):
        if name == "ft":
            _perturbed(m, 2, scale)
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    cal = _jsonl(tmp_path / "c.jsonl", texts)
    url = str(tmp_path / "s")
    modelstore.init(url, str(tmp_path / "pre"))
    f = modelstore.open(url, mode="a").add_task(task, str(tmp_path / "ft"), calibration=cal, min_agreement=0.9)
    return url, cal, f["fidelity"]


def test_a_causal_lm_is_calibrated_on_its_next_token_predictions(tmp_path):
    """Token-level agreement: every real position predicts a token; recomputed one text at a time."""
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = make_tokenizer("gpt2")
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=32)).eval()
    texts = _texts(24, 3)
    url, _, f = _calibrated_pair(m, tok, tmp_path, 0.05, "lm", texts)
    assert f["output"] == "causal-lm" and f["met"] and f["examples"] == 24
    _next_tokens_agree(GPT2LMHeadModel.from_pretrained(tmp_path / "ft").eval(),
                       modelstore.load_model("lm", url, dtype=torch.float32), tok, texts, f)


def _next_tokens_agree(ref, stored, tok, texts: list[str], f: dict) -> tuple[int, int]:
    """The record's next-token agreement is what `ref` and `stored` give one text at a time (to one
    prediction). Returns (agreeing, all) next-token predictions."""
    tokens = agree = 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt").input_ids
            a, b = ref(ids).logits[0, :-1], stored(ids).logits[0, :-1]
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            tokens += ids.shape[1] - 1
    assert f["predictions"] == tokens
    assert abs(f["agreement"] - agree / tokens) <= 1 / tokens
    return agree, tokens


def test_a_moe_whose_experts_transformers_fuses_is_calibrated_by_building_each_candidate(tmp_path):
    """transformers stacks a Qwen3-MoE checkpoint's per-expert tensors into one as it loads it, so
    no candidate can be written into a resident model: each is built as load_model builds it. The
    record's agreement (a lossy choice, the experts changed) is what the original and load_model's
    task give one text at a time, and so is eval's (which builds the task as load_model does)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    tok = make_tokenizer("gpt2")
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    m = Qwen3MoeForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(2)
    for name in ("pre", "ft"):
        if name == "ft":  # the fused experts (3-d) move too
            with torch.no_grad():
                for v in m.state_dict().values():
                    if v.dtype.is_floating_point and v.dim() >= 2:
                        v.add_(torch.randn(v.shape, generator=g) * 0.003)
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    texts = _texts(24, 3)
    cal = _jsonl(tmp_path / "c.jsonl", texts)
    url = str(tmp_path / "s")
    modelstore.init(url, str(tmp_path / "pre"))
    f = modelstore.open(url, mode="a").add_task("moe", str(tmp_path / "ft"), calibration=cal,
                                                 min_agreement=0.9)["fidelity"]
    assert f["output"] == "causal-lm" and f["setting"]["kind"] == "fft" and 0.9 <= f["agreement"] < 1, f
    agree, tokens = _next_tokens_agree(Qwen3MoeForCausalLM.from_pretrained(tmp_path / "ft").eval(),
                                       modelstore.load_model("moe", url, dtype=torch.float32), tok, texts, f)
    r = CliRunner().invoke(main, ["eval", url, "moe", "--original", str(tmp_path / "ft"), "--data", cal, "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["tokens"] == tokens and got["top1_agreement"] == pytest.approx(agree / tokens, abs=1 / tokens)


def _eval_agrees(url: str, task: str, tmp_path, cal: str, f: dict, agree: int, predictions: int) -> dict:
    """The record's agreement, and `modelstore eval --json` on the same data, are `agree` of
    `predictions` counted independently (to one prediction: batches pad, the count does not).
    Returns eval's result."""
    assert abs(f["agreement"] - agree / predictions) <= 1 / predictions
    r = CliRunner().invoke(main, ["eval", url, task, "--original", str(tmp_path / "ft"), "--data", cal, "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["kind"] == f["output"] and got["predictions"] == predictions
    assert got["top1_agreement"] == pytest.approx(agree / predictions, abs=1 / predictions)
    return got


def test_a_token_classifier_is_calibrated_and_evaluated_token_by_token(tmp_path):
    """Every token of every text but [CLS] and [SEP] is a prediction; the record's agreement and
    `eval`'s are what one text at a time without padding gives."""
    from transformers import BertForTokenClassification
    tok = make_tokenizer("bert")
    torch.manual_seed(0)
    m = BertForTokenClassification(tiny_bert_config(vocab_size=len(tok), num_labels=5)).eval()
    texts = _texts(24, 3)
    url, cal, f = _calibrated_pair(m, tok, tmp_path, 0.05, "ner", texts)
    ref = BertForTokenClassification.from_pretrained(tmp_path / "ft").eval()
    stored = modelstore.load_model("ner", url, dtype=torch.float32)
    tokens = agree = 0
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            inner = slice(1, -1)  # [CLS] first, [SEP] last
            agree += int((ref(**enc).logits[0, inner].argmax(-1) == stored(**enc).logits[0, inner].argmax(-1)).sum())
            tokens += enc["input_ids"].shape[1] - 2
    assert f["output"] == "token-classification" and f["met"] and f["predictions"] == tokens
    _eval_agrees(url, "ner", tmp_path, cal, f, agree, tokens)
    # --max-length cuts each example as eval's does: the same tokens, in add-task and in a build config
    cut = sum(min(len(tok(t)["input_ids"]), 4) - 2 for t in texts)
    r = CliRunner().invoke(main, ["add-task", url, "ner4", str(tmp_path / "ft"), "--calibration", cal,
                                  "--max-length", "4", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["fidelity"]["predictions"] == cut < tokens, r.output
    assert json.loads(r.stdout)["fidelity"]["max_length"] == 4
    r = CliRunner().invoke(main, ["eval", url, "ner4", "--original", str(tmp_path / "ft"), "--data", cal, "--json"])
    assert json.loads(r.output)["predictions"] == cut  # eval cuts texts as the task's calibration did
    (tmp_path / "b.yaml").write_text(f"pretrained: {tmp_path / 'pre'}\ntasks: {{ner: {tmp_path / 'ft'}}}\n"
                                     f"merge: none\ncalibration: {{ner: {cal}}}\nmax_length: 4\n")
    r = CliRunner().invoke(main, ["build", str(tmp_path / "b"), "--config", str(tmp_path / "b.yaml")])
    assert r.exit_code == 0, r.output
    assert modelstore.open(str(tmp_path / "b")).info("ner")["fidelity"]["predictions"] == cut
    r = CliRunner().invoke(main, ["add-task", url, "ner1", str(tmp_path / "ft"), "--calibration", cal,
                                  "--max-length", "1"])
    assert r.exit_code == 1 and "--max-length must be an integer of at least 2" in r.output, r.output


def test_an_encoder_decoder_lm_is_calibrated_on_the_output_it_generates(tmp_path):
    """A T5 fine-tune: the original's greedy output for each text is the reference, compared token
    by token up to its end; eval also says for how many texts the stored task generates that output,
    which generating with both models here confirms."""
    from transformers import T5Config, T5ForConditionalGeneration
    tok = make_tokenizer("gpt2")
    tok.pad_token = "<unk>"
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=2, dropout_rate=0.0,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    m = T5ForConditionalGeneration(cfg).eval()
    texts = _texts(16, 4)
    # the end token: one this random model generates part way through some outputs, not all
    m.generation_config.eos_token_id = None
    with torch.no_grad():
        outs = m.generate(**tok(texts, return_tensors="pt", padding=True), max_new_tokens=32, do_sample=False)
    rows_with = {int(t): int((outs[:, 2:] == t).any(1).sum()) for t in outs[:, 2:].unique()}
    eos = min(rows_with, key=lambda t: abs(rows_with[t] - len(texts) / 2))
    assert 0 < rows_with[eos] < len(texts)
    m.config.eos_token_id = m.generation_config.eos_token_id = eos
    url, cal, f = _calibrated_pair(m, tok, tmp_path, 0.2, "t5", texts)
    ref = T5ForConditionalGeneration.from_pretrained(tmp_path / "ft").eval()
    agree, tokens, same = _greedy_counts(ref, modelstore.load_model("t5", url, dtype=torch.float32),
                                         [tok(t, return_tensors="pt") for t in texts], eos)
    assert f["output"] == "seq2seq" and f["predictions"] == tokens < 32 * len(texts) and f["met"]
    assert f["setting"]["kind"] == "fft" and f["agreement"] < 1
    assert _eval_agrees(url, "t5", tmp_path, cal, f, agree, tokens)["same_generation"] == same / len(texts)


def _greedy_counts(ref, stored, encodings: list, eos: int) -> tuple[int, int, int]:
    """(agreeing tokens, tokens, inputs generated the same): the original's greedy output for each
    input (a text's or a sound's encoding), both models teacher-forced on it up to and with its end
    token, one input at a time."""
    tokens = agree = same = 0
    with torch.no_grad():
        for enc in encodings:
            out = ref.generate(**enc, max_new_tokens=32, do_sample=False, num_beams=1)[0]
            ends = (out[1:] == eos).nonzero()
            n = int(ends[0]) + 1 if len(ends) else len(out) - 1  # predictions up to and with the end token
            dec = out[None, :n]
            a = ref(**enc, decoder_input_ids=dec).logits[0].argmax(-1)
            b = stored(**enc, decoder_input_ids=dec).logits[0].argmax(-1)
            assert torch.equal(a, out[1:n + 1])  # the reference is the original's own greedy output
            agree += int((a == b).sum())
            tokens += n
            mine = stored.generate(**enc, max_new_tokens=32, do_sample=False, num_beams=1)[0]
            same += int(torch.equal(mine, out))
    return agree, tokens, same


@pytest.mark.parametrize("arch", ["BartForConditionalGeneration", "MarianMTModel", "BartForConditionalGeneration+bert"])
def test_bart_and_marian_are_calibrated_as_encoder_decoders(tmp_path, arch):
    """BART (its decoder starts from its end token) and Marian's translation class: the record and
    eval count what generating and teacher forcing one text at a time counts. "+bert": a BERT
    tokenizer's, which adds token types the model does not take."""
    import transformers
    tok = make_tokenizer("bert" if arch.endswith("+bert") else "gpt2")
    arch = arch.removesuffix("+bert")
    if tok.eos_token is None:
        tok.eos_token = tok.sep_token
    tok.pad_token = tok.pad_token or "<unk>"
    config = transformers.BartConfig if arch.startswith("Bart") else transformers.MarianConfig
    cfg = config(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                 dropout=0.0, init_std=0.3, forced_eos_token_id=None, pad_token_id=tok.pad_token_id,
                 eos_token_id=tok.eos_token_id,
                 decoder_start_token_id=tok.eos_token_id if arch.startswith("Bart") else tok.pad_token_id)
    torch.manual_seed(0)
    m = getattr(transformers, arch)(cfg).eval()
    texts = _texts(12, 5)
    url, cal, f = _calibrated_pair(m, tok, tmp_path, 0.05, "s2s", texts)
    ref = getattr(transformers, arch).from_pretrained(tmp_path / "ft").eval()
    encodings = [tok(t, return_tensors="pt", return_token_type_ids=False) for t in texts]
    agree, tokens, same = _greedy_counts(ref, modelstore.load_model("s2s", url, dtype=torch.float32), encodings,
                                         tok.eos_token_id)
    assert f["output"] == "seq2seq" and f["predictions"] == tokens and f["met"]
    assert _eval_agrees(url, "s2s", tmp_path, cal, f, agree, tokens)["same_generation"] == same / len(texts)


@pytest.mark.parametrize("inputs", ["image", "text"])
def test_composed_encoder_decoders_are_calibrated_on_the_output_they_generate(tmp_path, inputs):
    """transformers' composed encoder-decoders (a ViT encoder, or a BERT one, with a GPT-2
    decoder: VisionEncoderDecoderModel, an image captioner or OCR model; EncoderDecoderModel):
    the record and eval count what generating and teacher forcing one input at a time counts."""
    import transformers
    from PIL import Image
    from test_heads import _images
    tok = make_tokenizer("gpt2")
    tok.pad_token = "<unk>"
    decoder = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64)
    if inputs == "image":
        cls, proc = transformers.VisionEncoderDecoderModel, transformers.ViTImageProcessor(
            size={"height": 32, "width": 32})
        encoder = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64)
        rows = [{"image": r["image"]} for r in _images(tmp_path, 12)]
        alone = [proc(images=Image.open(tmp_path / r["image"]).convert("RGB"), return_tensors="pt") for r in rows]
    else:
        cls, proc, encoder = transformers.EncoderDecoderModel, tok, tiny_bert_config(vocab_size=len(tok))
        rows = _texts(12, 5)
        alone = [{k: v for k, v in tok(t, return_tensors="pt").items() if k != "token_type_ids"} for t in rows]
    cfg = getattr(transformers, f"{cls.__name__[:-5]}Config").from_encoder_decoder_configs(encoder, decoder)
    cfg.decoder_start_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    m = cls(cfg).eval()
    m.generation_config.decoder_start_token_id, m.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    # the end token: one this random model generates part way through some outputs, not all
    with torch.no_grad():
        outs = [m.generate(**x, max_new_tokens=32, do_sample=False)[0, 2:] for x in alone]
    rows_with = {int(t): sum(int((o == t).any()) for o in outs) for t in torch.cat(outs).unique()}
    eos = min(rows_with, key=lambda t: abs(rows_with[t] - len(rows) / 2))
    m.config.eos_token_id = m.generation_config.eos_token_id = eos
    url, cal, f = _calibrated_pair(m, proc, tmp_path, 0.03, "s2s", rows)
    ref = cls.from_pretrained(tmp_path / "ft").eval()
    agree, tokens, same = _greedy_counts(ref, modelstore.load_model("s2s", url, dtype=torch.float32), alone, eos)
    assert f["output"] == "seq2seq" and f["predictions"] == tokens and f["met"]
    assert f["setting"]["kind"] == "fft" and f["agreement"] < 1, f["candidates"]
    assert _eval_agrees(url, "s2s", tmp_path, cal, f, agree, tokens)["same_generation"] == same / len(rows)


def test_an_interrupted_selection_leaves_no_candidate_behind(classifiers, tmp_path, monkeypatch):
    """Ctrl-C in the middle of the search: every candidate written so far is deleted, its lease
    ended, and the store is as it was."""
    from modelstore.fidelity.runner import Runner
    s = _store(classifiers, tmp_path)
    calls = []
    score = Runner.score

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return score(self, *args, **kwargs)

    monkeypatch.setattr(Runner, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        s.add_task("dense", classifiers["dense"], calibration=classifiers["cal"])
    assert len(calls) == 4 and modelstore.open(s.url).tasks() == []
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(s.url, "tasks")) for f in fs]
    assert leftovers == [] and _payload_dirs(s, "dense") == []
    assert modelstore.open(s.url).check().ok


def test_a_calibrated_write_to_s3_keeps_only_the_chosen_payload(classifiers, s3_server, tmp_path):
    """Candidates are real payloads on the store's own location: on S3 (moto's server) too, the
    chosen one is committed and every other one deleted."""
    import fsspec
    url = f"s3://models/cal-{tmp_path.name}"
    modelstore.init(url, classifiers["pre"], storage_options=s3_server)
    s = modelstore.open(url, mode="a", storage_options=s3_server)
    entry = s.add_task("spiky", classifiers["spiky"], calibration=classifiers["cal"], min_agreement=0.99)
    assert entry["fidelity"]["met"] and len(entry["fidelity"]["candidates"]) > 1
    fs = fsspec.filesystem("s3", **s3_server)
    payloads = {p.rsplit("/", 1)[-1] for p in fs.ls(f"models/cal-{tmp_path.name}/tasks/spiky", refresh=True)
                if not p.endswith("zarr.json")}  # the task folder's group marker
    assert payloads == {entry["path"].rsplit("/", 1)[-1]}
    r = modelstore.open(url, storage_options=s3_server)
    assert r.check().ok and r.load("spiky").keys()


def test_a_bound_target_is_met_by_the_95_percent_bound_and_says_so(classifiers, tmp_path):
    """`--bound`: the agreement's one-sided 95% bound over the calibration examples must meet the
    target, so the choice costs at least what the plain target's does; info says which it was."""
    s = _store(classifiers, tmp_path)
    plain = s.add_task("plain", classifiers["dense"], calibration=classifiers["cal"], min_agreement=0.9)
    r = CliRunner().invoke(main, ["add-task", s.url, "bound", classifiers["dense"], "--calibration",
                                  classifiers["cal"], "--min-agreement", "0.9", "--bound"])
    assert r.exit_code == 0, r.output
    f = modelstore.open(s.url).entry("bound")["fidelity"]
    assert f["bound"] is True and f["met"] and f["agreement_low"] >= 0.9 > metrics.agreement_low(0.9, 128)
    assert modelstore.open(s.url).entry("bound")["bytes"] >= plain["bytes"]
    assert all(c["met"] == (metrics.agreement_low(c["agreement"], 128) >= 0.9) for c in f["candidates"]
               if c["predictions"] == 128 and c["setting"]["kind"] != "exact")
    assert "target of the 95% bound >= 0.9, met" in CliRunner().invoke(main, ["info", s.url, "bound"]).output
    assert modelstore.open(s.url).check().ok
    r = CliRunner().invoke(main, ["add-task", s.url, "x", classifiers["dense"], "--calibration", classifiers["cal"],
                                  "--bound"])
    assert r.exit_code == 1 and "--bound applies to --min-agreement" in r.output and r.output.count("\n") == 1
