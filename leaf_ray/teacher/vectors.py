"""A black-box teacher that is a file (or folder) of precomputed vectors, Parquet or JSON lines
with `kind`, `text` and `embedding` columns.

Two Ray Data jobs over its pieces (a Parquet row group, or a JSON lines file), read in parallel
wherever the job's tasks run: `check_vectors` checks every row (strings, one dimension, finite,
unit length or not) and brings back only a summary; `ingest_vectors` writes the rows into the
teacher cache, once per version of the file, after which the vectors are read like any cache.
No process holds the whole file.

    checked = check_vectors(cfg.teacher)        # DataError naming the file and row, or
    checked.dimension, checked.normalized       # the teacher's space
    ingest_vectors(cfg.teacher, cache)          # into the cache, unless it holds them already
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json
import pyarrow.parquet as pq
import ray
import ray.data

from leaf_ray.config import TeacherConfig
from leaf_ray.data.sources import DataError, data_files, is_parquet, stream_lines
from leaf_ray.storage import Location
from leaf_ray.teacher.cache import TeacherCache, add_text_hash

# Rows a reading task handles at once, and a cache shard the ingest writes: bounded memory
# whatever the row groups' size.
CHUNK_ROWS = 8192


INGESTED = "ingested.json"  # in a cache folder: the vectors file is in it, whole
CHECKED = "vectors_checked"  # in the teacher caches' folder: a file version's check, passed


COLUMNS = ("kind", "text", "embedding")


@dataclass(frozen=True)
class VectorsCheck:
    """What `check_vectors` found in a vectors file with no bad row."""

    rows: int
    dimension: int
    normalized: bool
    not_unit: str = ""  # the first row that is not unit length, and its norm


@dataclass(frozen=True)
class Piece:
    """A part of a vectors file one task reads: a Parquet row group, or a JSON lines file."""

    file: Location  # a local or NFS path, or an object store's (any node reads it)
    group: int | None  # None: the whole file (JSON lines)
    first_row: int  # of the piece in its file, from 0


def fingerprint(path: str) -> str:
    """Which version of the vectors file this is: each file's name, size and modification
    time, not its bytes, which a run would read whole just to name it."""
    digest = hashlib.sha256()
    for file in data_files(Location.of(path)):
        info = file.fs.get_file_info(file.path)
        digest.update(f"{file.name}\0{info.size}\0{info.mtime_ns}\n".encode())
    return digest.hexdigest()


def pieces(path: str) -> list[Piece]:
    """The file's pieces, from the Parquet footers (read here: a few KB a file)."""
    where = f"teacher.vectors: {path}"
    file = Location.of(path)
    if not file.exists():
        raise DataError(f"{where}: no such file or folder")
    files = data_files(file)
    if not files:
        raise DataError(f"{where}: no Parquet or JSON lines files")
    if not is_parquet(file):
        return [Piece(f, None, 0) for f in files]
    found = []
    for f in files:
        try:
            meta = pq.ParquetFile(f.fs.open_input_file(f.path)).metadata
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"teacher.vectors: {f}: not a readable Parquet file ({e})") from None
        first = 0
        for group in range(meta.num_row_groups):
            found.append(Piece(f, group, first))
            first += meta.row_group(group).num_rows
    return found


def check_vectors(
    cfg: TeacherConfig, memo: Location | None = None, keep: bool = False
) -> VectorsCheck:
    """Every row of the vectors file checked by a Ray Data job; the first bad row named, with
    its file and row (from 1), or the file's dimension and whether its vectors are unit length.
    Once per file version and process (the distill's input check and its teacher stage share
    it), and, given a `memo` folder (the teacher caches'), once per file version: a run reads
    what an earlier one found there, which the teacher stage `keep`s (a dry run writes none)."""
    version = fingerprint(cfg.vectors)
    known = memo / CHECKED / f"{version}.json" if memo else None
    if version not in _CHECKED and known and known.is_file():
        _CHECKED[version] = VectorsCheck(**json.loads(known.read_text()))
    if version not in _CHECKED:
        _CHECKED[version] = _check(cfg.vectors)
    checked = _CHECKED[version]
    if known and keep and not known.is_file():
        known.write(json.dumps(asdict(checked)))
    if cfg.normalized and not checked.normalized:
        raise DataError(
            f"teacher.vectors: {cfg.vectors}: teacher.normalized is true, but the vectors are not "
            f"unit length ({checked.not_unit})"
        )
    if cfg.normalized is None:
        return checked
    return VectorsCheck(checked.rows, checked.dimension, cfg.normalized, checked.not_unit)


# This process's checks, by file version: the distill's input check and its teacher stage share
# one (a vectors file has a version or two in a process: no eviction).
_CHECKED: dict[str, VectorsCheck] = {}


def _check(path: str) -> VectorsCheck:
    """`check_vectors` measured."""
    parts = pieces(path)
    dim = _first_dimension(path, parts)
    summaries = _over_pieces(parts).map_batches(
        _check_piece, fn_args=(parts, dim), batch_size=1, batch_format="pyarrow"
    )
    rows = pa.concat_tables(ray.get(summaries.to_arrow_refs())).to_pylist()
    bad = sorted((r for r in rows if r["problem"]), key=lambda r: (r["file"], r["row"]))
    if bad:
        more = sum(r["bad"] for r in rows) - 1
        first = bad[0]
        extra = f" (and {more} more rows)" if more else ""
        raise DataError(f"teacher.vectors: {first['file']}: {first['problem']}{extra}")
    total, unit = sum(r["rows"] for r in rows), sum(r["unit"] for r in rows)
    if not total:
        raise DataError(f"teacher.vectors: {path}: no rows")
    off = sorted((r for r in rows if r["off_row"] > 0), key=lambda r: (r["file"], r["off_row"]))
    not_unit = ""
    if off:
        where = "" if off[0]["file"] == str(Location.of(path)) else f"{off[0]['file']}: "
        not_unit = f"{where}row {off[0]['off_row']}: norm {off[0]['off_norm']:.3f}"
    if 0 < unit < total:  # one stray row would otherwise decide whether the student normalises
        raise DataError(
            f"teacher.vectors: {path}: {not_unit.replace(': norm', ': embedding: norm')} where "
            f"{unit} of {total} rows are unit length; fix the row, or normalise them all"
        )
    return VectorsCheck(total, dim, unit == total, not_unit)


def ingest_vectors(cfg: TeacherConfig, cache: TeacherCache) -> bool:
    """Write the (checked) vectors file into `cache`, unless an earlier run did; True when it
    wrote them now. A run killed during the ingest writes them again: reads skip the copies."""
    done = cache.root / INGESTED
    if done.is_file():
        return False
    parts = pieces(cfg.vectors)
    rows = _over_pieces(parts).map_batches(
        _read_piece, fn_args=(parts,), batch_size=1, batch_format="pyarrow"
    )
    rows.write_datasink(cache.sink(cfg.vector_dtype, None))  # a shard per chunk read
    done.write(json.dumps({"vectors": cfg.vectors, "version": fingerprint(cfg.vectors)}))
    return True


def _over_pieces(parts: list[Piece]) -> ray.data.Dataset:
    """A dataset of the pieces, a block each, for the jobs to read in parallel."""
    # A bad row surfaces as our DataError (naming the file), not as Ray's generic UDF failure.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    items = [{"piece": i} for i in range(len(parts))]
    return ray.data.from_items(items, override_num_blocks=len(items))


def _first_dimension(path: str, parts: list[Piece]) -> int:
    """The first row's vector length, which every row must have (0 when it has none: the
    check names it)."""
    for part in parts:
        for chunk in _chunks(part):
            if chunk.num_rows:
                _check_type(part.file, chunk["embedding"].type)
                first = chunk["embedding"][0].as_py()
                return len(first) if first is not None else 0
    raise DataError(f"teacher.vectors: {path}: no rows")


def _piece(batch: pa.Table, parts: list[Piece]) -> Piece:
    return parts[batch.to_pylist()[0]["piece"]]


def _chunks(piece: Piece, checking: bool = False) -> Iterator[pa.Table]:
    """The piece's rows, `CHUNK_ROWS` at a time, with the three columns; `checking`, a Parquet
    row group's kind and text only where its statistics do not already say they hold no null
    (the texts are most of what is read besides the vectors)."""
    if piece.group is None:
        table = _read_json_lines(piece.file)
        _check_columns(piece.file, table.column_names)
        for batch in table.select(list(COLUMNS)).to_batches(CHUNK_ROWS):
            yield pa.Table.from_batches([batch])
        return
    parquet = pq.ParquetFile(piece.file.fs.open_input_file(piece.file.path))
    _check_columns(piece.file, parquet.schema_arrow.names)
    columns = [c for c in COLUMNS if not (checking and _no_nulls(parquet, piece.group, c))]
    for batch in parquet.iter_batches(CHUNK_ROWS, row_groups=[piece.group], columns=columns):
        yield pa.Table.from_batches([batch])


def _no_nulls(parquet: pq.ParquetFile, group: int, name: str) -> bool:
    """Whether the row group's statistics say string column `name` holds no null."""
    if name == "embedding" or not _is_string(parquet.schema_arrow.field(name).type):
        return False
    column = parquet.metadata.row_group(group).column(parquet.schema_arrow.names.index(name))
    stats = column.statistics
    return stats is not None and stats.has_null_count and stats.null_count == 0


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _check_columns(file: Location, names: list[str]) -> None:
    absent = sorted(set(COLUMNS) - set(names))
    if absent:
        raise DataError(f"teacher.vectors: {file}: missing column(s) {absent}")


def _check_piece(batch: pa.Table, parts: list[Piece], dim: int) -> pa.Table:
    """A Ray Data batch of one piece: its summary row (rows, unit-length rows, the first bad
    row and why, the first row that is not unit length and its norm)."""
    piece = _piece(batch, parts)
    summary = {"file": str(piece.file), "rows": 0, "unit": 0, "bad": 0, "row": 0, "problem": ""}
    summary |= {"off_row": 0, "off_norm": 0.0}
    start = piece.first_row
    for chunk in _chunks(piece, checking=True):
        problem, bad, unit, off = _check_chunk(piece.file, chunk, dim, start)
        if problem and not summary["problem"]:
            summary["row"], summary["problem"] = problem
        if off and not summary["off_row"]:
            summary["off_row"], summary["off_norm"] = off
        summary["bad"] += bad
        summary["rows"] += chunk.num_rows
        summary["unit"] += unit
        start += chunk.num_rows
    return pa.Table.from_pylist([summary])


def _check_chunk(
    file: Location, chunk: pa.Table, dim: int, start: int
) -> tuple[tuple[int, str] | None, int, int, tuple[int, float] | None]:
    """(the first bad row and why, bad rows, unit-length rows, the first row not of unit length
    with its norm) of `chunk`, whose first row is row `start` (from 0) of `file`. A chunk
    without kind or text has none null (`_chunks`)."""
    strings = [name for name in ("kind", "text") if name in chunk.column_names]
    for name in strings:
        column = chunk[name]
        if not _is_string(column.type) and column.null_count < len(column):  # all null: below
            raise DataError(f"teacher.vectors: {file}: {name}: a {column.type}, not a string")
    column = chunk["embedding"].combine_chunks()
    _check_type(file, column.type)
    bad = np.zeros(chunk.num_rows, dtype=bool)
    why = np.full(chunk.num_rows, "", dtype=object)
    for name in strings:
        null = chunk[name].is_null().to_numpy(zero_copy_only=False)
        why[null & ~bad] = f"{name}: null"
        bad |= null
    missing = column.is_null().to_numpy(zero_copy_only=False)
    why[missing & ~bad] = "embedding: missing"
    bad |= missing
    lengths = pc.fill_null(pc.list_value_length(column), dim).to_numpy(zero_copy_only=False)
    empty, odd = lengths == 0, lengths != dim
    why[empty & ~bad] = "embedding: empty"
    for i in np.flatnonzero(odd & ~empty & ~bad):
        why[i] = f"embedding: {lengths[i]} values where row 1 has {dim}"
    bad |= odd
    vectors = np.zeros((chunk.num_rows, dim), np.float32)
    good = np.flatnonzero(~bad)
    with np.errstate(over="ignore"):  # beyond float32: infinite, refused just below
        if good.size == chunk.num_rows:  # as most chunks are: no copy of the rows first
            values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
            vectors = values.astype(np.float32).reshape(good.size, dim)
        elif good.size:
            values = pc.list_flatten(column.take(good)).to_numpy(zero_copy_only=False)
            vectors[good] = values.astype(np.float32).reshape(good.size, dim)
    finite = np.isfinite(vectors).all(axis=1)
    why[~finite & ~bad] = "embedding: not finite (NaN or infinity)"
    bad |= ~finite
    norms = np.linalg.norm(vectors, axis=1)
    unit = np.isclose(norms, 1.0, atol=1e-2) & ~bad
    problem = None
    if bad.any():
        row = int(np.argmax(bad))
        problem = (start + row + 1, f"row {start + row + 1}: {why[row]}")
    off_rows = np.flatnonzero(~unit & ~bad)
    off = (start + int(off_rows[0]) + 1, float(norms[off_rows[0]])) if off_rows.size else None
    return problem, int(bad.sum()), int(unit.sum()), off


def _check_type(file: Location, kind: pa.DataType) -> None:
    numbers = pa.types.is_integer, pa.types.is_floating
    lists = pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list
    if not any(is_list(kind) for is_list in lists) or not any(
        is_number(kind.value_type) for is_number in numbers
    ):
        raise DataError(f"teacher.vectors: {file}: embedding: a {kind}, not a list of numbers")


def _read_piece(batch: pa.Table, parts: list[Piece]) -> Iterator[pa.Table]:
    """A Ray Data batch of one (checked) piece: its rows with their key, `CHUNK_ROWS` at a
    time, vectors as float32 lists, as the cache's sink takes them."""
    for chunk in _chunks(_piece(batch, parts)):
        vectors = chunk["embedding"].combine_chunks().cast(pa.list_(pa.float32()))
        yield add_text_hash(chunk.set_column(2, "embedding", vectors))


def _read_json_lines(file: Location) -> pa.Table:
    """pyarrow's reader (fast); where it fails, the first line Python's parser refuses is named:
    pyarrow names neither the line nor, often, the real problem."""
    try:
        with file.fs.open_input_stream(file.path, compression="detect") as f:
            return pyarrow.json.read_json(f)
    except pa.ArrowInvalid:
        _refuse_first_bad_line(file)
        raise


def _refuse_first_bad_line(file: Location) -> None:
    with file.fs.open_input_stream(file.path, compression="detect") as f:
        for lineno, line in enumerate(stream_lines(f), 1):
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
