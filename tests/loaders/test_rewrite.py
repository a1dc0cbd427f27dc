"""``MatMul + bias`` adds rewritten to ``BiasAdd``: only where the result is the same."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from flows.demo import mlp_reference, mlp_weights
from loaders._tf import tf
from loaders.cache import load_scorer
from loaders.cpu import cpu_path
from loaders.errors import ModelLoadError
from loaders.manifest import ModelSpec
from loaders.rewrite import fuse_bias_adds
from tests.helpers import N_FEATURES, save_tf1_builder_saved_model

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


def test_rewrite_only_where_tensorflow_does_not_fuse(checkpoints: list[Path]) -> None:
    """On oneDNN's path TensorFlow fuses MatMul + AddV2 itself: the loader leaves the
    graph as saved there, and rewrites it elsewhere."""
    spec = ModelSpec(name="m", path=str(checkpoints[0]), input="features:0", output="score:0")
    scorer = load_scorer(spec, N_FEATURES)
    path = cpu_path()
    assert path.onednn == path.fuses_matmul_add
    assert scorer.fused_bias_adds == (0 if path.fuses_matmul_add else 3)
    expected = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if expected in ("0", "1"):
        assert path.onednn == (expected == "1")
    scorer.close()


def _save_linear(prefix: Path, weight: np.ndarray, bias: np.ndarray) -> None:
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="features")
        hidden = tf.matmul(x, _var(weight, "w")) + _var(bias, "b")
        tf.identity(tf.matmul(hidden, tf.ones([weight.shape[1], 1])), name="score")
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(prefix))


def _mix(tmp_path: Path, meta_from: Path, values_from: Path) -> Path:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for part in values_from.parent.glob("model.ckpt.*"):
        (mixed / part.name).write_bytes(part.read_bytes())
    (mixed / "model.ckpt.meta").write_bytes(Path(f"{meta_from}.meta").read_bytes())
    return mixed / "model.ckpt"


@pytest.mark.parametrize("fuse", [None, True, False])
def test_checkpoint_contradicting_its_graph_is_refused(tmp_path: Path, fuse: bool | None
                                                       ) -> None:
    """A resource variable's declared shape is not enforced at restore, and kernels differ
    on a bias of the wrong length: a plain add broadcast it, oneDNN's fused kernel failed,
    and the other fused kernel read past it. The loader refuses such a checkpoint before
    anything runs, the same way whatever the graph and the CPU path."""
    _save_linear(tmp_path / "declared" / "model.ckpt", W, B3)
    _save_linear(tmp_path / "values" / "model.ckpt", W, B3[:1])
    prefix = _mix(tmp_path, tmp_path / "declared" / "model.ckpt",
                  tmp_path / "values" / "model.ckpt")
    spec = ModelSpec(name="mixed", path=str(prefix), input="features:0", output="score:0")
    with pytest.raises(ModelLoadError, match=r"model 'mixed': variable 'b' has shape \[1\] "
                       r"in checkpoint .*, but its graph declares \[3\]"):
        load_scorer(spec, 4, fuse=fuse)


def test_saved_model_contradicting_its_graph_is_refused(tmp_path: Path) -> None:
    """The same check after TensorFlow's own SavedModel restore."""
    narrow = mlp_weights(1, 4, hidden=(3,))
    wide = mlp_weights(2, 4, hidden=(5,))
    save_tf1_builder_saved_model(tmp_path / "declared", narrow)
    save_tf1_builder_saved_model(tmp_path / "values", wide)
    shutil.rmtree(tmp_path / "declared" / "variables")
    shutil.copytree(tmp_path / "values" / "variables", tmp_path / "declared" / "variables")
    spec = ModelSpec(name="sm", path=str(tmp_path / "declared"))
    with pytest.raises(ModelLoadError, match=r"model 'sm'.*variable 'outer/inner/\w+' .*"
                       r"\[4, 5\].*declares \[4, 3\]|model 'sm'.*\[5\].*\[3\]"):
        load_scorer(spec, 4)
