"""One measurement of a peer runtime in this (fresh) process, run with the peer's own virtual env's python.

    peer_run.py speed llama|genai MODEL --ids-file F --new-tokens M --threads T --context C
        one JSON line: load_s (imports and the tokenizer included), prefill_tps, decode_tps, peak_rss_mb
    peer_run.py logits llama|genai MODEL --windows-file F --out DIR --threads T
        DIR/<i>.npy: float32 logits [S, V] of every position of window i (for the fidelity column)

Imports nothing from this repository: the peer envs hold only the peer and numpy. Greedy decoding, the prompt
given as token ids (the same ids every system gets), EOS ignored so every run decodes exactly M tokens.
"""
from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Llama:
    """llama-cpp-python on the GGUF file: f16 KV cache, memory-mapped weights."""

    def __init__(self, model: str, threads: int, context: int, all_logits: bool = False):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=context,
                                   logits_all=all_logits, verbose=False)

    def prefill(self, ids) -> int:
        self.llm.reset()
        self.llm.eval(ids)
        return int(self.llm.sample(top_k=1, temp=0.0))

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return int(self.llm.sample(top_k=1, temp=0.0))

    def logits(self, ids):
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        return np.asarray(self.llm.scores[:len(ids)], dtype=np.float32)


class Genai:
    """onnxruntime-genai on its builder's folder (threads set in its genai_config.json by bench/peers.py)."""

    def __init__(self, model: str, threads: int, context: int, all_logits: bool = False):
        import onnxruntime_genai as og

        self.og, self.context = og, context
        self.model = og.Model(model)
        # ready to turn text into ids, as this repository's load (which parses the bundle's tokenizer) and
        # llama.cpp's (whose vocabulary is in the GGUF) are
        self.tokenizer = og.Tokenizer(self.model)

    def _generator(self, length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, do_sample=False)
        return self.og.Generator(self.model, params)

    def prefill(self, ids) -> int:
        self.gen = self._generator(self.context)
        self.gen.append_tokens(list(ids))
        self.gen.generate_next_token()
        return int(self.gen.get_next_tokens()[0])

    def step(self, token: int) -> int:
        self.gen.generate_next_token()
        return int(self.gen.get_next_tokens()[0])

    def logits(self, ids):
        import numpy as np

        gen = self._generator(len(ids) + 1)
        gen.append_tokens(list(ids))
        out = np.asarray(gen.get_output("logits"), dtype=np.float32)  # [1, S, V]: every prompt position
        return out.reshape(-1, out.shape[-1])[-len(ids):]


SYSTEMS = {"llama": Llama, "genai": Genai}


def speed(args) -> dict:
    ids = json.loads(Path(args.ids_file).read_text())
    system = SYSTEMS[args.system](args.model, args.threads, args.context)
    load_s = time.perf_counter() - T0
    t1 = time.perf_counter()
    token = system.prefill(ids)
    t2 = time.perf_counter()
    for _ in range(args.new_tokens - 1):
        token = system.step(token)
    t3 = time.perf_counter()
    return {"load_s": load_s, "prefill_tps": len(ids) / (t2 - t1), "decode_tps": (args.new_tokens - 1) / (t3 - t2),
            "peak_rss_mb": peak_rss_mb(), "prompt_tokens": len(ids), "new_tokens": args.new_tokens}


def logits(args) -> dict:
    import numpy as np

    windows = json.loads(Path(args.windows_file).read_text())
    context = max(len(w) for w in windows) + 1
    system = SYSTEMS[args.system](args.model, args.threads, context, all_logits=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, ids in enumerate(windows):
        np.save(out / f"{i}.npy", system.logits(ids))
    return {"windows": len(windows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("speed", "logits"))
    ap.add_argument("system", choices=tuple(SYSTEMS))
    ap.add_argument("model")
    ap.add_argument("--ids-file")
    ap.add_argument("--windows-file")
    ap.add_argument("--out")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=2048)
    args = ap.parse_args(argv)
    print(json.dumps(speed(args) if args.mode == "speed" else logits(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
