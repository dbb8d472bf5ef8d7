"""End to end: edge-export -> bundle -> edge_runtime, on tiny models and on the real SmolLM2-135M.

The float reference is transformers' own model over the dequantized GGUF weights (export.quality.reference).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from bundle_cache import ROOT

import edge_runtime
import edge_runtime.format.bundle
from export.quality.probes import probe_text


def run_cli(*args, module="export.cli"):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def backend_logits(bundle, ids, backend="ort"):
    """Logits of every position of `ids` in one forward pass: [S, V]."""
    model = edge_runtime.load(bundle, backend=backend, threads=2, context=max(64, len(ids)))
    return model.logits(ids)


def greedy_ids(bundle, prompt_ids, n, backend="ort"):
    model = edge_runtime.load(bundle, backend=backend, threads=2, context=512)
    return model.stream_ids(prompt_ids, n).collect().token_ids


def reference_of(bundle):
    return json.loads((bundle / "reference.json").read_text())


def first_until_eos(ids, eos):
    """Greedy ids up to and including the first EOS (the float reference stops there)."""
    out = []
    for t in ids:
        out.append(t)
        if t in eos:
            break
    return out


# ------------------------------------------------------------------------------------------ tiny models


@pytest.mark.parametrize("spec", ["tiny:llama", "tiny:qwen2", "tiny:mistral"])
def test_tiny_fp32_bundle_matches_float_reference(tiny_bundle, spec):
    from export.quality.reference import FloatReference
    from export.sources import load_source

    bundle = tiny_bundle(spec, "fp32")
    ref = FloatReference(load_source(spec), threads=1)
    ids = list(range(3, 40))
    np.testing.assert_allclose(backend_logits(bundle, ids), ref.logits(ids), atol=1e-4)


def test_tiny_bundle_layout_and_checksums(tiny_bundle):
    bundle = tiny_bundle("tiny:llama", "int4")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "model.float16.onnx", "model.exact.onnx", "weights.bin",
                                      "tokenizer.json", "tokenizer.merges.bin", "reference.json"}
    assert manifest["tokenizer"]["merges_file"] == "tokenizer.merges.bin"
    assert manifest["graph"]["contract"] == "edge-llama-v1"
    assert manifest["quantization"]["recipe"] == "q4"  # the recipe int4 names
    b = edge_runtime.format.bundle.Bundle.open(bundle)
    for name, meta in manifest["weights"]["tensors"].items():
        assert b.tensor(name).nbytes == meta["nbytes"]
    q = manifest["quantization"]["tensors"]
    assert q["model.layers.0.mlp.down_proj.weight"]["bits"] == 4
    assert "model.layers.0.input_layernorm.weight" not in q


def test_bundle_tokenizer_builds_its_merges_from_the_merges_file(tiny_bundle, monkeypatch):
    from edge_runtime.tokenizer import bpe
    from edge_runtime.tokenizer.tokenizer import Tokenizer

    b = edge_runtime.format.bundle.Bundle.open(tiny_bundle("tiny:llama", "int4"))
    from_strings = Tokenizer.from_file(b.path("tokenizer.json"), "python")

    def no_strings(*a, **k):
        raise AssertionError("the merges were looked up from their strings")

    monkeypatch.setattr(bpe, "merge_id_rows", no_strings)
    from_file = Tokenizer.from_bundle(b, "python")
    assert from_file._impl.model.merges.keys == from_strings._impl.model.merges.keys
    text = "Merges from ids give the same tokens: 12345, naïve café."
    assert from_file.encode(text) == from_strings.encode(text)


def test_bundle_without_a_merges_file_reads_its_merges_from_tokenizer_json(tiny_bundle, tmp_path):
    import shutil

    from edge_runtime.format.bundle import write_manifest

    src = tiny_bundle("tiny:llama", "int4")
    old = tmp_path / "old"
    shutil.copytree(src, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["tokenizer"]["merges_file"], manifest["files"]["tokenizer.merges.bin"]
    (old / "tokenizer.merges.bin").unlink()
    write_manifest(old, manifest)  # a bundle as an exporter without merges files wrote it
    text = "Merges from strings still: 12345, naïve café."
    assert edge_runtime.load(old, backend="numpy").tokenizer.encode(text) == \
        edge_runtime.load(src, backend="numpy").tokenizer.encode(text)


def test_export_refuses_missing_source(tmp_path):
    p = run_cli(tmp_path / "nope.gguf", "--out", tmp_path / "b")
    assert p.returncode != 0
    assert "model not found" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "b").exists()


def test_export_refuses_unsupported_architecture(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "made-up-arch", "architectures": ["X"]}))
    from export.sources import load_source

    (folder / "tokenizer.json").write_text(load_source("tiny:llama").tokenizer_json)
    p = run_cli(folder, "--out", tmp_path / "b", "--quiet")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "made-up-arch" in p.stderr
    assert not (tmp_path / "b").exists()


def test_export_failure_leaves_previous_bundle_untouched(tiny_bundle, tmp_path):
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("tiny:llama", "int8"), out)
    before = (out / "manifest.json").read_bytes()
    p = run_cli("tiny:made-up", "--out", out, "--overwrite")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert (out / "manifest.json").read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["bundle"]  # no temp folder left behind


def test_export_refuses_vocab_block_outside_q4_and_mixed(tmp_path):
    p = run_cli("tiny:llama", "--quant", "int8", "--vocab-block", "16", "--out", tmp_path / "x", "--quiet")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--vocab-block sets the int8 embedding / lm_head of q4, mixed and exact, not q8" in p.stderr
    assert not (tmp_path / "x").exists()


def test_run_refuses_tampered_bundle(tiny_bundle, tmp_path):
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("tiny:llama", "int4"), out)
    data = bytearray((out / "weights.bin").read_bytes())
    data[5000] ^= 0xFF
    (out / "weights.bin").write_bytes(bytes(data))
    p = run_cli(out, "hello", module="edge_runtime.cli")
    assert p.returncode == 2
    assert "checksum mismatch for weights.bin" in p.stderr and "Traceback" not in p.stderr


def test_run_refuses_prompt_longer_than_context(tiny_bundle):
    p = run_cli(tiny_bundle("tiny:llama", "int4"), "word " * 400, "--context", "64", "--raw",
                module="edge_runtime.cli")
    assert p.returncode == 2
    assert "context" in p.stderr and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------------ SmolLM2-135M


def test_smollm2_fp32_bundle_reproduces_float_reference(smollm2_bundle, smollm2_reference):
    """Acceptance: max |logit diff| <= 1e-3 on a 128-token probe window; same greedy tokens for 32 steps."""
    bundle = smollm2_bundle("fp32")
    reference = reference_of(bundle)
    ids = reference["probe"]["ids"]
    assert len(ids) == 128
    diff = np.abs(backend_logits(bundle, ids) - smollm2_reference.logits(ids)).max()
    assert diff <= 1e-3, diff
    eos = set(json.loads((bundle / "manifest.json").read_text())["tokenizer"]["eos_token_ids"])
    for p in reference["prompts"]:
        got = first_until_eos(greedy_ids(bundle, p["ids"], 32), eos)
        assert got == p["greedy_ids"], p["text"]


def decided_agreement(float_logits, model_logits, prompts, margin: float) -> int:
    """Teacher-forced on the float model's first 8 greedy tokens of each prompt: the model's argmax equals the
    float one at every position where the float model's top-2 gap exceeds `margin` logits; returns how many
    positions were decided."""
    decided_total = 0
    for p in prompts:
        n = min(8, len(p["greedy_ids"]))
        seq = p["ids"] + p["greedy_ids"][:n]
        rows = slice(len(p["ids"]) - 1, len(p["ids"]) - 1 + n)  # the positions that chose greedy tokens 1..n
        f, q = float_logits(seq)[rows], model_logits(seq)[rows]
        top2 = np.sort(f, axis=-1)[:, -2:]
        decided = top2[:, 1] - top2[:, 0] > margin
        assert (q.argmax(-1) == f.argmax(-1))[decided].all(), p["text"]
        decided_total += int(decided.sum())
    return decided_total


def test_smollm2_int8_first_greedy_tokens_match_float(smollm2_bundle, smollm2_reference):
    """Acceptance: the int8 bundle's first 8 greedy tokens agree with the float reference's on 3 prompts,
    wherever the float model itself is not at a near-tie.

    The first answer token of prompt 1 is a 0.08-logit tie in float ("The" vs '"'): int8 weights alone (the
    bundle's exact graph: the same weights, fp32 activations) may flip it, so they are held to every position
    with a top-2 gap over 0.25 logits; int8 activations too (the default accuracy_level 4) to every position
    over 0.5, and the NumPy backend emulating that rounding flips the tie the same way.
    """
    from edge_runtime.backends import make_backend
    from edge_runtime.format.bundle import Bundle
    from edge_runtime.quality import verify

    default = smollm2_bundle("int8")
    # The bundle's exact graph as the NumPy backend runs it (cheaper than ONNX Runtime's 8-bit fp32 fallback);
    # tests/test_numpy_backend.py holds it to ORT's run of the same graph, 32 greedy tokens per prompt.
    exact = make_backend("numpy", Bundle.open(default), 512, 2, float_activations=True)
    prompts = reference_of(default)["prompts"]
    ref = smollm2_reference
    assert decided_agreement(ref.logits, lambda ids: verify.all_logits(exact, ids), prompts, 0.25) >= 16
    assert decided_agreement(ref.logits, lambda ids: backend_logits(default, ids), prompts, 0.5) >= 12


def test_smollm2_int4_answers_coherently(smollm2_bundle):
    bundle = smollm2_bundle("int4")
    model = edge_runtime.load(bundle, threads=2, context=256)
    out = model.generate([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=16)
    assert "Paris" in out.text
    ref = reference_of(bundle)["prompts"][0]
    assert greedy_ids(bundle, ref["ids"], 8) == ref["greedy_ids"][:8]


def test_smollm2_chat_cli_streams_answer_and_stats(smollm2_bundle):
    p = run_cli(smollm2_bundle("int4"), "--chat", "What is the capital of France?", "--max-new-tokens", "12",
                module="edge_runtime.cli")
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout
    assert "prefill" in p.stderr and "decode" in p.stderr and "peak RSS" in p.stderr


def test_probe_text_is_long_enough():
    assert len(probe_text()) > 2000
