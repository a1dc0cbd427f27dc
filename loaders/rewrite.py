"""Rewrite ``MatMul + bias`` into ``BiasAdd`` before import, so TensorFlow fuses the layer.

TF1-style layers are usually written ``tf.matmul(x, w) + b``, which becomes an ``AddV2``
(``Add`` in older graphs) of the product and a 1-D bias. TensorFlow's graph optimizer
(grappler's remapper) fuses ``MatMul + BiasAdd [+ Relu]`` into one kernel that adds the
bias and applies the activation while the product is still in cache, but it does not
recognise the ``AddV2`` form on CPUs without oneDNN's graph rewrites (the default on
AVX2 machines). Unfused, the add and the activation each make one more pass over a
(rows, width) activation: on the 2-core benchmark machine they took 17 % of a 32-256-256-1
MLP's ``Session.run`` time, and the rewritten graphs ran ~10 % faster (0.828 vs 0.753 M
row-model evaluations/s, 4 sessions in 4 threads, 8 interleaved windows).

The rewrite only changes the type of nodes where ``BiasAdd`` computes what the add did:
an add of a ``MatMul`` output (rank 2) and a bias whose shape, as declared by the
variable or constant it reads, is exactly ``[columns of the product]`` (the columns read
from the weight's declared shape). ``BiasAdd`` then broadcasts the bias over the rows as
the add did, and each element is the same float sum; the fused kernel may still round
the product's last bits differently (at most 1.8e-7 on the benchmark's sigmoid scores),
as any two TensorFlow kernels may. Anything whose shape cannot be read from the graph
definition, and any add with control inputs (grappler does not fuse those), is left
alone.

The rewrite relies on the shapes the graph declares. A checkpoint whose values
contradict them (a bias saved as ``[1]`` under a graph declaring ``[3]``) is refused before
anything runs (``loaders.restore``), so a fused kernel never sees a bias of the wrong length.

TensorFlow's oneDNN path (the default on AVX-512 and AMX CPUs, or with
``TF_ENABLE_ONEDNN_OPTS=1``) fuses ``MatMul + AddV2`` by itself, and there the rewrite
only cost time (0.96 of the unrewritten graphs' rate on an AVX-512 Xeon), so the loader
applies it only where a probe shows TensorFlow does not fuse (``loaders.cpu``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loaders.subgraph import VARIABLE_OPS

__all__ = ["Fusion", "fuse_bias_adds"]

_ADDS = frozenset({"Add", "AddV2"})
# Ops that pass a tensor (or a variable's value) through unchanged: followed back to the
# variable or constant that fixes the shape.
_PASS_THROUGH = frozenset({"Identity", "ReadVariableOp", "Snapshot", "StopGradient"})
# DataType enum values BiasAdd takes on CPU that a MatMul also produces: float, double,
# half, bfloat16.
_FLOAT_TYPES = frozenset({1, 2, 19, 14})


@dataclass
class Fusion:
    """The adds ``fuse_bias_adds`` rewrote."""

    nodes: list[str] = field(default_factory=list)


def _node_of(nodes: dict[str, Any], tensor: str) -> Any:
    """The node whose first output ``tensor`` names, if any (not a control input)."""
    name, _, index = tensor.partition(":")
    return nodes.get(name) if index in ("", "0") and not name.startswith("^") else None


def _dims(shape: Any) -> list[int] | None:
    if shape.unknown_rank:
        return None
    return [d.size for d in shape.dim]


def _static_shape(nodes: dict[str, Any], tensor: str, depth: int = 0) -> list[int] | None:
    """The shape of ``tensor`` as fixed by the variable or constant it reads, if any."""
    node = _node_of(nodes, tensor) if depth <= 8 else None
    if node is None:
        return None
    # attr.get, not attr[...]: reading a missing key of a protobuf map inserts it.
    if node.op in VARIABLE_OPS and (shape := node.attr.get("shape")) is not None:
        return _dims(shape.shape)
    if node.op == "Const" and (value := node.attr.get("value")) is not None:
        return _dims(value.tensor.tensor_shape)
    if node.op in _PASS_THROUGH and node.input:
        return _static_shape(nodes, node.input[0], depth + 1)
    return None


def _matmul_columns(nodes: dict[str, Any], tensor: str) -> int | None:
    """Columns of a 2-D ``MatMul`` output, from its right-hand operand's static shape."""
    node = _node_of(nodes, tensor)
    if node is None or node.op != "MatMul" or len(node.input) < 2:
        return None
    rhs = _static_shape(nodes, node.input[1])
    if rhs is None or len(rhs) != 2 or min(rhs) <= 0:
        return None
    transpose_b = node.attr.get("transpose_b")
    return rhs[0] if transpose_b is not None and transpose_b.b else rhs[1]


def fuse_bias_adds(graph_def: Any) -> Fusion:
    """Turn each ``MatMul + 1-D bias`` add of ``graph_def`` (a ``GraphDef``, edited in
    place) into a ``BiasAdd`` with the product first."""
    nodes = {node.name: node for node in graph_def.node}
    fusion = Fusion()
    for node in graph_def.node:
        dtype = node.attr.get("T")
        if node.op not in _ADDS or dtype is None or dtype.type not in _FLOAT_TYPES:
            continue
        data = list(node.input)
        if len(data) != 2 or any(i.startswith("^") for i in data):
            continue
        for product, bias in (data, data[::-1]):
            columns = _matmul_columns(nodes, product)
            if columns is not None and _static_shape(nodes, bias) == [columns]:
                break
        else:
            continue
        node.op = "BiasAdd"
        del node.input[:]
        node.input.extend([product, bias])
        node.attr["data_format"].s = b"NHWC"
        fusion.nodes.append(node.name)
    return fusion
