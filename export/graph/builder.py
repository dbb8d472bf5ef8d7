"""GraphBuilder: owns the nodes, initializers, graph inputs/outputs and the name/constant tables of one ONNX graph.

Op helpers (`ops.py`) are plain functions that take a builder and input names and return output names; the
builder only records what they emit. It also records how the graph's weight initializers map onto the bundle's
weight index (docs/bundle-format.md):

* a *fused* initializer is the row-wise concatenation of several indexed tensors (q/k/v, gate/up), written once
  into weights.bin; the index lists each part at its own offset inside it, so nothing is stored twice;
* an *alias* is a second initializer over the same bytes with another shape (the tied lm_head's MatMulNBits B
  `[V, kb, blob]` read by GatherBlockQuantized as `[V, K*bits/8]`); the writer points both at one offset.

That layout travels with the ModelProto as the metadata entry `WEIGHT_LAYOUT_KEY` (JSON), which
`export.bundle.writer.write_bundle` consumes and removes.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WEIGHT_LAYOUT_KEY = "edge.weight_layout"
OPSET = 21
MS_DOMAIN = "com.microsoft"

_ONNX_DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
                np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
                np.dtype(np.uint8): TensorProto.UINT8}


def onnx_dtype(dtype) -> int:
    return _ONNX_DTYPES[np.dtype(dtype)]


class GraphBuilder:
    def __init__(self, name: str = "edge-llama"):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: dict[str, np.ndarray] = {}
        self.parts: dict[str, list[tuple[str, list[int]]]] = {}   # fused initializer -> [(index name, shape)]
        self.aliases: dict[str, tuple[str, list[int]]] = {}        # alias -> (base initializer, shape)
        self.weights: set[str] = set()                             # initializers that are indexed weights
        self._constants: dict[tuple, str] = {}
        self._node_names: set[str] = set()
        self.cache: dict[tuple, str] = {}                          # shared subexpressions, e.g. block sums

    # -- graph interface ------------------------------------------------------------------------------------

    def input(self, name: str, dtype, shape: Sequence[int | str | None]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape)))
        return name

    def output(self, name: str, dtype, shape: Sequence[int | str | None]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape)))
        return name

    # -- initializers -----------------------------------------------------------------------------------------

    def weight(self, name: str, array: np.ndarray) -> str:
        """An indexed weight under its bundle name (HF name, or HF name + '.' + suffix); added once."""
        if name not in self.initializers:
            self.initializers[name] = np.ascontiguousarray(array)
            self.weights.add(name)
        return name

    def fused_weight(self, name: str, parts: Sequence[tuple[str, np.ndarray]]) -> str:
        """Rows of several indexed weights concatenated along axis 0 under one initializer `name`."""
        if len(parts) == 1:
            return self.weight(parts[0][0], parts[0][1])
        if name not in self.initializers:
            self.initializers[name] = np.concatenate([np.asarray(a) for _, a in parts], axis=0)
            self.parts[name] = [(part, list(np.shape(a))) for part, a in parts]
            self.weights.add(name)
        return name

    def alias(self, base: str, shape: Sequence[int]) -> str:
        """The bytes of initializer `base` seen with another shape, without a second copy in weights.bin."""
        name = f"{base}/as_{'x'.join(str(int(d)) for d in shape)}"
        if name not in self.aliases:
            arr = self.initializers[base]
            assert int(np.prod(shape)) == arr.size, (base, arr.shape, shape)
            self.aliases[name] = (base, [int(d) for d in shape])
        return name

    def constant(self, values, dtype=np.int64) -> str:
        """A small constant initializer, deduplicated by value (kept inline in model.onnx)."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._constants:
            flat = "_".join(str(v) for v in arr.reshape(-1)[:8].tolist())
            suffix = flat if arr.size <= 8 else len(self._constants)
            name = f"/const/{arr.dtype.name}_{suffix}"
            self._constants[key] = name
            self.initializers[name] = arr
        return self._constants[key]

    # -- nodes --------------------------------------------------------------------------------------------------

    def op(self, op_type: str, inputs: Sequence[str | None], name: str, n_outputs: int = 1,
           domain: str = "", outputs: Sequence[str] | None = None, **attrs) -> str | list[str]:
        """Emit one node named `name` (a hierarchical path); returns its output name(s)."""
        assert name not in self._node_names, f"duplicate node name {name}"
        self._node_names.add(name)
        outs = list(outputs) if outputs is not None else [
            f"{name}/output_{i}" for i in range(n_outputs)]
        ins = ["" if i is None else i for i in inputs]
        while ins and ins[-1] == "":
            ins.pop()  # trailing optional inputs are simply left out
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, ins, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    # -- result ---------------------------------------------------------------------------------------------------

    def weight_layout(self) -> dict:
        return {"weights": sorted(self.weights),
                "parts": {k: [[n, s] for n, s in v] for k, v in self.parts.items()},
                "aliases": {k: [b, s] for k, (b, s) in self.aliases.items()}}

    def to_model(self) -> onnx.ModelProto:
        """The ModelProto with every initializer inline (aliases carry no data: the bundle writer fills them)."""
        inits = [numpy_helper.from_array(arr, name) for name, arr in self.initializers.items()]
        for name, (base, shape) in self.aliases.items():
            dtype = onnx_dtype(self.initializers[base].dtype)
            inits.append(TensorProto(name=name, data_type=dtype, dims=shape))
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=inits)
        model = helper.make_model(graph, producer_name="edge-runtime", opset_imports=[
            helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
        model.ir_version = 10
        helper.set_model_props(model, {WEIGHT_LAYOUT_KEY: json.dumps(self.weight_layout())})
        return model


def fused_initializers(model: onnx.ModelProto) -> set[str]:
    """Names of the fused weights (q/k/v, gate/up) in a built graph, without the quantized arrays' suffixes."""
    entry = next((p.value for p in model.metadata_props if p.key == WEIGHT_LAYOUT_KEY), None)
    if entry is None:
        return set()
    layout = json.loads(entry)
    from edge_runtime.format.quant import SUFFIXES

    return {next((n.removesuffix(f".{s}") for s in SUFFIXES if n.endswith(f".{s}")), n) for n in layout["parts"]}
