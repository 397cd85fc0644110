"""Store.switch: a resident model moved between tasks in place equals a fresh load bit for bit, across
bases and task kinds and in every float dtype, keeping only the entries the tasks change."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

import modelstore
from modelstore.serving import switching

peft = pytest.importorskip("peft")


def _lora_adapter(cfg, sd0, path, seed, **lora):
    from transformers import BertModel
    m = BertModel(cfg)
    m.load_state_dict(sd0, strict=False)
    torch.manual_seed(seed)
    peft.get_peft_model(m, peft.LoraConfig(init_lora_weights=False, **lora)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mixed_store(bert_models, tmp_path_factory):
    """FFT tasks on a merged base (alpha, beta), one on θ0 (gamma), LoRA tasks on θ0 (lo1, lo2)."""
    root = tmp_path_factory.mktemp("switch")
    url = str(root / "s")
    tasks, cfg, sd0 = bert_models["tasks"], bert_models["cfg"], bert_models["sd0"]
    modelstore.build(url, bert_models["pre"], {"alpha": tasks["alpha"], "beta": tasks["beta"]}, keep=0.1)
    s = modelstore.open(url, mode="a")
    s.add_lora_task("lo1", _lora_adapter(cfg, sd0, str(root / "ad1"), 1, r=4, target_modules=["query", "value"]),
                    rank=2, pretrained=bert_models["pre"])
    s.add_lora_task("lo2", _lora_adapter(cfg, sd0, str(root / "ad2"), 2, r=4, target_modules=["dense"]), rank=4)
    s.add_task("gamma", tasks["gamma"], keep=0.05, base="pretrained", granularity="per-tensor")
    return url


def _touched(store: modelstore.Store, task: str, model: torch.nn.Module) -> int:
    """Entries `task` changes in `model`, from its table alone: kept entries of sparse tensors, all
    entries of tensors stored whole or as low-rank factors."""
    names = set(model.state_dict())
    return sum(t["count"] if t["kind"] == "sparse" else math.prod(t["shape"])
               for t in store.table(task) if t["name"] in names)


def _assert_holds(model, store, task, dtype):
    want = store.load(task, dtype=dtype)
    got = model.state_dict()
    assert set(want) <= set(got)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{task} {k}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_switching_equals_a_fresh_load(bert_models, mixed_store, dtype):
    from transformers import BertModel
    store = modelstore.open(mixed_store)
    model = BertModel(bert_models["cfg"]).to(dtype)
    size = sum(t.numel() for t in model.state_dict().values())
    rng = random.Random(int(str(dtype)[-2:]))
    order = ["alpha", "lo1", "alpha", "gamma", "beta", "lo2"] + [rng.choice(store.tasks()) for _ in range(6)]
    for task in order:
        assert store.switch(model, task) is model
        _assert_holds(model, store, task, dtype)
        state = switching.state_of(model)
        assert state is not None and state.entries() == _touched(store, task, model) < size


def test_switch_reads_the_base_values_a_rounded_model_lacks(bert_models, mixed_store):
    """A float16 model of a float32 store needs the base's float32 values at the changed entries:
    from storage when the store keeps no base in memory."""
    from transformers import BertModel
    store = modelstore.open(mixed_store, cache_base=False)
    model = BertModel(bert_models["cfg"]).half()
    for task in ["gamma", "alpha", "lo1", "beta", "lo1"]:
        store.switch(model, task)
        _assert_holds(model, store, task, torch.float16)
    assert not store._bases  # nothing of the size of the base was kept


def test_a_model_changed_elsewhere_is_written_whole_again(bert_models, mixed_store):
    from transformers import BertModel
    store = modelstore.open(mixed_store)
    model = BertModel(bert_models["cfg"])
    store.switch(model, "alpha")
    store.switch(model, "alpha")  # already there: nothing to do
    store.load_into(model, "lo1")  # forgets the switch state
    assert switching.state_of(model) is None
    store.switch(model, "beta")
    _assert_holds(model, store, "beta", torch.float32)
    model.to(torch.bfloat16)  # new memory: the recorded state no longer applies
    assert switching.state_of(model) is None
    store.switch(model, "gamma")
    _assert_holds(model, store, "gamma", torch.bfloat16)


def test_switch_refuses_a_model_that_does_not_fit(bert_models, mixed_store):
    from transformers import GPT2Config, GPT2Model
    store = modelstore.open(mixed_store)
    with pytest.raises(modelstore.InputError, match="does not fit"):
        store.switch(GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)), "alpha")


def test_switching_through_kinds_without_edits(bert_models, tmp_path):
    """Kinds that do not describe their edits (int8 values are fft; bitdelta, tall-mask are not) are
    switched by whole tensors: still bit-identical to a load, in any order, and back."""
    from transformers import BertModel
    tasks = bert_models["tasks"]
    url = str(tmp_path / "s")
    modelstore.build(url, bert_models["pre"], {"alpha": tasks["alpha"], "beta": tasks["beta"]}, keep=0.1,
                     merge_options={"lam": 1.0})
    s = modelstore.open(url, mode="a")
    s.add_task("q8", tasks["gamma"], keep=0.1, value_dtype="int8")
    s.add_task("bits", tasks["gamma"], kind="bitdelta")
    s.add_task("tall", tasks["alpha"], kind="tall-mask", pretrained=bert_models["pre"])
    model = BertModel(bert_models["cfg"]).eval()
    for task in ["alpha", "bits", "q8", "tall", "beta", "bits", "alpha"]:
        s.switch(model, task)
        _assert_holds(model, s, task, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resident_tasks_switch_without_the_store(bert_models, mixed_store, tmp_path, dtype):
    """With a resident budget, switching back to a recently used task reads nothing from the store
    (its files may be gone) and still equals a fresh load; the budget bounds what is kept, least
    recently used first."""
    import shutil

    from transformers import BertModel
    url = str(tmp_path / "copy")
    shutil.copytree(mixed_store, url)
    store = modelstore.open(url)
    want = {t: store.load(t, dtype=dtype) for t in ("alpha", "beta", "gamma", "lo1", "lo2")}
    model = BertModel(bert_models["cfg"]).to(dtype)
    for task in ("alpha", "beta"):
        store.switch(model, task, resident="1GB")
    state = switching.state_of(model)
    assert list(state.resident) == [f"{url}#{store.entry(t)['path']}" for t in ("alpha", "beta")]
    for t in ("alpha", "beta"):
        shutil.rmtree(os.path.join(url, store.entry(t)["path"]))
    for task in ("alpha", "beta", "beta", "alpha", "beta"):
        store.switch(model, task, resident="1GB")
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want[task].items()), task
    with pytest.raises(modelstore.ModelStoreError):  # not resident after all: its files are needed
        store.switch(model, "alpha", resident=0)
        store.switch(model, "beta", resident=0)
    for t in ("gamma", "lo1", "lo2", "gamma", "lo2"):  # θ0's tasks: fft and LoRA, resident or not
        store.switch(model, t, resident=200_000)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in want[t].items()), t
        state = switching.state_of(model)
        assert state.resident_bytes() <= state.budget == 200_000
        assert state.task in state.resident or sum(
            o.numel() * (o.element_size() * 2 + 8) for _, o in state.saved.values()) > 200_000


def test_resident_budget_keeps_the_most_recent_tasks(bert_models, mixed_store):
    from transformers import BertModel
    store = modelstore.open(mixed_store)
    model = BertModel(bert_models["cfg"])
    store.switch(model, "alpha", resident="1GB")
    one = switching.state_of(model).resident_bytes()
    store.switch(model, "beta", resident="1GB")
    two = switching.state_of(model).resident_bytes()
    assert 0 < one < two
    store.switch(model, "alpha", resident=two - 1)  # both no longer fit: beta, the older, goes
    state = switching.state_of(model)
    assert list(state.resident) == [f"{mixed_store}#{store.entry('alpha')['path']}"] and state.resident_bytes() == one
    store.switch(model, "beta", resident=one - 1)  # nothing fits
    assert not switching.state_of(model).resident
    _assert_holds(model, store, "beta", torch.float32)
    with pytest.raises(modelstore.InputError, match="resident: 'lots' is not a size"):
        store.switch(model, "alpha", resident="lots")
