"""TF1 ``tf.compat.v1.train.Saver`` checkpoints (prefix + .meta + .index + .data-*)."""

from __future__ import annotations

import time
from typing import Any

from loaders._tf import tf
from loaders.base import GraphScorer, tensor_name
from loaders.cpu import cpu_path
from loaders.errors import ModelLoadError, first_error_line
from loaders.guard import check_ops, check_static_sizes
from loaders.manifest import ModelSpec
from loaders.restore import restored_scorer, saver_keys, variable_nodes
from loaders.rewrite import Fusion, fuse_bias_adds
from loaders.subgraph import node_name, prune

__all__ = ["load_checkpoint"]


def _get_tensor(graph: tf.Graph, spec: ModelSpec, role: str, name: str) -> tf.Tensor:
    try:
        return graph.get_tensor_by_name(tensor_name(name))
    except (KeyError, ValueError) as err:
        if role == "input":  # the node exists (checked before pruning): not upstream
            raise ModelLoadError(
                f"model {spec.name!r}: output {tensor_name(spec.output or '')!r} does not "
                f"depend on input {tensor_name(name)!r} in the graph of {spec.path}; point "
                "'input' at the placeholder the features are fed to"
            ) from err
        raise ModelLoadError(
            f"model {spec.name!r}: {role} tensor {tensor_name(name)!r} is not in the graph "
            f"of {spec.path} ({err}); name an output of the node, such as 'score:0'"
        ) from err


def load_checkpoint(spec: ModelSpec, prefix: str, digest: str, *, fuse: bool | None = None,
                    freeze: bool | None = None) -> GraphScorer:
    """Import the subgraph that computes the output into a fresh graph, and restore its
    variables into that graph's session with the loader's own ops.

    Only the nodes the output needs are imported (``loaders.subgraph``), after the op
    checks; the checkpoint's own saver never runs (``loaders.restore``). ``fuse`` rewrites
    ``MatMul + bias`` adds to ``BiasAdd`` (``loaders.rewrite``); by default it is done only
    where TensorFlow does not fuse them itself (``loaders.cpu``). ``freeze`` turns the
    variables into constants where ``loaders.freeze`` allows it; by default only on
    oneDNN's path, where it pays. The benchmark turns both off to measure the graphs as
    saved.

    Raises:
        ModelLoadError: unreadable or contradictory checkpoint, or unknown tensor names.
    """
    assert spec.input is not None and spec.output is not None
    start = time.perf_counter()
    meta = _read_meta(spec, prefix)
    _require_node(meta.graph_def, spec, "input", spec.input)
    _require_node(meta.graph_def, spec, "output", spec.output)
    graph_def = prune(meta.graph_def, tensor_name(spec.output))
    check_ops(graph_def, model=spec.name, source=f"{prefix}.meta", allow=spec.allow_ops)
    if fuse is None:
        fuse = not cpu_path().fuses_matmul_add
    fusion = fuse_bias_adds(graph_def) if fuse else Fusion()
    variables = variable_nodes(graph_def)
    graph, input_tensor, output_tensor = _import(spec, prefix, graph_def)
    return restored_scorer(spec, source=prefix, digest=digest, graph=graph,
                           tensors=(input_tensor, output_tensor), variables=variables,
                           checkpoint=prefix,
                           keys=saver_keys(meta.graph_def, meta.saver_def.restore_op_name),
                           started=start, fused_bias_adds=len(fusion.nodes), freeze=freeze)


def _import(spec: ModelSpec, prefix: str, graph_def: Any) -> tuple[tf.Graph, Any, Any]:
    """A fresh graph holding ``graph_def``, with its input and output tensors."""
    assert spec.input is not None and spec.output is not None
    graph = tf.Graph()
    with graph.as_default():
        try:
            tf.compat.v1.import_graph_def(graph_def, name="")
        except Exception as err:  # protobuf and TF raise a zoo of types here
            raise ModelLoadError(
                f"model {spec.name!r}: cannot import meta graph {prefix}.meta: "
                f"{first_error_line(err)}; the file may be truncated or from an incompatible "
                "TensorFlow"
            ) from err
        check_static_sizes(graph, model=spec.name, source=f"{prefix}.meta")
        return (graph, _get_tensor(graph, spec, "input", spec.input),
                _get_tensor(graph, spec, "output", spec.output))


def _read_meta(spec: ModelSpec, prefix: str) -> Any:
    # Imported here, not at the top: importing a loader must not import TensorFlow, whose
    # environment (log level, allocator) tasks.runtime.set_up sets first.
    from tensorflow.core.protobuf import meta_graph_pb2

    meta = meta_graph_pb2.MetaGraphDef()
    try:
        with open(f"{prefix}.meta", "rb") as fh:
            data = fh.read()
        meta.ParseFromString(data)
    except Exception as err:
        raise ModelLoadError(
            f"model {spec.name!r}: cannot read meta graph {prefix}.meta ({err}); the file "
            "may be truncated or not a MetaGraphDef"
        ) from err
    if not data or not meta.graph_def.node:
        raise ModelLoadError(
            f"model {spec.name!r}: meta graph {prefix}.meta is empty (no graph in it); "
            "re-save the checkpoint with Saver.save(..., write_meta_graph=True)"
        )
    return meta


def _require_node(graph_def: Any, spec: ModelSpec, role: str, name: str) -> None:
    if any(node.name == node_name(name) for node in graph_def.node):
        return
    found = sorted(f"{n.name}:0" for n in graph_def.node if n.op == "Placeholder")
    hint = f"placeholders in this graph: {found[:10]}" if role == "input" else (
        "check the name with `saved_model_cli` or by listing graph.get_operations()")
    raise ModelLoadError(
        f"model {spec.name!r}: {role} tensor {tensor_name(name)!r} is not in the graph "
        f"of {spec.path}; {hint}"
    )
