"""Untrusted graphs: only allow-listed compute ops run, and nothing is written or read.

Each hostile model below tries to write ``victim`` (outside its own folder) through a
different route; every one must be refused by op name before anything runs, or (where
the route is an op scoring never needs) load and score without the write happening.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from flows.demo import mlp_weights
from loaders._tf import tf
from loaders.cache import load_scorer
from loaders.errors import ModelLoadError
from loaders.manifest import ModelSpec
from tests.helpers import save_tf2_saved_model

W = np.ones((3, 1), np.float32)
X = np.arange(6, dtype=np.float32).reshape(2, 3)


def _tf1_checkpoint(prefix: Path, extra: Callable[[tf.Tensor], Any] | None = None,
                    *, around_saver: Callable[[Any], None] | None = None) -> Path:
    """A TF1 checkpoint computing ``features @ W``; ``extra(x)`` returns an op wired into
    the output as a control dependency, ``around_saver(saver)`` edits the saver."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 3], name="features")
        w = tf.compat.v1.get_variable("w", initializer=W)
        deps = [extra(x)] if extra is not None else []
        with tf.control_dependencies(deps):
            tf.identity(tf.matmul(x, w), name="score")
        saver = tf.compat.v1.train.Saver()
        if around_saver is not None:
            around_saver(saver)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(prefix))
    return prefix


def _spec(prefix: Path, **extra: Any) -> ModelSpec:
    return ModelSpec(name="evil", path=str(prefix), input="features", output="score", **extra)


ROUTES: dict[str, tuple[Callable[[Path], Callable[[tf.Tensor], Any]], str]] = {
    "WriteFile": (lambda victim: lambda x: tf.io.write_file(str(victim), "pwned",
                                                          name="exfiltrate"), "WriteFile"),
    # Named like a second Saver's subgraph, which a deny-list once trusted.
    "SaveV2 in a saver-like scope": (
        lambda victim: lambda x: tf.raw_ops.SaveV2(
            prefix=str(victim), tensor_names=["x"], shape_and_slices=[""], tensors=[x],
            name="save_1/SaveV2"), "SaveV2"),
    "PrintV2 to a file stream": (
        lambda victim: lambda x: tf.print(x, output_stream=f"file://{victim}"), "PrintV2"),
    "a path built by string ops": (
        lambda victim: lambda x: tf.io.write_file(
            tf.strings.join([str(victim.parent), "/", victim.name]), "pwned"), "StringJoin"),
    "ReadFile": (lambda victim: lambda x: tf.io.read_file("/etc/hostname"), "ReadFile"),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_tf1_route_is_refused_and_writes_nothing(tmp_path: Path, route: str) -> None:
    victim = tmp_path / "victim.txt"
    make, op = ROUTES[route]
    prefix = _tf1_checkpoint(tmp_path / "m" / "model.ckpt", make(victim))
    with pytest.raises(ModelLoadError, match=rf"'evil': refusing .* runs .*\b{op} \(node "
                                             rf".*allow_ops: \[.*\b{op}\b.*\]"):
        load_scorer(_spec(prefix), 3)
    assert not victim.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_restore_op_is_never_run(tmp_path: Path) -> None:
    """A meta graph whose saver_def restore op also writes a file: the loader reads the
    checkpoint itself and never runs the model's restore op."""
    victim = tmp_path / "victim.txt"

    def hijack(saver: Any) -> None:
        graph = tf.compat.v1.get_default_graph()
        restore = graph.get_operation_by_name(saver.saver_def.restore_op_name)
        write = tf.io.write_file(str(victim), "pwned")
        hijacked = tf.group(restore, write, name="save/hijacked_restore")
        saver.saver_def.restore_op_name = hijacked.name

    prefix = _tf1_checkpoint(tmp_path / "m" / "model.ckpt", around_saver=hijack)
    scorer = load_scorer(_spec(prefix), 3)
    np.testing.assert_allclose(scorer.predict(X), (X @ W).ravel())
    scorer.close()
    assert not victim.exists()


def test_allow_ops_lets_a_trusted_model_run(tmp_path: Path) -> None:
    """The same graph, explicitly allowed, does write: the refusal is what stops it."""
    victim = tmp_path / "victim.txt"
    prefix = _tf1_checkpoint(tmp_path / "m" / "model.ckpt", ROUTES["WriteFile"][0](victim))
    scorer = load_scorer(_spec(prefix, allow_ops=("WriteFile",)), 3)
    assert victim.read_text() == "pwned"  # the load-time probe batch already ran it
    scorer.close()


class _Writer(tf.Module):
    """A TF2 model whose signature writes through nested functions."""

    def __init__(self, victim: Path, how: str) -> None:
        super().__init__()
        self.w = tf.Variable(W)
        self.victim, self.how = str(victim), how

    @tf.function
    def leak(self, x: Any) -> Any:
        if self.how == "print":
            tf.print(x, output_stream=f"file://{self.victim}")
        else:
            tf.io.write_file(self.victim, "pwned")
        return x

    @tf.function
    def inner(self, x: Any) -> Any:
        return self.leak(x)  # nested: serve -> inner -> leak

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="features")])
    def serve(self, x: Any) -> dict[str, Any]:
        return {"score": tf.matmul(self.inner(x), self.w)}


@pytest.mark.parametrize(("how", "op"), [("print", "PrintV2"), ("write", "WriteFile")])
def test_op_in_a_nested_tf2_function_is_refused(tmp_path: Path, how: str, op: str) -> None:
    victim = tmp_path / "victim.txt"
    module = _Writer(victim, how)
    tf.saved_model.save(module, str(tmp_path / "sm"),
                        signatures={"serving_default": module.serve})
    assert not victim.exists()
    with pytest.raises(ModelLoadError, match=rf"\b{op} \(node .* in function "):
        load_scorer(ModelSpec(name="sm", path=str(tmp_path / "sm")), 3)
    assert not victim.exists()


def _builder_saved_model(folder: Path, body: Callable[[tf.Tensor], tf.Tensor],
                         init: Callable[[], Any] | None = None) -> Path:
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
        y = body(x)
        main_op = init() if init is not None else None
        with tf.compat.v1.Session(graph=graph) as sess:
            builder = tf.compat.v1.saved_model.Builder(str(folder))
            sig = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"y": y})
            builder.add_meta_graph_and_variables(
                sess, ["serve"], signature_def_map={"serving_default": sig}, main_op=main_op)
            builder.save()
    return folder


def test_py_func_in_a_saved_model_is_refused(tmp_path: Path) -> None:
    folder = _builder_saved_model(tmp_path / "sm", lambda x: tf.compat.v1.py_func(
        lambda a: a.sum(axis=1), [x], tf.float32, name="hook"))
    with pytest.raises(ModelLoadError, match=r"PyFunc \(node 'hook'\)"):
        load_scorer(ModelSpec(name="sm", path=str(folder)), 2)


def test_saved_model_main_op_that_writes_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    folder = _builder_saved_model(
        tmp_path / "sm", lambda x: tf.reduce_sum(x, axis=1),
        init=lambda: tf.io.write_file(str(victim), "pwned", name="on_load"))
    with pytest.raises(ModelLoadError, match=r"its init op .*WriteFile \(node 'on_load'\)"):
        load_scorer(ModelSpec(name="sm", path=str(folder)), 2)
    assert not victim.exists()


def test_pbtxt_saved_model_is_inspected_like_pb(tmp_path: Path) -> None:
    """A SavedModel stored as text is read and checked the same way."""
    victim = tmp_path / "victim.txt"

    def body(x: tf.Tensor) -> tf.Tensor:
        with tf.control_dependencies([tf.io.write_file(str(victim), "pwned", name="drop")]):
            return tf.reduce_sum(x, axis=1)

    folder = _builder_saved_model(tmp_path / "sm", body)
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((folder / "saved_model.pb").read_bytes())
    (folder / "saved_model.pb").unlink()
    (folder / "saved_model.pbtxt").write_text(text_format.MessageToString(saved))
    with pytest.raises(ModelLoadError, match=r"WriteFile \(node 'drop'\)"):
        load_scorer(ModelSpec(name="sm", path=str(folder)), 2)
    assert not victim.exists()


def test_clean_pbtxt_saved_model_loads(tmp_path: Path) -> None:
    weights = mlp_weights(5, 3, hidden=(4,))
    folder = save_tf2_saved_model(tmp_path / "sm", weights)
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((folder / "saved_model.pb").read_bytes())
    (folder / "saved_model.pb").unlink()
    (folder / "saved_model.pbtxt").write_text(text_format.MessageToString(saved))
    scorer = load_scorer(ModelSpec(name="sm", path=str(folder)), 3)
    assert scorer.predict(X).shape == (2,)
    scorer.close()
