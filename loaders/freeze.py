"""Variables turned into constants at load, where every use of them is a plain read.

A restored variable is read by a ``ReadVariableOp`` (resource variables) or an
``Identity`` (reference variables) on every ``Session.run``. With the values in ``Const``
nodes instead, TensorFlow knows the weights cannot change between runs, and on the
2-core AVX-512 EPYC with oneDNN on, the benchmark's 32-256-256-1 MLPs ran 6-7 % faster
(``Session.run`` alone, 4 members in 4 threads, 4 interleaved rounds of 4-s windows, the
frozen graphs run with constant folding off as below): 1.14 -> 1.21 M/s at 16k-row feeds,
1.17 -> 1.25 at 262k. With oneDNN off (on the ``BiasAdd``-rewritten graphs) it gained
nothing (1.19 vs 1.18, 1.22 vs 1.23), so by default the loader freezes only on oneDNN's
path (``loaders.cpu``). The scores were bit-identical.

Only the shapes this module knows are changed (an allow-list), the dense layers where
the gain was measured: a graph without functions (a function's own variable ops may name
the same resource by its ``shared_name``) and without floating-point constants of its
own (below), in which each variable has exactly one read, the read op of its kind with
the variable as its only input, neither the model's input nor its output, feeding only
``MatMul``, ``BiasAdd`` or an add; numeric values, of at most ``FREEZE_MAX_BYTES`` in
all. Anything else leaves the whole graph as it was restored. The values are the ones
``loaders.restore`` has already checked against the shapes the graph declares.

A frozen graph must be run with grappler's constant folding off (``loaders.base``,
``new_session(..., frozen=True)``): with the weights as constants, folding reassociates
float arithmetic, e.g. ``(x + b1) + b2`` into ``x + (b1 + b2)``, which moved a score by
1.5e-4 in a graph that centres a timestamp feature before adding its bias. With folding
off the frozen graph's scores were bit-identical to the restored graph's. Folding is off
for the whole graph, so a graph with floating-point constants of its own, which folding
combines in the restored graph, is not frozen: it would round differently on the two
CPU paths. Grappler rewrites that need a constant operand (a constant exponent, a
constant scale before a convolution) are why the frozen values may feed dense layers
only.

Memory: a frozen value is held by the imported graph's node, by the session's constant
kernel and, while grappler optimises the graph, by its copies (a 128 MiB variable took
~0.7 GiB of resident memory after load, against ~0.2 GiB restored), hence the cap:
models beyond it keep their variables.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loaders._tf import tf

__all__ = ["FREEZE_MAX_BYTES", "freeze_variables"]

# Values beyond this, in all, stay in variables: frozen, a value is held several times
# over while grappler optimises the graph (a 16 MiB weight: ~0.8 GiB at the peak of the
# load, against ~0.6 GiB restored). Scoring MLPs are far below it (the benchmark's:
# 0.3 MiB per member).
FREEZE_MAX_BYTES = 8 * 2**20
# The variable ops, and the only op each may be read by for the graph to be frozen.
_READ_OP = {"VarHandleOp": "ReadVariableOp", "VariableV2": "Identity", "Variable": "Identity"}
_DTYPE_ATTR = {"ReadVariableOp": "dtype", "Identity": "T"}
# What a frozen value may feed: a dense layer's product and bias, where the gain was
# measured and where no grappler rewrite depends on an operand being constant (a
# constant exponent or a constant scale of a convolution's input would be rewritten, and
# round differently from the graph with its variables).
_CONSUMERS = frozenset({"MatMul", "BiasAdd", "Add", "AddV2"})


def _sources(node: Any) -> list[str]:
    return [i.lstrip("^").partition(":")[0] for i in node.input]


def _reads(graph_def: Any, variables: dict[str, Any], keep: frozenset[str]
           ) -> dict[str, str] | None:
    """Read node -> variable, or None unless each variable has exactly one read, a plain
    one (the variable its only input), not among ``keep``, feeding only ``_CONSUMERS``."""
    reads: dict[str, str] = {}
    for node in graph_def.node:
        if node.name in variables:
            if node.input:
                return None  # a variable with inputs (control edges): not a plain one
            continue
        used = [s for s in _sources(node) if s in variables]
        if not used:
            continue
        var = used[0]
        if (len(node.input) != 1 or node.input[0] not in (var, f"{var}:0")
                or node.op != _READ_OP[variables[var].op] or node.name in keep
                or var in reads.values()):
            return None
        reads[node.name] = var
    for node in graph_def.node:
        sources = _sources(node)
        if any(s in reads for s in sources) and (
                node.op not in _CONSUMERS or any(i.startswith("^") for i in node.input)):
            return None
    return reads


def freeze_variables(graph_def: Any, values: dict[str, np.ndarray],
                     keep: frozenset[str] = frozenset()) -> tuple[Any, int] | None:
    """A copy of ``graph_def`` in which each variable's read is a ``Const`` holding the
    variable's value (``values``: variable node name -> checked value), and how many
    variables were frozen; None where the graph is to be left as restored. ``keep``:
    nodes that must stay as they are (the model's input and output)."""
    variables = {n.name: n for n in graph_def.node if n.op in _READ_OP}
    if (not variables or set(variables) != set(values) or graph_def.library.function
            or any(v.dtype.kind not in "biufc" for v in values.values())
            or sum(v.nbytes for v in values.values()) > FREEZE_MAX_BYTES
            or any(_float_constant(n) for n in graph_def.node)):
        return None
    reads = _reads(graph_def, variables, keep)
    if reads is None:
        return None
    frozen = tf.compat.v1.GraphDef()
    frozen.versions.CopyFrom(graph_def.versions)
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


def _float_constant(node: Any) -> bool:
    """A constant of the graph's own that grappler's constant folding, on for graphs with
    variables and off for frozen ones, could combine with others: a graph with one would
    round differently frozen than restored."""
    if node.op != "Const":
        return False
    dtype = tf.dtypes.as_dtype(node.attr["dtype"].type)
    return dtype.is_floating or dtype.is_complex
