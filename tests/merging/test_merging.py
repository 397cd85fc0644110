"""Merge methods (ties, fisher, regmean) against independent references, and modelstore.merging.statistics."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft.utils import merge_utils
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2Model,
)
from transformers.pytorch_utils import Conv1D

from modelstore.errors import InputError
from modelstore.inputs.sources import DictSource
from modelstore.merging import get_method, merge
from modelstore.merging import statistics as stats


def perturbed(sd: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in sd.items()}


@pytest.fixture(scope="module")
def bert() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                 vocab_size=64, max_position_embeddings=32))
    sd0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tasks = [perturbed(sd0, s, scale) for s, scale in ((1, 0.02), (2, 0.05), (3, 0.01))]
    tasks[1]["embeddings.word_embeddings.weight"] = sd0["embeddings.word_embeddings.weight"].clone()  # unchanged
    return sd0, tasks


# ---------------------------------------------------------------- TIES

@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
def test_ties_matches_peft(bert, majority_sign, density):
    sd0, tasks = bert
    lam = 0.8
    out = merge("ties", sd0, tasks, density=density, lam=lam, majority_sign=majority_sign)
    for name, t0 in sd0.items():
        deltas = [t[name] - t0 for t in tasks]
        with pytest.warns(UserWarning) if density >= 1 else _no_warning():
            ref = t0 + lam * merge_utils.ties(deltas, torch.ones(len(tasks)), density, majority_sign)
        torch.testing.assert_close(out[name], ref, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(out["pooler.dense.weight"], sd0["pooler.dense.weight"])


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _ties_global_reference(sd0, tasks, names, density, lam, majority_sign):
    """Concatenate every merged tensor, trim each task to its top k (lowest index wins ties), elect, mean."""
    flat0 = np.concatenate([sd0[n].numpy().ravel() for n in names])
    deltas = np.stack([np.concatenate([(t[n] - sd0[n]).numpy().ravel() for n in names]) for t in tasks])
    k = int(density * flat0.size)
    trimmed = np.zeros_like(deltas)
    for i, d in enumerate(deltas):
        top = np.argsort(-np.abs(d), kind="stable")[:k]
        trimmed[i, top] = d[top]
    votes = trimmed.sum(0) if majority_sign == "total" else np.sign(trimmed).sum(0)
    agree = np.sign(trimmed) == np.where(votes >= 0, 1.0, -1.0)
    merged = (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)
    flat = flat0 + lam * merged
    out, at = {}, 0
    for n in names:
        out[n] = flat[at:at + sd0[n].numel()].reshape(sd0[n].shape)
        at += sd0[n].numel()
    return out


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.6])
def test_ties_global_matches_bruteforce(majority_sign, density):
    # Values on a 1/64 grid: exact float32 arithmetic and many equal magnitudes, so ties at the
    # threshold straddle tensors and the lowest-index rule is exercised.
    g = torch.Generator().manual_seed(5)
    shapes = {"a.weight": (7, 5), "a.bias": (7,), "b.weight": (4, 3, 2), "c.weight": (11, 9)}
    sd0 = {n: torch.randint(-40, 40, s, generator=g).float() / 64 for n, s in shapes.items()}
    sd0["ids"] = torch.arange(6)  # not floating point: left alone and not counted in k
    tasks = [{n: (v + torch.randint(-3, 4, v.shape, generator=g).float() / 64 if v.is_floating_point() else v)
              for n, v in sd0.items()} for _ in range(4)]
    out = merge("ties", sd0, tasks, density=density, lam=0.5, majority_sign=majority_sign, granularity="global")
    ref = _ties_global_reference(sd0, tasks, list(shapes), density, 0.5, majority_sign)
    for n in shapes:
        np.testing.assert_allclose(out[n].numpy(), ref[n], rtol=0, atol=1e-6, err_msg=n)
    assert torch.equal(out["ids"], sd0["ids"])
    # per-tensor trimming keeps a different set, so the results differ
    per_tensor = merge("ties", sd0, tasks, density=density, lam=0.5, majority_sign=majority_sign)
    assert any(not torch.equal(per_tensor[n], out[n]) for n in shapes)


def test_ties_parameters_record_variant():
    m = get_method("ties", density=0.1, granularity="global")
    assert m.parameters() == {"method": "ties", "density": 0.1, "lam": 1.0, "majority_sign": "total",
                              "granularity": "global"}


# ---------------------------------------------------------------- Fisher

def _small_models(seed=0, n_tasks=3):
    g = torch.Generator().manual_seed(seed)
    sd0 = {"w": torch.randn(4, 5, generator=g), "b": torch.randn(4, generator=g)}
    tasks = [{k: v + torch.randn(v.shape, generator=g) for k, v in sd0.items()} for _ in range(n_tasks)]
    return sd0, tasks


def test_fisher_equal_fishers_is_average():
    sd0, tasks = _small_models()
    f = torch.rand(4, 5) + 0.1
    out = merge("fisher", sd0, tasks, fishers=[{"w": f.clone()} for _ in tasks])
    torch.testing.assert_close(out["w"], torch.stack([t["w"] for t in tasks]).mean(0))
    torch.testing.assert_close(out["b"], torch.stack([t["b"] for t in tasks]).mean(0))  # no Fisher entry: average


def test_fisher_weighted_average_matches_numpy():
    sd0, tasks = _small_models()
    g = torch.Generator().manual_seed(1)
    fishers = [{"w": torch.rand(4, 5, generator=g) ** 3, "b": torch.rand(4, generator=g)} for _ in tasks]
    fishers[0]["w"][0] = 0.0  # floored at eps
    eps = 1e-3
    out = merge("fisher", sd0, tasks, fishers=fishers, eps=eps)
    for n in ("w", "b"):
        f = np.maximum(np.stack([x[n].numpy() for x in fishers]), eps)
        theta = np.stack([t[n].numpy() for t in tasks])
        np.testing.assert_allclose(out[n].numpy(), (f * theta).sum(0) / f.sum(0), rtol=1e-5, atol=1e-6)


def test_fisher_all_zero_is_average():
    sd0, tasks = _small_models()
    out = merge("fisher", sd0, tasks, fishers=[{"w": torch.zeros(4, 5)} for _ in tasks])
    torch.testing.assert_close(out["w"], torch.stack([t["w"] for t in tasks]).mean(0))


# ---------------------------------------------------------------- RegMean

def _regmean_problem(n_in=5, n_out=4, rows=(20, 30, 25), seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(r, n_in, generator=g, dtype=torch.float64) for r in rows]
    xs[1][:, 0] *= 5  # different input statistics per task
    ws = [torch.randn(n_out, n_in, generator=g) for _ in rows]
    bs = [torch.randn(n_out, generator=g) for _ in rows]
    sd0 = {"lin.weight": torch.zeros(n_out, n_in), "lin.bias": torch.zeros(n_out)}
    tasks = [{"lin.weight": w, "lin.bias": b} for w, b in zip(ws, bs)]
    grams = [{"lin.weight": (x.T @ x).float()} for x in xs]
    return sd0, tasks, grams, xs


def test_regmean_alpha1_is_least_squares():
    sd0, tasks, grams, xs = _regmean_problem()
    out = merge("regmean", sd0, tasks, grams=grams, alpha=1.0)
    # argmin_W Σt ||Xt Wᵀ − Xt Wtᵀ||² by numpy least squares on the stacked problem
    a = np.concatenate([x.numpy() for x in xs])
    b = np.concatenate([x.numpy() @ t["lin.weight"].double().numpy().T for x, t in zip(xs, tasks)])
    w_ref = np.linalg.lstsq(a, b, rcond=None)[0].T
    np.testing.assert_allclose(out["lin.weight"].numpy(), w_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["lin.bias"], torch.stack([t["lin.bias"] for t in tasks]).mean(0))


def test_regmean_alpha_scales_off_diagonals():
    sd0, tasks, grams, _ = _regmean_problem()
    alpha = 0.7
    out = merge("regmean", sd0, tasks, grams=grams, alpha=alpha)
    gs = [g["lin.weight"].double().numpy() for g in grams]
    gs = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in gs]
    w_ref = sum(t["lin.weight"].double().numpy() @ g for t, g in zip(tasks, gs)) @ np.linalg.inv(sum(gs))
    np.testing.assert_allclose(out["lin.weight"].numpy(), w_ref, rtol=1e-4, atol=1e-5)
    assert get_method("regmean").options["alpha"] == 0.9


def test_regmean_in_out_layout():
    # A square weight stored [in, out] (Conv1D): its Gram is keyed "<name>:in_out".
    sd0, tasks, grams, _ = _regmean_problem(n_in=5, n_out=5)
    linear = merge("regmean", sd0, tasks, grams=grams)
    t_sd0 = {"lin.weight": sd0["lin.weight"].T.contiguous()}
    t_tasks = [{"lin.weight": t["lin.weight"].T.contiguous()} for t in tasks]
    t_grams = [{"lin.weight" + stats.IN_OUT_SUFFIX: g["lin.weight"]} for g in grams]
    conv = merge("regmean", t_sd0, t_tasks, grams=t_grams)
    torch.testing.assert_close(conv["lin.weight"], linear["lin.weight"].T)
    wrong = merge("regmean", t_sd0, t_tasks, grams=grams)  # keyed as [out, in]: a different (wrong) answer
    assert not torch.allclose(wrong["lin.weight"], conv["lin.weight"], atol=1e-3)


def test_regmean_singular_gram_warns_and_keeps_average_in_null_space():
    sd0, tasks, grams, xs = _regmean_problem(rows=(2, 2, 0))
    exact = [{"lin.weight": x.T @ x} for x in xs]  # float64: the null space is exactly null
    with pytest.warns(RuntimeWarning, match="lin.weight"):
        out = merge("regmean", sd0, tasks, grams=exact, alpha=1.0)
    w = out["lin.weight"].double()
    avg = torch.stack([t["lin.weight"] for t in tasks]).mean(0).double()
    null = torch.linalg.svd(torch.cat(xs[:2]))[2][4:].T  # the direction no input has (rank 4 of 5)
    torch.testing.assert_close(w @ null, avg @ null, rtol=1e-5, atol=1e-5)
    for x, t in zip(xs[:2], tasks):  # the data-determined directions still fit both tasks exactly
        torch.testing.assert_close(x @ w.T, x @ t["lin.weight"].double().T, rtol=1e-3, atol=1e-3)
    with pytest.warns(RuntimeWarning, match="lin.weight"):
        rounded = merge("regmean", sd0, tasks, grams=grams, alpha=1.0)  # float32 Grams: never a crash
    assert torch.isfinite(rounded["lin.weight"]).all()
    with pytest.warns(RuntimeWarning):
        zero = merge("regmean", sd0, tasks, grams=[{"lin.weight": torch.zeros(5, 5)} for _ in tasks])
    torch.testing.assert_close(zero["lin.weight"], avg.float())


def test_regmean_gpt2_conv1d_from_stats(tmp_path):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    sd0 = {k: v.detach().clone() for k, v in GPT2Model(cfg).state_dict().items()}
    tasks, paths = [], []
    for i in range(2):
        model = GPT2Model(cfg)
        model.load_state_dict(perturbed(sd0, 10 + i))
        tasks.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(i))
        paths.append(tmp_path / f"gram{i}.safetensors")
        grams = stats.gram(model, [{"input_ids": ids}], out=paths[-1])
        assert "h.0.attn.c_proj.weight:in_out" in grams and "h.0.attn.c_proj.weight" not in grams
    out = merge("regmean", sd0, tasks, grams=[str(p) for p in paths])
    name = "h.0.attn.c_proj.weight"  # square [in, out] weight
    gs = [load_file(p)[name + ":in_out"].double() for p in paths]
    gs = [0.9 * g + 0.1 * torch.diag(g.diagonal()) for g in gs]
    ref = torch.linalg.solve(sum(gs), sum(g @ t[name].double() for g, t in zip(gs, tasks)))
    torch.testing.assert_close(out[name], ref.float(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- modelstore.merging.statistics

class TinyClassifier(nn.Module):
    """A Hugging Face-like model: forward(**batch) returns an object with .loss when labels are given."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x, labels=None):
        logits = self.lin2(torch.tanh(self.lin1(x)))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return types.SimpleNamespace(logits=logits, loss=loss)


def _classification_batches():
    g = torch.Generator().manual_seed(3)
    return [{"x": torch.randn(n, 4, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)} for n in (5, 3)]


def test_fisher_is_mean_of_per_example_squared_gradients(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    batches = _classification_batches()
    got = stats.fisher(model, batches, out=tmp_path / "f.safetensors")
    params = {k: v.detach() for k, v in model.named_parameters()}

    def nll(p, x, y):
        logits = torch.func.functional_call(model, p, (x[None],)).logits
        return F.cross_entropy(logits, y[None])

    x = torch.cat([b["x"] for b in batches])
    y = torch.cat([b["labels"] for b in batches])
    per_example = torch.func.vmap(torch.func.grad(nll), in_dims=(None, 0, 0))(params, x, y)
    assert set(got) == set(params)
    for k in params:
        torch.testing.assert_close(got[k], (per_example[k] ** 2).mean(0), rtol=1e-5, atol=1e-8)
    with safe_open(tmp_path / "f.safetensors", framework="pt") as f:
        assert f.metadata()["modelstore.merging.statistics"] == "fisher"
        torch.testing.assert_close(f.get_tensor("lin1.weight"), got["lin1.weight"])
    # the same with tuple batches and an explicit loss
    tuples = [(b["x"], b["labels"]) for b in batches]
    by_fn = stats.fisher(model, tuples, loss_fn=lambda m, ex: F.cross_entropy(m(ex[0]).logits, ex[1]),
                         names=["lin2.weight"])
    assert list(by_fn) == ["lin2.weight"]
    torch.testing.assert_close(by_fn["lin2.weight"], got["lin2.weight"])
    assert model.training  # mode restored


def test_fisher_tied_parameters_under_each_name(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids, labels):
            return types.SimpleNamespace(loss=F.cross_entropy(self.out(self.emb(ids)), labels))

    model = Tied()
    got = stats.fisher(model, [{"ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([3, 2, 1])}],
                       out=tmp_path / "tied.safetensors")
    assert set(got) == {"emb.weight", "out.weight"}
    torch.testing.assert_close(got["emb.weight"], got["out.weight"])
    assert set(load_file(tmp_path / "tied.safetensors")) == {"emb.weight", "out.weight"}


def test_gram_is_xtx_over_rows(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), Conv1D(5, 6), nn.Linear(5, 3))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 7, 4, generator=g), torch.randn(3, 4, generator=g)]
    got = stats.gram(model, batches, out=tmp_path / "g.safetensors")
    inputs = {"0.weight": [], "2.weight:in_out": [], "3.weight": []}
    with torch.no_grad():
        for x in batches:
            x = x.reshape(-1, 4)
            h1 = torch.relu(model[0](x))
            h2 = model[2](h1)
            for key, v in zip(inputs, (x, h1, h2)):
                inputs[key].append(v.double())
    assert set(got) == set(inputs)
    for key, xs in inputs.items():
        x = torch.cat(xs)
        torch.testing.assert_close(got[key].double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    assert set(load_file(tmp_path / "g.safetensors")) == set(inputs)
    assert list(stats.gram(model, batches, names=["3.weight"])) == ["3.weight"]


def test_stats_files_feed_fisher_and_regmean_merge(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                     vocab_size=40, max_position_embeddings=16, num_labels=2)
    models = [BertForSequenceClassification(cfg) for _ in range(2)]
    sd0 = {k: v.detach().clone() for k, v in models[0].state_dict().items()}
    models[1].load_state_dict(perturbed(sd0, 7))
    batch = {"input_ids": torch.randint(0, 40, (3, 6)), "labels": torch.tensor([0, 1, 1])}
    fishers, grams = [], []
    for i, m in enumerate(models):
        fishers.append(tmp_path / f"fisher{i}.safetensors")
        grams.append(tmp_path / f"gram{i}.safetensors")
        stats.fisher(m, [batch], out=fishers[-1])
        stats.gram(m, [batch], out=grams[-1])
    tasks = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    from_files = merge("fisher", sd0, tasks, fishers=fishers)
    from_dicts = merge("fisher", sd0, tasks, fishers=[load_file(p) for p in fishers])
    for k in sd0:
        torch.testing.assert_close(from_files[k], from_dicts[k])
    assert not torch.equal(from_files["classifier.weight"], sd0["classifier.weight"])
    merged = merge("regmean", sd0, tasks, grams=grams)
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())
    with pytest.raises(InputError, match="holds gram statistics"):
        merge("fisher", sd0, tasks, fishers=grams)


# ---------------------------------------------------------------- errors

def _bad_calls():
    sd0, tasks = _small_models(n_tasks=2)
    ok_f = {"w": torch.rand(4, 5)}
    ok_g = {"w": torch.eye(5)}
    return sd0, tasks, [
        ("fisher", {}, "needs fisher statistics"),
        ("regmean", {}, "needs gram statistics"),
        ("fisher", {"fishers": [ok_f]}, "for 1 task"),
        ("regmean", {"grams": [ok_g, ok_g, ok_g]}, "for 3 task"),
        ("fisher", {"fishers": ok_f}, "must be a list"),
        ("fisher", {"fishers": [ok_f, {"w": torch.rand(5, 4)}]}, "shape"),
        ("regmean", {"grams": [ok_g, {"w": torch.eye(4)}]}, "shape"),
        ("regmean", {"grams": [{"b": torch.eye(4)}, {"b": torch.eye(4)}]}, "2-D"),
        ("fisher", {"fishers": [ok_f, {"b": torch.rand(4)}]}, "has no entry 'w'"),
        ("fisher", {"fishers": [{"encoder.w": torch.rand(4, 5)}] * 2}, "no tensor of the models"),
        ("fisher", {"fishers": [ok_f, 3]}, "expected a path"),
        ("fisher", {"fishers": [ok_f, {"w": torch.full((4, 5), float("nan"))}]}, "NaN"),
        ("fisher", {"fishers": [ok_f, ok_f], "eps": 0}, "eps"),
        ("regmean", {"grams": [ok_g, ok_g], "alpha": 1.5}, "alpha"),
        ("ties", {"density": 0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"density": "0.2"}, "density"),
        ("ties", {"lam": float("nan")}, "lam"),
        ("ties", {"majority_sign": "mass"}, "majority_sign"),
        ("ties", {"granularity": "layer"}, "granularity"),
        ("ties", {"k": 20}, "no option k"),
        ("fisher", {"grams": [ok_g, ok_g]}, "no option grams"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls()[2])))
def test_errors_are_one_line_input_errors(case):
    sd0, tasks, calls = _bad_calls()
    method, options, message = calls[case]
    with pytest.raises(InputError, match=message) as e:
        merge(method, sd0, tasks, **options)
    assert "\n" not in str(e.value)


def test_stats_errors():
    model = TinyClassifier()
    with pytest.raises(InputError, match="labels"):
        stats.fisher(model, [{"x": torch.randn(2, 4)}])
    with pytest.raises(InputError, match="loss_fn"):
        stats.fisher(model, [torch.randn(2, 4)])
    with pytest.raises(InputError, match="not a trainable parameter"):
        stats.fisher(model, [], names=["lin3.weight"])
    with pytest.raises(InputError, match="empty"):
        stats.fisher(model, [])
    with pytest.raises(InputError, match="first"):
        stats.fisher(model, [{"x": torch.randn(2, 4), "labels": torch.tensor([0, 1, 2])}])
    with pytest.raises(InputError, match="not a weight"):
        stats.gram(model, [], names=["lin1.bias"])


def test_merge_leaves_inputs_untouched(bert):
    sd0, tasks = bert
    before = [{k: v.clone() for k, v in t.items()} for t in (sd0, *tasks)]
    merge("ties", sd0, tasks)
    for got, want in zip((sd0, *tasks), before):
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_prepare_then_merge_protocol_with_sources():
    # What the build pipeline does: prepare on sources, then merge name by name in float32.
    sd0, tasks = _small_models()
    m = get_method("ties", density=0.5, granularity="global")
    m.prepare(DictSource(sd0), [DictSource(t) for t in tasks], ["w", "b"])
    by_name = {n: m.merge(n, sd0[n], [t[n] for t in tasks]) for n in ("b", "w")}  # order does not matter
    ref = merge("ties", sd0, tasks, density=0.5, granularity="global")
    for n in by_name:
        torch.testing.assert_close(by_name[n], ref[n])
