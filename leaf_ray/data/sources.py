"""Training texts as a Ray Dataset of (id, text, kind, source), every row checked: JSON lines,
Parquet, Hugging Face datasets."""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from leaf_ray.config import BadRows, DataConfig, SourceConfig
from leaf_ray.hashing import text_hash

KINDS = ("query", "document")


DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")


GZIP_MAGIC = b"\x1f\x8b"


SHOWN = 5  # bad rows named in an error; the rest are counted


MISSING = object()


Problem = tuple[str, str] | None  # (reason, message naming the field), or None for a good row


class DataError(ValueError):
    """Input data that cannot be used; the message names the file (and line where known)."""


def read_texts(cfg: DataConfig) -> ray.data.Dataset:
    """All configured sources, normalised to columns id, text, kind, source (its index); rows
    `row_problem` finds bad are dropped (`check_source` has refused them unless bad_rows: skip)."""
    # Bad rows surface as DataError (naming the file), not as Ray's generic UDF failure.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    datasets = [_read_source(src, i, cfg.bad_rows) for i, src in enumerate(cfg.sources)]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def data_files(path: Path) -> list[Path]:
    """The files every reader of user files here (texts, precomputed vectors, `plan`'s row
    counts) reads: the file, or a folder's Parquet files, or else its JSON lines files, in name
    order. Others in the folder (a README, a hidden file) are left out."""
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.endswith(DATA_SUFFIXES)
    )
    parquet = [p for p in files if _parquet_name(p)]
    if parquet and len(parquet) < len(files):  # one would be read and the other left out
        raise DataError(
            f"{path}: holds both Parquet and JSON lines files ({parquet[0].name}, "
            f"{next(p for p in files if not _parquet_name(p)).name}); give each format its own "
            "source"
        )
    return files


def is_parquet(path: Path) -> bool:
    """A Parquet file, or a folder holding one; else JSON lines."""
    return any(_parquet_name(p) for p in data_files(path))


def _parquet_name(file: Path) -> bool:
    return ".parquet" in "".join(file.suffixes)


def _read_source(src: SourceConfig, index: int, bad_rows: BadRows) -> ray.data.Dataset:
    if src.path is not None:
        label = src.path
        path = Path(src.path)
        if not path.exists():
            raise DataError(f"data.sources: {path}: no such file or folder")
        files = [str(f) for f in data_files(path)]
        if not files:
            raise DataError(f"data.sources: {path}: no {', '.join(DATA_SUFFIXES)} files")
        if is_parquet(path):
            ds = ray.data.read_parquet(files)
        else:  # parsed here, a line at a time: see `parse_lines`
            ds = ray.data.read_binary_files(files, include_paths=True).map_batches(
                _parse_files,
                fn_kwargs={"src": src, "index": index, "bad_rows": bad_rows},
                batch_format="numpy",
            )
            return _first_rows(ds, src.limit) if src.limit else ds
    else:
        label = src.hf_dataset
        ds = _from_hugging_face(_load_hf(src), local=Path(src.hf_dataset).exists())
    _check_fields(label, src, ds.columns() or [])
    ds = ds.map_batches(
        _normalise,
        fn_kwargs={"src": src, "index": index, "label": label, "bad_rows": bad_rows},
        batch_format="pyarrow",
    )
    return _first_rows(ds, src.limit) if src.limit and src.path else ds


@dataclass
class SourceCheck:
    """What `check_source` found in one source: its bad rows, by reason, the first few named."""

    label: str
    rows: int = 0  # good rows read (up to the source's limit)
    bad: Counter = field(default_factory=Counter)  # reason -> rows
    examples: list[str] = field(default_factory=list)  # "file:line: field: reason"

    def add(self, where: str, problem: tuple[str, str]) -> None:
        self.bad[problem[0]] += 1
        if len(self.examples) < SHOWN:
            self.examples.append(f"{where}: {problem[1]}")

    def error(self) -> str:
        """The problems as the user reads them: the first few, the rest counted."""
        total = sum(self.bad.values())
        more = total - len(self.examples)
        lines = [f"{self.label}: {total} bad row(s) (data.bad_rows=skip drops them):"]
        lines += [f"  {line}" for line in self.examples]
        return "\n".join(lines + ([f"  ... and {more} more"] if more > 0 else []))


def check_source(
    src: SourceConfig, index: int, each_row: Callable[[str, str, str], None] | None = None
) -> SourceCheck:
    """Read a local source's rows on the driver before any Ray job, as `read_texts` will, so a
    bad row stops a run in seconds, named by file and line (Parquet and local `datasets`
    folders: row), rather than from inside a Ray task minutes in. `each_row(where, kind, text)`
    sees every good row."""
    check = SourceCheck(f"data.sources.{index} ({src.path or src.hf_dataset})")
    if src.path is None:
        if not Path(src.hf_dataset).exists():  # a hub name: checked as it is read, so that a
            return check  # dry run (offline, or of a corpus of millions) downloads nothing
        rows = _hf_rows(src)
    else:
        path = Path(src.path)
        if not path.exists():
            raise DataError(f"data.sources.{index}: {path}: no such file or folder")
        files = data_files(path)
        if not files:
            raise DataError(f"data.sources.{index}: {path}: no {', '.join(DATA_SUFFIXES)} files")
        rows = _parquet_rows(files, src) if is_parquet(path) else _jsonl_rows(files, src)
    for where, row, problem in rows:
        if problem is None:
            if each_row is not None:
                each_row(where, src.kind or row[src.kind_field], row[src.text_field])
            check.rows += 1
            if src.limit and check.rows >= src.limit:
                break
        else:
            check.add(where, problem)
    return check


def _jsonl_rows(files: list[Path], src: SourceConfig) -> Iterator[tuple[str, dict, Problem]]:
    for file in files:
        data = file.read_bytes()
        if file.name.endswith(".gz") and data[:2] != GZIP_MAGIC:  # Ray decompresses by name
            raise DataError(f"{file}: named .gz but not gzip-compressed; rename or compress it")
        try:
            data = _decompressed(data)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(
                f"{file}: cannot be decompressed, truncated or not gzip ({e})"
            ) from None
        for lineno, row, problem in parse_lines(data, src):
            yield f"{file}:{lineno}", row, problem


def _parquet_rows(files: list[Path], src: SourceConfig) -> Iterator[tuple[str, dict, Problem]]:
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{file}: not a readable Parquet file ({e})") from None
        present = set(parquet.schema_arrow.names)
        needed = [src.text_field] + ([] if src.kind else [src.kind_field])
        absent = [c for c in needed if c not in present]
        if absent:
            raise DataError(f"{file}: no column(s) {absent} (columns: {sorted(present)})")
        row = 0
        for batch in parquet.iter_batches(columns=needed):
            for values in batch.to_pylist():
                row += 1
                yield f"{file}: row {row}", values, row_problem(values, src)


def _first_rows(ds: ray.data.Dataset, limit: int) -> ray.data.Dataset:
    """The first `limit` rows in file order, read once. Ray's `limit` over several files keeps
    whichever rows arrive first, so passes over the texts (planning, then embedding) and reruns
    would disagree. The ordered read is kept apart: the stages downstream run unordered."""
    ds.context.execution_options.preserve_order = True
    return ray.data.from_arrow_refs(ds.limit(limit).to_arrow_refs())


def _load_hf(src: SourceConfig):
    """The hub (or local) dataset's split, its first `limit` rows: loaded on the driver, where
    `datasets` caches it, so checking it first and reading it after load it once."""
    import datasets  # only needed for hub datasets

    hf = datasets.load_dataset(src.hf_dataset, src.hf_config, split=src.split)
    if src.limit:  # the split's first rows; before Ray, which might hold all of it
        hf = hf.select(range(min(src.limit, len(hf))))
    return hf


def _hf_rows(src: SourceConfig) -> Iterator[tuple[str, dict, Problem]]:
    hf = _load_hf(src)
    label = f"{src.hf_dataset} ({src.split})"
    _check_fields(label, src, hf.column_names)
    read = [*_required_fields(src), src.id_field]
    for i, row in enumerate(hf.select_columns([c for c in read if c in hf.column_names])):
        yield f"{label} row {i}", row, row_problem(row, src)


def _required_fields(src: SourceConfig) -> tuple[str, ...]:
    return (src.text_field,) + (() if src.kind else (src.kind_field,))


def _check_fields(label: str, src: SourceConfig, columns: list[str]) -> None:
    """A table source (Parquet, a dataset) must have the text field, and the kind field unless
    the source fixes its kind."""
    for name in _required_fields(src):
        if name not in columns:
            raise DataError(f"{label}: no field {name!r} (fields: {sorted(columns)})")


def _from_hugging_face(hf, local: bool) -> ray.data.Dataset:
    """Ray's `from_huggingface` first asks the Hub for Parquet files, which raises offline (an
    uncaught ConnectionError): local folders and offline runs take Ray's own in-memory fallback."""
    from huggingface_hub import constants

    if local or constants.HF_HUB_OFFLINE:
        return ray.data.from_arrow(hf.with_format("arrow")[:])
    return ray.data.from_huggingface(hf)


def _normalise(
    table: pa.Table, src: SourceConfig, index: int, label: str, bad_rows: BadRows
) -> dict:
    """Columns id, text, kind, source from a Parquet or hub table; bad rows refused or dropped."""
    rows = table.to_pylist()
    kept = []
    for row in rows:
        problem = row_problem(row, src)
        if problem is None:
            kept.append(_normalised_row(row, src))
        elif bad_rows == "error":
            raise DataError(f"{label}: {problem[1]}")
    return _columns(kept, index)


def _parse_files(
    batch: dict[str, np.ndarray], src: SourceConfig, index: int, bad_rows: BadRows
) -> dict:
    """JSON lines files' good rows, normalised; bad ones refused or dropped."""
    rows = []
    for data, path in zip(batch["bytes"], batch["path"], strict=True):
        for lineno, row, problem in parse_lines(_decompressed(data), src):
            if problem is None:
                rows.append(_normalised_row(row, src))
            elif bad_rows == "error":
                raise DataError(f"{path}:{lineno}: {problem[1]}")
    return _columns(rows, index)


def _decompressed(data: bytes) -> bytes:
    """Ray decompresses by file name; a .gz it left alone is opened here."""
    return gzip.decompress(data) if data[:2] == GZIP_MAGIC else data


def parse_lines(data: bytes, src: SourceConfig) -> Iterator[tuple[int, dict | None, Problem]]:
    """(line number, row, problem) for each non-blank line of a JSON lines file.

    Hand-written rather than Ray's `read_json` (pyarrow's reader): that one stops a whole file
    at its first bad line and cannot say which line it was, nor skip it."""
    for lineno, line in enumerate(data.split(b"\n"), 1):
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
    if not text.strip():
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
    """Where each text with one of `hashes` (its cache key) first appears in the sources: file and
    line, or a dataset's row. Reads the sources again, so only for a few texts, once."""
    wanted, found = set(hashes), {}

    def note(where: str, kind: str, text: str) -> None:
        key = text_hash(kind, text).hex()
        if key in wanted and key not in found:
            found[key] = where

    for index, src in enumerate(cfg.sources):
        check_source(src, index, note)
        if len(found) == len(wanted):
            break
    return [found[key] for key in hashes if key in found]
