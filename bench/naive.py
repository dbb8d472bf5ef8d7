"""The naive ONNX path a user would take today, as the benchmark's baseline: optimum export + ORT quantizers + a
plain ORT generation loop (pasts fed as NumPy inputs, presents back, no IO binding, full-sequence logits).

    python bench/naive.py prepare HF_DIR OUT_DIR      # OUT_DIR/{fp32,int4,int8}/model.onnx (cached)
    python bench/naive.py run OUT_DIR/int4 --prompt-tokens 500 --new-tokens 64 --threads 2 --json

`run` makes one measurement in the current process and prints it as JSON on the last line; the harness
(bench/speed.py) runs it in fresh subprocesses and takes medians, so peak RSS (VmHWM) covers only loading and
generating. The `run` path imports only NumPy and onnxruntime.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

MODEL_FILE = "model.onnx"
BLOCK_SIZE = 32
SEED = 0


# ---------------------------------------------------------------------------------------------------------------
# prepare: export + quantize, each step skipped when its output exists


def prepare(hf_dir: Path, out_dir: Path) -> None:
    fp32, int4, int8 = (out_dir / name / MODEL_FILE for name in ("fp32", "int4", "int8"))
    if not fp32.is_file():
        log(f"optimum export {hf_dir} -> {fp32.parent}")
        export_fp32(hf_dir, fp32.parent)
    if not int4.is_file():
        log(f"MatMulNBits int4 (RTN, block {BLOCK_SIZE}) -> {int4.parent}")
        quantize_int4(fp32, int4)
    if not int8.is_file():
        log(f"quantize_dynamic int8 -> {int8.parent}")
        quantize_int8(fp32, int8)


def export_fp32(hf_dir: Path, out: Path) -> None:
    """What `optimum-cli export onnx --task text-generation-with-past` does, offline, without its validation run."""
    from optimum.exporters.onnx import main_export

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main_export(model_name_or_path=str(hf_dir), output=str(out), task="text-generation-with-past",
                library_name="transformers", local_files_only=True, do_validation=False)


def quantize_int4(src: Path, dst: Path) -> None:
    """onnxruntime's MatMulNBitsQuantizer with its defaults except block 32 (RTN, asymmetric, fp32 compute)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)  # it logs every node at INFO
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=BLOCK_SIZE, is_symmetric=False)
    quantizer.process()
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime's quantize_dynamic with default settings (int8 weights, activations quantized per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


# ---------------------------------------------------------------------------------------------------------------
# run: one measurement with a plain ORT loop


class PlainLoop:
    """Greedy generation the way optimum's ONNX examples do it: everything goes through session.run as NumPy."""

    def __init__(self, model_path: Path, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        self.input_names = {i.name for i in inputs}
        self.past_names = [i.name for i in inputs if i.name.startswith("past_key_values.")]
        first = next(i for i in inputs if i.name.startswith("past_key_values."))
        _, heads, _, head_dim = first.shape  # [batch, kv_heads, past_len, head_dim]
        self.empty_past = np.zeros((1, heads, 0, head_dim), np.float32)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.vocab = self.session.get_outputs()[0].shape[-1]

    def feed(self, ids: np.ndarray, pasts: list, past_len: int) -> dict:
        """The graph's inputs for ids [1, S] after past_len cached positions."""
        total = past_len + ids.shape[1]
        feed = dict(zip(self.past_names, pasts), input_ids=ids, attention_mask=np.ones((1, total), np.int64))
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.arange(past_len, total, dtype=np.int64)[None]
        return feed

    def step(self, ids: np.ndarray, pasts: list, past_len: int) -> tuple[int, list]:
        out = dict(zip(self.output_names, self.session.run(None, self.feed(ids, pasts, past_len))))
        logits = out["logits"]  # [1, S, vocab]: the graph computes every position
        return int(logits[0, -1].argmax()), [out[n.replace("past_key_values", "present")] for n in self.past_names]

    def generate(self, prompt: np.ndarray, new_tokens: int) -> dict:
        """Greedy: `new_tokens` ids, the first from the prefill, then one decode step per token."""
        pasts = [self.empty_past] * len(self.past_names)
        t0 = time.perf_counter()
        token, pasts = self.step(prompt[None], pasts, 0)
        t1 = time.perf_counter()
        ids, pos = [token], len(prompt)
        for _ in range(new_tokens - 1):  # the prefill gave the first of the new tokens
            token, pasts = self.step(np.array([[ids[-1]]], np.int64), pasts, pos)
            ids.append(token)
            pos += 1
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "ids": ids}


def measure(model_dir: Path, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    t0 = time.perf_counter()
    loop = PlainLoop(model_dir / MODEL_FILE, threads)
    load_s = time.perf_counter() - t0
    rss_loaded = proc_status_mb("VmRSS")
    # A fixed pseudo-random prompt: timing does not depend on the text, and every system sees the same ids.
    prompt = np.random.default_rng(SEED).integers(0, loop.vocab, size=prompt_tokens, dtype=np.int64)
    run = loop.generate(prompt, new_tokens)
    return {
        "system": "naive",
        "model": model_dir.name,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "threads": threads,
        "load_s": load_s,
        "prefill_tps": prompt_tokens / run["prefill_s"],
        "decode_tps": (new_tokens - 1) / run["decode_s"] if new_tokens > 1 else None,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": proc_status_mb("VmHWM"),
        "bundle_mb": folder_bytes(model_dir) / 1e6,
        "prompt_ids": prompt.tolist(),
        "ids": run["ids"],
    }


def heldout_fidelity(model_dir: Path, gguf: Path, threads: int) -> dict:
    """The naive model's held-out figures against the float reference on the exporter's text domains
    (export.quality.eval_domains), with the metrics of a bundle's manifest `fidelity` (export.quality.evaluate)."""
    from export.bundle.assets import tokenizer_of
    from export.quality.eval_domains import TEXT_DOMAINS
    from export.quality.evaluate import EvalSet, evaluate_domains, token_windows, window_bos
    from export.quality.reference import FloatReference
    from export.sources import load_source

    source = load_source(str(gguf))
    tok = tokenizer_of(source)
    sets = [EvalSet(d.name, d.source, token_windows(tok.encode(d.text()), bos=window_bos(tok))) for d in TEXT_DOMAINS]
    loop = PlainLoop(model_dir / MODEL_FILE, threads)

    def naive_logits(ids) -> np.ndarray:  # [S, V]: one call over the window, every position's logits
        feed = loop.feed(np.asarray(ids, np.int64)[None], [loop.empty_past] * len(loop.past_names), 0)
        return loop.session.run(["logits"], feed)[0][0]

    fid = evaluate_domains(FloatReference(source, threads=threads).logits, naive_logits, sets)
    return {"model": model_dir.name, **fid["heldout"], "domains": fid["domains"]}


def proc_status_mb(key: str) -> float:
    """A /proc/self/status memory line (kB) in MB; VmHWM is the peak resident set of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"/proc/self/status has no {key}")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="The naive optimum + ONNX Runtime path, for the benchmark table.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="export HF_DIR with optimum and quantize it into OUT_DIR/{fp32,int4,int8}")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    r = sub.add_parser("run", help="one measurement of MODEL_DIR/model.onnx in this process")
    r.add_argument("model_dir", type=Path)
    r.add_argument("--prompt-tokens", type=int, default=500)
    r.add_argument("--new-tokens", type=int, default=64)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--json", action="store_true", help="print the measurement as one JSON line")
    f = sub.add_parser("fidelity", help="MODEL_DIR's held-out KLD / top-1 / PPL ratio against the float GGUF")
    f.add_argument("model_dir", type=Path)
    f.add_argument("gguf", type=Path)
    f.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.hf_dir, args.out_dir)
        return 0
    if not (args.model_dir / MODEL_FILE).is_file():
        log(f"error: {args.model_dir / MODEL_FILE} not found (run `prepare` first)")
        return 2
    if args.cmd == "fidelity":
        print(json.dumps(heldout_fidelity(args.model_dir, args.gguf, args.threads)))
        return 0
    result = measure(args.model_dir, args.prompt_tokens, args.new_tokens, args.threads)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:18} {value if key != 'ids' else len(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
