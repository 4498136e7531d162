"""The eval cache: each model's query and document vectors per task, keyed by the model's files."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from leaf_ray.eval.tasks import SIDES, EvalTask
from leaf_ray.storage import Location
from leaf_ray.teacher.cache import embedding_column


@dataclass
class Vectors:
    """One side of one task, embedded by one model: ids in mteb's order, one row each."""

    ids: list[str]
    array: np.ndarray


class VectorsFile:
    """One side's vectors, appended as mteb asks for them, to a local Parquet file (id,
    embedding) that goes into the eval cache whole once complete."""

    def __init__(self, path: Path) -> None:
        self.path, self.rows = path, 0
        self._writer: pq.ParquetWriter | None = None

    def append(self, ids: list[str], array: np.ndarray) -> None:
        embedding = embedding_column(array.astype(np.float32))
        table = pa.table({"id": pa.array(ids, pa.string()), "embedding": embedding})
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema)
        self._writer.write_table(table)
        self.rows += len(ids)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class EvalCache:
    """<root>/<task>-<data revision>/<model key>/{query,document}.parquet (id, embedding); the
    root may be a local or NFS path or an object store (`leaf_ray.storage`)."""

    def __init__(self, root: Location) -> None:
        self.root = root

    def file(self, task: EvalTask, model_key: str, side: str) -> Location:
        return self.root / f"{task.name}-{task.revision}" / model_key / f"{side}.parquet"

    def has(self, task: EvalTask, model_key: str) -> bool:
        return all(self.file(task, model_key, side).is_file() for side in SIDES)

    def shape(self, task: EvalTask, model_key: str, side: str) -> tuple[int, int]:
        """Rows and dimension, from the file's footer alone."""
        file = self.file(task, model_key, side)
        meta = pq.read_metadata(file.path, filesystem=file.fs)
        return meta.num_rows, meta.schema.to_arrow_schema().field("embedding").type.list_size

    def load(self, task: EvalTask, model_key: str, side: str) -> Vectors:
        file = self.file(task, model_key, side)
        return _vectors(pq.read_table(file.path, filesystem=file.fs))

    def stream(self, task: EvalTask, model_key: str, side: str) -> Iterator[Vectors]:
        """The side in the order it was written, a Parquet batch at a time."""
        file = self.file(task, model_key, side)
        with file.fs.open_input_file(file.path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=STREAM_ROWS):
                yield _vectors(pa.Table.from_batches([batch]))


def _joined(parts: list[Vectors]) -> Vectors:
    return Vectors(
        [i for part in parts for i in part.ids], np.concatenate([p.array for p in parts])
    )


def _vectors(table: pa.Table) -> Vectors:
    array = table.column("embedding").combine_chunks().flatten().to_numpy()
    return Vectors(table.column("id").to_pylist(), array.reshape(len(table), -1))


# Rows per Parquet batch when documents are streamed; mteb searches its corpus 50,000 at a time.
STREAM_ROWS = 16_384
