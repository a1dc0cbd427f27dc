"""The embedded demo: a few small checkpoints of one architecture plus Parquet partitions.

The checkpoints deliberately share every variable name (``mlp/dense_0/kernel`` ...) and
differ only in their weights: the case in which restoring them into one graph goes
silently wrong. Tests and benchmarks build their fixtures with the same helpers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

__all__ = [
    "DEMO_DIR",
    "build_demo",
    "build_mlp_checkpoint",
    "feature_names",
    "mlp_reference",
    "mlp_weights",
    "numpy_mlp",
    "write_partitions",
]

DEMO_DIR = Path(".demo")
INPUT_NAME = "features"
OUTPUT_NAME = "score"


def feature_names(n: int) -> list[str]:
    return [f"f{i:02d}" for i in range(n)]


Layers = list[tuple[np.ndarray, np.ndarray]]


def mlp_weights(seed: int, n_features: int = 32, hidden: Sequence[int] = (256, 256)
                ) -> Layers:
    """(kernel, bias) per layer of a ReLU MLP with one sigmoid output, drawn from ``seed``
    (He-scaled hidden layers, a small head): different seeds, different models."""
    rng = np.random.default_rng(seed)
    layers, width = [], n_features
    for units in hidden:
        layers.append(((rng.standard_normal((width, units)) * np.sqrt(2.0 / width)
                        ).astype(np.float32),
                       (rng.standard_normal(units) * 0.1).astype(np.float32)))
        width = units
    layers.append(((rng.standard_normal((width, 1)) / np.sqrt(width)).astype(np.float32),
                   np.zeros(1, np.float32)))
    return layers


def numpy_mlp(layers: Layers, features: np.ndarray) -> np.ndarray:
    """The MLP in numpy, in float64: the ground truth every scorer is checked against."""
    h = features.astype(np.float64)
    for w, b in layers[:-1]:
        h = np.maximum(h @ w + b, 0.0)
    w, b = layers[-1]
    return (1.0 / (1.0 + np.exp(-(h @ w + b)))).reshape(-1)


def build_mlp_checkpoint(
    prefix: Path,
    *,
    seed: int,
    n_features: int = 32,
    hidden: Sequence[int] = (256, 256),
    with_training_ops: bool = False,
) -> Path:
    """Write a TF1 Saver checkpoint of ``mlp_weights(seed, n_features, hidden)``.

    The graph takes ``features:0`` (None, n_features) float32 and yields ``score:0`` (None, 1);
    every layer is ``tf.matmul(h, w) + b``, as TF1 code writes it. Different seeds give
    different models with identical variable names (``mlp/dense_0/kernel`` ...).
    ``with_training_ops`` keeps a loss and an Adam optimizer in the graph, as checkpoints
    saved during training do.
    """
    from loaders._tf import tf

    prefix.parent.mkdir(parents=True, exist_ok=True)
    layers = mlp_weights(seed, n_features, hidden)
    graph = tf.Graph()
    with graph.as_default():
        h = tf.compat.v1.placeholder(tf.float32, [None, n_features], name=INPUT_NAME)
        with tf.compat.v1.variable_scope("mlp"):
            for i, (w, b) in enumerate(layers):
                with tf.compat.v1.variable_scope(f"dense_{i}" if i < len(hidden) else "head"):
                    logits = (tf.matmul(h, tf.compat.v1.get_variable("kernel", initializer=w))
                              + tf.compat.v1.get_variable("bias", initializer=b))
                if i < len(hidden):
                    h = tf.nn.relu(logits)
        tf.sigmoid(logits, name=OUTPUT_NAME)
        if with_training_ops:
            labels = tf.compat.v1.placeholder(tf.float32, [None, 1], name="labels")
            loss = tf.compat.v1.losses.sigmoid_cross_entropy(labels, logits)
            tf.compat.v1.train.AdamOptimizer(1e-3).minimize(
                loss, global_step=tf.compat.v1.train.get_or_create_global_step()
            )
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(prefix))
    return prefix


def mlp_reference(prefix: Path | str, features: np.ndarray) -> np.ndarray:
    """``numpy_mlp`` on the weights read back from a checkpoint of ``build_mlp_checkpoint``."""
    from loaders._tf import tf

    reader = tf.train.load_checkpoint(str(prefix))
    hidden = sorted({n.split("/")[1] for n in reader.get_variable_to_shape_map()
                     if n.startswith("mlp/dense_")}, key=lambda s: int(s.rsplit("_", 1)[1]))
    layers = [(reader.get_tensor(f"mlp/{layer}/kernel"), reader.get_tensor(f"mlp/{layer}/bias"))
              for layer in [*hidden, "head"]]
    return numpy_mlp(layers, features)


def write_partitions(
    folder: Path,
    *,
    partitions: int,
    rows: int,
    n_features: int = 32,
    seed: int = 0,
    id_column: str = "id",
    row_group_size: int = 256 * 1024,
) -> list[Path]:
    """Write ``partitions`` Parquet files of ``rows`` rows: an int64 id plus float32 features.

    Written one row group at a time so generating a large partition needs little memory.
    """
    folder.mkdir(parents=True, exist_ok=True)
    names = feature_names(n_features)
    schema = pa.schema([(id_column, pa.int64())] + [(n, pa.float32()) for n in names])
    paths = []
    for p in range(partitions):
        path = folder / f"part-{p:04d}.parquet"
        rng = np.random.default_rng((seed, p))
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(0, rows, row_group_size):
                n = min(row_group_size, rows - start)
                x = rng.standard_normal((n, n_features), dtype=np.float32)
                ids = np.arange(p * rows + start, p * rows + start + n, dtype=np.int64)
                arrays = [pa.array(ids)] + [pa.array(x[:, j]) for j in range(n_features)]
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
        paths.append(path)
    return paths


def build_demo(folder: Path = DEMO_DIR, *, members: int = 3, partitions: int = 4,
               rows: int = 50_000, n_features: int = 32) -> Path:
    """Build the demo once under ``folder``; returns the manifest path.

    A marker file written last makes a half-built demo (interrupted build) rebuild.
    """
    manifest_path = folder / "manifest.yaml"
    marker = folder / ".built"
    wanted = {"members": members, "partitions": partitions, "rows": rows, "features": n_features}
    if marker.is_file() and json.loads(marker.read_text()) == wanted and manifest_path.is_file():
        return manifest_path
    models = []
    for i in range(members):
        prefix = build_mlp_checkpoint(
            folder / "models" / f"seed-{i}" / "model.ckpt", seed=1000 + i, n_features=n_features,
            hidden=(64, 32),
        )
        models.append({
            "name": f"seed{i}",
            "path": str(prefix.relative_to(folder)),
            "input": f"{INPUT_NAME}:0",
            "output": f"{OUTPUT_NAME}:0",
        })
    write_partitions(folder / "data", partitions=partitions, rows=rows, n_features=n_features)
    manifest = {"id_column": "id", "features": feature_names(n_features), "models": models}
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    marker.write_text(json.dumps(wanted))
    return manifest_path


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.demo``: build demo data of any size, to try a deployment or the
    UI on a run that takes a while (``python -m flows.score`` builds the default one)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m flows.demo",
        description="Build demo checkpoints (one MLP, several seeds, identical variable "
        "names) and Parquet partitions, with their manifest; prints the manifest's path. "
        "Score them with: python -m flows.score --models FOLDER/manifest.yaml --input "
        "FOLDER/data --output OUT")
    parser.add_argument("folder", nargs="?", type=Path, default=DEMO_DIR,
                        help=f"where to build (default {DEMO_DIR})")
    parser.add_argument("--members", type=int, default=3, help="checkpoints (default 3)")
    parser.add_argument("--partitions", type=int, default=4,
                        help="Parquet files (default 4)")
    parser.add_argument("--rows", type=int, default=50_000,
                        help="rows per file (default 50,000)")
    parser.add_argument("--features", type=int, default=32, help="features (default 32)")
    args = parser.parse_args(argv)
    if min(args.members, args.partitions, args.rows, args.features) < 1:
        parser.error("every count must be at least 1")
    from tasks.runtime import set_up

    set_up()  # TensorFlow's start-up chatter off, as in the scoring command
    print(build_demo(args.folder, members=args.members, partitions=args.partitions,
                     rows=args.rows, n_features=args.features))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
