"""Untrusted graphs: file, code and network ops are refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loaders._tf import tf
from loaders.cache import load_scorer
from loaders.errors import ModelLoadError
from loaders.manifest import ModelSpec


def _checkpoint_writing_a_file(prefix: Path, victim: Path) -> Path:
    """A model whose scoring also writes ``victim``: WriteFile as a control dependency."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 3], name="features")
        w = tf.compat.v1.get_variable("w", initializer=np.ones((3, 1), np.float32))
        write = tf.io.write_file(str(victim), "pwned", name="exfiltrate")
        with tf.control_dependencies([write]):
            tf.identity(tf.matmul(x, w), name="score")
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(prefix))
    return prefix


def test_write_file_op_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    prefix = _checkpoint_writing_a_file(tmp_path / "m" / "model.ckpt", victim)
    spec = ModelSpec(name="evil", path=str(prefix), input="features", output="score")
    with pytest.raises(ModelLoadError, match=r"'evil': refusing .*WriteFile op \(node "
                                             r"'exfiltrate'\).*allow_ops: \[WriteFile\]"):
        load_scorer(spec, 3)
    assert not victim.exists()


def test_allow_ops_lets_a_trusted_model_run(tmp_path: Path) -> None:
    """The same graph, explicitly allowed, does write: the refusal above is what stops it."""
    victim = tmp_path / "victim.txt"
    prefix = _checkpoint_writing_a_file(tmp_path / "m" / "model.ckpt", victim)
    spec = ModelSpec(name="trusted", path=str(prefix), input="features", output="score",
                     allow_ops=("WriteFile",))
    scorer = load_scorer(spec, 3)
    assert victim.read_text() == "pwned"  # the load-time probe batch already ran it
    scorer.close()


def test_py_func_in_a_saved_model_is_refused(tmp_path: Path) -> None:
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
        y = tf.compat.v1.py_func(lambda a: a.sum(axis=1), [x], tf.float32, name="hook")
        with tf.compat.v1.Session(graph=graph) as sess:
            builder = tf.compat.v1.saved_model.Builder(str(tmp_path / "sm"))
            sig = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"y": y})
            builder.add_meta_graph_and_variables(sess, ["serve"],
                                                 signature_def_map={"serving_default": sig})
            builder.save()
    with pytest.raises(ModelLoadError, match=r"PyFunc op \(node 'hook'\)"):
        load_scorer(ModelSpec(name="sm", path=str(tmp_path / "sm")), 2)
