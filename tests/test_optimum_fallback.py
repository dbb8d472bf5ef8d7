"""The optimum fallback (export/optimum/fallback.py + backends/ort_optimum.py) and the naive benchmark path,
checked against transformers on a tiny random GPT-2 (an architecture the graph builder does not know)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edge_runtime.backends.ort.optimum import OptimumOrtBackend
from edge_runtime.errors import ContextOverflowError, UnsupportedModelError
from edge_runtime.format.bundle import ALIGN, Bundle
from export.optimum.fallback import export_fallback_bundle, export_with_optimum
from export.pipeline import ExportOptions
from export.sources.hf import read_fallback_source

ROOT = Path(__file__).resolve().parent.parent
PROMPT = np.array([5, 17, 200, 33, 9, 100, 250, 3, 42, 7], dtype=np.int64)
CONTEXT = 64


def train_tokenizer(out: Path) -> int:
    """A tiny byte-level BPE tokenizer.json (+ tokenizer_config.json) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello world, hello edge"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>") \
        .save_pretrained(out)
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random GPT-2 (2 layers, 64 wide) saved with save_pretrained, its matrices snapped to a 4-bit grid.

    Every block of 32 weights along K is (q - zp) * scale with integer q spanning 0..15: exactly what a
    block-32 RTN quantizer (4 or 8 bits) reconstructs, so quantized bundles must match transformers closely.
    """
    out = tmp_path_factory.mktemp("gpt2")
    vocab = train_tokenizer(out)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, n_positions=128,
                                  bos_token_id=0, eos_token_id=0, initializer_range=0.1)
    model = transformers.GPT2LMHeadModel(cfg)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("attn.weight", "proj.weight", "fc.weight")):
                param.copy_(torch.from_numpy(snap_to_grid(param.numpy(), 0, rng)))  # Conv1D: x @ W, K = axis 0
        model.transformer.wte.weight.copy_(
            torch.from_numpy(snap_to_grid(model.transformer.wte.weight.numpy(), 1, rng)))  # lm_head: x @ wte.T
    model.save_pretrained(out)
    return out


def snap_to_grid(w: np.ndarray, k_axis: int, rng, block: int = 32) -> np.ndarray:
    """Values of the same magnitude as `w` on a per-block 4-bit grid along `k_axis`."""
    wk = np.moveaxis(w, k_axis, -1)  # [..., K]
    shape = wk.shape[:-1] + (wk.shape[-1] // block, block)  # [..., K/block, block]
    q = rng.integers(0, 16, size=shape)
    q[..., 0], q[..., 1] = 0, 15  # every block spans the whole grid, so RTN's min/max find it exactly
    zp = rng.integers(4, 12, size=shape[:-1] + (1,))
    scale = (np.abs(wk).max() / 8 * rng.uniform(0.5, 1.0, size=shape[:-1] + (1,))).astype(np.float32)
    snapped = ((q - zp) * scale).astype(np.float32).reshape(wk.shape)
    return np.ascontiguousarray(np.moveaxis(snapped, -1, k_axis))


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def bundles(hf_dir, tmp_path_factory) -> dict:
    """fp32 (with reference.json), int8 and int4 bundles; MatMulNBits in fp32 compute so the grid is exact."""
    source, out = read_fallback_source(hf_dir), {}
    for quant in ("fp32", "int8", "int4"):
        opts = ExportOptions(quant=quant, accuracy_level=0, threads=1, reference=quant == "fp32", progress=False)
        out[quant] = export_fallback_bundle(source, tmp_path_factory.mktemp(quant) / "bundle", opts)
    return out


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids[None])).logits[0].numpy()  # [S, vocab]


def reference_greedy(model, ids: np.ndarray, n: int) -> list[int]:
    with torch.no_grad():
        ids_t = torch.from_numpy(ids[None])
        out = model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def backend_greedy(backend, ids: np.ndarray, n: int) -> list[int]:
    logits = backend.forward(ids, 0, np.array([len(ids) - 1]))
    out = [int(logits[-1].argmax())]
    for pos in range(len(ids), len(ids) + n - 1):
        out.append(int(backend.forward(np.array([out[-1]]), pos, np.array([0]))[-1].argmax()))
    return out


def test_fp32_prefill_and_decode_match_transformers(bundles, hf_model):
    backend = OptimumOrtBackend(Bundle.open(bundles["fp32"]), CONTEXT, threads=1)
    ref = reference_logits(hf_model, PROMPT)
    prefill = backend.forward(PROMPT[:6], 0, np.arange(6))  # [6, vocab]
    decoded = [backend.forward(PROMPT[i:i + 1], i, np.array([0])) for i in range(6, len(PROMPT))]
    got = np.concatenate([prefill] + decoded)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert got.dtype == np.float32


def test_logits_index_selects_rows_and_rewind_slices_the_cache(bundles, hf_model):
    backend = OptimumOrtBackend(Bundle.open(bundles["fp32"]), CONTEXT, threads=1)
    ref = reference_logits(hf_model, PROMPT)
    last = backend.forward(PROMPT, 0, np.array([len(PROMPT) - 1]))
    np.testing.assert_allclose(last, ref[-1:], atol=1e-4, rtol=0)
    # Rewind to position 4 and run a different continuation: the cache must hold only positions < 4.
    other = np.concatenate([PROMPT[:4], [11, 12, 13]]).astype(np.int64)
    got = backend.forward(other[4:], 4, np.array([0, 2]))
    np.testing.assert_allclose(got, reference_logits(hf_model, other)[[4, 6]], atol=1e-4, rtol=0)
    assert backend.cached_len == len(other)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_bundles_match_transformers_on_grid_weights(bundles, hf_model, quant):
    backend = OptimumOrtBackend(Bundle.open(bundles[quant]), CONTEXT, threads=1)
    ref = reference_logits(hf_model, PROMPT)
    got = backend.forward(PROMPT, 0, np.arange(len(PROMPT)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)  # the grid makes RTN exact: only float rounding left
    backend.reset()
    n = 16
    assert backend_greedy(backend, PROMPT, n) == reference_greedy(hf_model, PROMPT, n)


@pytest.mark.parametrize("quant, bits", [("int8", 8), ("int4", 4)])
def test_quantized_graph_uses_matmulnbits_block_32(bundles, quant, bits):
    bundle = Bundle.open(bundles[quant])
    model = onnx.load(str(bundle.path("model.onnx")), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    # GPT-2's 4 Conv1D (Gemm) per layer x 2 layers, plus the lm_head.
    assert len(nbits) == 9
    attrs = [{a.name: a.i for a in n.attribute} for n in nbits]
    assert all(a["block_size"] == 32 and a["bits"] == bits for a in attrs)
    assert len(bundle.manifest["quantization"]["tensors"]) == 9


def test_manifest_describes_the_graph_and_weights_are_aligned(bundles, hf_dir):
    bundle = Bundle.open(bundles["fp32"])  # verifies every file's size and sha256
    graph = bundle.manifest["graph"]
    assert graph["contract"] == "optimum-kv-v1" and bundle.contract == "optimum-kv-v1"
    assert (graph["num_layers"], graph["kv_heads"], graph["head_dim"]) == (2, 4, 16)
    assert graph["position_ids"] and graph["logits_index"]
    assert {"input_ids", "attention_mask", "past_key_values.1.value"} <= set(graph["inputs"])
    assert bundle.config.model_type == "gpt2" and bundle.config.hidden_size == 64
    assert set(bundle.manifest["files"]) == {"model.onnx", "weights.bin", "tokenizer.json", "tokenizer.merges.bin",
                                              "reference.json"}
    index = bundle.tensor_index
    assert index and all(meta["offset"] % ALIGN == 0 for meta in index.values())
    wte = hf_model_weight(hf_dir, "transformer.wte.weight")
    np.testing.assert_array_equal(bundle.tensor("transformer.wte.weight"), wte)
    assert bundle.manifest["tokenizer"]["eos_token_ids"] == [0]


def test_reference_json_holds_transformers_greedy(bundles, hf_model):
    bundle = Bundle.open(bundles["fp32"])
    reference = bundle.read_json(bundle.manifest["reference"]["file"])
    prompt = reference["prompts"][0]
    n = len(prompt["greedy_ids"])
    assert n > 0 and prompt["greedy_ids"] == reference_greedy(hf_model, np.array(prompt["ids"]), n)[:n]


def hf_model_weight(hf_dir: Path, name: str) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(hf_dir / "model.safetensors")[name]


def test_context_overflow_and_bad_preset(bundles, hf_dir, tmp_path):
    backend = OptimumOrtBackend(Bundle.open(bundles["fp32"]), 8, threads=1)
    with pytest.raises(ContextOverflowError):
        backend.forward(PROMPT[:9], 0, np.array([8]))
    with pytest.raises(UnsupportedModelError):
        export_with_optimum(hf_dir, tmp_path, "q3_k")


def naive(*args: str) -> str:
    """bench/naive.py run as the benchmark runs it (a script, never imported by tests)."""
    p = subprocess.run([sys.executable, str(ROOT / "bench/naive.py"), *args], capture_output=True, text=True,
                       cwd=ROOT, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_naive_path_prepares_and_measures(hf_dir, hf_model, tmp_path):
    naive("prepare", str(hf_dir), str(tmp_path))
    for variant in ("fp32", "int4", "int8"):
        assert (tmp_path / variant / "model.onnx").is_file()
    out = naive("run", str(tmp_path / "fp32"), "--prompt-tokens", "12", "--new-tokens", "5", "--threads", "1",
                "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["prompt_tokens"] == 12 and result["new_tokens"] == 5 and len(result["prompt_ids"]) == 12
    assert result["bundle_mb"] * 1e6 == pytest.approx(sum(f.stat().st_size for f in (tmp_path / "fp32").iterdir()
                                                          if f.is_file()), rel=1e-6)
    assert result["peak_rss_mb"] >= result["rss_after_load_mb"]
    # The plain loop's greedy ids on the fp32 export are transformers' greedy ids.
    prompt = np.array(result["prompt_ids"], np.int64)
    assert result["ids"] == reference_greedy(hf_model, prompt, 5)
