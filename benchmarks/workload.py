"""The benchmark workload: K checkpoints of one MLP and P Parquet partitions, generated
deterministically and cached under a folder keyed by their sizes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from flows.demo import (
    INPUT_NAME,
    OUTPUT_NAME,
    build_mlp_checkpoint,
    feature_names,
    write_partitions,
)

__all__ = ["Workload", "build_workload"]


@dataclass(frozen=True)
class Workload:
    members: int = 4
    partitions: int = 16
    rows: int = 1_000_000
    features: int = 32
    hidden: tuple[int, ...] = (256, 256)
    seed: int = 0

    @property
    def key(self) -> str:
        h = "x".join(map(str, self.hidden))
        return f"k{self.members}-p{self.partitions}-r{self.rows}-f{self.features}-h{h}-s{self.seed}"

    @property
    def row_model_evals(self) -> int:
        return self.members * self.partitions * self.rows


def build_workload(w: Workload, root: Path) -> tuple[Path, Path, list[Path]]:
    """Build (or reuse) the workload; returns (manifest, data folder, checkpoint prefixes)."""
    folder = root / w.key
    manifest = folder / "manifest.yaml"
    marker = folder / ".built"
    prefixes = [folder / "models" / f"m{i}" / "model.ckpt" for i in range(w.members)]
    wanted = asdict(w) | {"hidden": list(w.hidden)}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return manifest, folder / "data", prefixes
    for i, prefix in enumerate(prefixes):
        build_mlp_checkpoint(prefix, seed=w.seed * 1000 + i, n_features=w.features,
                             hidden=w.hidden)
    write_partitions(folder / "data", partitions=w.partitions, rows=w.rows,
                     n_features=w.features, seed=w.seed)
    manifest.write_text(yaml.safe_dump({
        "id_column": "id",
        "features": feature_names(w.features),
        "models": [{"name": f"m{i}", "path": str(p.relative_to(folder)),
                    "input": f"{INPUT_NAME}:0", "output": f"{OUTPUT_NAME}:0"}
                   for i, p in enumerate(prefixes)],
    }, sort_keys=False))
    marker.write_text(json.dumps(wanted))
    return manifest, folder / "data", prefixes
