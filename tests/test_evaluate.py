"""Held-out evaluation at export: windows, aggregated figures, the manifest's `fidelity`, the --max-kld gate."""
from __future__ import annotations

import functools
import json
import operator

import numpy as np
import pytest

from edge_runtime.quality.fidelity import compare_logits
from export.cli import main as edge_export
from export.quality import evaluate as E

EVAL_TEXT = "Names are bound by assignment; a while loop repeats its body while the test is true. " * 12


def test_evaluation_domains_share_no_text_with_the_calibration_source():
    from export.quality import eval_domains as D

    cal = D.calibration_text()
    cal_lines = {line.strip() for line in cal.splitlines() if len(line.strip()) >= 40}
    assert len(cal_lines) > 1000 and D.CALIBRATION_SOURCE not in " ".join(d.source for d in D.DOMAINS)
    assert len(D.DOMAINS) >= 3 and len({d.name for d in D.DOMAINS}) == len(D.DOMAINS)
    for d in D.TEXT_DOMAINS:
        text = d.text()
        lines = {line.strip() for line in text.splitlines() if len(line.strip()) >= 40}
        assert len(text) > 50_000 and len(lines) > 500, d.name  # enough for 6 windows of 256 tokens
        assert not lines & cal_lines, d.name
        assert text[:4000] not in cal and cal[:4000] not in text
    assert not any(prompt in cal for prompt in D.CHAT_PROMPTS)


def test_chat_windows_are_prompt_then_the_float_reply_and_only_the_reply_is_scored():
    from export.quality import eval_domains as D

    windows = D.chat_windows(lambda text: [1, 2, len(text)], lambda ids, n: [[7] * n for _ in ids], reply_tokens=4,
                             prompts=("ab", "abc"))
    assert windows == [[1, 2, 2, 7, 7, 7, 7], [1, 2, 3, 7, 7, 7, 7]]
    rng = np.random.default_rng(1)
    p = {tuple(w): rng.normal(size=(len(w), 9)).astype(np.float32) for w in windows}
    q = {k: (v + rng.normal(scale=0.5, size=v.shape)).astype(np.float32) for k, v in p.items()}
    skipped = E.heldout_report(lambda ids: p[tuple(ids)], lambda ids: q[tuple(ids)], windows, skip=(2, 2))
    tails = [w[2:] for w in windows]
    p2 = {tuple(w[2:]): p[tuple(w)][2:] for w in windows}
    q2 = {tuple(w[2:]): q[tuple(w)][2:] for w in windows}
    direct = E.heldout_report(lambda ids: p2[tuple(ids)], lambda ids: q2[tuple(ids)], tails)
    assert skipped.positions == direct.positions == 8
    assert skipped.kl == pytest.approx(direct.kl, rel=1e-12) and skipped.top1 == direct.top1


def test_windows_are_spread_disjoint_from_calibration_and_cover_short_texts():
    ids = list(range(10_000))
    ev = E.token_windows(ids, 6, 256)
    cal = E.calibration_windows(ids, 2)
    assert [len(w) for w in ev] == [256] * 6 and ev[0][0] == 0 and ev[-1][0] > 8000
    flat = lambda windows: set(functools.reduce(operator.iadd, windows, []))  # noqa: E731
    assert len(cal) == 2 and not flat(ev) & flat(cal)
    many = E.calibration_windows(list(range(40_000)), 24)           # a grid 4 times as fine: still between
    assert len(many) == 24 and len(flat(many)) == 24 * 256
    assert not flat(E.token_windows(list(range(40_000)), 6, 256)) & flat(many)
    short = E.token_windows(list(range(600)), 6, 256)
    assert [len(w) for w in short] == [256, 256, 88]
    with pytest.raises(Exception, match="too short"):
        E.token_windows([1], 6, 256)


def test_windows_start_with_bos_when_the_tokenizer_adds_one():
    ids = [2] + list(range(10, 10_010))                      # the text's own BOS at 0
    plain, with_bos = E.token_windows(ids, 6, 256), E.token_windows(ids, 6, 256, bos=2)
    assert with_bos[0] == plain[0]                           # already starts with it
    for w, b in zip(plain[1:], with_bos[1:]):
        assert len(b) == 256 and b[0] == 2 and b[1:] == w[:-1]
    assert all(w[0] == 2 for w in E.calibration_windows(ids, 2, bos=2))

    class Tok:
        bos_token_id, add_bos_token = 2, True
    assert E.window_bos(Tok) == 2
    Tok.add_bos_token = False
    assert E.window_bos(Tok) is None


def test_heldout_report_equals_the_pooled_comparison():
    rng = np.random.default_rng(0)
    windows = [list(rng.integers(0, 50, n)) for n in (9, 17, 5)]
    p = {tuple(w): rng.normal(size=(len(w), 50)).astype(np.float32) for w in windows}
    q = {k: (v + rng.normal(scale=0.3, size=v.shape)).astype(np.float32) for k, v in p.items()}
    r = E.heldout_report(lambda ids: p[tuple(ids)], lambda ids: q[tuple(ids)], windows)
    pooled = compare_logits(np.concatenate([p[tuple(w)][:-1] for w in windows]),
                            np.concatenate([q[tuple(w)][:-1] for w in windows]),
                            functools.reduce(operator.iadd, (w[1:] for w in windows), []))
    assert r.positions == pooled.positions == 28
    for f in ("kl", "top1", "rms_top_prob_diff", "ppl_float", "ppl_quant", "ppl_ratio"):
        assert getattr(r, f) == pytest.approx(getattr(pooled, f), rel=1e-9), f
    same = E.heldout_report(lambda ids: p[tuple(ids)], lambda ids: p[tuple(ids)], windows)
    assert same.kl == pytest.approx(0.0, abs=1e-12) and same.top1 == 1.0 and same.ppl_ratio == pytest.approx(1.0)


def test_pooled_figures_equal_one_report_over_all_windows():
    rng = np.random.default_rng(2)
    windows = [list(rng.integers(0, 40, n)) for n in (12, 7, 20, 9)]
    p = {tuple(w): rng.normal(size=(len(w), 40)).astype(np.float32) for w in windows}
    q = {k: (v + rng.normal(scale=0.4, size=v.shape)).astype(np.float32) for k, v in p.items()}
    fp, fq = (lambda ids: p[tuple(ids)]), (lambda ids: q[tuple(ids)])
    whole = E.heldout_report(fp, fq, windows, skip=(0, 3, 0, 2))
    parts = E.pooled([E.heldout_report(fp, fq, windows[:2], skip=(0, 3)),
                      E.heldout_report(fp, fq, windows[2:], skip=(0, 2))])
    assert parts.positions == whole.positions == 11 + 3 + 19 + 6
    for f in ("kl", "top1", "rms_top_prob_diff", "ppl_float", "ppl_quant", "ppl_ratio"):
        assert getattr(parts, f) == pytest.approx(getattr(whole, f), rel=1e-9), f


def test_cached_float_logits_run_once_per_window():
    calls = []
    f = E.cached(lambda ids: calls.append(ids) or np.zeros((len(ids), 3)))
    f([1, 2]), f([1, 2]), f([2, 1])
    assert calls == [(1, 2), (2, 1)]


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("evaltext") / "heldout.txt"
    path.write_text(EVAL_TEXT)
    return path


def export(out, eval_file, *extra):
    return edge_export(["tiny:llama", "--out", str(out), "--threads", "1", "--quiet", "--max-context", "256",
                        "--eval-text", str(eval_file), *map(str, extra)])


def test_export_records_fidelity_and_the_gate_refuses_a_far_bundle(tmp_path, eval_file, capsys):
    out = tmp_path / "b"
    assert export(out, eval_file, "--quant", "int4") == 0
    assert "fidelity vs float on" in capsys.readouterr().out
    fid = json.loads((out / "manifest.json").read_text())["fidelity"]
    h = fid["heldout"]
    assert h["text"] == "heldout.txt" and h["kl_method"] == "full" and h["positions"] > 100
    assert list(fid["domains"]) == ["heldout.txt"] and fid["domains"]["heldout.txt"]["kl"] == h["kl"]
    assert 0 < h["kl"] < 1 and 0 < h["top1"] <= 1 and h["ppl_ratio"] > 0
    assert fid["probe"]["greedy_prefix"] is not None and fid["backend"] == "ort"

    # Too far from float: nothing written, one line naming the figure, exit != 0; the old bundle stays.
    before = (out / "manifest.json").read_bytes()
    assert export(out, eval_file, "--quant", "int4", "--max-kld", "1e-6", "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-export: error: the bundle is further from float than --max-kld 1e-06: KLD ")
    assert err.count("\n") == 1
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging folder left behind
    fresh = tmp_path / "c"
    assert export(fresh, eval_file, "--quant", "int4", "--max-kld", "1e-6") == 2 and not fresh.exists()

    # --force writes it anyway; a generous limit passes.
    assert export(fresh, eval_file, "--quant", "int4", "--max-kld", "1e-6", "--force") == 0
    assert export(tmp_path / "d", eval_file, "--quant", "int8", "--max-kld", "0.5") == 0


def test_bad_max_kld_and_unreadable_eval_text_are_one_line_errors(tmp_path, capsys):
    assert edge_export(["tiny:llama", "--out", str(tmp_path / "x"), "--max-kld", "0"]) == 2
    assert edge_export(["tiny:llama", "--out", str(tmp_path / "x"), "--quiet", "--threads", "1",
                        "--eval-text", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "--max-kld must be positive" in err[0] and "cannot read --eval-text" in err[1]


def test_default_evaluation_reports_every_domain_and_gates_on_the_worst(tmp_path, capsys):
    from export.pipeline import ExportOptions, export_bundle
    from export.quality import eval_domains as D

    out = export_bundle("tiny:llama", tmp_path / "b", ExportOptions(threads=1, progress=False, max_context=512,
                                                                    reference=False))
    fid = json.loads((out / "manifest.json").read_text())["fidelity"]
    assert list(fid["domains"]) == [d.name for d in D.DOMAINS]
    pooled = sum(d["kl"] * d["positions"] for d in fid["domains"].values()) / fid["heldout"]["positions"]
    assert fid["heldout"]["kl"] == pytest.approx(pooled, rel=1e-9)
    assert 0 < fid["domains"]["chat"]["positions"] <= len(D.CHAT_PROMPTS) * D.CHAT_REPLY_TOKENS
    worst = max(d["kl"] for d in fid["domains"].values())
    gate = (worst + min(d["kl"] for d in fid["domains"].values())) / 2
    assert edge_export(["tiny:llama", "--out", str(tmp_path / "c"), "--quiet", "--threads", "1", "--no-reference",
                        "--max-context", "512", "--max-kld", f"{gate:.6g}"]) == 2
    assert "held-out tokens of " in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert not (tmp_path / "x").exists()


def test_batched_float_greedy_equals_one_prompt_at_a_time():
    from export.quality.reference import FloatReference
    from export.sources import load_source

    ref = FloatReference(load_source("tiny:llama"), threads=1)
    prompts = [[1, 5, 9, 14, 3], [7, 2], [11, 4, 4]]
    batch = ref.greedy_batch(prompts, 12)
    assert batch == [ref.greedy(p, 12) for p in prompts] and all(len(r) == 12 for r in batch)
    stop = batch[0][3]
    cut = ref.greedy_batch(prompts[:1], 12, eos_ids=(stop,))
    assert cut == [batch[0][:batch[0].index(stop) + 1]]
