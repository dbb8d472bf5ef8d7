"""`edge-run cross-check`: the NumPy backend and ONNX Runtime on a bundle's exact graph (float32 activations,
same weights), which every quantized bundle now carries; the SmolLM2 figures are in test_numpy_backend.py."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from edge_runtime.cli import main as edge_run
from edge_runtime.format.bundle import Bundle, sha256_file, write_manifest
from edge_runtime.quality import cross_check as P


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(quant, *args) -> a tiny Llama bundle (max_context 256), made once per module."""
    from export.pipeline import ExportOptions, export_bundle

    root, made = tmp_path_factory.mktemp("parity"), {}

    def get(quant: str, accuracy_level: int = 4):
        key = (quant, accuracy_level)
        if key not in made:
            made[key] = export_bundle("tiny:llama", root / f"{quant}-{accuracy_level}", ExportOptions(
                quant=quant, accuracy_level=accuracy_level, threads=1, progress=False, evaluate=False,
                max_context=256))
        return made[key]

    return get


@pytest.mark.parametrize("quant", ["int4", "int8", "auto"])
def test_quantized_bundle_carries_an_exact_graph_on_the_same_weights(exported, quant):
    path = exported(quant)
    bundle = Bundle.open(path, verify=True)  # the new file is covered by the checksums
    entry = bundle.manifest["graph"]["exact_graph"]
    assert entry == {"file": "model.exact.onnx", "accuracy_level": 0, "kv_dtype": "float32"}
    assert bundle.exact_graph_file() == "model.exact.onnx"
    default, exact = (onnx.load(str(path / f), load_external_data=False)
                      for f in ("model.onnx", "model.exact.onnx"))
    levels = {a.i for n in exact.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {0}
    # Every initializer the exact graph reads is the default graph's bytes in weights.bin.
    where = {t.name: {e.key: e.value for e in t.external_data} for t in default.graph.initializer}
    for t in exact.graph.initializer:
        if t.external_data:
            assert {e.key: e.value for e in t.external_data} == where[t.name], t.name


@pytest.mark.parametrize("quant", ["int4", "int8", "auto"])
def test_cross_check_passes_on_a_fresh_bundle(exported, quant):
    res = P.cross_check(exported(quant), threads=1)
    assert res.ok, res.lines()
    assert res.figures["top1"] == 1.0 and res.figures["max_abs_diff"] < 0.1 * res.max_diff_limit
    assert res.greedy_tokens == [P.GREEDY_STEPS] * 3 and res.greedy_prefix == res.greedy_tokens


def test_level0_and_float_bundles_need_no_second_graph(exported):
    for path in (exported("int4", accuracy_level=0), exported("fp32")):
        bundle = Bundle.open(path)
        assert not (path / "model.exact.onnx").exists() and "exact_graph" not in bundle.manifest["graph"]
        assert bundle.exact_graph_file() == "model.onnx"
        assert P.cross_check(path, threads=1).ok


def test_cross_check_fails_when_the_numpy_kernels_are_wrong(exported, monkeypatch):
    """A kernel 1% off on one matrix fails the check, through the logit bound (top-1 and greedy may survive it)."""
    from edge_runtime.backends.numpy import kernels

    real = kernels.QuantMatrix.matmul

    def off(self, x):
        y = real(self, x)
        return y * np.float32(1.01) if self.n == self.k else y  # o_proj: [hidden, hidden]

    monkeypatch.setattr(kernels.QuantMatrix, "matmul", off)
    res = P.cross_check(exported("int4"), threads=1)
    assert not res.ok and res.figures["max_abs_diff"] > res.max_diff_limit


def test_cross_check_cli(exported, capsys):
    assert edge_run(["cross-check", str(exported("int8")), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "exact graph" in out and "32/32 32/32 32/32" in out and "cross-check: PASS" in out
    assert edge_run(["verify", str(exported("int8")), "--cross", "--backend", "numpy"]) == 2
    err = capsys.readouterr().err
    assert "cross-check runs both backends" in err and err.count("\n") == 1


def test_bundle_without_an_exact_graph_is_a_one_line_error(exported, tmp_path, capsys):
    """A quantized bundle written before the exact graph existed: ORT cannot be asked for float activations."""
    old = tmp_path / "old"
    shutil.copytree(exported("int4"), old)
    (old / "model.exact.onnx").unlink()
    meta = json.loads((old / "manifest.json").read_text())
    del meta["graph"]["exact_graph"], meta["files"]["model.exact.onnx"]
    write_manifest(old, meta)
    assert Bundle.open(old).exact_graph_file() is None
    assert edge_run(["verify", str(old), "--cross", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "no float-activation graph" in err and err.count("\n") == 1
    # The default path is untouched: the bundle still verifies against its float reference.
    assert sha256_file(old / "weights.bin") == sha256_file(exported("int4") / "weights.bin")


def test_cross_without_onnxruntime_is_a_one_line_error(exported, monkeypatch, capsys):
    from edge_runtime import backends

    monkeypatch.setattr(backends, "has_onnxruntime", lambda: False)
    assert edge_run(["verify", str(exported("int4")), "--cross", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "ONNX Runtime, which is not installed" in err and err.count("\n") == 1
