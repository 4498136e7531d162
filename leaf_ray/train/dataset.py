"""The training set: rows (text, teacher vector) for the trainers, from the cache or streamed
from the teacher's actors, and the held-out validation texts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import ray.data
import ray.train
import ray.train.torch

from leaf_ray.config import LeafConfig
from leaf_ray.data.selection import Plan, plan_selection, select_rows
from leaf_ray.hashing import hashes_of
from leaf_ray.inputs import Inputs
from leaf_ray.teacher.actors import embed_texts, teacher_calls
from leaf_ray.teacher.cache import vector_matrix
from leaf_ray.teacher.layout import cluster_stage_layout
from leaf_ray.teacher.space import TeacherSpace
from leaf_ray.teacher.stage import TeacherVectors, space_and_texts
from leaf_ray.train.batching import TEXT_BYTES
from leaf_ray.train.resources import trainer_resources


@dataclass(frozen=True)
class TrainingSet:
    """What the student trains on: one epoch's rows (text, teacher vector), their number, the
    held-out validation texts and the projection's fit sample, both with their vectors."""

    rows: ray.data.Dataset
    num_rows: int
    validation: Validation | None
    fit: Validation


def cached_training_set(vectors: TeacherVectors) -> TrainingSet:
    """Rows (text_hash, kind, text, embedding) for one epoch from the teacher cache, each
    distinct text as many times as its source's weight says; the held-out texts and the fit
    sample, the texts with the lowest keys (uniform over every source, and stable across runs),
    read from the row groups that hold them only; all in key order."""
    plan, cache, keys = vectors.plan, vectors.cache, vectors.keys
    lowest = None
    if plan.lowest.texts:
        read = cache.read(keys, plan.lowest.ref, plan.lowest.ranges).to_arrow_refs()
        lowest = pa.concat_tables(ray.get(read))
    validation, fit = _split_lowest(lowest, plan)
    training = cache.read(keys, plan.training.ref, plan.training.ranges)
    rows = held_for_epochs(training, plan.training.rows, vectors.space.dimension)
    return TrainingSet(rows, plan.training.rows, validation, fit)


def streaming_training_set(
    cfg: LeafConfig, inputs: Inputs | None = None
) -> tuple[TeacherSpace, TrainingSet]:
    """Streaming mode: teacher actors embed the texts while the trainers consume them, every
    epoch; nothing is cached. The held-out texts and the fit sample are embedded first, before
    the trainers hold their CPUs; the teacher's actors share what the trainers leave (on GPUs:
    the GPUs they leave, fractions when fewer than actors; none: the CPUs)."""
    space, texts, inputs = space_and_texts(cfg, inputs)
    plan = plan_selection(cfg, inputs.keys, [])
    lowest = None
    if plan.lowest.texts:
        layout = cluster_stage_layout(cfg.teacher, plan.lowest.texts)
        calls = teacher_calls(select_rows(texts, plan.lowest, plan.repeated), layout)
        embedded = embed_texts(calls, cfg.teacher, layout).to_arrow_refs()
        lowest = pa.concat_tables(ray.get(embedded))
    validation, fit = _split_lowest(lowest, plan)
    chosen = select_rows(texts, plan.training, plan.repeated)
    num_rows = plan.training.rows
    layout = cluster_stage_layout(cfg.teacher, num_rows, held_elsewhere=trainer_resources(cfg))
    calls = teacher_calls(chosen, layout).materialize()
    stream = embed_texts(calls, cfg.teacher, layout)
    return space, TrainingSet(stream, num_rows, validation, fit)


def _split_lowest(lowest: pa.Table | None, plan: Plan) -> tuple[Validation | None, Validation]:
    """The held-out texts (the `plan.held` lowest keys) and the fit sample (the rest), each in
    key order, with their vectors."""
    empty = ([], np.empty((0, 0), np.float32))
    if lowest is None or not lowest.num_rows:
        return None, empty
    order = np.argsort(hashes_of(lowest["text_hash"]), kind="stable")
    texts = [lowest["text"][int(i)].as_py() for i in order]
    vectors = vector_matrix(lowest["embedding"]).astype(np.float32)[order]
    held = plan.held
    validation = (texts[:held], vectors[:held]) if held else None
    return validation, (texts[held:], vectors[held:])


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
