"""``s3://`` URIs and the process's S3 filesystem (pyarrow's own ``S3FileSystem``, so
object storage needs no extra dependency). ``tasks.storage`` builds its S3 store on them;
nothing else needs to know which backend a location is on.

Credentials, region and endpoint come from the standard AWS environment variables.
pyarrow 26 does not read ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` itself (measured
here; apache/arrow#49643), so they are passed as ``endpoint_override``. The filesystem is
built once per process and per configuration, not once per file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePath
from urllib.parse import urlsplit

import pyarrow.fs as pafs

__all__ = ["PARQUET_SUFFIXES", "S3_SCHEME", "S3Path", "is_s3", "s3_filesystem", "s3_uri"]

S3_SCHEME = "s3://"
PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")  # what discovery takes for data files


def s3_uri(location: str | os.PathLike[str] | S3Path) -> str | None:
    """The ``s3://bucket/key`` URI that ``location`` names, or None for a local path.

    A ``Path`` made from a URI has lost a slash (``Path("s3://b/k")`` is ``s3:/b/k``);
    that form is recognised too, because callers wrap the output folder in ``Path()``.
    """
    if isinstance(location, S3Path):
        return str(location)
    text = os.fspath(location)
    if text.startswith(S3_SCHEME):
        return text.rstrip("/")
    if isinstance(location, PurePath) and text.startswith("s3:/"):
        return S3_SCHEME + text[len("s3:/"):].rstrip("/")
    return None


def is_s3(location: str | os.PathLike[str] | S3Path) -> bool:
    return s3_uri(location) is not None


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


@lru_cache(maxsize=8)
def _make_filesystem(endpoint: str | None, region: str | None,
                     credentials: str) -> pafs.S3FileSystem:
    # ``credentials`` only keys the cache (a digest): the SDK reads the variables itself.
    kwargs: dict[str, str] = {}
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["scheme"] = parts.scheme
        kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)  # type: ignore[arg-type]


def s3_filesystem() -> pafs.S3FileSystem:
    """The process's S3 filesystem for the current AWS environment variables.

    ``AWS_ENDPOINT_URL_S3`` (else ``AWS_ENDPOINT_URL``) selects an S3-compatible server,
    ``AWS_REGION`` (else ``AWS_DEFAULT_REGION``) the region; credentials follow the AWS
    SDK's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
    ``AWS_SESSION_TOKEN``, then ``~/.aws``, then instance metadata).
    """
    creds = "\0".join(os.environ.get(n, "") for n in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"))
    return _make_filesystem(_env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
                            _env("AWS_REGION", "AWS_DEFAULT_REGION"),
                            hashlib.sha256(creds.encode()).hexdigest())


@dataclass(frozen=True)
class S3Path:
    """An object (or prefix) in S3: ``key`` is ``bucket/dir/name``, without the scheme."""

    key: str

    @classmethod
    def from_uri(cls, uri: str) -> S3Path:
        key = uri[len(S3_SCHEME):].strip("/") if uri.startswith(S3_SCHEME) else uri.strip("/")
        if not key:
            raise ValueError(f"{uri!r} names no bucket; use s3://bucket/prefix")
        return cls(key)

    def __str__(self) -> str:
        return S3_SCHEME + self.key

    def __truediv__(self, part: str) -> S3Path:
        return self.joinpath(part)

    def joinpath(self, *parts: str) -> S3Path:
        return S3Path("/".join([self.key, *(p.strip("/") for p in parts)]))
