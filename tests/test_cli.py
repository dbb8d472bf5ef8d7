"""`edge-run` in a subprocess: streamed answer + stats line, and one-line errors with exit code 2.

The bundles are tiny hand-written ones run by test_runtime.FakeBackend, which the CLI finds through the hidden
EDGE_RUNTIME_EXTRA_BACKENDS hook; end-to-end runs on exported bundles are covered elsewhere.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_runtime import EOS, FAKE_HOOK, ids_of, tiny_tokenizer, write_bundle

from edge_runtime.backends import EXTRA_BACKENDS_ENV
from edge_runtime.cli import split_command

REPO = Path(__file__).resolve().parents[1]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    env[EXTRA_BACKENDS_ENV] = FAKE_HOOK
    env["OMP_NUM_THREADS"] = "1"
    return env


def interruptible():
    """preexec_fn of a child that must see Ctrl-C: a job started in the background (`make test &`) inherits SIGINT
    ignored, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def edge_run(*args, stdin: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "edge_runtime.cli", *map(str, args)]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=cli_env(), timeout=60,
                          check=False)


@pytest.fixture
def bundle(tmp_path) -> Path:
    """Prompt "hello" (raw) continues with " world, hello there" and EOS."""
    script = ids_of("hello") + ids_of(" world, hello there") + [EOS]
    return write_bundle(tmp_path / "b", script, max_context=32)


def assert_one_line_error(proc, message: str):
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("edge-run: error: ") and message in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_streams_answer_then_stats_line(bundle):
    proc = edge_run(bundle, "hello", "--raw", "--backend", "fake", "--threads", "1", "--max-new-tokens", "20")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == " world, hello there\n"
    assert proc.stderr.startswith(f"prompt {len(ids_of('hello'))} tok, prefill ")
    assert "decode " in proc.stderr and "tok/s" in proc.stderr and "peak RSS" in proc.stderr


def test_run_subcommand_stdin_stop_and_sampling_flags(bundle):
    proc = edge_run("run", bundle, "--raw", "--backend", "fake", "--stop", ", h", "xyz", "--no-stats",
                    "--max-new-tokens", "20", "--temperature", "0.5", "--top-k", "5", "--top-p", "0.9",
                    "--seed", "1", stdin="hello")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, " world\n", "")
    assert split_command(["verify", "b"]) == ("verify", ["b"])
    assert split_command(["mybundle", "hi"]) == ("run", ["mybundle", "hi"])  # no subcommand: run
    assert split_command(["run", "b"]) == ("run", ["b"])
    assert split_command(["--debug", "verify", "b"]) == ("verify", ["b", "--debug"])
    assert split_command(["./verify", "hi"]) == ("run", ["./verify", "hi"])


def test_chat_mode_is_the_default_with_a_template(bundle):
    rendered = tiny_tokenizer().encode(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert len(rendered) > 32
    # The ChatML prompt does not fit the 32-token context: truncate keeps its last 32 - 3 tokens.
    proc = edge_run(bundle, "hello", "--backend", "fake", "--max-new-tokens", "3", "--overflow", "truncate")
    assert proc.returncode == 0 and proc.stderr.startswith("prompt 29 tok"), proc.stderr
    proc = edge_run(bundle, "hello", "--backend", "fake", "--max-new-tokens", "3")
    assert_one_line_error(proc, f"prompt of {len(rendered)} tokens + 3 new tokens")


def test_missing_bundle(tmp_path):
    assert_one_line_error(edge_run(tmp_path / "nothing", "hi"), "bundle not found")


def test_tampered_file_fails_the_checksum(bundle):
    weights = bundle / "weights.bin"
    weights.write_bytes(b"\x07" + weights.read_bytes()[1:])
    assert_one_line_error(edge_run(bundle, "hello", "--backend", "fake"), "checksum mismatch for weights.bin")


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--min-p", "1"], "min_p must be in [0, 1)"),
    (["--max-new-tokens", "-5"], "max_new_tokens must be an integer >= 0"),
    (["--repetition-penalty", "0"], "repetition_penalty must be"),
    (["--threads", "0"], "threads must be a positive integer, got 0"),
    (["--budget", "lots"], "cannot read size 'lots'"),
])
def test_bad_arguments(bundle, flags, message):
    assert_one_line_error(edge_run(bundle, "hello", "--backend", "fake", *flags), message)


def test_prompt_too_long(bundle):
    proc = edge_run(bundle, "a b c d e f g h i j k l m n o p " * 3, "--raw", "--backend", "fake",
                    "--max-new-tokens", "4")
    assert_one_line_error(proc, "new tokens needs a context of")
    assert "the model has 32" in proc.stderr


def test_argparse_errors_use_the_same_format(bundle):
    proc = edge_run(bundle, "hello", "--backend", "tpu")
    assert proc.returncode == 2 and "edge-run: error: argument --backend" in proc.stderr


def test_ctrl_c_exits_130_quietly(tmp_path):
    slow = write_bundle(tmp_path / "slow", list(range(40, 70)), max_context=256, delay_s=0.2)
    cmd = [sys.executable, "-m", "edge_runtime.cli", str(slow), "a", "--raw", "--backend", "fake",
           "--max-new-tokens", "200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
                            preexec_fn=interruptible)
    try:
        assert proc.stdout.read(1)  # generation has started
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err == b""


def test_a_bundle_folder_named_like_a_command_runs(tmp_path):
    write_bundle(tmp_path / "verify", ids_of("hello") + ids_of(" world") + [EOS], max_context=32)
    cmd = [sys.executable, "-m", "edge_runtime.cli"]
    flags = ["hello", "--raw", "--backend", "fake", "--no-stats", "--max-new-tokens", "5"]
    for argv in (["run", "verify"], ["./verify"]):
        proc = subprocess.run(cmd + argv + flags, cwd=tmp_path,
                              capture_output=True, text=True, env=cli_env(), timeout=60, check=False)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, " world\n", ""), argv


def configure(p):
    """A subcommand registered by a test (see test_a_new_subcommand_is_one_line_and_one_module)."""
    p.add_argument("what", choices=("edge", "internal"))


def run(args) -> int:
    from edge_runtime.errors import EdgeError

    if args.what == "edge":
        raise EdgeError("bad input\nsecond line")
    raise RuntimeError("boom")


def test_a_new_subcommand_is_one_line_and_one_module(capsys, monkeypatch):
    from edge_runtime import cli

    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))
    cli.add_subcommand("probe", "a test subcommand", "test_cli")
    assert cli.main(["probe", "edge"]) == 2
    assert capsys.readouterr().err == "edge-run: error: bad input; second line\n"
    assert cli.main(["probe", "internal"]) == 1
    assert capsys.readouterr().err == ("edge-run: error: internal error (RuntimeError: boom); rerun with --debug "
                                       "for the traceback\n")
    assert cli.main(["probe", "internal", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("edge-run: error: internal error (RuntimeError: boom); rerun with "
                                               "--debug for the traceback\n")
    assert cli.main(["-h"]) == 0 and "probe" in capsys.readouterr().out


def test_edge_export_errors_take_the_same_path(capsys, tmp_path):
    from export.cli import main as edge_export

    assert edge_export(["tiny:llama", "--out", str(tmp_path / "b"), "--quant", "int3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-export: error: argument --quant: invalid choice") and err.count("\n") == 1
    assert edge_export(["tiny:llama", "--out", str(tmp_path / "b"), "--threads", "0"]) == 2
    assert capsys.readouterr().err == "edge-export: error: --threads must be a positive integer, got 0\n"
