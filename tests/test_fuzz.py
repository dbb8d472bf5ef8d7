"""Fuzzing the bundle and the command line: random byte flips, truncations, manifest field mutations and
symlinks out of the bundle; random CLI arguments. Never a traceback, never a crash, never a read outside.

The bundle cases run in one child process (a crash there is a failed test, not a dead test run), which loads
each mutated copy and generates two tokens; Python-level opens are watched by an audit hook.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

from test_cli import REPO, cli_env, edge_run
from test_runtime import EOS, ids_of, write_bundle

CASES = 40
HOSTILE_VALUES = [-1, 0, 10**12, 2**63, 1.5, float("nan"), "x", "../../etc/passwd", "/etc/passwd", None, [], {},
                  True, [10**9], {"a": 1}]


def _paths(node, prefix=()):
    """Every key path of a JSON document (lists by index)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def mutate(root: Path, outside: Path, rng: random.Random) -> str:
    """Damage the bundle at root one random way; return what was done. The manifest is re-sealed (an
    attacker's consistent bundle) in about half of the cases, so the deeper checks are reached too."""
    from edge_runtime.format.bundle import sha256_file, write_manifest

    meta = json.loads((root / "manifest.json").read_text())
    files = sorted(meta["files"])
    kind = rng.choice(["flip", "truncate", "field", "symlink", "manifest-bytes"])
    name = rng.choice(files)
    if kind == "flip":
        data = bytearray((root / name).read_bytes())
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        (root / name).write_bytes(bytes(data))
    elif kind == "truncate":
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[:rng.randrange(len(data))])
    elif kind == "symlink":
        (outside / name).write_bytes((root / name).read_bytes())
        (root / name).unlink()
        (root / name).symlink_to(outside / name)
    elif kind == "manifest-bytes":
        data = bytearray((root / "manifest.json").read_bytes())
        data[rng.randrange(len(data))] = rng.randrange(256)
        (root / "manifest.json").write_bytes(bytes(data))
        return f"{kind} manifest.json"
    if kind == "field":
        path = rng.choice(list(_paths(meta)))
        target = meta
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = rng.choice(HOSTILE_VALUES)
        name = "/".join(map(str, path))
    elif rng.random() < 0.5 and (root / name).exists():
        meta["files"][name] = {"bytes": (root / name).stat().st_size, "sha256": sha256_file(root / name)}
    if kind == "field" or rng.random() < 0.5:
        try:
            write_manifest(root, meta)
        except ValueError:  # NaN: not JSON the writer seals; leave it unsealed
            (root / "manifest.json").write_text(json.dumps(meta))
    return f"{kind} {name}"


def run_cases(source: Path, work: Path, seed: int, backend: str) -> int:
    """The child's loop: every case either generates or raises an EdgeError; anything else is reported."""
    import edge_runtime
    from edge_runtime.errors import EdgeError

    opened: list[str] = []
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and args else None)
    rng = random.Random(seed)
    bad = 0
    for case in range(CASES):
        root, outside = work / f"b{case}", work / f"outside{case}"
        shutil.copytree(source, root)
        outside.mkdir()
        what = mutate(root, outside, rng)
        del opened[:]
        try:
            edge_runtime.load(root, backend=backend, context=32).generate("a b", max_new_tokens=2)
        except EdgeError:
            pass
        except BaseException as e:  # noqa: BLE001 - the point: report it
            print(f"case {case} ({what}): {type(e).__name__}: {e}")
            bad += 1
        leaked = [p for p in opened if p.startswith(str(outside))]
        if leaked:
            print(f"case {case} ({what}): read outside the bundle: {leaked}")
            bad += 1
    return bad


def _child(source: Path, tmp_path: Path, seed: int, backend: str) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]; import test_fuzz; "
            f"from pathlib import Path; "
            f"sys.exit(test_fuzz.run_cases(Path({str(source)!r}), Path({str(tmp_path)!r}), {seed}, {backend!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=cli_env(), check=False)


def test_fuzzed_bundles_fail_cleanly(tiny_bundle, tmp_path):
    source = tiny_bundle("tiny:llama", "fp32", "--no-eval", "--no-reference", "--kv-dtype", "float32")
    for seed, backend in ((1, "numpy"), (2, "ort")):
        work = tmp_path / backend
        work.mkdir()
        proc = _child(source, work, seed, backend)
        assert proc.returncode == 0, f"{backend}: rc {proc.returncode}\n{proc.stdout}\n{proc.stderr[-2000:]}"


def test_fuzzed_command_lines_fail_cleanly(tmp_path):
    bundle = write_bundle(tmp_path / "b", ids_of("hello world") + [EOS], max_context=32)
    words = ["run", "verify", "cross-check", "budget", str(bundle), str(tmp_path / "nothing"), "hello", "-",
             "--raw", "--chat", "--seed", "-1", "abc", "--threads", "0", "99999999", "--context", "--budget",
             "0MB", "-5", "--temperature", "inf", "nan", "--top-p", "--stop", "", "--max-new-tokens", "10**12",
             "--backend", "fake", "numpy", "--kv-dtype", "float16", "--overflow", "slide", "--system", "\udcff",
             "--plan-only", "--cross", "--no-verify", "--", "-h"]
    rng = random.Random(3)
    for _ in range(25):
        argv = [rng.choice(words) for _ in range(rng.randint(0, 7))]
        proc = edge_run(*argv, "--backend", "fake", "--max-new-tokens", "3")
        assert proc.returncode in (0, 1, 2), (argv, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr, (argv, proc.stderr)
        if proc.returncode:
            lines = [line for line in proc.stderr.splitlines() if not line.startswith("edge-run: warning:")]
            assert len(lines) == 1 and lines[0].startswith("edge-run"), (argv, proc.stderr)


def test_fuzzed_export_command_lines_fail_cleanly(tmp_path, capsys):
    """edge-export's parsing and checks; --out is always a folder that is not a bundle, so none exports."""
    from export.cli import main as edge_export

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("mine")
    words = ["tiny:llama", "tiny:nope", str(tmp_path / "missing.gguf"), "--quant", "int3", "auto", "int4",
             "--block-size", "7", "64", "--method", "gptq", "--offsets", "--vocab-block", "16", "--max-kld", "0",
             "-1", "nan", "--smooth-alpha", "2", "--max-context", "8", "--threads", "0", "-5", "--kv-dtype",
             "--accuracy-level", "9", "--eval-text", "\udcff", "--overwrite", "--force", "--"]
    rng = random.Random(4)
    for _ in range(40):
        argv = [rng.choice(words) for _ in range(rng.randint(0, 6))] + ["--out", str(taken), "--quiet"]
        code = edge_export(argv)
        err = capsys.readouterr().err
        assert code in (1, 2) and "Traceback" not in err, (argv, code, err)
        assert err.count("\n") == 1 and err.startswith("edge-export: error: "), (argv, err)
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
