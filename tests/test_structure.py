"""The package layout: no import cycles (imports inside functions included), and the layering rules the folders'
docstrings state: production code never imports tests or bench, tests never import bench, the runtime never
imports the exporter or torch."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from export.version import imported_names, module_name

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edge_runtime", "export", "android_demo")
EXPORT_ONLY = ("torch", "transformers", "optimum", "onnx", "gguf", "export")


def modules(roots=PACKAGES) -> dict[str, Path]:
    """dotted name -> file, for every .py file under `roots`."""
    return {module_name(p, ROOT): p for r in roots for p in sorted((ROOT / r).rglob("*.py"))}


def imports_of(name: str, path: Path) -> set[str]:
    """The names module `name` imports when it runs (export.version.imported_names)."""
    return imported_names(name, ast.parse(path.read_text(encoding="utf-8")), path.name == "__init__.py")


def graph() -> dict[str, set[str]]:
    known = modules()
    # a module's own parent packages are initialised before it runs, so an import of them is never a cycle
    return {m: {t for t in imports_of(m, p) if t in known and t != m and not m.startswith(t + ".")}
            for m, p in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_cycle_finder_finds_a_lazy_cycle(tmp_path):
    # the checker itself: a cycle made only of imports inside functions is still a cycle
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    (tmp_path / "m.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import csv\n\n\n"
                                   "def f():\n    from .n import g\n    import json\n", encoding="utf-8")
    assert imports_of("pkg.m", tmp_path / "m.py") == {"typing", "typing.TYPE_CHECKING", "pkg.n", "pkg.n.g",
                                                          "json"}  # csv only for annotations


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", PACKAGES)
def test_production_code_never_imports_tests_or_bench(package):
    bad = {m: sorted(t for t in imports_of(m, p) if t.split(".")[0] in ("tests", "bench"))
           for m, p in modules((package,)).items()}
    assert {m: t for m, t in bad.items() if t} == {}


def test_tests_never_import_bench():
    bad = {m: sorted(t for t in imports_of(m, p) if t.split(".")[0] == "bench")
           for m, p in modules(("tests",)).items()}
    assert {m: t for m, t in bad.items() if t} == {}


def test_runtime_never_imports_the_exporter_or_its_dependencies():
    bad = {m: sorted(t for t in imports_of(m, p) if t.split(".")[0] in EXPORT_ONLY)
           for m, p in modules(("edge_runtime", "android_demo")).items()}
    assert {m: t for m, t in bad.items() if t} == {}


def test_every_folder_says_what_it_holds_and_may_import():
    for package in PACKAGES:
        for init in sorted((ROOT / package).rglob("__init__.py")):
            doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
            where = init.relative_to(ROOT)
            assert "import" in doc.lower(), f"{where}: its docstring must say what the folder may import"


def test_bundle_cache_key_follows_code_not_docstrings(tmp_path, monkeypatch):
    from export import version

    (tmp_path / "export").mkdir()
    (tmp_path / "export/__init__.py").write_text('"""The package."""\n', encoding="utf-8")
    (tmp_path / "export/cli.py").write_text("from .steps import run\n", encoding="utf-8")
    steps = tmp_path / "export/steps.py"
    unrelated = tmp_path / "export/unrelated.py"
    steps.write_text('"""Steps."""\n\n\ndef run():\n    return 1  # one\n', encoding="utf-8")
    unrelated.write_text("X = 1\n", encoding="utf-8")
    monkeypatch.setattr(version, "ROOT", tmp_path)
    monkeypatch.setattr(version, "DYNAMIC_PACKAGES", ())
    assert sorted(version.import_closure()) == ["export", "export.cli", "export.steps"]
    key = version.exporter_key()
    steps.write_text('"""Steps, reworded."""\n\n\ndef run():\n    """Run."""\n    return 1  # uno\n', encoding="utf-8")
    unrelated.write_text("X = 2\n", encoding="utf-8")
    assert version.exporter_key() == key  # docstrings, comments and modules it never imports
    steps.write_text('"""Steps."""\n\n\ndef run():\n    return 2\n', encoding="utf-8")
    assert version.exporter_key() != key


def test_ensure_bundle_exports_again_when_the_source_or_arguments_change(tmp_path, monkeypatch):
    import os
    import subprocess

    from export import version

    calls = []

    def fake_export(cmd, **kw):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text("{}")

    monkeypatch.setattr(subprocess, "run", fake_export)
    monkeypatch.setattr(version, "exporter_key", lambda: "code")
    student = tmp_path / "student"
    student.mkdir()
    weights = student / "model.safetensors"
    weights.write_bytes(b"a")
    out = tmp_path / "bundle"
    version.ensure_bundle(str(student), out, "--quant", "int4")
    version.ensure_bundle(str(student), out, "--quant", "int4")
    assert len(calls) == 1  # same code, source and arguments: reused
    weights.write_bytes(b"bb")  # the student was trained again
    os.utime(weights, ns=(1, 1))
    version.ensure_bundle(str(student), out, "--quant", "int4")
    version.ensure_bundle(str(student), out, "--quant", "int8")
    assert len(calls) == 3


def test_stale_cache_entries_are_pruned(tmp_path):
    from bundle_cache import prune_stale

    for name in ("smollm2-int4-aaaaaaaaaa", "smollm2-int4-bbbbbbbbbb", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "gemma3-tokenizer-aaaaaaaaaa.json").write_text("{}")
    (tmp_path / "gemma3-tokenizer-bbbbbbbbbb.json").write_text("{}")
    assert prune_stale(tmp_path, "bbbbbbbbbb") == ["gemma3-tokenizer-aaaaaaaaaa.json", "smollm2-int4-aaaaaaaaaa"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3-tokenizer-bbbbbbbbbb.json", "other",
                                                          "smollm2-int4-bbbbbbbbbb"]


def test_every_module_is_listed_in_docs_layout():
    listed = (ROOT / "docs/layout.md").read_text(encoding="utf-8")
    missing = [m for m, p in modules().items() if p.name != "__main__.py"
               and f"`{p.parent.relative_to(ROOT) if p.name == '__init__.py' else p.relative_to(ROOT)}" not in listed]
    assert missing == [], "add these modules to docs/layout.md"
