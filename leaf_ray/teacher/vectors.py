"""A black-box teacher that is a file of precomputed vectors: reading, checking and serving them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json
import pyarrow.parquet as pq

from leaf_ray.config import TeacherConfig
from leaf_ray.data.sources import DataError, data_files, is_parquet
from leaf_ray.hashing import text_hash


class VectorsTeacher:
    """Precomputed vectors, matched to texts by the hash of (kind, text)."""

    def __init__(self, cfg: TeacherConfig):
        self.path = cfg.vectors
        table = read_vectors_file(cfg.vectors)
        hashes = [
            text_hash(k, t)
            for k, t in zip(table["kind"].to_pylist(), table["text"].to_pylist(), strict=True)
        ]
        self.row = {h: i for i, h in enumerate(hashes)}
        self.vectors = vector_rows(table, cfg.vectors)

    def embed(self, texts: list[str], kind: str) -> np.ndarray:
        rows = [self.row.get(text_hash(kind, t)) for t in texts]
        missing = [t for t, r in zip(texts, rows, strict=True) if r is None]
        if missing:
            raise DataError(
                f"teacher.vectors: {self.path}: no vector for {len(missing)} {kind} text(s), "
                f"e.g. {missing[0][:80]!r}"
            )
        return self.vectors[rows]


def read_vectors_file(path: str) -> pa.Table:
    """Parquet or JSON lines with `kind`, `text` and `embedding` (other columns are ignored)."""
    file = Path(path)
    if not file.exists():
        raise DataError(f"teacher.vectors: {path}: no such file or folder")
    try:
        if is_parquet(file):
            table = pq.read_table([str(f) for f in data_files(file)])
        else:
            table = pa.concat_tables(
                [_read_json_lines(f) for f in data_files(file)], promote_options="default"
            )
    except DataError:
        raise
    except (pa.ArrowInvalid, OSError, ValueError) as e:  # ValueError: a folder with no files
        raise DataError(f"teacher.vectors: {path}: cannot read: {e}") from None
    absent = {"kind", "text", "embedding"} - set(table.column_names)
    if absent:
        raise DataError(f"teacher.vectors: {path}: missing column(s) {sorted(absent)}")
    for name in ("kind", "text") if table.num_rows else ():  # none: `vector_rows` says so
        column = table[name]
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DataError(f"teacher.vectors: {path}: {name}: a {column.type}, not a string")
        if column.null_count:
            row = int(column.is_null().to_numpy(zero_copy_only=False).argmax())
            raise DataError(f"teacher.vectors: {path}: row {row + 1}: {name}: null")
    return table


def _read_json_lines(file: Path) -> pa.Table:
    """pyarrow's reader (fast); where it fails, the first line Python's parser refuses is named:
    pyarrow names neither the line nor, often, the real problem."""
    try:
        return pyarrow.json.read_json(file)
    except pa.ArrowInvalid:
        _refuse_first_bad_line(file)
        raise


def _refuse_first_bad_line(file: Path) -> None:
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rb") as f:
        for lineno, line in enumerate(f, 1):
            where = f"teacher.vectors: {file}:{lineno}"
            try:
                row = json.loads(line.strip()) if line.strip() else {}
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise DataError(f"{where}: invalid JSON: {e}") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: a JSON {type(row).__name__}, not an object")
            for name in ("kind", "text"):
                if not isinstance(row.get(name, ""), str):
                    raise DataError(f"{where}: {name}: a {type(row[name]).__name__}, not a string")


def vector_rows(table: pa.Table, path: str) -> np.ndarray:
    """The `embedding` column as a float32 matrix, refused with the first bad row named: no
    rows, a missing vector, a vector of another length than the first's, or a value that is
    not finite (a NaN would train the student to NaN)."""
    where = f"teacher.vectors: {path}"
    if table.num_rows == 0:
        raise DataError(f"{where}: no rows")
    column = table["embedding"].combine_chunks()
    kind = column.type
    numbers = pa.types.is_integer, pa.types.is_floating
    lists = pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list
    if not any(is_list(kind) for is_list in lists) or not any(
        is_number(kind.value_type) for is_number in numbers
    ):
        raise DataError(f"{where}: embedding: a {kind}, not a list of numbers")
    if column.null_count:
        row = column.is_null().to_numpy(zero_copy_only=False).argmax()
        raise DataError(f"{where}: row {row + 1}: embedding: missing")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if lengths[0] == 0:
        raise DataError(f"{where}: row 1: embedding: empty")
    odd = np.flatnonzero(lengths != lengths[0])
    if odd.size:
        raise DataError(
            f"{where}: row {odd[0] + 1}: embedding: {lengths[odd[0]]} values where row 1 has "
            f"{lengths[0]}" + _more(odd.size)
        )
    with np.errstate(over="ignore"):  # beyond float32: infinite, refused just below
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32)
    vectors = values.reshape(len(lengths), int(lengths[0]))
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise DataError(
            f"{where}: row {bad[0] + 1}: embedding: not finite (NaN or infinity)" + _more(bad.size)
        )
    return vectors


def _more(rows: int) -> str:
    return f" (and {rows - 1} more rows)" if rows > 1 else ""


def vectors_normalized(vectors: np.ndarray, path: str, declared: bool | None) -> bool:
    """Whether precomputed vectors are unit length: measured on every row, and refused when only
    some are (one stray row would otherwise decide whether the student normalises) or when
    `teacher.normalized: true` says they are and they are not."""
    unit = np.isclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-2)
    if unit.any() and not unit.all():
        row = int(np.flatnonzero(~unit)[0])
        raise DataError(
            f"teacher.vectors: {path}: row {row + 1}: embedding: norm "
            f"{np.linalg.norm(vectors[row]):.3f} where {unit.sum()} of {len(unit)} rows are unit "
            "length; fix the row, or normalise them all"
        )
    if declared and not unit.all():
        raise DataError(
            f"teacher.vectors: {path}: teacher.normalized is true, but the vectors are not unit "
            f"length (row 1: norm {np.linalg.norm(vectors[0]):.3f})"
        )
    return bool(unit.all()) if declared is None else declared
