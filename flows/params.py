"""The flow's parameters: one pydantic model, so the Prefect UI renders and validates a form
and the CLI, deployments and tests share one definition of what a run is."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loaders.manifest import BadRowPolicy, Manifest, load_manifest, parse_manifest
from tasks.merge import EnsembleMethod

__all__ = ["ScoreParams"]


class ScoreParams(BaseModel):
    """What to score, with what, and where the ensemble table goes."""

    model_config = ConfigDict(extra="forbid")

    models: str | None = Field(
        None, description="Path to the models manifest (YAML). Give this or 'manifest'."
    )
    manifest: Manifest | None = Field(
        None,
        description="The manifest inline, instead of a path: id_column, features, models. "
        "Relative model paths are taken from the worker's working folder.",
    )
    input: str = Field(
        description="Parquet input: one file, a folder (searched recursively, hive "
        "key=value folders allowed) or a glob."
    )
    output: str = Field(
        description="Output folder; the ensemble table goes to <output>/ensemble/."
    )
    ensemble: EnsembleMethod = Field(
        "mean", description="How member scores combine: mean, weighted (manifest weights) "
        "or median."
    )
    bad_rows: BadRowPolicy | None = Field(
        None, description="Rows with null, NaN or infinite features: 'fail' the partition or "
        "'quarantine' them to <output>/quarantine/. Default: the manifest's (fail)."
    )
    concurrency: int = Field(
        2, ge=1, le=64, description="Partitions scored at once. Each uses every core through "
        "TensorFlow's thread pool; 2 keeps decoding and scoring overlapped."
    )
    batch_size: int = Field(
        65_536, ge=64, le=4_194_304, description="Rows per batch fed to the models; bounds "
        "memory per partition in flight."
    )
    retries: int = Field(3, ge=0, le=10, description="Retries for transient I/O errors.")
    force: bool = Field(False, description="Re-score everything, ignoring committed outputs.")
    runner: Literal["threads"] = Field(
        "threads", description="Task runner: threads (Prefect's thread pool, one process)."
    )

    @model_validator(mode="after")
    def _one_manifest(self) -> ScoreParams:
        if (self.models is None) == (self.manifest is None):
            raise ValueError("give exactly one of 'models' (a manifest path) or 'manifest' "
                             "(the manifest inline)")
        return self

    def load_manifest(self) -> Manifest:
        """The manifest, with model paths resolved to absolute ones."""
        if self.models is not None:
            return load_manifest(self.models)
        assert self.manifest is not None
        return parse_manifest(self.manifest.model_dump(), Path.cwd(), source="inline manifest")

    def policy(self, manifest: Manifest) -> BadRowPolicy:
        return self.bad_rows or manifest.bad_rows
