"""Hostile or careless models beyond op types: aliased variables, several savers, fused
internal kernels, constants that explode, loops, state files that point elsewhere."""

from __future__ import annotations

import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loaders._tf import tf
from loaders.cache import load_scorer
from loaders.errors import ModelLoadError
from loaders.inspect import digest_files, resolve_model
from loaders.manifest import ModelSpec

X = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)


def _save(prefix: Path, build: Callable[[], Any],
          savers: Callable[[], list[Any]] | None = None) -> Path:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        build()
        saver = (savers() if savers else [tf.compat.v1.train.Saver()])[0]
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(prefix))
    return prefix


def _edit_meta(prefix: Path, edit: Callable[[Any], None]) -> None:
    from tensorflow.core.protobuf import meta_graph_pb2

    meta = meta_graph_pb2.MetaGraphDef()
    meta.ParseFromString(Path(f"{prefix}.meta").read_bytes())
    edit(meta)
    Path(f"{prefix}.meta").write_bytes(meta.SerializeToString())


def _input_and_weights() -> tuple[Any, Any]:
    """The 8-feature input and a (8, 1) variable of ones, in the graph being built."""
    x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="features")
    return x, tf.compat.v1.get_variable("w", initializer=np.ones((8, 1), np.float32))


def _refused(prefix: Path, match: str) -> None:
    """Loading the checkpoint at ``prefix`` is refused with a message matching ``match``."""
    with pytest.raises(ModelLoadError, match=match):
        load_scorer(_spec(prefix), 8)


def _spec(prefix: Path, **extra: Any) -> ModelSpec:
    return ModelSpec(name="m", path=str(prefix), input="features:0", output="score:0",
                     **extra)


def test_variables_aliasing_one_resource_are_refused(tmp_path: Path) -> None:
    """Two nodes naming one variable would each pass their own shape check, and the one
    restored last would win for both (a 1-long bias under a graph declaring 16)."""
    w = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)

    def build() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="features")
        b = tf.compat.v1.get_variable("b", initializer=np.arange(16, dtype=np.float32),
                                      use_resource=False)
        alias = tf.compat.v1.get_variable("b_alias", initializer=np.ones(1, np.float32),
                                          use_resource=False)
        h = tf.matmul(x, tf.compat.v1.get_variable("w", initializer=w,
                                                   use_resource=False)) + b
        with tf.control_dependencies([alias]):
            tf.reduce_sum(h, axis=1, keepdims=True, name="score")

    prefix = _save(tmp_path / "m.ckpt", build)

    def alias(meta: Any) -> None:
        for node in meta.graph_def.node:
            if node.name in ("b", "b_alias"):
                node.attr["shared_name"].s = b"shared_b"

    _edit_meta(prefix, alias)
    with pytest.raises(ModelLoadError, match=r"variables '.*' and '.*' are the same variable "
                                             r"\(shared_name 'shared_b'\)"):
        load_scorer(_spec(prefix), 8)


def test_only_the_recorded_savers_keys_count(tmp_path: Path) -> None:
    """A second Saver (warm start, moving averages) maps the same variables to other keys;
    the checkpoint was written by the one the meta graph records."""
    def build() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="features")
        a = tf.compat.v1.get_variable("a", initializer=np.full((8, 1), 1.0, np.float32))
        b = tf.compat.v1.get_variable("b", initializer=np.full((8, 1), -1.0, np.float32))
        tf.identity(tf.matmul(x, a) + 0.5 * tf.matmul(x, b), name="score")

    def savers() -> list[Any]:
        main = tf.compat.v1.train.Saver()
        a, b = tf.compat.v1.global_variables()
        return [main, tf.compat.v1.train.Saver({"b": a, "a": b})]

    prefix = _save(tmp_path / "m.ckpt", build, savers)
    scorer = load_scorer(_spec(prefix), 8)
    np.testing.assert_allclose(scorer.predict(X), X.sum(1) * 0.5, rtol=1e-5, atol=1e-5)
    scorer.close()


@pytest.mark.parametrize("op", ["_FusedMatMul", "While"])
def test_internal_fused_kernels_and_loops_are_not_allowed(tmp_path: Path, op: str) -> None:
    """TensorFlow's internal fused kernels trust their bias's length (one read past a
    short bias and crashed or scored garbage); a loop need not end."""
    def build() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="features")
        w = tf.compat.v1.get_variable("w", initializer=np.ones((8, 4), np.float32))
        if op == "While":
            y = tf.while_loop(lambda i, v: i < 3, lambda i, v: (i + 1, v * 2.0),
                              [tf.constant(0), tf.matmul(x, w)])[1]
        else:
            y = tf.matmul(x, w, name="layer")
        tf.reduce_sum(y, axis=1, keepdims=True, name="score")

    prefix = _save(tmp_path / "m.ckpt", build)
    if op == "_FusedMatMul":  # as a graph saved after TensorFlow's own rewrites holds it
        def fuse(meta: Any) -> None:
            for node in meta.graph_def.node:
                if node.name == "layer":
                    node.op = "_FusedMatMul"

        _edit_meta(prefix, fuse)
    _refused(prefix, rf"{op} \(node ")


def test_a_constant_that_explodes_at_import_is_refused(tmp_path: Path) -> None:
    def build() -> None:
        x, w = _input_and_weights()
        big = tf.constant(0.0, shape=[1 << 29], name="big")  # one value, 2 GiB expanded
        tf.identity(tf.matmul(x, w) + tf.reduce_sum(big), name="score")

    prefix = _save(tmp_path / "m.ckpt", build)
    assert Path(f"{prefix}.meta").stat().st_size < 20_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelLoadError, match=r"constant node 'big' stores \d+ bytes but "
                                             r"expands to 2,147,483,648"):
        load_scorer(_spec(prefix), 8)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KiB


def test_a_state_file_cannot_lead_out_of_the_model_folder(tmp_path: Path) -> None:
    from flows.demo import build_mlp_checkpoint

    build_mlp_checkpoint(tmp_path / "secret" / "model.ckpt", seed=1, n_features=8,
                         hidden=(4,))
    folder = tmp_path / "downloaded"
    folder.mkdir()
    for target in ("../secret/model.ckpt", str(tmp_path / "secret" / "model.ckpt")):
        (folder / "checkpoint").write_text(f'model_checkpoint_path: "{target}"\n')
        with pytest.raises(Exception, match=r"no checkpoint at .*downloaded/model\.ckpt"):
            resolve_model(ModelSpec(name="m", path=str(folder), input="features",
                                    output="score"))


def test_a_prefix_with_glob_characters_is_a_name(tmp_path: Path) -> None:
    from flows.demo import build_mlp_checkpoint

    prefix = build_mlp_checkpoint(tmp_path / "model[v2].ckpt", seed=1, n_features=8,
                                  hidden=(4,))
    resolved = resolve_model(ModelSpec(name="m", path=str(prefix), input="features",
                                       output="score"))
    assert len(resolved.files) == 3  # .data, .index, .meta
    before = digest_files(resolved.files)
    build_mlp_checkpoint(prefix, seed=2, n_features=8, hidden=(4,))
    assert digest_files(resolve_model(ModelSpec(name="m", path=str(prefix), input="features",
                                                output="score")).files) != before


def test_a_string_output_is_an_explained_error(tmp_path: Path) -> None:
    def build() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="features")
        tf.compat.v1.get_variable("w", initializer=np.ones(1, np.float32))
        tf.fill(tf.shape(x)[:1], "class_a", name="score")

    prefix = _save(tmp_path / "m.ckpt", build)
    with pytest.raises(ModelLoadError, match=r"output score:0 has dtype string; a score must "
                                             r"be a number"):
        load_scorer(_spec(prefix), 8)


@pytest.mark.parametrize("how", ["empty shared_name", "localhost container"])
def test_other_spellings_of_one_variable_are_refused(tmp_path: Path, how: str) -> None:
    """Resource variables without a shared_name are one anonymous variable; the default
    container is "localhost" whether spelled or not."""
    def build() -> None:
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="features")
        b = tf.compat.v1.get_variable("b", initializer=np.arange(16, dtype=np.float32))
        alias = tf.compat.v1.get_variable("b_alias", initializer=np.ones(1, np.float32))
        w = tf.compat.v1.get_variable("w", initializer=np.ones((8, 16), np.float32))
        with tf.control_dependencies([alias.read_value()]):
            tf.reduce_sum(tf.matmul(x, w) + b, axis=1, keepdims=True, name="score")

    prefix = _save(tmp_path / "m.ckpt", build)

    def alias(meta: Any) -> None:
        for node in meta.graph_def.node:
            if node.name in ("b", "b_alias") and node.op == "VarHandleOp":
                if how == "empty shared_name":
                    node.attr["shared_name"].s = b""
                else:
                    node.attr["shared_name"].s = b"shared_b"
                    node.attr["container"].s = b"localhost" if node.name == "b" else b""

    _edit_meta(prefix, alias)
    _refused(prefix, r"are the same variable")


def test_a_function_that_calls_itself_is_refused(tmp_path: Path) -> None:
    def build() -> None:
        x, w = _input_and_weights()

        @tf.function
        def leaf(v: Any) -> Any:
            return v + 1.0

        @tf.function
        def rec(v: Any) -> Any:
            return leaf(v + 1.0)

        tf.identity(tf.matmul(x, w) + rec(tf.reduce_sum(x)) * 0.0, name="score")

    prefix = _save(tmp_path / "m.ckpt", build)

    def recurse(meta: Any) -> None:
        names = [f.signature.name for f in meta.graph_def.library.function]
        rec = next(n for n in names if "rec" in n)
        leaf = next(n for n in names if "leaf" in n)
        for fn in meta.graph_def.library.function:
            if fn.signature.name == rec:
                for node in fn.node_def:
                    if "f" in node.attr and node.attr["f"].func.name == leaf:
                        node.attr["f"].func.name = rec

    _edit_meta(prefix, recurse)
    _refused(prefix, r"its functions call themselves \(.*rec.* -> ")


@pytest.mark.parametrize("how", ["Fill", "BroadcastTo", "Tile", "Pad", "string constant"])
def test_tensors_that_ask_for_gigabytes_are_refused(tmp_path: Path, how: str) -> None:
    n = 1 << 29  # 2 GiB of float32, from a few bytes of graph

    def build() -> None:
        x, w = _input_and_weights()
        one = tf.reduce_sum(x) * 0.0 + 1.0  # depends on the input: nothing folds
        big = {"Fill": lambda: tf.fill([n], one),
               "BroadcastTo": lambda: tf.broadcast_to(tf.reshape(one, [1]), [n]),
               "Tile": lambda: tf.tile(tf.reshape(one, [1]), [n]),
               "Pad": lambda: tf.pad(tf.reshape(one, [1]), [[0, n]]),
               "string constant": lambda: tf.strings.length(
                   tf.constant("x" * 4096, shape=[1 << 20]))}[how]()
        tf.identity(tf.matmul(x, w) + tf.cast(tf.reduce_sum(big), tf.float32) * 0.0,
                    name="score")

    prefix = _save(tmp_path / "m.ckpt", build)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    spec = _spec(prefix, allow_ops=("StringLength",)) if how == "string constant" else (
        _spec(prefix))
    with pytest.raises(ModelLoadError, match=r"(fixed-size tensors add up to|constant node "
                                             r".* expands to)"):
        load_scorer(spec, 8)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KiB


def test_a_checkpoint_replaced_with_its_mtime_set_back_is_a_new_digest(tmp_path: Path
                                                                       ) -> None:
    """The digest memo (and so the per-process model cache) is keyed on the files' ctime
    too: a long-lived worker must not keep scoring with the old weights."""
    import os

    from flows.demo import build_mlp_checkpoint

    prefix = build_mlp_checkpoint(tmp_path / "model.ckpt", seed=1, n_features=8, hidden=(4,))
    spec = ModelSpec(name="m", path=str(prefix), input="features", output="score")
    files = resolve_model(spec).files
    before = digest_files(files)
    stats = {f: os.stat(f) for f in files}
    build_mlp_checkpoint(tmp_path / "other" / "model.ckpt", seed=2, n_features=8, hidden=(4,))
    for f in files:  # same sizes (same architecture), old mtimes
        Path(f).write_bytes((tmp_path / "other" / Path(f).name).read_bytes())
        os.utime(f, ns=(stats[f].st_atime_ns, stats[f].st_mtime_ns))
    assert digest_files(files) != before
