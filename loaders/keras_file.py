"""Keras files (Keras 3 ``.keras``, legacy ``.h5``) as members, served like a SavedModel.

A Keras file is turned once into a SavedModel and then loaded like any other
(``loaders.savedmodel``): its own graph and session, pruned to the signature's output,
every op checked against the allow-list, variables restored by the loader's own ops.

- **The export runs in a process of its own** (``loaders.keras_export``, started with
  ``sys.executable``): Keras loads the file in safe mode (``safe_mode=True``,
  ``compile=False``) and writes the SavedModel. Keras and TensorFlow's eager state never
  enter the scoring process, the ``custom_objects`` module (if any) is imported only
  there, and a crash or hang there is a :class:`ModelLoadError` here.
- **Cached by content.** The export lives in ``<cache>/keras/<sha256>/`` (the SHA-256 of
  the file's bytes, with a hash of the ``custom_objects`` module's source appended when
  there is one), ``<cache>`` being ``$ENSEMBLE_SCORING_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/ensemble-scoring``, else ``~/.cache/ensemble-scoring``. Every later
  load, in any process or worker that sees the folder, uses it without Keras.
- **Atomic.** The export is written to a hidden temporary folder beside its final name
  (``.<key>.<random>.tmp``) and renamed into place when complete. When another process
  renamed its own first, ours is deleted and theirs used. Only temporary folders this
  process created are ever deleted; a cache entry is never deleted or replaced.
- **Digest.** The member's digest (the model cache, resume, the run record) is that of
  the Keras file and its ``custom_objects`` module (``loaders.inspect``), not of the
  export: known without an export, the same in every process and on every host, where a
  SavedModel's bytes differ from one export to the next.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from loaders.base import GraphScorer
from loaders.errors import ModelLoadError
from loaders.inspect import ResolvedModel, file_sha256, keras_kind
from loaders.manifest import ModelSpec

__all__ = ["CACHE_ENV", "EXPORTS", "EXPORT_TIMEOUT", "cache_root", "distrust",
           "export_key", "keras_export", "load_keras"]

CACHE_ENV = "ENSEMBLE_SCORING_CACHE_DIR"
# An export that takes longer is stopped (its process killed) and the member fails to
# load; a small model takes seconds, most of them importing TensorFlow and Keras.
EXPORT_TIMEOUT = 1800.0

# Exports this process ran, by cache key (a reused export is not counted).
EXPORTS: Counter[str] = Counter()

_locks_guard = threading.Lock()
_locks: dict[str, threading.Lock] = {}

# The export process's program: the parent's import path, then loaders.keras_export.
_BOOTSTRAP = ("import json, sys; r = json.loads(sys.argv[1]); sys.path[:] = r['sys_path']; "
              "from loaders.keras_export import main; sys.exit(main(r))")


def cache_root() -> Path:
    """The folder Keras exports are cached in (``<cache>/keras``), read from the
    environment each time so every process and worker that is given the variable uses it."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        base = Path(configured).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "ensemble-scoring"
    return base.absolute() / "keras"


def _sha256(path: str) -> str:
    """SHA-256 of a file's bytes, memoised on (path, size, mtime, ctime)."""
    return file_sha256(path)


def export_key(spec: ModelSpec, resolved: ResolvedModel) -> str:
    """The cache entry's name: the file's SHA-256, and when the member names a
    ``custom_objects`` module, a hash of its name and source (changed code, new export)."""
    key = _sha256(resolved.location)
    if resolved.code is not None:
        h = hashlib.sha256(f"{spec.custom_objects}\0".encode())
        h.update(Path(resolved.code).read_bytes())
        key += f"-{h.hexdigest()[:16]}"
    return key


def distrust(folder: Path) -> str | None:
    """Why a cache entry cannot be trusted, or None. An entry is a model this process
    will run: a link (pointing anywhere) or a folder another user owns or others may
    write to could hold any graph of allowed ops, so it is refused, not scored."""
    try:
        st = folder.lstat()
    except OSError:
        return None  # not there: nothing to trust
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid not in (os.geteuid(), 0):
        return f"belongs to another user (uid {st.st_uid})"
    for path in (folder, *folder.rglob("*")):
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            return f"holds a symbolic link ({path.name})"
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"is writable by other users ({path.relative_to(folder.parent)})"
    return None


def _complete(folder: Path, key: str) -> dict[str, Any] | None:
    """The export's description when ``folder`` holds a complete export of ``key``.

    Raises:
        ModelLoadError: the entry exists but cannot be trusted (see ``distrust``).
    """
    why = distrust(folder)
    if why is not None:
        raise ModelLoadError(
            f"the Keras export cache entry {folder} {why}; refusing it, since it would be "
            f"scored as the model. Delete it, or set {CACHE_ENV} to a folder only you "
            "can write")
    try:
        info = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("key") != key:
        return None
    return info if (folder / "saved_model.pb").is_file() else None


def _output_tail(text: str, lines: int = 12) -> str:
    """The last lines of the export process's stderr, without TensorFlow's start-up noise."""
    kept = [line for line in text.splitlines() if line.strip() and not line.startswith(
        ("I0000", "W0000", "WARNING: All log messages", "To enable the following"))]
    return " | ".join(kept[-lines:]) or "(no output)"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_MESSAGE_CHARS = 600


def _clean(message: str) -> str:
    """Keras's message without terminal colour codes, cut to a readable length (the
    whole of it with --debug, in the export's own output)."""
    text = " ".join(_ANSI.sub("", message).split())
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + " ..."


def _failure(spec: ModelSpec, source: str, error: dict[str, Any]) -> ModelLoadError:
    kind, message = error.get("kind"), _clean(str(error.get("message", "")))
    name = spec.name
    if kind == "lambda":
        layers = error.get("layers") or []
        which = (f"its Lambda layer(s) {layers} hold Python code" if layers
                 else "it holds a Python lambda (code)")
        return ModelLoadError(
            f"model {name!r}: refusing {source}: {which}, and Keras's "
            "safe mode, which this loader always uses, forbids deserializing Python lambdas "
            "(loading one would run its code). Rewrite each as a proper layer (a "
            "keras.layers.Layer subclass with get_config, decorated with "
            "@keras.saving.register_keras_serializable) and name its module with "
            "'custom_objects:' in the member's manifest entry, or export the model as a "
            "SavedModel yourself (model.export(path)) and point 'path' at that folder"
        )
    if kind == "custom":
        where = (f"is not in custom_objects module {spec.custom_objects!r}; add it there"
                 if spec.custom_objects else
                 "is not built into Keras; put it in a module and name that module with "
                 "'custom_objects: your.module' in the member's manifest entry (its "
                 "CUSTOM_OBJECTS dict, or its public classes, are given to Keras; importing "
                 "it runs its code)")
        return ModelLoadError(f"model {name!r}: {source} uses a class or function that "
                              f"{where}. Keras said: {message}")
    if kind == "custom_import":
        return ModelLoadError(
            f"model {name!r}: cannot import custom_objects module {spec.custom_objects!r} "
            f"for {source}: {message}. It must import cleanly on every host that scores"
        )
    if kind == "load":
        unsafe = any(w in message.lower() for w in ("unsafe", "safe_mode", "not allowed",
                                                     "disallowed", "outside"))
        why = ("Keras's safe mode refused it as unsafe to load: it would run code or read "
               "files beyond the model. Export it as a SavedModel yourself if you trust it"
               if unsafe else
               "The file may be truncated, weights only (.weights.h5: save the whole model "
               "with model.save), or saved by an incompatible Keras")
        return ModelLoadError(
            f"model {name!r}: Keras cannot load {source} (in safe mode): {message}. {why}"
        )
    if kind == "shape":
        return ModelLoadError(f"model {name!r}: cannot export {source}: {message}")
    return ModelLoadError(
        f"model {name!r}: exporting {source} as a SavedModel failed: {message}"
    )


def _run_export(spec: ModelSpec, source: str, kind: str, key: str, folder: Path,
                shown: str) -> None:
    """Export ``source`` into ``folder`` (existing, empty) in a process of its own;
    messages name the member's file as ``shown``.

    Raises:
        ModelLoadError: the export failed, crashed or timed out.
    """
    request = {"source": source, "kind": kind, "key": key, "out": str(folder),
               "custom_objects": spec.custom_objects,
               "sys_path": [p for p in sys.path if p]}
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "tensorflow"  # the export is a TensorFlow SavedModel
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The export is small work; a GPU there would only be held away from others.
    env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(request)],
            stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=EXPORT_TIMEOUT,
            check=False)
    except subprocess.TimeoutExpired as err:  # subprocess.run has killed it
        raise ModelLoadError(
            f"model {spec.name!r}: exporting {shown} as a SavedModel did not finish in "
            f"{EXPORT_TIMEOUT:.0f} s; its process was stopped"
        ) from err
    except OSError as err:
        raise ModelLoadError(
            f"model {spec.name!r}: cannot start the Keras export process ({err})"
        ) from err
    stderr = _ANSI.sub("", done.stderr.decode("utf-8", "replace"))
    error_file = folder / "error.json"
    if error_file.is_file():
        try:
            error = json.loads(error_file.read_text(encoding="utf-8"))
        except ValueError:
            error = {"kind": "error", "message": _output_tail(stderr)}
        raise _failure(spec, shown, error)
    if done.returncode != 0 or _complete(folder, key) is None:
        how = f"exited with code {done.returncode}"
        if done.returncode < 0:
            try:
                how = f"was killed by {signal.Signals(-done.returncode).name}"
            except ValueError:
                how = f"was killed by signal {-done.returncode}"
        raise ModelLoadError(
            f"model {spec.name!r}: the Keras export of {shown} crashed: its process "
            f"{how} without a result. Its last output: {_output_tail(stderr)}"
        )


def keras_export(spec: ModelSpec, resolved: ResolvedModel) -> tuple[Path, float]:
    """The folder of the member's SavedModel export, exporting it first unless a
    complete export is already cached; and the seconds this call spent exporting (0 when
    the cached one was used).

    Raises:
        ModelLoadError: the export failed, or the cache cannot be written.
    """
    source = resolved.location
    kind = keras_kind(Path(source))
    if kind is None:  # resolve_model checked it; the file changed since
        raise ModelLoadError(f"model {spec.name!r}: {source} is no longer a Keras file")
    key = export_key(spec, resolved)
    parent = cache_root()
    final = parent / key
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:  # one export per key at a time in this process; processes race below
        if _complete(final, key) is not None:
            return final, 0.0
        empty = final.is_dir() and not final.is_symlink() and not any(final.iterdir())
        if os.path.lexists(final) and not empty:  # the rename would fail on it for ever
            raise ModelLoadError(
                f"model {spec.name!r}: the Keras export cache entry {final} is incomplete "
                "or not an export of this file; delete that folder and run again"
            )
        started = time.perf_counter()
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=parent))
        except OSError as err:
            raise ModelLoadError(
                f"model {spec.name!r}: cannot write the Keras export cache {parent} ({err}); "
                f"set {CACHE_ENV} to a writable folder"
            ) from err
        try:
            copy = _snapshot(spec, resolved, kind, key, tmp)
            _run_export(spec, str(copy), kind, key, tmp, shown=source)
            copy.unlink()
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from others
            if _publish(tmp, final, key):
                EXPORTS[key] += 1
        except OSError as err:
            raise ModelLoadError(
                f"model {spec.name!r}: cannot move the export of {source} into the cache at "
                f"{final} ({err})"
            ) from err
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final, time.perf_counter() - started


# A Keras archive's config.json is a model's description, a few MB at most; Keras itself
# reads it whole into memory (twice), so an archive claiming far more is refused unread.
MAX_CONFIG_BYTES = 64 * 2**20


def _snapshot(spec: ModelSpec, resolved: ResolvedModel, kind: str, key: str, folder: Path
              ) -> Path:
    """Copy the member's file into ``folder`` and check the copy is what ``key`` names:
    the export reads the copy, so a file replaced while it runs cannot be cached under the
    key of the content it replaced.

    Raises:
        ModelLoadError: the file changed since its digest was taken, or its archive
            declares an oversized config.
    """
    copy = folder / ("model.keras" if kind == "keras" else "model.h5")
    shutil.copyfile(resolved.location, copy)
    if export_key(spec, replace(resolved, location=str(copy))) != key:
        raise ModelLoadError(
            f"model {spec.name!r}: {resolved.location} changed while it was being read; "
            "run again once it is written")
    if kind == "keras":
        try:
            with zipfile.ZipFile(copy) as archive:
                sizes = {i.filename: i.file_size for i in archive.infolist()}
        except (zipfile.BadZipFile, OSError) as err:
            raise ModelLoadError(f"model {spec.name!r}: {resolved.location} is not a "
                                 f"readable Keras archive ({err})") from err
        big = {n: b for n, b in sizes.items() if n.endswith(".json") and b > MAX_CONFIG_BYTES}
        if big:
            raise ModelLoadError(
                f"model {spec.name!r}: {resolved.location} declares {', '.join(big)} of "
                f"{max(big.values()) / 2**20:,.0f} MB uncompressed, beyond the "
                f"{MAX_CONFIG_BYTES / 2**20:.0f} MB a model's description needs; refusing "
                "to unpack it")
    return copy


def _publish(tmp: Path, final: Path, key: str) -> bool:
    """Rename the complete export ``tmp`` (a temporary folder this process created) to
    ``final``. False when another process renamed its own there first: theirs is kept
    and ``tmp`` deleted.

    Raises:
        OSError: the rename failed for another reason.
    """
    try:
        os.rename(tmp, final)  # atomic; fails on a non-empty folder already there
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY) or _complete(final, key) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


def _pick(spec: ModelSpec, source: str, role: str, wanted: str | None,
          names: list[str]) -> str:
    if wanted is not None:
        if wanted in names:
            return wanted
        raise ModelLoadError(
            f"model {spec.name!r}: Keras model {source} has no {role} {wanted!r}; its "
            f"{role}s are {sorted(names)}. Set '{role}:' to one of them"
        )
    if len(names) == 1:
        return names[0]
    raise ModelLoadError(
        f"model {spec.name!r}: Keras model {source} has {len(names)} {role}s "
        f"{sorted(names)}; choose one with '{role}:' in the manifest"
    )


def _signature(spec: ModelSpec, source: str, info: dict[str, Any]) -> tuple[str, str, str]:
    """(signature, input key, output key) of the export that scores the member: the
    input and output picked by name, in a signature that needs no other input.

    Raises:
        ModelLoadError: an unknown name, a choice left open, or an output that needs
            other inputs than the one fed.
    """
    in_key = _pick(spec, source, "input", spec.input,
                   [str(i["name"]) for i in info.get("inputs", [])])
    out_key = _pick(spec, source, "output", spec.output, [str(o) for o in info.get("outputs", [])])
    signatures: dict[str, dict[str, list[str]]] = info.get("signatures", {})
    for name, sig in sorted(signatures.items(), key=lambda s: s[0] != "serving_default"):
        if sig.get("inputs") == [in_key] and out_key in sig.get("outputs", []):
            return name, in_key, out_key
    raise ModelLoadError(
        f"model {spec.name!r}: output {out_key!r} of Keras model {source} needs other inputs "
        f"than {in_key!r}; a member is fed one feature matrix, so pick an output computed "
        "from that input alone"
    )


def load_keras(spec: ModelSpec, resolved: ResolvedModel, digest: str, *, freeze: bool | None = None
               ) -> GraphScorer:
    """Export the Keras file once (or reuse its cached export) and load the export into
    its own graph and session, as any SavedModel (``freeze`` as there).

    Raises:
        ModelLoadError: the file cannot be loaded in safe mode or exported, an input or
            output name is unknown, or the export's graph is refused.
    """
    from loaders.savedmodel import load_saved_model

    started = time.perf_counter()
    folder, export_seconds = keras_export(spec, resolved)
    source = resolved.location
    signature, in_key, out_key = _signature(
        spec, source, _complete(folder, export_key(spec, resolved)) or {})
    exported = spec.model_copy(update={"format": "saved_model", "input": in_key,
                                       "output": out_key, "signature": signature,
                                       "tags": ("serve",)})
    try:
        scorer = load_saved_model(exported, str(folder), digest, freeze=freeze)
    except ModelLoadError as err:
        raise ModelLoadError(f"{err} (the SavedModel exported from {source}, cached in "
                             f"{folder})") from err
    scorer.source = source
    scorer.export_dir = str(folder)
    scorer.export_seconds = export_seconds
    scorer.load_seconds = time.perf_counter() - started
    return scorer
