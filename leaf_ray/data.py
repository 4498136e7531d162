"""Training texts as a Ray Dataset of (id, text, kind), and BEIR-layout retrieval sets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.data

from leaf_ray.cache import first_of_each
from leaf_ray.config import DataConfig, SourceConfig

KINDS = ("query", "document")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file (and line where known)."""


def read_texts(cfg: DataConfig) -> ray.data.Dataset:
    """All configured sources, normalised to columns id, text, kind."""
    # Bad rows surface as DataError (naming the file), not as Ray's generic UDF failure.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    datasets = [_read_source(src, index) for index, src in enumerate(cfg.sources)]
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
    return parquet or files


def is_parquet(path: Path) -> bool:
    """A Parquet file, or a folder holding one; else JSON lines."""
    return any(_parquet_name(p) for p in data_files(path))


def _parquet_name(file: Path) -> bool:
    return ".parquet" in "".join(file.suffixes)


def _read_source(src: SourceConfig, index: int) -> ray.data.Dataset:
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
        else:
            ds = ray.data.read_json(files, lines=True)
        if src.limit:
            ds = _first_rows(ds, src.limit)
    else:
        import datasets  # only needed for hub datasets

        label = src.hf_dataset
        hf = datasets.load_dataset(src.hf_dataset, src.hf_config, split=src.split)
        if src.limit:  # the split's first rows; before Ray, which might hold all of it
            hf = hf.select(range(min(src.limit, len(hf))))
        ds = _from_hugging_face(hf, local=Path(src.hf_dataset).exists())
    columns = set(ds.columns() or [])
    for field in (src.text_field,) + (() if src.kind else (src.kind_field,)):
        if field not in columns:
            raise DataError(f"{label}: no field {field!r} (fields: {sorted(columns)})")
    return ds.map_batches(
        _normalise,
        fn_kwargs={"src": src, "index": index, "label": label, "has_id": src.id_field in columns},
        batch_format="numpy",
    )


def _first_rows(ds: ray.data.Dataset, limit: int) -> ray.data.Dataset:
    """The first `limit` rows in file order, read once. Ray's `limit` over several files keeps
    whichever rows arrive first, so passes over the texts (planning, then embedding) and reruns
    would disagree. The ordered read is kept apart: the stages downstream run unordered."""
    ds.context.execution_options.preserve_order = True
    return ray.data.from_arrow_refs(ds.limit(limit).to_arrow_refs())


def _from_hugging_face(hf, local: bool) -> ray.data.Dataset:
    """Ray's `from_huggingface` first asks the Hub for Parquet files, which raises offline (an
    uncaught ConnectionError): local folders and offline runs take Ray's own in-memory fallback."""
    from huggingface_hub import constants

    if local or constants.HF_HUB_OFFLINE:
        return ray.data.from_arrow(hf.with_format("arrow")[:])
    return ray.data.from_huggingface(hf)


def _normalise(
    batch: dict[str, np.ndarray], src: SourceConfig, index: int, label: str, has_id: bool
) -> dict:
    texts = batch[src.text_field].astype(str)
    kinds = np.full(len(texts), src.kind) if src.kind else batch[src.kind_field].astype(str)
    bad = {str(k) for k in np.unique(kinds)} - set(KINDS)
    if bad:
        raise DataError(f"{label}: field {src.kind_field!r} has {sorted(bad)}; expected {KINDS}")
    if has_id:
        ids = batch[src.id_field].astype(str)
    else:  # No ids in the source: a content hash is stable across runs and shards.
        ids = np.array([hashlib.sha1(t.encode()).hexdigest()[:16] for t in texts])
    return {"id": ids, "text": texts, "kind": kinds, "source": np.full(len(texts), index)}


def mixture_counts(
    hashes: np.ndarray, sources: np.ndarray, weights: list[float], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Times each distinct text is trained on per epoch, from its source's weight (a text in
    several sources takes the first listed one's). A fractional part picks exactly that fraction
    of the source's texts for one more pass, seeded, from the texts in hash order: the rows'
    order (which Ray Data does not fix) leaves the choice alone, so every worker and rerun sees
    the same set. Returns the distinct hashes, sorted, and their counts."""
    by_hash = np.lexsort((sources, hashes.astype(str)))  # each text's lowest source first
    hashes, sources = hashes[by_hash], sources[by_hash]
    first = first_of_each(hashes)
    distinct, source = hashes[first], sources[first]
    counts = np.floor(np.asarray(weights)[source]).astype(np.int64)
    rng = np.random.default_rng(seed)
    for index, weight in enumerate(weights):
        members = np.flatnonzero(source == index)
        extra = round((weight % 1) * members.size)
        counts[rng.choice(members, size=extra, replace=False)] += 1
    return distinct, counts


@dataclass(frozen=True)
class RetrievalSet:
    name: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def load_beir(folder: str | Path, split: str = "test") -> RetrievalSet:
    """corpus.jsonl (`_id`, `title`, `text`), queries.jsonl, qrels/<split>.tsv with a header."""
    folder = Path(folder)
    corpus = {
        row["_id"]: (f"{row['title']}. {row['text']}" if row.get("title") else row["text"])
        for row in _jsonl(folder / "corpus.jsonl", ("_id", "text"))
    }
    queries = {row["_id"]: row["text"] for row in _jsonl(folder / "queries.jsonl", ("_id", "text"))}
    qrels: dict[str, dict[str, int]] = {}
    qrels_file = folder / "qrels" / f"{split}.tsv"
    for lineno, line in _lines(qrels_file, skip_header=True):
        parts = line.split("\t")
        if len(parts) != 3 or not parts[2].strip().lstrip("-").isdigit():
            raise DataError(f"{qrels_file}:{lineno}: expected query-id<TAB>corpus-id<TAB>score")
        qid, did, score = parts[0], parts[1], int(parts[2])
        if qid not in queries or did not in corpus:
            raise DataError(f"{qrels_file}:{lineno}: unknown query or corpus id {qid!r}/{did!r}")
        qrels.setdefault(qid, {})[did] = score
    queries = {qid: text for qid, text in queries.items() if qid in qrels}
    return RetrievalSet(folder.name, corpus, queries, qrels)


def _lines(path: Path, skip_header: bool = False):
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if (skip_header and lineno == 1) or not line.strip():
                continue
            yield lineno, line.rstrip("\n")


def _jsonl(path: Path, required: tuple[str, ...]):
    for lineno, line in _lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{path}:{lineno}: missing {missing}")
        yield row
