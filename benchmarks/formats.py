"""``python -m benchmarks.formats``: the same members as TF1 checkpoints and as Keras 3
``.keras`` files, scored by the product in interleaved runs of one session.

A ``.keras`` member is exported once to a SavedModel (cached) and then scored through the
SavedModel loader; this shows whether that path scores as fast as a checkpoint of the
same weights. The export cache lives in the work folder and is filled by a warm-up run,
so the timed runs measure scoring, not the one-time export (its time is printed apart).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.run import run_product, wait_quiet
from benchmarks.workload import Workload, build_workload
from flows.demo import feature_names, mlp_weights

__all__ = ["main"]


def save_keras_members(w: Workload, folder: Path) -> list[Path]:
    """Each workload member's weights as a Keras functional model in a ``.keras`` file."""
    import keras

    paths = []
    for i in range(w.members):
        path = folder / f"m{i}.keras"
        paths.append(path)
        if path.is_file():
            continue
        layers = mlp_weights(w.seed * 1000 + i, w.features, w.hidden)
        inputs = keras.Input((w.features,), name="features")
        h = inputs
        dense = []
        for k, (kernel, _) in enumerate(layers):
            last = k == len(layers) - 1
            layer = keras.layers.Dense(kernel.shape[1], activation="sigmoid" if last
                                       else "relu", name="score" if last else None)
            dense.append(layer)
            h = layer(h)
        model = keras.Model(inputs, h)
        for layer, (kernel, bias) in zip(dense, layers, strict=True):
            layer.set_weights([kernel, bias])
        folder.mkdir(parents=True, exist_ok=True)
        model.save(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.formats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--rows-per-partition", type=int, default=1_000_000)
    p.add_argument("--pairs", type=int, default=2, help="interleaved pairs (default 2)")
    p.add_argument("--workdir", type=Path, default=Path(".bench"))
    p.add_argument("--quiet-wait", type=float, default=120.0, metavar="SECONDS")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["ENSEMBLE_SCORING_CACHE_DIR"] = str((args.workdir / "cache").resolve())
    w = Workload(partitions=args.partitions, rows=args.rows_per_partition)
    tf1_manifest, data, _ = build_workload(w, args.workdir)
    keras_dir = args.workdir / w.key / "keras"
    models = save_keras_members(w, keras_dir)
    keras_manifest = keras_dir / "manifest.yaml"
    keras_manifest.write_text(yaml.safe_dump({
        "id_column": "id", "features": feature_names(w.features),
        "models": [{"name": f"m{i}", "path": str(m.resolve())} for i, m in enumerate(models)]}))
    first = sorted(data.glob("*.parquet"))[0]
    t = time.perf_counter()
    warm = run_product(keras_manifest, first, args.workdir / "out" / "formats-warm", [])
    print(f"warm-up (one partition, exports the .keras members once): "
          f"{time.perf_counter() - t:.1f} s, {warm['rows']:,} rows")
    flows: dict[str, list[float]] = {"checkpoint": [], "keras": []}
    for i in range(args.pairs):
        for name, manifest in (("checkpoint", tf1_manifest), ("keras", keras_manifest)):
            wait_quiet(patience=args.quiet_wait)
            run = run_product(manifest, data, args.workdir / "out" / f"formats-{name}", [])
            flows[name].append(run["flow"])
            rate = w.row_model_evals / run["flow"]
            print(f"pair {i + 1} {name:10s}: flow {run['flow']:6.1f} s "
                  f"({rate / 1e6:.2f} M row-model evals/s), whole {run['wall']:6.1f} s")
    ratios = [k / c for k, c in zip(flows["keras"], flows["checkpoint"], strict=True)]
    print(f"flow time .keras / checkpoint: {np.mean(ratios):.3f} "
          f"(pairs: {', '.join(f'{r:.3f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
