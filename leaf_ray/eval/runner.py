"""Evaluation stage, through mteb, fanned out on Ray.

1. One Ray task per (model, eval task) embeds the task's queries and documents, as mteb feeds
   them, unless the eval cache already holds them: vectors are keyed by the model's files and
   prompts and by the task's data, so the teacher's document embeddings are computed once and
   reused by every later student, checkpoint and mode.
2. One Ray task per (eval task, mode, dimension, precision) runs mteb's retrieval evaluation over
   those vectors (Matryoshka-truncated, quantized), and returns mteb's TaskResult.
Vectors pass from phase 1 to phase 2 through the eval cache, never through the driver: the tasks
write and read it themselves (a large corpus streams to disk as it is embedded), and each
scoring task asks Ray for the memory its vectors take.

Modes: the teacher; the pretrained student model alone, as the user had it (its own encoder and
pooling, no projection; when the student is pretrained); the student as training starts (its
projection fitted) and the distilled student; and LEAF's asymmetric mode (student queries against
the teacher's document index), before and after training."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from leaf_ray.cluster import cpu_share, node_amounts
from leaf_ray.config import EvalConfig
from leaf_ray.eval.cache import EvalCache
from leaf_ray.eval.models import EvalModel, _embed_task, _model_meta
from leaf_ray.eval.scoring import _add_change, _add_retention, _score_memory, _score_task
from leaf_ray.eval.tasks import MODES, EvalError, EvalTask, resolve_tasks
from leaf_ray.progress import progress
from leaf_ray.storage import Location

if TYPE_CHECKING:
    from mteb.models.model_meta import ModelMeta
    from mteb.results import TaskResult


@dataclass
class EvalOutcome:
    rows: list[dict]  # one per (task, mode, dimension, precision), with retention
    embedded: dict[str, int]  # texts each model embedded now (0: all from the eval cache)
    results: list[tuple[ModelMeta, TaskResult]]  # mteb's, to save in mteb's layout


def evaluate(
    models: dict[str, EvalModel], cfg: EvalConfig, cache_root: Location, label: str
) -> EvalOutcome:
    """Every mode whose models are given, on every task, at every size and precision asked."""
    tasks = resolve_tasks(cfg)
    modes = {m: qd for m, qd in MODES.items() if set(qd) <= set(models)}
    # The teacher first: the largest model should not be the last task left running.
    roles = sorted({role for qd in modes.values() for role in qd}, key=lambda r: r != "teacher")
    keys = {role: models[role].key(cfg.max_seq_length) for role in roles}
    cache = EvalCache(cache_root)
    embedded = _embed_missing(models, keys, tasks, cfg, cache)

    shape = functools.cache(cache.shape)  # a footer read once, though modes share sides
    largest_node = max(node_amounts("memory"), default=0)
    jobs = {}
    for task in tasks:
        for mode, (q_role, d_role) in modes.items():
            pair = (keys[q_role], keys[d_role])
            shapes = [shape(task, pair[0], "query"), shape(task, pair[1], "document")]
            full = min(dim for _, dim in shapes)
            score = _score_task.options(memory=_score_memory(shapes, largest_node))
            name = models["teacher"].name if mode == "teacher" else f"leaf-ray/{label}-{mode}"
            revision = pair[0] if q_role == d_role else "-".join(pair)
            for dimension in [full, *(d for d in cfg.dimensions if d < full)]:
                for quantization in cfg.quantizations:
                    setting = None
                    if (dimension, quantization) != (full, "float32"):
                        setting = {"dimension": dimension, "quantization": quantization}
                    meta = _model_meta(name, revision, dimension, setting)
                    row = {"dataset": task.name, "mode": mode, "dimension": dimension}
                    row |= {"quantization": quantization, "full": dimension == full}
                    row |= {"metric": task.main_score, "model": name, "revision": revision}
                    ref = score.remote(task, meta, cache, pair, dimension, quantization)
                    jobs[ref] = (row, meta)
    results = dict(_as_completed(jobs, "scoring"))
    rows = [row | {"score": results[ref].get_score()} for ref, (row, _) in jobs.items()]
    _add_retention(rows)
    _add_change(rows)
    return EvalOutcome(rows, embedded, [(meta, results[ref]) for ref, (_, meta) in jobs.items()])


def _embed_missing(
    models: dict[str, EvalModel],
    keys: dict[str, str],
    tasks: list[EvalTask],
    cfg: EvalConfig,
    cache: EvalCache,
) -> dict[str, int]:
    """Embed every (role, task) the eval cache lacks, each as a Ray task that writes its vectors
    there; role -> texts embedded now (0: all from the cache)."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    todo = [(role, task) for task in tasks for role in keys if not cache.has(task, keys[role])]
    # Off GPUs, an equal share of the cluster's CPUs each: a task's torch threads are its CPUs,
    # so fewer tasks than CPUs (one model on one task, say) use them all.
    cpus = max(1, int(cpu_share(resources["CPU"], node_amounts("CPU"), len(todo)))) if todo else 1

    def embed(role: str) -> Any:  # a model's task takes a GPU when there are some; an API's not
        if gpus > 0 and models[role].endpoint is None:
            return _embed_task.options(num_cpus=1, num_gpus=1)
        return _embed_task.options(num_cpus=cpus, num_gpus=0)

    # The teacher first (its order in `keys`).
    jobs = {
        embed(role).remote(models[role], task, cfg, cache, keys[role]): (role, task)
        for role, task in todo
    }
    embedded = dict.fromkeys(keys, 0)
    for ref, texts in _as_completed(jobs, "embedding"):
        embedded[jobs[ref][0]] += texts
    return embedded


def _as_completed(jobs: dict[ray.ObjectRef, Any], what: str) -> Iterator[tuple[ray.ObjectRef, Any]]:
    """(ref, result) as each task finishes, with a progress bar; a failed task names itself."""
    pending = list(jobs)
    with progress(total=len(jobs), desc=f"eval: {what}", unit="task") as bar:
        while pending:
            (ready,), pending = ray.wait(pending, num_returns=1)
            try:
                result = ray.get(ready)
            except ray.exceptions.RayTaskError as e:  # e.g. an mteb task offline: say which
                cause = e.cause if e.cause is not None else e
                raise EvalError(
                    f"eval: {what} {_describe(jobs[ready])} failed: {cause!r}"
                ) from None
            bar.update(1)
            yield ready, result


def _describe(job: tuple) -> str:
    first, second = job
    if isinstance(second, EvalTask):  # (role, task): an embedding job
        return f"{second.name} with the {first}"
    return (
        f"{first['dataset']}, {first['mode']}, {first['dimension']} dims, {first['quantization']}"
    )
