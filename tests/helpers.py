"""The tests' one module of fixtures: constants, builders for small real models (every one
a real TensorFlow artefact written to disk) and data, and the numpy references they are
checked against (the MLP itself comes from ``flows.demo``, as the demo's and the
benchmark's do)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows.demo import mlp_reference
from loaders._tf import tf
from loaders.manifest import load_manifest
from tasks.storage import LocalStore

# The session's small checkpoints (conftest.py builds them): 8 features, 3 seeds.
N_FEATURES = 8
SEEDS = (11, 22, 33)


def save_reciprocal_checkpoint(prefix: Path) -> Path:
    """A real model that returns inf where the first feature is 0: 1 / f00."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, N_FEATURES], name="features")
        w = tf.compat.v1.get_variable("w", initializer=np.ones(1, np.float32))
        tf.identity(w / x[:, 0], name="score")
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(prefix))
    return prefix


def save_tf2_saved_model(path: Path, weights: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """A TF2 ``tf.saved_model.save`` export of a tf.Module with a serving signature."""
    n_features = weights[0][0].shape[0]

    class MLP(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ws = [(tf.Variable(w), tf.Variable(b)) for w, b in weights]

        @tf.function(input_signature=[tf.TensorSpec([None, n_features], tf.float32,
                                                    name="features")])
        def serve(self, x: Any) -> dict[str, Any]:
            h = x
            for w, b in self.ws[:-1]:
                h = tf.nn.relu(tf.matmul(h, w) + b)
            w, b = self.ws[-1]
            return {"probability": tf.sigmoid(tf.matmul(h, w) + b)}

    module = MLP()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def save_tf1_builder_saved_model(path: Path, weights: list[tuple[np.ndarray, np.ndarray]],
                                 scope: str = "outer/inner") -> Path:
    """A TF1 ``SavedModelBuilder`` export, variables under nested scopes."""
    n_features = weights[0][0].shape[0]
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, n_features], name="x")
        h = x
        with tf.compat.v1.variable_scope(scope.split("/")[0]), \
                tf.compat.v1.variable_scope(scope.split("/")[1]):
            for i, (w, b) in enumerate(weights):
                wv = tf.compat.v1.get_variable(f"w{i}", initializer=w)
                bv = tf.compat.v1.get_variable(f"b{i}", initializer=b)
                h = tf.matmul(h, wv) + bv
                if i < len(weights) - 1:
                    h = tf.nn.relu(h)
        y = tf.sigmoid(h, name="y")
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(str(path))
            sig = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"y": y})
            builder.add_meta_graph_and_variables(sess, ["serve"],
                                                 signature_def_map={"serving_default": sig})
            builder.save()
    return path


def save_keras_export(path: Path, weights: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """A Keras model exported with ``model.export()`` (a SavedModel)."""
    import keras

    n_features = weights[0][0].shape[0]
    inputs = keras.Input((n_features,), name="features")
    h = inputs
    for i, (w, _) in enumerate(weights):
        act = "relu" if i < len(weights) - 1 else "sigmoid"
        layer = keras.layers.Dense(w.shape[1], activation=act)
        h = layer(h)
    model = keras.Model(inputs, h)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    for layer, (w, b) in zip(dense, weights, strict=True):
        layer.set_weights([w, b])
    model.export(str(path), verbose=False)
    return path


def keras_mlp(weights: list[tuple[np.ndarray, np.ndarray]]) -> Any:
    """A Keras 3 functional MLP with ``weights``: input ``features``, output ``score``."""
    import keras

    inputs = keras.Input((weights[0][0].shape[0],), name="features")
    h = inputs
    for i, (w, b) in enumerate(weights):
        last = i == len(weights) - 1
        layer = keras.layers.Dense(w.shape[1], activation="sigmoid" if last else "relu",
                                   name="score" if last else f"dense_{i}")
        h = layer(h)
        layer.set_weights([w, b])
    return keras.Model(inputs, h)


def save_keras_multi_io(path: Path, seed: int, n_features: int) -> Path:
    """A functional model with inputs ``features`` (``n_features`` wide) and ``extra`` (3)
    and outputs ``score`` (from ``features`` alone) and ``mixed`` (from both)."""
    import keras

    keras.utils.set_random_seed(seed)
    features = keras.Input((n_features,), name="features")
    extra = keras.Input((3,), name="extra")
    hidden = keras.layers.Dense(6, activation="relu", name="hidden")(features)
    score = keras.layers.Dense(1, activation="sigmoid", name="score")(hidden)
    mixed = keras.layers.Dense(1, name="mixed")(keras.layers.Concatenate()([hidden, extra]))
    keras.Model([features, extra], [score, mixed]).save(path)
    return path


def save_keras_lambda(path: Path, n_features: int) -> Path:
    """A model whose ``Lambda`` layer holds a Python lambda (saved as ``.keras`` or, by
    the suffix, ``.h5``)."""
    import keras

    model = keras.Sequential([keras.Input((n_features,)),
                              keras.layers.Lambda(lambda x: x * 2.0, name="doubled"),
                              keras.layers.Dense(1)])
    model.save(path)
    return path


# A module of custom Keras objects, as a team would keep one: a subclassed model,
# registered for serialization, and the CUSTOM_OBJECTS a manifest's custom_objects reads.
KERAS_CUSTOM_MODULE = """
import keras


@keras.saving.register_keras_serializable(package="ensemble_tests")
class ResidualScorer(keras.Model):
    def __init__(self, units=5, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(units, activation="tanh")
        self.skip = keras.layers.Dense(units)
        self.head = keras.layers.Dense(1, activation="sigmoid")

    def call(self, x):
        return self.head(self.hidden(x) + self.skip(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


CUSTOM_OBJECTS = {"ensemble_tests>ResidualScorer": ResidualScorer}
"""


def keras_predict(models: dict[str, dict[str, Any]], folder: Path) -> dict[str, np.ndarray]:
    """name -> ``model.predict`` of each Keras file, run in a fresh Python process (the
    reference the exported members are checked against).

    ``models[name]`` holds ``path``, ``inputs`` (one array, or a list for several inputs),
    optionally ``output`` (the index of a multi-output model's output) and
    ``custom_objects`` (a module on this process's ``sys.path``).
    """
    import json
    import sys

    folder.mkdir(parents=True, exist_ok=True)
    jobs = {}
    for name, job in models.items():
        arrays = job["inputs"] if isinstance(job["inputs"], list) else [job["inputs"]]
        files = []
        for k, array in enumerate(arrays):
            np.save(folder / f"{name}.in{k}.npy", array)
            files.append(str(folder / f"{name}.in{k}.npy"))
        jobs[name] = {"path": str(job["path"]), "inputs": files,
                      "output": job.get("output"), "custom_objects": job.get("custom_objects"),
                      "result": str(folder / f"{name}.out.npy")}
    program = """
import importlib, json, sys
import numpy as np
import keras
jobs = json.loads(sys.argv[1])
for job in jobs.values():
    custom = {}
    if job["custom_objects"]:
        custom = importlib.import_module(job["custom_objects"]).CUSTOM_OBJECTS
    model = keras.saving.load_model(job["path"], custom_objects=custom, compile=False)
    inputs = [np.load(f) for f in job["inputs"]]
    y = model.predict(inputs if len(inputs) > 1 else inputs[0], verbose=0)
    if job["output"] is not None:
        y = y[job["output"]]
    np.save(job["result"], np.asarray(y, dtype=np.float64).reshape(-1))
"""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", program, json.dumps(jobs)],
                          capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: np.load(job["result"]) for name, job in jobs.items()}


def prefect_servers(home: Path) -> list[int]:
    """Pids of live ``prefect server start`` processes whose PREFECT_HOME is ``home``."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if b"server" not in args or b"start" not in args:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if f"PREFECT_HOME={home}".encode() in environ and state not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def wait_until_no_servers(home: Path, timeout: float = 15.0) -> list[int]:
    """The servers of ``home`` still alive after up to ``timeout`` s: a CLI that exits
    has told its server to stop, and the server's own graceful shutdown takes a moment."""
    deadline = time.monotonic() + timeout
    while (alive := prefect_servers(home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def prefect_free_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a child that runs Prefect on its own: no setting
    of the caller's profile or of the test session's server leaks in, and its database
    and files live under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {"PREFECT_HOME": str(home), **extra}


def write_table(path: Path, columns: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def ckpt_member(name: str, path: Path | str, **extra: Any) -> dict[str, Any]:
    """A manifest entry for a checkpoint of ``flows.demo.build_mlp_checkpoint``, with the
    tensor names its graph uses."""
    return {"name": name, "path": str(path), "input": "features:0", "output": "score:0",
            **extra}


def write_manifest(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_dataset(folder: Path) -> pa.Table:
    files = sorted(p for p in folder.rglob("*.parquet") if not p.name.startswith((".", "_")))
    return pa.concat_tables([pq.read_table(f, partitioning=None) for f in files])


def assert_matches_reference(table: pa.Table, ref: dict[Any, tuple[float, ...]],
                             columns: tuple[str, ...] = ("score_seed0", "score_seed1",
                                                         "score_seed2", "ensemble_score"),
                             ) -> None:
    """Every reference id exactly once, and the scores within 1e-5 of the reference."""
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(ref)
    assert set(ids) == set(ref)
    got = np.stack([table.column(c).to_numpy() for c in columns], axis=1)
    want = np.array([ref[i] for i in ids])
    assert np.abs(got - want).max() <= 1e-5


# Hidden and temporary names a user (or another tool) may keep in or under an output
# folder, including names shaped like this tool's staging files of earlier releases.
USER_FILE_NAMES = (
    ".report.tmp", ".x.tmp", ".part-0000.parquet.0123456789ab.tmp",
    ".part-0000.parquet.prev-1234abcd.tmp", ".write-probe-1234abcd", ".lock-mine",
    "_notes.txt", ".hidden",
)


def plant_user_files(out: Path) -> dict[Path, str]:
    """Files the tool did not create, at the top of ``out``, in the folders it writes
    (``ensemble/``, ``quarantine/``) and in a user folder; returns path -> content."""
    planted = {}
    for folder in (out, out / "ensemble", out / "quarantine", out / "docs"):
        folder.mkdir(parents=True, exist_ok=True)
        for name in USER_FILE_NAMES:
            (folder / name).write_text(f"user data {name}")
            planted[folder / name] = f"user data {name}"
    return planted


@contextlib.contextmanager
def read_only_folder(path: Path) -> Iterator[Path]:
    """A folder on a read-only file system (EROFS, as a read-only mount gives): a tmpfs
    mounted read-only where this process may mount (root), else a folder without write
    permission."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
        capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only file system, and root ignores permissions")
        path.chmod(0o555)
    try:
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)
        else:
            path.chmod(0o755)


def reference_scores(manifest_path: Path, data: Path) -> dict[int, tuple[float, ...]]:
    """id -> (each member's numpy score, their mean) for a demo-style manifest and data."""
    manifest = load_manifest(manifest_path)
    table = read_dataset(data)
    x = np.stack([table.column(f).to_numpy() for f in manifest.features], axis=1)
    refs = np.stack([mlp_reference(m.path, x) for m in manifest.models], axis=1)
    ids = table.column("id").to_pylist()
    return {i: (*r, r.mean()) for i, r in zip(ids, refs, strict=True)}


def assert_output_matches(out: Path, ref: dict[int, tuple[float, ...]]) -> None:
    """The ensemble table under ``out`` holds every reference id once, scores within 1e-5."""
    assert_matches_reference(read_dataset(out / "ensemble"), ref)


class FaultyStore(LocalStore):
    """A local store whose reads fail where ``fail(path)`` says so: faults are injected
    through the storage seam (``tasks.storage.store_for``), as a flaky disk or network
    mount would raise them, not by patching pyarrow."""

    def __init__(self, root: str | os.PathLike[str], fail: Callable[[Path], bool]) -> None:
        super().__init__(root)
        self.fail = fail

    def open_input(self, rel: str) -> pa.NativeFile:
        path = self.root / rel
        if self.fail(path):
            raise OSError(5, "Input/output error (injected)", str(path))
        return super().open_input(rel)


def inject_read_faults(monkeypatch: pytest.MonkeyPatch, fail: Callable[[Path], bool]) -> None:
    """Every local store made from now on (in this test) is a ``FaultyStore``."""
    import tasks.storage

    real = tasks.storage.store_for

    def faulty(location: Any) -> tasks.storage.Store:
        store = real(location)
        return FaultyStore(store.root, fail) if isinstance(store, LocalStore) else store

    monkeypatch.setattr(tasks.storage, "store_for", faulty)
