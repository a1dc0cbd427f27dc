"""Restoring variables with the loader's own ops, after checking every shape and dtype.

A TF1 checkpoint's meta graph supplies its own restore op (``saver_def.restore_op_name``),
and running it runs whatever the graph wired into it. Instead the checkpoint bundle
(``.index`` + ``.data-*``) is read directly with ``tf.train.load_checkpoint``, each value
is checked against the shape and dtype the graph declares for its variable, and assigned
by ``Assign`` / ``AssignVariableOp`` ops the loader builds itself.

The shape check matters beyond safety: TensorFlow does not enforce a resource variable's
declared shape when it is restored, and kernels differ in what they do with a value of
the wrong shape. A bias saved as ``[1]`` under a graph declaring ``[3]`` broadcast in a
plain add, failed in oneDNN's fused kernel, and read past the bias in the non-oneDNN
fused kernel (a silently wrong score). A checkpoint that contradicts its graph is
therefore refused, the same way on every CPU, before anything is scored.

SavedModels are restored by TensorFlow's loader; :func:`check_restored_shapes` applies
the same shape check to their variables afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from loaders._tf import tf
from loaders.errors import ModelLoadError

__all__ = ["VARIABLE_OPS", "check_restored_shapes", "restore_variables", "variable_nodes"]

# Ops that declare a variable: reference variables (TF1 default) and resource variables.
REF_VARIABLE_OPS = frozenset({"VariableV2", "Variable"})
VARIABLE_OPS = REF_VARIABLE_OPS | {"VarHandleOp"}


def variable_nodes(graph_def: Any) -> list[Any]:
    """The variable-declaring nodes of ``graph_def`` (top level; functions take variables
    as captured resource inputs, never declare them)."""
    return [node for node in graph_def.node if node.op in VARIABLE_OPS]


def _declared(node: Any) -> tuple[tf.TensorShape, tf.DType]:
    return (tf.TensorShape(node.attr["shape"].shape),
            tf.dtypes.as_dtype(node.attr["dtype"].type))


def _key(node: Any) -> str:
    """The checkpoint key a ``Saver`` writes for the variable: its name (a resource
    variable's ``shared_name``, which ``get_variable`` makes equal to it)."""
    shared = node.attr["shared_name"].s.decode() if "shared_name" in node.attr else ""
    return shared if node.op == "VarHandleOp" and shared else node.name


def _shape_text(shape: Any) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in list(shape)) + "]"


def _read_checkpoint(model: str, prefix: str) -> Any:
    try:
        return tf.train.load_checkpoint(prefix)
    except Exception as err:  # NotFoundError, DataLossError, ValueError...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"model {model!r}: cannot read checkpoint {prefix}: {first}. Check that the "
            ".index and every .data-* shard were copied completely"
        ) from err


def _checked_values(model: str, prefix: str, nodes: Iterable[Any]) -> dict[str, np.ndarray]:
    """Each variable's value from the bundle, after checking it fits its declaration.

    Raises:
        ModelLoadError: a variable missing from the checkpoint, or saved with another
            shape or dtype than its graph declares (naming the variable and both).
    """
    reader = _read_checkpoint(model, prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    values: dict[str, np.ndarray] = {}
    for node in nodes:
        key = _key(node)
        if key not in shapes:
            raise ModelLoadError(
                f"model {model!r}: variable {node.name!r} is not in checkpoint {prefix} "
                f"(it holds {sorted(shapes)[:8]}{' ...' if len(shapes) > 8 else ''}); the "
                ".meta and the .index/.data files come from different models"
            )
        declared, dtype = _declared(node)
        saved = tf.TensorShape(shapes[key])
        if not declared.is_compatible_with(saved):
            raise ModelLoadError(
                f"model {model!r}: variable {node.name!r} has shape {_shape_text(saved)} in "
                f"checkpoint {prefix}, but its graph declares {_shape_text(declared)}; the "
                ".meta and the .index/.data files come from different models. Export them "
                "together from one training run"
            )
        if dtypes[key] != dtype:
            raise ModelLoadError(
                f"model {model!r}: variable {node.name!r} is {dtypes[key].name} in checkpoint "
                f"{prefix}, but its graph declares {dtype.name}; the .meta and the "
                ".index/.data files come from different models"
            )
        values[node.name] = reader.get_tensor(key)
    return values


def restore_variables(model: str, prefix: str, graph: tf.Graph, session: tf.compat.v1.Session,
                      nodes: list[Any]) -> None:
    """Assign each variable of ``nodes`` (already imported into ``graph``) its checked
    value from the checkpoint at ``prefix``, with assign ops built here.

    Raises:
        ModelLoadError: unreadable checkpoint, or a value that does not fit its variable.
    """
    values = _checked_values(model, prefix, nodes)
    feeds: dict[Any, np.ndarray] = {}
    assigns = []
    with graph.as_default(), tf.name_scope("ensemble_scoring_restore"):
        for node in nodes:
            target = graph.get_tensor_by_name(f"{node.name}:0")
            value = tf.compat.v1.placeholder(_declared(node)[1], values[node.name].shape)
            if node.op in REF_VARIABLE_OPS:
                assigns.append(tf.compat.v1.assign(target, value, validate_shape=False))
            else:
                assigns.append(tf.raw_ops.AssignVariableOp(resource=target, value=value))
            feeds[value] = values[node.name]
    if assigns:
        session.run(assigns, feeds)


def check_restored_shapes(model: str, source: str, graph: tf.Graph,
                          session: tf.compat.v1.Session) -> None:
    """After TensorFlow's own restore (SavedModels): refuse any variable whose value has
    another shape than the graph declares. Variables the restore left uninitialised are
    skipped (scoring would fail on them with TensorFlow's own message).

    Raises:
        ModelLoadError: naming the variable and both shapes.
    """
    nodes = [op for op in graph.get_operations() if op.type in VARIABLE_OPS]
    if not nodes:
        return
    with graph.as_default(), tf.name_scope("ensemble_scoring_check"):
        probes = [tf.shape(op.outputs[0]) if op.type in REF_VARIABLE_OPS
                  else tf.raw_ops.VariableShape(input=op.outputs[0]) for op in nodes]
    for op, probe in zip(nodes, probes, strict=True):
        try:
            actual = tf.TensorShape(session.run(probe).tolist())
        except tf.errors.OpError:
            continue
        declared = tf.TensorShape(op.get_attr("shape"))
        if not declared.is_compatible_with(actual):
            raise ModelLoadError(
                f"model {model!r}: variable {op.name!r} was restored with shape "
                f"{_shape_text(actual)} from {source}, but its graph declares "
                f"{_shape_text(declared)}; the graph and the variables come from different "
                "models. Export them together"
            )
