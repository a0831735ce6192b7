"""The external-data locations of an ONNX model, read with a plain protobuf reader (the runtime
does not depend on the onnx package): what :func:`densepure_rt.files.manifest.load_manifest` checks
every graph against its list of checksummed files."""

from __future__ import annotations

from typing import Any, Iterator

__all__ = ["BadProto", "onnx_external_data"]


class BadProto(ValueError):
    """Bytes that are not a well-formed ONNX protobuf message."""


# For each message that can (transitively) hold a TensorProto, the length-delimited fields to follow
# (field numbers of onnx.proto: ModelProto, TrainingInfoProto, GraphProto, NodeProto, AttributeProto,
# FunctionProto, SparseTensorProto).
_MODEL, _TRAINING, _GRAPH, _NODE, _ATTRIBUTE, _FUNCTION, _SPARSE, _TENSOR = range(8)
_CHILDREN = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {},
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 13, 14, 1
_MAX_PROTO_DEPTH = 100


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise BadProto("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; a LEN value is its (start, end)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + length), pos + length
        else:
            raise BadProto(f"unsupported wire type {wire}")
        if pos > end:
            raise BadProto("truncated field")
        yield number, wire, value


def onnx_external_data(buf) -> list[str]:
    """The external-data locations of every tensor in a serialized ONNX ModelProto ``buf``.

    Walks initializers, sparse initializers, tensor attributes (Constant), subgraphs and functions
    with a plain protobuf reader (the runtime does not depend on the onnx package). Raises
    ValueError on bytes that are not a well-formed protobuf message.
    """
    locations: list[str] = []
    stack = [(_MODEL, 0, len(buf), 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        if depth > _MAX_PROTO_DEPTH:
            raise BadProto(f"nested more than {_MAX_PROTO_DEPTH} messages deep")
        children = _CHILDREN[kind]
        external, location = False, None
        for number, wire, value in _fields(buf, start, end):
            if kind == _TENSOR and number == _TENSOR_DATA_LOCATION and wire == 0:
                external = value == _EXTERNAL
            elif kind == _TENSOR and number == _TENSOR_EXTERNAL_DATA and wire == 2:
                entry = {}
                for n, w, v in _fields(buf, *value):
                    if n in (1, 2) and w == 2:
                        try:
                            entry[n] = bytes(buf[v[0] : v[1]]).decode("utf-8")
                        except UnicodeDecodeError:
                            raise BadProto("an external-data entry is not UTF-8") from None
                if entry.get(1) == "location":
                    location = entry.get(2, "")
                    locations.append(location)
            elif wire == 2 and number in children:
                stack.append((children[number], *value, depth + 1))
        if external and location is None:
            raise BadProto("a tensor stored as external data has no location")
    return locations
