"""The files an ONNX graph refers to (its tensors' external data locations), read from the protobuf wire format
directly, so the runtime can check them before ONNX Runtime opens anything and without the onnx package.

Only the messages that can hold tensors are walked: ModelProto.graph -> GraphProto (initializer, sparse
initializer, node attributes) -> AttributeProto (t, g, tensors, graphs, sparse tensors), recursively into
subgraphs; field numbers from onnx/onnx.proto.
"""
from __future__ import annotations

MAX_DEPTH = 64  # nested subgraphs; a real graph has a handful of levels


class ProtobufError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ProtobufError("truncated or overlong varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def fields(buf: memoryview):
    """(field number, wire type, value) of one message: an int for scalars, a memoryview for length-delimited."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if i + size > len(buf):
                raise ProtobufError("truncated fixed-size field")
            value, i = int.from_bytes(buf[i:i + size], "little"), i + size
        elif wire == 2:
            size, i = _varint(buf, i)
            if i + size > len(buf):
                raise ProtobufError("length-delimited field runs past the end")
            value, i = buf[i:i + size], i + size
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
        if number == 0:
            raise ProtobufError("field number 0")
        yield number, wire, value


def _messages(buf: memoryview, number: int):
    for n, wire, value in fields(buf):
        if n == number and wire == 2:
            yield value


def _tensor(buf: memoryview, out: list[str]) -> None:
    for entry in _messages(buf, 13):  # TensorProto.external_data: StringStringEntryProto
        kv = {n: bytes(v).decode("utf-8", "replace") for n, w, v in fields(entry) if w == 2}
        if kv.get(1) == "location":
            out.append(kv.get(2, ""))


def _sparse(buf: memoryview, out: list[str]) -> None:
    for n, wire, value in fields(buf):
        if n in (1, 2) and wire == 2:  # SparseTensorProto.values, .indices
            _tensor(value, out)


def _graph(buf: memoryview, out: list[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ProtobufError("subgraphs nested too deeply")
    for n, wire, value in fields(buf):
        if wire != 2:
            continue
        if n == 5:      # GraphProto.initializer
            _tensor(value, out)
        elif n == 15:   # GraphProto.sparse_initializer
            _sparse(value, out)
        elif n == 1:    # GraphProto.node -> NodeProto.attribute
            for attr in _messages(value, 5):
                _attribute(attr, out, depth)


def _attribute(buf: memoryview, out: list[str], depth: int) -> None:
    for n, wire, value in fields(buf):
        if wire != 2:
            continue
        if n in (5, 10):    # AttributeProto.t, .tensors
            _tensor(value, out)
        elif n in (6, 11):  # AttributeProto.g, .graphs
            _graph(value, out, depth + 1)
        elif n in (22, 23):  # AttributeProto.sparse_tensor, .sparse_tensors
            _sparse(value, out)


def external_data_locations(model: bytes) -> list[str]:
    """Every external data location in a serialized ModelProto (ProtobufError if it is not well formed)."""
    out: list[str] = []
    buf = memoryview(model)
    graphs = list(_messages(buf, 7))  # ModelProto.graph
    if not graphs:
        raise ProtobufError("no graph in the model")
    for g in graphs:
        _graph(g, out, 0)
    return out
