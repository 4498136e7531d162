"""The teacher stage (`leaf-ray embed`): each distinct text the cache lacks, embedded once."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import ray
import ray.data

from leaf_ray.cluster import connect_ray
from leaf_ray.config import LeafConfig
from leaf_ray.data.selection import (
    chosen_rows,
    first_rows_missing,
    row_keys,
    shared_rows,
)
from leaf_ray.data.sources import read_texts
from leaf_ray.inputs import check_inputs
from leaf_ray.run import RunError
from leaf_ray.teacher.actors import embed_texts, teacher_calls
from leaf_ray.teacher.cache import TeacherCache, VerifyReport, add_text_hash, verify
from leaf_ray.teacher.layout import cluster_stage_layout
from leaf_ray.teacher.space import TeacherSpace, teacher_space

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherVectors:
    """The teacher's vectors for one config's texts, as committed in the cache."""

    cache: TeacherCache
    space: TeacherSpace
    hashes: np.ndarray  # one per input row (duplicates included)
    sources: np.ndarray  # each row's index in data.sources
    embedded: int  # texts this call embedded; 0 when the cache had them all
    skipped: dict[str, int]  # bad rows dropped (data.bad_rows: skip), by reason

    @property
    def unique(self) -> int:
        return int(np.unique(self.hashes).size)


def embed(cfg: LeafConfig, skipped: Counter | None = None) -> TeacherVectors:
    """The teacher stage (`leaf-ray embed`): embed each distinct text the cache lacks, once.
    `skipped`: the bad rows `check_inputs` found, when the caller has checked the inputs.

    Rerunning after a crash or kill embeds only what is still missing; with the same teacher
    settings and texts, a second run embeds nothing.
    """
    space, cache, texts, skipped = _cache_and_texts(cfg, skipped)
    for shard in cache.set_aside_bad_shards():  # their texts are embedded again below
        logger.warning("teacher cache: set aside %s", shard)
    ids, hashes, sources = row_keys(texts)
    todo = first_rows_missing(ids, hashes, cache.hashes())
    if todo:
        chosen = chosen_rows(texts, todo, shared_rows(ids, hashes))
        layout = cluster_stage_layout(cfg.teacher, len(todo))
        sink = cache.sink(cfg.teacher.vector_dtype, layout.rows_per_call)
        calls = teacher_calls(chosen, layout)
        embed_texts(calls, cfg.teacher, layout).write_datasink(sink)
    missing = np.setdiff1d(np.unique(hashes.astype(str)), cache.hashes().astype(str))
    if missing.size:
        raise RunError(f"{cache.root}: {missing.size} texts still have no vector after the stage")
    return TeacherVectors(cache, space, hashes, sources, len(todo), dict(skipped))


def verify_cache(cfg: LeafConfig, repair: bool = False) -> tuple[VerifyReport, list[str]]:
    """`leaf-ray cache verify [--repair]`: the config's cache, and which of its texts have no
    vector; with `repair`, shards that fail their check are set aside first (and listed), for
    the next `embed` to embed their texts again."""
    space, texts, _ = space_and_texts(cfg)
    cache = TeacherCache.open(cfg.cache_dir(), space.key, cfg.teacher.model, create=False)
    moved = cache.set_aside_bad_shards() if repair else []
    return verify(cache, row_keys(texts)[1]), moved


def _cache_and_texts(
    cfg: LeafConfig, skipped: Counter | None = None
) -> tuple[TeacherSpace, TeacherCache, ray.data.Dataset, Counter]:
    """The teacher's space, its cache folder, the config's texts with their row hashes, and the
    bad rows left out."""
    space, texts, skipped = space_and_texts(cfg, skipped)
    cache = TeacherCache.open(cfg.cache_dir(), space.key, cfg.teacher.model)
    return space, cache, texts, skipped


def space_and_texts(
    cfg: LeafConfig, skipped: Counter | None = None
) -> tuple[TeacherSpace, ray.data.Dataset, Counter]:
    """The teacher's space and the config's texts with their row hashes, on the config's Ray,
    once the inputs pass their checks (unless `skipped` says they have); and the bad rows left
    out (data.bad_rows: skip)."""
    skipped = check_inputs(cfg) if skipped is None else skipped
    connect_ray(cfg.ray)
    space = teacher_space(cfg.teacher, on_gpu=ray.cluster_resources().get("GPU", 0) > 0)
    texts = read_texts(cfg.data).map_batches(add_text_hash, batch_format="numpy")
    return space, texts, skipped
