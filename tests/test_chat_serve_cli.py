"""`edge-run chat` (a scripted conversation: answers, /save and /load, errors that keep the REPL) and
`edge-run serve` (starts on 127.0.0.1, answers a request, refuses bad arguments with one line)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import edge_runtime

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return str(tiny_bundle("tiny:llama", "int4"))


def edge_run(*args, stdin="", timeout=300):
    return subprocess.run([sys.executable, "-m", "edge_runtime.cli", *args], input=stdin, capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, check=False)


def test_chat_repl_continues_saves_and_loads(bundle, tmp_path):
    saved = tmp_path / "s.session"
    script = f"hello there\n/save {saved}\nwhat now\n/load {saved}\nwhat now\n/load {tmp_path}/nope\n/stats\n"
    p = edge_run("chat", bundle, "--backend", "numpy", "--max-new-tokens", "6", "--system", "be brief",
                 stdin=script)
    assert p.returncode == 0, p.stderr
    answers = p.stdout.splitlines()
    model = edge_runtime.load(bundle, backend="numpy")
    session = model.session(system="be brief")
    first = session.generate("hello there", max_new_tokens=6).text
    second = session.generate("what now", max_new_tokens=6).text
    assert answers == [first, second, second]  # after /load the same turn gets the same answer
    assert re.search(r"prompt \d+ tok \(\d+ cached\)", p.stderr)  # the second turn reused the cache
    assert "saved" in p.stderr and "loaded 2 messages" in p.stderr
    assert "edge-run chat: error: cannot read session file" in p.stderr and "Traceback" not in p.stderr
    assert "[4 messages;" in p.stderr


def test_serve_answers_on_localhost_and_refuses_bad_arguments(bundle):
    p = edge_run("serve", bundle, "--port", "70000")
    assert p.returncode == 2 and p.stderr.strip() == "edge-run: error: --port is out of range: 70000"
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", bundle, "--port", "0",
                             "--backend", "numpy", "--max-tokens", "5"], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stderr.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line).group(1)
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 0}).encode()
        req = urllib.request.Request(url + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            data = json.loads(r.read())
        want = edge_runtime.load(bundle, backend="numpy").generate([{"role": "user", "content": "hi"}],
                                                                   max_new_tokens=5)
        assert data["choices"][0]["message"]["content"] == want.text
        assert data["usage"]["completion_tokens"] == len(want.token_ids)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
