"""Training texts: JSON lines, Parquet, Hugging Face datasets, every row checked.

Files are read in pieces, each by its own Ray task wherever it runs: a plain JSON lines file in
byte ranges of `PIECE_BYTES` (a line belongs to the piece it starts in), a compressed one whole,
streamed, a Parquet file by row group. `scan_piece` checks a piece's rows and leaves their keys in
the object store (`leaf_ray.inputs` merges the pieces' reports into the user's error lines);
`read_texts` reads the rows as a Ray Dataset of (id, text, kind, source, text_hash), keeping
each piece's first rows up to its source's `limit`. No process holds a whole file."""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from leaf_ray.config import DataConfig, SourceConfig
from leaf_ray.hashing import HASH_DTYPE, hashes_to_arrow, text_hash, text_hashes
from leaf_ray.storage import Location

KINDS = ("query", "document")


DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")


GZIP_MAGIC = b"\x1f\x8b"


SHOWN = 5  # bad rows named in an error; the rest are counted


# A plain JSON lines file is read in byte ranges of this size, by as many tasks.
PIECE_BYTES = 64 << 20


MISSING = object()


Problem = tuple[str, str] | None  # (reason, message naming the field), or None for a good row


class DataError(ValueError):
    """Input data that cannot be used; the message names the file (and line where known)."""


@dataclass(frozen=True)
class Piece:
    """A part of a source that one task reads: a byte range of a plain JSON lines file, a whole
    compressed one, a Parquet row group, or a Hugging Face dataset's split (streamed)."""

    source: int  # its index in data.sources
    file: Location | None  # a local or NFS path, or an object store's (any node reads it)
    parquet: bool
    start: int  # JSON lines: the byte its lines start from; Parquet: the row group
    end: int  # JSON lines: the byte the next piece starts at (-1: the end); Parquet: the
    # group's first row in the file
    hub: str = ""  # a Hugging Face dataset's "name (split)"; then `file` is None

    def where(self, line_or_row: int, lines_before: int = 0) -> str:
        """A row's place as messages name it: file:line, file: row (both from 1), or a
        dataset's row (from 0, as `datasets` numbers them)."""
        if self.hub:
            return f"{self.hub} row {line_or_row - 1}"
        if self.parquet:
            return f"{self.file}: row {self.end + line_or_row}"
        return f"{self.file}:{lines_before + line_or_row}"


def source_pieces(cfg: DataConfig, hub: bool = False) -> list[Piece]:
    """Every source's pieces, in source and file order, then (with `hub`) the Hugging Face hub's
    datasets, which a dry run does not download; a source that is not there, holds no data file,
    or a file that cannot be what its name says, refused here (a few bytes and the Parquet
    footers are read)."""
    pieces, remote = [], []
    for index, src in enumerate(cfg.sources):
        if src.hf_dataset is not None:
            piece = Piece(index, None, False, 0, -1, f"{src.hf_dataset} ({src.split})")
            (pieces if Path(src.hf_dataset).exists() else remote).append(piece)
            continue
        path = Location.of(src.path)
        if not path.exists():
            raise DataError(f"data.sources.{index}: {path}: no such file or folder")
        files = data_files(path)
        if not files:
            raise DataError(f"data.sources.{index}: {path}: no {', '.join(DATA_SUFFIXES)} files")
        parquet = is_parquet(path)
        for file in files:
            pieces += _parquet_pieces(index, file, src) if parquet else _json_pieces(index, file)
    return pieces + (remote if hub else [])


def _json_pieces(index: int, file: Location) -> list[Piece]:
    with file.fs.open_input_file(file.path) as f:
        compressed, size = f.read(2) == GZIP_MAGIC, f.size()
    if file.name.endswith(".gz") and not compressed:  # a .gz is decompressed by its name
        raise DataError(f"{file}: named .gz but not gzip-compressed; rename or compress it")
    if compressed or size <= PIECE_BYTES:
        return [Piece(index, file, False, 0, -1)]
    starts = range(0, size, PIECE_BYTES)
    return [Piece(index, file, False, s, min(s + PIECE_BYTES, size)) for s in starts]


def _parquet_pieces(index: int, file: Location, src: SourceConfig) -> list[Piece]:
    try:
        parquet = pq.ParquetFile(file.fs.open_input_file(file.path))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{file}: not a readable Parquet file ({e})") from None
    present = set(parquet.schema_arrow.names)
    absent = [c for c in _required_fields(src) if c not in present]
    if absent:
        raise DataError(f"{file}: no column(s) {absent} (columns: {sorted(present)})")
    pieces, first = [], 1
    for group in range(parquet.metadata.num_row_groups):
        pieces.append(Piece(index, file, True, group, first - 1))
        first += parquet.metadata.row_group(group).num_rows
    return pieces


def read_texts(cfg: DataConfig, kept: dict[int, int] | None = None) -> ray.data.Dataset:
    """All configured sources as rows (id, text, kind, source, text_hash); rows `row_problem`
    finds bad are dropped (the input check has refused them unless bad_rows: skip). `kept`:
    the good rows each file piece keeps (its source's `limit`), as the input check found them;
    None: every row."""
    # Bad rows surface as DataError (naming the file), not as Ray's generic UDF failure.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    pieces = source_pieces(cfg, hub=True)
    items = [
        {"piece": i, "keep": -1 if kept is None else kept.get(i, 0)} for i in range(len(pieces))
    ]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_pieces, fn_args=(pieces, cfg), batch_size=1, batch_format="pyarrow"
    )


def _read_pieces(batch: pa.Table, pieces: list[Piece], cfg: DataConfig) -> Iterator[pa.Table]:
    """A Ray Data batch naming one piece: its good rows (the first `keep`, unless -1)."""
    item = batch.to_pylist()[0]
    piece, keep = pieces[item["piece"]], item["keep"]
    src = cfg.sources[piece.source]
    rows: list[tuple[str, str, str]] = []
    kept = 0
    for at, row, problem in piece_rows(piece, src):
        if keep >= 0 and kept >= keep:
            break
        if problem is None:
            rows.append(_normalised_row(row, src))
            kept += 1
        elif cfg.bad_rows == "error":  # the input check refuses these before any read
            where = piece.where(at) if piece.start == 0 else f"{piece.file} (byte {piece.start}+)"
            raise DataError(f"{where}: {problem[1]}")
        if len(rows) >= CHUNK_ROWS:
            yield _with_hashes(_columns(rows, piece.source))
            rows = []
    if rows:
        yield _with_hashes(_columns(rows, piece.source))


CHUNK_ROWS = 8192  # rows a reading task hands on at a time


def _with_hashes(columns: dict[str, np.ndarray]) -> pa.Table:
    table = pa.table(columns)
    hashes = text_hashes(columns["kind"], columns["text"])
    return table.append_column("text_hash", hashes_to_arrow(hashes))


def piece_rows(
    piece: Piece, src: SourceConfig, lines: Counter | None = None
) -> Iterator[tuple[int, dict | None, Problem]]:
    """(line or row in the piece, from 1; row; problem) for each of the piece's rows. `lines`:
    counts a byte range's lines, blank ones too, under its file's name (for the pieces after;
    a compressed file is one piece)."""
    if piece.hub:
        yield from _hub_rows(src)
        return
    if piece.parquet:
        parquet = pq.ParquetFile(piece.file.fs.open_input_file(piece.file.path))
        columns = [
            c for c in (*_required_fields(src), src.id_field) if c in parquet.schema_arrow.names
        ]
        row = 0
        for batch in parquet.iter_batches(CHUNK_ROWS, row_groups=[piece.start], columns=columns):
            for values in batch.to_pylist():
                row += 1
                yield row, values, row_problem(values, src)
        return
    read = _piece_lines(piece)
    if lines is not None and isinstance(read, list):  # a range: pieces after it count on it
        lines[piece.file.path] += len(read)
    yield from parse_lines(read, src)


def _hub_rows(src: SourceConfig) -> Iterator[tuple[int, dict, Problem]]:
    """A Hugging Face dataset's rows, streamed: only as many as are read (a `limit` stops the
    reader, not a download of the whole split) and only the fields a text needs."""
    import datasets  # only needed for these sources

    hf = datasets.load_dataset(src.hf_dataset, src.hf_config, split=src.split, streaming=True)
    fields = [*_required_fields(src), src.id_field]
    for at, row in enumerate(hf, 1):
        if at == 1:
            _check_fields(f"{src.hf_dataset} ({src.split})", src, list(row))
        kept = {name: row[name] for name in fields if name in row}
        yield at, kept, row_problem(kept, src)


def _piece_lines(piece: Piece) -> list[bytes] | Iterator[bytes]:
    """The lines that start inside the piece's byte range, read whole (at most `PIECE_BYTES`
    and the end of its last line); a compressed file's lines, streamed."""
    file = piece.file
    with file.fs.open_input_file(file.path) as f:
        if piece.end < 0 and f.read(2) == GZIP_MAGIC:
            return _gzip_lines(file)
        begin = max(piece.start - 1, 0)
        f.seek(begin)
        data = f.read((f.size() if piece.end < 0 else piece.end) - begin)
        while piece.end >= 0 and data and not data.endswith(b"\n"):  # its last line runs on
            more = f.read(1 << 16)
            cut = more.find(b"\n")
            data += more if cut < 0 else more[: cut + 1]
            if not more or cut >= 0:
                break
    if piece.start:  # the rest of a line the piece before holds
        data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
    return data.splitlines(keepends=True)


def _gzip_lines(file: Location) -> Iterator[bytes]:
    with file.fs.open_input_file(file.path) as f:
        try:
            yield from gzip.GzipFile(fileobj=f)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(
                f"{file}: cannot be decompressed, truncated or not gzip ({e})"
            ) from None


@dataclass
class PieceScan:
    """What `scan_piece` found in one piece: its rows, its bad ones (each with the good rows
    before it, for its source's `limit`), the first few named, and the lines it spans."""

    piece: int
    good: int = 0
    lines: int = 0
    reasons: list[str] = field(default_factory=list)  # of each bad row
    good_before: list[int] = field(default_factory=list)  # of each bad row
    examples: list[tuple[int, int, str]] = field(default_factory=list)  # (good_before, at, why)


def scan_piece(
    index: int, piece: Piece, src: SourceConfig
) -> tuple[PieceScan, tuple[np.ndarray, np.ndarray]]:
    """One piece's check (a Ray task): its report, and its good rows' keys in row order with
    their source, left in the object store for the plan. No piece gives more than its source's
    `limit`: the scan stops there."""
    scan, lines = PieceScan(index), Counter()
    hashes = []
    for at, row, problem in piece_rows(piece, src, lines):
        if src.limit and scan.good >= src.limit:
            break
        if problem is None:
            hashes.append(text_hash(src.kind or row[src.kind_field], row[src.text_field]))
            scan.good += 1
            continue
        scan.reasons.append(problem[0])
        scan.good_before.append(scan.good)
        if len(scan.examples) < SHOWN:
            scan.examples.append((scan.good, at, problem[1]))
    scan.lines = lines[piece.file.path] if piece.file else 0
    keys = np.frombuffer(b"".join(hashes), dtype=HASH_DTYPE)
    return scan, (keys, np.full(keys.size, piece.source, np.int16))


def data_files(path: Location) -> list[Location]:
    """The files every reader of user files here (texts, precomputed vectors, `plan`'s row
    counts) reads: the file, or a folder's Parquet files, or else its JSON lines files, in name
    order. Others in the folder (a README, a hidden file) are left out."""
    if path.is_file():
        return [path]
    files = [f for f in path.files() if f.name.endswith(DATA_SUFFIXES)]
    parquet = [f for f in files if _parquet_name(f.name)]
    if parquet and len(parquet) < len(files):  # one would be read and the other left out
        raise DataError(
            f"{path}: holds both Parquet and JSON lines files ({parquet[0].name}, "
            f"{next(f for f in files if not _parquet_name(f.name)).name}); give each format its "
            "own source"
        )
    return files


def is_parquet(path: Location) -> bool:
    """A Parquet file, or a folder holding one; else JSON lines."""
    return any(_parquet_name(f.name) for f in data_files(path))


def _parquet_name(name: str) -> bool:
    return ".parquet" in name


def _required_fields(src: SourceConfig) -> tuple[str, ...]:
    return (src.text_field,) + (() if src.kind else (src.kind_field,))


def _check_fields(label: str, src: SourceConfig, columns: list[str]) -> None:
    """A table source (Parquet, a dataset) must have the text field, and the kind field unless
    the source fixes its kind."""
    for name in _required_fields(src):
        if name not in columns:
            raise DataError(f"{label}: no field {name!r} (fields: {sorted(columns)})")


def stream_lines(stream: pa.NativeFile) -> Iterator[bytes]:
    """A stream's lines, read a MiB at a time (pyarrow's streams have no `readline`)."""
    rest = b""
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        *lines, rest = (rest + chunk).split(b"\n")
        yield from lines
    if rest:
        yield rest


def parse_lines(
    lines: Iterable[bytes], src: SourceConfig
) -> Iterator[tuple[int, dict | None, Problem]]:
    """(line number, row, problem) for each non-blank line of JSON lines.

    Hand-written rather than Ray's `read_json` (pyarrow's reader): that one stops a whole file
    at its first bad line and cannot say which line it was, nor skip it."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield lineno, None, ("invalid UTF-8", f"invalid UTF-8 at byte {e.start}")
            continue
        except json.JSONDecodeError as e:
            yield lineno, None, ("invalid JSON", f"invalid JSON: {e.msg} (column {e.colno})")
            continue
        yield lineno, row, row_problem(row, src)


def row_problem(row: object, src: SourceConfig) -> Problem:
    """Why a row cannot be trained on, as (reason, message naming the field), or None."""
    if not isinstance(row, dict):
        return "not an object", f"a JSON {type(row).__name__}, not an object"
    field = src.text_field
    text = row.get(field, MISSING)
    if text is MISSING or text is None:
        reason = "missing" if text is MISSING else "null"
        return f"{field} {reason}", f"{field}: {reason}"
    if not isinstance(text, str):
        return f"{field} not a string", f"{field}: a {type(text).__name__}, not a string"
    if not text or text.isspace():  # not `strip()`: no copy of every text
        return f"{field} empty", f"{field}: empty"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. JSON's "\ud800"
            return f"{field} not Unicode", f"{field}: a lone surrogate at character {e.start}"
    if src.kind is None:
        kind = row.get(src.kind_field, MISSING)
        if kind not in KINDS:
            shown = "missing" if kind is MISSING else f"{kind!r} is not one of {', '.join(KINDS)}"
            return f"{src.kind_field} unknown", f"{src.kind_field}: {shown}"
    return None


def _normalised_row(row: dict, src: SourceConfig) -> tuple[str, str, str]:
    text = row[src.text_field]
    given = row.get(src.id_field)
    # No id in the source: a content hash is stable across runs and shards.
    row_id = str(given) if given is not None else hashlib.sha1(text.encode()).hexdigest()[:16]
    return row_id, text, src.kind or row[src.kind_field]


def _columns(rows: list[tuple[str, str, str]], index: int) -> dict[str, np.ndarray]:
    ids, texts, kinds = ([row[i] for row in rows] for i in range(3))
    return {
        "id": np.array(ids, dtype=object),
        "text": np.array(texts, dtype=object),
        "kind": np.array(kinds, dtype=object),
        "source": np.full(len(rows), index),
    }


def locate_texts(cfg: DataConfig, hashes: list[str]) -> list[str]:
    """Where each text with one of `hashes` (its key, in hex) first appears in the sources: file
    and line, or a Parquet file's or dataset's row. Reads the sources again, a row at a time, so
    only for a few texts, once (a run that diverged, vectors that miss a text)."""
    wanted, found = set(hashes), {}

    def note(where: str, kind: str, text: str) -> None:
        key = text_hash(kind, text).hex()
        if key in wanted and key not in found:
            found[key] = where

    lines: Counter = Counter()  # of each file, in the pieces read so far
    for piece in source_pieces(cfg, hub=True):
        src = cfg.sources[piece.source]
        before = lines[piece.file.path] if piece.file else 0
        for at, row, problem in piece_rows(piece, src, lines):
            if problem is None:
                kind = src.kind or row[src.kind_field]
                note(piece.where(at, before), kind, row[src.text_field])
        if len(found) == len(wanted):
            break
    return [found[key] for key in hashes if key in found]
