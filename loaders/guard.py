"""Check every op a model will run against an allow-list of pure compute ops.

A checkpoint or SavedModel is code: its graph can read and write files (``WriteFile``,
``SaveV2``, ``PrintV2`` to a ``file://`` stream), list them, run Python (``PyFunc``) or
reach the network, and such ops can hide behind names, saver scopes, restore ops, nested
functions or a ``.pbtxt`` serialization. A deny-list of bad ops is always one op short, so
the check runs the other way round: the loader prunes the graph to what computes the
output (``loaders.subgraph``), and every op in that subgraph and in every function it
calls, however deeply, must be on :data:`ALLOWED_OPS`: arithmetic, neural-network
kernels, shape and indexing ops, functional control flow, and reading variables that
the loader itself restores. Anything else is refused by name before anything runs, unless
the manifest's ``allow_ops`` lists it for that member; nothing else widens the list.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from loaders.errors import ModelLoadError
from loaders.subgraph import VARIABLE_OPS, called_functions

__all__ = ["ALLOWED_OPS", "check_ops", "check_static_sizes"]

ALLOWED_OPS = frozenset({
    # graph plumbing: feeds, constants, identity, no-ops, functional calls and control flow
    # (the bodies they call are checked like the top level)
    "Placeholder", "PlaceholderWithDefault", "Const", "Identity", "IdentityN", "NoOp",
    "StopGradient", "PreventGradient", "Snapshot", "EnsureShape", "CheckNumerics",
    "PartitionedCall", "StatefulPartitionedCall", "If", "StatelessIf", "Case",
    "StatelessCase", "Switch", "Merge", "ControlTrigger",
    # Loops (While, StatelessWhile, TF1's Enter/Exit/NextIteration/LoopCond) are left out:
    # a loop need not end, and a scoring model rarely has one. allow_ops admits them.
    # variables, restored by the loader's own ops (loaders.restore)
    "VariableV2", "Variable", "VarHandleOp", "ReadVariableOp", "VarIsInitializedOp",
    # elementwise arithmetic and comparisons
    "Abs", "Add", "AddV2", "AddN", "Sub", "Mul", "MulNoNan", "Div", "DivNoNan", "RealDiv",
    "FloorDiv", "FloorMod", "TruncateDiv", "TruncateMod", "Mod", "Neg", "Reciprocal", "Inv",
    "Square", "SquaredDifference", "Sqrt", "Rsqrt", "Pow", "Exp", "Expm1", "Log", "Log1p",
    "Sign", "Floor", "Ceil", "Round", "Rint", "Maximum", "Minimum", "ClipByValue", "Sin",
    "Cos", "Tan", "Asin", "Acos", "Atan", "Atan2", "Sinh", "Cosh", "Tanh", "Asinh", "Acosh",
    "Atanh", "Erf", "Erfc", "Erfinv", "Lgamma", "Digamma", "Xlogy", "Xdivy", "Xlog1py",
    "Sigmoid", "IsNan", "IsInf", "IsFinite", "Less", "LessEqual", "Greater",
    "GreaterEqual", "Equal", "NotEqual", "ApproximateEqual", "LogicalAnd", "LogicalOr",
    "LogicalNot", "Select", "SelectV2", "Cast", "Bitcast", "ZerosLike", "OnesLike",
    # linear algebra
    "MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "Tensordot",
    "BiasAdd", "BiasAddV1", "Cross", "MatrixDiag", "MatrixDiagV2", "MatrixDiagV3",
    "MatrixDiagPart", "MatrixDiagPartV2", "MatrixDiagPartV3", "MatrixBandPart",
    # activations and normalization
    "Relu", "Relu6", "Elu", "Selu", "LeakyRelu", "Softplus", "Softsign", "Softmax",
    "LogSoftmax", "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3",
    "LRN", "L2Loss",
    # convolutions and pooling (tabular models sometimes embed them)
    "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2dNative", "MaxPool", "MaxPoolV2",
    "MaxPool3D", "AvgPool", "AvgPool3D",
    # reductions and scans
    "Sum", "Mean", "Prod", "Max", "Min", "All", "Any", "ArgMax", "ArgMin", "Cumsum",
    "Cumprod", "TopKV2", "EuclideanNorm",
    # shapes, slicing, indexing, reshaping
    "Shape", "ShapeN", "Size", "Rank", "Reshape", "Squeeze", "ExpandDims", "Transpose",
    "ConjugateTranspose", "Pack", "Unpack", "Concat", "ConcatV2", "ConcatOffset", "Split",
    "SplitV", "Slice", "StridedSlice", "Tile", "Pad", "PadV2", "MirrorPad", "Fill", "Range",
    "Gather", "GatherV2", "GatherNd", "ResourceGather", "ScatterNd", "OneHot", "Where",
    "Reverse", "ReverseV2", "BroadcastTo", "BroadcastArgs", "BroadcastGradientArgs",
    "LinSpace", "InvertPermutation", "Unique", "SparseToDense", "DynamicStitch",
    "ParallelDynamicStitch", "DynamicPartition", "Bucketize", "SegmentSum", "SegmentMean",
    "UnsortedSegmentSum", "UnsortedSegmentMax", "UnsortedSegmentMin", "SparseSegmentSum",
    "SparseSegmentMean", "SparseSegmentSqrtN",
    # Not TensorFlow's internal fused kernels (_FusedMatMul, _FusedConv2D, ...): they
    # trust their bias's length and read past a short one. TensorFlow makes them itself
    # from the plain ops above, after checking the shapes.
})

# A Const may store one value for a large shape, which TensorFlow expands at import: a
# few bytes of .meta became GBs of memory. Refused past this many bytes once expanded,
# unless most of them are stored (a frozen graph's weights).
MAX_CONST_EXPANSION = 256 * 2**20


def _nodes(graph_def: Any) -> Iterator[tuple[str | None, Any]]:
    """Every node of ``graph_def`` and of its function library, with its function."""
    for node in graph_def.node:
        yield None, node
    for fn in graph_def.library.function:
        for node in fn.node_def:
            yield fn.signature.name, node


def check_ops(graph_def: Any, *, model: str, source: str, allow: Iterable[str] = ()) -> None:
    """Refuse ``graph_def`` (a pruned subgraph, with the functions it calls) if any op in
    it is neither on the allow-list nor in ``allow``.

    Raises:
        ModelLoadError: naming the op type and the node (and function) that carries it.
    """
    allowed = ALLOWED_OPS | set(allow)
    library = {f.signature.name for f in graph_def.library.function}
    _check_constants(graph_def, model=model, source=source)
    refused: dict[str, str] = {}  # op type -> where its first node is
    for func, node in _nodes(graph_def):
        if node.op not in allowed and node.op not in library and node.op not in refused:
            refused[node.op] = f"node {node.name!r}" + (f" in function {func!r}" if func
                                                        else "")
    if refused:
        ops = sorted(refused)
        listing = "; ".join(f"{op} ({refused[op]})" for op in ops)
        raise ModelLoadError(
            f"model {model!r}: refusing {source}: its graph runs {len(ops)} op type(s) not "
            f"on the allow-list of pure compute ops (such ops may touch files, the network, "
            f"run code or loop without end): {listing}. If you trust this model, add "
            f"'allow_ops: [{', '.join(ops)}]' to its entry in the manifest"
        )
    _check_no_recursion(graph_def, model=model, source=source)
    for func, node in _nodes(graph_def):
        for name in called_functions(node, library):
            if name not in library:
                raise ModelLoadError(
                    f"model {model!r}: refusing {source}: node {node.name!r}"
                    + (f" in function {func!r}" if func else "")
                    + f" calls function {name!r}, which is not in the graph's library"
                )


def _check_constants(graph_def: Any, *, model: str, source: str) -> None:
    """Refuse a constant that expands far beyond what the file stores.

    Raises:
        ModelLoadError: naming the node and both sizes.
    """
    for func, node in _nodes(graph_def):
        if node.op != "Const" or "value" not in node.attr:
            continue
        tensor = node.attr["value"].tensor
        elements = math.prod(max(d.size, 0) for d in tensor.tensor_shape.dim)
        item = (max((len(v) for v in tensor.string_val), default=0) + 8 if tensor.dtype == 7
                else _ITEM_BYTES.get(tensor.dtype, 8))  # 7: DT_STRING, each value copied
        expanded = elements * item
        stored = tensor.ByteSize()
        if expanded > MAX_CONST_EXPANSION and expanded > 4 * stored:
            where = f"node {node.name!r}" + (f" in function {func!r}" if func else "")
            raise ModelLoadError(
                f"model {model!r}: refusing {source}: constant {where} stores {stored:,} "
                f"bytes but expands to {expanded:,} at import; a model does not need that"
            )


# Bytes per element by DataType enum (float, double, int32, uint8, int16, int8, int64,
# bool, bfloat16, half...); anything else counts as 8.
_ITEM_BYTES = {1: 4, 2: 8, 3: 4, 4: 1, 5: 2, 6: 1, 9: 8, 10: 1, 14: 2, 19: 2}


def _check_no_recursion(graph_def: Any, *, model: str, source: str) -> None:
    """Refuse library functions that call themselves, directly or through others: with
    loops off the allow-list, recursion is the other way to run without end (a self-call
    crashed TensorFlow's process with a segfault).

    Raises:
        ModelLoadError: naming the cycle.
    """
    library = {f.signature.name: f for f in graph_def.library.function}
    calls = {name: {c for n in fn.node_def for c in called_functions(n, library)}
             for name, fn in library.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for callee in sorted(calls.get(name, ())):
            if state.get(callee) == 1:
                cycle = " -> ".join([*path[path.index(callee):], callee])
                raise ModelLoadError(
                    f"model {model!r}: refusing {source}: its functions call themselves "
                    f"({cycle}); recursion need not end"
                )
            if callee in calls and state.get(callee) != 2:
                visit(callee, [*path, callee])
        state[name] = 2

    for name in sorted(calls):
        if state.get(name) != 2:
            visit(name, [name])


# Fixed-size tensors the imported graph may hold in all: a few bytes of graph can ask for
# GBs at run time (Fill, BroadcastTo, Tile, Pad, OneHot or Range with large constant
# shapes), which TensorFlow's shape inference states at import. Tensors whose size depends
# on the batch are not counted; variables count once (their weights).
MAX_STATIC_BYTES = 2 * 2**30


def check_static_sizes(graph: Any, *, model: str, source: str) -> None:
    """After import: refuse a graph whose fully-known tensor sizes add up past
    :data:`MAX_STATIC_BYTES`.

    Raises:
        ModelLoadError: naming the largest tensors.
    """
    sizes: list[tuple[int, str]] = []
    for op in graph.get_operations():
        if op.type in VARIABLE_OPS or op.type in ("Identity", "ReadVariableOp"):
            continue  # weights: as large as the checkpoint that holds them, no larger
        for out in op.outputs:
            shape, dtype = out.shape, out.dtype.base_dtype
            if not shape.is_fully_defined() or dtype.name in ("resource", "variant"):
                continue
            item = dtype.size if dtype.name != "string" else 8
            sizes.append((shape.num_elements() * item, out.name))
    total = sum(n for n, _ in sizes)
    if total > MAX_STATIC_BYTES:
        largest = ", ".join(f"{name} ({n:,} bytes)" for n, name in sorted(sizes)[-3:][::-1])
        raise ModelLoadError(
            f"model {model!r}: refusing {source}: its fixed-size tensors add up to "
            f"{total:,} bytes (largest: {largest}); a scoring model does not need that"
        )
