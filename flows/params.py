"""The flow's parameters: one pydantic model, so the Prefect UI renders and validates a form
and the CLI, deployments and tests share one definition of what a run is."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loaders.manifest import BadRowPolicy, Manifest, load_manifest, parse_manifest
from tasks.merge import EnsembleMethod

__all__ = ["Runner", "ScoreParams"]

Runner = Literal["threads", "processes", "dask"]


class ScoreParams(BaseModel):
    """What to score, with what, and where the ensemble table goes."""

    model_config = ConfigDict(extra="forbid")

    # A plain string, not ``str | None``: the UI's form then shows a text box at once
    # rather than a choice of types opening on "None"; empty means the inline manifest.
    models: str = Field(
        "", title="Models manifest (path)", examples=[".demo/manifest.yaml"],
        description="Path to the models manifest (YAML); relative model paths in it are taken "
        "from its folder. Required, unless you give 'Manifest (inline)' instead.")
    manifest: Manifest | None = Field(
        None, title="Manifest (inline)",
        description="The manifest itself instead of a path: id_column, features and models "
        "(name, path, input/output or signature, weight). Relative model paths are taken from "
        "the run's working folder (the repo root for the deployments).",
        examples=[{"id_column": "id", "features": ["f00", "f01"], "models": [
            {"name": "fold0", "path": "models/fold0.keras"}]}],
    )
    input: str = Field(
        min_length=1, title="Input (Parquet)", examples=["data/"],
        description="Parquet input: one file, a folder (searched recursively, hive "
        "key=value folders allowed) or a glob such as data/**/*.parquet.")
    output: str = Field(
        min_length=1, title="Output folder", examples=["out/"],
        description="Output folder: the ensemble table goes to OUTPUT/ensemble/ (member "
        "scores included), the run record to OUTPUT/_run.json.")
    ensemble: EnsembleMethod = Field(
        "mean", title="Ensemble method",
        description="How member scores combine into ensemble_score: mean, weighted (the "
        "manifest's weights) or median.",
    )
    bad_rows: BadRowPolicy | None = Field(
        None, title="Bad-row policy",
        description="Rows with null, NaN or infinite features: 'fail' the partition, or "
        "'quarantine' them to OUTPUT/quarantine/ with the reason. Empty: the manifest's "
        "policy (fail by default).",
    )
    concurrency: int = Field(
        2, ge=1, le=64, title="Concurrency (partitions in flight)",
        description="Partitions scored at once, 1 to 64. Each uses every core through "
        "TensorFlow's thread pool; 2 keeps decoding and scoring overlapped.",
    )
    batch_size: int | None = Field(
        None, ge=64, le=4_194_304, description="Rows per batch read, scored and written "
        "at once; bounds memory per partition in flight. Under 65,536, each batch is one "
        "TensorFlow call. Empty: the rows per call, 16,384, or 65,536 where a probe of "
        "about a second before scoring does not find 16,384 at least 10 % faster on this "
        "machine (run on inputs of several million rows, within memory bounds; the run "
        "record's feed says what was chosen and why; later runs into the same output "
        "reuse a probe's choice for up to 7 days while the CPU, TensorFlow, members, "
        "number of features and partitions in flight stay the same, except with the dask "
        "runner)."
    )
    min_members: int | None = Field(
        None, ge=1, le=1024, title="Minimum members per row",
        description="Fewest members with a finite score a row needs; also how many must "
        "load for the run to go on. Empty: the manifest's min_members, else all members.")
    baseline: str | None = Field(
        None, min_length=1, title="Drift baseline (run record)",
        description="A run record (_run.json) to compare this run's inputs and scores "
        "with. Empty: the previous run into the same output.")
    retries: int = Field(3, ge=0, le=10, description="Retries for transient I/O errors.")
    force: bool = Field(False, description="Re-score everything, ignoring committed outputs.")
    verify_inputs: bool = Field(
        False, title="Verify inputs by content",
        description="Hash every local input file whole (SHA-256) to decide what is "
        "unchanged since the last run, instead of size, mtime and the Parquet footer. "
        "Reads all the input once more.")
    runner: Runner = Field(
        "threads", title="Task runner",
        description="threads: Prefect's thread pool in the flow's process (default). "
        "processes: Prefect's ProcessPoolTaskRunner (spawned workers, each loading the models "
        "once). dask: prefect-dask's DaskTaskRunner on the existing cluster at 'address'.",
    )
    address: str | None = Field(
        None, title="Dask scheduler address", pattern=r"^(tcp|tls|inproc|ucx)://\S+$",
        description="With runner 'dask': the scheduler of an existing dask.distributed "
        "cluster, e.g. tcp://10.0.0.5:8786. Its workers need this project installed and "
        "PREFECT_API_URL pointing at the same Prefect server.",
        examples=["tcp://127.0.0.1:8786"],
    )
    model_cache: str | None = Field(
        None, min_length=1, title="Model cache folder",
        description="Where s3:// models are downloaded, once per host; used on every "
        "worker host. Empty: each host's $ENSEMBLE_MODEL_CACHE, else "
        "~/.cache/ensemble-scoring/models.")
    model_cache_size: int | None = Field(
        None, ge=1, title="Model cache size limit (bytes)",
        description="Least recently used models beyond this size are deleted from the "
        "cache (never one in use). Empty: each host's $ENSEMBLE_MODEL_CACHE_MAX_BYTES, "
        "else 10 GiB.")
    workers: int | None = Field(
        None, ge=1, le=256, title="Worker processes",
        description="With runner 'processes': how many worker processes (default: the "
        "number of cores).",
    )

    @model_validator(mode="after")
    def _one_manifest(self) -> ScoreParams:
        if bool(self.models.strip()) == (self.manifest is not None):
            raise ValueError("give exactly one of 'models' (a manifest path) or 'manifest' "
                             "(the manifest inline)")
        if self.runner == "dask" and not self.address:
            raise ValueError("runner 'dask' needs 'address', the scheduler of an existing "
                             "cluster (tcp://HOST:PORT)")
        if self.address and self.runner != "dask":
            raise ValueError("'address' is only used with runner 'dask'")
        return self

    def load_manifest(self) -> Manifest:
        """The manifest, with model paths resolved to absolute ones and ``s3://`` members
        checked and pinned to their objects and this run's model cache
        (``loaders.remote``), so every worker fetches the same files into it.

        Raises:
            ManifestError: invalid manifest, or a member's objects are missing.
        """
        from loaders.remote import check_cache_folder, pin_manifest

        if self.models.strip():
            manifest = load_manifest(self.models)
        else:
            assert self.manifest is not None
            manifest = parse_manifest(self.manifest.model_dump(exclude={"models": {"__all__": {
                "remote"}}}), Path.cwd(), source="inline manifest")
        cache = None if self.model_cache is None else str(Path(self.model_cache).absolute())
        pinned = pin_manifest(manifest, cache_dir=cache, max_bytes=self.model_cache_size)
        if pinned is not manifest:  # members on S3: their cache must be usable here
            check_cache_folder(cache, apart_from={"input": self.input,
                                                  "output": self.output})
        return pinned

    def policy(self, manifest: Manifest) -> BadRowPolicy:
        return self.bad_rows or manifest.bad_rows
