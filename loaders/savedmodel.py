"""SavedModels (TF1 builder, TF2 ``tf.saved_model.save``, Keras ``model.export``), loaded
in graph mode into their own graph and session."""

from __future__ import annotations

import time
from pathlib import Path

from loaders._tf import tf
from loaders.base import GraphScorer, new_session
from loaders.errors import ModelLoadError
from loaders.guard import check_meta_graph
from loaders.manifest import ModelSpec
from loaders.restore import check_restored_shapes

__all__ = ["load_saved_model"]


def _pick(spec: ModelSpec, role: str, wanted: str | None, options: dict[str, object]) -> str:
    if wanted is not None:
        if wanted in options:
            return wanted
        raise ModelLoadError(
            f"model {spec.name!r}: signature {spec.signature!r} has no {role} {wanted!r}; "
            f"it has {sorted(options)}"
        )
    if len(options) == 1:
        return next(iter(options))
    raise ModelLoadError(
        f"model {spec.name!r}: signature {spec.signature!r} has {len(options)} {role}s "
        f"{sorted(options)}; choose one with '{role}:' in the manifest"
    )


def _inspect(spec: ModelSpec, folder: str) -> None:
    """Check the ops of the meta graph that will be loaded, before loading it."""
    pb = Path(folder) / "saved_model.pb"
    if not pb.is_file():
        return  # saved_model.pbtxt: the loader parses it; rare enough to not inspect twice
    # Imported here, not at the top: a top-level tensorflow import could run before
    # loaders._tf has set TensorFlow's environment (log level, BFC allocator).
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(pb.read_bytes())
    except Exception as err:
        raise ModelLoadError(
            f"model {spec.name!r}: cannot read {pb} ({err}); the SavedModel may be truncated"
        ) from err
    wanted = set(spec.tags)
    for meta in saved.meta_graphs:
        if set(meta.meta_info_def.tags) == wanted:
            check_meta_graph(meta, model=spec.name, source=str(pb), allow=spec.allow_ops)
            return
    # No exact match: the loader reports the missing tags with the available ones.


def load_saved_model(spec: ModelSpec, folder: str, digest: str) -> GraphScorer:
    """Load the SavedModel's meta graph into a fresh graph and resolve its signature.

    Raises:
        ModelLoadError: unreadable SavedModel, unknown tags, signature or keys.
    """
    start = time.perf_counter()
    _inspect(spec, folder)
    graph = tf.Graph()
    session = new_session(graph)
    try:
        with graph.as_default():
            meta = tf.compat.v1.saved_model.loader.load(session, list(spec.tags), folder)
    except Exception as err:
        session.close()
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelLoadError(
            f"model {spec.name!r}: cannot load SavedModel {folder} with tags "
            f"{list(spec.tags)}: {detail}"
        ) from err
    try:
        check_restored_shapes(spec.name, folder, graph, session)
    except ModelLoadError:
        session.close()
        raise
    signatures = dict(meta.signature_def)
    if spec.signature not in signatures:
        session.close()
        raise ModelLoadError(
            f"model {spec.name!r}: SavedModel {folder} has no signature {spec.signature!r}; "
            f"it has {sorted(signatures)}. Set 'signature' in the manifest"
        )
    sig = signatures[spec.signature]
    try:
        in_key = _pick(spec, "input", spec.input, dict(sig.inputs))
        out_key = _pick(spec, "output", spec.output, dict(sig.outputs))
    except ModelLoadError:
        session.close()
        raise
    input_tensor = graph.get_tensor_by_name(sig.inputs[in_key].name)
    output_tensor = graph.get_tensor_by_name(sig.outputs[out_key].name)
    graph.finalize()
    return GraphScorer(
        name=spec.name,
        digest=digest,
        source=folder,
        graph=graph,
        session=session,
        input_tensor=input_tensor,
        output_tensor=output_tensor,
        load_seconds=time.perf_counter() - start,
    )
