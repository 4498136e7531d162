"""Retrieval sets in BEIR layout (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from leaf_ray.data.sources import DataError


@dataclass(frozen=True)
class RetrievalSet:
    name: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def load_beir(folder: str | Path, split: str = "test") -> RetrievalSet:
    """corpus.jsonl (`_id`, `title`, `text`), queries.jsonl, qrels/<split>.tsv (its header
    line, if any, recognised as not a judgment)."""
    folder = Path(folder)
    corpus = {
        row["_id"]: (f"{row['title']}. {row['text']}" if row.get("title") else row["text"])
        for row in _jsonl(folder / "corpus.jsonl", ("_id", "text"))
    }
    queries = {row["_id"]: row["text"] for row in _jsonl(folder / "queries.jsonl", ("_id", "text"))}
    qrels: dict[str, dict[str, int]] = {}
    qrels_file = folder / "qrels" / f"{split}.tsv"
    for lineno, line in _lines(qrels_file):
        parts = line.split("\t")
        judgment = len(parts) == 3 and parts[2].strip().lstrip("-").isdigit()
        if lineno == 1 and not judgment:  # BEIR's header (query-id, corpus-id, score)
            continue
        if not judgment:
            raise DataError(f"{qrels_file}:{lineno}: expected query-id<TAB>corpus-id<TAB>score")
        qid, did, score = parts[0], parts[1], int(parts[2])
        if qid not in queries or did not in corpus:
            raise DataError(f"{qrels_file}:{lineno}: unknown query or corpus id {qid!r}/{did!r}")
        qrels.setdefault(qid, {})[did] = score
    queries = {qid: text for qid, text in queries.items() if qid in qrels}
    return RetrievalSet(folder.name, corpus, queries, qrels)


def _lines(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
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
