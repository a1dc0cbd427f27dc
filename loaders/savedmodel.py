"""SavedModels (TF1 builder, TF2 ``tf.saved_model.save``, Keras ``model.export``), loaded
in graph mode into their own graph and session, with nothing of theirs run but the
signature's own compute.

TensorFlow's ``saved_model.loader.load`` would run the model's restore op and its init
op, both supplied by the (untrusted) SavedModel. Instead the meta graph is read here
(``saved_model.pb`` or ``saved_model.pbtxt`` alike), pruned to what the signature's
output needs, checked op by op (``loaders.guard``), imported, and its variables are
restored from ``variables/`` by the loader's own ops (``loaders.restore``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from loaders._tf import tf
from loaders.base import GraphScorer
from loaders.errors import ModelLoadError
from loaders.guard import check_ops, check_static_sizes
from loaders.manifest import ModelSpec
from loaders.restore import restored_scorer, saver_keys, variable_nodes
from loaders.subgraph import node_name, prune

__all__ = ["load_saved_model"]

# Where SavedModels name the op to run once after restoring (TF2, TF1 main op, legacy).
_INIT_SIGNATURE = "__saved_model_init_op"
_INIT_COLLECTIONS = ("saved_model_main_op", "legacy_init_op")


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


def _read(spec: ModelSpec, folder: str) -> Any:
    """The meta graph tagged ``spec.tags``, from ``saved_model.pb`` or ``.pbtxt``."""
    # Imported here, not at the top: importing a loader must not import TensorFlow, whose
    # environment (log level, allocator) tasks.runtime.set_up sets first.
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    pb, pbtxt = Path(folder) / "saved_model.pb", Path(folder) / "saved_model.pbtxt"
    source = pb if pb.is_file() else pbtxt
    try:
        if source is pb:
            saved.ParseFromString(pb.read_bytes())
        else:
            text_format.Parse(pbtxt.read_text(encoding="utf-8"), saved)
    except Exception as err:
        raise ModelLoadError(
            f"model {spec.name!r}: cannot read {source} ({err}); the SavedModel may be "
            "truncated"
        ) from err
    wanted = set(spec.tags)
    for meta in saved.meta_graphs:
        if set(meta.meta_info_def.tags) == wanted:
            return meta
    available = [sorted(m.meta_info_def.tags) for m in saved.meta_graphs]
    raise ModelLoadError(
        f"model {spec.name!r}: SavedModel {folder} has no meta graph tagged "
        f"{sorted(wanted)}; it has {available}. Set 'tags' in the manifest"
    )


def _signature_tensors(spec: ModelSpec, folder: str, meta: Any) -> tuple[str, str]:
    signatures = dict(meta.signature_def)
    if spec.signature not in signatures:
        raise ModelLoadError(
            f"model {spec.name!r}: SavedModel {folder} has no signature {spec.signature!r}; "
            f"it has {sorted(s for s in signatures if s != _INIT_SIGNATURE)}. Set "
            "'signature' in the manifest"
        )
    sig = signatures[spec.signature]
    in_key = _pick(spec, "input", spec.input, dict(sig.inputs))
    out_key = _pick(spec, "output", spec.output, dict(sig.outputs))
    return sig.inputs[in_key].name, sig.outputs[out_key].name


def _check_init_op(spec: ModelSpec, folder: str, meta: Any) -> None:
    """A SavedModel's init or main op runs its own code: accepted only when it does
    nothing (a bare ``NoOp``, as TF2 and Keras write it) or is built of allowed ops, which
    the loader's own restore makes unnecessary to run."""
    names = [out.name for sig_key, sig in meta.signature_def.items()
             if sig_key == _INIT_SIGNATURE for out in sig.outputs.values()]
    names += [n for key in _INIT_COLLECTIONS if key in meta.collection_def
              for n in meta.collection_def[key].node_list.value]
    for name in names:
        init = prune(meta.graph_def, name)
        if all(node.op == "NoOp" for node in init.node) and not init.library.function:
            continue
        check_ops(init, model=spec.name, source=f"{folder} (its init op {node_name(name)!r})",
                  allow=spec.allow_ops)


def load_saved_model(spec: ModelSpec, folder: str, digest: str, *, freeze: bool | None = None
                     ) -> GraphScorer:
    """Load the signature's subgraph into a fresh graph and restore its variables (as
    constants, with ``freeze``, where ``loaders.freeze`` allows it; by default on oneDNN's
    path only).

    Raises:
        ModelLoadError: unreadable SavedModel, unknown tags, signature or keys, a refused
            op, or variables that do not fit the graph.
    """
    start = time.perf_counter()
    meta = _read(spec, folder)
    input_name, output_name = _signature_tensors(spec, folder, meta)
    try:
        graph_def = prune(meta.graph_def, output_name)
    except KeyError as err:
        raise ModelLoadError(
            f"model {spec.name!r}: SavedModel {folder}: signature {spec.signature!r} names "
            f"output {output_name!r}, which is not in its graph; the file may be corrupt"
        ) from err
    check_ops(graph_def, model=spec.name, source=folder, allow=spec.allow_ops)
    _check_init_op(spec, folder, meta)
    variables = variable_nodes(graph_def)
    graph = tf.Graph()
    with graph.as_default():
        try:
            tf.compat.v1.import_graph_def(graph_def, name="")
            input_tensor = graph.get_tensor_by_name(input_name)
            output_tensor = graph.get_tensor_by_name(output_name)
        except Exception as err:  # protobuf and TF raise a zoo of types here
            raise ModelLoadError(
                f"model {spec.name!r}: SavedModel {folder}: cannot import signature "
                f"{spec.signature!r} ({str(err).splitlines()[0]}); is {input_name!r} an "
                f"input of {output_name!r}?"
            ) from err
    check_static_sizes(graph, model=spec.name, source=folder)
    return restored_scorer(spec, source=folder, digest=digest, graph=graph,
                           tensors=(input_tensor, output_tensor), variables=variables,
                           checkpoint=str(Path(folder) / "variables" / "variables"),
                           keys=saver_keys(meta.graph_def, meta.saver_def.restore_op_name),
                           started=start, freeze=freeze)
