"""Find a model's files on disk, tell its format, and fingerprint it.

Free of TensorFlow imports (the ``checkpoint`` state file is parsed as text, a Keras
file's kind is told by its first bytes, a ``custom_objects`` module is found without
being imported), so planning and resume decisions stay cheap.
"""

from __future__ import annotations

import glob
import hashlib
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loaders.errors import ManifestError
from loaders.manifest import ModelSpec

__all__ = ["KERAS_SUFFIXES", "ResolvedModel", "checkpoint_state_path", "digest_files",
           "file_sha256", "keras_kind", "module_file", "resolve_model"]

# Suffixes that make a path a Keras file under ``format: auto``.
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a member's files are and what they are."""

    format: Literal["checkpoint", "saved_model", "keras"]
    location: str  # checkpoint prefix, SavedModel folder, or Keras file
    # Everything the member's scores depend on, digested for the model cache and resume:
    # for a Keras file, the file and its custom_objects module's source (``code``).
    files: tuple[str, ...]
    code: str | None = None  # a Keras member's custom_objects module file


def _latest_prefix(folder: Path) -> Path | None:
    """The prefix named by a ``checkpoint`` state file, always inside ``folder``.

    The state file is part of the (untrusted) model: a path in it that leads out of the
    folder, relative (``../other/model.ckpt``) or absolute (often the machine that
    trained), is taken by its last component only, inside the folder.
    """
    state = folder / "checkpoint"
    if not state.is_file():
        return None
    value = checkpoint_state_path(state.read_text(encoding="utf-8", errors="replace"))
    if value is None:
        return None
    named = Path(value)
    candidate = (folder / named).resolve()
    if not named.is_absolute() and candidate.is_relative_to(folder.resolve()):
        return folder / named
    return folder / named.name


def checkpoint_state_path(text: str) -> str | None:
    """The ``model_checkpoint_path`` a ``checkpoint`` state file names, as written (its
    caller keeps it inside the model's folder); None when it names none."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model_checkpoint_path":
            return value.strip().strip('"')
    return None


def _checkpoint_files(prefix: Path) -> tuple[str, ...]:
    parent = prefix.parent
    return tuple(  # glob.escape: a prefix such as model[v2].ckpt is a name, not a pattern
        sorted(str(p) for p in parent.glob(f"{glob.escape(prefix.name)}.*") if p.is_file())
    )


def keras_kind(path: Path) -> Literal["keras", "h5"] | None:
    """``keras`` for a Keras 3 archive (a zip file), ``h5`` for an HDF5 file (legacy
    Keras 2 ``.h5``), told by the file's first bytes; None for anything else."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "keras"
    if head == b"\x89HDF\r\n\x1a\n":
        return "h5"
    return None


def module_file(name: str) -> str | None:
    """The source file of module ``name`` (``pkg.mod``), found the way ``import`` finds
    it (``sys.meta_path`` finders over ``sys.path``), without running any of its code or
    its packages' ``__init__``; None when it cannot be found or is not a file."""
    search: Any = None
    spec = None
    parts = name.split(".")
    for i in range(len(parts)):
        fullname = ".".join(parts[:i + 1])
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            try:
                spec = find(fullname, search)
            except (ImportError, ValueError, AttributeError, TypeError):
                spec = None
            if spec is not None:
                break
        if spec is None:
            return None
        search = spec.submodule_search_locations
        if search is None and i < len(parts) - 1:
            return None  # a module, not a package: it has no submodules
    origin = getattr(spec, "origin", None)
    return origin if origin and Path(origin).is_file() else None


def _resolve_keras(spec: ModelSpec, path: Path) -> ResolvedModel:
    """A ``.keras`` or ``.h5`` file, and the ``custom_objects`` module it names.

    Raises:
        ManifestError: no such file, not a Keras file, SavedModel-only settings, or a
            ``custom_objects`` module that cannot be found.
    """
    if path.is_dir():
        raise ManifestError(
            f"model {spec.name!r}: {path} is a folder; a Keras member is one file saved by "
            "model.save('name.keras') (or a legacy .h5). For a SavedModel folder, leave "
            "'format' out"
        )
    if not path.is_file():
        where = (f"folder {path.parent} does not exist" if not path.parent.exists()
                 else "no such file")
        raise ManifestError(f"model {spec.name!r}: no Keras file at {path} ({where})")
    if keras_kind(path) is None:
        raise ManifestError(
            f"model {spec.name!r}: {path} is neither a Keras 3 archive (.keras, a zip file) "
            "nor an HDF5 file (.h5); save the model with model.save('name.keras')"
        )
    if spec.signature != "serving_default" or tuple(spec.tags) != ("serve",):
        raise ManifestError(
            f"model {spec.name!r}: 'signature' and 'tags' apply to SavedModels; a Keras "
            "file's input and output are picked by name with 'input:' and 'output:'"
        )
    code = None
    if spec.custom_objects is not None:
        code = module_file(spec.custom_objects)
        if code is None:
            raise ManifestError(
                f"model {spec.name!r}: custom_objects module {spec.custom_objects!r} is not "
                "importable here (searched sys.path); install it or add its folder to "
                "PYTHONPATH, on every host that scores"
            )
    return ResolvedModel("keras", str(path), (str(path),) + ((code,) if code else ()), code)


def resolve_model(spec: ModelSpec) -> ResolvedModel:
    """Locate the member's files and check the ones scoring needs are present. An
    ``s3://`` member's files are those of its entry in the local model cache
    (``loaders.remote``), downloaded first when this host has none.

    Raises:
        ManifestError: nothing usable at ``spec.path``, with what was expected there.
    """
    if spec.path.startswith("s3://"):  # fetched into the local cache once, then as local
        from loaders.remote import localize

        return resolve_model(localize(spec))
    path = Path(spec.path)
    fmt = spec.format
    if fmt == "keras" or (fmt == "auto" and path.suffix.lower() in KERAS_SUFFIXES):
        return _resolve_keras(spec, path)
    if spec.custom_objects is not None:
        raise ManifestError(
            f"model {spec.name!r}: 'custom_objects' applies to Keras files (.keras, .h5) "
            f"only, and {path} is not one; remove it"
        )
    if fmt in ("auto", "saved_model") and path.is_dir() and (
        (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()
    ):
        files = tuple(sorted(str(p) for p in path.rglob("*") if p.is_file()))
        return ResolvedModel("saved_model", str(path), files)
    if fmt == "saved_model":
        raise ManifestError(
            f"model {spec.name!r}: {path} is not a SavedModel folder (no saved_model.pb)"
        )
    return _resolve_checkpoint(spec, path)


def _resolve_checkpoint(spec: ModelSpec, path: Path) -> ResolvedModel:
    """A TF1 checkpoint: ``path`` is its prefix, or a folder whose state file names it.

    Raises:
        ManifestError: no checkpoint there, or one that cannot be scored.
    """
    prefix: Path | None = path
    if path.is_dir():
        prefix = _latest_prefix(path)
        if prefix is None:
            raise ManifestError(
                f"model {spec.name!r}: folder {path} holds neither a SavedModel "
                "(saved_model.pb) nor a TF1 'checkpoint' state file; point 'path' at a "
                "checkpoint prefix such as model.ckpt-1000"
            )
    assert prefix is not None
    if not Path(f"{prefix}.index").is_file():
        if not path.exists() and not path.parent.exists():
            where = f"folder {path.parent} does not exist"
        else:
            where = f"{prefix}.index is missing"
        raise ManifestError(
            f"model {spec.name!r}: no checkpoint at {prefix} ({where}); 'path' must be a "
            "checkpoint prefix (the name before .index/.data-*), a folder with a "
            "'checkpoint' file, a SavedModel folder, or a Keras .keras or .h5 file"
        )
    if not Path(f"{prefix}.meta").is_file():
        raise ManifestError(
            f"model {spec.name!r}: checkpoint {prefix} has no meta graph ({prefix}.meta); "
            "save it with Saver.save(..., write_meta_graph=True) or export a SavedModel"
        )
    if spec.input is None or spec.output is None:
        raise ManifestError(
            f"model {spec.name!r}: a TF1 checkpoint needs 'input' and 'output' tensor names "
            "in the manifest (for example input: features:0, output: score:0)"
        )
    return ResolvedModel("checkpoint", str(prefix), _checkpoint_files(prefix))


_digest_memo: dict[tuple[object, ...], str] = {}
_digest_lock = threading.Lock()


def _memoised(key: tuple[object, ...], compute: Callable[[], str]) -> str:
    with _digest_lock:
        known = _digest_memo.get(key)
    if known is not None:
        return known
    value = compute()
    with _digest_lock:
        _digest_memo[key] = value
    return value


def _feed(h: Any, path: str) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)


def _stat_key(path: str) -> tuple[str, int, int, int]:
    st = Path(path).stat()
    return (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def digest_files(files: tuple[str, ...]) -> str:
    """SHA-256 over the files' names and contents, memoised on (path, size, mtime, ctime):
    a file replaced in place with its mtime set back still changes its ctime.

    Hashing a large checkpoint takes a while; the memo makes the per-partition cache lookup
    a few ``stat`` calls.
    """
    def compute() -> str:
        h = hashlib.sha256()
        for f in files:
            h.update(Path(f).name.encode())
            _feed(h, f)
        return h.hexdigest()

    return _memoised(("files", *(_stat_key(f) for f in files)), compute)


def file_sha256(path: str) -> str:
    """SHA-256 of one file's bytes (no name), memoised like ``digest_files``."""
    def compute() -> str:
        h = hashlib.sha256()
        _feed(h, path)
        return h.hexdigest()

    return _memoised(("file", _stat_key(path)), compute)
