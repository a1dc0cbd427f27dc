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

Only the shapes this module knows are changed (an allow-list): a graph without functions
(a function's own variable ops may name the same resource by its ``shared_name``), whose
every variable is read only by the read op of its kind, with the variable as its only
input; numeric or boolean values, of at most ``FREEZE_MAX_BYTES`` in all. Any other use
(a variable passed to a function call, a gather on a resource, a control edge) leaves
the whole graph as it was restored. The values are the ones ``loaders.restore`` has
already checked against the shapes the graph declares. Each variable becomes one
``Const``, however many reads it has: its first read; the others read that constant
through an ``Identity``.

A frozen graph must be run with grappler's constant folding off (``loaders.base``,
``new_session(..., frozen=True)``): with the weights as constants, folding reassociates
float arithmetic, e.g. ``(x + b1) + b2`` into ``x + (b1 + b2)``, which moved a score by
1.5e-4 in a graph that centres a timestamp feature before adding its bias. With folding
off the frozen graph's scores were bit-identical to the restored graph's.

Memory: a frozen value is held by the imported graph's node and by the session's
constant kernel (a 128 MiB variable took ~0.7 GiB of resident memory after load, against
~0.2 GiB restored), hence the cap: models beyond it keep their variables.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loaders._tf import tf

__all__ = ["FREEZE_MAX_BYTES", "freeze_variables"]

# Values beyond this, in all, stay in variables: frozen, a value is held several times
# over (above). Scoring MLPs are far below it (the benchmark's: 0.3 MiB per member).
FREEZE_MAX_BYTES = 32 * 2**20
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
    if (not variables or set(variables) != set(values) or graph_def.library.function
            or any(v.dtype.kind not in "biufc" for v in values.values())
            or sum(v.nbytes for v in values.values()) > FREEZE_MAX_BYTES):
        return None
    reads = _reads(graph_def, variables)
    if reads is None:
        return None
    frozen = tf.compat.v1.GraphDef()
    frozen.versions.CopyFrom(graph_def.versions)
    constants: dict[str, str] = {}  # variable -> the read that holds its value
    for node in graph_def.node:
        if node.name in variables:
            continue
        if node.name not in reads:
            frozen.node.add().CopyFrom(node)
            continue
        var = reads[node.name]
        dtype = tf.dtypes.as_dtype(values[var].dtype)
        if node.attr[_DTYPE_ATTR[node.op]].type != dtype.as_datatype_enum:
            return None
        copy = frozen.node.add()
        copy.name, copy.device = node.name, node.device
        if var in constants:  # one copy of the value: a further read reads the constant
            copy.op = "Identity"
            copy.input.append(constants[var])
            copy.attr["T"].type = dtype.as_datatype_enum
            continue
        constants[var] = node.name
        copy.op = "Const"
        copy.attr["dtype"].type = dtype.as_datatype_enum
        copy.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(values[var], dtype=dtype))
    return frozen, len(variables)
