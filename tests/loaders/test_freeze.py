"""Variables turned into constants at load: only where every use of them is a plain read,
scoring bit for bit as the graph with its variables does, and by default only on oneDNN's
path (where it pays). The mechanism is tested on both paths (``freeze=True``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import loaders.freeze
from flows.demo import mlp_reference
from loaders._tf import tf
from loaders.cache import load_scorer
from loaders.cpu import cpu_path
from loaders.manifest import ModelSpec
from tests.helpers import N_FEATURES

X = np.random.default_rng(18).standard_normal((300, 4)).astype(np.float32)
W = np.random.default_rng(19).standard_normal((4, 3)).astype(np.float32)
B = np.array([0.25, -0.5, 1.5], np.float32)
TABLE = np.random.default_rng(20).standard_normal((2, 3)).astype(np.float32)
VARIABLE_OPS = {"VarHandleOp", "ReadVariableOp", "VariableV2", "Variable"}


def _resource(value: np.ndarray, name: str) -> tf.Tensor:
    return tf.compat.v1.get_variable(name, initializer=value, use_resource=True)


def _ref(value: np.ndarray, name: str) -> tf.Tensor:
    return tf.compat.v1.Variable(value, name=name, use_resource=False)


def _gathered(x: tf.Tensor) -> tf.Tensor:
    """A resource variable used by a gather (an embedding lookup), not only read."""
    table = tf.compat.v1.get_variable("table", initializer=TABLE, use_resource=True)
    rows = tf.gather(table, tf.cast(x[:, 0] > 0, tf.int32))
    return tf.matmul(x, _resource(W, "w")) + rows


def _read_twice(x: tf.Tensor) -> tf.Tensor:
    """One variable, two reads: each constant would cost grappler memory of its own."""
    w = tf.compat.v1.get_variable("w", initializer=W, use_resource=True)
    return tf.nn.relu(tf.matmul(x, w.read_value()) + tf.reduce_sum(w.read_value(), 0) * 0
                      + _resource(B, "b"))


def _reassociable(x: tf.Tensor) -> tf.Tensor:
    """``(x + b1) + b2``: with constant folding, b1 + b2 would be added first, and in float32
    that changes the result (here by whole units)."""
    shifted = (x + _resource(np.full(4, 1e8, np.float32), "b1")
               + _resource(np.full(4, -1e8, np.float32), "b2"))
    return tf.nn.relu(tf.matmul(shifted, _resource(W, "w")) + _resource(B, "b"))


def _with_a_function(x: tf.Tensor) -> tf.Tensor:
    """A graph that calls a function: a function's own variable ops could name a frozen
    variable's resource, so such graphs keep their variables."""
    double = tf.function(lambda t: t * 2.0)
    return tf.nn.relu(tf.matmul(double(x) / 2.0, _resource(W, "w")) + _resource(B, "b"))


# name -> (the layer, variables frozen: 0 where the graph must keep them)
CASES: dict[str, tuple[Callable[[tf.Tensor], tf.Tensor], int]] = {
    "resource variables": (lambda x: tf.nn.relu(tf.matmul(x, _resource(W, "w"))
                                                + _resource(B, "b")), 2),
    "reference variables": (lambda x: tf.nn.relu(tf.matmul(x, _ref(W, "w")) + _ref(B, "b")),
                            2),
    "a variable read twice": (_read_twice, 0),
    "a variable gathered from": (_gathered, 0),
    "a function call": (_with_a_function, 0),
    "a float constant of its own": (
        lambda x: tf.nn.relu(tf.matmul(x, _resource(W, "w")) + _resource(B, "b"))
        * tf.constant(1.0), 0),
    "a variable as an exponent": (
        lambda x: tf.nn.relu(tf.matmul(x, _resource(W, "w")) + _resource(B, "b"))
        ** _resource(np.ones(3, np.float32), "p"), 0),
}


def _save(prefix: Path, body: Callable[[tf.Tensor], tf.Tensor]) -> ModelSpec:
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="features")
        tf.reduce_sum(body(x), axis=1, name="score")
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(prefix))
    return ModelSpec(name=prefix.parent.name, path=str(prefix), input="features:0",
                     output="score:0")


def _ops(scorer: object) -> set[str]:
    return {op.type for op in scorer.graph.get_operations()}  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", sorted(CASES))
def test_frozen_only_where_every_use_is_a_read(tmp_path: Path, case: str) -> None:
    body, frozen = CASES[case]
    spec = _save(tmp_path / "m" / "model.ckpt", body)
    as_loaded = load_scorer(spec, 4, freeze=True)
    kept = load_scorer(spec, 4, freeze=False)
    assert (as_loaded.frozen_variables, kept.frozen_variables) == (frozen, 0)
    assert bool(_ops(as_loaded) & VARIABLE_OPS) == (frozen == 0)
    assert _ops(kept) & VARIABLE_OPS
    np.testing.assert_allclose(as_loaded.predict(X), kept.predict(X), rtol=1e-6, atol=1e-6)
    if case != "a variable gathered from":
        expected = np.maximum(X @ W + B, 0).sum(axis=1)
        np.testing.assert_allclose(as_loaded.predict(X), expected, rtol=1e-5, atol=1e-5)
    if frozen:  # each variable's value is held once
        consts = [op for op in as_loaded.graph.get_operations() if op.type == "Const"
                  and op.get_attr("value").tensor_shape.dim]
        assert len(consts) == frozen
    as_loaded.close()
    kept.close()


def test_frozen_graph_computes_exactly_what_its_variables_did(tmp_path: Path) -> None:
    """Grappler's constant folding would reassociate ``(x + b1) + b2`` once b1 and b2 are
    constants; frozen graphs run without it, and score bit for bit as restored."""
    spec = _save(tmp_path / "m" / "model.ckpt", _reassociable)
    as_loaded = load_scorer(spec, 4, freeze=True)
    kept = load_scorer(spec, 4, freeze=False)
    assert (as_loaded.frozen_variables, kept.frozen_variables) == (4, 0)
    np.testing.assert_array_equal(as_loaded.predict(X), kept.predict(X))
    as_loaded.close()
    kept.close()


def test_values_beyond_the_cap_stay_in_variables(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _save(tmp_path / "m" / "model.ckpt", CASES["resource variables"][0])
    monkeypatch.setattr(loaders.freeze, "FREEZE_MAX_BYTES", W.nbytes + B.nbytes - 1)
    scorer = load_scorer(spec, 4, freeze=True)
    assert scorer.frozen_variables == 0 and "VarHandleOp" in _ops(scorer)
    np.testing.assert_allclose(scorer.predict(X), np.maximum(X @ W + B, 0).sum(axis=1),
                               rtol=1e-5, atol=1e-5)
    scorer.close()


def test_members_frozen_by_default_on_onednn_each_in_its_own_graph(checkpoints: list[Path]) -> None:
    """Three checkpoints with the same variable names: each keeps its own weights."""
    x = np.random.default_rng(5).standard_normal((400, N_FEATURES)).astype(np.float32)
    scorers = [load_scorer(ModelSpec(name=f"m{i}", path=str(p), input="features:0",
                                     output="score:0"), N_FEATURES)
               for i, p in enumerate(checkpoints)]
    onednn = cpu_path().onednn
    for prefix, scorer in zip(checkpoints, scorers, strict=True):
        # Two hidden layers and the head, frozen by default where oneDNN runs them.
        assert scorer.frozen_variables == (6 if onednn else 0)
        assert bool(_ops(scorer) & VARIABLE_OPS) != onednn
        assert np.abs(scorer.predict(x) - mlp_reference(prefix, x)).max() <= 1e-5
    assert len({id(s.graph) for s in scorers}) == len(scorers)
    for scorer in scorers:
        scorer.close()
