"""The agreement floor of an int8-activation graph: NumPy against ONNX Runtime on a bundle's default or exact graph
(parity), and the two measurements that bound what any correct executor can reach there: ONNX Runtime's prefill
against its own one-token kernels (self_check) and NumPy against itself with one change of float rounding
(perturb_check). bench/parity.py prints them; tests/test_numpy_backend.py holds NumPy to the floor.
"""
from __future__ import annotations

import types

from .cross_check import compare


def probe_ids(bundle, window: int = 0) -> list[int]:
    """The ids every figure is taken on: the reference probe window, or `window` tokens of held-out text."""
    if not window:
        return bundle.read_json("reference.json")["probe"]["ids"]
    from edge_runtime.memory.testing import text_prompt_ids
    from edge_runtime.tokenizer.tokenizer import Tokenizer

    return text_prompt_ids(Tokenizer.from_bundle(bundle), window)


def greedy_prompts(bundle, steps: int) -> list[dict]:
    """The reference prompts greedy figures are taken on (none when steps is 0)."""
    return bundle.read_json("reference.json").get("prompts", []) if steps > 0 else []


def _inputs(path: str, window: int, steps: int):
    """bundle, probe ids, prompts and the KV context they need."""
    from edge_runtime.format.bundle import Bundle

    bundle = Bundle.open(path)
    probe, prompts = probe_ids(bundle, window), greedy_prompts(bundle, steps)
    return bundle, probe, prompts, max([len(probe)] + [len(p["ids"]) + steps for p in prompts])


def parity(path: str, threads: int = 2, steps: int = 32, window: int = 0, exact: bool = False) -> dict:
    """NumPy against ORT on one bundle's default graph, or on its exact graph (float32 activations)."""
    from edge_runtime.backends.numpy.backend import NumpyBackend
    from edge_runtime.backends.ort.llama import OrtBackend

    bundle, probe, prompts, context = _inputs(path, window, steps)
    ort = OrtBackend(bundle, context, threads=threads, float_activations=exact)
    ours = NumpyBackend(bundle, context, threads=threads, float_activations=exact)
    level = 0 if exact else bundle.accuracy_level
    return {"bundle": path, "graph": "exact" if exact else "default", "accuracy_level": level,
            "kv_dtype": ort.kv_dtype, **compare(ours, ort, probe, prompts, steps)}


def greedy_after_steps(backend, prompt_ids, n: int) -> list[int]:
    """verify.greedy_ids with the prompt fed one token at a time instead of as one prefill."""
    import numpy as np

    from edge_runtime.quality.verify import stepwise_logits

    out, past = [int(np.argmax(stepwise_logits(backend, prompt_ids)[-1]))], len(prompt_ids)
    while len(out) < n:
        logits = backend.forward(np.array(out[-1:], np.int64), past, np.zeros(1, np.int64))
        out.append(int(np.argmax(logits[-1])))
        past += 1
    return out


def self_check(path: str, threads: int = 2, window: int = 0, steps: int = 32) -> dict:
    """ORT against ORT on the default graph: one prefill (MatMulNBits' M>1 kernels) vs one token at a time (its
    M=1 kernels), on the probe window and on the greedy prompts; both exact executions of the same graph."""
    from edge_runtime.backends.ort.llama import OrtBackend
    from edge_runtime.quality.verify import stepwise_logits

    bundle, probe, prompts, context = _inputs(path, window, steps)
    ort = OrtBackend(bundle, context, threads=threads)
    return {"bundle": path, **compare(ort, ort, probe, prompts, steps, a_logits=stepwise_logits(ort, probe),
                                    a_greedy=lambda ids: greedy_after_steps(ort, ids, steps))}


def _norm_float64(model, x, name):
    """DecoderForward.norm with the mean of squares summed in float64: the same function, rounded differently."""
    import numpy as np

    var = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True).astype(np.float32)
    return model.w.vector(name) * (x / np.sqrt(var + np.float32(model.eps)))


def perturb_check(path: str, threads: int = 2, window: int = 0, steps: int = 32) -> dict:
    """NumPy against NumPy on the default graph, one of them with a one-ulp change of rounding (_norm_float64),
    on the probe window and the greedy prompts: how far such a change alone moves this bundle's graph."""
    from edge_runtime.backends.numpy.backend import NumpyBackend

    bundle, probe, prompts, context = _inputs(path, window, steps)
    plain, changed = (NumpyBackend(bundle, context, threads=threads) for _ in range(2))
    changed.model.norm = types.MethodType(_norm_float64, changed.model)
    return {"bundle": path, **compare(changed, plain, probe, prompts, steps)}


def compare_exact(path: str, threads: int = 2, window: int = 0, steps: int = 32) -> dict:
    """ORT's default graph against ORT's exact graph of the same bundle: the int8 activations' whole effect."""
    from edge_runtime.backends.ort.llama import OrtBackend

    bundle, probe, prompts, context = _inputs(path, window, steps)
    default = OrtBackend(bundle, context, threads=threads)
    exact = OrtBackend(bundle, context, threads=threads, float_activations=True)
    return {"bundle": path, **compare(default, exact, probe, prompts, steps)}
