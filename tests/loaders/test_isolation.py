"""Several checkpoints with identical variable names, each in its own graph and session."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from flows.demo import mlp_reference
from loaders._tf import tf
from loaders.cache import ModelCache, load_scorer
from loaders.manifest import ModelSpec
from tests.helpers import N_FEATURES


def _spec(i: int, prefix: Path) -> ModelSpec:
    return ModelSpec(name=f"m{i}", path=str(prefix), input="features:0", output="score:0")


def test_checkpoints_share_variable_names(checkpoints: list[Path]) -> None:
    names = [sorted(n for n, _ in tf.train.list_variables(str(p))) for p in checkpoints]
    assert names[0] == names[1] == names[2]
    assert "mlp/dense_0/kernel" in names[0]
    k = [tf.train.load_checkpoint(str(p)).get_tensor("mlp/dense_0/kernel") for p in checkpoints]
    assert not np.allclose(k[0], k[1])


def test_concurrent_members_match_their_own_numpy_reference(checkpoints: list[Path]) -> None:
    cache = ModelCache()
    specs = [_spec(i, p) for i, p in enumerate(checkpoints)]
    x = np.random.default_rng(5).standard_normal((4096, N_FEATURES)).astype(np.float32)
    refs = [mlp_reference(p, x) for p in checkpoints]
    jobs = [(k, chunk) for k in range(3) for chunk in range(8)] * 2

    def run(job: tuple[int, int]) -> tuple[int, int, np.ndarray]:
        k, chunk = job
        scorer = cache.get(specs[k], N_FEATURES)  # loads race on first use
        rows = slice(chunk * 512, (chunk + 1) * 512)
        return k, chunk, scorer.predict(x[rows])

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(run, jobs))
    for k, chunk, scores in results:
        rows = slice(chunk * 512, (chunk + 1) * 512)
        assert np.abs(scores - refs[k][rows]).max() <= 1e-5
    # Each checkpoint loaded once, despite six threads asking at once.
    assert sorted(cache.loads.values()) == [1, 1, 1]
    graphs = {id(cache.get(s, N_FEATURES).graph) for s in specs}
    assert len(graphs) == 3
    assert all(cache.get(s, N_FEATURES).graph is not tf.compat.v1.get_default_graph()
               for s in specs)
    cache.clear()


def test_default_graph_is_never_touched(checkpoints: list[Path]) -> None:
    before = len(tf.compat.v1.get_default_graph().get_operations())
    scorer = load_scorer(_spec(0, checkpoints[0]), N_FEATURES)
    assert len(tf.compat.v1.get_default_graph().get_operations()) == before
    assert scorer.graph.finalized
    scorer.close()


def test_naive_shared_graph_scores_wrongly(checkpoints: list[Path]) -> None:
    """What this design prevents: two checkpoints restored into one graph collide.

    The second meta graph import silently renames its nodes (``features_1``), and
    restoring the second checkpoint writes its weights into the first model's variables
    (same names), so model A now scores with B's weights. Keep this test: it fails the
    day TensorFlow stops behaving this way, and it shows why every member has its own
    graph and session.
    """
    a, b = checkpoints[0], checkpoints[1]
    x = np.random.default_rng(1).standard_normal((64, N_FEATURES)).astype(np.float32)
    shared = tf.Graph()
    with shared.as_default():
        saver_a = tf.compat.v1.train.import_meta_graph(f"{a}.meta")
        tf.compat.v1.train.import_meta_graph(f"{b}.meta")
        with tf.compat.v1.Session(graph=shared) as sess:
            saver_a.restore(sess, str(a))
            right = sess.run("score:0", {"features:0": x}).ravel()
            saver_a.restore(sess, str(b))  # same variable names: no error, wrong weights
            wrong = sess.run("score:0", {"features:0": x}).ravel()
    assert np.abs(right - mlp_reference(a, x)).max() <= 1e-5
    assert np.abs(wrong - mlp_reference(a, x)).max() > 1e-2
    assert np.abs(wrong - mlp_reference(b, x)).max() <= 1e-5
