"""Hostile bundles and careless paths: one test (or group) per finding of the security review.

Fast paths use the fake-backend bundles of test_runtime; the graph checks use one tiny exported bundle.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import REPO, assert_one_line_error, cli_env, edge_run, interruptible
from test_runtime import CHATML, EOS, fake_hook, ids_of, make_model, tiny_tokenizer, write_bundle  # noqa: F401

import edge_runtime
from edge_runtime.errors import BundleError, EdgeError, EdgeWarning, SamplingError
from edge_runtime.format.bundle import Bundle, sha256_file, write_manifest
from edge_runtime.generation.generate import NonFiniteLogitsError
from edge_runtime.generation.stats import format_size
from edge_runtime.threads import available_cpus
from edge_runtime.tokenizer import chat_template as chat
from export.cli import main as edge_export

TINY_EXPORT = ["tiny:llama", "--quant", "fp32", "--quiet", "--no-eval", "--no-reference", "--kv-dtype", "float32"]


def refit(root: Path, name: str, edit=None) -> None:
    """Fix up the manifest after a file was changed on purpose: the attacker's case, checksums consistent."""
    meta = json.loads((root / "manifest.json").read_text())
    if edit:
        edit(meta)
    if name:
        meta["files"][name] = {"bytes": (root / name).stat().st_size, "sha256": sha256_file(root / name)}
    write_manifest(root, meta)


@pytest.fixture(scope="module")
def exported(tiny_bundle) -> Path:
    return tiny_bundle("tiny:llama", "fp32", "--no-eval", "--no-reference", "--kv-dtype", "float32")


@pytest.fixture
def copy(exported, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(exported, dst)
    return dst


# -- 1. --out never removes what is not a bundle ---------------------------------------------------------------

def test_out_refuses_a_folder_or_file_that_is_not_a_bundle(tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for out in (folder, notes):
        assert edge_export([*TINY_EXPORT, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("edge-export: error: ") and "nothing written" in err and err.count("\n") == 1
    assert (folder / "thesis.txt").read_text() == "precious" and notes.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "notes.txt"]  # no .old-* or staging folder


def test_out_replaces_a_bundle_only_with_overwrite(exported, tmp_path, capsys):
    out = tmp_path / "b"
    shutil.copytree(exported, out)
    before = (out / "manifest.json").read_bytes()
    assert edge_export([*TINY_EXPORT, "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before
    assert edge_export([*TINY_EXPORT, "--out", str(out), "--overwrite", "--max-context", "64"]) == 0
    assert Bundle.open(out).max_context == 64
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    (out / "notes.txt").write_text("added by hand")  # a bundle folder holding other files is not replaced
    assert edge_export([*TINY_EXPORT, "--out", str(out), "--overwrite"]) == 2
    assert (out / "notes.txt").is_file()


def test_out_help_says_what_happens():
    from export.cli import build_parser

    help_text = " ".join(build_parser().format_help().split())
    assert "anything else is refused and left untouched" in help_text and "--overwrite" in help_text


# -- 3. threads are capped at the CPUs -------------------------------------------------------------------------

def test_threads_are_capped_at_the_cpu_count(tmp_path):
    with pytest.warns(EdgeWarning, match=f"threads 1000000 capped at {available_cpus()}"):
        model = make_model(tmp_path, ids_of("the cat"), threads=10**6)
    assert model.backend.threads == available_cpus()
    for bad in (0, -1, 2.5, True, "2"):
        with pytest.raises(EdgeError, match="threads must be a positive integer"):
            edge_runtime.load(tmp_path / "bundle", backend="fake", threads=bad)


def test_cli_threads_cap_is_one_warning_line(tmp_path):
    bundle = write_bundle(tmp_path / "b", ids_of("hello world") + [EOS], max_context=32)
    proc = edge_run(bundle, "hello", "--raw", "--backend", "fake", "--threads", "1000000", "--no-stats",
                    "--max-new-tokens", "4")
    assert proc.returncode == 0
    assert proc.stderr == f"edge-run: warning: threads 1000000 capped at {available_cpus()}, the CPUs available " \
                          f"to this process\n"


# -- 4. nothing outside the bundle is read ---------------------------------------------------------------------

def test_symlinked_tokenizer_out_of_the_bundle_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy(copy / "tokenizer.json", outside)  # same bytes: the checksum alone would pass
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to(outside)
    with pytest.raises(BundleError, match="tokenizer.json leads outside the bundle"):
        edge_runtime.load(copy, backend="numpy")


def test_symlinked_weights_out_of_the_bundle_are_refused(copy, tmp_path):
    outside = tmp_path / "weights.bin"
    shutil.move(copy / "weights.bin", outside)
    (copy / "weights.bin").symlink_to(outside)
    for backend in ("numpy", "ort"):
        with pytest.raises(BundleError, match="weights.bin leads outside the bundle"):
            edge_runtime.load(copy, backend=backend)


def test_a_symlink_inside_the_bundle_is_fine(copy):
    (copy / "real.json").write_bytes((copy / "tokenizer.json").read_bytes())
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to("real.json")
    refit(copy, "real.json")
    assert edge_runtime.load(copy, backend="numpy").generate("a b", max_new_tokens=2).token_ids


@pytest.mark.parametrize("location, message", [
    ("/etc/passwd", "outside the bundle"),
    ("../weights.bin", "outside the bundle"),
    ("other.bin", "not among the manifest's files"),
])
def test_onnx_external_data_is_checked_before_onnx_runtime(copy, monkeypatch, location, message):
    import onnx
    import onnxruntime

    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.external_data)
    next(e for e in tensor.external_data if e.key == "location").value = location
    onnx.save_model(model, str(copy / "model.onnx"))
    refit(copy, "model.onnx")

    def never(*a, **k):
        raise AssertionError("ONNX Runtime was handed the graph")

    monkeypatch.setattr(onnxruntime, "InferenceSession", never)
    with pytest.raises(BundleError, match=message):
        edge_runtime.load(copy, backend="ort")


def test_unlisted_files_are_never_opened(copy):
    def point_elsewhere(meta):
        meta["tokenizer"]["file"] = "stray.json"

    shutil.copy(copy / "tokenizer.json", copy / "stray.json")
    refit(copy, "", point_elsewhere)
    with pytest.raises(BundleError, match="'stray.json' is not among the manifest's files"):
        edge_runtime.load(copy, backend="numpy")


# -- 5. the chat template: checksummed, bounded ----------------------------------------------------------------

def test_an_edited_manifest_fails_its_checksum(tmp_path):
    root = write_bundle(tmp_path / "b", ids_of("hi") + [EOS])
    meta = json.loads((root / "manifest.json").read_text())
    meta["tokenizer"]["chat_template"] = "{{ 'pwned' }}"
    (root / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="manifest.json fails its checksum"):
        edge_runtime.load(root, backend="fake")


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "render bounds"),
    ("{{ 'x' * 4000000000 }}", "repeats a value past"),
    ("{{ range(10**9) }}", "larger than"),
    ("{{ 'x'|center(10**9) }}", "larger than"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "longer than"),
    ("{{ '{:>999999999}'.format(1) }}", "width or precision"),
    ("{{ '%999999999d' % 1 }}", "width or precision"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output exceeds"),
])
def test_hostile_templates_stop_at_their_bounds(template, message):
    with pytest.raises(chat.ChatTemplateError, match=message):
        chat.render(template, [{"role": "user", "content": "hi"}])


def test_the_bounds_leave_real_templates_alone():
    text = chat.render(CHATML, [{"role": "user", "content": "hi"}] * 50)
    assert text.count("<|im_start|>user\nhi<|im_end|>") == 50 and text.endswith("<|im_start|>assistant\n")


# -- 6. every user-caused failure is one line (CLI) or an EdgeError (API) ---------------------------------------

def test_bad_seed_is_one_line(tmp_path):
    bundle = write_bundle(tmp_path / "b", ids_of("hello world") + [EOS], max_context=32)
    assert_one_line_error(edge_run(bundle, "hello", "--raw", "--backend", "fake", "--seed", "-1"),
                          "seed must be an integer >= 0")


def test_non_utf8_prompts_are_one_line(tmp_path):
    bundle = write_bundle(tmp_path / "b", ids_of("hello world") + [EOS], max_context=32)
    cmd = [sys.executable, "-m", "edge_runtime.cli", str(bundle), "--raw", "--backend", "fake"]
    for argv, stdin in ((cmd + [b"caf\xe9"], b""), (cmd + ["-"], b"caf\xe9 \xff")):
        proc = subprocess.run(argv, input=stdin, capture_output=True, env=cli_env(), timeout=60, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and err.startswith("edge-run: error: ") and "not UTF-8" in err, err
        assert err.count("\n") == 1


def test_corrupt_graph_with_a_fixed_checksum_is_one_line(copy):
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = os.urandom(64)
    (copy / "model.onnx").write_bytes(bytes(data))
    refit(copy, "model.onnx")
    proc = edge_run(copy, "a b", "--raw", "--backend", "ort")
    assert_one_line_error(proc, f"bundle {copy}")
    assert "model.onnx" in proc.stderr


def test_bad_reference_json_under_verify_is_one_line(copy):
    (copy / "reference.json").write_text("{not json")
    refit(copy, "reference.json", lambda m: m.setdefault("reference", {"file": "reference.json"}))
    proc = edge_run("verify", copy, "--backend", "numpy", "--threads", "1")
    assert proc.returncode in (1, 2) and proc.stderr.startswith("edge-run: error: ")
    assert "reference.json" in proc.stderr and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_api_misuse_raises_edge_errors(tmp_path):
    model = make_model(tmp_path, ids_of("the cat sat") + [EOS])
    with pytest.raises(SamplingError, match="seed"):
        model.generate("the", seed="abc")
    with pytest.raises(BundleError, match="must be a string or a path"):
        edge_runtime.load(None)
    with pytest.raises(SamplingError, match="temperature must be finite"):
        model.generate("the", temperature=float("inf"))
    with pytest.raises(SamplingError, match="stop token ids"):
        model.generate("the", stop=[10**9])


def test_huge_max_new_tokens_allocates_by_the_context(tmp_path):
    model = make_model(tmp_path, ids_of("the cat sat on the mat") + [EOS], max_context=32, overflow="slide")
    out = model.generate("the", max_new_tokens=10**12)  # would be a 7 TiB history buffer if sized by it
    assert out.finish_reason == "eos" and out.text == " cat sat on the mat"


def test_debug_shows_the_traceback(tmp_path):
    proc = edge_run(tmp_path / "missing", "hi", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("edge-run: error: bundle not found")


# -- 7. the smaller ones ---------------------------------------------------------------------------------------

def test_nan_logits_name_the_bundle_and_verify(tmp_path, monkeypatch):
    model = make_model(tmp_path, ids_of("the cat") + [EOS])
    monkeypatch.setattr(model.backend, "forward", lambda ids, past, idx: np.full((len(idx), 64), np.nan,
                                                                                  np.float32))
    for kw in ({}, {"temperature": 0.7, "seed": 1}):
        with pytest.raises(NonFiniteLogitsError, match=f"bundle {tmp_path / 'bundle'}.*edge-run verify"):
            model.generate("the", max_new_tokens=4, **kw)


def test_truncated_chat_keeps_the_template_structure(tmp_path):
    model = make_model(tmp_path, list(range(3, 40)), max_context=64, overflow="truncate")
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "a b c d e f g h i j k l m n o p q r s t"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "one two three four five six seven eight nine ten"}]
    model.generate(messages, max_new_tokens=8)
    fed = [i for _, ids, _ in model.backend.calls for i in ids]
    text = tiny_tokenizer().decode(fed[:-7])  # the prompt (the last 7 ids fed are sampled tokens)
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("ten<|im_end|>\n<|im_start|>assistant\n")
    assert "a b c" not in text and "ok" not in text  # the oldest messages went whole


def test_unknown_roles_are_refused():
    with pytest.raises(chat.ChatTemplateError, match="role 'wizard'"):
        chat.render(CHATML, [{"role": "wizard", "content": "x"}])


@pytest.mark.parametrize("nbytes, text", [(0, "0 MB"), (93.1 * 2**20, "93.1 MB"), (2000, "2.0 KB"),
                                          (-2000, "-2.0 KB"), (10, "10 bytes")])
def test_sizes_never_print_as_zero_mb(nbytes, text):
    assert format_size(nbytes) == text


def test_a_zero_budget_is_refused(tmp_path):
    bundle = write_bundle(tmp_path / "b", ids_of("hello") + [EOS], max_context=32)
    assert_one_line_error(edge_run(bundle, "hello", "--backend", "fake", "--budget", "0MB"), "at least 1 byte")


def test_export_progress_is_plain_lines_off_a_terminal(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "export.cli", "tiny:llama", "--quant", "fp32", "--no-eval",
                           "--no-reference", "--kv-dtype", "float32", "--out", str(tmp_path / "b")],
                          cwd=REPO, capture_output=True, text=True, env=cli_env(), timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "export:" not in proc.stderr


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": None}, "temperature must be a number"),
    ({"top_p": "x"}, "top_p must be a number"),
    ({"repetition_penalty": 10**400}, "repetition_penalty is out of range"),
    ({"stop": 1.5}, "stop must be a string, a token id or a sequence"),
])
def test_wrong_types_are_edge_errors(tmp_path, kwargs, message):
    model = make_model(tmp_path, ids_of("the cat sat") + [EOS])
    with pytest.raises(EdgeError, match=message):
        model.generate("the", **kwargs)


def test_undecodable_text_and_bytes_are_edge_errors(tmp_path):
    model = make_model(tmp_path, ids_of("the cat sat") + [EOS])
    for prompt in ("caf\udce9", [{"role": "user", "content": "caf\udce9"}]):
        with pytest.raises(EdgeError, match="not valid Unicode text"):
            model.generate(prompt)
    with pytest.raises(EdgeError, match="not bytes"):
        model.generate(b"the")
    with pytest.raises(EdgeError, match="backend must be a name"):
        edge_runtime.load(tmp_path / "bundle", backend=["fake"])


def test_reference_json_of_the_wrong_shape_is_one_line(copy):
    from edge_runtime.quality.verify import verify

    (copy / "reference.json").write_text(json.dumps({"probe": {"ids": [1, 2], "top_ids": 5}}))
    refit(copy, "reference.json", lambda m: m.setdefault("reference", {"file": "reference.json"}))
    with pytest.raises(BundleError, match="reference.json does not hold reference probes"):
        verify(copy, backend="numpy", threads=1)


def test_ctrl_c_during_an_overwrite_keeps_the_old_bundle_and_leaves_nothing(exported, tmp_path):
    import signal
    import time

    out = tmp_path / "b"
    shutil.copytree(exported, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cmd = [sys.executable, "-m", "export.cli", "tiny:llama", "--quant", "int4", "--out", str(out), "--overwrite",
           "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=interruptible)
    try:
        while proc.poll() is None and not any(".staging-" in p.name for p in tmp_path.iterdir()):
            time.sleep(0.05)  # the new bundle is being written or evaluated next to the old one
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.decode() == "edge-export: interrupted (nothing written)\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
