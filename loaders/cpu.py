"""Which CPU path TensorFlow takes on this machine, found out rather than assumed.

TensorFlow 2.21 turns its oneDNN graph rewrites on by default only on CPUs with AVX-512
or AMX, and ``TF_ENABLE_ONEDNN_OPTS=0/1`` overrides that on any x86-64 CPU. The two paths
run different kernels: with oneDNN, ``MatMul + AddV2 [+ Relu]`` is fused by TensorFlow
itself (``_MklNativeFusedMatMul``); without it, the add and the activation stay separate
ops unless the graph uses ``BiasAdd`` (see ``loaders.rewrite``). Rather than mirror
TensorFlow's rule (which may change with its next release), a tiny graph is run once per
process and the kernels TensorFlow actually placed are read back from its partition
graphs, a public ``RunOptions`` feature. The result decides which load-time rewrites pay,
and is stated in the run record and the benchmark, with the CPU model and its flags.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import numpy as np
from pydantic import BaseModel

__all__ = ["CpuPath", "cpu_flags", "cpu_path"]

# CPU flags that decide TensorFlow's default path (and bf16/AMX kernels), as named in
# /proc/cpuinfo.
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


class CpuPath(BaseModel):
    """The machine and the kernels TensorFlow chose on it (small: goes into run records)."""

    cpu: str
    cores: int
    flags: dict[str, bool]
    onednn_env: str | None  # TF_ENABLE_ONEDNN_OPTS as set, None when unset
    onednn: bool  # oneDNN's graph rewrites are on (an _Mkl kernel ran in the probe)
    fuses_matmul_add: bool  # TensorFlow fuses MatMul + AddV2 + Relu by itself

    @property
    def label(self) -> str:
        """One line for logs and reports."""
        flags = ", ".join(f for f, on in self.flags.items() if on) or "no AVX2"
        env = "unset" if self.onednn_env is None else self.onednn_env
        return (f"{self.cpu} ({flags}); oneDNN {'on' if self.onednn else 'off'} "
                f"(TF_ENABLE_ONEDNN_OPTS {env})")


def cpu_flags() -> tuple[str, dict[str, bool]]:
    """The CPU model and the flags in ``_FLAGS``, from /proc/cpuinfo (Linux); elsewhere
    the platform's processor name and no flags."""
    model, flags = platform.processor() or platform.machine(), set[str]()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return model, {f: f in flags for f in _FLAGS}


def _probe() -> set[str]:
    """Op types of the kernels TensorFlow placed for ``relu(x @ w + b)``."""
    from loaders._tf import tf

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4])
        w = tf.compat.v1.placeholder_with_default(np.ones((4, 3), np.float32), [4, 3])
        b = tf.compat.v1.placeholder_with_default(np.ones(3, np.float32), [3])
        y = tf.nn.relu(tf.matmul(x, w) + b)
    options = tf.compat.v1.RunOptions(output_partition_graphs=True)
    metadata = tf.compat.v1.RunMetadata()
    with tf.compat.v1.Session(graph=graph) as session:
        session.run(y, {x: np.ones((2, 4), np.float32)}, options=options,
                    run_metadata=metadata)
    return {node.op for part in metadata.partition_graphs for node in part.node}


@functools.cache
def cpu_path() -> CpuPath:
    """This process's CPU path (probed once; TensorFlow fixes it at import)."""
    model, flags = cpu_flags()
    ops = _probe()
    return CpuPath(
        cpu=model,
        cores=os.cpu_count() or 1,
        flags=flags,
        onednn_env=os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        onednn=any(op.startswith("_Mkl") for op in ops),
        fuses_matmul_add=not ({"AddV2", "Add", "Relu"} & ops),
    )


if __name__ == "__main__":  # `python -m loaders.cpu [--other]`, used by `make test-other-path`
    import sys

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # only the answer on stdout
    probed = cpu_path()
    if sys.argv[1:] == ["--other"]:
        print("0" if probed.onednn else "1")  # the TF_ENABLE_ONEDNN_OPTS this path is not
    else:
        print(probed.model_dump_json(indent=2))
