"""The teacher stage (`leaf-ray embed`): each distinct text the cache lacks, embedded once."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray
import ray.data

from leaf_ray.cluster import connect_ray
from leaf_ray.config import LeafConfig
from leaf_ray.data.selection import Plan, plan_selection, select_rows
from leaf_ray.data.sources import DataError, locate_texts, read_texts
from leaf_ray.inputs import Inputs, check_inputs, with_hub_keys
from leaf_ray.run import RunError
from leaf_ray.teacher.actors import embed_texts, teacher_calls
from leaf_ray.teacher.cache import CacheKeys, TeacherCache, VerifyReport, orphans
from leaf_ray.teacher.layout import cluster_stage_layout
from leaf_ray.teacher.space import TeacherSpace, teacher_space
from leaf_ray.teacher.vectors import check_vectors, ingest_vectors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherVectors:
    """The teacher's vectors for one config's texts, as committed in the cache, and the plan
    of what the student trains on."""

    cache: TeacherCache
    space: TeacherSpace
    keys: CacheKeys  # the cache's shards, checked, and their keys in the object store
    plan: Plan
    embedded: int  # texts this call embedded; 0 when the cache had them all
    skipped: dict[str, int]  # bad rows dropped (data.bad_rows: skip), by reason


def embed(cfg: LeafConfig, inputs: Inputs | None = None) -> TeacherVectors:
    """The teacher stage (`leaf-ray embed`): embed each distinct text the cache lacks, once.
    `inputs`: what `check_inputs` found, when the caller has checked them.

    Rerunning after a crash or kill embeds only what is still missing; with the same teacher
    settings and texts, a second run embeds nothing.
    """
    space, texts, inputs = space_and_texts(cfg, inputs)
    cache = TeacherCache.open(cfg.cache_dir(), space.key, cfg.teacher.model)
    if cfg.teacher.backend == "vectors":
        check_vectors(cfg.teacher, cfg.cache_dir(), keep=True)  # for the runs after this one
        ingest_vectors(cfg.teacher, cache)
    keys = inputs.keys
    scanned = _checked(cache, cache.entries())
    plan = plan_selection(cfg, keys, scanned.ordinal_maps())
    todo = plan.todo.texts
    if todo and cfg.teacher.backend == "vectors":
        raise DataError(_uncovered(cfg, plan))
    if todo:
        layout = cluster_stage_layout(cfg.teacher, todo)
        sink = cache.sink(cfg.teacher.vector_dtype, layout.rows_per_call)
        calls = teacher_calls(select_rows(texts, plan.todo, plan.repeated), layout)
        embed_texts(calls, cfg.teacher, layout).write_datasink(sink)
        known = {e["shard"] for e in scanned.entries}
        scanned += _checked(cache, [e for e in cache.entries() if e["shard"] not in known])
        plan = plan_selection(cfg, keys, scanned.ordinal_maps())
    if plan.todo.texts:
        missing = plan.todo.texts
        raise RunError(f"{cache.root}: {missing} texts still have no vector after the stage")
    return TeacherVectors(cache, space, scanned, plan, todo, dict(inputs.skipped))


def _uncovered(cfg: LeafConfig, plan: Plan) -> str:
    """Texts of the sources with no precomputed vector: counted, the first one found named."""
    where = locate_texts(cfg.data, [plan.first_missing.hex()])
    first = f" (first: {where[0]})" if where else ""
    return (
        f"teacher.vectors: {cfg.teacher.vectors}: no vector for {plan.todo.texts} text(s) of the "
        f"sources{first}; a vector's row must have the same text and kind"
    )


def _checked(cache: TeacherCache, entries: list[dict]) -> CacheKeys:
    """`entries`' shards checked by the tasks that read them; those that fail are set aside
    (their texts are embedded again)."""
    scanned = cache.scan(entries)
    for shard in cache.set_aside(scanned.problems):
        logger.warning("teacher cache: set aside %s", shard)
    return scanned


def verify_cache(cfg: LeafConfig, repair: bool = False) -> tuple[VerifyReport, list[str]]:
    """`leaf-ray cache verify [--repair]`: the config's cache, row by row in Ray tasks, and
    which of its texts have no vector; with `repair`, shards that fail their check are set aside
    first (and listed), for the next `embed` to embed their texts again."""
    space, _, inputs = space_and_texts(cfg)
    cache = TeacherCache.open(cfg.cache_dir(), space.key, cfg.teacher.model, create=False)
    scanned = cache.scan(rows=True)
    moved = cache.set_aside(scanned.problems) if repair else []
    plan = plan_selection(cfg, inputs.keys, scanned.ordinal_maps())
    report = VerifyReport(
        rows=scanned.rows,
        shards=len(scanned.entries),
        missing=plan.todo.texts,
        duplicated=plan.duplicated,
        # Shards the repair set aside are no longer committed: their texts count as missing.
        corrupt=[] if repair else [f"{s}: {p}" for s, p in scanned.problems.items()],
        orphans=orphans(cache, scanned.entries),
    )
    report.corrupt += scanned.row_problems
    return report, moved


def space_and_texts(
    cfg: LeafConfig, inputs: Inputs | None = None
) -> tuple[TeacherSpace, ray.data.Dataset, Inputs]:
    """The teacher's space and the config's texts (read lazily: the rows each source keeps),
    on the config's Ray, once the inputs pass their checks (unless `inputs` says they have)."""
    inputs = with_hub_keys(cfg, check_inputs(cfg) if inputs is None else inputs)
    connect_ray(cfg.ray)
    space = teacher_space(cfg.teacher, on_gpu=ray.cluster_resources().get("GPU", 0) > 0)
    return space, read_texts(cfg.data, inputs.kept), inputs
