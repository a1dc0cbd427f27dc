"""Members on object storage: an ``s3://`` model path is turned into a folder of a local,
per-host cache, downloaded once, verified, and then loaded exactly like a local member
(same allow-list, same isolation: the loaders only ever see the local path).

- **Planning** (:func:`pin_manifest`) lists each member's prefix once (size and
  Last-Modified of every object), checks the files the format needs are there (a TF1
  checkpoint's ``.index``, ``.meta`` and every ``.data-NNNNN-of-MMMMM`` shard; a
  SavedModel's ``saved_model.pb`` and its variables' shards), and reads each object's
  ETag with one HEAD request (pyarrow's listing has no ETag; its opened file's metadata
  does). The result, a :class:`~loaders.manifest.RemoteSource`, travels with the spec to
  every worker: nothing is downloaded yet, and a missing object fails the run at once.
- **Cache entries are keyed by content**: ``s3-<sha256>`` of every object's relative key,
  size and ETag (Last-Modified where a server gives no ETag). A replaced object is a new
  entry; an unchanged one is found without a request to S3, so a re-run downloads nothing
  and its digests (SHA-256 of the entry's files, ``loaders.inspect``) equal those of the
  same files kept locally.
- **Atomic and shared.** An entry is downloaded into a hidden temporary folder beside it
  (``.s3-<sha256>.<random>.tmp``) under an exclusive ``flock`` on ``.s3-<sha256>.lock``,
  every file's size checked against the listing and its SHA-256 recorded in
  ``entry.json``, then renamed into place: processes fetching one model at once leave one
  complete entry and one download; a download cut short is never loaded, and is retried
  (:class:`ModelFetchError` is transient).
- **Untrusted folder.** An entry is the model that will run: one that is a link, holds
  one, belongs to another user, is writable by others, or whose files no longer match
  their recorded sizes and SHA-256 is refused. Object keys that are absolute or climb with
  ``..`` are refused at planning. Only entries and temporary folders with this module's
  names (and, for entries, its ``entry.json`` marker) are ever deleted.
- **Size limit.** After a download, least recently used entries (an entry's mtime is
  touched on every use) are deleted until the cache fits its limit, except entries being
  downloaded or used in the last ``EVICT_GRACE_SECONDS``: the limit is exceeded rather
  than a model in use deleted.

S3 access reuses ``tasks.fs`` (pyarrow's ``S3FileSystem`` and the AWS variables the data
uses); it is plain pyarrow, without Prefect.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow.fs as pafs

from loaders.errors import ManifestError, ModelFetchError, ModelLoadError
from loaders.inspect import KERAS_SUFFIXES, checkpoint_state_path, file_sha256
from loaders.keras_file import cache_root, distrust
from loaders.manifest import Manifest, ModelSpec, RemoteSource
from tasks.fs import S3Path, s3_filesystem

__all__ = ["CACHE_ENV", "DEFAULT_MAX_BYTES", "DOWNLOADS", "MAX_BYTES_ENV", "cache_settings",
           "check_cache_folder",
           "ensure_entry", "evict", "fetch_object", "localize", "parse_size", "pin_manifest",
           "pin_model"]

CACHE_ENV = "ENSEMBLE_MODEL_CACHE"
MAX_BYTES_ENV = "ENSEMBLE_MODEL_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 10 * 2**30
FETCH_ATTEMPTS = 3
# An entry used this recently may be about to be loaded by another process: kept.
EVICT_GRACE_SECONDS = 300.0
# A temporary folder older than this was left by a killed download.
STALE_TMP_SECONDS = 86_400.0
_MAX_STATE_BYTES = 1 << 20
_MAX_NAME_BYTES = 255  # a file name's limit on Linux file systems
_CHUNK = 8 << 20
_MARKER = "ensemble-scoring model cache entry, v1"
_ENTRY = re.compile(r"^s3-[0-9a-f]{64}$")
_TMP = re.compile(r"^\.s3-[0-9a-f]{64}\.[A-Za-z0-9_]+\.(tmp|evict)$")
_INFO = "entry.json"
_FILES = "files"
_SHARD = r"\.data-(\d{5})-of-(\d{5})"

# Downloads this process made, by entry (an entry found in the cache is not counted).
DOWNLOADS: Counter[str] = Counter()
_verified: set[tuple[str, int]] = set()
_verified_lock = threading.Lock()
log = logging.getLogger(__name__)


def parse_size(text: str) -> int:
    """Bytes from ``10737418240``, ``10G``, ``512MiB``...: K, M, G, T are powers of 1024.

    Raises:
        ValueError: not a size.
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B)?|B)?\s*", text, re.I)
    if found is None:
        raise ValueError(f"{text!r} is not a size (bytes, or a number with K, M, G or T)")
    power = "KMGT".index(found.group(2).upper()) + 1 if found.group(2) else 0
    size = int(float(found.group(1)) * 1024**power)
    if size < 1:
        raise ValueError(f"{text!r} is not a size limit: give at least 1 byte (a limit the "
                         "models in use exceed keeps them and evicts the others)")
    return size


def cache_settings(cache_dir: str | os.PathLike[str] | None = None,
                   max_bytes: int | None = None) -> tuple[Path, int]:
    """The model cache folder and its size limit: given, else ``ENSEMBLE_MODEL_CACHE`` and
    ``ENSEMBLE_MODEL_CACHE_MAX_BYTES``, else ``<cache>/models`` (beside the Keras exports,
    see ``loaders.keras_file.cache_root``) and 10 GiB.

    Raises:
        ManifestError: the size in the environment is not a size.
    """
    folder = cache_dir or os.environ.get(CACHE_ENV)
    path = Path(folder).expanduser().absolute() if folder else cache_root().parent / "models"
    if max_bytes is None:
        raw = os.environ.get(MAX_BYTES_ENV, "")
        try:
            max_bytes = parse_size(raw) if raw.strip() else DEFAULT_MAX_BYTES
        except ValueError as err:
            raise ManifestError(f"{MAX_BYTES_ENV}: {err}") from err
    return path, max_bytes


def check_cache_folder(cache_dir: str | None, *, apart_from: dict[str, str]) -> Path:
    """The model cache folder on this host, created, checked before anything is scored:
    writable, and not inside a local folder of ``apart_from`` (the run's input and
    output: a cache there would be read as data, or written among the ensemble table).

    Raises:
        ManifestError: naming the folder and what it is inside of, or why it is unusable.
    """
    folder, _ = cache_settings(cache_dir)
    resolved = folder.resolve()
    for what, location in apart_from.items():
        if location.startswith("s3://"):
            continue
        parts = Path(location).expanduser().absolute().parts
        fixed = [p for p in parts[:next((i for i, p in enumerate(parts)
                                          if set(p) & set("*?[")), len(parts))]]
        if fixed and resolved.is_relative_to(Path(*fixed).resolve()):
            raise ManifestError(f"the model cache {folder} is inside the {what} "
                                f"({location}); choose a cache folder outside it "
                                f"(params.model_cache, --model-cache, or {CACHE_ENV})")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 - closed at once
        probe.close()
    except OSError as err:
        raise ManifestError(f"the model cache {folder} cannot be written ({err}); choose "
                            f"another folder (params.model_cache, --model-cache, or "
                            f"{CACHE_ENV})") from err
    return folder


def _checked_rel(name: str, rel: str, where: str) -> str:
    """``rel`` (an object key below the member's prefix) as a path that stays inside a
    cache entry. Keys are the bucket owner's input: absolute ones, ``..`` and empty parts
    would write elsewhere.

    Raises:
        ManifestError: naming the member and the key.
    """
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise ManifestError(f"model {name!r}: refusing object {where}/{rel}: its key leads "
                            "outside the model's prefix (absolute, '.', '..' or empty parts); "
                            "rename it or move the model to a clean prefix")
    if any(len(p.encode()) > _MAX_NAME_BYTES for p in parts):
        raise ManifestError(f"model {name!r}: refusing object {where}/{rel}: a part of its key "
                            f"is longer than {_MAX_NAME_BYTES} bytes, which no local file name "
                            "can hold; rename it or move the model to a clean prefix")
    return rel


def _check_names(name: str, root: str, rels: list[str]) -> None:
    """Refuse keys that cannot all be files of one folder: ``a`` beside ``a/b`` (S3 holds
    both; a disk cannot).

    Raises:
        ManifestError: naming both keys.
    """
    keys = set(rels)
    for rel in sorted(keys):
        parts = rel.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in keys:
                raise ManifestError(
                    f"model {name!r}: objects s3://{root}/{folder} and s3://{root}/{rel} "
                    "cannot both be downloaded (one would be a file and a folder); delete "
                    "or rename one of them")


def _list(fs: pafs.FileSystem, path: str, *, recursive: bool) -> dict[str, pafs.FileInfo]:
    """The objects below ``path``, by key relative to it (one listing)."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive,
                                               allow_not_found=True))
    return {i.path[len(path) + 1:]: i for i in infos if i.type == pafs.FileType.File}


def _check_checkpoint(spec: ModelSpec, root: str, files: dict[str, Any], prefix: str) -> None:
    """A TF1 bundle at ``prefix`` (relative to ``root``) is whole: ``.index`` and every
    ``.data`` shard its names promise (``-of-00002``: two shards).

    Raises:
        ManifestError: naming the member and the first missing object.
    """
    where = f"s3://{root}"
    if f"{prefix}.index" not in files:
        raise ManifestError(
            f"model {spec.name!r}: no checkpoint at {where}/{prefix}: object "
            f"{where}/{prefix}.index is missing; upload the whole checkpoint (.index, "
            ".meta and every .data-* shard), or fix 'path'")
    pattern = re.compile(re.escape(prefix) + _SHARD + "$")
    counts = {int(m.group(2)) for k in files if (m := pattern.match(k))} or {1}
    # A shard left by an earlier save with another shard count is ignored, as TensorFlow
    # does (its .index names the count it uses): one complete set is enough.
    gaps = {total: [f"{prefix}.data-{i:05d}-of-{total:05d}" for i in range(total)
                    if f"{prefix}.data-{i:05d}-of-{total:05d}" not in files]
            for total in sorted(counts)}
    total, missing = min(gaps.items(), key=lambda item: (len(item[1]), -item[0]))
    if missing:
        raise ManifestError(
            f"model {spec.name!r}: checkpoint {where}/{prefix} is incomplete: object "
            f"{where}/{missing[0]} is missing ({len(missing)} of {total} data shard(s)); "
            "upload every .data-* shard the checkpoint was saved with")


def _prefix_files(spec: ModelSpec, root: str, prefix: str, listing: dict[str, Any]
                  ) -> dict[str, Any]:
    """A TF1 checkpoint's objects: every ``<prefix>.*`` beside it (as ``loaders.inspect``
    takes them locally), checked whole, with its ``.meta`` and tensor names.

    Raises:
        ManifestError: a missing object or tensor name.
    """
    folder, _, name = prefix.rpartition("/")
    files = {k: v for k, v in listing.items()
             if k.rpartition("/")[0] == folder and k.rpartition("/")[2].startswith(f"{name}.")}
    _check_checkpoint(spec, root, files, prefix)
    if f"{prefix}.meta" not in files:
        raise ManifestError(
            f"model {spec.name!r}: checkpoint s3://{root}/{prefix} has no meta graph (object "
            f"s3://{root}/{prefix}.meta is missing); save it with "
            "Saver.save(..., write_meta_graph=True) or export a SavedModel")
    if spec.input is None or spec.output is None:
        raise ManifestError(
            f"model {spec.name!r}: a TF1 checkpoint needs 'input' and 'output' tensor names "
            "in the manifest (for example input: features:0, output: score:0)")
    return files


def _state_prefix(spec: ModelSpec, fs: pafs.FileSystem, root: str) -> str:
    """The checkpoint a folder's ``checkpoint`` state file names, kept inside the folder
    as ``loaders.inspect`` does locally (a path leading out: its last component only)."""
    with fs.open_input_stream(f"{root}/checkpoint") as f:
        text = f.read(_MAX_STATE_BYTES).decode("utf-8", errors="replace")
    value = checkpoint_state_path(text)
    if not value:
        raise ManifestError(f"model {spec.name!r}: s3://{root}/checkpoint names no "
                            "model_checkpoint_path; point 'path' at a checkpoint prefix")
    named = PurePosixPath(value)
    if named.is_absolute() or ".." in named.parts or "://" in value:  # it leads elsewhere
        return named.name
    return str(named)


def _folder_files(spec: ModelSpec, fs: pafs.FileSystem, root: str,
                  inside: dict[str, Any]) -> dict[str, Any]:
    """A folder member's objects: a SavedModel's all, or a ``checkpoint`` state file and
    the checkpoint it names.

    Raises:
        ManifestError: neither, or incomplete.
    """
    if spec.format in ("auto", "saved_model") and (
            "saved_model.pb" in inside or "saved_model.pbtxt" in inside):
        if any(k.startswith("variables/") for k in inside):
            _check_checkpoint(spec, root, inside, "variables/variables")
        return inside
    if spec.format == "saved_model":
        raise ManifestError(f"model {spec.name!r}: {spec.path} is not a SavedModel folder "
                            f"(no object s3://{root}/saved_model.pb)")
    if "checkpoint" not in inside:
        raise ManifestError(
            f"model {spec.name!r}: folder {spec.path} holds neither a SavedModel "
            "(saved_model.pb) nor a TF1 'checkpoint' state file; point 'path' at a "
            "checkpoint prefix such as model.ckpt-1000")
    prefix = _state_prefix(spec, fs, root)
    return {"checkpoint": inside["checkpoint"], **_prefix_files(spec, root, prefix, inside)}


def _find(spec: ModelSpec, fs: pafs.FileSystem) -> tuple[str, dict[str, Any], str]:
    """(root, objects by key relative to root, the member's path relative to root).

    Raises:
        ManifestError: nothing usable at ``spec.path``.
    """
    where = S3Path.from_uri(spec.path).key
    parent, _, name = where.rpartition("/")
    keras = spec.format == "keras" or (
        spec.format == "auto" and PurePosixPath(name).suffix.lower() in KERAS_SUFFIXES)
    if not keras:
        inside = _list(fs, where, recursive=True)
        if inside:
            return where, _folder_files(spec, fs, where, inside), ""
    if not parent:
        raise ManifestError(f"model {spec.name!r}: bucket {spec.path} holds no model; "
                            "point 'path' at a model inside it")
    beside = _list(fs, parent, recursive=False)
    if keras:
        if name not in beside:
            raise ManifestError(f"model {spec.name!r}: no Keras file at {spec.path} (no such "
                                "object); check 'path'")
        return parent, {name: beside[name]}, name
    if spec.format == "saved_model":
        raise ManifestError(f"model {spec.name!r}: {spec.path} is not a SavedModel folder "
                            "(no objects below it)")
    return parent, _prefix_files(spec, parent, name, beside), name


def _tag(fs: pafs.FileSystem, path: str, info: pafs.FileInfo) -> str:
    """What tells this object's content from a replacement's: its ETag (one HEAD), else
    its Last-Modified time."""
    with fs.open_input_file(path) as f:
        etag = (f.metadata().get("ETag") or b"").decode(errors="replace").strip('"')
    return f"etag:{etag}" if etag else f"mtime:{info.mtime_ns}"


def pin_model(spec: ModelSpec, *, cache_dir: Path | None = None, max_bytes: int = 0
              ) -> ModelSpec:
    """``spec`` with its ``remote`` set: its objects found, checked and tagged (one
    listing per prefix, one HEAD per object); nothing is downloaded. Without
    ``cache_dir`` / ``max_bytes``, each process that fetches it uses its own
    ``cache_settings()`` (each host's environment).

    Raises:
        ManifestError: an object is missing, a key is unsafe, or S3 cannot be read.
    """
    fs = s3_filesystem()
    try:
        root, found, local = _find(spec, fs)
        for rel in [*found, *([local] if local else [])]:  # before any request names them
            _checked_rel(spec.name, rel, f"s3://{root}")
        files = tuple((rel, int(found[rel].size), _tag(fs, f"{root}/{rel}", found[rel]))
                      for rel in sorted(found))
    except (OSError, ValueError) as err:
        if isinstance(err, ManifestError):
            raise
        raise ManifestError(
            f"model {spec.name!r}: cannot read {spec.path} ({err}); check the URI, the bucket "
            "and the AWS variables (credentials, AWS_REGION, AWS_ENDPOINT_URL)") from err
    _check_names(spec.name, root, [rel for rel, _, _ in files])
    # The root is part of the key: where a server gives no ETag the tag is a time to the
    # second, and two folds of one network have files of the same sizes.
    key = "s3-" + hashlib.sha256(json.dumps([_MARKER, f"s3://{root}", files]).encode()
                                 ).hexdigest()
    return spec.model_copy(update={"remote": RemoteSource(
        root=f"s3://{root}", files=files, local=local, key=key,
        cache_dir=str(cache_dir.absolute()) if cache_dir else "", max_bytes=max_bytes)})


def pin_manifest(manifest: Manifest, *, cache_dir: str | os.PathLike[str] | None = None,
                 max_bytes: int | None = None) -> Manifest:
    """The manifest with every ``s3://`` member pinned (``pin_model``) to the objects
    there now, and to the cache folder and limit given: those of the run, used on every
    host. Not given, each host uses its own (``cache_settings``: its environment).

    Raises:
        ManifestError: as ``pin_model``, naming the member and the key.
    """
    if not any(m.path.startswith("s3://") for m in manifest.models):
        return manifest
    if max_bytes is None and os.environ.get(MAX_BYTES_ENV):
        cache_settings()  # a bad size in this host's environment fails planning, not a task
    folder = Path(cache_dir).expanduser().absolute() if cache_dir else None
    models = tuple(pin_model(m, cache_dir=folder, max_bytes=max_bytes or 0)
                   if m.path.startswith("s3://") else m for m in manifest.models)
    return manifest.model_copy(update={"models": models})


def localize(spec: ModelSpec) -> ModelSpec:
    """``spec`` pointing at its local cache entry (downloaded first if this host has
    none); an unpinned ``s3://`` spec is pinned first, with ``cache_settings()``.

    Raises:
        ManifestError: as ``pin_model``.
        ModelFetchError: the download failed every attempt (transient).
        ModelLoadError: the cache entry cannot be trusted, or the objects changed since
            the run was planned.
    """
    pin = spec.remote or pin_model(spec).remote
    assert pin is not None
    entry = ensure_entry(spec.name, pin)
    target = entry / _FILES / pin.local if pin.local else entry / _FILES
    return spec.model_copy(update={"path": str(target), "remote": None})


def ensure_entry(name: str, pin: RemoteSource) -> Path:
    """The complete, verified cache entry of ``pin``, downloading it unless this host
    has it, then evicting least recently used entries beyond the limit.

    Raises:
        ModelFetchError, ModelLoadError: as ``localize``.
    """
    cache, limit = cache_settings(pin.cache_dir or None, pin.max_bytes or None)
    final = cache / pin.key
    if not _usable(name, final, pin):
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ModelLoadError(f"model {name!r}: cannot create the model cache {cache} "
                                 f"({err}); set --model-cache or {CACHE_ENV} to a writable "
                                 "folder") from err
        with _entry_lock(name, cache, pin.key):
            if not _usable(name, final, pin):
                _download(name, pin, final)
        _usable(name, final, pin)  # verifies what was just renamed into place
        evict(cache, limit, keep=pin.key)
    with contextlib.suppress(OSError):
        os.utime(final)  # the least recently used entries are evicted first
    return final


def _read_info(entry: Path) -> dict[str, Any] | None:
    """An entry's ``entry.json`` when it carries this module's marker, else None."""
    try:
        info = json.loads((entry / _INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("marker") == _MARKER else None


def _usable(name: str, final: Path, pin: RemoteSource) -> bool:
    """Whether ``final`` holds the complete entry of ``pin`` (False: not there).
    Verified once per process: every file's size and SHA-256 against ``entry.json``.

    Raises:
        ModelLoadError: it is there but cannot be trusted, is incomplete or altered.
    """
    if not os.path.lexists(final):
        return False
    why = distrust(final)
    info = _read_info(final) if why is None else None
    if why is None and (info is None or info.get("key") != pin.key
                        or [tuple(f) for f in info.get("files", [])] != list(pin.files)):
        why = "is incomplete or not an entry of these objects"
    stamp = (str(final), final.lstat().st_ino)
    with _verified_lock:
        known = stamp in _verified
    if why is None and not known:
        assert info is not None
        for rel, size, _ in pin.files:
            path = final / _FILES / rel
            if (not path.is_file() or path.stat().st_size != size
                    or file_sha256(str(path)) != info.get("sha256", {}).get(rel)):
                why = f"holds a file that changed since it was downloaded ({rel})"
                break
    if why is not None:
        raise ModelLoadError(
            f"model {name!r}: the model cache entry {final} {why}; refusing it, since it "
            f"would be scored as the model. Delete it (it is downloaded again), or set "
            f"--model-cache / {CACHE_ENV} to a folder only you can write")
    with _verified_lock:
        _verified.add(stamp)
    return True


@contextlib.contextmanager
def _entry_lock(name: str, cache: Path, key: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``.<key>.lock`` (never through a link or on anything
    but a regular file): one download of an entry at a time on this host."""
    path = cache / f".{key}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as err:
        raise ModelLoadError(f"model {name!r}: cannot open the cache lock {path} ({err}); "
                             "delete it if it is a link or not yours") from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ModelLoadError(f"model {name!r}: the cache lock {path} is not a file")
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fetch_object(fs: pafs.FileSystem, src: str, dest: Path) -> str:
    """Copy object ``src`` to the new file ``dest``; returns the object's ETag ("" when
    the server gives none). The seam tests replace to inject a download cut short."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with fs.open_input_file(src) as f, os.fdopen(fd, "wb") as out:
        etag = (f.metadata().get("ETag") or b"").decode(errors="replace").strip('"')
        while chunk := f.read(_CHUNK):
            out.write(chunk)
    return etag


def _fetch_all(name: str, pin: RemoteSource, tmp: Path) -> None:
    """Download every object of ``pin`` below ``tmp/files``, checking each one's size
    (and ETag) against what planning listed.

    Raises:
        ModelFetchError: a transfer failed or came out short (worth another try).
        ModelLoadError: an object was deleted or replaced since planning.
    """
    fs = s3_filesystem()
    root = S3Path.from_uri(pin.root).key
    for rel, size, tag in pin.files:
        where = f"s3://{root}/{rel}"
        dest = tmp / _FILES / _checked_rel(name, rel, f"s3://{root}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            etag = fetch_object(fs, f"{root}/{rel}", dest)
        except FileNotFoundError as err:
            raise ModelLoadError(f"model {name!r}: {where} was deleted since the run was "
                                 "planned; run again") from err
        except OSError as err:
            raise ModelFetchError(f"model {name!r}: downloading {where} failed ({err})"
                                  ) from err
        if etag and tag.startswith("etag:") and tag != f"etag:{etag}":
            raise ModelLoadError(f"model {name!r}: {where} was replaced since the run was "
                                 "planned; run again to score with the new object")
        got = dest.stat().st_size
        if got != size:
            raise ModelFetchError(f"model {name!r}: the download of {where} is incomplete "
                                  f"({got:,} of {size:,} bytes)")


def _seal(pin: RemoteSource, tmp: Path) -> None:
    """Record what the entry holds (with each file's SHA-256) and make it readable by
    all and writable by its owner only, as ``distrust`` requires."""
    sums = {rel: file_sha256(str(tmp / _FILES / rel)) for rel, _, _ in pin.files}
    info = {"marker": _MARKER, "key": pin.key, "root": pin.root, "files": pin.files,
            "sha256": sums, "bytes": sum(size for _, size, _ in pin.files),
            "downloaded_by": f"{socket.gethostname()}:{os.getpid()}", "at": time.time()}
    (tmp / _INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
    for path in (tmp, *tmp.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _download(name: str, pin: RemoteSource, final: Path) -> None:
    """Download ``pin`` into a temporary folder and rename it to ``final``, retrying a
    failed transfer ``FETCH_ATTEMPTS`` times; nothing incomplete is ever renamed.

    Raises:
        ModelFetchError: every attempt failed.
        ModelLoadError: objects changed since planning, or ``final`` appeared meanwhile.
    """
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        tmp = Path(tempfile.mkdtemp(prefix=f".{pin.key}.", suffix=".tmp", dir=final.parent))
        try:
            _fetch_all(name, pin, tmp)
            _seal(pin, tmp)
            os.rename(tmp, final)  # atomic; fails on an entry already there
        except ModelFetchError as err:
            if attempt == FETCH_ATTEMPTS:
                raise ModelFetchError(f"{err}; tried {attempt} times, nothing incomplete "
                                      "was kept") from err
            log.warning("%s; retrying (attempt %d of %d)", err, attempt + 1, FETCH_ATTEMPTS)
            time.sleep(0.5 * attempt)
            continue
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise ModelLoadError(f"model {name!r}: {final} appeared while it was being "
                                     "downloaded; delete it if it is not this tool's") from err
            raise ModelFetchError(f"model {name!r}: cannot write {tmp} ({err})") from err
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        DOWNLOADS[pin.key] += 1
        log.info("model %s: downloaded %s (%d object(s), %s bytes) into %s", name, pin.root,
                 len(pin.files), f"{sum(s for _, s, _ in pin.files):,}", final)
        return


def _entries(cache: Path) -> list[tuple[float, str, int]]:
    """(mtime, name, bytes) of every complete entry this tool made and this user owns."""
    found = []
    for child in cache.iterdir():
        if not _ENTRY.match(child.name):
            continue
        st = child.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            continue
        info = _read_info(child)
        if info is not None:
            found.append((st.st_mtime, child.name, int(info.get("bytes", 0))))
    return found


def _remove_entry(cache: Path, name: str) -> bool:
    """Delete entry ``name`` unless it is being downloaded (its lock is held): renamed out
    of sight first, so no reader ever sees it half deleted."""
    try:
        fd = os.open(cache / f".{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        doomed = cache / f".{name}.{uuid.uuid4().hex}.evict"
        os.rename(cache / name, doomed)
    except OSError:
        return False
    finally:
        os.close(fd)
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def evict(cache: Path, max_bytes: int, *, keep: str = "") -> list[str]:
    """Delete least recently used entries until the cache holds at most ``max_bytes``
    (never ``keep``, one in use, or one used in the last ``EVICT_GRACE_SECONDS``), and
    temporary folders left by killed downloads; returns the entries deleted."""
    now = time.time()
    with contextlib.suppress(OSError):
        for child in cache.iterdir():
            st = child.lstat()
            if (_TMP.match(child.name) and stat.S_ISDIR(st.st_mode)
                    and st.st_uid == os.geteuid() and now - st.st_mtime > STALE_TMP_SECONDS):
                shutil.rmtree(child, ignore_errors=True)
    try:
        entries = _entries(cache)
    except OSError:
        return []
    total = sum(size for _, _, size in entries)
    removed = []
    for mtime, name, size in sorted(entries):
        if total <= max_bytes:
            break
        if name == keep or now - mtime < EVICT_GRACE_SECONDS:
            continue
        if _remove_entry(cache, name):
            total -= size
            removed.append(name)
            log.info("model cache %s: evicted %s (%s bytes)", cache, name, f"{size:,}")
    return removed
