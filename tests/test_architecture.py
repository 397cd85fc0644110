"""The package's shape: no import circles, kinds only inside modelstore.kinds, a typed and documented
public surface, one Store that reads and writes, and a new task kind added by registration alone."""

from __future__ import annotations

import ast
import inspect
import os
from pathlib import Path

import pytest
import torch

import modelstore
from modelstore import kinds
from modelstore.kinds.base import TaskKind

PKG = Path(modelstore.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that module `name` imports anywhere in its body (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{a.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m in known}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (module -> modules it imports), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circles_counting_imports_inside_functions():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) - {m} for m, p in mods.items()}
    assert "modelstore.kinds.fft.sparse_delta" in graph["modelstore.kinds"]  # the walk sees the package
    cycle = _find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_checker_finds_a_circle_hidden_in_functions(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from . import b\n")
    b.write_text("def g():\n    from .a import f\n")
    known = {"x.a", "x.b"}
    graph = {"x.a": _imports("x.a", a, known), "x.b": _imports("x.b", b, known)}
    assert graph == {"x.a": {"x.b"}, "x.b": {"x.a"}}
    assert _find_cycle(graph) == ["x.a", "x.b", "x.a"]


def test_no_code_outside_the_kinds_package_branches_on_a_task_kind():
    names = set(kinds.kind_names())
    offenders = []
    for m, path in _modules().items():
        if m.startswith("modelstore.kinds"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(isinstance(v, str) and v in names for v in consts):
                    offenders.append(f"{m}:{node.lineno}")
    assert not offenders, f"kind comparisons outside modelstore.kinds: {offenders}"


def test_typed_and_documented_public_surface():
    assert (PKG / "py.typed").is_file()
    for name in modelstore.__all__:
        obj = getattr(modelstore, name)
        assert inspect.getdoc(obj), f"modelstore.{name} has no docstring"
    public = [getattr(modelstore, n) for n in modelstore.__all__ if inspect.isfunction(getattr(modelstore, n))]
    public += [f for n, f in inspect.getmembers(modelstore.Store, inspect.isfunction) if not n.startswith("_")]
    for fn in public:
        doc = inspect.getdoc(fn) or ""
        assert doc, f"{fn.__qualname__} has no docstring"
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, f"{fn.__qualname__} has no return type"
        for p in sig.parameters.values():
            assert p.name == "self" or p.annotation is not inspect.Parameter.empty, \
                f"{fn.__qualname__}({p.name}) has no type"
    api = (PKG.parent / "docs" / "python.md").read_text()
    for name in modelstore.__all__:
        assert f"`{name}" in api or f"modelstore.{name}" in api, f"docs/python.md does not list {name}"


def test_every_error_modelstore_raises_is_exported():
    """A caller can catch any error modelstore raises on purpose by its public name."""
    import importlib
    import pkgutil
    classes = set()
    for info in pkgutil.walk_packages([str(PKG)], "modelstore."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        classes |= {c for _, c in inspect.getmembers(mod, inspect.isclass)
                    if issubclass(c, modelstore.ModelStoreError) and c.__module__.startswith("modelstore")}
    missing = sorted(c.__name__ for c in classes if getattr(modelstore, c.__name__, None) is not c)
    assert not missing, f"errors not exported from modelstore: {missing}"


def test_one_store_reads_and_writes(bert_models, store2, tmp_path):
    ro = modelstore.open(store2)
    with pytest.raises(modelstore.InputError, match="read-only.*mode=\"a\""):
        ro.add_task("gamma", bert_models["tasks"]["gamma"])
    with pytest.raises(modelstore.InputError, match="read-only"):
        ro.remove("alpha")
    s = modelstore.open(store2, mode="a")
    entry = s.add_task("gamma", bert_models["tasks"]["gamma"], keep=0.05)
    assert entry["kind"] == "fft" and s.tasks() == ["alpha", "beta", "gamma"]
    assert modelstore.open(store2).entry("gamma") == entry  # committed, not only in memory
    s.remove("beta")
    assert modelstore.open(store2).tasks() == ["alpha", "gamma"] == s.tasks()
    report = s.sync_to(str(tmp_path / "copy"))
    assert report.copied == ["alpha", "gamma"]
    copy = modelstore.open(str(tmp_path / "copy"))
    assert all(torch.equal(v, s.load("gamma")[k]) for k, v in copy.load("gamma").items())


class WholeCopy(TaskKind):
    """A toy kind: the task's tensors kept whole. Enough to show that a kind plugs in by registration."""

    name = "whole"
    title = "a whole copy"
    kept_label = "entries stored"
    original_label = "the checkpoint"

    def base_id(self, bases, requested):
        return requested or "pretrained"

    def write(self, out, task, source, base, base_entry, options, progress):
        out.declare_dense("dense", ((source.shape(n), source.dtype(n)) for n in source.names()))
        for n in source.names():
            out.add_dense(n, source.get(n), "dense")
        total = sum(t["count"] for t in out.table)
        return {"method": "copy", "params": {}, "kept": total, "total": total, "full_bytes": source.nbytes()}

    def tensors(self, segments, table, base, entry, device, dtype):
        for t in table:
            yield t["name"], segments.get(t["array"], t["start"], t["count"], t["dtype"]).view(t["shape"])

    def describe(self, info):
        return f"{info['kept']} entries copied"


def test_a_new_kind_is_one_class_and_one_registry_entry(bert_models, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from modelstore.cli import main
    from modelstore.inputs.sources import open_checkpoint
    from modelstore.store import source_info
    monkeypatch.setattr(kinds, "KINDS", [*kinds.KINDS, WholeCopy()])
    url = str(tmp_path / "s")
    modelstore.init(url, bert_models["pre"])
    s = modelstore.open(url, mode="a")
    ck = open_checkpoint(bert_models["tasks"]["alpha"])
    s._write_task("w", kinds.get_kind("whole"), ck, None, source_info=source_info(ck))
    got = modelstore.open(url).load("w")
    assert all(torch.equal(got[k], v) for k, v in bert_models["sds"]["alpha"].items())
    rows = CliRunner().invoke(main, ["ls", url, "--json"]).output
    assert '"kind": "whole"' in rows
    assert os.path.isdir(os.path.join(url, s.entry("w")["path"]))


def test_an_unknown_kind_in_the_manifest_is_a_clear_error(store2):
    import json
    path = os.path.join(store2, "manifest.json")
    m = json.load(open(path))
    m["tasks"]["alpha"]["kind"] = "hologram"  # as a newer modelstore might write, checksum and all
    from modelstore.format.manifest import seal
    open(path, "wb").write(seal(m))
    with pytest.raises(modelstore.CorruptStoreError, match="unknown task kind 'hologram'"):
        modelstore.open(store2).load("alpha")


#: The package's layers, lowest first: a module imports only modules of its own layer or lower ones,
#: so data flows one way (inputs -> merge -> compress -> store; store -> decode -> serve). The
#: longest matching prefix names a module's layer.
LAYERS: list[list[str]] = [
    ["modelstore.errors"],
    ["modelstore._runtime", "modelstore.options"],
    ["modelstore.format"],
    ["modelstore.inputs"],
    ["modelstore.kinds"],
    ["modelstore.merging", "modelstore.storage"],
    ["modelstore.serving.switching", "modelstore.serving.modules"],
    ["modelstore.fidelity"],
    ["modelstore.store"],
    ["modelstore.build", "modelstore.serving", "modelstore.config"],
    ["modelstore.evaluation"],
    ["modelstore.api"],
    ["modelstore.cli", "modelstore", "modelstore.__main__"],
]


def _layer(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, f"{module} is in no layer of tests/test_architecture.py"
    return rank


def test_imports_go_down_the_layers_only():
    mods = _modules()
    upward = [f"{m} -> {n}" for m, p in mods.items() for n in _imports(m, p, set(mods))
              if n != m and not m.startswith(n + ".") and _layer(n) > _layer(m)]
    assert not upward, "imports against the layers: " + ", ".join(sorted(upward))


def test_few_top_level_modules_and_private_plumbing():
    top = sorted(p.stem for p in PKG.glob("*.py"))
    assert len(top) <= 12, top
    runtime = sorted(p.stem for p in (PKG / "_runtime").glob("*.py") if p.stem != "__init__")
    exported = {getattr(getattr(modelstore, n), "__module__", "") for n in modelstore.__all__}
    assert not any(m.startswith("modelstore._runtime") for m in exported), "public API from _runtime"
    assert runtime, "modelstore/_runtime holds the plumbing"
