"""Fallback export for architectures the graph builder does not know: optimum's ONNX exporter + ORT quantizers.

The bundle follows the `optimum-kv-v1` contract of docs/bundle-format.md: the runtime feeds each step's
`present.*` outputs back as the next `past_key_values.*` inputs (backends/ort_optimum.py). On top of optimum's
graph we add one input, `logits_index` [L], so that a prefill computes the lm_head on the rows it needs instead
of on all S positions (a 500-token prompt would otherwise build a [500, vocab] logits tensor).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.errors import UnsupportedModelError
from edge_runtime.format.config import ModelConfig
from edge_runtime.format.contracts import OPTIMUM_KV as CONTRACT

from ..quality.reference import FloatReference
from ..sources.hf import any_model_config

MODEL_FILE = "model.onnx"
QUANT_PRESETS = ("fp32", "int8", "int4")
LM_HEAD_GATHER = "/lm_head/GatherLogitsIndex"

Progress = Optional[Callable[[str], None]]


@dataclass
class FallbackGraph:
    """optimum's decoder graph, edited and quantized, with its initializers inline (the bundle writer moves them
    to weights.bin), plus the manifest entries that describe it."""

    model: onnx.ModelProto
    graph: dict                     # the manifest's `graph` entry (contract, KV layout, input/output names)
    quantization: dict              # the manifest's `quantization` entry
    config: ModelConfig
    notes: list[str] = field(default_factory=list)


def export_with_optimum(
    hf_dir: Path, work_dir: Path, quant: str, threads: int = 2, progress: Progress = None,
    accuracy_level: int = 0, block_size: int = 32,
) -> FallbackGraph:
    """Export a local Hugging Face folder with optimum and quantize its MatMul weights.

    quant: "fp32" (none), "int8" or "int4": block-wise weight-only MatMulNBits (RTN with zero points, blocks of
    `block_size` along K). accuracy_level: MatMulNBits activation precision (4 = int8, 0 = fp32). Fully offline:
    `hf_dir` must be a folder with config.json and weights; `work_dir` receives optimum's raw export.
    """
    if quant not in QUANT_PRESETS:
        raise UnsupportedModelError(f"the optimum fallback supports --quant {'/'.join(QUANT_PRESETS)}, not {quant!r}")
    say = progress or (lambda msg: None)
    set_torch_threads(threads)
    raw_dir = Path(work_dir) / "optimum"
    say(f"optimum export of {Path(hf_dir).name} (text-generation-with-past)")
    run_optimum_export(Path(hf_dir), raw_dir)
    model = onnx.load(str(raw_dir / MODEL_FILE))  # external data (if optimum wrote any) is read in
    add_logits_index(model)
    notes: list[str] = []
    if quant != "fp32":
        say(f"quantizing MatMul weights ({quant}, block {block_size})")
        model, note = quantize_weights(model, 4 if quant == "int4" else 8, block_size, accuracy_level)
        notes += [note] if note else []
    graph = describe_graph(model)
    graph["accuracy_level"] = accuracy_level
    return FallbackGraph(model, graph, quantization_entry(model, quant), any_model_config(Path(hf_dir)), notes)


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def run_optimum_export(hf_dir: Path, out_dir: Path) -> None:
    """optimum's exporter on a local folder only (no hub access); validation is left to our fidelity check."""
    from optimum.exporters.onnx import main_export

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        main_export(
            model_name_or_path=str(hf_dir),
            output=str(out_dir),
            task="text-generation-with-past",
            library_name="transformers",
            local_files_only=True,
            no_post_process=True,  # one decoder graph with past inputs, not a merged if/else graph
            do_validation=False,
        )
    except (KeyError, ValueError, NotImplementedError) as e:
        raise UnsupportedModelError(f"optimum cannot export {hf_dir}: {e}") from None
    if not (out_dir / MODEL_FILE).is_file():
        raise UnsupportedModelError(f"optimum produced no {MODEL_FILE} for {hf_dir}")


# ---------------------------------------------------------------------------------------------------------------
# Graph edits


def add_logits_index(model: onnx.ModelProto) -> None:
    """Add input `logits_index` [L]: `logits` becomes [1, L, vocab], the rows of the chunk positions listed.

        hidden [1,S,D] --Gather(logits_index, axis=1)--> [1,L,D] --MatMul(lm_head)--> logits [1,L,V]

    When `logits` is not produced by a MatMul on a constant weight, the Gather goes after it instead (saves the
    output copy, not the lm_head work).
    """
    graph = model.graph
    pos, node = next((i, n) for i, n in enumerate(graph.node) if "logits" in n.output)
    inits = {t.name for t in graph.initializer}
    graph.input.append(helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["num_logits"]))
    if node.op_type == "MatMul" and node.input[1] in inits:
        # A MatMul with a 2-D weight keeps the rank of its input, so the hidden state is [1, S, D] here.
        gathered = node.input[0] + "_at_logits_index"
        gather = helper.make_node("Gather", [node.input[0], "logits_index"], [gathered], axis=1, name=LM_HEAD_GATHER)
        node.input[0] = gathered
        graph.node.insert(pos, gather)
    else:
        node.output[list(node.output).index("logits")] = "logits_all_positions"
        graph.node.insert(pos + 1, helper.make_node("Gather", ["logits_all_positions", "logits_index"], ["logits"],
                                                    axis=1, name=LM_HEAD_GATHER))
    out = next(o for o in graph.output if o.name == "logits")
    out.type.tensor_type.shape.dim[1].ClearField("dim_value")
    out.type.tensor_type.shape.dim[1].dim_param = "num_logits"


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Gemm(A, B, C) with a constant B -> MatMul(A, B) + C, so the MatMulNBits quantizer sees it.

    GPT-2's Conv1D layers export as Gemm; the quantizer only rewrites MatMul. Returns the number rewritten.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.input[1] not in inits or not plain:
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            weight = transposed_initializer(graph, inits, weight)
        has_bias = len(node.input) > 2 and node.input[2]
        product = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name + "/MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + "/Add"))
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def transposed_initializer(graph: onnx.GraphProto, inits: dict, name: str) -> str:
    new_name = name + "_transposed"
    if new_name not in inits:
        array = np.ascontiguousarray(numpy_helper.to_array(inits[name]).T)
        inits[new_name] = numpy_helper.from_array(array, new_name)
        graph.initializer.append(inits[new_name])
    return new_name


def quantize_weights(model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int):
    """Block-wise weight-only quantization of every MatMul with a constant weight -> MatMulNBits.

    Returns (model, note); the note says when int8 had to fall back to quantize_dynamic.
    """
    gemm_to_matmul(model)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:  # it needs the `onnx_ir` package
        if bits == 4:
            raise UnsupportedModelError(f"int4 needs onnxruntime's MatMulNBitsQuantizer ({e})") from None
        return quantize_dynamic_int8(model), f"int8 fell back to quantize_dynamic per-channel ({e})"
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)  # it logs every node at INFO
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=False,
                                     accuracy_level=accuracy_level)
    quantizer.process()
    return quantizer.model.model, ""


def quantize_dynamic_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Per-channel int8 MatMulInteger (activations quantized per call): the fallback when MatMulNBits is absent."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src))
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
        return onnx.load(str(dst))


# ---------------------------------------------------------------------------------------------------------------
# Manifest entries


def describe_graph(model: onnx.ModelProto) -> dict:
    """The manifest's `graph` entry: names, KV layout and sizes read from the graph's own input shapes."""
    inputs = [i.name for i in model.graph.input]
    pasts = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
    if not pasts or "input_ids" not in inputs:
        raise UnsupportedModelError("optimum's graph has no past_key_values inputs (export without KV cache)")
    dims = pasts[0].type.tensor_type.shape.dim  # [batch, kv_heads, past_len, head_dim]
    return {
        "contract": CONTRACT,
        "file": MODEL_FILE,
        "inputs": inputs,
        "outputs": [o.name for o in model.graph.output],
        "kv_dtype": helper.tensor_dtype_to_np_dtype(pasts[0].type.tensor_type.elem_type).name,
        "kv_layout": ["batch", "kv_heads", "past_len", "head_dim"],
        "num_layers": sum(1 for i in pasts if i.name.endswith(".key")),
        "kv_heads": int(dims[1].dim_value),
        "head_dim": int(dims[3].dim_value),
        "position_ids": "position_ids" in inputs,
        "logits_index": "logits_index" in inputs,
    }


def quantization_entry(model: onnx.ModelProto, quant: str) -> dict:
    """The manifest's `quantization` entry, one record per weight the quantizer rewrote (keyed by graph name)."""
    tensors = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        tensors[node.input[1]] = {
            "bits": int(attrs["bits"]),
            "block_size": int(attrs["block_size"]),
            "method": "rtn",
            "zero_points": len(node.input) > 3 and bool(node.input[3]),
            "offsets": False,
        }
    kernel = "MatMulInteger" if any(n.op_type == "MatMulInteger" for n in model.graph.node) else "MatMulNBits"
    return {"preset": quant, "kernel": kernel if quant != "fp32" else None, "tensors": tensors}


# ---------------------------------------------------------------------------------------------------------------
# Source and bundle


class HFReference(FloatReference):
    """The float reference of a fallback source: transformers' own class for the folder, in fp32."""

    def __init__(self, hf_dir: Path, threads: int | None = None):
        from transformers import AutoModelForCausalLM

        if threads:
            set_torch_threads(threads)
        self.source = None
        self.torch_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype="float32",
                                                                local_files_only=True).eval()


def export_fallback_bundle(source, out_dir, opts) -> Path:
    """Bundle a non-Llama source through optimum (called by pipeline.export_bundle with its ExportOptions)."""
    from ..bundle.assets import bundle_contents, chat_encoder, tokenizer_of
    from ..bundle.writer import write_bundle
    from ..progress import Steps
    from ..quality.probes import build_reference

    opts = opts.validated()  # idempotent; callers of the Python API may pass unresolved options
    if source.hf_dir is None:
        raise UnsupportedModelError(f"architecture '{source.config.model_type}' is only exported from a Hugging "
                                    f"Face folder (through optimum)")
    steps = Steps(["optimum export", "reference", "write"], opts.progress)
    try:
        with tempfile.TemporaryDirectory(prefix="edge-optimum-") as work:
            quant = {"q4": "int4", "q8": "int8"}.get(opts.recipe, opts.recipe)  # RTN MatMulNBits of that width
            steps.start(f"optimum export + {quant}")
            fallback = export_with_optimum(source.hf_dir, Path(work), quant, opts.threads,
                                           accuracy_level=opts.accuracy_level, block_size=opts.weight_block)
            steps.done()
            steps.start("float reference probes")
            reference = None
            if opts.reference:
                tok = tokenizer_of(source)
                reference = build_reference(HFReference(source.hf_dir, opts.threads), chat_encoder(source, tok),
                                            tok.encode, tok.eos_token_ids)
            steps.done()
            steps.start("write bundle")
            max_context = int(min(opts.max_context or 1 << 62, fallback.config.max_position_embeddings))
            fields, extra = bundle_contents(source, fallback.graph, fallback.quantization, max_context, reference,
                                            opts)
            path = write_bundle(out_dir, config=fallback.config, graph=fallback.model, manifest_fields=fields,
                                extra_files=extra, overwrite=opts.overwrite)
            steps.done()
            return path
    finally:
        steps.close()
