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

SavedModels are restored the same way from their ``variables/`` bundle. Where a
graph's variables are named otherwise in the checkpoint (TF2 object paths, renamed
``Saver`` keys), the mapping is read from the graph's restore ops without running them
(:func:`saver_keys`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from loaders._tf import tf
from loaders.base import GraphScorer, new_session
from loaders.cpu import cpu_path
from loaders.errors import ModelLoadError, first_error_line
from loaders.freeze import freeze_variables
from loaders.manifest import ModelSpec
from loaders.subgraph import REF_VARIABLE_OPS, VARIABLE_OPS, called_functions, node_name, prune

__all__ = [
    "assign_values",
    "checked_values",
    "restored_scorer",
    "saver_keys",
    "variable_nodes",
]



def variable_nodes(graph_def: Any) -> list[Any]:
    """The variable-declaring nodes of ``graph_def`` (top level; functions take variables
    as captured resource inputs, never declare them)."""
    return [node for node in graph_def.node if node.op in VARIABLE_OPS]


def _declared(node: Any) -> tuple[tf.TensorShape, tf.DType]:
    return (tf.TensorShape(node.attr["shape"].shape),
            tf.dtypes.as_dtype(node.attr["dtype"].type))


def _key(node: Any, keys: dict[str, str]) -> str:
    """The checkpoint key for the variable: as the graph's own restore op names it
    (:func:`saver_keys`), else what a ``Saver`` writes by default, its name (a resource
    variable's ``shared_name``, which ``get_variable`` makes equal to it)."""
    if node.name in keys:
        return keys[node.name]
    shared = node.attr["shared_name"].s.decode() if "shared_name" in node.attr else ""
    return shared if node.op == "VarHandleOp" and shared else node.name


def _restore_source(ref: str, nodes: dict[str, Any]) -> tuple[Any, int] | None:
    """The ``RestoreV2`` node and output index that ``ref`` reads, through identities."""
    for _ in range(8):
        parts = ref.lstrip("^").split(":")
        node = nodes.get(parts[0])
        if node is None:
            return None
        if node.op in ("RestoreV2", "Restore", "RestoreSlice"):
            return node, int(parts[-1]) if len(parts) > 1 else 0
        if node.op != "Identity" or not node.input:
            return None
        ref = node.input[0]
    return None


def _assigned_keys(nodes: dict[str, Any], target_of: Any, keys: dict[str, str]) -> None:
    for node in nodes.values():
        if node.op not in ("Assign", "AssignVariableOp") or len(node.input) < 2:
            continue
        source = _restore_source(node.input[1], nodes)
        target = target_of(node.input[0])
        if source is None or target is None:
            continue
        restore, index = source
        names = nodes.get(restore.input[1].split(":")[0]) if len(restore.input) > 1 else None
        if names is None or names.op != "Const":
            continue
        values = names.attr["value"].tensor.string_val
        if index < len(values):
            keys[target] = values[index].decode("utf-8", "replace")


def saver_keys(graph_def: Any, restore_op: str = "") -> dict[str, str]:
    """Variable node name -> checkpoint key, as the graph's restore op (``restore_op``,
    the meta graph's ``saver_def.restore_op_name``) would assign them, read from its
    definition and never run.

    A ``Saver`` built with renamed keys, and every TF2 SavedModel (whose keys are object
    paths such as ``ws/0/0/.ATTRIBUTES/VARIABLE_VALUE``), name their variables in the
    checkpoint otherwise than the graph does; the restore subgraph (top-level ``RestoreV2``
    + ``Assign``, or a restore function called with the variables' handles) is where the
    mapping is written down. Only the subgraph of ``restore_op`` counts: a graph may hold
    other savers (warm-start, moving averages) that map the same variables to other keys.
    """
    if restore_op and node_name(restore_op) in {n.name for n in graph_def.node}:
        graph_def = prune(graph_def, restore_op)
    nodes = {node.name: node for node in graph_def.node}
    library = {f.signature.name: f for f in graph_def.library.function}
    keys: dict[str, str] = {}
    _assigned_keys(nodes, lambda ref: ref.lstrip("^").split(":")[0], keys)
    for node in graph_def.node:
        for fname in called_functions(node, library):
            fn = library.get(fname)
            if fn is None or not any(n.op == "RestoreV2" for n in fn.node_def):
                continue
            outer = [i for i in node.input if not i.startswith("^")]
            args = {arg.name: outer[k].split(":")[0]
                    for k, arg in enumerate(fn.signature.input_arg) if k < len(outer)}
            _assigned_keys({n.name: n for n in fn.node_def},
                           lambda ref, args=args: args.get(ref.split(":")[0]), keys)
    return keys


def _shape_text(shape: Any) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in list(shape)) + "]"


def _read_checkpoint(model: str, prefix: str) -> Any:
    try:
        return tf.train.load_checkpoint(prefix)
    except Exception as err:  # NotFoundError, DataLossError, ValueError...
        raise ModelLoadError(
            f"model {model!r}: cannot read checkpoint {prefix}: {first_error_line(err)}. Check "
            "that the .index and every .data-* shard were copied completely"
        ) from err


def _check_distinct(model: str, nodes: Iterable[Any]) -> None:
    """Refuse two variable nodes that name one resource (the same ``shared_name``): each
    would pass its own shape check, and whichever is restored last would win for both.

    Raises:
        ModelLoadError: naming both nodes.
    """
    seen: dict[tuple[str, str], str] = {}
    for node in nodes:
        container = node.attr["container"].s.decode() if "container" in node.attr else ""
        shared = node.attr["shared_name"].s.decode() if "shared_name" in node.attr else ""
        # TensorFlow's default container is "localhost"; a reference variable without a
        # shared_name is named by its node, a resource variable without one by a fixed
        # anonymous name (so two such are one variable).
        default = node.name if node.op in REF_VARIABLE_OPS else "<anonymous>"
        identity = (container or "localhost", shared or default)
        if identity in seen:
            raise ModelLoadError(
                f"model {model!r}: variables {seen[identity]!r} and {node.name!r} are the "
                f"same variable (shared_name {identity[1]!r}); a graph that aliases its "
                "variables is not supported"
            )
        seen[identity] = node.name


def _checked_values(model: str, prefix: str, nodes: Iterable[Any], keys: dict[str, str]
                    ) -> dict[str, np.ndarray]:
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
        key = _key(node, keys)
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
        try:
            values[node.name] = reader.get_tensor(key)
        except Exception as err:  # IndexError, DataLossError... on a damaged shard
            raise ModelLoadError(
                f"model {model!r}: cannot read checkpoint {prefix}: variable {key!r}: "
                f"{first_error_line(err)}. Check that the .index and every .data-* shard were "
                "copied completely"
            ) from err
    return values


def checked_values(model: str, prefix: str, nodes: list[Any], keys: dict[str, str]
                   ) -> dict[str, np.ndarray]:
    """Each variable of ``nodes``'s value in the checkpoint at ``prefix``, checked against
    the shape and dtype its graph declares; ``keys`` maps variables to checkpoint keys
    where the names differ (:func:`saver_keys`).

    Raises:
        ModelLoadError: unreadable checkpoint, or a value that does not fit its variable.
    """
    if not nodes:
        return {}
    _check_distinct(model, nodes)
    return _checked_values(model, prefix, nodes, keys)


def assign_values(graph: tf.Graph, session: tf.compat.v1.Session, nodes: list[Any],
                  values: dict[str, np.ndarray]) -> None:
    """Assign each variable of ``nodes`` (already imported into ``graph``) its value,
    with assign ops built here."""
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


def _frozen(graph: tf.Graph, tensors: tuple[Any, Any],
            values: dict[str, np.ndarray]) -> tuple[tf.Graph, tuple[Any, Any], int] | None:
    """The graph with its variables as constants (``loaders.freeze``) in a fresh graph,
    its (input, output) tensors and how many variables it froze; None where the graph
    is to keep its variables."""
    fresh = tf.Graph()
    try:
        keep = frozenset(t.name.partition(":")[0] for t in tensors)
        frozen = freeze_variables(graph.as_graph_def(), values, keep)
        if frozen is None:
            return None
        graph_def, count = frozen
        with fresh.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
            return (fresh, (fresh.get_tensor_by_name(tensors[0].name),
                            fresh.get_tensor_by_name(tensors[1].name)), count)
    except Exception:  # an optimisation: whatever fails, the graph keeps its variables
        return None


def restored_scorer(spec: ModelSpec, *, source: str, digest: str, graph: tf.Graph,
                    tensors: tuple[Any, Any], variables: list[Any], checkpoint: str,
                    keys: dict[str, str], started: float, fused_bias_adds: int = 0,
                    freeze: bool | None = None) -> GraphScorer:
    """A session on ``graph`` with its ``variables`` restored from ``checkpoint``, the graph
    finalized, as the scorer every format ends in; ``tensors`` is (input, output). With
    ``freeze``, the variables become constants where ``loaders.freeze`` allows it; by
    default only where that pays, on oneDNN's path (``loaders.cpu``). The benchmark turns
    it off to measure the graphs as saved.

    Raises:
        ModelLoadError: the checkpoint cannot be read or does not fit the graph.
    """
    count = 0
    session: tf.compat.v1.Session | None = None
    try:
        values = checked_values(spec.name, checkpoint, variables, keys)
        if freeze is None:
            freeze = cpu_path().onednn
        frozen = _frozen(graph, tensors, values) if freeze and values else None
        if frozen is not None:
            graph, tensors, count = frozen
        session = new_session(graph, frozen=frozen is not None)
        if frozen is None:
            assign_values(graph, session, variables, values)
    except (tf.errors.OpError, ValueError) as err:
        if session is not None:
            session.close()
        raise ModelLoadError(
            f"model {spec.name!r}: cannot restore checkpoint {checkpoint}: "
            f"{first_error_line(err)}. Check that the .index and every .data-* shard were "
            "copied completely"
        ) from err
    except BaseException:
        if session is not None:
            session.close()
        raise
    graph.finalize()
    return GraphScorer(name=spec.name, digest=digest, source=source, graph=graph,
                       session=session, input_tensor=tensors[0], output_tensor=tensors[1],
                       load_seconds=time.perf_counter() - started,
                       fused_bias_adds=fused_bias_adds, frozen_variables=count)
