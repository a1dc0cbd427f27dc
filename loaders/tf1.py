"""TF1 ``tf.compat.v1.train.Saver`` checkpoints (prefix + .meta + .index + .data-*)."""

from __future__ import annotations

import time

import numpy as np

from loaders._tf import tf
from loaders.base import GraphScorer, new_session, tensor_name
from loaders.errors import ModelLoadError
from loaders.guard import check_meta_graph
from loaders.manifest import ModelSpec
from loaders.rewrite import Fusion, fuse_bias_adds

__all__ = ["load_checkpoint", "placeholders"]


def placeholders(graph: tf.Graph) -> list[str]:
    """Placeholder tensor names, offered in errors when a configured name is wrong."""
    return [op.outputs[0].name for op in graph.get_operations() if op.type == "Placeholder"]


def _get_tensor(graph: tf.Graph, spec: ModelSpec, role: str, name: str) -> tf.Tensor:
    try:
        return graph.get_tensor_by_name(tensor_name(name))
    except (KeyError, ValueError) as err:
        hint = f"placeholders in this graph: {placeholders(graph)[:10]}" if role == "input" else (
            "check the name with `saved_model_cli` or by listing graph.get_operations()"
        )
        raise ModelLoadError(
            f"model {spec.name!r}: {role} tensor {tensor_name(name)!r} is not in the graph "
            f"of {spec.path}; {hint}"
        ) from err


def _shapes_hold(graph: tf.Graph, session: tf.compat.v1.Session,
                 shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether the restored weights and biases have the shapes their graph declares."""
    names = list(shapes)
    try:
        values = session.run([graph.get_tensor_by_name(tensor_name(n)) for n in names])
    except tf.errors.OpError:
        return False  # e.g. a variable the checkpoint did not restore
    return all(np.shape(v) == shapes[n] for n, v in zip(names, values, strict=True))


def load_checkpoint(spec: ModelSpec, prefix: str, digest: str, *, fuse: bool = True
                    ) -> GraphScorer:
    """Import the meta graph into a fresh graph and restore the variables into its session.

    Both the import and the restore must run inside ``graph.as_default()``: TF 2.x refuses
    meta graph import under eager execution, and a restore outside finds no variables.
    With ``fuse`` (the default), ``MatMul + bias`` adds become ``BiasAdd`` first, which
    TensorFlow then fuses with the product (``loaders.rewrite``); the benchmark turns it
    off to measure the graphs as saved.

    Raises:
        ModelLoadError: unreadable or incomplete checkpoint, or unknown tensor names.
    """
    assert spec.input is not None and spec.output is not None
    start = time.perf_counter()
    # Imported here, not at the top: a top-level tensorflow import could run before
    # loaders._tf has set TensorFlow's environment (log level, BFC allocator).
    from tensorflow.core.protobuf import meta_graph_pb2

    meta = meta_graph_pb2.MetaGraphDef()
    try:
        with open(f"{prefix}.meta", "rb") as fh:
            meta.ParseFromString(fh.read())
    except Exception as err:
        raise ModelLoadError(
            f"model {spec.name!r}: cannot read meta graph {prefix}.meta ({err}); the file "
            "may be truncated or not a MetaGraphDef"
        ) from err
    check_meta_graph(meta, model=spec.name, source=f"{prefix}.meta", allow=spec.allow_ops)
    fusion = fuse_bias_adds(meta.graph_def) if fuse else Fusion()
    graph = tf.Graph()
    with graph.as_default():
        try:
            saver = tf.compat.v1.train.import_meta_graph(meta, clear_devices=True)
        except Exception as err:  # protobuf and TF raise a zoo of types here
            raise ModelLoadError(
                f"model {spec.name!r}: cannot import meta graph {prefix}.meta: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; "
                "the file may be truncated or from an incompatible TensorFlow"
            ) from err
        input_tensor = _get_tensor(graph, spec, "input", spec.input)
        output_tensor = _get_tensor(graph, spec, "output", spec.output)
    session = new_session(graph)
    try:
        if saver is not None:
            with graph.as_default():
                saver.restore(session, prefix)
    except (tf.errors.OpError, ValueError) as err:
        session.close()
        detail = getattr(err, "message", str(err)).splitlines()[0]
        raise ModelLoadError(
            f"model {spec.name!r}: cannot restore checkpoint {prefix}: {detail}. Check that "
            "the .index and every .data-* shard were copied completely"
        ) from err
    if fusion.nodes and not _shapes_hold(graph, session, fusion.shapes):
        # The checkpoint's values contradict the shapes its graph declares, which the
        # rewrite relied on (see loaders.rewrite): load the graph exactly as saved.
        session.close()
        return load_checkpoint(spec, prefix, digest, fuse=False)
    graph.finalize()
    return GraphScorer(
        name=spec.name,
        digest=digest,
        source=prefix,
        graph=graph,
        session=session,
        input_tensor=input_tensor,
        output_tensor=output_tensor,
        load_seconds=time.perf_counter() - start,
        fused_bias_adds=len(fusion.nodes),
    )
