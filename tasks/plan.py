"""Planning a run: everything checked before the first expensive step.

Config mistakes (missing files, columns, tensors, an unwritable output) surface here in
seconds, naming what is wrong; a partition whose footer cannot be read is set aside so
the others still run (it is reported, and the run ends failed).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from loaders.errors import DataError
from loaders.inspect import digest_files, resolve_model
from loaders.manifest import Manifest
from tasks.fs import is_s3
from tasks.partitions import Partition, check_partition, discover_partitions
from tasks.storage import check_output_apart, store_for

__all__ = ["MemberInfo", "Plan", "make_plan", "resolve_members"]


class MemberInfo(BaseModel):
    name: str
    format: str
    location: str
    digest: str
    load_seconds: float = 0.0
    # MatMul + bias adds rewritten to BiasAdd at load (loaders.rewrite): 0 where
    # TensorFlow fuses them itself (oneDNN's path) and for SavedModels.
    fused_bias_adds: int = 0
    # Variables turned into constants at load (loaders.freeze): 0 where the graph uses a
    # variable otherwise than by reading it (a Keras export's function calls, a gather).
    frozen_variables: int = 0
    # Why the member could not be loaded; the run went on without it (min_members).
    missing: str = ""
    # A Keras file's one-time export to a SavedModel in this run (0: the cached export
    # was reused); included in load_seconds.
    export_seconds: float = 0.0


class Plan(BaseModel):
    output_dir: str  # an absolute local path, or an s3://bucket/prefix URI
    partitions: list[Partition]
    unreadable: dict[str, str]  # relpath -> why, for partitions set aside

    @property
    def total_bytes(self) -> int:
        return sum(p.size for p in self.partitions)


def resolve_members(manifest: Manifest) -> list[MemberInfo]:
    """Find every member's files and fingerprint them (no TensorFlow needed).

    Raises:
        ManifestError: a member's files are missing or incomplete.
    """
    infos = []
    for spec in manifest.models:
        resolved = resolve_model(spec)
        infos.append(MemberInfo(name=spec.name, format=resolved.format,
                                location=spec.path if is_s3(spec.path) else resolved.location,
                                digest=digest_files(resolved.files)))
    return infos


def make_plan(manifest: Manifest, input_path: str, output_dir: str, *,
              verify_inputs: bool = False) -> Plan:
    """List and check the partitions and the output folder; with ``verify_inputs``, hash
    every local partition whole for its fingerprint (see ``tasks.partitions``).

    Raises:
        DataError: no input, or a partition lacks a column or has a non-numeric feature.
        OutputError: the output folder is not writable, or is (or holds) the input.
    """
    check_output_apart(input_path, output_dir)
    store = store_for(output_dir)
    store.check_writable()
    partitions = discover_partitions(input_path, exclude=store.root)
    if manifest.golden is not None:  # blessed rows kept beside the data are not data
        golden = Path(manifest.golden)
        partitions = [p for p in partitions
                      if is_s3(p.path) or Path(p.path).resolve() != golden]
        if not partitions:
            raise DataError(f"the only Parquet file at {input_path} is the manifest's golden "
                            f"file {golden}; point --input at the data")
    unreadable: dict[str, str] = {}
    good = []
    for part in partitions:
        try:
            good.append(check_partition(part, manifest, verify=verify_inputs))
        except DataError as err:
            if "not a readable Parquet file" not in str(err):
                raise
            unreadable[part.relpath] = str(err)
    return Plan(output_dir=store.uri(), partitions=good, unreadable=unreadable)
