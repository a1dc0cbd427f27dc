"""Inspect a graph's ops before anything runs, and refuse the ones that reach outside.

A checkpoint or SavedModel is code: its graph can read and write files (``ReadFile``,
``WriteFile``), list them, run Python (``PyFunc``) or write summaries. Scoring needs
none of that, so those ops are refused unless the manifest allows them by name
(``allow_ops``). The one exception is the saver's own subgraph, which restores the
variables: its ``RestoreV2``/``SaveV2`` family is expected and allowed there only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from loaders.errors import ModelLoadError

__all__ = ["DENIED_OPS", "check_meta_graph", "denied"]

DENIED_OPS = frozenset({
    # files
    "ReadFile", "WriteFile", "MatchingFiles", "ImmutableConst", "InitializeTableFromTextFile",
    "InitializeTableFromTextFileV2", "LoadAndRemapMatrix", "GenerateVocabRemapping",
    "DatasetToTFRecord", "ExperimentalDatasetToTFRecord", "SaveDataset", "SaveDatasetV2",
    "LoadDataset", "SnapshotDataset", "SnapshotDatasetV2", "TFRecordDataset",
    "TFRecordDatasetV2", "TextLineDataset", "FixedLengthRecordDataset",
    "FixedLengthRecordDatasetV2", "CSVDataset", "CSVDatasetV2", "SqlDataset",
    "ExperimentalCSVDataset", "ExperimentalSqlDataset", "DebugIdentity", "DebugIdentityV2",
    "DebugIdentityV3", "DebugNanCount", "DebugNumericSummary", "DebugNumericSummaryV2",
    # checkpoint I/O outside the saver's own subgraph
    "Save", "SaveV2", "SaveSlices", "Restore", "RestoreV2", "RestoreSlice",
    "MergeV2Checkpoints", "ShardedFilename", "ShardedFilespec",
    # arbitrary code
    "PyFunc", "PyFuncStateless", "EagerPyFunc",
    # network
    "Rpc", "TryRpc", "RpcCall", "RpcClient", "RpcServer", "RpcServerStart",
    "RpcServerRegister", "RpcCheckStatus", "RpcGetValue", "CollectiveReduce",
    "CollectiveGather", "CollectiveBcastSend", "CollectiveBcastRecv",
})
# Families matched by name: readers, summary writers, audio/image/text file writers.
_DENIED_PATTERN = re.compile(r"(Reader|Writer|Summary|FileSystem|WholeFile)")
# Graphs built with several tf.compat.v1.train.Saver objects keep each one's subgraph under
# save/, save_1/, ...; only the last is in saver_def. Their checkpoint ops are tolerated.
_SAVER_SCOPE = re.compile(r"^save(_\d+)?/")
_SAVER_OPS = frozenset({
    "Save", "SaveV2", "SaveSlices", "Restore", "RestoreV2", "RestoreSlice",
    "MergeV2Checkpoints", "ShardedFilename", "ShardedFilespec",
})


def denied(op: str) -> bool:
    return op in DENIED_OPS or bool(_DENIED_PATTERN.search(op))


def _called_functions(node: Any) -> Iterator[str]:
    for value in node.attr.values():
        if value.HasField("func"):
            yield value.func.name
        for f in value.list.func:
            yield f.name


def _saver_scope(meta: Any) -> tuple[set[str], set[str]]:
    """Node names and function names belonging to the saver's save/restore subgraph."""
    nodes = {n.name: n for n in meta.graph_def.node}
    roots = [
        name.split(":")[0]
        for name in (meta.saver_def.restore_op_name, meta.saver_def.save_tensor_name)
        if name
    ]
    in_scope: set[str] = set()
    stack = [r for r in roots if r in nodes]
    while stack:
        name = stack.pop()
        if name in in_scope:
            continue
        in_scope.add(name)
        for inp in nodes[name].input:
            src = inp.lstrip("^").split(":")[0]
            if src in nodes:
                stack.append(src)
    library = {f.signature.name: f for f in meta.graph_def.library.function}
    funcs: set[str] = set()
    fstack = [f for n in in_scope for f in _called_functions(nodes[n])]
    while fstack:
        fname = fstack.pop()
        if fname in funcs or fname not in library:
            continue
        funcs.add(fname)
        for node in library[fname].node_def:
            fstack.extend(_called_functions(node))
    return in_scope, funcs


def _all_nodes(meta: Any) -> Iterable[tuple[str | None, Any]]:
    for node in meta.graph_def.node:
        yield None, node
    for fn in meta.graph_def.library.function:
        for node in fn.node_def:
            yield fn.signature.name, node


def check_meta_graph(meta: Any, *, model: str, source: str, allow: Iterable[str] = ()) -> None:
    """Refuse a MetaGraphDef carrying file, code or network ops outside the saver.

    Raises:
        ModelLoadError: naming the op type and the node (and function) that carries it.
    """
    allowed = set(allow)
    saver_nodes, saver_funcs = _saver_scope(meta)
    for func, node in _all_nodes(meta):
        op = node.op
        if not denied(op) or op in allowed:
            continue
        in_saver = (func in saver_funcs) if func is not None else (
            node.name in saver_nodes or bool(_SAVER_SCOPE.match(node.name)))
        if in_saver and op in _SAVER_OPS:
            continue
        where = f"node {node.name!r}" + (f" in function {func!r}" if func else "")
        raise ModelLoadError(
            f"model {model!r}: refusing {source}: its graph has a {op} op ({where}), which "
            f"can touch files, the network or run code. If you trust this model, add "
            f"'allow_ops: [{op}]' to its entry in the manifest"
        )
