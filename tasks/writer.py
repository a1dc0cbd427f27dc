"""One partition's output: its slice of the ensemble table, its quarantine file, the
provenance in the table's footer, and the commit that publishes them.

Both files are written under staging names through the output store and published whole
only by :meth:`PartitionWriter.commit`; leaving the ``with`` block without committing
(an error, Ctrl-C) discards them and leaves whatever was committed before as it was
(``tasks.storage``). The footer records what produced the file (``tasks.reuse`` reads it
back on the next run).
"""

from __future__ import annotations

import contextlib
import json
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.features import all_finite
from tasks.storage import Store

__all__ = ["METADATA_KEY", "PartitionWriter", "committed_metadata", "table_schema"]

METADATA_KEY = b"ensemble_scoring"


def table_schema(id_field: pa.Field, names: list[str]) -> pa.Schema:
    """The ensemble table's columns: the id, one score per member, the ensemble's."""
    return pa.schema(
        [id_field]
        + [pa.field(f"score_{n}", pa.float32()) for n in names]
        + [pa.field("ensemble_score", pa.float32()), pa.field("ensemble_std", pa.float32()),
           pa.field("n_members", pa.int32())]
    )


def committed_metadata(store: Store, rel: str) -> dict[str, Any] | None:
    """The provenance in a committed ensemble file's footer; None if there is no file or
    it cannot be read."""
    meta = store.footer_metadata(rel)
    try:
        return json.loads(meta[METADATA_KEY]) if meta else None  # type: ignore[no-any-return]
    except (KeyError, ValueError):
        return None


class PartitionWriter:
    """Use as a context manager; ``write`` batches, ``set_aside`` bad rows, ``commit``."""

    def __init__(self, store: Store, table: str, quarantine: str, id_field: pa.Field,
                 names: list[str]) -> None:
        self.store, self.table, self.quarantine = store, table, quarantine
        self.schema = table_schema(id_field, names)
        self.qschema = pa.schema([id_field, pa.field("reason", pa.string())])
        # Ids other than numbers are dictionary-encoded (they repeat prefixes and often
        # whole values); scores never are.
        self._dictionary: list[str] | bool = (
            False if pa.types.is_integer(id_field.type) or pa.types.is_floating(id_field.type)
            else [id_field.name])
        self._stack = contextlib.ExitStack()
        self._writer: pq.ParquetWriter | None = None
        self._qwriter: pq.ParquetWriter | None = None
        self.set_aside_rows = 0

    def __enter__(self) -> PartitionWriter:
        sink = self._stack.enter_context(self.store.staged(self.table))
        self._writer = pq.ParquetWriter(sink, self.schema, use_dictionary=self._dictionary)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for writer in (self._writer, self._qwriter):
            if writer is not None and writer.is_open:
                with contextlib.suppress(Exception):
                    writer.close()
        self._stack.__exit__(kind, exc, tb)

    def write(self, ids: pa.Array, scores: np.ndarray, ensemble: np.ndarray,
              std: np.ndarray, count: np.ndarray) -> None:
        """One batch of the table: ``scores`` is (members, rows); a non-finite member
        score (a member missing for the row, see ``min_members``) is written as null."""
        assert self._writer is not None, "use PartitionWriter as a context manager"
        columns = ([pa.array(row) for row in scores] if all_finite(scores)
                   else [pa.array(row, mask=~np.isfinite(row)) for row in scores])
        self._writer.write_batch(pa.record_batch(
            [ids, *columns, pa.array(ensemble), pa.array(std), pa.array(count)],
            schema=self.schema))

    def set_aside(self, ids: pa.Array, reasons: list[str]) -> None:
        """Rows left out of the table, with why (the quarantine file is made on first use)."""
        if self._qwriter is None:
            sink = self._stack.enter_context(self.store.staged(self.quarantine))
            self._qwriter = pq.ParquetWriter(sink, self.qschema)
        self._qwriter.write_batch(pa.record_batch(
            [ids, pa.array(reasons, pa.string())], schema=self.qschema))
        self.set_aside_rows += len(reasons)

    def commit(self, provenance: dict[str, Any]) -> None:
        """Write ``provenance`` into the table's footer and publish both files; a
        quarantine file from an earlier run of this partition that no longer holds is
        deleted."""
        assert self._writer is not None, "use PartitionWriter as a context manager"
        self._writer.add_key_value_metadata({METADATA_KEY: json.dumps(provenance)})
        self._writer.close()
        if self._qwriter is not None:
            self._qwriter.close()
        else:
            self.store.delete(self.quarantine)
        self._stack.close()  # publishes: the staged blocks end without an error
