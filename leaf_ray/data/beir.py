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
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
            if line.strip():
                yield lineno, line.rstrip("\r\n")


def _jsonl(path: Path, required: tuple[str, ...]):
    """Each line's object: `_id` a string (a number is taken as one), `text` and `title` (if
    any) strings."""
    for lineno, line in _lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: a JSON {type(row).__name__}, not an object")
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{path}:{lineno}: missing {missing}")
        if isinstance(row["_id"], int) and not isinstance(row["_id"], bool):
            row["_id"] = str(row["_id"])
        if row.get("title") is None:
            row["title"] = ""
        for key in ("_id", "text", "title"):
            if not isinstance(row[key], str):
                shown = "null" if row[key] is None else f"a {type(row[key]).__name__}"
                raise DataError(f"{path}:{lineno}: {key}: {shown}, not a string")
        yield row
