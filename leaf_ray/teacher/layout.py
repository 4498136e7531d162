"""How the teacher stage fits a cluster: what each actor reserves, how many tokenizer actors feed
them, the rows in a call."""

from __future__ import annotations

from dataclasses import dataclass

import ray
import ray.data

from leaf_ray.cluster import cpu_share, node_amounts, torch_threads
from leaf_ray.config import ConfigError, TeacherConfig


@dataclass(frozen=True)
class StageLayout:
    """How the teacher stage runs: what each teacher actor reserves and runs with, how many
    tokenizer actors feed them, and the rows in each teacher call and each input block."""

    gpus: float
    cpus: float
    torch_threads: int
    tokenizers: int
    rows_per_call: int
    rows_per_block: int


TOKENIZERS_PER_GPU = 16


BLOCKS_PER_CALL = 8  # with tokenizer actors, a block is an eighth of a teacher call


def stage_layout(
    cfg: TeacherConfig,
    free: dict[str, float],
    node_cpus: list[float],
    num_rows: int | None = None,
) -> StageLayout:
    """On GPUs, each teacher actor reserves one CPU, and tokenizer actors (one CPU each) take the
    CPUs left but one per node for Ray Data's tasks, up to 16 per teacher actor: one core
    tokenizes ~2,600 real passages a second for bert-base (measured here), one H100 runs its
    forward at 13-18k. With none to spare, a teacher actor tokenizes with the CPUs that come
    with its GPU. On CPUs the forward dwarfs tokenizing, so the actors do it themselves unless
    `tokenizer_actors` says otherwise.

    A call is sorted by token length once, so larger calls carry less padding; on GPUs they are
    smaller (the GPU waits for its first), and `num_rows`, when known, keeps calls small enough
    to give every actor work. Blocks are one call each, but for tokenizer actors: theirs are
    an eighth of a call, so that many tokenize one call's rows at once (one core takes 1.6 s
    over a 4,096-passage call, as `batch_size: 256` makes: the GPU's wait for its first)."""
    on_gpus = free.get("GPU", 0) > 0 and cfg.backend == "sentence_transformers"
    # CPUs left once each node keeps one for Ray Data and the teacher actors have theirs (on
    # CPUs, at least one between them): more tokenizer actors would wait for CPUs forever.
    spare = int(free["CPU"] - len(node_cpus) - (cfg.num_actors if on_gpus else 1))
    if (cfg.tokenizer_actors or 0) > max(spare, 0):
        raise ConfigError(
            f"teacher.tokenizer_actors: {cfg.tokenizer_actors} (a CPU each) do not fit: the "
            f"cluster has {free['CPU']:g} CPUs free for the teacher stage; at most {max(spare, 0)}"
        )
    if on_gpus:
        default = max(0, min(TOKENIZERS_PER_GPU * cfg.num_actors, spare))
        tokenizers = default if cfg.tokenizer_actors is None else cfg.tokenizer_actors
        per_gpu = max(1, int(free["CPU"] // free["GPU"]) - 1)
        gpus, cpus = min(1.0, free["GPU"] / cfg.num_actors), 1.0
        threads = 1 if tokenizers else per_gpu
    else:
        tokenizers = cfg.tokenizer_actors or 0
        # The actors reserve all but one CPU per node, so Ray Data's read, repartition and write
        # tasks (a whole CPU each) can always be scheduled; otherwise the pipeline deadlocks.
        cpus = cpu_share(free["CPU"] - tokenizers, node_cpus, cfg.num_actors, keep_per_node=1)
        threads = torch_threads(free["CPU"] - tokenizers, node_cpus, cfg.num_actors)
        gpus = 0
    rows_per_call = cfg.batch_size * (16 if on_gpus else 128)
    if num_rows is not None:
        rows_per_call = max(cfg.batch_size, min(rows_per_call, -(-num_rows // cfg.num_actors)))
    rows_per_block = rows_per_call
    if tokenizers:
        rows_per_block = max(cfg.batch_size, -(-rows_per_call // BLOCKS_PER_CALL))
    return StageLayout(gpus, cpus, threads, tokenizers, rows_per_call, rows_per_block)


def cluster_stage_layout(
    cfg: TeacherConfig, num_rows: int | None = None, held_elsewhere: dict[str, float] | None = None
) -> StageLayout:
    """`stage_layout` on this Ray cluster. `held_elsewhere`: resources the trainers hold while
    the teacher streams into them (streaming mode); the teacher stage shares the rest."""
    free = dict(ray.cluster_resources())
    for name, amount in (held_elsewhere or {}).items():
        free[name] = free.get(name, 0) - amount
    return stage_layout(cfg, free, node_amounts("CPU"), num_rows)
