"""Find a model's files on disk, tell its format, and fingerprint it.

Free of TensorFlow imports (the ``checkpoint`` state file is parsed as text), so planning
and resume decisions stay cheap.
"""

from __future__ import annotations

import glob
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loaders.errors import ManifestError
from loaders.manifest import ModelSpec

__all__ = ["ResolvedModel", "digest_files", "resolve_model"]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a member's files are and what they are."""

    format: Literal["checkpoint", "saved_model"]
    location: str  # checkpoint prefix, or SavedModel folder
    files: tuple[str, ...]


def _latest_prefix(folder: Path) -> Path | None:
    """The prefix named by a ``checkpoint`` state file, always inside ``folder``.

    The state file is part of the (untrusted) model: a path in it that leads out of the
    folder, relative (``../other/model.ckpt``) or absolute (often the machine that
    trained), is taken by its last component only, inside the folder.
    """
    state = folder / "checkpoint"
    if not state.is_file():
        return None
    for line in state.read_text(encoding="utf-8", errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model_checkpoint_path":
            named = Path(value.strip().strip('"'))
            candidate = (folder / named).resolve()
            if not named.is_absolute() and candidate.is_relative_to(folder.resolve()):
                return folder / named
            return folder / named.name
    return None


def _checkpoint_files(prefix: Path) -> tuple[str, ...]:
    parent = prefix.parent
    return tuple(  # glob.escape: a prefix such as model[v2].ckpt is a name, not a pattern
        sorted(str(p) for p in parent.glob(f"{glob.escape(prefix.name)}.*") if p.is_file())
    )


def resolve_model(spec: ModelSpec) -> ResolvedModel:
    """Locate the member's files and check the ones scoring needs are present.

    Raises:
        ManifestError: nothing usable at ``spec.path``, with what was expected there.
    """
    path = Path(spec.path)
    fmt = spec.format
    if fmt in ("auto", "saved_model") and path.is_dir() and (
        (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()
    ):
        files = tuple(sorted(str(p) for p in path.rglob("*") if p.is_file()))
        return ResolvedModel("saved_model", str(path), files)
    if fmt == "saved_model":
        raise ManifestError(
            f"model {spec.name!r}: {path} is not a SavedModel folder (no saved_model.pb)"
        )
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
            "'checkpoint' file, or a SavedModel folder"
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


_digest_memo: dict[tuple[tuple[str, int, int, int], ...], str] = {}
_digest_lock = threading.Lock()


def digest_files(files: tuple[str, ...]) -> str:
    """SHA-256 over the files' names and contents, memoised on (path, size, mtime, ctime):
    a file replaced in place with its mtime set back still changes its ctime.

    Hashing a large checkpoint takes a while; the memo makes the per-partition cache lookup
    a few ``stat`` calls.
    """
    stats = []
    for f in files:
        st = Path(f).stat()
        stats.append((f, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    key = tuple(stats)
    with _digest_lock:
        known = _digest_memo.get(key)
    if known is not None:
        return known
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    value = h.hexdigest()
    with _digest_lock:
        _digest_memo[key] = value
    return value
