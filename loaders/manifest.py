"""The models manifest: what the ensemble is, as plain configuration.

A :class:`ModelSpec` is cheap, frozen and picklable so it can cross task and process
boundaries; the loaded graph and session never do (see :mod:`loaders.cache`).
"""

from __future__ import annotations

import math
import posixpath
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from loaders.errors import ManifestError

__all__ = [
    "BadRowPolicy",
    "DriftPolicy",
    "Manifest",
    "ModelFormat",
    "ModelSpec",
    "RemoteSource",
    "load_manifest",
    "parse_manifest",
]

ModelFormat = Literal["auto", "checkpoint", "saved_model", "keras"]
BadRowPolicy = Literal["fail", "quarantine"]
DriftPolicy = Literal["warn", "fail"]

# Member names become column names (score_<name>) and folder names; keep them tame so
# no manifest can steer output outside the output folder.
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
# A dotted module path (custom_objects), nothing else: it is imported, never evaluated.
_MODULE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


# Largest manifest read from S3: a manifest is a few kB; anything far larger is a mistake.
_MAX_MANIFEST_BYTES = 16 * 2**20


class RemoteSource(BaseModel):
    """An ``s3://`` member's files as found when the run was planned (``loaders.remote``).

    Set by the tool, never by a manifest: it travels with the :class:`ModelSpec` to every
    worker so each fetches exactly the objects planning checked (or finds them in its
    cache by ``key`` without asking S3), into the cache folder the run was given.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    root: str  # s3://bucket/prefix that ``files`` are relative to
    files: tuple[tuple[str, int, str], ...]  # (relative key, size, ETag or mtime tag)
    local: str  # the member's path inside the cache entry ("" for the entry itself)
    key: str  # the cache entry's name, derived from ``files``
    cache_dir: str  # absolute; "": each host's own (loaders.remote.cache_settings)
    max_bytes: int  # 0: each host's own


class ModelSpec(BaseModel):
    """One ensemble member, as configured (never the loaded model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        pattern=_NAME_PATTERN, description="Unique member name; becomes score_<name>."
    )
    path: str = Field(min_length=1, description="TF1 checkpoint prefix or folder, "
                      "SavedModel folder, or "
                      "Keras file (.keras, legacy .h5); local, or an s3:// URI.")
    format: ModelFormat = Field("auto", description="Detected from the files (a Keras file "
                                "by its .keras/.h5 suffix) when 'auto'.")
    input: str | None = Field(None, description="TF1: input tensor name. SavedModel: input "
                              "key. Keras: input layer name.")
    output: str | None = Field(None, description="TF1: output tensor name. SavedModel: output "
                               "key. Keras: output name.")
    signature: str = Field("serving_default", description="SavedModel signature to call.")
    tags: tuple[str, ...] = Field(("serve",), description="SavedModel meta graph tags.")
    weight: float = Field(1.0, gt=0, allow_inf_nan=False,
                          description="Weight for --ensemble weighted: finite and positive.")
    allow_ops: tuple[str, ...] = Field(
        (), description="Op types to allow although they can touch files, the network or run "
        "code (e.g. ReadFile). Only for models you trust."
    )
    custom_objects: str | None = Field(
        None, pattern=_MODULE_PATTERN, description="Keras files only: a module (pkg.mod) "
        "whose CUSTOM_OBJECTS dict, or else its public classes, Keras may deserialize. "
        "Importing it runs its code (in the export process). Only for code you trust."
    )
    # Set by loaders.remote when the run is planned; refused in a manifest (parse_manifest).
    remote: SkipJsonSchema[RemoteSource | None] = None


class Manifest(BaseModel):
    """The whole ensemble: feature order, id column, members and the bad-row policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id_column: str = Field(min_length=1)
    features: tuple[str, ...] = Field(min_length=1)
    models: tuple[ModelSpec, ...] = Field(min_length=1)
    bad_rows: BadRowPolicy = "fail"
    golden: str | None = Field(
        None, min_length=1, description="Golden Parquet file written by `python -m "
        "flows.score bless`, a local path (relative to the manifest's folder); every run "
        "first checks each member still gives its blessed scores.")
    golden_tolerance: float = Field(1e-4, gt=0, allow_inf_nan=False, strict=True,
                                    description="Largest absolute deviation from a blessed "
                                    "score the golden check accepts.")
    min_members: int | None = Field(
        None, ge=1, strict=True, description="Fewest members a row needs to be scored (a "
        "member counts when its score is finite); also how many must load. Default: all.")
    drift: DriftPolicy = Field("warn", description="Inputs and scores drifting from the "
                               "baseline run: 'warn' reports, 'fail' fails above max_psi.")
    max_psi: float = Field(0.25, gt=0, allow_inf_nan=False, strict=True,
                           description="With drift 'fail': the largest PSI accepted.")

    @field_validator("golden")
    @classmethod
    def _local_golden(cls, value: str | None) -> str | None:
        if value is not None and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
            raise ValueError(f"golden {value!r} is a URL; the golden file must be a local "
                             "path (relative to the manifest's folder)")
        return value

    @field_validator("features")
    @classmethod
    def _unique_features(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        dupes = sorted({f for f in value if f in seen or seen.add(f)})  # type: ignore[func-returns-value]
        if dupes:
            raise ValueError(f"feature columns listed twice: {dupes}; list each column once")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> Manifest:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"duplicate model names: {dupes}; give every model a unique 'name'"
            )
        if self.min_members is not None and self.min_members > len(self.models):
            raise ValueError(f"min_members is {self.min_members} but the manifest has "
                             f"{len(self.models)} model(s); lower it or add models")
        if self.id_column in self.features:
            raise ValueError(
                f"id_column {self.id_column!r} is also listed in features; ids are not features"
            )
        return self

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.models]

    def quorum(self, override: int | None = None) -> int:
        """Members a row needs: ``override`` (a run's parameter), else the manifest's
        ``min_members``, else all of them.

        Raises:
            ManifestError: ``override`` exceeds the number of members.
        """
        wanted = override or self.min_members or len(self.models)
        if wanted > len(self.models):
            raise ManifestError(f"min_members is {wanted} but the manifest has "
                                f"{len(self.models)} model(s); lower it or add models")
        return wanted

    @property
    def weights(self) -> tuple[float, ...]:
        """The members' weights scaled to sum to 1, without overflow or underflow to 0.

        Dividing by the largest weight first keeps every step finite: two weights of
        1e308 would sum to infinity (every weighted score 0), and the smallest subnormal
        (5e-324) alone would sum to a denominator that rounds its own share away.
        """
        raw = [m.weight for m in self.models]
        top = max(raw)
        scaled = [w / top for w in raw]
        total = math.fsum(scaled)
        return tuple(w / total for w in scaled)


_S3 = "s3://"


def _member_path(base: Path | str, path: str) -> str:
    """A model path as the members will use it: an ``s3://`` URI as given; from a local
    manifest, a local path taken from its folder (``base``); from a manifest read from S3
    (``base`` its prefix), a path relative to that prefix.

    Raises:
        ManifestError: a path from an S3 manifest is local (absolute, ``~``) or climbs
            above the manifest's bucket.
    """
    if path.startswith(_S3):
        return path
    if isinstance(base, Path):
        return str((base / Path(path).expanduser()).resolve())
    if path.startswith(("/", "~")):
        # Whoever can write the bucket must not point every worker at its local files.
        raise ManifestError(f"model path {path!r} in the manifest {base}/...: a manifest "
                            "read from S3 names models on S3 only; give an s3:// URI or a "
                            "path relative to the manifest's prefix")
    bucket, _, prefix = base[len(_S3):].partition("/")
    joined = posixpath.normpath(posixpath.join(prefix, path))
    if joined == "." or joined.split("/", 1)[0] == "..":
        raise ManifestError(f"model path {path!r} leads out of bucket {bucket!r} from the "
                            f"manifest's folder {base}; name a model inside the bucket")
    return f"{_S3}{bucket}/{joined}"


def parse_manifest(
    data: Any, base_dir: Path | str | None = None, *, source: str = "manifest"
) -> Manifest:
    """Validate manifest data and resolve model paths against ``base_dir`` (a local folder
    or, for a manifest read from S3, its ``s3://`` prefix).

    Raises:
        ManifestError: with every problem pydantic found, each with its location.
    """
    if not isinstance(data, dict):
        raise ManifestError(
            f"{source}: expected a mapping with 'id_column', 'features' and 'models', "
            f"got {type(data).__name__}"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        # A failed member also fails the list's own length check: report the member only.
        locs = [tuple(e["loc"]) for e in errors]
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in errors
            if not any(len(o) > len(e["loc"]) and o[:len(e["loc"])] == tuple(e["loc"])
                       for o in locs)
        )
        raise ManifestError(f"{source} is invalid: {problems}") from err
    pinned = [m.name for m in manifest.models if m.remote is not None]
    if pinned:
        raise ManifestError(f"{source} is invalid: models {pinned} set 'remote', which the "
                            "tool sets itself when it plans a run; remove it")
    if base_dir is None:
        return manifest
    resolved = tuple(m.model_copy(update={"path": _member_path(base_dir, m.path)})
                     for m in manifest.models)
    golden = manifest.golden
    if golden is not None and isinstance(base_dir, str) and not Path(golden).is_absolute():
        raise ManifestError(f"{source}: golden {golden!r} is relative, but the manifest is "
                            "on S3; give the golden file's absolute local path")
    if golden is not None and isinstance(base_dir, Path):
        golden = str((base_dir / Path(golden).expanduser()).resolve())
    return manifest.model_copy(update={"models": resolved, "golden": golden})


def _read_s3_manifest(uri: str) -> str:
    """The text of a manifest object, read with the AWS settings the data uses.

    Raises:
        ManifestError: no such object, unreadable, or larger than a manifest can be.
    """
    from tasks.fs import S3Path, s3_filesystem

    try:
        with s3_filesystem().open_input_stream(S3Path.from_uri(uri).key) as f:
            raw = f.read(_MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError as err:
        raise ManifestError(f"manifest {uri} does not exist; check the manifest path "
                            "(params.models, --models) and the AWS variables (endpoint, "
                            "region)") from err
    except (OSError, ValueError) as err:
        raise ManifestError(f"manifest {uri} cannot be read: {err}; check the URI, the bucket "
                            "and the AWS variables (credentials, AWS_REGION, "
                            "AWS_ENDPOINT_URL)") from err
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest {uri} is larger than {_MAX_MANIFEST_BYTES >> 20} MB; "
                            "is it the manifest?")
    return raw.decode("utf-8", errors="replace")


def load_manifest(path: str | Path) -> Manifest:
    """Read a YAML manifest, a local file or an ``s3://`` object; relative model paths are
    taken from the manifest's folder (its prefix, on S3).

    Raises:
        ManifestError: the file is missing, is not YAML, or does not validate.
    """
    base: Path | str
    if isinstance(path, str) and path.startswith(_S3):
        uri = path.rstrip("/")
        text, base, shown = _read_s3_manifest(uri), uri.rsplit("/", 1)[0], uri
    else:
        file = Path(path).expanduser()
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError as err:
            raise ManifestError(f"manifest {file} does not exist; check the manifest path "
                                "(params.models, --models)") from err
        except OSError as err:
            raise ManifestError(f"manifest {file} cannot be read: {err}") from err
        base, shown = file.resolve().parent, str(file)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ManifestError(f"manifest {shown} is not valid YAML: {err}") from err
    return parse_manifest(data, base, source=f"manifest {shown}")
