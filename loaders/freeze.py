"""Variables turned into constants at load, where every use of them is a plain read.

A restored variable is read by a ``ReadVariableOp`` (resource variables) or an
``Identity`` (reference variables) on every ``Session.run``. With the values in ``Const``
nodes instead, TensorFlow knows the weights cannot change between runs, and on the
2-core AVX-512 EPYC the benchmark's 32-256-256-1 MLPs ran faster on both CPU paths
(``Session.run`` alone, 4 members in 4 threads, 4 interleaved rounds): oneDNN on,
1.19 -> 1.25 M/s at 16k-row feeds and 1.22 -> 1.29 at 262k; oneDNN off, on the
``BiasAdd``-rewritten graphs, 1.20 -> 1.23 and 1.24 -> 1.28. Scores moved by at most
2.4e-7 (another kernel's rounding).

Only the shapes this module knows are changed (an allow-list): every variable of the
scoring subgraph is read by exactly one kind of node, the read op of its kind, with the
variable as its only input; and the values fit well inside a ``GraphDef`` (protobuf caps
one at 2 GiB). Any other use (a variable passed to a function call, a gather on a
resource, a control edge) leaves the whole graph as it was restored. The values are the
ones ``loaders.restore`` has already checked against the shapes the graph declares.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loaders._tf import tf

__all__ = ["FREEZE_MAX_BYTES", "freeze_variables"]

# Values beyond this stay in variables: a GraphDef must stay under protobuf's 2 GiB, and
# the constants are copied once into the graph (the restored copy is then dropped).
FREEZE_MAX_BYTES = 256 * 2**20
# The variable ops, and the only op each may be read by for the graph to be frozen.
_READ_OP = {"VarHandleOp": "ReadVariableOp", "VariableV2": "Identity", "Variable": "Identity"}
_DTYPE_ATTR = {"ReadVariableOp": "dtype", "Identity": "T"}


def _reads(graph_def: Any, variables: dict[str, Any]) -> dict[str, str] | None:
    """Read node -> variable, or None if any variable is used otherwise than read."""
    reads: dict[str, str] = {}
    for node in graph_def.node:
        sources = [i.lstrip("^").partition(":")[0] for i in node.input]
        if node.name in variables:
            if node.input:
                return None  # a variable with inputs (control edges): not a plain one
            continue
        used = [s for s in sources if s in variables]
        if not used:
            continue
        var = used[0]
        if (len(node.input) != 1 or node.input[0] not in (var, f"{var}:0")
                or node.op != _READ_OP[variables[var].op]):
            return None
        reads[node.name] = var
    return reads


def freeze_variables(graph_def: Any, values: dict[str, np.ndarray]) -> tuple[Any, int] | None:
    """A copy of ``graph_def`` in which each variable read is a ``Const`` holding the
    variable's value (``values``: variable node name -> checked value), and how many
    variables were frozen; None where the graph is to be left as restored."""
    variables = {n.name: n for n in graph_def.node if n.op in _READ_OP}
    if (not variables or set(variables) != set(values)
            or sum(v.nbytes for v in values.values()) > FREEZE_MAX_BYTES):
        return None
    reads = _reads(graph_def, variables)
    if reads is None:
        return None
    frozen = tf.compat.v1.GraphDef()
    frozen.versions.CopyFrom(graph_def.versions)
    frozen.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        if node.name in variables:
            continue
        if node.name not in reads:
            frozen.node.add().CopyFrom(node)
            continue
        value = values[reads[node.name]]
        dtype = tf.dtypes.as_dtype(value.dtype)
        if node.attr[_DTYPE_ATTR[node.op]].type != dtype.as_datatype_enum:
            return None
        const = frozen.node.add()
        const.name, const.op, const.device = node.name, "Const", node.device
        const.attr["dtype"].type = dtype.as_datatype_enum
        const.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
    return frozen, len(variables)
