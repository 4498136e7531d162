"""Every input a run names, checked on the driver before any Ray job starts.

A bad row or a missing folder found here stops the run in seconds with the file and line; found
inside a Ray task it would cost Ray's start-up and the teacher's hashing first, and an eval folder
without qrels would be found only after training.

    skipped = check_inputs(cfg)  # raises DataError; else the rows bad_rows=skip drops, by reason
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from leaf_ray.config import LeafConfig, ModelRef, TeacherConfig
from leaf_ray.data.beir import load_beir
from leaf_ray.data.sources import DataError, check_source
from leaf_ray.hashing import text_hash
from leaf_ray.models import bundled_copy, resolve_model
from leaf_ray.teacher.vectors import read_vectors_file, vector_rows, vectors_normalized


def check_inputs(cfg: LeafConfig) -> Counter:
    """Sources (every row up to each source's limit), precomputed vectors, local model folders
    and eval folders. Returns the bad rows `data.bad_rows: skip` drops, by reason."""
    skipped: Counter = Counter()
    uncovered = Uncovered(_vector_keys(cfg.teacher) if cfg.teacher.backend == "vectors" else None)
    for index, src in enumerate(cfg.data.sources):
        check = check_source(src, index, uncovered.see if uncovered.keys is not None else None)
        if check.bad and cfg.data.bad_rows == "error":
            raise DataError(check.error())
        if src.path is not None and not check.rows:
            raise DataError(f"{check.label}: no usable texts")
        skipped += check.bad
    if uncovered.rows:
        raise DataError(
            f"teacher.vectors: {cfg.teacher.vectors}: no vector for {uncovered.rows} text(s) of "
            f"the sources (first: {uncovered.first}); a vector's row must have the same text "
            "and kind"
        )
    if cfg.teacher.backend == "sentence_transformers":  # the others' model only names it
        check_model("teacher.model", cfg.teacher)
    if cfg.student.model:
        check_model("student.model", ModelRef(model=cfg.student.model))
    for index, folder in enumerate(cfg.eval.datasets):
        beir = load_beir(folder)  # raises on missing files and ids that do not resolve
        if not beir.queries:
            raise DataError(f"eval.datasets.{index}: {folder}: no query has a qrels line")
    return skipped


def _vector_keys(cfg: TeacherConfig) -> set[str]:
    """The (kind, text) hashes of precomputed vectors, once their rows pass their checks."""
    table = read_vectors_file(cfg.vectors)
    vectors_normalized(vector_rows(table, cfg.vectors), cfg.vectors, cfg.normalized)
    kinds, texts = table["kind"].to_pylist(), table["text"].to_pylist()
    return {text_hash(k, t) for k, t in zip(kinds, texts, strict=True)}


@dataclass
class Uncovered:
    """Source rows whose text has no precomputed vector: counted, the first one named."""

    keys: set[str] | None
    rows: int = 0
    first: str = ""

    def see(self, where: str, kind: str, text: str) -> None:
        if text_hash(kind, text) not in self.keys:
            self.rows += 1
            self.first = self.first or where


def check_model(key: str, ref: ModelRef) -> None:
    """A model on disk (a folder, or a hub name's copy installed from PyPI) must be a model
    folder and match its sha256 pin. A hub name (`org/name`) cannot be checked offline:
    sentence-transformers resolves it when the stage loads it."""
    path = Path(ref.model).expanduser()
    looks_local = ref.model.startswith(("/", ".", "~")) or ref.model.count("/") > 1
    if looks_local and not path.is_dir():
        raise DataError(f"{key}: {ref.model}: no such folder")
    if not path.is_dir() and not bundled_copy(ref.model):
        return
    folder = Path(resolve_model(ref))  # checks the pin
    if not any((folder / name).is_file() for name in MODEL_FILES):
        raise DataError(f"{key}: {ref.model}: not a model folder (no {' or '.join(MODEL_FILES)})")


# What a sentence-transformers folder, or a bare transformers one, holds.
MODEL_FILES = ("modules.json", "config.json")
