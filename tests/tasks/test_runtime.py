"""The process's runtime set-up: one malloc arena, unless the user chose."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

# Four threads allocate and free memory across each other, as decoding and scoring do;
# glibc's malloc_stats() then lists every arena ("Arena N:") on stderr.
_PROBE = """
import ctypes, sys, threading
from tasks.runtime import limit_malloc_arenas
import os
limited = limit_malloc_arenas() if sys.argv[1] == "limit" else None
assert limited is not True or os.environ["MALLOC_ARENA_MAX"] == "1"  # for its children
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = []
def work():
    for _ in range(50):
        blocks.append(libc.malloc(1 << 20))
threads = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
for b in blocks:
    libc.free(b)
print(limited, flush=True)
libc.malloc_stats()
"""


def _arenas(mode: str, **env: str) -> tuple[str, int]:
    """What ``limit_malloc_arenas`` returned, and how many arenas the threads used."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    base["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    run = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         env={**base, **env}, check=True)
    return run.stdout.strip(), run.stderr.count("Arena ")


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc only")
def test_one_malloc_arena_unless_the_user_chose() -> None:
    # The threads of a default process spread over several arenas ...
    assert _arenas("none")[1] > 1
    # ... limited, they share one,
    assert _arenas("limit") == ("True", 1)
    # and a user's own choice is left as it is.
    limited, arenas = _arenas("limit", MALLOC_ARENA_MAX="3")
    assert limited == "False" and arenas > 1
    assert _arenas("limit", GLIBC_TUNABLES="glibc.malloc.arena_max=2")[0] == "False"


# The CLI's first step, then a Parquet file read as scoring reads it (through the
# filesystem layer, whose reads take Arrow's C++ default pool, not pyarrow's).
_POOL_PROBE = """
import sys
from flows.score import main
try:
    main(["--help"])
except SystemExit:
    pass
import numpy as np
import pyarrow as pa
import pyarrow.fs as fs
import pyarrow.parquet as pq
path = sys.argv[1]
pq.write_table(pa.table({f"f{i}": np.ones(200_000, np.float32) for i in range(8)}), path)
with fs.LocalFileSystem().open_input_file(path) as f:
    for _ in pq.ParquetFile(f).iter_batches(use_threads=False):
        pass
print(pa.default_memory_pool().backend_name, pa.mimalloc_memory_pool().max_memory())
"""


def _pool_after_reading(tmp_path: Path, **env: str) -> tuple[str, int]:
    """Arrow's default pool in a CLI process, and mimalloc's peak after a Parquet read."""
    base = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    base["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    run = subprocess.run([sys.executable, "-c", _POOL_PROBE, str(tmp_path / "t.parquet")],
                         capture_output=True, text=True, env={**base, **env}, check=True)
    name, peak = run.stdout.split()[-2:]
    return name, int(peak)


def test_arrow_reads_take_the_system_pool_unless_the_user_chose(tmp_path: Path) -> None:
    try:
        import pyarrow as pa

        pa.mimalloc_memory_pool()
    except NotImplementedError:
        pytest.skip("this pyarrow has no mimalloc")
    # The file's reads, which pyarrow.set_memory_pool does not reach, stay out of mimalloc,
    assert _pool_after_reading(tmp_path) == ("system", 0)
    # and a user's own choice is left as it is.
    name, peak = _pool_after_reading(tmp_path, ARROW_DEFAULT_MEMORY_POOL="mimalloc")
    assert name == "mimalloc" and peak > 0
