"""A fingerprint of the code that shapes a bundle, so cached bundles (tests, benchmarks) are never stale, and are
not re-exported for a change that cannot alter one.

The key covers every module `edge-export` can import from this repository (its import closure, lazy imports
included), each by its syntax tree without docstrings: editing a comment or a docstring keeps the key, editing
code the exporter runs changes it.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY = "export.cli"
OWN_PACKAGES = ("export", "edge_runtime")
# packages whose modules are imported by a name computed at run time (a family's spec, a backend's class)
DYNAMIC_PACKAGES = ("edge_runtime.spec", "edge_runtime.backends")


def module_name(path: Path, root: Path | None = None) -> str:
    """Dotted module name of a .py file under `root` (a package's __init__.py names the package)."""
    parts = list(path.relative_to(root or ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_file(name: str, root: Path | None = None) -> Path | None:
    """The source file of module `name` under `root` (default: this repository), found without importing it."""
    base = (root or ROOT).joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def runtime_nodes(tree: ast.AST):
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:` (annotations only, never executed)."""
    for node in ast.iter_child_nodes(tree):
        test = node.test if isinstance(node, ast.If) else None
        if isinstance(test, (ast.Name, ast.Attribute)) and "TYPE_CHECKING" in ast.unparse(test):
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


def imported_names(name: str, tree: ast.AST, is_package: bool) -> set[str]:
    """Absolute names of everything module `name` (its syntax `tree`) imports when it runs, lazy imports included
    (a `from a import b` gives a and a.b: b may be a module)."""
    out = set()
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                parts = parts[: len(parts) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return tree


def import_closure(entry: str = ENTRY) -> dict[str, Path]:
    """Module name -> file, for every module of this repository `entry` may import, and their parent packages."""
    seen: dict[str, Path] = {}
    dynamic = [f for p in DYNAMIC_PACKAGES for f in sorted(ROOT.joinpath(*p.split(".")).rglob("*.py"))]
    todo = [entry] + [module_name(f) for f in dynamic]
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in OWN_PACKAGES or (f := module_file(name)) is None:
            continue
        seen[name] = f
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        tree = ast.parse(f.read_text(encoding="utf-8"))
        todo.extend(parents + sorted(imported_names(name, tree, f.name == "__init__.py")))
    return seen


def exporter_key() -> str:
    h = hashlib.sha256()
    for name, f in sorted(import_closure().items()):
        h.update(name.encode() + b"\0")
        h.update(ast.dump(without_docstrings(ast.parse(f.read_text(encoding="utf-8")))).encode())
    return h.hexdigest()[:10]


def inputs_key(source: str, args: tuple[str, ...]) -> str:
    """What else an export depends on: its arguments and the source's files (name, size, modification time; a
    folder's files one level deep), so that a retrained student or a replaced GGUF is exported again."""
    h = hashlib.sha256("\0".join(args).encode())
    path = Path(source)
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path] if path.is_file() else []
    h.update(source.encode())
    for f in files:
        st = f.stat()
        h.update(f"\0{f.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


def ensure_bundle(source: str, out: Path, *args: str) -> Path:
    """Export `source` to `out` unless a bundle made by this exact exporter code, from this very source and with
    these arguments, is already there."""
    import subprocess
    import sys

    stamp = out / ".exporter-key"
    key = f"{exporter_key()}-{inputs_key(source, args)}"
    if (out / "manifest.json").is_file() and stamp.is_file() and stamp.read_text() == key:
        return out
    print(f"exporting {out} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "export.cli", source, "--out", str(out), "--quiet", "--overwrite", *args],
                   check=True, cwd=ROOT)
    stamp.write_text(key)
    return out
