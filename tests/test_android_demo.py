"""The phone chat demo (android_demo/): scripted conversations on a tiny bundle with both backends, the
commands, Ctrl-C, context trimming, profile refusal, and the Termux set-up script (with stub pkg/pip)."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from android_demo import chat, profiles
from edge_runtime import backends
from edge_runtime.errors import EdgeError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--greedy", "--threads", "1", "--print-ids", "--no-verify"]


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> str:
    return str(tiny_bundle("tiny:llama", "int4"))


def converse(bundle: str, script: str, *args: str, out: io.StringIO | None = None) -> tuple[int, str, str]:
    """Run the app in-process on a scripted stdin; (exit code, stdout, stderr)."""
    out, info = out or io.StringIO(), io.StringIO()
    code = chat.main([bundle, *FAST, *args], stdin=io.StringIO(script), out=out, info=info)
    return code, out.getvalue(), info.getvalue()


def answers(stdout: str) -> list[list[int]]:
    return [[int(t) for t in line.split()[1:]] for line in stdout.splitlines() if line.startswith("ids:")]


def prompt_sizes(stderr: str) -> list[int]:
    return [int(n) for n in re.findall(r"prompt (\d+) tok \(\d+ cached\) at", stderr)]


def cached_sizes(stderr: str) -> list[int]:
    return [int(n) for n in re.findall(r"prompt \d+ tok \((\d+) cached\) at", stderr)]


@pytest.mark.parametrize("backend", ["numpy", "ort"])
def test_multi_turn_keeps_history_and_reset_forgets_it(bundle, backend):
    script = "Hello there\nWhat is a loop?\n/reset\nHello there\n/quit\nnever read\n"
    code, out, err = converse(bundle, script, "--backend", backend, "--max-new-tokens", "6")
    assert code == 0
    ids = answers(out)
    assert len(ids) == 3 and all(len(a) == 6 for a in ids)
    first, second, after_reset = prompt_sizes(err)
    assert second > first + 6  # the first exchange is part of the second prompt
    assert cached_sizes(err)[:2] == [0, first]  # the session's cache: only the new turn is prefilled
    assert after_reset == first and ids[2] == ids[0]  # /reset: the same question gets the same greedy answer
    assert out.count("you> ") == 5 and "never read" not in out  # echoed lines up to /quit
    assert f"backend {backend}" in err
    assert re.search(r"\[6 tok \(length\), [\d.]+ tok/s \| prompt \d+ tok \(\d+ cached\) at \d+ tok/s \| "
                     r"peak \d+ MB of 1024 MB budget \(\d+%\)\]", err)


def test_stats_and_budget_commands(bundle):
    code, _, err = converse(bundle, "Hello there\nWhat is a loop?\n/stats\n/budget\n/nonsense\n",
                              "--backend", "numpy", "--max-new-tokens", "4")
    assert code == 0
    assert "[session: 2 answers (0 interrupted), 8 tokens" in err
    assert "history 4 messages" in err and "of 512 context tokens" in err
    assert "[last answer: prompt" in err
    assert "profile phone-3gb: budget 1024 MB, context 2048" in err
    assert "(profile wants 2048, bundle allows 512)" in err  # the tiny bundle caps the context
    for row in ("runtime", "weights", "kv_cache", "activations", "peak"):
        assert re.search(rf"^  {row}\s+[\d.]+ MB", err, re.MULTILINE)
    assert "measured peak RSS so far" in err
    assert "unknown command /nonsense" in err


def test_pure_python_tokenizer_gives_the_same_conversation(bundle, monkeypatch):
    """The x86 half of the arm64 check: what Termux runs (NumPy + pure-Python BPE) matches `tokenizers`."""
    script = "Hello! Who are you?\nExplain the try statement in one sentence.\n"
    _, reference, _ = converse(bundle, script, "--backend", "numpy", "--max-new-tokens", "12")
    monkeypatch.setenv("EDGE_RUNTIME_TOKENIZER", "python")
    _, termux, err = converse(bundle, script, "--backend", "numpy", "--max-new-tokens", "12")
    assert "tokenizer python" in err
    assert termux == reference


class InterruptedOut(io.StringIO):
    """stdout on which Ctrl-C arrives while the second piece of the first answer is being written."""

    def __init__(self):
        super().__init__()
        self.pieces, self.fired = 0, False

    def write(self, s: str) -> int:
        if not self.fired and s and not s.startswith(("you> ", "bot> ", "ids:", "\n")):
            self.pieces += 1
            if self.pieces == 2:
                self.fired = True
                raise KeyboardInterrupt
        return super().write(s)


def test_ctrl_c_stops_the_answer_and_keeps_the_app(bundle):
    out = InterruptedOut()
    code, text, err = converse(bundle, "hi\n/stats\nhi\n", "--backend", "numpy", "--max-new-tokens", "40",
                               out=out)
    assert code == 0 and out.fired
    interrupted, full = answers(text)
    assert len(interrupted) < 40 and len(full) == 40  # the stream was closed early; the app went on
    assert re.search(r"\[\d+ tok \(interrupted\)", err)
    assert "1 answers (1 interrupted)" in err
    first, second = prompt_sizes(err)
    assert second > first  # the partial answer stayed in the conversation


def test_long_conversation_forgets_the_oldest_exchanges(bundle):
    script = "".join(f"Tell me about statement number {i}.\n" for i in range(5))
    code, out, err = converse(bundle, script, "--backend", "numpy", "--context", "96", "--max-new-tokens", "8")
    assert code == 0
    assert len(answers(out)) == 5
    assert "oldest exchange(s) to fit the context of 96" in err
    assert max(prompt_sizes(err)) + 8 - 1 <= 96


def test_a_message_longer_than_the_context_is_refused_not_kept(bundle):
    script = "word " * 200 + "\nHello there\n/stats\n"
    code, out, err = converse(bundle, script, "--backend", "numpy", "--context", "64", "--max-new-tokens", "4")
    assert code == 0
    assert "needs more than the context of 64" in err
    assert len(answers(out)) == 1 and "history 2 messages" in err


def test_too_small_profile_is_refused_with_the_breakdown(bundle):
    """Through the script entry point, as a user runs it: one message with the planner's table, exit 2."""
    cmd = [sys.executable, str(ROOT / "android_demo/chat.py"), bundle, "--profile", "watch-2gb",
           "--budget", "24MB", "--backend", "numpy"]
    p = subprocess.run(cmd, input="hello\n", capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2
    assert p.stdout == ""  # nothing was said
    assert p.stderr.startswith(f"chat: {bundle} does not fit device profile watch-2gb: memory plan ")
    assert "exceeds the budget of 24.0 MB" in p.stderr and "no context fits" in p.stderr
    for row in ("runtime", "tokenizer", "weights", "kv_cache", "activations", "peak"):
        assert re.search(rf"^  {row}\s+[\d.]+ MB", p.stderr, re.MULTILINE)
    assert "Traceback" not in p.stderr


def test_profile_context_falls_back_to_the_largest_that_fits(bundle):
    """A budget too small for the profile's context but big enough for a smaller one: the planner's choice."""
    from edge_runtime.format.bundle import Bundle
    from edge_runtime.memory import budget

    b = Bundle.open(bundle, verify=False)
    tight = budget.plan_session(b, 256, backend="numpy", kv_dtype="float16",
                                prefill_chunk=budget.PREFILL_CHUNKS[-1]).total
    model = chat.load_model(bundle, profiles.get_profile("phone-3gb"), "numpy", 1, budget=tight, verify=False)
    assert 16 <= model.context < 512


def test_bad_arguments_are_one_line_errors(bundle, tmp_path):
    code, _, err = converse(str(tmp_path / "missing"), "hi\n")
    assert code == 2 and err.startswith("chat: error: bundle not found")
    code, _, err = converse(bundle, "hi\n", "--top-p", "0")
    assert code == 2 and "top_p must be in (0, 1]" in err


def test_profiles_and_backend_choice(monkeypatch):
    assert profiles.get_profile("phone-3gb").budget == 1024 * 2**20
    with pytest.raises(EdgeError, match="unknown device profile 'tablet'.*phone-3gb"):
        profiles.get_profile("tablet")
    # the demo passes --backend to the runtime, whose one resolver picks NumPy where onnxruntime is missing
    assert backends.resolve("numpy", "edge-llama-v1") == "numpy"
    assert backends.resolve("auto", "edge-llama-v1") == "ort"  # onnxruntime is installed here
    monkeypatch.setattr(backends, "has_onnxruntime", lambda: False)  # as on Termux: no wheel
    assert backends.resolve("auto", "edge-llama-v1") == "numpy"


def test_setup_termux_runs_the_documented_steps(tmp_path, bundle):
    """setup_termux.sh with stand-ins for pkg and python that log their arguments."""
    log = tmp_path / "log"
    stub = tmp_path / "stub"
    stub.write_text('#!/usr/bin/env bash\necho "$*" >> "$STUB_LOG"\n')
    stub.chmod(0o755)
    env = dict(os.environ, STUB_LOG=str(log), PKG=str(stub), PYTHON=str(stub), BUNDLES=str(tmp_path / "bundles"))
    p = subprocess.run(["bash", str(ROOT / "android_demo/setup_termux.sh"), bundle], env=env,
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    steps = log.read_text().splitlines()
    assert steps[:3] == ["install -y python python-pip python-numpy", "-m pip install --no-deps .",
                         "-m pip install jinja2 markupsafe"]
    assert steps[3].startswith("-c import edge_runtime, numpy, jinja2")
    assert (tmp_path / "bundles" / Path(bundle).name / "manifest.json").is_file()


def test_shell_scripts_parse():
    for script in ("arm64_check.sh", "setup_termux.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "android_demo" / script)], check=True)
