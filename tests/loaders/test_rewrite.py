"""``MatMul + bias`` adds rewritten to ``BiasAdd``: only where the result is the same."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from flows.demo import mlp_reference
from loaders._tf import tf
from loaders.cache import load_scorer
from loaders.manifest import ModelSpec
from loaders.rewrite import fuse_bias_adds
from tests.conftest import N_FEATURES

X = np.random.default_rng(8).standard_normal((64, 4)).astype(np.float32)
W = np.random.default_rng(9).standard_normal((4, 3)).astype(np.float32)


def _run(graph_def: tf.compat.v1.GraphDef) -> np.ndarray:
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
        init = [op for op in graph.get_operations() if op.name == "init"]
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(init)
            return session.run("out:0", {"x:0": X})  # type: ignore[no-any-return]


def _graph(body: Callable[[tf.Tensor], tf.Tensor]) -> tf.compat.v1.GraphDef:
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        tf.identity(body(x), name="out")
        tf.compat.v1.global_variables_initializer()  # named "init"
    return graph.as_graph_def()


def _var(value: np.ndarray, name: str) -> tf.Tensor:
    return tf.compat.v1.get_variable(name, initializer=value)


def _add_after_a_no_op(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)  # reads made outside
    with tf.control_dependencies([tf.no_op(name="before")]):
        return a + b


B3 = np.array([0.5, -1.0, 2.0], np.float32)
CASES: dict[str, tuple[Callable[[tf.Tensor], tf.Tensor], bool]] = {
    "variable bias": (lambda x: tf.matmul(x, _var(W, "w")) + _var(B3, "b"), True),
    "bias first": (lambda x: _var(B3, "b") + tf.matmul(x, _var(W, "w")), True),
    "constant bias, relu": (lambda x: tf.nn.relu(tf.add(tf.matmul(x, tf.constant(W)),
                                                         tf.constant(B3))), True),
    "transposed weights": (lambda x: tf.matmul(x, _var(W.T.copy(), "w"), transpose_b=True)
                           + _var(B3, "b"), True),
    "ref variable": (lambda x: tf.matmul(x, tf.compat.v1.Variable(W, use_resource=False))
                     + tf.compat.v1.Variable(B3, use_resource=False), True),
    # Broadcasts that BiasAdd does not do the same way: left as they are.
    "one-element bias": (lambda x: tf.matmul(x, _var(W, "w")) + _var(B3[:1], "b"), False),
    "row-shaped bias": (lambda x: tf.matmul(x, _var(W, "w")) + _var(B3[None, :], "b"), False),
    "bias of unknown shape": (
        lambda x: tf.matmul(x, _var(W, "w")) + tf.compat.v1.placeholder_with_default(B3, None),
        False),
    # Correct either way, but grappler would not fuse it: kept as saved.
    "add with a control input": (
        lambda x: _add_after_a_no_op(tf.matmul(x, _var(W, "w")), _var(B3, "b")), False),
    "sum of two products": (lambda x: tf.matmul(x, _var(W, "w")) + tf.matmul(x, _var(W, "v")),
                            False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rewrite_keeps_the_result(case: str) -> None:
    body, expect = CASES[case]
    graph_def = _graph(body)
    if "control" in case:
        assert any("^before" in node.input for node in graph_def.node if node.op == "AddV2")
    before = _run(graph_def)
    rewritten = fuse_bias_adds(graph_def).nodes
    assert bool(rewritten) == expect
    ops = {n.name: n.op for n in graph_def.node}
    assert all(ops[name] == "BiasAdd" for name in rewritten)
    np.testing.assert_allclose(_run(graph_def), before, rtol=1e-6, atol=1e-6)


def test_checkpoints_load_fused_and_score_as_saved(checkpoints: list[Path]) -> None:
    x = np.random.default_rng(4).standard_normal((500, N_FEATURES)).astype(np.float32)
    for i, prefix in enumerate(checkpoints):
        spec = ModelSpec(name=f"m{i}", path=str(prefix), input="features:0", output="score:0")
        fused, saved = (load_scorer(spec, N_FEATURES, fuse=f) for f in (True, False))
        # Two hidden layers and the head, each written as tf.matmul(h, w) + b.
        assert (fused.fused_bias_adds, saved.fused_bias_adds) == (3, 0)
        ops = {op.type for op in fused.graph.get_operations()}
        assert "BiasAdd" in ops and "BiasAdd" not in {op.type for op in
                                                      saved.graph.get_operations()}
        ref = mlp_reference(prefix, x)
        assert np.abs(fused.predict(x) - ref).max() <= 1e-5
        assert np.abs(fused.predict(x) - saved.predict(x)).max() <= 1e-6
        fused.close()
        saved.close()


def test_checkpoint_contradicting_its_graph_loads_as_saved(tmp_path: Path) -> None:
    """A resource variable's declared shape is not enforced at restore: a bias saved as
    [1] under a graph declaring [3] broadcasts in the add, while the fused kernel read
    past it and scored wrong, silently. The loader sees the restored shape differ from
    the declared one and keeps the graph as saved."""

    def save(prefix: Path, bias: np.ndarray) -> None:
        graph = tf.Graph()
        with graph.as_default():
            x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="features")
            hidden = tf.matmul(x, _var(W, "w")) + _var(bias, "b")
            tf.identity(tf.matmul(hidden, tf.ones([3, 1])), name="score")
            saver = tf.compat.v1.train.Saver()
            with tf.compat.v1.Session(graph=graph) as session:
                session.run(tf.compat.v1.global_variables_initializer())
                saver.save(session, str(prefix))

    save(tmp_path / "declared" / "model.ckpt", B3)
    save(tmp_path / "values" / "model.ckpt", B3[:1])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for part in (tmp_path / "values").glob("model.ckpt.*"):
        (mixed / part.name).write_bytes(part.read_bytes())
    (mixed / "model.ckpt.meta").write_bytes((tmp_path / "declared" / "model.ckpt.meta")
                                            .read_bytes())
    spec = ModelSpec(name="mixed", path=str(mixed / "model.ckpt"), input="features:0",
                     output="score:0")
    scorer = load_scorer(spec, 4)
    assert scorer.fused_bias_adds == 0  # loaded as saved
    np.testing.assert_allclose(scorer.predict(X), (X @ W + B3[0]).sum(axis=1), rtol=1e-5,
                               atol=1e-5)
    scorer.close()
