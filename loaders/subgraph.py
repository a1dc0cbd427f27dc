"""The part of a model's graph that scoring runs: from the input to the output, nothing else.

A checkpoint's meta graph carries much more than the model: the saver's save and restore
ops, training ops, summaries, whatever its author (or an attacker) put there. The loader
imports only the nodes the output needs and the library functions those nodes call, so
nothing else is even in the session's graph, and the op checks see exactly what can run.
Pure protobuf work, no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["REF_VARIABLE_OPS", "VARIABLE_OPS", "called_functions", "node_name", "prune"]

# Ops that declare a variable: reference variables (TF1 default) and resource variables.
REF_VARIABLE_OPS = frozenset({"VariableV2", "Variable"})
VARIABLE_OPS = REF_VARIABLE_OPS | {"VarHandleOp"}


def node_name(tensor: str) -> str:
    """``scope/op:1`` or ``^scope/op`` -> ``scope/op``."""
    return tensor.lstrip("^").split(":")[0]


def called_functions(node: Any, library: Iterable[str]) -> Iterator[str]:
    """Library functions ``node`` calls: as its op type, or through a ``func`` attribute
    (``PartitionedCall``, ``While``, ``If``... take theirs that way)."""
    names = set(library)
    if node.op in names:
        yield node.op
    for value in node.attr.values():
        if value.HasField("func"):
            yield value.func.name
        for func in value.list.func:
            yield func.name


def prune(graph_def: Any, output: str) -> Any:
    """A copy of ``graph_def`` holding only what computing ``output`` needs: the nodes
    behind it (data and control inputs alike, up to and including the input placeholder)
    and the library functions they call, transitively.

    Raises:
        KeyError: ``output`` names no node of the graph.
    """
    nodes = {node.name: node for node in graph_def.node}
    if node_name(output) not in nodes:
        raise KeyError(node_name(output))
    keep: set[str] = set()
    stack = [node_name(output)]
    while stack:
        name = stack.pop()
        if name in keep or name not in nodes:
            continue
        keep.add(name)
        stack.extend(node_name(i) for i in nodes[name].input)
    library = {f.signature.name: f for f in graph_def.library.function}
    funcs: set[str] = set()
    fstack = [f for name in keep for f in called_functions(nodes[name], library)]
    while fstack:
        fname = fstack.pop()
        if fname in funcs or fname not in library:
            continue
        funcs.add(fname)
        for node in library[fname].node_def:
            fstack.extend(called_functions(node, library))
    out = type(graph_def)()
    out.versions.CopyFrom(graph_def.versions)
    out.node.extend(node for node in graph_def.node if node.name in keep)
    out.library.function.extend(library[f] for f in sorted(funcs))
    out.library.gradient.extend(g for g in graph_def.library.gradient
                                if g.function_name in funcs)
    return out
