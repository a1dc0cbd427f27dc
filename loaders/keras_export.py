"""The Keras side of a Keras member: load a ``.keras`` or legacy ``.h5`` file in safe mode
and export it as a SavedModel, in a short-lived process of its own.

Run by :mod:`loaders.keras_file` as ``python -I -c ...`` with one JSON request (source
file, its kind, the folder to write, the ``custom_objects`` module); never imported by
the scoring process, so Keras and TensorFlow's eager state stay out of its graphs, and a
crash here ends only this process. The request's folder receives the SavedModel (one
``serving_default`` signature whose input keys are the model's input names and whose
output keys are its output names) and, last, ``export.json`` describing it; on a failure
it receives ``error.json`` (``kind``, ``message``, ``layers``) instead.

Only the standard library is imported at the top: Keras and TensorFlow are imported
inside :func:`export`, after the environment the parent set.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["ExportFailure", "export", "main"]


class ExportFailure(Exception):
    """A failure the parent explains to the user: ``kind`` says which."""

    def __init__(self, kind: str, message: str, layers: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.layers = layers


def _custom_objects(module_name: str | None) -> dict[str, Any]:
    """``module.CUSTOM_OBJECTS``, else the module's public classes (also under their
    registered names, ``package>Name``). Importing the module runs its code: this is the
    one place where a member's configuration runs code, and only when it asks to."""
    if not module_name:
        return {}
    import importlib

    import keras

    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise ExportFailure("custom_import", f"{type(err).__name__}: {err}") from err
    declared = getattr(module, "CUSTOM_OBJECTS", None)
    if declared is not None:
        if not isinstance(declared, dict) or not all(isinstance(k, str) for k in declared):
            raise ExportFailure("custom_import", f"{module_name}.CUSTOM_OBJECTS is not a "
                                "dict of names to classes or functions")
        return dict(declared)
    found: dict[str, Any] = {}
    for name, obj in vars(module).items():
        if name.startswith("_") or not isinstance(obj, type) or obj.__module__ != module.__name__:
            continue
        found[name] = obj
        found[keras.saving.get_registered_name(obj)] = obj
    return found


def _lambda_layers(source: Path, kind: str) -> tuple[str, ...]:
    """Names of the Lambda layers in the file's model config, read as data (best effort,
    for the message: Keras's own safe mode is what refuses them)."""
    try:
        if kind == "keras":
            with zipfile.ZipFile(source) as archive:
                config = json.loads(archive.read("config.json"))
        else:
            import h5py

            with h5py.File(source, "r") as h5:
                raw = h5.attrs.get("model_config")
                config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except Exception:
        return ()
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("class_name") == "Lambda" and isinstance(node.get("config"), dict):
                names.append(str(node["config"].get("name", "?")))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return tuple(names)


def _load(source: Path, kind: str, custom: dict[str, Any]) -> Any:
    import keras

    # keras.saving.load_model picks the loader by the file's suffix: a file named
    # otherwise (format: keras) is given the suffix its content calls for.
    suffix = ".keras" if kind == "keras" else ".h5"
    with tempfile.TemporaryDirectory(prefix="ensemble-scoring-keras-") as tmp:
        path = source
        if source.suffix.lower() not in ((".keras",) if kind == "keras" else (".h5", ".hdf5")):
            path = Path(tmp) / f"model{suffix}"
            path.symlink_to(source.resolve())
        try:
            return keras.saving.load_model(path, custom_objects=custom, compile=False,
                                           safe_mode=True)
        except Exception as err:
            text = str(err)
            if "lambda" in text.lower() and "safe_mode" in text:
                raise ExportFailure("lambda", text, _lambda_layers(source, kind)) from err
            if "Could not locate" in text or "Unknown layer" in text:
                raise ExportFailure("custom", text.split(". Full object config")[0]) from err
            raise ExportFailure("load", f"{type(err).__name__}: {text}") from err


def _inputs(model: Any) -> tuple[list[tuple[str, list[int | None], str]], Any]:
    """(name, shape with a free batch size, dtype) per input, and the structure the model
    is called with (``None``: one positional tensor)."""
    tensors = getattr(model, "inputs", None)
    if tensors:
        specs = [(t.name, [None, *list(t.shape)[1:]], str(t.dtype)) for t in tensors]
        structure = getattr(model, "input", None) if len(tensors) > 1 else None
        return specs, structure
    # A subclassed model has no input layers; it has the shape it was built with.
    built = (model.get_build_config() or {}).get("input_shape") if model.built else None
    if not isinstance(built, (list, tuple)) or not all(
            d is None or isinstance(d, int) for d in built) or len(built) < 1:
        raise ExportFailure(
            "shape", f"cannot tell the input shape of the model (build config {built!r}); "
            "build it with one input before saving (call it on a batch, or model.build("
            "(None, n_features)))")
    dtype = str(getattr(model, "input_dtype", None) or "float32")
    return [("input_0", [None, *list(built)[1:]], dtype)], None


def _output_names(model: Any, result: Any) -> list[str]:
    import keras

    if isinstance(result, dict):
        return sorted(str(k) for k in result)
    flat = keras.tree.flatten(result)
    named = getattr(model, "output_names", None)
    if named and len(named) == len(flat):
        return [str(n) for n in named]
    layers = getattr(model, "layers", None)
    if len(flat) == 1 and isinstance(model, keras.Sequential) and layers:
        return [layers[-1].name]
    return [f"output_{i}" for i in range(len(flat))]


def _endpoint(model: Any, structure: Any, input_signature: list[Any],
              names: list[str] | None = None) -> Any:
    """A traced ``tf.function`` calling ``model`` (``structure``: how its inputs are
    packed) that returns its outputs by name (``names``, else found while tracing, and
    kept in the function's ``outputs``)."""
    import keras
    import tensorflow as tf

    outputs: list[str] = list(names or [])

    def serve(*args: Any) -> dict[str, Any]:
        called = args[0] if structure is None else keras.tree.pack_sequence_as(
            structure, list(args))
        result = model(called, training=False)
        if isinstance(result, dict):
            outputs[:] = sorted(str(k) for k in result)
            return {str(k): result[k] for k in result}
        if not names:
            outputs[:] = _output_names(model, result)
        return dict(zip(outputs, keras.tree.flatten(result), strict=True))

    traced = tf.function(serve, input_signature=input_signature)
    traced.get_concrete_function()  # traces now, so the output names are known
    traced.outputs = outputs
    return traced


def _single_input_models(model: Any, names: list[str]) -> list[tuple[int, Any, list[str]]]:
    """For a functional model with several inputs: per input, the sub-model computing
    every output that input alone determines (Keras refuses a sub-model whose output
    needs another input). A member is fed one matrix, so only such outputs can score;
    as a signature of its own, the pruned graph needs no other feed."""
    import keras

    found = []
    for k, tensor in enumerate(model.inputs):
        reachable = []
        for name, out in zip(names, model.outputs, strict=True):
            try:
                keras.Model(tensor, out)
            except ValueError:  # "Output ... is not connected to `inputs`"
                continue
            reachable.append((name, out))
        if reachable:
            found.append((k, keras.Model(tensor, [o for _, o in reachable]),
                          [n for n, _ in reachable]))
    return found


def export(request: dict[str, Any]) -> dict[str, Any]:
    """Load ``request["source"]`` in safe mode and write its SavedModel to
    ``request["out"]``; returns what ``export.json`` records.

    The SavedModel's ``serving_default`` signature takes every input (keyed by input
    name) and returns every output (keyed by output name). A functional model with
    several inputs also gets a signature ``input_<k>`` per input that alone determines
    some outputs, taking only that input; ``signatures`` in ``export.json`` lists them.

    Raises:
        ExportFailure: the file cannot be loaded or exported, with the reason's kind.
    """
    started = time.perf_counter()
    import keras
    import tensorflow as tf

    if keras.config.backend() != "tensorflow":
        raise ExportFailure("load", f"Keras runs on the {keras.config.backend()!r} backend; "
                            "the export needs KERAS_BACKEND=tensorflow")
    source, kind, out = Path(request["source"]), request["kind"], Path(request["out"])
    model = _load(source, kind, _custom_objects(request.get("custom_objects")))
    specs, structure = _inputs(model)
    tensor_specs = [tf.TensorSpec(shape, tf.as_dtype(dtype), name=name)
                    for name, shape, dtype in specs]
    signatures: dict[str, dict[str, list[str]]] = {}
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        serve = _endpoint(model, structure, tensor_specs)
        archive.add_endpoint("serving_default", serve)
        outputs = list(serve.outputs)
        signatures["serving_default"] = {"inputs": [n for n, _, _ in specs],
                                         "outputs": outputs}
        if len(specs) > 1:
            for k, sub, names in _single_input_models(model, outputs):
                archive.add_endpoint(f"input_{k}",
                                     _endpoint(sub, None, [tensor_specs[k]], names))
                signatures[f"input_{k}"] = {"inputs": [specs[k][0]], "outputs": names}
        archive.write_out(str(out), verbose=False)
    except ExportFailure:
        raise
    except Exception as err:
        raise ExportFailure("export", f"{type(err).__name__}: {err}") from err
    return {
        "source": str(source),
        "kind": kind,
        "key": request["key"],
        "custom_objects": request.get("custom_objects"),
        "inputs": [{"name": n, "shape": s, "dtype": d} for n, s, d in specs],
        "outputs": outputs,
        "signatures": signatures,
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
        "pid": os.getpid(),
        "export_seconds": time.perf_counter() - started,
    }


def main(request: dict[str, Any]) -> int:
    """Run one export; the result goes to ``export.json`` or ``error.json`` in the
    request's folder (0 or 3 as the exit code)."""
    out = Path(request["out"])
    try:
        info = export(request)
    except ExportFailure as failure:
        error = {"kind": failure.kind, "message": failure.message,
                 "layers": list(failure.layers)}
    except BaseException as err:  # anything else still reaches the parent as text
        error = {"kind": "error", "message": f"{type(err).__name__}: {err}", "layers": []}
    else:
        (out / "export.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        return 0
    (out / "error.json").write_text(json.dumps(error), encoding="utf-8")
    return 3


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    sys.exit(main(json.loads(sys.argv[1])))
