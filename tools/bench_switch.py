"""Benchmark of Store.switch on a transformer-shaped fp32 model, against two baselines of the same run.

A synthetic GPT-2-shaped model (embeddings, 12 layers of attention and MLP, ~110M parameters at the
default sizes) and two fine-tunes of it (the base plus dense small noise and a few large changes)
are stored as fft tasks at each keep m on θ0. A resident model is switched A -> B -> A ... and
each switch is timed against
- load_state_dict: `model.load_state_dict(full task state dict)` (the state dict already in memory),
- the floor: scattering k_previous + k_new entries into the model's tensors (`index_copy_` of the
  two tasks' positions and values, already decoded in memory): what any in-place switch must write.
For context, `store.load_into(model, task)` (the whole task read from the store and copied in) is
timed too, and so is a switch between resident tasks (`resident=` budget: both tasks' writes kept
on the device, nothing read from the store). Each timing is the median of `--repeat` runs. Also
timed: putting back a LoRA task's adapted matrices (the attention weights) from the copies a switch
keeps, against reading them again from the stored base (why switch keeps the copies).

    python -m tools.bench_switch [--layers 12 --dim 768 --vocab 32000] [--keep 0.01 0.05 0.1] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from safetensors.torch import save_file

import modelstore
from modelstore.serving import switching
from tools.bench_lora_svd import median_time


def synthetic_state_dict(layers: int, dim: int, vocab: int) -> dict[str, torch.Tensor]:
    """A GPT-2-shaped fp32 state dict with random weights."""
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"wte.weight": w(vocab, dim), "wpe.weight": w(1024, dim)}
    for i in range(layers):
        p = f"h.{i}."
        sd |= {p + "ln_1.weight": torch.ones(dim), p + "attn.c_attn.weight": w(dim, 3 * dim),
               p + "attn.c_proj.weight": w(dim, dim), p + "ln_2.weight": torch.ones(dim),
               p + "mlp.c_fc.weight": w(dim, 4 * dim), p + "mlp.c_proj.weight": w(4 * dim, dim)}
    sd["ln_f.weight"] = torch.ones(dim)
    return sd


def finetune(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The base plus dense small noise and 2% larger changes (a task vector's usual shape)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        d = torch.randn(v.shape, generator=g) * 2e-4
        d[torch.rand(v.shape, generator=g) < 0.02] *= 20
        out[k] = v + d
    return out


def module_of(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An nn.Module whose state dict has the names and values of `sd` (copies)."""
    root = torch.nn.Module()
    for name, t in sd.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=False))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as root:
        r = run(root, a)
    if a.json:
        print(json.dumps(r, indent=2))
        return
    print(f"{r['params'] / 1e6:.0f}M fp32 parameters, {r['threads']} torch threads, median of {a.repeat}")
    print(f"{'keep':>6} {'k (each)':>10} {'switch s':>9} {'floor s':>9} {'load_sd s':>9} {'load_into s':>11} "
          f"{'vs floor':>9} {'vs load_sd':>10} {'vs load_into':>12} {'resident s':>10} {'vs floor':>9} "
          f"{'vs load_sd':>10}")
    for row in r["rows"]:
        print(f"{row['keep']:>6.2f} {row['k']:>10} {row['switch_s']:>9.4f} {row['floor_s']:>9.4f} "
              f"{row['load_state_dict_s']:>9.4f} {row['load_into_s']:>11.4f} {row['switch_vs_floor']:>9.2f} "
              f"{row['switch_vs_load_state_dict']:>10.3f} {row['switch_vs_load_into']:>12.3f} "
              f"{row['resident_switch_s']:>10.4f} {row['resident_vs_floor']:>9.2f} "
              f"{row['resident_vs_load_state_dict']:>10.3f}")
    lr = r["lora_restore"]
    print(f"LoRA restore of {lr['entries'] / 1e6:.1f}M entries (attention weights): from kept copies "
          f"{lr['from_copies_s']:.4f} s, re-read from the stored base {lr['from_storage_s']:.4f} s")


def run(root: str, a: argparse.Namespace) -> dict:
    sd0 = synthetic_state_dict(a.layers, a.dim, a.vocab)
    save_file(sd0, f"{root}/pre.safetensors")
    for name, seed in (("A", 1), ("B", 2)):
        save_file(finetune(sd0, seed), f"{root}/{name}.safetensors")
    modelstore.init(f"{root}/s", f"{root}/pre.safetensors")
    w = modelstore.open(f"{root}/s", mode="a")
    for keep in a.keep:
        for name in ("A", "B"):
            w.add_task(f"{name}{keep}", f"{root}/{name}.safetensors", keep=keep, sparsify="magnitude",
                       value_dtype="float16")
    store = modelstore.open(f"{root}/s")
    model = module_of(sd0)
    params = dict(model.named_parameters())
    r: dict = {"params": sum(t.numel() for t in sd0.values()), "threads": torch.get_num_threads(), "rows": []}
    for keep in a.keep:
        ta, tb = f"A{keep}", f"B{keep}"
        full_b = store.load(tb)
        writes = {t: _writes(store, model, t) for t in (ta, tb)}
        k = sum(p.numel() for p, _ in writes[tb].values())
        store.switch(model, ta)

        def floor(ta: str = ta, tb: str = tb, writes: dict = writes) -> None:
            with torch.no_grad():
                for t in (ta, tb):
                    for n, (pos, vals) in writes[t].items():
                        params[n].view(-1).index_copy_(0, pos, vals)

        def back_and_forth(ta: str = ta, tb: str = tb) -> None:
            store.switch(model, tb)
            store.switch(model, ta)

        def resident(ta: str = ta, tb: str = tb) -> None:
            store.switch(model, tb, resident="8GB")
            store.switch(model, ta, resident="8GB")

        row = {"keep": keep, "k": k,
               "switch_s": median_time(back_and_forth, a.repeat) / 2,
               "resident_switch_s": median_time(resident, a.repeat) / 2,
               "floor_s": median_time(floor, a.repeat),
               "load_state_dict_s": median_time(lambda full_b=full_b: model.load_state_dict(full_b), a.repeat),
               # load_into forgets the switch state
               "load_into_s": median_time(lambda tb=tb: store.load_into(model, tb), a.repeat)}
        row["switch_vs_floor"] = row["switch_s"] / row["floor_s"]
        row["switch_vs_load_state_dict"] = row["switch_s"] / row["load_state_dict_s"]
        row["switch_vs_load_into"] = row["switch_s"] / row["load_into_s"]
        row["resident_vs_floor"] = row["resident_switch_s"] / row["floor_s"]
        row["resident_vs_load_state_dict"] = row["resident_switch_s"] / row["load_state_dict_s"]
        store.switch(model, ta)  # a budget of 0: the resident writes go
        r["rows"].append(row)
    attn = [n for n in params if ".attn." in n]
    kept = {n: params[n].detach().clone() for n in attn}
    base = store._stored_base("pretrained")
    with torch.no_grad():
        r["lora_restore"] = {
            "entries": sum(kept[n].numel() for n in attn),
            "from_copies_s": median_time(lambda: [params[n].copy_(kept[n]) for n in attn], a.repeat),
            "from_storage_s": median_time(lambda: [params[n].copy_(base.get(n)) for n in attn], a.repeat)}
    return r


def _writes(store: modelstore.Store, model: torch.nn.Module, task: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per tensor, the positions and values a switch to `task` writes (what the switch state keeps)."""
    store.switch(model, task)
    params = dict(model.named_parameters())
    state = switching.state_of(model)
    assert state is not None
    return {n: (pos.long(), params[n].detach().view(-1)[pos.long()]) for n, (pos, _) in state.saved.items()}


if __name__ == "__main__":
    main()
