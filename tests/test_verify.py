"""`edge-run verify`: a fresh bundle passes, an altered weights file (checksum fixed up) fails naming the metric."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edge_runtime.cli import main as edge_run
from edge_runtime.format.bundle import Bundle, sha256_file, write_manifest
from edge_runtime.quality import verify as V
from edge_runtime.quality.fidelity import FidelityReport

EVAL_TEXT = "The quick brown fox jumps over the lazy dog while the assignment statement binds names. " * 12


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny int4 bundle with reference probes and export fidelity (short held-out text for speed)."""
    from export.pipeline import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("verify")
    text = root / "eval.txt"
    text.write_text(EVAL_TEXT)
    return export_bundle("tiny:llama", root / "b", ExportOptions(quant="int4", threads=1, progress=False,
                                                                 eval_text=str(text), max_context=256))


def corrupt_copy(src, dst, tensor: str):
    """Copy of the bundle with every byte of one tensor inverted and weights.bin's checksum fixed up."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "manifest.json").read_text())
    t = meta["weights"]["tensors"][tensor]
    with open(dst / "weights.bin", "r+b") as f:
        f.seek(t["offset"])
        data = np.frombuffer(f.read(t["nbytes"]), np.uint8)
        f.seek(t["offset"])
        f.write((data ^ 0xFF).tobytes())
    meta["files"]["weights.bin"]["sha256"] = sha256_file(dst / "weights.bin")
    write_manifest(dst, meta)
    return dst


def test_fresh_bundle_passes_on_both_backends(bundle, capsys):
    for backend in ("ort", "numpy"):
        res = V.verify(bundle, backend=backend, threads=1)
        assert res.ok, [c.line() for c in res.checks]
        assert {c.metric for c in res.checks} == {"kl", "top1", "ppl_ratio", "greedy_prefix"}
    assert edge_run(["verify", str(bundle), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "verify: PASS" in out and "kl" in out and "top1" in out


def test_same_backend_reproduces_the_export_baseline(bundle):
    """ORT at export and ORT here run the same kernels: the figures match the manifest's to rounding."""
    res = V.verify(bundle, backend="ort", threads=1)
    assert res.report.kl == pytest.approx(res.baseline.kl, rel=1e-3, abs=1e-6)
    assert res.report.greedy_prefix == res.baseline.greedy_prefix


def test_altered_weights_fail_and_name_the_metric(bundle, tmp_path, capsys):
    bad = corrupt_copy(bundle, tmp_path / "bad", "model.layers.1.mlp.down_proj.weight.qweight")
    Bundle.open(bad)  # the checksum was fixed up: only the figures can tell
    assert edge_run(["verify", str(bad), "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("verify: FAIL: ") and "kl" in err


def test_altered_weights_without_checksum_fix_fail_on_checksum(bundle, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    with open(bad / "weights.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02")
    assert edge_run(["verify", str(bad), "--threads", "1"]) == 2
    assert "checksum mismatch for weights.bin" in capsys.readouterr().err


def test_bundle_without_reference_is_a_one_line_error(bundle, tmp_path, capsys):
    nore = tmp_path / "noref"
    shutil.copytree(bundle, nore)
    meta = json.loads((nore / "manifest.json").read_text())
    del meta["reference"]
    write_manifest(nore, meta)
    assert edge_run(["verify", str(nore), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "no reference probes" in err and err.count("\n") == 1


def report(kl=0.01, top1=0.95, ppl_ratio=1.01, prefix=(10, 20, 30)):
    return FidelityReport(positions=100, kl=kl, kl_method="top20+rest", top1=top1, rms_top_prob_diff=0.01,
                          ppl_ratio=ppl_ratio, greedy_prefix=list(prefix), greedy_tokens=[32, 32, 32])


def test_checks_apply_the_stated_tolerances():
    base = report()
    assert all(c.ok for c in V.checks_against(report(kl=0.015 + 0.01 - 1e-9), base))
    failed = {c.metric for c in V.checks_against(report(kl=0.03, top1=0.89, ppl_ratio=1.1, prefix=(0, 5, 24)), base)
              if not c.ok}
    assert failed == {"kl", "top1", "ppl_ratio", "greedy_prefix"}
    # no baseline: absolute limits, and no greedy check (nothing to compare with)
    checks = V.checks_against(report(kl=0.6), None)
    assert [c.metric for c in checks if not c.ok] == ["kl"] and "greedy_prefix" not in {c.metric for c in checks}


class ScriptedBackend:
    """Logits that put all mass on a fixed next token, to test the probe runner without a model."""

    def __init__(self, vocab: int, nxt):
        self.vocab, self.nxt, self.calls = vocab, nxt, []

    def forward(self, ids, past_len, logits_index):
        self.calls.append((list(ids), past_len, list(logits_index)))
        out = np.full((len(logits_index), self.vocab), -20.0, np.float32)
        for r, i in enumerate(logits_index):
            out[r, self.nxt(int(ids[i]))] = 10.0
        return out


def test_greedy_ids_feeds_back_argmax_and_stops_at_n():
    be = ScriptedBackend(8, lambda t: (t + 1) % 8)
    assert V.greedy_ids(be, [3, 4], 5) == [5, 6, 7, 0, 1]
    assert [c[1] for c in be.calls] == [0, 2, 3, 4, 5]  # prefill, then one cached step per token but the last


def test_probe_report_of_a_perfect_model_matches_its_reference():
    vocab = 8
    ids = [1, 2, 3, 4, 5]
    logits = np.full((len(ids), vocab), -20.0)
    logits[np.arange(len(ids)), [(t + 1) % vocab for t in ids]] = 10.0
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    order = np.argsort(-logp, -1)[:, :4]
    reference = {"probe": {"ids": ids, "k": 4, "top_ids": order.tolist(),
                           "top_logprobs": np.take_along_axis(logp, order, -1).tolist(),
                           "target_logprobs": logp[np.arange(4), ids[1:]].tolist()},
                 "prompts": [{"ids": [2], "greedy_ids": [3, 4, 5]}]}
    be = ScriptedBackend(vocab, lambda t: (t + 1) % vocab)
    r = V.probe_report(be, reference)
    assert r.positions == 4 and r.top1 == 1.0 and r.kl < 1e-6
    assert r.greedy_prefix == [3] and r.greedy_tokens == [3]
    assert V.probe_context(reference) == 5


@pytest.mark.parametrize("quant", ["fp32", "int8", "auto"])
def test_fresh_bundle_of_each_preset_passes(tmp_path, quant):
    """int4 is the module's bundle above; the other presets' fresh bundles pass on both backends too."""
    from export.pipeline import ExportOptions, export_bundle

    text = tmp_path / "eval.txt"
    text.write_text(EVAL_TEXT)
    out = export_bundle("tiny:llama", tmp_path / "b", ExportOptions(quant=quant, threads=1, progress=False,
                                                                   eval_text=str(text), max_context=256))
    for backend in ("ort", "numpy"):
        res = V.verify(out, backend=backend, threads=1)
        assert res.ok, (backend, [c.line() for c in res.checks])


def test_forced_choices_give_the_greedy_run_and_stop_agreeing_where_a_token_differs(bundle):
    """One prefill fed a greedy run's tokens chooses those very tokens; fed a run whose token k was changed, its
    first k + 1 choices (made before it sees token k) are still the greedy run's."""
    from edge_runtime.backends.numpy.backend import NumpyBackend

    backend = NumpyBackend(Bundle.open(bundle), 64, threads=1, float_activations=True)
    prompt = [1, 17, 42, 99, 7]
    greedy = V.greedy_ids(backend, prompt, 12)
    assert V.forced_choices(backend, prompt, greedy) == greedy
    changed = greedy[:5] + [(greedy[5] + 1) % 100] + greedy[6:]
    assert V.forced_choices(backend, prompt, changed)[:6] == greedy[:6]
