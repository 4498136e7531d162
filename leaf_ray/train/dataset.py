"""The training set: rows (text, teacher vector) for the trainers, from the cache or streamed
from the teacher's actors, and the held-out validation texts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch

from leaf_ray.config import LeafConfig
from leaf_ray.data.selection import (
    chosen_rows,
    first_ids,
    row_keys,
    shared_rows,
    training_selection,
)
from leaf_ray.teacher.actors import embed_texts, teacher_calls
from leaf_ray.teacher.layout import cluster_stage_layout
from leaf_ray.teacher.space import TeacherSpace
from leaf_ray.teacher.stage import TeacherVectors, space_and_texts
from leaf_ray.train.batching import TEXT_BYTES
from leaf_ray.train.resources import trainer_resources


def validation_set(rows: ray.data.Dataset) -> Validation:
    """The held-out texts and their teacher vectors, gathered on the driver (a few hundred)."""
    rows = rows.take_all()
    texts = [r["text"] for r in rows]
    return texts, np.stack([r["embedding"] for r in rows]).astype(np.float32)


def cached_training_set(
    vectors: TeacherVectors, cfg: LeafConfig
) -> tuple[ray.data.Dataset, int, Validation | None]:
    """Rows (text_hash, kind, text, embedding) for one epoch from the teacher cache, each distinct
    text as many times as its source's weight says, and their number; and the held-out
    validation texts with their vectors: the first hashes in sorted order (uniform, and stable
    across runs), at most a tenth of the texts."""
    held, wanted, counts = training_selection(cfg, vectors.hashes, vectors.sources)
    cache = vectors.cache
    copies = cache.later_copies()  # one scan of the cache's hashes for both reads
    validation = validation_set(cache.read(held, copies=copies)) if held.size else None
    rows, num_rows = cache.read(wanted, counts, copies), int(counts.sum())
    return held_for_epochs(rows, num_rows, vectors.space.dimension), num_rows, validation


def streaming_training_set(
    cfg: LeafConfig, skipped: Counter | None = None
) -> tuple[TeacherSpace, ray.data.Dataset, int, Validation | None]:
    """Streaming mode: teacher actors embed the texts while the trainers consume them, every
    epoch; nothing is cached. The texts (not vectors) are gathered first, so reading and hashing
    are done before the trainers hold their CPUs; the teacher's actors share what the trainers
    leave (on GPUs: the GPUs they leave, fractions when fewer than actors; none: the CPUs)."""
    space, texts, _ = space_and_texts(cfg, skipped)
    ids, hashes, sources = row_keys(texts)
    held, wanted, counts = training_selection(cfg, hashes, sources)
    id_of, shared = first_ids(ids, hashes), shared_rows(ids, hashes)
    validation = None
    if held.size:
        plan = {h: (id_of[h], 1) for h in held.tolist()}
        layout = cluster_stage_layout(cfg.teacher, held.size)
        calls = teacher_calls(chosen_rows(texts, plan, shared), layout)
        validation = validation_set(embed_texts(calls, cfg.teacher, layout))
    plan = {h: (id_of[h], c) for h, c in zip(wanted.tolist(), counts.tolist(), strict=True) if c}
    num_rows = int(counts.sum())
    chosen = chosen_rows(texts, plan, shared)
    layout = cluster_stage_layout(cfg.teacher, num_rows, held_elsewhere=trainer_resources(cfg))
    calls = teacher_calls(chosen, layout).materialize()
    stream = embed_texts(calls, cfg.teacher, layout)
    return space, stream, num_rows, validation


Validation = tuple[list[str], np.ndarray]  # held-out texts and their teacher vectors


def ordered_ingest() -> ray.data.ExecutionOptions:
    """Ray Train's ingest options, with blocks kept in order: each worker's shard then comes in
    the same order every pass (the split deals blocks to the worker with fewest rows), so a
    resumed epoch skips exactly the batches already trained on."""
    # DataConfig.default_ingest_options() with order kept, built here: Ray's own passes the
    # deprecated exclude_resources, which warns in every run.
    current = ray.data.DataContext.get_current().execution_options
    return ray.data.ExecutionOptions(
        resource_limits=current.resource_limits,
        preserve_order=True,
        verbose_progress=current.verbose_progress,
    )


def held_for_epochs(rows: ray.data.Dataset, num_rows: int, dim: int) -> ray.data.Dataset:
    """Cached vectors read once into Ray's object store when they fit in a quarter of it, in
    the cache's order, so that a rerun of the command sees the same blocks.

    Ray Data runs a dataset's plan again every epoch: re-reading the cache's Parquet shards
    delayed each epoch's first batch by 4.5-7 s on the 2-core test machine, against 0.6 s from
    the object store. Larger sets stream from the cache every epoch.
    """
    size = num_rows * (dim * 4 + TEXT_BYTES)
    if size > ray.cluster_resources().get("object_store_memory", 0) / 4:
        return rows
    rows.context.execution_options.preserve_order = True
    return rows.materialize()
